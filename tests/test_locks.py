"""Broker-held locks (from clients and from inside tasks) and unique task keys."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import shoal
from conftest import TESTS_DIR, Gate, hold, wait_until
from shoal.locks import LockTimeout

pytestmark = pytest.mark.timeout(60)


def locked_section(name: str, path: str, tag: str, seconds: float) -> str:
    """Inside a task: hold lock ``name`` for ``seconds``, noting entry and exit."""
    with shoal.lock(name, timeout=30):
        with open(path, "a") as fh:
            fh.write(f"in {tag} {time.time()}\n")
        time.sleep(seconds)
        with open(path, "a") as fh:
            fh.write(f"out {tag} {time.time()}\n")
    return tag


def take_and_keep(name: str, gate_path: str, started_dir: str) -> str:
    """Inside a task: take a lock, then wait on a gate without releasing it."""
    held = shoal.lock(name, timeout=10)
    held.acquire()
    return hold(gate_path, started_dir)


def sections(path: str) -> list:
    with open(path) as fh:
        return [line.split() for line in fh]


def test_a_lock_is_held_by_one_client_at_a_time(idle_client, cluster):
    other = cluster.client()
    try:
        lock = idle_client.lock("report", timeout=5)
        with lock:
            assert lock.locked()
            theirs = other.lock("report", timeout=0.3)
            started = time.monotonic()
            with pytest.raises(LockTimeout, match=r"lock 'report' was not acquired within "
                                                  r"0.3 s; it is held by client"):
                with theirs:
                    pass
            assert time.monotonic() - started >= 0.3
            assert not theirs.acquire(blocking=False)
        assert not lock.locked()
        with other.lock("report", timeout=5):
            pass
    finally:
        other.close()


def test_a_waiter_gets_the_lock_when_the_holder_releases_it(idle_client, cluster):
    other = cluster.client()
    try:
        first = idle_client.lock("handover")
        first.acquire()
        got = []
        waiter = threading.Thread(target=lambda: got.append(other.lock("handover",
                                                                       timeout=10).acquire()))
        waiter.start()
        wait_until(lambda: idle_client.status()["locks"][0]["waiting"] == 1, 10,
                   message="the second client to wait")
        first.release()
        waiter.join(10)
        assert got == [True]
        assert idle_client.status()["locks"][0]["holder"].startswith("client ")
    finally:
        other.close()  # its lock goes with it
    wait_until(lambda: not idle_client.status()["locks"], 10, message="the lock to go")


def test_tasks_take_a_lock_from_inside_one_at_a_time(idle_client, tmp_path):
    path = str(tmp_path / "sections")
    futures = [idle_client.submit(locked_section, "shared-file", path, tag, 0.2)
               for tag in ("a", "b", "c")]
    assert sorted(idle_client.gather(futures, timeout=30)) == ["a", "b", "c"]
    events = sections(path)
    # Entry and exit alternate: no two tasks were inside at once.
    assert [e[0] for e in events] == ["in", "out"] * 3
    assert [e[1] for e in events[::2]] == [e[1] for e in events[1::2]]


def test_a_client_and_a_task_share_one_lock(idle_client, tmp_path):
    path = str(tmp_path / "sections")
    with idle_client.lock("mixed", timeout=5):
        f = idle_client.submit(locked_section, "mixed", path, "task", 0.0)
        wait_until(lambda: idle_client.status()["locks"][0]["waiting"] == 1, 20,
                   message="the task to wait for the lock")
        assert not os.path.exists(path)
    assert f.result(timeout=20) == "task"


def test_a_task_that_ends_holding_a_lock_gives_it_back(idle_client, tmp_path):
    gate = Gate(tmp_path / "gate")
    f = idle_client.submit(take_and_keep, "forgotten", gate.path, gate.started_dir)
    wait_until(lambda: gate.started() == 1, 20, message="the task to take the lock")
    assert not idle_client.lock("forgotten").acquire(blocking=False)
    gate.open()
    f.result(timeout=20)
    with idle_client.lock("forgotten", timeout=5):
        pass


HOLDER = textwrap.dedent("""
    import sys, time
    import shoal
    client = shoal.Client(sys.argv[1])
    client.lock("killed-holder").acquire()
    print("HELD", flush=True)
    time.sleep(600)
""")


def test_a_lock_holder_killed_with_sigkill_loses_the_lock_within_a_few_heartbeats(
        idle_client, cluster):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.connection_file],
                              stdout=subprocess.PIPE, cwd=TESTS_DIR)
    try:
        assert holder.stdout.readline().strip() == b"HELD"
        assert not idle_client.lock("killed-holder").acquire(blocking=False)
        killed = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with idle_client.lock("killed-holder", timeout=20):
            waited = time.monotonic() - killed
        assert waited < 8.0, waited  # HOLDER_TIMEOUT (5 s) plus a tick or two
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdout.close()


def test_releasing_a_lock_not_held_is_an_error(idle_client):
    lock = idle_client.lock("never-taken")
    with pytest.raises(RuntimeError, match="is not held"):
        lock.release()


@pytest.mark.parametrize("name", ["", 3, "x" * 201])
def test_a_bad_lock_name_is_refused(idle_client, name):
    with pytest.raises(ValueError, match="a lock name is a non-empty string"):
        idle_client.lock(name)


# ----------------------------------------------------------------- unique tasks
def test_a_second_task_with_the_same_unique_key_is_refused_naming_the_first(idle_client, tmp_path):
    gate = Gate(tmp_path / "gate")
    try:
        first = idle_client.submit(hold, gate.path, gate.started_dir, unique="nightly")
        second = idle_client.submit(hold, gate.path, gate.started_dir, unique="nightly")
        with pytest.raises(shoal.TaskNotUnique) as info:
            second.result(timeout=10)
        assert info.value.key == "nightly" and info.value.holder == first.task_id
        assert f"task {first.task_id}" in str(info.value)
    finally:
        gate.open()
    first.result(timeout=20)
    # Once the first has finished, the key is free again.
    assert idle_client.submit(os.getpid, unique="nightly").result(timeout=20)
