"""What a task can be, what it prints, and how its failures come back."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import shoal
from shoal.futures import RemoteTraceback

from conftest import wait_for_gate, wait_until

pytestmark = pytest.mark.timeout(60)


# Module-level: pickled by reference; workers import this module (tests/ is on their path).
def square(x):
    return x * x


def fails_on_purpose(x):
    raise ValueError(f"bad value {x}")  # <- the failing line


class CustomError(Exception):
    """An exception class of the user's own."""


class UnpicklableError(Exception):
    """Holds a lock, so it cannot be pickled to travel back."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgumentError(Exception):
    """Pickles, but cannot be unpickled: Exception.__reduce__ passes only ``args``."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


class CountsUnpickling:
    """A callable that appends a line to a file each time a process unpickles it."""

    def __init__(self, path):
        self.path = path

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(self.path, "a") as fh:
            fh.write(f"{os.getpid()}\n")

    def __call__(self, x):
        return x + 1


# ----------------------------------------------------------------- kinds of callables
def test_builtin_function_runs_on_a_worker(client):
    assert client.submit(pow, 2, 10).result(timeout=30) == 1024


def test_module_level_function_runs_on_a_worker(client):
    assert client.submit(square, 12).result(timeout=30) == 144


def test_lambda_runs_on_a_worker(client):
    assert client.submit(lambda a, b: a - b, 10, 3).result(timeout=30) == 7


def test_closure_over_local_variables_runs_on_a_worker(client):
    offset, scale = 5, [2, 3]

    def affine(x):
        return x * sum(scale) + offset

    assert client.submit(affine, 4).result(timeout=30) == 25


def test_locally_defined_class_instance_travels_both_ways(client):
    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def moved(self, dx):
            return Point(self.x + dx, self.y)

    out = client.submit(lambda p: p.moved(10), Point(1, 2)).result(timeout=30)
    assert (out.x, out.y) == (11, 2)


def test_keyword_arguments_reach_the_function(client):
    def describe(a, b=0, *, sep="-", **extra):
        return f"{a}{sep}{b}{sep}{sorted(extra.items())}"

    fut = client.submit(describe, 1, b=2, sep="+", colour="red")
    assert fut.result(timeout=30) == "1+2+[('colour', 'red')]"


def test_task_runs_in_another_process(client):
    assert client.submit(os.getpid).result(timeout=30) != os.getpid()


def test_future_names_the_worker_that_ran_it(client):
    fut = client.submit(square, 3)
    fut.result(timeout=30)
    assert fut.worker in {w["name"] for w in client.status()["worker_list"]}


def test_main_module_function_is_shipped_by_value(cluster, tmp_path):
    script = tmp_path / "notebook_like.py"
    script.write_text(textwrap.dedent("""
        import sys
        import shoal

        def triple(x):          # lives in __main__: workers cannot import it
            return 3 * x

        with shoal.Client(sys.argv[1], timeout=10) as client:
            print(client.submit(triple, 14).result(timeout=30))
            print(client.map(triple, range(4)).result(timeout=30))
    """))
    done = subprocess.run([sys.executable, str(script), cluster.connection_file],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["42", "[0, 3, 6, 9]"]


def test_function_from_a_module_workers_cannot_import_fails_naming_the_module(
        client, tmp_path, monkeypatch):
    name = f"only_on_the_client_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    try:
        fut = client.submit(module.double, 4)
        with pytest.raises(ModuleNotFoundError, match=name):
            fut.result(timeout=30)
    finally:
        sys.modules.pop(name, None)


# ----------------------------------------------------------------- output
def test_stdout_and_stderr_are_captured_into_the_future(client):
    def chatty(x):
        print("hello from", x)
        print("a warning", file=sys.stderr)
        return x

    fut = client.submit(chatty, 7)
    assert fut.result(timeout=30) == 7
    assert fut.stdout == "hello from 7\n"
    assert fut.stderr == "a warning\n"


def test_output_of_one_task_does_not_leak_into_the_next(client):
    loud = client.submit(print, "only mine")
    loud.result(timeout=30)
    quiet = [client.submit(square, i) for i in range(6)]
    client.gather(quiet, timeout=30)
    assert loud.stdout == "only mine\n"
    assert all(f.stdout == "" and f.stderr == "" for f in quiet)


def test_output_of_a_failing_task_is_kept(client):
    def noisy_failure():
        print("got this far")
        raise RuntimeError("then failed")

    fut = client.submit(noisy_failure)
    with pytest.raises(RuntimeError):
        fut.result(timeout=30)
    assert fut.stdout == "got this far\n"


# ----------------------------------------------------------------- exceptions
def test_exception_is_reraised_as_its_own_type_with_the_remote_traceback(client):
    fut = client.submit(fails_on_purpose, 3)
    with pytest.raises(ValueError, match="bad value 3") as info:
        fut.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)
    assert "fails_on_purpose" in text
    assert 'raise ValueError(f"bad value {x}")  # <- the failing line' in text
    assert "shoal/worker.py" not in text.split("fails_on_purpose")[0]


def test_a_closure_that_fails_shows_its_file_and_failing_line(client):
    def fails_inside_a_closure(x):
        raise KeyError(f"missing {x}")  # <- the closure's failing line

    with pytest.raises(KeyError) as info:
        client.submit(fails_inside_a_closure, 5).result(timeout=30)
    text = str(info.value.__cause__)
    assert f'File "{__file__}"' in text  # not cloudpickle's "<dynamic-code>"
    assert "raise KeyError(f\"missing {x}\")  # <- the closure's failing line" in text


