"""shoal and its peers, side by side in one run, and the raw-pyzmq floor beneath them.

    python benchmarks/compare.py                      # everything (about 20 minutes on 2 cores)
    python benchmarks/compare.py --quick              # a fast pass (a few minutes)
    python benchmarks/compare.py --only shoal,dask    # some tools only (shoal always runs)

On first use it creates ``benchmarks/.venv-peers`` and installs shoal (editable)
and the peers into it: ipyparallel, Dask distributed, loky, Ray, Celery with the
Redis client (plus NumPy, psutil, matplotlib, py-spy and pyinstrument); the
stdlib's ProcessPoolExecutor needs nothing.  A peer that cannot be installed is
reported as unavailable, with the reason, and the run goes on.  Celery needs a
real Redis: the runner starts Debian's ``redis-server`` on a free loopback port
(installing it with apt-get when it is missing and we are root) and stops it.

Each tool runs each part of the workloads in its own process (``peers.py``),
with the same number of worker processes; the floor runs in ``floor.py``.  Every
process the run starts is stopped at the end of its part, on failure, on a
time-out and on Ctrl-C: each part's processes carry a tag in their
environment, and whatever still carries it afterwards is killed.

The table goes to the terminal and, with the floor, the chart and every raw
figure, to ``docs/benchmarks/`` (``results.md``, ``results.png``,
``results.json``); a ``--quick`` pass writes to ``benchmarks/.results-quick/``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
VENV = BENCH_DIR / ".venv-peers"
REQUIREMENTS = BENCH_DIR / "requirements-peers.txt"
INSTALL_REPORT = VENV / "peers-install.json"
TOOLS = ["shoal", "stdlib", "loky", "dask", "ipyparallel", "ray", "celery"]
IMPORTS = {"shoal": "shoal", "stdlib": "concurrent.futures", "loky": "loky",
           "dask": "distributed", "ipyparallel": "ipyparallel", "ray": "ray", "celery": "celery"}
#: the requirement lines each tool needs (a failed install makes it unavailable)
PACKAGES = {"loky": "loky", "dask": "distributed", "ipyparallel": "ipyparallel", "ray": "ray",
            "celery": "celery"}
PARTS = ["main", "stream", "scale"]
RUN_ID = uuid.uuid4().hex[:12]


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- the virtual environment
def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, REPO_DIR / "pyproject.toml"):
        digest.update(path.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def _pip(python: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                           "--quiet", *args], capture_output=True, text=True, timeout=timeout)


def ensure_venv(reinstall: bool) -> Path:
    """Create or reuse the peers' environment; install what changed.  Returns its python."""
    python = VENV / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import sys"],
                                             capture_output=True).returncode:
        log(f"creating {VENV.relative_to(REPO_DIR)} with {sys.executable}")
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
    stamp = VENV / ".peers-stamp"
    wanted = _fingerprint()
    if reinstall or not stamp.exists() or stamp.read_text() != wanted:
        log("installing shoal and the peers into it (first time: a few minutes)")
        _pip(python, "--upgrade", "pip")
        done = _pip(python, "-e", str(REPO_DIR))
        if done.returncode:
            raise SystemExit(f"compare: could not install shoal into {VENV}:\n{done.stderr[-2000:]}")
        failures = {}
        if _pip(python, "-r", str(REQUIREMENTS)).returncode:
            # One at a time, so that one peer without a wheel here leaves the others installed.
            for line in REQUIREMENTS.read_text().splitlines():
                requirement = line.split("#")[0].strip()
                if not requirement:
                    continue
                done = _pip(python, requirement)
                if done.returncode:
                    lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
                    failures[requirement] = (lines[-1] if lines else "pip failed")[:300]
                    log(f"could not install {requirement}: {failures[requirement]}")
        INSTALL_REPORT.write_text(json.dumps(failures, indent=1))
        stamp.write_text(wanted)
    return python


def unavailable_reason(python: Path, tool: str) -> Optional[str]:
    """Why ``tool`` cannot run with ``python``, or None when it can."""
    failures = {}
    if INSTALL_REPORT.exists() and Path(sys.prefix).resolve() == VENV.resolve():
        failures = json.loads(INSTALL_REPORT.read_text())
    for requirement, why in failures.items():
        if tool in PACKAGES and requirement.startswith(PACKAGES[tool]):
            return f"pip could not install {requirement}: {why}"
    done = subprocess.run([str(python), "-c", f"import {IMPORTS[tool]}"], capture_output=True,
                          text=True, timeout=300)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return f"import {IMPORTS[tool]} failed: {lines[-1] if lines else done.returncode}"
    return None


