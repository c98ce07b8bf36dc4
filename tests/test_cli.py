"""The ``shoal`` command, run as real subprocesses (``python -m shoal``).

Self-contained on purpose: these tests start their own clusters through the
CLI and need none of the shared fixtures.
"""
from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from shoal.security import ConnectionInfo, new_key, write_connection_file

from conftest import FORKED_NAMES

SHOAL = [sys.executable, "-m", "shoal"]


# ----------------------------------------------------------------- helpers
def run_cli(*args: str, timeout: float = 120,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``shoal ARGS`` to completion with no terminal and no stdin, as in CI."""
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "CI": "true", **(env or {})})


class Lines:
    """The stdout lines of a running process, read by a thread so waits can have deadlines."""

    def __init__(self, stream) -> None:
        self.seen: list = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, prefix: str, timeout: float = 60) -> str:
        """The next line starting with ``prefix``; fail if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line starting {prefix!r} within {timeout} s; got {self.seen}")
            if line is None:
                pytest.fail(f"the process ended before printing {prefix!r}; got {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line


def alive(procs) -> list:
    """Those of ``procs`` still running (zombies count as gone)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def processes_started_by(pid: int) -> list:
    """Live shoal brokers and workers started by ``pid``: spawned ones name it in their
    command line, forked ones are its children by a shoal process name."""
    found = []
    for p in psutil.process_iter(["cmdline", "name", "ppid"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if ("shoal.worker" in cmd or "shoal.broker" in cmd) and f"--parent-pid {pid} " in cmd + " ":
            found.append(p)
        elif p.info["name"] in FORKED_NAMES and p.info["ppid"] == pid:
            found.append(p)
    return alive(found)


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Teardown after a failed test: stop ``proc`` and everything it started."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, still = psutil.wait_procs(children + processes_started_by(proc.pid), timeout=10)
    for p in still:
        p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli_cluster(tmp_path):
    """``shoal cluster -n 2`` running as a subprocess; yields (process, its stdout lines)."""
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*SHOAL, "cluster", "-n", "2"], stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, text=True,
                                env={**os.environ, "CI": "true"})
    try:
        yield proc, Lines(proc.stdout)
    finally:
        stop_process_tree(proc)
        proc.stdout.close()


# ----------------------------------------------------------------- demo
@pytest.mark.timeout(180)
def test_demo_estimates_pi_and_reports_throughput_and_per_worker_counts():
    result = run_cli("demo", "-n", "2", "--tasks", "10000", "--samples", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    pi = float(re.search(r"pi estimate: ([0-9.]+)", out).group(1))
    assert abs(pi - math.pi) < 0.1
    rate = float(re.search(r"throughput: ([0-9,]+) tasks/s", out).group(1).replace(",", ""))
    assert rate > 0
    per_worker = dict((name, int(n.replace(",", ""))) for name, n in
                      re.findall(r"(local-\d+) ([0-9,]+)", out.split("tasks per worker:")[1]))
    assert sum(per_worker.values()) == 10_000
    assert set(per_worker) <= {"local-1", "local-2"}
    # Not a terminal (CI=true): plain progress lines, no carriage returns.
    assert "\r" not in out
    assert re.search(r"\]\s+10000/10000\s+100%", out)
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_demo_leaves_no_process_behind():
    proc = subprocess.Popen([*SHOAL, "demo", "-n", "2", "--tasks", "2000", "--samples", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env={**os.environ, "CI": "true"})
    try:
        assert proc.wait(90) == 0
    finally:
        stop_process_tree(proc)
    deadline = time.monotonic() + 10
    while processes_started_by(proc.pid):
        assert time.monotonic() < deadline, processes_started_by(proc.pid)
        time.sleep(0.05)  # polling with a deadline


# ----------------------------------------------------------------- cluster + status
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cluster_command_serves_status_then_stops_everything_on_signal(cli_cluster, sig):
    proc, lines = cli_cluster
    connection_file = lines.expect("connection file: ").split(": ", 1)[1]
    join = lines.expect("join with: ")
    assert join == f"join with: shoal worker --connection-file {connection_file}"
    lines.expect("press Ctrl-C to stop")
    started = psutil.Process(proc.pid).children(recursive=True)
    assert len(processes_started_by(proc.pid)) == 3  # the broker and two workers

    table = run_cli("status", connection_file)
    assert table.returncode == 0, table.stderr
    assert re.search(r"^workers\s+2 ", table.stdout, re.M)
    assert re.search(r"^local-1\s", table.stdout, re.M)
    assert re.search(r"^local-2\s", table.stdout, re.M)

    raw = run_cli("status", connection_file, "--json")
    assert raw.returncode == 0, raw.stderr
    state = json.loads(raw.stdout)
    assert sorted(w["name"] for w in state["worker_list"]) == ["local-1", "local-2"]
    assert {w["pid"] for w in state["worker_list"]} <= {p.pid for p in started}

    proc.send_signal(sig)
    assert proc.wait(30) == 0
    _, left = psutil.wait_procs(started, timeout=10)
    assert not alive(left), f"left running: {left}"
    assert not processes_started_by(proc.pid)


@pytest.mark.timeout(60)
def test_status_of_a_dead_broker_fails_with_a_clear_message(tmp_path):
    path = tmp_path / "dead.json"
    write_connection_file(ConnectionInfo(f"tcp://127.0.0.1:{free_port()}", new_key()), path)
    result = run_cli("status", str(path), "--timeout", "1")
    assert result.returncode == 1
    assert "no shoal broker answered" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_status_of_an_address_without_key_says_how_to_give_one():
    result = run_cli("status", f"tcp://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "--key-file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_status_without_argument_and_no_broker_says_so(tmp_path):
    env = {"SHOAL_RUNTIME_DIR": str(tmp_path), "SHOAL_CONNECTION_FILE": ""}
    result = run_cli("status", env=env)
    assert result.returncode == 1
    assert "no running broker found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("broker", "worker", "cluster", "status", "demo"):
        assert command in result.stdout


def test_status_shows_queues_held_tasks_schedules_locks_and_tasks_no_worker_can_take():
    from shoal.cli import format_status
    from shoal.magics.cluster_magic import ClusterStatus
    state = {"address": "tcp://127.0.0.1:1", "uptime": 5.0, "workers": 1, "slots": 1,
             "counts": {}, "scheduled": 2, "waiting": 1, "rate_limited": {"f": 3},
             "queues": {"default": {"queued": 1, "running": 0}, "gpu": {"queued": 4, "running": 1}},
             "worker_list": [{"name": "g1", "queues": ["gpu"], "resources": {"gpu": 1}}],
             "locks": [{"name": "nightly", "holder": "client ab", "waiting": 1}],
             "schedule_list": [{"name": "daily", "cron": "0 9 * * *", "tz": "UTC",
                                "next_run": 1800000000, "runs": 3, "last_status": "done"}],
             "unrunnable": [{"needs": "queue 'tpu'", "count": 2,
                             "start": "shoal worker ADDRESS --queues tpu"}]}
    text = format_status(state)
    assert "2 scheduled   1 waiting for other tasks   3 rate-limited" in text
    assert "'daily' (0 9 * * *, UTC): next run 2027-01-15" in text and "3 run(s)" in text
    assert "lock      'nightly' held by client ab, 1 waiting" in text
    assert "2 task(s) need queue 'tpu'" in text and "--queues tpu" in text
    assert "gpu: 4 queued, 1 running" in text and "gpu gpu=1" in text
    html = ClusterStatus(state)._repr_html_()
    assert "gpu=1" in html and "nightly" in html and "daily" in html
