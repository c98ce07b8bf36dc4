"""The local cluster: ready on return, scales, accepts outside workers, leaves nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import shoal

from conftest import cluster_pids, pids_gone, wait_until

pytestmark = pytest.mark.timeout(60)


def worker_names(cluster) -> set:
    return {w["name"] for w in cluster.status()["worker_list"]}


def test_cluster_is_ready_on_return():
    with shoal.Cluster(n_workers=2) as cluster:
        state = cluster.status()  # no waiting: the workers are already registered
        assert state["workers"] == 2 and state["slots"] == 2
        assert len(cluster.workers) == 2
        assert cluster.client().submit(pow, 2, 3).result(timeout=30) == 8


def test_a_cluster_starts_without_a_client_of_its_own():
    # It learns that its workers joined from the broker's stdout, so the first
    # client to connect is the user's (the cluster makes its own when it needs one).
    with shoal.Cluster(n_workers=2) as cluster:
        client = cluster.client()
        assert client.status()["clients"] == 1
        assert cluster.status()["workers"] == 2
        assert client.status()["clients"] == 2


EXITS_WHILE_STARTING = textwrap.dedent("""
    import sys
    import shoal

    try:
        shoal.Cluster(n_workers=2, imports=["no_such_module_for_shoal"],
                      start_method=sys.argv[1], timeout=20)
    except shoal.ClusterError as exc:
        print(exc)