def test_a_function_from_a_notebook_cell_shows_the_cell_line_the_worker_never_saw(client):
    # IPython keeps each cell's text in linecache under a name no worker can read;
    # the client fills the line in from there.
    import linecache
    cell = "<shoal-test-cell-1>"
    source = "def cell_function(x):\n    return 1 / x  # the cell's failing line\n"
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, cell, "exec"), namespace)
    try:
        with pytest.raises(ZeroDivisionError) as info:
            client.submit(namespace["cell_function"], 0).result(timeout=30)
    finally:
        linecache.cache.pop(cell, None)
    text = str(info.value.__cause__)
    assert f'File "{cell}", line 2, in cell_function' in text
    assert "    return 1 / x  # the cell's failing line" in text


def test_exception_method_returns_the_same_exception(client):
    fut = client.submit(fails_on_purpose, 1)
    exc = fut.exception(timeout=30)
    assert type(exc) is ValueError
    assert isinstance(exc.__cause__, RemoteTraceback)


def test_user_defined_exception_class_is_reraised_as_itself(client):
    def raises_custom():
        raise CustomError("mine")

    with pytest.raises(CustomError, match="mine"):
        client.submit(raises_custom).result(timeout=30)


def test_locally_defined_exception_class_is_reraised_as_itself(client):
    class LocalError(KeyError):
        pass

    def raises_local():
        raise LocalError("here")

    with pytest.raises(LocalError):
        client.submit(raises_local).result(timeout=30)


def test_remote_error_survives_pickling():
    import pickle
    err = pickle.loads(pickle.dumps(shoal.RemoteError("SomeType", "some message")))
    assert err.type_name == "SomeType"
    assert str(err) == "SomeType: some message"


def test_unpicklable_exception_arrives_as_remote_error_naming_its_type(client):
    def raises_unpicklable():
        raise UnpicklableError("holds a lock")

    with pytest.raises(shoal.RemoteError) as info:
        client.submit(raises_unpicklable).result(timeout=30)
    assert info.value.type_name == "UnpicklableError"
    assert "UnpicklableError" in str(info.value) and "holds a lock" in str(info.value)
    assert "raise UnpicklableError" in str(info.value.__cause__)


def test_exception_that_cannot_be_unpickled_arrives_as_remote_error_naming_its_type(client):
    def raises_two_args():
        raise TwoArgumentError("left", "right")

    with pytest.raises(shoal.RemoteError) as info:
        client.submit(raises_two_args).result(timeout=30)
    assert info.value.type_name == "TwoArgumentError"
    assert "left/right" in str(info.value)


def test_unpicklable_result_fails_with_serialization_error_naming_function_and_type(client):
    def returns_a_lock():
        return threading.Lock()

    with pytest.raises(shoal.SerializationError, match="returns_a_lock") as info:
        client.submit(returns_a_lock).result(timeout=30)
    assert "lock" in str(info.value).lower()


def test_task_calling_sys_exit_fails_and_the_worker_keeps_serving(client):
    with pytest.raises(SystemExit):
        client.submit(sys.exit, 3).result(timeout=30)
    assert client.gather([client.submit(square, i) for i in range(4)], timeout=30) == [0, 1, 4, 9]
    assert client.status()["workers"] == 2


# ----------------------------------------------------------------- function shipping
def unpickle_count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def test_map_function_is_unpickled_at_most_once_per_worker(client, tmp_path):
    log = tmp_path / "unpickled"
    fn = CountsUnpickling(str(log))
    assert client.map(fn, range(40), batch_size=2).result(timeout=30) == list(range(1, 41))
    assert 1 <= unpickle_count(log) <= client.status()["workers"]


def test_repeated_submit_of_one_function_is_unpickled_at_most_once_per_worker(client, tmp_path):
    log = tmp_path / "unpickled"
    fn = CountsUnpickling(str(log))
    assert client.gather([client.submit(fn, i) for i in range(20)], timeout=30) == \
        list(range(1, 21))
    assert 1 <= unpickle_count(log) <= client.status()["workers"]


# ----------------------------------------------------------------- lost workers
@pytest.mark.timeout(60)
def test_task_of_a_killed_worker_is_rerun_elsewhere_or_fails(fresh_cluster, tmp_path, gate):
    client = fresh_cluster.client()
    started = tmp_path / "started"

    def note_pid_then_wait(gate_path, started_path):
        with open(started_path, "w") as fh:
            fh.write(str(os.getpid()))
        return wait_for_gate(gate_path)

    fut = client.submit(note_pid_then_wait, gate.path, str(started))
    wait_until(lambda: started.exists() and started.read_text(), 20, message="the task to start")
    victim = int(started.read_text())
    os.kill(victim, signal.SIGKILL)
    gate.open()
    done, _ = concurrent.futures.wait([fut], timeout=15)
    assert done, "the task of the killed worker never finished nor failed"
    if fut.exception() is None:
        assert fut.result() != victim
    else:  # failing with an error that names the lost worker is acceptable too
        assert isinstance(fut.exception(), shoal.ShoalError)
        assert "worker" in str(fut.exception())
