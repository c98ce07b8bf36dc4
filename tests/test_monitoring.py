"""Monitoring: ``shoal events`` (JSON lines) and ``shoal top`` (a live view in a
real pseudo-terminal), both reading the broker only."""
from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_DIR, wait_until
from shoal.monitor import WINDOW, TopView, watch

pytestmark = pytest.mark.timeout(60)

SHOAL = [sys.executable, "-m", "shoal"]


def fail(message: str):
    raise ValueError(message)


def read_lines(proc: subprocess.Popen, count: int, timeout: float) -> list:
    lines, deadline = [], time.monotonic() + timeout
    while len(lines) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    return lines


@contextlib.contextmanager
def shoal_events(client, *args: str):
    """``shoal events ARGS`` running and watching (the broker counts it), stopped after."""
    events = subprocess.Popen([*SHOAL, "events", *args], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_DIR)
    try:
        wait_until(lambda: len(client.status()["watchers"]) >= 1, 20,
                   message="shoal events to start watching")
        yield events
    finally:
        if events.poll() is None:
            events.kill()
            events.wait()
        events.stdout.close()


def test_shoal_events_streams_json_lines_of_what_happens(idle_client, cluster):
    with shoal_events(idle_client, cluster.connection_file, "--count", "6") as events:
        ok = idle_client.submit(abs, -3)
        assert ok.result(timeout=10) == 3
        bad = idle_client.submit(fail, "for the log")
        with pytest.raises(ValueError):
            bad.result(timeout=10)
        lines = read_lines(events, 6, 20)
        assert events.wait(10) == 0
    parsed = [json.loads(line) for line in lines]
    # Each task's events in order; two tasks' may interleave (a lone task goes straight
    # to its worker, and the broker hears of it a moment later: shoal.direct).
    of = {task: [e for e in parsed if e["task"] == task] for task in (ok.task_id, bad.task_id)}
    assert [e["event"] for e in of[ok.task_id]] == ["task-received", "task-started",
                                                    "task-succeeded"]
    assert [e["event"] for e in of[bad.task_id]] == ["task-received", "task-started",
                                                     "task-failed"]
    succeeded, failed = of[ok.task_id][2], of[bad.task_id][2]
    assert succeeded["name"] == "abs" and succeeded["worker"] and succeeded["runtime"] >= 0
    assert failed["name"] == "test_monitoring.fail"
    assert failed["error"] == "ValueError: for the log"


def test_shoal_events_filters_by_kind(idle_client, cluster):
    with shoal_events(idle_client, cluster.connection_file, "--kinds", "task-failed",
                      "--count", "1") as events:
        idle_client.gather([idle_client.submit(abs, -i) for i in range(5)], timeout=10)
        with pytest.raises(ValueError):
            idle_client.submit(fail, "only me").result(timeout=10)
        (line,) = read_lines(events, 1, 20)
        assert events.wait(10) == 0
    assert json.loads(line)["event"] == "task-failed"


def test_the_events_api_sees_workers_join_and_leave(cluster):
    watcher = cluster.client()
    try:
        seen = []
        stream = watch(watcher, ["worker-joined", "worker-left"], timeout=20)
        name = cluster.add_workers(1)[0]
        for event in stream:
            seen.append((event["event"], event["worker"]))
            if seen == [("worker-joined", name)]:
                cluster.scale(2)  # the newest goes again
            if len(seen) == 2:
                break
    finally:
        watcher.close()
    assert seen == [("worker-joined", name), ("worker-left", name)]


def test_a_watcher_that_does_not_keep_up_costs_the_broker_nothing_but_dropped_events(
        idle_client, cluster):
    # A socket asks for events and never acknowledges them (a stuck consumer).
    stuck = cluster.client()
    try:
        stuck._post(("watch", {}))
        wait_until(lambda: idle_client.status()["watchers"], 10, message="the watcher")
        # Each round trip is a pass that sends events (a priority takes the broker's
        # path: a lone task would otherwise go straight to a worker, told in batches).
        for _ in range(WINDOW + 20):
            idle_client.submit(abs, -1, priority=1).result(timeout=10)
        state = max(idle_client.status()["watchers"], key=lambda w: w["unacked"])
        assert state["unacked"] == WINDOW
        assert state["dropped"] > 0
    finally:
        stuck.close()


def test_shoal_top_refreshes_in_place_in_a_terminal_and_quits_on_q(idle_client, cluster):
    idle_client.gather([idle_client.submit(abs, -i) for i in range(10)], timeout=10)
    pid, fd = pty.fork()
    if pid == 0:  # the child: shoal top on a real terminal
        os.execvp(sys.executable, [*SHOAL, "top", cluster.connection_file, "--interval", "0.2"])
    output = b""
    try:
        deadline = time.monotonic() + 30
        while output.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    output += os.read(fd, 65536)
                except OSError:
                    break
        assert output.count(b"\x1b[H\x1b[2J") >= 3, output[-2000:]  # redrawn in place
        os.write(fd, b"q")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    os.read(fd, 65536)
                except OSError:
                    pass
        else:
            pytest.fail("shoal top did not quit on q")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    frame = output.split(b"\x1b[H\x1b[2J")[-2].decode(errors="replace")  # a whole frame
    assert "shoal top" in frame and "tasks/s" in frame
    for name in idle_client.worker_names():
        assert name in frame


def test_shoal_top_without_a_terminal_prints_plain_frames(cluster):
    out = subprocess.run([*SHOAL, "top", cluster.connection_file, "--iterations", "2",
                          "--interval", "0.1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("shoal top") == 2 and "\x1b[" not in out.stdout


def test_top_shows_running_tasks_and_recent_failures_from_events():
    view = TopView()
    now = time.time()
    view.update({"counts": {"done": 1}}, [
        {"event": "task-started", "task": "a-1", "name": "pkg.slow", "worker": "w1", "at": now},
        {"event": "task-started", "task": "a-2", "name": "pkg.bad", "worker": "w2", "at": now},
        {"event": "task-failed", "task": "a-2", "name": "pkg.bad", "worker": "w2", "at": now,
         "error": "KeyError: 'x'"},
    ])
    text = view.render()
    assert "pkg.slow" in text and "w1" in text
    assert "RECENT FAILURES" in text and "KeyError: 'x'" in text


def test_watching_ends_with_broker_lost_when_the_broker_dies():
    import shoal
    from conftest import running_cluster
    with running_cluster(n_workers=0) as cluster:
        client = cluster.client(broker_timeout=2)
        events = watch(client)
        cluster.broker.kill()
        cluster.broker.wait(10)
        started = time.monotonic()
        with pytest.raises(shoal.BrokerLost):
            for _ in events:
                pass
        assert time.monotonic() - started < 10
        client.close()
