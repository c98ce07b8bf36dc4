"""Named tasks: @shoal.task, shoal worker --import, sending by name, --registered-only."""
from __future__ import annotations

import datetime as dt
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shoal
import named_tasks
from conftest import REPO_DIR, running_cluster, wait_until
from shoal.tasks import RefusedPickle, UnknownTask, safe_loads

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def named():
    """A default worker, and a --registered-only one that serves queue "safe"."""
    with running_cluster(n_workers=1) as cluster:
        yield cluster, cluster.add_workers(1, queues=["safe"], imports=["named_tasks"],
                                           registered_only=True)[0]


@pytest.fixture
def nclient(named):
    client = named[0].client()
    yield client
    client.close()


def test_a_task_has_a_name_runs_locally_when_called_and_submits_itself(nclient):
    assert named_tasks.double.name == "named_tasks.double"
    assert named_tasks.flaky.name == "named.flaky"
    assert named_tasks.double(21) == 42  # called: runs here
    assert named_tasks.double.submit(21).result(timeout=20) == 42
    assert named_tasks.double.delay(1).result(timeout=20) == 2
    assert named_tasks.double.map(range(5)).result(timeout=20) == [0, 2, 4, 6, 8]
    assert shoal.chain(named_tasks.double.s(1), named_tasks.double.s()).submit().result(
        timeout=20) == 4


def test_a_tasks_default_options_apply_to_its_submits(nclient, tmp_path):
    path = str(tmp_path / "tries")
    assert named_tasks.flaky.submit(path).result(timeout=20) == 3  # retries=2 from @task


def test_a_task_sent_by_name_runs_where_the_client_cannot_even_import_it(named, tmp_path):
    cluster, _ = named
    module = tmp_path / "only_on_workers.py"
    module.write_text(textwrap.dedent("""
        import shoal

        @shoal.task
        def secret(x):
            return f"secret {x}"
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO_DIR]))
    worker = subprocess.Popen(
        [sys.executable, "-m", "shoal", "worker", "--connection-file", cluster.connection_file,
         "--import", "only_on_workers", "--queues", "secret", "--name", "secret-worker"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = cluster.client()
    try:
        wait_until(lambda: "secret-worker" in client.worker_names(), 30,
                   message="the worker to join")
        with pytest.raises(ImportError):
            __import__("only_on_workers")
        f = client.submit("only_on_workers.secret", 7, queue="secret")
        assert f.result(timeout=20) == "secret 7"
    finally:
        client.close()
        worker.terminate()
        worker.wait(15)
    assert worker.returncode == 0, worker.stderr.read().decode()


def test_an_unknown_task_name_fails_saying_which_module_to_import(nclient):
    with pytest.raises(UnknownTask, match=r"shoal worker --import no_such_module"):
        nclient.submit("no_such_module.task", 1).result(timeout=20)


def test_a_registered_only_worker_runs_named_tasks_with_plain_data(nclient):
    safe = nclient.submit(named_tasks.describe, {"a": [1, 2.5, "x"], "when": dt.date(2026, 1, 2)},
                          queue="safe")
    assert safe.result(timeout=20)[0] == "dict"
    array = np.arange(10.0)
    assert nclient.submit("named_tasks.describe", array, queue="safe").result(timeout=20)[0] == \
        "ndarray"


def test_a_registered_only_worker_refuses_pickled_code_with_a_clear_error(nclient, named):
    _, safe = named
    with pytest.raises(shoal.BrokerError, match=r"refuses pickled code.*submit a task by name"):
        nclient.submit(os.getpid, queue="safe").result(timeout=20)
    with pytest.raises(shoal.BrokerError, match=rf"worker {safe} runs registered tasks only"):
        nclient.submit_to(safe, os.getpid).result(timeout=20)


def test_a_registered_only_worker_refuses_arguments_that_build_code(nclient):
    class Sneaky:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    with pytest.raises(RefusedPickle, match="refused to build posix.system"):
        nclient.submit("named_tasks.describe", Sneaky(), queue="safe").result(timeout=20)


def test_a_registered_only_worker_refuses_tasks_it_does_not_have(nclient):
    f = nclient.submit("other.module.task", queue="safe")
    wait_until(lambda: nclient.status()["unrunnable"], 10, message="the report")
    assert "task 'other.module.task'" in nclient.status()["unrunnable"][0]["needs"]
    assert f.cancel()


def test_safe_loads_builds_plain_data_and_refuses_everything_else():
    data = {"n": [1, 2.0, 3j], "s": {"x"}, "t": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}
    assert safe_loads(pickle.dumps(data)) == data
    assert (safe_loads(pickle.dumps(np.arange(3))) == np.arange(3)).all()
    for hostile in (os.system, getattr, eval, subprocess.Popen):
        with pytest.raises(RefusedPickle):
            safe_loads(pickle.dumps(hostile))


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "key"
    path.write_text("ab" * 32)
    path.chmod(0o600)
    return str(path)


def test_shoal_worker_registered_only_needs_import(key_file):
    out = subprocess.run([sys.executable, "-m", "shoal", "worker", "tcp://127.0.0.1:1",
                          "--key-file", key_file, "--registered-only"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--import MODULE" in out.stderr


def test_shoal_worker_import_of_a_missing_module_fails_clearly(key_file):
    out = subprocess.run([sys.executable, "-m", "shoal", "worker", "tcp://127.0.0.1:1",
                          "--key-file", key_file, "--import", "no_such_module_here"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no_such_module_here" in out.stderr