""")


def test_each_client_call_gives_a_client_of_its_own():
    # (The first was connected while the workers started.)
    with shoal.Cluster(n_workers=1) as cluster:
        first, second = cluster.client(), cluster.client()
        assert first is not second
        assert first.submit(pow, 2, 5).result(timeout=30) == 32
        first.close()
        assert second.submit(pow, 2, 6).result(timeout=30) == 64
        assert cluster.status()["workers"] == 1
    with shoal.Cluster(n_workers=1) as cluster:
        assert cluster.status()["workers"] == 1  # the cluster's own client first
        client = cluster.client()
        client.close()
        assert cluster.status()["workers"] == 1  # closing the user's left the cluster's


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_worker_that_exits_while_starting_fails_the_cluster_and_says_where_to_look(
        tmp_path, start_method):
    # (In a script: this test process has threads, and so never forks a cluster.)
    script = tmp_path / "start.py"
    script.write_text(EXITS_WHILE_STARTING)
    done = subprocess.run([sys.executable, str(script), start_method], capture_output=True,
                          text=True, timeout=40, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("a local worker exited with code 2 while starting; "
                                  "see the logs in "), done.stdout
    log_dir = done.stdout.split("see the logs in ", 1)[1].strip()
    assert "no_such_module_for_shoal" in "".join(
        p.read_text() for p in Path(log_dir).glob("local-*.log"))


def test_a_broker_announces_only_as_many_joins_as_it_was_asked_to(tmp_path):
    path = tmp_path / "broker.json"
    broker = subprocess.Popen(
        [sys.executable, "-m", "shoal.broker", "--connection-file", str(path),
         "--announce-workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL)
    workers = []
    try:
        assert broker.stdout.readline().startswith(b"SHOAL-BROKER ")
        workers = [subprocess.Popen(
            [sys.executable, "-m", "shoal.worker", "--connection-file", str(path),
             "--name", f"w{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL) for i in range(2)]
        line = broker.stdout.readline().decode()
        assert line in ("SHOAL-WORKER w0\n", "SHOAL-WORKER w1\n")
        with shoal.Client(str(path)) as client:
            client.wait_for_workers(2, timeout=30)
        broker.terminate()
        assert broker.wait(10) == 0
        assert broker.stdout.read() == b""  # the second join was not announced
    finally:
        for proc in [*workers, broker]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_cluster_with_several_slots_per_worker_reports_them():
    with shoal.Cluster(n_workers=1, slots=3) as cluster:
        state = cluster.status()
        assert state["workers"] == 1 and state["slots"] == 3
        client = cluster.client()
        assert client.gather([client.submit(pow, i, 2) for i in range(9)], timeout=30) == \
            [i * i for i in range(9)]


def test_cluster_address_and_connection_file_describe_the_broker(cluster):
    assert cluster.address.startswith("tcp://127.0.0.1:")
    with open(cluster.connection_file) as fh:
        assert json.load(fh)["address"] == cluster.address
    assert repr(cluster).startswith("<shoal.Cluster tcp://127.0.0.1:")


def test_context_manager_stops_every_process_on_exit():
    with shoal.Cluster(n_workers=2) as cluster:
        pids = cluster_pids(cluster)
        assert len(pids) == 3 and not pids_gone(pids)
    assert pids_gone(pids)
    assert cluster.workers == []


def test_exception_inside_with_still_stops_every_process():
    with pytest.raises(ZeroDivisionError):
        with shoal.Cluster(n_workers=2) as cluster:
            pids = cluster_pids(cluster)
            1 / 0
    assert pids_gone(pids)


def test_close_twice_is_fine_and_a_closed_cluster_refuses_clients():
    cluster = shoal.Cluster(n_workers=1)
    client = cluster.client()
    pids = cluster_pids(cluster)
    cluster.close()
    cluster.close()
    assert pids_gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        cluster.client()
    with pytest.raises(shoal.ClientClosed):
        client.submit(pow, 1, 1)


def test_scale_up_then_down_changes_the_registered_workers(fresh_cluster):
    fresh_cluster.scale(3)
    assert fresh_cluster.status()["workers"] == 3
    assert len(fresh_cluster.workers) == 3
    before = {p.pid for p in fresh_cluster.workers}
    fresh_cluster.scale(1)
    assert fresh_cluster.status()["workers"] == 1
    (remaining,) = fresh_cluster.workers
    wait_until(lambda: pids_gone(before - {remaining.pid}), 10,
               message="the surplus workers to exit")
    client = fresh_cluster.client()
    pids = {client.submit(os.getpid).result(timeout=30) for _ in range(4)}
    assert pids == {remaining.pid}


def test_scale_to_zero_and_back(fresh_cluster):
    fresh_cluster.scale(0)
    assert fresh_cluster.status()["workers"] == 0
    fresh_cluster.scale(1)
    assert fresh_cluster.client().submit(pow, 3, 2).result(timeout=30) == 9


def test_scale_rejects_a_negative_count(cluster):
    with pytest.raises(ValueError):
        cluster.scale(-1)
    with pytest.raises(ValueError):
        shoal.Cluster(n_workers=-1)


def test_task_queued_before_scale_up_runs_on_the_new_worker(tmp_path):
    with shoal.Cluster(n_workers=0) as cluster:
        client = cluster.client()
        fut = client.submit(os.getpid)
        cluster.scale(1)
        assert fut.result(timeout=30) == cluster.workers[0].pid


def test_worker_joining_with_a_connection_file_runs_tasks(tmp_path):
    with shoal.Cluster(n_workers=0) as cluster:
        log = open(tmp_path / "remote.log", "wb")
        remote = subprocess.Popen(
            [sys.executable, "-m", "shoal.worker", "--connection-file", cluster.connection_file,
             "--name", "remote-1"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        try:
            client = cluster.client()
            client.wait_for_workers(1, timeout=30)
            assert worker_names(cluster) == {"remote-1"}
            fut = client.submit(os.getpid)
            assert fut.result(timeout=30) == remote.pid
            assert fut.worker == "remote-1"
            remote.terminate()
            assert remote.wait(10) == 0
            wait_until(lambda: cluster.status()["workers"] == 0, 10,
                       message="the broker to see the worker leave")
        finally:
            if remote.poll() is None:
                remote.kill()
                remote.wait()
            log.close()


def test_worker_joining_with_address_and_key_file_runs_tasks(tmp_path):
    with shoal.Cluster(n_workers=0) as cluster:
        remote = subprocess.Popen(
            [sys.executable, "-m", "shoal.worker", cluster.address,
             "--key-file", cluster.connection_file, "--name", "by-address"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            client = cluster.client()
            client.wait_for_workers(1, timeout=30)
            assert client.submit(os.getpid).result(timeout=30) == remote.pid
        finally:
            remote.terminate()
            remote.wait(10)


KILLED_PARENT = textwrap.dedent("""
    import sys
    import shoal

    cluster = shoal.Cluster(n_workers=2, start_method=sys.argv[1])
    assert cluster.start_method == sys.argv[1]
    assert cluster.client().submit(pow, 2, 2).result(timeout=30) == 4
    print(cluster.broker.pid, *[p.pid for p in cluster.workers], flush=True)
    sys.stdin.read()  # until the test kills this process
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_children_exit_when_the_parent_is_killed(tmp_path, start_method):
    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), start_method], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: set = set()
    try:
        line = parent.stdout.readline()
        assert line, f"the script failed: {parent.stderr.read()}"
        pids.update(int(p) for p in line.split())
        assert len(pids) == 3 and not pids_gone(pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: pids_gone(pids), 15, message="the orphaned broker and workers to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdin.close()
        parent.stdout.close()
        parent.stderr.close()
        for pid in pids:  # never leave orphans behind, even when the test fails
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def test_children_exit_when_the_parent_exits_without_closing(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import shoal
        cluster = shoal.Cluster(n_workers=1)
        print(cluster.broker.pid, *[p.pid for p in cluster.workers], flush=True)
        # no close(): the interpreter exits here
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    pids = {int(p) for p in done.stdout.split()}
    assert len(pids) == 2
    wait_until(lambda: pids_gone(pids), 15, message="the broker and worker to exit")


# ----------------------------------------------------------------- how children start
FORKING_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import psutil
    import shoal
    from shoal import launch

    def run_in_worker():
        print("hello from", os.getpid())
        return os.getpid(), sys.argv

    report = {}
    cluster = shoal.Cluster(n_workers=2)
    client = cluster.client()
    pids = {p.pid for p in cluster.workers}
    future = client.submit(run_in_worker)
    pid, argv = future.result(timeout=30)
    report["first"] = {
        "start_method": cluster.start_method,
        "names": sorted(psutil.Process(p.pid).name() for p in cluster.workers + [cluster.broker]),
        "ran_on_a_worker": pid in pids, "worker_argv_is_ours": argv == sys.argv,
        "output": future.stdout,
        "log_says_registered": all(
            "registered with the broker" in open(cluster.log_dir / f"local-{i}.log").read()
            for i in (1, 2)),
    }
    # A replacement starts from the monitor thread, so it is spawned, and serves.
    victim = cluster.workers[0]
    victim.kill()
    victim.wait(10)
    deadline = time.monotonic() + 30
    while len(cluster.workers) < 2 or cluster.status()["workers"] < 2:
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.01)  # polling with a deadline
    report["replacement"] = type(cluster.workers[-1]).__name__
    report["after_replacement"] = client.map(abs, range(-50, 0)).result(timeout=30)[:3]
    cluster.close()
    report["threads_after_close"] = launch.thread_count()
    with shoal.Cluster(n_workers=1) as again:
        report["second"] = again.start_method
        report["second_result"] = again.client().submit(pow, 3, 3).result(timeout=30)
    print(json.dumps(report))
""")


def test_a_script_forks_its_cluster_and_later_workers_are_spawned(tmp_path):
    script = tmp_path / "forking.py"
    script.write_text(FORKING_SCRIPT)
    done = subprocess.run([sys.executable, str(script), "an-argument"], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    first = report["first"]
    assert first["start_method"] == "fork"
    assert first["names"] == ["shoal-broker", "shoal-worker", "shoal-worker"]
    assert first["ran_on_a_worker"] and first["worker_argv_is_ours"]
    assert first["log_says_registered"]  # the child's logging went to its own log file
    assert first["output"].startswith("hello from")  # the task's output came back
    assert report["replacement"] == "Popen"
    assert report["after_replacement"] == [50, 49, 48]
    assert report["threads_after_close"] == 1  # closed clients leave no libzmq threads
    assert report["second"] == "fork" and report["second_result"] == 27


def test_a_process_with_threads_spawns_its_cluster():
    import threading
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        with shoal.Cluster(n_workers=1) as cluster:
            assert cluster.start_method == "spawn"
            assert cluster.client().submit(pow, 2, 5).result(timeout=30) == 32
    finally:
        stop.set()
        thread.join(5)


def test_a_bad_start_method_is_refused_before_anything_starts():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="start_method must be one of auto, fork, spawn, "
                                         "not 'forkserver'"):
        shoal.Cluster(n_workers=1, start_method="forkserver")
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_forcing_fork_in_a_process_with_threads_warns():
    import threading
    from shoal import launch
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        with pytest.warns(RuntimeWarning, match="start_method='fork' in a process with"):
            assert launch.choose("fork") == "fork"
        assert launch.choose("auto") == "spawn"
    finally:
        stop.set()
        thread.join(5)
