"""``shoal worker --pool process|thread --slots N``: how a worker runs its slots."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import Gate, REPO_DIR, TESTS_DIR, hold, pids_gone, running_cluster, wait_until

pytestmark = pytest.mark.timeout(90)


def start_worker(cluster, *options: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_DIR, TESTS_DIR]))
    return subprocess.Popen([sys.executable, "-m", "shoal", "worker", "--connection-file",
                             cluster.connection_file, *options], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(15)
    finally:
        proc.stderr.close()


@pytest.fixture
def empty_cluster():
    with running_cluster(n_workers=0) as cluster:
        yield cluster


def pids_of(client, prefix: str) -> dict:
    return {w["name"]: w["pid"] for w in client.status()["worker_list"]
            if w["name"].startswith(prefix)}


def test_a_process_pool_runs_each_slot_in_its_own_process_at_once(empty_cluster, tmp_path):
    client = empty_cluster.client()
    pool = start_worker(empty_cluster, "--pool", "process", "--slots", "3", "--name", "pp")
    try:
        client.wait_for_workers(3, timeout=30)
        assert sorted(pids_of(client, "pp")) == ["pp-1", "pp-2", "pp-3"]
        gate = Gate(tmp_path / "gate")
        futures = [client.submit(hold, gate.path, gate.started_dir) for _ in range(3)]
        wait_until(lambda: gate.started() == 3, 30, message="three tasks at once")
        gate.open()
        ran_in = set(client.gather(futures, timeout=30))
        assert ran_in == set(pids_of(client, "pp").values())
        assert all(psutil.Process(pid).ppid() == pool.pid for pid in ran_in)
    finally:
        assert stop(pool) == 0
        client.close()
    wait_until(lambda: pids_gone(ran_in), 15, message="the pool's processes to exit")


def test_a_process_pool_starts_a_slot_again_when_its_process_dies(empty_cluster):
    client = empty_cluster.client()
    pool = start_worker(empty_cluster, "--pool", "process", "--slots", "2", "--name", "pp")
    try:
        client.wait_for_workers(2, timeout=30)
        before = pids_of(client, "pp")
        os.kill(before["pp-2"], signal.SIGKILL)
        wait_until(lambda: pids_of(client, "pp").get("pp-2") not in (None, before["pp-2"]),
                   30, message="pp-2 to be started again")
        assert pids_of(client, "pp")["pp-1"] == before["pp-1"]
        assert client.submit(os.getpid).result(timeout=20) in pids_of(client, "pp").values()
    finally:
        assert stop(pool) == 0
        client.close()


def test_a_thread_pool_runs_slots_as_threads_of_one_process(empty_cluster, tmp_path):
    client = empty_cluster.client()
    worker = start_worker(empty_cluster, "--pool", "thread", "--slots", "2", "--name", "tp")
    try:
        client.wait_for_workers(1, timeout=30)
        gate = Gate(tmp_path / "gate")
        futures = [client.submit(hold, gate.path, gate.started_dir) for _ in range(2)]
        wait_until(lambda: gate.started() == 2, 30, message="two tasks at once")
        gate.open()
        assert set(client.gather(futures, timeout=30)) == {worker.pid}
    finally:
        assert stop(worker) == 0
        client.close()


def test_a_process_pool_with_a_bad_option_stops_and_says_so(empty_cluster):
    pool = start_worker(empty_cluster, "--pool", "process", "--slots", "2",
                        "--resources", "gpu")
    try:
        assert pool.wait(30) == 2
        assert b"--resources" in pool.stderr.read()
    finally:
        pool.stderr.close()
