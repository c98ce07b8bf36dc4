"""Where shoal's time goes: py-spy samples the client and the broker during one workload.

    benchmarks/.venv-peers/bin/python benchmarks/profile_shoal.py latency
    benchmarks/.venv-peers/bin/python benchmarks/profile_shoal.py submit --top 25
    benchmarks/.venv-peers/bin/python benchmarks/profile_shoal.py submit --worker

Starts a 2-worker cluster, warms it up, then runs the workload (``latency``:
2,000 round trips one at a time; ``submit``: 10,000 submits then wait, three
times) while ``py-spy record`` samples this process (the client) and the
broker (and with ``--worker`` one worker).  It prints, per process, the
functions where the samples fall, by own time and by time including callees,
as ``file:line function`` (the line py-spy saw most often), and keeps the raw
collapsed stacks (flame-graph input) in ``--out``.  py-spy comes with the peers'
environment (``compare.py`` installs it); it needs permission to read other
processes' memory (root, or ptrace allowed).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Workers import the task functions from bench_tasks.py, here, as this process does.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.abspath(__file__))] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p])

import shoal  # noqa: E402

from bench_tasks import inc  # noqa: E402


def run_latency(client) -> None:
    for i in range(2_000):
        client.submit(inc, i).result(30)


def run_submit(client) -> None:
    for _ in range(3):
        futures = [client.submit(inc, i) for i in range(10_000)]
        shoal.wait(futures, timeout=60)


WORKLOADS = {"latency": run_latency, "submit": run_submit}


#: C functions that wait (a thread blocked in one is idle, not busy)
NATIVE_WAITS = ("poll", "ppoll", "epoll_wait", "select", "pselect", "clock_nanosleep",
                "nanosleep", "pthread_cond_wait", "pthread_cond_timedwait", "sem_wait",
                "sem_timedwait", "sem_clockwait", "futex", "read")
#: Python functions that wait, for samples whose C leaf has no name
PY_WAITS = ("Condition.wait", "Event.wait", "Thread.join", "sleep", "Lock.acquire",
            "Poller.poll", "Socket.poll", "lock.acquire")


def _is_wait(frames: list) -> bool:
    """True when a sample's stack ends in a blocking call: the thread was idle."""
    leaf = frames[-1]
    name = leaf.rpartition(" (")[0].strip()
    if leaf.endswith("(libc.so.6)") or "libpthread" in leaf or ".so" in leaf:
        if name in NATIVE_WAITS or any(name.startswith(w) for w in ("__futex", "__GI___poll")):
            return True
        python = [f for f in frames if ".py:" in f or "<frozen" in f]
        if name.startswith("0x") and python:
            return any(w in python[-1] for w in PY_WAITS)
        return False
    return any(f"{w} (" in leaf for w in PY_WAITS)


def summarize(raw: Path, top: int) -> str:
    """Own and inclusive sample counts per function from py-spy's collapsed stacks.

    Samples in a blocking call (poll, a condition wait, sleep) are left out: what
    remains is where the process is busy.
    """
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    lines_seen: dict = collections.defaultdict(collections.Counter)
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if _is_wait(frames):
            idle += n
            continue
        total += n
        seen = set()
        for i, frame in enumerate(frames):
            name, _, where = frame.rpartition(" (")
            where = where.rstrip(")")
            path, _, lineno = where.rpartition(":")
            key = f"{_short(path)} {name.strip()}"
            lines_seen[key][lineno] += n
            if key not in seen:
                inclusive[key] += n
                seen.add(key)
            if i == len(frames) - 1:
                own[key] += n
    if not total:
        return "  (no samples: is ptrace allowed?)"

    def where(key: str) -> str:
        path, _, name = key.partition(" ")
        lineno = lines_seen[key].most_common(1)[0][0]
        return f"{path}:{lineno} {name}"
    out = [f"  {total} busy samples ({idle} more waiting, left out)", "  own time:"]
    out += [f"    {100 * n / total:5.1f}%  {where(k)}" for k, n in own.most_common(top)]
    out.append("  including callees (shoal code only):")
    ours = [(k, n) for k, n in inclusive.most_common() if k.startswith("shoal/")][:top]
    out += [f"    {100 * n / total:5.1f}%  {where(k)}" for k, n in ours]
    return "\n".join(out)


def _short(path: str) -> str:
    for marker in ("/shoal/", "/site-packages/", "/lib/python3"):
        if marker in path:
            head = "shoal/" if marker == "/shoal/" else ""
            return head + path.split(marker, 1)[1]
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--worker", action="store_true", help="profile one worker too")
    parser.add_argument("--native", action="store_true", help="C frames too (py-spy --native)")
    parser.add_argument("--out", default=None, help="folder for the raw stacks")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(py_spy):
        raise SystemExit("profile_shoal: py-spy not found (pip install py-spy)")
    out = Path(args.out or tempfile.mkdtemp(prefix="shoal-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("shoal").setLevel(logging.ERROR)
    with shoal.Cluster(n_workers=2) as cluster:
        client = cluster.client()
        for i in range(200):  # warm-up
            client.submit(inc, i).result(30)
        shoal.wait([client.submit(inc, i) for i in range(2_000)], timeout=60)
        targets = {"client": os.getpid(), "broker": cluster.broker.pid}
        if args.worker:
            targets["worker"] = cluster.workers[0].pid
        spies = {}
        for name, pid in targets.items():
            spies[name] = subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", str(args.rate),
                 *(["--native"] if args.native else ["--nonblocking"]),
                 "--format", "raw", "--output", str(out / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches: nothing to wait on but its start
        start = time.perf_counter()
        WORKLOADS[args.workload](client)
        elapsed = time.perf_counter() - start
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
        for name, spy in spies.items():
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if spy.returncode not in (0, -signal.SIGINT):
                print(f"py-spy on {name}: exit {spy.returncode}: {err.decode()[-300:]}")
    print(f"{args.workload}: {elapsed:.2f} s of work; raw stacks in {out}")
    for name in targets:
        path = out / f"{name}.txt"
        print(f"\n{name}:")
        print(summarize(path, args.top) if path.exists() else "  (no output)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