# ----------------------------------------------------------------- processes
def tagged_pids(tag: str) -> list:
    """Pids of live processes whose environment holds ``BENCH_TAG=tag`` (Linux /proc)."""
    needle = b"\0BENCH_TAG=" + tag.encode() + b"\0"
    found = []
    if not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = b"\0" + fh.read() + b"\0"
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ:
            found.append(int(entry))
    return found


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (to tell it from a later process with the same pid).

    None when it is gone, or a zombie: dead already, only not yet reaped.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return None


def descendants(root: int) -> dict:
    """{pid: start time} of every live descendant of ``root`` (Linux /proc)."""
    children: dict = {}
    if not os.path.isdir("/proc"):
        return {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    found, todo = {}, [root]
    while todo:
        for pid, started in children.get(todo.pop(), ()):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            words = fh.read().split(b"\0")
        words = [w.decode(errors="replace") for w in words if w]
        return " ".join(os.path.basename(w) if i == 0 else w for i, w in enumerate(words[:4]))
    except OSError:
        return str(pid)


def sweep(tag: str, what: str, seen: Optional[dict] = None, grace: float = 3.0) -> list:
    """Stop what a part left running once ``grace`` s have passed: TERM, then KILL.

    That is every process still carrying ``tag`` in its environment, and every
    process of ``seen`` ({pid: start time}, the descendants watched while the part
    ran) still alive: a process that rewrites its title (Ray's do) loses its
    environment from /proc.  Returns what each one was: a tool's clean-up that
    leaves processes behind shows here.
    """
    seen = seen or {}

    def remaining() -> list:
        alive = [pid for pid, started in seen.items() if _start_time(pid) == started]
        return sorted(set(tagged_pids(tag)) | set(alive))
    deadline = time.monotonic() + grace
    pids = remaining()
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)  # children exiting on their own after their parent: give them a moment
        pids = remaining()
    names = [_describe(pid) for pid in pids]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = remaining()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if names:
        log(f"{what}: stopped {len(names)} leftover process(es): {'; '.join(names)}")
    return names


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Ctrl-C to the process group (so its clean-up runs), then KILL after ``grace`` s."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A private redis-server on a free loopback port, for Celery; stopped by :meth:`stop`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self.tag = f"{RUN_ID}:redis"

    @staticmethod
    def find_or_install() -> tuple:
        """(path to redis-server or None, why not)."""
        exe = shutil.which("redis-server") or ("/usr/bin/redis-server"
                                               if os.path.exists("/usr/bin/redis-server") else None)
        if exe:
            return exe, ""
        if not shutil.which("apt-get"):
            return None, "redis-server is not installed and there is no apt-get"
        if os.geteuid() != 0:
            return None, "redis-server is not installed (run: sudo apt-get install redis-server)"
        log("installing redis-server with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for command in (["apt-get", "install", "-y", "-q", "redis-server"],
                        ["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "redis-server"]):
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=env,
                                      timeout=600)
            except subprocess.TimeoutExpired:
                return None, f"{' '.join(command)} timed out"
            if command[1] == "install" and done.returncode == 0:
                break
        exe = shutil.which("redis-server")
        return (exe, "") if exe else (None, "apt-get could not install redis-server: "
                                      + (done.stderr.strip().splitlines() or ["?"])[-1])

    def start(self, exe: str) -> None:
        port = free_port()
        log_path = self.run_dir / "redis.log"
        env = dict(os.environ, BENCH_TAG=self.tag)
        self.proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.run_dir), "--logfile", str(log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        self.url = f"redis://127.0.0.1:{port}/0"
                        log(f"redis-server {self.proc.pid} on 127.0.0.1:{port}")
                        return
            except OSError:
                time.sleep(0.1)  # not listening yet: poll with a deadline
        raise RuntimeError("redis-server did not answer within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        sweep(self.tag, "redis")


# ----------------------------------------------------------------- running the parts
class Runner:
    def __init__(self, args: argparse.Namespace, python: Path, run_dir: Path) -> None:
        self.args = args
        self.python = python
        self.run_dir = run_dir
        self.extra_env: dict = {}

    def _env(self, tag: str) -> dict:
        path = [str(BENCH_DIR), str(REPO_DIR)] + [p for p in os.environ.get("PYTHONPATH", "")
                                                  .split(os.pathsep) if p]
        return dict(os.environ, **self.extra_env, PYTHONPATH=os.pathsep.join(path),
                    BENCH_TAG=tag, BENCH_LOG_DIR=str(self.run_dir), PYTHONUNBUFFERED="1",
                    # each worker process runs one task at a time: no hidden thread pools
                    OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def run(self, name: str, cmd: list, out: Path, timeout: float) -> dict:
        """Run ``cmd`` in its own process group, bounded by ``timeout``; read its JSON."""
        tag = f"{RUN_ID}:{name}"
        log_path = self.run_dir / f"{name}.log"
        start = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self._env(tag),
                                    cwd=str(REPO_DIR), start_new_session=True)
            timed_out = False
            seen: dict = {}  # every descendant met while it runs, for the sweep
            deadline = time.monotonic() + timeout
            try:
                while True:
                    try:
                        proc.wait(1.0)
                        break
                    except subprocess.TimeoutExpired:
                        seen.update(descendants(proc.pid))
                        if time.monotonic() > deadline:
                            timed_out = True
                            break
            finally:  # also on Ctrl-C: nothing of this part outlives it
                if proc.poll() is None:
                    seen.update(descendants(proc.pid))
                    stop_group(proc)
                leftovers = sweep(tag, name, seen)
        figures: dict = {}
        if out.exists():
            figures = json.loads(out.read_text())
        if timed_out:
            figures["fatal"] = f"timed out after {timeout:.0f} s"
        elif proc.returncode and "fatal" not in figures:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            figures["fatal"] = f"exit code {proc.returncode}: {' | '.join(tail)}"[:500]
        if leftovers:
            figures["leftovers"] = leftovers
        figures["wall_s"] = round(time.monotonic() - start, 1)
        figures["log"] = str(log_path)
        return figures

    def part(self, tool: str, part: str) -> dict:
        a = self.args
        out = self.run_dir / f"{tool}-{part}.json"
        cmd = [str(self.python), str(BENCH_DIR / "peers.py"), "--tool", tool, "--part", part,
               "--workers", str(a.workers), "--cores", str(a.cores), "--json", str(out),
               "--op-timeout", str(a.op_timeout)]
        if a.quick:
            cmd.append("--quick")
        if a.repeats:
            cmd += ["--repeats", str(a.repeats)]
        limit = a.part_timeout or {"main": 900, "stream": 300, "scale": 900}[part] / (
            3 if a.quick else 1)
        figures = self.run(f"{tool}-{part}", cmd, out, limit)
        status = figures.get("fatal") or ", ".join(f"{k} failed" for k in figures.get("errors", {}))
        log(f"{tool} {part}: {figures['wall_s']:.0f} s {('- ' + status) if status else 'ok'}")
        return figures

    def floor(self, name: str = "floor") -> dict:
        out = self.run_dir / f"{name}.json"
        cmd = [str(self.python), str(BENCH_DIR / "floor.py"), "--json", str(out)]
        if self.args.quick:
            cmd.append("--quick")
        figures = self.run(name, cmd, out, self.args.part_timeout or 300)
        log(f"{name}: {figures['wall_s']:.0f} s {figures.get('fatal', 'ok')}")
        return figures


def best_floor(runs: list) -> dict:
    """Each floor figure at its best over the runs: other work on the machine only slows it."""
    runs = [r for r in runs if "tcp_relay" in r]
    if not runs:
        return {}
    best = dict(runs[0])
    for run in runs[1:]:
        for key, value in run.items():
            if isinstance(value, dict) and isinstance(best.get(key), dict):
                merged = dict(best[key])
                for k, v in value.items():
                    if isinstance(v, (int, float)) and isinstance(merged.get(k), (int, float)):
                        merged[k] = max(merged[k], v) if k.endswith("_per_s") else min(merged[k], v)
                best[key] = merged
            elif key.startswith("copy_") and key.endswith("_s"):
                best[key] = min(best[key], value)
    return best


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        with open("/proc/meminfo") as fh:
            info["memory_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        info["cpu"] = platform.processor()
    return info


def load() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------- main
def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The workloads and how each tool runs them: benchmarks/README.md.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer items and repetitions: a fast pass (a few minutes)")
    parser.add_argument("--only", metavar="TOOLS",
                        help=f"comma-separated subset of {','.join(TOOLS)} (shoal is always run)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes for every tool (default 2)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="scaling goes 1, 2, 4, ... up to this many workers (default: cores)")
    parser.add_argument("--repeats", type=int,
                        help="repetitions of each timed workload; the median is kept "
                             "(default 3, --quick 1)")
    parser.add_argument("--no-floor", action="store_true", help="skip the raw-pyzmq floor")
    parser.add_argument("--no-scale", action="store_true", help="skip the scaling workloads")
    parser.add_argument("--out", metavar="DIR",
                        help="where results.md/.png/.json go (default docs/benchmarks, "
                             "or benchmarks/.results-quick with --quick)")
    parser.add_argument("--no-venv", action="store_true",
                        help="run with this interpreter, installing nothing "
                             "(tools it lacks are reported unavailable)")
    parser.add_argument("--reinstall", action="store_true",
                        help="reinstall the peers' environment")
    parser.add_argument("--render", metavar="JSON",
                        help="run nothing: write the table, page and chart again from a "
                             "results.json")
    parser.add_argument("--op-timeout", type=float, default=120.0,
                        help="seconds any single wait may take (default 120)")
    parser.add_argument("--part-timeout", type=float,
                        help="seconds one tool's part may take (default 900 main, 300 stream, "
                             "900 scale; a third of that with --quick)")
    args = parser.parse_args(argv)
    if args.only:
        wanted = {t.strip() for t in args.only.split(",") if t.strip()}
        unknown = wanted - set(TOOLS)
        if unknown:
            parser.error(f"unknown tool(s): {', '.join(sorted(unknown))}; choose from {TOOLS}")
        args.tools = [t for t in TOOLS if t in wanted or t == "shoal"]
    else:
        args.tools = list(TOOLS)
    if args.out is None:
        args.out = str(BENCH_DIR / ".results-quick" if args.quick
                       else REPO_DIR / "docs" / "benchmarks")
    return args


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        return render(json.loads(Path(args.render).read_text()), Path(args.out))
    if not args.no_venv and os.environ.get("BENCH_IN_VENV") != "1":
        python = ensure_venv(args.reinstall)
        # Go on inside the environment, where psutil and matplotlib are.
        os.environ["BENCH_IN_VENV"] = "1"
        os.execv(str(python), [str(python), str(Path(__file__).resolve())] + list(argv))
    python = Path(sys.executable)
    # Ctrl-C and SIGTERM unwind the same way: every part's processes and Redis are stopped.
    # (SIGINT explicitly too: a shell starting us in the background may have ignored it.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    command = "python benchmarks/compare.py" + "".join(f" {shlex.quote(a)}" for a in argv)
    results: dict = {"meta": {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                              "machine": machine(), "load_start": load(), "quick": args.quick,
                              "workers": args.workers, "cores": args.cores,
                              "repeats": args.repeats or (1 if args.quick else 3)},
                     "tools": {}}
    started = time.monotonic()
    log(f"run {RUN_ID}: {', '.join(args.tools)}, {args.workers} workers, load {load()}")
    if (load() or [0])[0] > 0.5 * (os.cpu_count() or 1):
        log("the machine is busy (see the load above): figures will be noisy")
    run_dir = Path(tempfile.mkdtemp(prefix=f"shoal-compare-{RUN_ID}-"))
    runner = Runner(args, python, run_dir)
    redis = Redis(run_dir)
    interrupted = False
    try:
        if not args.no_floor:
            results["floor_runs"] = [runner.floor("floor-start")]
        for tool in args.tools:
            entry: dict = {}
            results["tools"][tool] = entry
            reason = unavailable_reason(python, tool)
            if reason is None and tool == "celery":
                exe, reason = Redis.find_or_install()
                if exe:
                    try:
                        redis.start(exe)
                        runner.extra_env = {"BENCH_REDIS_URL": redis.url,
                                            "BENCH_REDIS_PID": str(redis.proc.pid)}
                        reason = None
                    except (OSError, RuntimeError) as exc:
                        reason = f"redis-server did not start: {exc}"
            if reason:
                entry["unavailable"] = reason
                log(f"{tool}: unavailable - {reason}")
                continue
            for part in PARTS:
                if part == "scale" and args.no_scale:
                    continue
                entry[part] = runner.part(tool, part)
            if tool == "celery":
                redis.stop()
                runner.extra_env = {}
        if not args.no_floor and not args.quick:
            # again at the end: each figure is kept at its best, which filters out a burst of
            # other work on the machine during one of the two
            results["floor_runs"].append(runner.floor("floor-end"))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything; the report covers what finished")
    finally:
        redis.stop()
    results["floor"] = best_floor(results.get("floor_runs", []))
    results["meta"].update(load_end=load(), wall_s=round(time.monotonic() - started),
                           interrupted=interrupted, logs=str(run_dir))
    render(results, Path(args.out))
    log(f"run took {results['meta']['wall_s']} s; logs in {run_dir}")
    return 130 if interrupted else 0


def render(results: dict, out: Path) -> int:
    """Print the table; write results.json, results.md and (with matplotlib) results.png."""
    import report  # here: after the re-exec, in the environment that has matplotlib
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report.text(results))
    chart = report.chart(results, out / "results.png")
    (out / "results.md").write_text(report.markdown(results, chart))
    log(f"wrote {out / 'results.md'}, results.json" + (", results.png" if chart else
                                                        " (no chart: matplotlib is missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
