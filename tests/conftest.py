"""Shared fixtures: one real 2-worker cluster for the session, and leak checks.

Workers import functions by reference from the module that defines them (only
``__main__`` code travels by value), so this directory is put on the workers'
``PYTHONPATH``: a function defined at module level in a test file then runs on
a worker as it would in a user's importable package.  The checkout's root goes
there too, so every child process runs the same ``shoal`` as the tests.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import psutil
import pytest

TESTS_DIR = str(Path(__file__).resolve().parent)
REPO_DIR = str(Path(TESTS_DIR).parent)  # child processes run this checkout's shoal
_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO_DIR, TESTS_DIR] + [p for p in _path if p not in (REPO_DIR, TESTS_DIR)])

import shoal  # noqa: E402

SHM_DIR = "/dev/shm"
FORKED_NAMES = ("shoal-worker", "shoal-broker")  # a forked child's process name


# ----------------------------------------------------------------- helpers
def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, message: str = ""):
    """Poll ``predicate`` until it returns a true value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {message or predicate}")
        time.sleep(interval)  # polling with a deadline


def shoal_children() -> list:
    """Descendant processes of this test process running a shoal broker or worker.

    Spawned ones say so in their command line; forked ones in their name.
    """
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            name = proc.name()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if "shoal.worker" in cmd or "shoal.broker" in cmd or name in FORKED_NAMES:
            found.append(proc)
    return found


def pids_gone(pids) -> bool:
    """True once none of ``pids`` is a live (non-zombie) process."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def shm_segments_of(pids) -> list:
    """Shared-memory segments in /dev/shm created by any of ``pids``."""
    if not os.path.isdir(SHM_DIR):
        return []
    prefixes = tuple(f"shoal-{pid}-" for pid in pids)
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefixes))


def cluster_pids(cluster) -> set:
    """The broker and worker pids of a local cluster."""
    pids = {p.pid for p in cluster.workers}
    if cluster.broker is not None:
        pids.add(cluster.broker.pid)
    return pids


_seen_pids: set = {os.getpid()}


# ----------------------------------------------------------------- leak checks
@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes_or_segments():
    """At the end of the session no shoal process we started runs, and no segment remains."""
    yield
    remaining = []

    def settled():
        remaining[:] = shoal_children()
        return not remaining

    deadline = time.monotonic() + 10
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling with a deadline
    for proc in remaining:  # do not leave them behind, but still fail
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    assert not remaining, "shoal processes left behind: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline())}" for p in remaining if p.is_running())
    leftover = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leftover = shm_segments_of(_seen_pids)
        if not leftover:
            break
        time.sleep(0.05)  # polling with a deadline
    assert not leftover, f"shared-memory segments left behind: {leftover}"


@pytest.fixture(autouse=True)
def _remember_child_pids():
    """Record every descendant's pid, so the session check can find its segments."""
    yield
    _seen_pids.update(p.pid for p in psutil.Process().children(recursive=True))


# ----------------------------------------------------------------- clusters
@pytest.fixture(scope="session")
def cluster():
    """One running local cluster with two workers, shared by tests that don't disturb it."""
    with shoal.Cluster(n_workers=2, timeout=30) as c:
        _seen_pids.update(cluster_pids(c))
        yield c


@pytest.fixture(scope="session")
def client(cluster):
    """A client of the shared cluster."""
    c = cluster.client()
    yield c
    c.close()


@contextlib.contextmanager
def running_cluster(**kwargs):
    """A local cluster of its own; every process it started is gone afterwards."""
    kwargs.setdefault("timeout", 30)
    with shoal.Cluster(**kwargs) as c:
        yield c
        _seen_pids.update(cluster_pids(c))
        pids = cluster_pids(c)
    wait_until(lambda: pids_gone(pids), 15, message="the cluster's processes to exit")


@pytest.fixture
def fresh_cluster():
    """A cluster of its own for one test (two workers)."""
    with shoal.Cluster(n_workers=2, timeout=30) as c:
        _seen_pids.update(cluster_pids(c))
        pids = cluster_pids(c)
        yield c
    wait_until(lambda: pids_gone(pids), 10, message="the cluster's processes to exit")


class Gate:
    """A file that tasks wait on: the test opens the gate by creating it.

    Lets a test hold workers busy for exactly as long as it needs, without sleeping.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.started_dir = str(path.parent / f"{path.name}-started")
        os.makedirs(self.started_dir, exist_ok=True)

    def started(self) -> int:
        """How many tasks run by :func:`hold` have started."""
        return len(os.listdir(self.started_dir))

    def open(self) -> None:
        Path(self.path).touch()


@pytest.fixture
def gate(tmp_path):
    g = Gate(tmp_path / "gate")
    yield g
    g.open()  # never leave a task blocked on a gate


def hold(gate_path: str, started_dir: str, limit: float = 60.0) -> int:
    """Task: note that it started (a file named by its pid), then wait for the gate."""
    Path(started_dir, f"{os.getpid()}-{time.monotonic_ns()}").touch()
    return wait_for_gate(gate_path, limit)


def wait_for_gate(path: str, limit: float = 60.0) -> int:
    """Task: block until ``path`` exists (at most ``limit`` seconds); return which pid ran it."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.005)
    return os.getpid()


def drain(client, timeout: float = 30.0) -> None:
    """Wait until the broker has nothing queued or running."""
    def idle():
        s = client.status()
        return s["queued"] == 0 and s["running"] == 0
    wait_until(idle, timeout, 0.02, "the cluster to become idle")


@pytest.fixture
def idle_client(client):
    """The shared client, made the current one (shoal.get_client()), with the cluster idle
    before and after the test."""
    # Other tests create and close clients of their own; make this one current again.
    from shoal.client import _set_current
    _set_current(client)
    drain(client)
    yield client
    drain(client)
