"""Fault injection with real processes: workers die, brokers restart, clients are killed.

Every test here breaks something for real (SIGKILL, SIGSTOP, ``os._exit``, a
segfault, a restarted broker, a killed client process, a skewed wall clock,
Ctrl-C) and then checks what the user got back.  Each one counts the tasks it
submitted, those that completed, those lost and the duplicates the broker
reported, asserts that nothing was lost, and adds its figures to the table
printed at the end of the module (also written as JSON to
``$SHOAL_FAULT_FIGURES`` when that is set).

Nothing here sleeps to synchronise: tests poll with deadlines
(:func:`conftest.wait_until`) and hold tasks on gate files.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import conftest
import shoal
from conftest import TESTS_DIR, Gate, cluster_pids, hold, pids_gone, wait_until
from shoal.errors import (BrokerLost, ResultTooLarge, SerializationError, TaskTimeout,
                          WorkerLost)

pytestmark = pytest.mark.timeout(90)

N_TASKS = 10_000
#: Each of the 10,000 tasks takes about this long, so that a map of them lasts
#: long enough on two workers for kills to land in the middle of it.
TASK_SECONDS = 0.0004

#: Figures of each fault test: name -> submitted, completed, lost, duplicated.
FIGURES: dict = {}


# ----------------------------------------------------------------- tasks
# Module level, so workers import them by reference (tests/ is on their path).
def record(run_dir: str, i: int) -> int:
    """Task: leave a file saying that item ``i`` ran in this process; return ``i * i``."""
    time.sleep(TASK_SECONDS)
    fd = os.open(os.path.join(run_dir, f"{i}.{os.getpid()}.{time.monotonic_ns()}"),
                 os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    return i * i


def record_slowly(run_dir: str, seconds: float, i: int) -> int:
    """Task: like :func:`record`, taking ``seconds``."""
    threading.Event().wait(seconds)  # not time.sleep: see test_worker_with_a_clock_*
    return record(run_dir, i)


def executions(run_dir) -> dict:
    """How many times each item ran: ``{item: count}``, from :func:`record`'s files."""
    counts: dict = {}
    for name in os.listdir(run_dir):
        i = int(name.split(".", 1)[0])
        counts[i] = counts.get(i, 0) + 1
    return counts


def square(i: int) -> int:
    return i * i


def exit_abruptly() -> None:
    """Task: end the worker process at once, as a crash in C code or the OOM killer would."""
    os._exit(1)


def segfault() -> None:
    """Task: crash the worker process with SIGSEGV."""
    ctypes.string_at(0)


def square_unless_poison(i: int) -> int:
    """Task: ``i * i``, but item 7 exits its process and item 19 segfaults."""
    if i == 7:
        exit_abruptly()
    if i == 19:
        segfault()
    return i * i


def make_lock():
    """Task: return something that cannot be pickled."""
    return threading.Lock()


def lock_at(i: int):
    """Task: ``i * i``, but an unpicklable lock for item 5."""
    return threading.Lock() if i == 5 else i * i


def blob(n: int) -> bytes:
    return b"x" * n


def fail_first(run_dir: str, times: int, i: int = 0) -> int:
    """Task: raise the first ``times`` times it runs for item ``i``, then return ``i``."""
    path = os.path.join(run_dir, f"attempts-{i}")
    with open(path, "a") as fh:
        fh.write("x")
    if os.path.getsize(path) <= times:
        raise ValueError(f"attempt {os.path.getsize(path)} of item {i} fails")
    return i


def wait_seconds(seconds: float) -> int:
    """Task: wait ``seconds`` (a wait a signal interrupts); return the worker's pid."""
    threading.Event().wait(seconds)
    return os.getpid()


def note_in(run_dir: str, name: str, text: str) -> None:
    """Write a file whole or not at all (renamed into place): a test polling for it
    must never read it half written."""
    Path(run_dir, name + ".part").write_text(text)
    os.replace(Path(run_dir, name + ".part"), Path(run_dir, name))


def stop_noted(run_dir: str, seconds: float = 60.0) -> int:
    """Task: note its start, wait, and note when it was stopped (time.monotonic())."""
    note_in(run_dir, "started", str(os.getpid()))
    try:
        threading.Event().wait(seconds)
    finally:
        note_in(run_dir, "stopped", repr(time.monotonic()))
    return os.getpid()


def hold_item(gate_path: str, started_dir: str, i: int) -> int:
    return hold(gate_path, started_dir)


def pid_then_hold(gate_path: str, started_dir: str) -> int:
    """Task: note its pid (a file named by it), wait for the gate, return the pid."""
    Path(started_dir, str(os.getpid())).touch()
    conftest.wait_for_gate(gate_path)
    return os.getpid()


def wall_clock() -> float:
    return time.time()


# ----------------------------------------------------------------- helpers
def tally(name: str, submitted: int, completed: int, lost: int, duplicated: int,
          **notes) -> None:
    """Record a test's figures (reported at the end of the module) and assert nothing was lost.

    ``completed`` counts tasks that ended as the test expects (a value, or the
    error it should raise); ``notes`` adds facts such as workers lost or reruns.
    """
    FIGURES[name] = {"submitted": submitted, "completed": completed, "lost": lost,
                     "duplicated": duplicated, **notes}
    assert lost == 0, f"{name}: {lost} of {submitted} task(s) lost"


@pytest.fixture(scope="module", autouse=True)
def fault_figures(request):
    """Print each fault test's figures when the module ends."""
    yield
    if not FIGURES:
        return
    lines = [f"{'fault test':<58} {'submitted':>9} {'completed':>9} {'lost':>4} {'dup':>4}  notes"]
    for name, f in FIGURES.items():
        notes = ", ".join(f"{k}={v}" for k, v in f.items()
                          if k not in ("submitted", "completed", "lost", "duplicated"))
        lines.append(f"{name:<58} {f['submitted']:>9} {f['completed']:>9} {f['lost']:>4} "
                     f"{f['duplicated']:>4}  {notes}")
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    target = os.environ.get("SHOAL_FAULT_FIGURES")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=1))


def counts(client) -> dict:
    c = dict(client.status()["counts"])
    c.setdefault("workers_lost", 0)
    return c


def delta(client, before: dict, name: str) -> int:
    return counts(client)[name] - before.get(name, 0)


@contextlib.contextmanager
def own_cluster(**kwargs):
    """A local cluster for one test; every process it ever started is gone afterwards."""
    kwargs.setdefault("n_workers", 2)
    cluster = shoal.Cluster(timeout=30, **kwargs)
    started: set = set()

    def remember():
        pids = cluster_pids(cluster)
        started.update(pids)
        conftest._seen_pids.update(pids)

    remember()
    try:
        yield cluster
    finally:
        remember()
        cluster.close()
        wait_until(lambda: pids_gone(started), 15, message="the cluster's processes to exit")


def registered(client, n: int) -> list:
    """Worker records from the broker once exactly ``n`` are registered (else [])."""
    workers = client.status()["worker_list"]
    return workers if len(workers) == n else []


def busy_worker_pid(client, n_workers: int) -> int:
    """The pid of a registered worker that is running something, once all ``n_workers`` are in."""
    def find():
        workers = registered(client, n_workers)
        busy = [w["pid"] for w in workers if w["running"]]
        return busy[0] if busy else None
    return wait_until(find, 20, 0.005, "a busy worker among the registered ones")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reap(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child we started, politely first."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def read_line_within(proc: subprocess.Popen, timeout: float) -> str:
    """The child's next stdout line, or fail the test after ``timeout``."""
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"no output from pid {proc.pid} within {timeout:g} s")
    return proc.stdout.readline().decode().strip()


# ================================================================= 1. SIGKILL mid-run
@pytest.mark.timeout(120)
def test_sigkilled_workers_mid_map_of_10000_tasks_lose_nothing_and_deliver_each_once(tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    with own_cluster() as cluster:
        client = cluster.client()
        before = counts(client)
        res = client.map(functools.partial(record, str(run_dir)), range(N_TASKS))
        killed = []
        for threshold in (N_TASKS // 4, N_TASKS // 2):
            wait_until(lambda: res.done_count >= threshold, 60, 0.002, f"{threshold} items done")
            victim = busy_worker_pid(client, 2)
            assert not res.done(), "the map finished before the kill: make the tasks longer"
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            wait_until(lambda: delta(client, before, "workers_lost") >= len(killed), 20,
                       message="the broker to see the worker die")
        values = res.result(timeout=60)
        assert values == [i * i for i in range(N_TASKS)]  # every result, once, in order
        ran = executions(run_dir)
        assert set(ran) == set(range(N_TASKS))
        after = counts(client)
        assert after["workers_lost"] - before["workers_lost"] == 2
        assert len(cluster.workers) == 2  # both were replaced
        duplicated = after["duplicates"] - before["duplicates"]
        tally("SIGKILL 2 workers mid 10,000-item map", N_TASKS, len(values),
              N_TASKS - sum(v == i * i for i, v in enumerate(values)), duplicated,
              workers_killed=2, reruns=sum(ran.values()) - N_TASKS)


@pytest.mark.timeout(120)
def test_sigkilled_workers_mid_10000_submits_lose_nothing_and_resolve_each_future_once(tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    with own_cluster() as cluster:
        client = cluster.client()
        before = counts(client)
        resolved = [0] * N_TASKS
        lock = threading.Lock()

        def note(i):
            def callback(_):
                with lock:
                    resolved[i] += 1
            return callback

        futures = [client.submit(record, str(run_dir), i) for i in range(N_TASKS)]
        for i, f in enumerate(futures):
            f.add_done_callback(note(i))
        killed = []
        for threshold in (N_TASKS // 4, N_TASKS // 2):
            wait_until(lambda: sum(resolved) >= threshold, 60, 0.005, f"{threshold} tasks done")
            victim = busy_worker_pid(client, 2)
            assert sum(resolved) < N_TASKS, "the tasks finished before the kill"
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            wait_until(lambda: delta(client, before, "workers_lost") >= len(killed), 20,
                       message="the broker to see the worker die")
        values = client.gather(futures, timeout=60)
        assert values == [i * i for i in range(N_TASKS)]
        assert resolved == [1] * N_TASKS  # each future resolved exactly once
        ran = executions(run_dir)
        assert set(ran) == set(range(N_TASKS))
        after = counts(client)
        assert after["workers_lost"] - before["workers_lost"] == 2
        assert len(cluster.workers) == 2
        tally("SIGKILL 2 workers mid 10,000 submits", N_TASKS, len(values),
              N_TASKS - sum(v == i * i for i, v in enumerate(values)),
              after["duplicates"] - before["duplicates"],
              workers_killed=2, reruns=sum(ran.values()) - N_TASKS)


# ================================================================= 2. tasks that kill their worker
def check_worker_lost(exc: BaseException, task, why: str, allowed: int = 3) -> None:
    """``exc`` is the WorkerLost of ``task``, naming ``allowed`` distinct workers and ``why``."""
    assert isinstance(exc, WorkerLost), repr(exc)
    assert exc.task == task
    assert len(exc.failures) == allowed
    names = [w for w, _ in exc.failures]
    assert len(set(names)) == allowed, names  # each death was a different process
    for name, reason in exc.failures:
        assert why in reason, exc.failures
        assert name in str(exc)
    assert why in str(exc) and "allowed-failures" in str(exc)


EXIT = "exited with code 1"
SEGV = "killed by signal 11 (SIGSEGV)"


@pytest.mark.timeout(120)
def test_tasks_that_exit_or_segfault_fail_with_worker_lost_after_three_deaths_and_others_complete():
    with own_cluster() as cluster:
        client = cluster.client()
        before = counts(client)
        exits = client.submit(exit_abruptly)
        crashes = client.submit(segfault)
        others = [client.submit(square, i) for i in range(40)]
        check_worker_lost(exits.exception(timeout=60), exits.key, EXIT)
        check_worker_lost(crashes.exception(timeout=60), crashes.key, SEGV)
        assert client.gather(others, timeout=60) == [i * i for i in range(40)]
        # It stopped there: three deaths each, no more, and the cluster still serves.
        assert delta(client, before, "workers_lost") == 6
        assert client.gather([client.submit(square, i) for i in range(20)], timeout=30) == \
            [i * i for i in range(20)]
        assert client.status()["queued"] == 0
        tally("os._exit(1) + segfault tasks among 40 submits", 42, 42, 0,
              delta(client, before, "duplicates"), workers_lost=6, worker_lost_errors=2)


POISON_BLAME = (
    "shoal/liveness.py:74-77 _requeue blames the oldest unit a dead worker held when its last "
    "heartbeat named none; an inline worker sends results every ~1 ms (worker.py:_run_pending), "
    "so units that finished just before the crash are older and unsent: an innocent task is "
    "charged (and fails with WorkerLost) while the poison task goes on killing workers")


@pytest.mark.timeout(60)
def test_worker_lost_blames_the_task_that_killed_the_worker_not_one_that_finished_before_it():
    with own_cluster(n_workers=1, allowed_failures=1) as cluster:
        client = cluster.client()
        assert client.submit(square, 2).result(timeout=30) == 4  # imports this module there
        innocent = [client.submit(square, i) for i in range(5)]
        poison = client.submit(exit_abruptly)
        assert isinstance(poison.exception(timeout=30), WorkerLost)
        assert client.gather(innocent, timeout=30) == [i * i for i in range(5)]


@pytest.mark.timeout(60)
def test_map_items_that_exit_or_segfault_fail_alone_with_worker_lost_and_the_rest_complete():
    with own_cluster() as cluster:
        client = cluster.client()
        before = counts(client)
        res = client.map(square_unless_poison, range(30), batch_size=1)
        assert res.wait(15), "the map never finished"
        futures = res.futures
        for i, f in enumerate(futures):
            if i == 7:
                check_worker_lost(f.exception(), res.batches[7].key, EXIT)
            elif i == 19:
                check_worker_lost(f.exception(), res.batches[19].key, SEGV)
            else:
                assert f.result() == i * i
        with pytest.raises(WorkerLost):
            res.result(timeout=10)  # iteration raises at item 7
        # Three charged deaths each; a death while the worker also held prefetched
        # items is charged to none of them (blame stays exact), at most once per item.
        lost = delta(client, before, "workers_lost")
        assert 6 <= lost <= 8
        assert client.map(square, range(100)).result(timeout=30) == [i * i for i in range(100)]
        tally("os._exit(1) + segfault items in a 30-item map (batch_size=1)", 30, 30, 0,
              delta(client, before, "duplicates"), workers_lost=lost)


@pytest.mark.timeout(60)
def test_local_cluster_replaces_every_worker_that_poison_tasks_killed():
    with own_cluster() as cluster:
        client = cluster.client()
        doomed = [client.submit(exit_abruptly), client.submit(segfault)]
        for f in doomed:
            assert isinstance(f.exception(timeout=60), WorkerLost)
        wait_until(lambda: registered(client, 2), 8, message="both workers replaced")


@pytest.mark.timeout(60)
def test_map_item_that_kills_its_worker_fails_alone_with_default_batching():
    with own_cluster() as cluster:
        client = cluster.client()
        res = client.map(square_unless_poison, range(40), batch_size=10)
        futures = res.futures
        assert res.wait(60)
        failed = [i for i, f in enumerate(futures) if f.exception() is not None]
        assert failed == [7, 19]


# ====================================================== 3. results and arguments that cannot travel
MAX_RESULT = 64 * 1024


@pytest.fixture(scope="module")
def guarded():
    """A cluster whose workers refuse results over 64 KiB, shared by tests that leave it whole."""
    with own_cluster(max_result_size=MAX_RESULT) as cluster:
        yield cluster


@pytest.fixture
def gclient(guarded):
    """A client of :func:`guarded`; the test must leave the same worker processes serving."""
    client = guarded.client()
    pids = {w["pid"] for w in wait_until(lambda: registered(client, 2), 30)}
    before = counts(client)
    yield client
    assert {w["pid"] for w in client.status()["worker_list"]} == pids, "a worker was replaced"
    assert delta(client, before, "workers_lost") == 0
    conftest.drain(client)
    client.close()


def worker_pids(client) -> set:
    return {w["pid"] for w in client.status()["worker_list"]}


def test_unpicklable_result_fails_with_a_clear_error_and_the_worker_serves_on(gclient):
    before = counts(gclient)
    f = gclient.submit(make_lock)
    exc = f.exception(timeout=30)
    assert isinstance(exc, SerializationError)
    message = str(exc)
    assert "make_lock" in message and "lock" in message.lower() and "cannot be pickled" in message
    assert gclient.submit_to(f.worker, os.getpid).result(timeout=30) in worker_pids(gclient)
    res = gclient.map(lock_at, range(20), batch_size=1)
    futures = res.futures
    assert res.wait(30)
    assert isinstance(futures[5].exception(), SerializationError)
    assert [f.result() for i, f in enumerate(futures) if i != 5] == \
        [i * i for i in range(20) if i != 5]
    tally("unpicklable result (submit + 20-item map)", 21, 21, 0,
          delta(gclient, before, "duplicates"), clear_errors=2)


def test_unpicklable_result_of_one_map_item_fails_only_that_item_with_default_batching(gclient):
    res = gclient.map(lock_at, range(20), batch_size=10)
    futures = res.futures
    assert res.wait(30)
    assert [i for i, f in enumerate(futures) if f.exception() is not None] == [5]


def test_unpicklable_argument_raises_at_submit_naming_it_and_sends_nothing(gclient):
    before = counts(gclient)
    with pytest.raises(SerializationError, match="argument 1") as info:
        gclient.submit(fail_first, "unused", threading.Lock())
    assert "lock" in str(info.value).lower()
    with pytest.raises(SerializationError, match="'guard'"):
        gclient.submit(fail_first, "unused", 0, guard=threading.Lock())
    res = gclient.map(square, [1, 2, threading.Lock(), 4], batch_size=1)
    with pytest.raises(SerializationError, match="item 2 of map over 'square'"):
        res.result(timeout=30)
    assert delta(gclient, before, "submitted") == 2  # the two items before it, nothing else
    assert gclient.submit(square, 3).result(timeout=30) == 9


def test_result_over_the_maximum_size_fails_with_result_too_large_and_the_worker_serves_on(gclient):
    before = counts(gclient)
    f = gclient.submit(blob, 100_000)
    exc = f.exception(timeout=30)
    assert isinstance(exc, ResultTooLarge)
    assert "'blob'" in str(exc) and "100,0" in str(exc) and f"{MAX_RESULT:,}" in str(exc)
    assert gclient.submit_to(f.worker, blob, 1000).result(timeout=30) == b"x" * 1000
    res = gclient.map(blob, [10, 100_000, 10], batch_size=1)
    futures = res.futures
    assert res.wait(30)
    assert isinstance(futures[1].exception(), ResultTooLarge)
    assert futures[0].result() == futures[2].result() == b"x" * 10
    tally("result over --max-result-size (submit + 3-item map)", 4, 4, 0,
          delta(gclient, before, "duplicates"), clear_errors=2)


def test_map_items_each_under_the_maximum_size_are_not_refused_as_a_batch(gclient):
    res = gclient.map(blob, [1000] * 200, batch_size=100)
    assert res.result(timeout=30) == [b"x" * 1000] * 200


# ============================================================ 8. retries, timeouts, cancel, Ctrl-C
def test_submit_retries_a_raising_task_and_gives_up_after_the_retries(gclient, tmp_path):
    assert gclient.submit(fail_first, str(tmp_path), 2, 0, retries=2).result(timeout=30) == 0
    assert (tmp_path / "attempts-0").read_text() == "xxx"
    with pytest.raises(ValueError, match="attempt 2 of item 1"):
        gclient.submit(fail_first, str(tmp_path), 2, 1, retries=1).result(timeout=30)


def test_map_retries_each_raising_item(gclient, tmp_path):
    values = gclient.map(functools.partial(fail_first, str(tmp_path), 1), range(50),
                         retries=1).result(timeout=30)
    assert values == list(range(50))
    assert all((tmp_path / f"attempts-{i}").read_text() == "xx" for i in range(50))
    (tmp_path / "none").mkdir()  # before the map: its first item may run at once
    res = gclient.map(functools.partial(fail_first, str(tmp_path / "none"), 1), range(3),
                      batch_size=1)
    with pytest.raises(ValueError, match="attempt 1 of item 0"):
        res.result(timeout=30)  # no retries: the first failure is the answer


def test_task_timeout_raises_task_timeout_and_its_slot_serves_the_next_task(gclient):
    t0 = time.monotonic()
    f = gclient.submit(wait_seconds, 60, timeout=0.5)
    exc = f.exception(timeout=30)
    assert isinstance(exc, TaskTimeout) and isinstance(exc, TimeoutError)
    assert 0.5 <= time.monotonic() - t0 < 3.0
    assert exc.timeout == 0.5 and "0.5 s" in str(exc)
    assert gclient.submit_to(f.worker, wait_seconds, 0).result(timeout=30) in worker_pids(gclient)


def test_map_task_timeout_fails_only_the_slow_item(gclient):
    t0 = time.monotonic()
    res = gclient.map(wait_seconds, [0.01, 60, 0.01, 0.01], task_timeout=0.5, batch_size=2)
    futures = res.futures
    assert res.wait(30)
    assert time.monotonic() - t0 < 5.0
    assert isinstance(futures[1].exception(), TaskTimeout)
    assert {f.result() for i, f in enumerate(futures) if i != 1} <= worker_pids(gclient)


def test_cancel_stops_a_running_task_within_a_second_and_its_worker_serves_on(gclient, tmp_path):
    before = counts(gclient)
    f = gclient.submit(stop_noted, str(tmp_path))
    wait_until(lambda: (tmp_path / "started").exists(), 20, message="the task to start")
    pid = int((tmp_path / "started").read_text())
    t0 = time.monotonic()
    assert f.cancel()
    stopped = wait_until(lambda: (tmp_path / "stopped").exists() and
                         float((tmp_path / "stopped").read_text()), 5, message="the task to stop")
    assert stopped - t0 < 1.0
    assert f.cancelled()
    assert pid in worker_pids(gclient)
    assert gclient.gather([gclient.submit(os.getpid) for _ in range(4)], timeout=30)
    wait_until(lambda: delta(gclient, before, "cancelled") == 1, 10, message="cancel counted")


CTRL_C_CLIENT = textwrap.dedent("""
    import signal
    import sys
    import shoal
    # A shell that starts pytest in the background makes its children ignore
    # SIGINT; this client must take Ctrl-C as a user's terminal would deliver it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from test_faults import hold_item
    from conftest import hold

    mode, connection_file, gate, started = sys.argv[1:]
    client = shoal.Client(connection_file)
    if mode == "map":
        res = client.map(hold_item, [gate] * 3, [started] * 3, range(3), batch_size=1)
        call = lambda: list(res)
    else:
        futures = [client.submit(hold, gate, started) for _ in range(3 if mode == "gather" else 1)]
        call = (lambda: client.gather(futures)) if mode == "gather" else futures[0].result
    print("WAITING", flush=True)
    try:
        call()
        print("RETURNED", flush=True)
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
    sys.stdin.readline()  # stay connected while the test looks at the broker
    client.close()
""")


@pytest.mark.parametrize("mode,n_tasks", [("result", 1), ("gather", 3), ("map", 3)])
def test_ctrl_c_in_a_blocking_call_cancels_its_tasks_and_leaves_the_cluster_healthy(
        guarded, gclient, tmp_path, mode, n_tasks):
    gate = Gate(tmp_path / "gate")
    before = counts(gclient)
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CLIENT, mode, guarded.connection_file, gate.path,
         gate.started_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=TESTS_DIR)
    try:
        assert read_line_within(proc, 30) == "WAITING"
        wait_until(lambda: gate.started() >= min(n_tasks, 2), 30, message="the tasks to start")
        # (Another client's lone task may have gone straight to its worker, the broker
        # told a moment later: see shoal.direct.)
        wait_until(lambda: sum(gclient.status()[k] for k in ("running", "queued")) == n_tasks,
                   5, message="the broker to count the tasks")
        proc.send_signal(signal.SIGINT)
        assert read_line_within(proc, 10) == "INTERRUPTED"
        # The gate is still shut: only a cancel can have emptied the cluster.
        wait_until(lambda: gclient.status()["running"] == 0 and gclient.status()["queued"] == 0,
                   10, message="the interrupted call's tasks to be cancelled")
        assert delta(gclient, before, "cancelled") == n_tasks
        assert not os.path.exists(gate.path)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.wait(15) == 0
    finally:
        gate.open()
        reap(proc)
    assert len(set(gclient.gather([gclient.submit(os.getpid) for _ in range(8)],
                                  timeout=30))) >= 1
    tally(f"Ctrl-C in {mode}()" if mode != "map" else "Ctrl-C while iterating a map",
          n_tasks, n_tasks, 0, delta(gclient, before, "duplicates"), cancelled=n_tasks)


# ================================================================= 7. a worker that stops answering
@pytest.mark.timeout(60)
def test_stopped_worker_is_lost_in_5_s_its_task_runs_elsewhere_and_its_late_result_is_a_duplicate(
        tmp_path):
    gate = Gate(tmp_path / "gate")
    with own_cluster() as cluster:
        client = cluster.client()
        before = counts(client)
        f = client.submit(pid_then_hold, gate.path, gate.started_dir)
        stopped = int(wait_until(lambda: os.listdir(gate.started_dir), 20,
                                 message="the task to start")[0])
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            wait_until(lambda: delta(client, before, "workers_lost") == 1, 15, 0.05,
                       "the stopped worker to be declared lost")
            silent_for = time.monotonic() - t0
            # worker_timeout is 5 s, checked every 0.5 s; the last heartbeat was up to 1 s old
            assert 4.0 <= silent_for < 7.0, silent_for
            wait_until(lambda: gate.started() == 2, 15, message="the task to run again elsewhere")
            gate.open()
            value = f.result(timeout=30)
            assert value != stopped
        finally:
            os.kill(stopped, signal.SIGCONT)
        # Resumed, it finishes the task it had and sends that late result: counted, not delivered.
        wait_until(lambda: delta(client, before, "duplicates") == 1, 15, 0.05,
                   "the late result to arrive")
        assert f.result() == value
        # ... and it registers again, and serves.
        wait_until(lambda: stopped in worker_pids(client) and registered(client, 2), 15,
                   message="the resumed worker to register again")
        pids = client.gather(list(client.run(os.getpid).values()), timeout=30)
        assert stopped in pids
        tally("SIGSTOP a worker for its task, SIGCONT after", 1, 1, 0,
              delta(client, before, "duplicates"), lost_after_s=round(silent_for, 1))


# ================================================================= 5. the broker restarts
BROKER = textwrap.dedent("""
    import logging, signal, sys
    from shoal import broker

    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s broker %(levelname)s %(message)s")
    listen, key, connection_file = sys.argv[1:]
    b = broker.Broker(listen, key=bytes.fromhex(key), connection_file=connection_file)
    signal.signal(signal.SIGTERM, lambda *_: b.stop())
    print("SHOAL-BROKER", b.address, flush=True)
    b.run()
""")


class RestartableBroker:
    """A broker process that can be killed and started again on the same port, with the same key.

    (``shoal broker`` makes a new key each start; this launcher keeps one, as a
    broker restarted by its operator from a saved connection file would.)
    """

    def __init__(self, tmp_path: Path) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.key = os.urandom(32).hex()
        self.connection_file = str(tmp_path / "broker.json")
        self.log = tmp_path / "broker.log"
        self.proc = None
        self.workers: list = []

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BROKER, self.address, self.key, self.connection_file],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        line = read_line_within(self.proc, 30)
        assert line == f"SHOAL-BROKER {self.address}", line

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def start_worker(self, name: str, via_connection_file: bool = False) -> subprocess.Popen:
        where = (["--connection-file", self.connection_file] if via_connection_file
                 else [self.address, "--key-file", self.connection_file])
        with open(self.log.with_name(f"{name}.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shoal.worker", *where, "--name", name,
                 "--parent-pid", str(os.getpid())],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.workers.append(proc)
        conftest._seen_pids.add(proc.pid)
        return proc

    def close(self) -> None:
        for proc in self.workers:
            reap(proc)
        if self.proc is not None:
            reap(self.proc)


@pytest.fixture
def restartable(tmp_path):
    broker = RestartableBroker(tmp_path)
    broker.start()
    yield broker
    broker.close()


def gated_value(gate_path: str, started_dir: str, value):
    Path(started_dir, str(os.getpid())).touch()
    conftest.wait_for_gate(gate_path)
    return value


@pytest.mark.timeout(90)
def test_broker_restart_mid_map_fails_in_flight_work_with_broker_lost_and_workers_rejoin(
        restartable, tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    n = 400
    task = functools.partial(record_slowly, str(run_dir), 0.01)
    for i in range(2):
        restartable.start_worker(f"w{i}")
    with shoal.Client(restartable.address, key_file=restartable.connection_file) as client:
        client.wait_for_workers(2, timeout=30)
        res = client.map(task, range(n), key="sweep")
        wait_until(lambda: res.done_count >= 40, 30, message="40 items done")
        done_before = res.done_count
        restartable.kill()
        t0 = time.monotonic()
        restartable.start()
        with pytest.raises(BrokerLost, match="restarted"):
            res.result(timeout=client.broker_timeout + 5)
        failed_after = time.monotonic() - t0
        assert failed_after < client.broker_timeout
        # The workers come back on their own; the broker serves new work.
        wait_until(lambda: registered(client, 2), 15, message="the workers to register again")
        assert client.submit(square, 12).result(timeout=30) == 144
        # The keyed map runs again to the end: the restarted broker kept no results, so what
        # finished before the restart runs again.
        again = client.map(task, range(n), key="sweep")
        assert again.result(timeout=60) == [i * i for i in range(n)]
        ran = executions(run_dir)
        assert set(ran) == set(range(n))
        assert any(ran[i] > 1 for i in range(done_before))
        tally("broker SIGKILLed + restarted mid 400-item keyed map", n, n, 0,
              counts(client)["duplicates"], broker_lost_after_s=round(failed_after, 1),
              reruns=sum(ran.values()) - n)


@pytest.mark.timeout(60)
def test_in_flight_futures_fail_with_broker_lost_when_the_broker_dies_and_stays_dead(
        restartable, tmp_path):
    gate = Gate(tmp_path / "gate")
    restartable.start_worker("w0")
    with shoal.Client(restartable.address, key_file=restartable.connection_file,
                      broker_timeout=3) as client:
        client.wait_for_workers(1, timeout=30)
        running = client.submit(gated_value, gate.path, gate.started_dir, 1)
        queued = [client.submit(square, i) for i in range(5)]
        res = client.map(square, range(1000), batch_size=10)
        wait_until(lambda: gate.started() == 1, 20, message="the first task to start")
        # BrokerLost comes broker_timeout after the last word from the broker: make that
        # word an answer just before the kill, and time from before it was asked for.
        t0 = time.monotonic()
        client.status()
        restartable.kill()
        for f in [running, *queued]:
            with pytest.raises(BrokerLost, match="has not answered"):
                f.result(timeout=15)
        with pytest.raises(BrokerLost):
            res.result(timeout=15)
        assert 3 <= time.monotonic() - t0 < 6
        gate.open()
    # "completed" here: each of the 1,006 ended in BrokerLost, none hung or vanished.
    tally("broker SIGKILLed for good, 6 submits + 1,000-item map", 1006, 1006, 0, 0,
          outcome="BrokerLost after broker_timeout=3 s")


@pytest.mark.timeout(60)
def test_map_that_failed_with_broker_lost_sends_no_more_of_its_input(restartable, tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    for i in range(2):
        restartable.start_worker(f"w{i}")
    with shoal.Client(restartable.address, key_file=restartable.connection_file) as client:
        client.wait_for_workers(2, timeout=30)
        res = client.map(functools.partial(record_slowly, str(run_dir), 0.01), range(400))
        wait_until(lambda: res.done_count >= 40, 30, message="40 items done")
        restartable.kill()
        restartable.start()
        with pytest.raises(BrokerLost):
            res.result(timeout=client.broker_timeout + 5)
        wait_until(res.done, 20, message="the map to stop")
        assert client.status()["counts"]["submitted"] == 0
        assert sum(b.count for b in res.batches) < 400


@pytest.mark.timeout(60)
def test_workers_started_from_the_connection_file_rejoin_a_broker_restarted_on_the_same_address(
        restartable):
    for i in range(2):
        restartable.start_worker(f"w{i}", via_connection_file=True)
    with shoal.Client(restartable.connection_file) as client:
        client.wait_for_workers(2, timeout=30)
    restartable.kill()
    restartable.start()
    with shoal.Client(restartable.connection_file) as client:
        wait_until(lambda: registered(client, 2), 6, message="the workers to register again")


@pytest.mark.timeout(60)
def test_workers_rejoin_a_shoal_broker_command_restarted_on_the_same_address(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    connection_file = str(tmp_path / "broker.json")
    command = [sys.executable, "-m", "shoal.broker", "--listen", address,
               "--connection-file", connection_file]

    def start():
        with open(tmp_path / "broker.log", "ab") as log:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log,
                                    stdin=subprocess.DEVNULL)
        assert read_line_within(proc, 30).startswith("SHOAL-BROKER")
        return proc

    broker = start()
    with open(tmp_path / "w0.log", "ab") as log:
        worker = subprocess.Popen(  # over TCP, so the IPC endpoint's name plays no part
            [sys.executable, "-m", "shoal.worker", address, "--key-file", connection_file,
             "--parent-pid", str(os.getpid())], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    conftest._seen_pids.add(worker.pid)
    try:
        with shoal.Client(address, key_file=connection_file) as client:
            client.wait_for_workers(1, timeout=30)
        broker.kill()
        broker.wait()
        reap(broker)
        broker = start()
        with shoal.Client(address, key_file=connection_file) as client:
            wait_until(lambda: registered(client, 1), 6, message="the worker to register again")
    finally:
        reap(worker)
        reap(broker)


@pytest.mark.timeout(60)
def test_a_result_from_before_a_broker_restart_never_resolves_a_new_task(restartable, tmp_path):
    gate = Gate(tmp_path / "gate")
    restartable.start_worker("w0")
    with shoal.Client(restartable.address, key_file=restartable.connection_file) as client:
        client.wait_for_workers(1, timeout=30)
        old = client.submit(gated_value, gate.path, gate.started_dir, "old")
        wait_until(lambda: gate.started() == 1, 20, message="the old task to start")
        restartable.kill()
        restartable.start()
        with pytest.raises(BrokerLost):
            old.result(timeout=client.broker_timeout + 5)
        wait_until(lambda: registered(client, 1), 15, message="the worker to register again")
        new = client.submit(str, "new")
        gate.open()
        assert new.result(timeout=30) == "new"


# ================================================================= 6. the client is killed
KEYED_CLIENT = textwrap.dedent("""
    import functools, sys
    import shoal
    from test_faults import record_slowly

    connection_file, run_dir, n, key = sys.argv[1:]
    client = shoal.Client(connection_file)
    res = client.map(functools.partial(record_slowly, run_dir, 0.01), range(int(n)), key=key)
    for i, value in enumerate(res):
        print(i, value, flush=True)
""")


@pytest.mark.timeout(90)
def test_killed_client_keyed_map_is_recovered_by_a_new_client_with_each_result_once(tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    n, key = 300, "killed-client-sweep"
    with own_cluster() as cluster:
        client = cluster.client()
        before = counts(client)
        proc = subprocess.Popen(
            [sys.executable, "-c", KEYED_CLIENT, cluster.connection_file, str(run_dir), str(n),
             key], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=TESTS_DIR)
        try:
            seen = 0
            while seen < 50:
                i, value = map(int, read_line_within(proc, 30).split())
                assert (i, value) == (seen, seen * seen)
                seen += 1
            proc.kill()
            proc.wait()
        finally:
            reap(proc)
        # Re-attach without resubmitting: what the dead client had sent, each part once.
        kept = client.results(key)
        assert kept.wait(30)
        parts = [(b.start, b.count) for b in kept.batches]
        assert [start for start, _ in parts] == \
            [sum(count for _, count in parts[:k]) for k in range(len(parts))]  # contiguous from 0
        values = kept.result(timeout=30)
        assert seen <= len(values) < n
        assert values == [i * i for i in range(len(values))]
        # The same keyed map returns those at once and runs only the rest.
        full = client.map(functools.partial(record_slowly, str(run_dir), 0.01), range(n), key=key)
        assert full.result(timeout=60) == [i * i for i in range(n)]
        ran = executions(run_dir)
        assert set(ran) == set(range(n))
        reruns = sum(ran.values()) - n
        assert reruns == 0, f"{reruns} item(s) ran twice"
        assert client.submit(square, 9).result(timeout=30) == 81  # the broker serves on
        tally("client SIGKILLed mid 300-item keyed map", n, len(full.result()), 0,
              delta(client, before, "duplicates"), kept_for_new_client=len(values),
              reruns=reruns)


# ================================================================= 4. a worker's clock is off
def libfaketime():
    """The path of libfaketime (Debian's faketime package), or None."""
    import glob
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


@pytest.mark.skipif(libfaketime() is None,
                    reason="needs libfaketime (apt-get install faketime) to skew a worker's clock")
@pytest.mark.timeout(60)
def test_worker_with_a_clock_an_hour_ahead_completes_tasks_and_timeouts_and_is_never_judged_dead():
    with own_cluster(n_workers=0) as cluster:
        client = cluster.client()
        before = counts(client)
        # Only the wall clock is off, as on a badly set machine: the monotonic clock, which
        # timeouts and heartbeats use, is not (libfaketime 0.9.10 also breaks time.sleep
        # then, so the tasks here wait with threading.Event).
        # Preloaded directly (not through the faketime command) so that the worker is our
        # own child and --parent-pid holds.
        env = dict(os.environ, LD_PRELOAD=libfaketime(), FAKETIME="+1h",
                   FAKETIME_DONT_FAKE_MONOTONIC="1")
        log = open(cluster.log_dir / "skewed.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.worker", "--connection-file", cluster.connection_file,
             "--name", "skewed", "--parent-pid", str(os.getpid())],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()
        conftest._seen_pids.add(proc.pid)
        try:
            wait_until(lambda: registered(client, 1), 30, message="the skewed worker to join")
            skew = client.submit(wall_clock).result(timeout=30) - time.time()
            assert 3500 < skew < 3700, f"the worker's clock is off by {skew:.0f} s, not an hour"
            assert client.map(square, range(500)).result(timeout=30) == \
                [i * i for i in range(500)]
            # A task longer than worker_timeout: heartbeats keep it alive, its timeout holds.
            long = client.submit(wait_seconds, 6.0, timeout=30)
            pid = long.result(timeout=30)
            assert delta(client, before, "workers_lost") == 0
            t0 = time.monotonic()
            with pytest.raises(TaskTimeout):
                client.submit(wait_seconds, 60, timeout=1.0).result(timeout=30)
            assert 1.0 <= time.monotonic() - t0 < 3.0
            assert client.submit(os.getpid).result(timeout=30) == pid  # the slot serves on
            assert registered(client, 1) and delta(client, before, "workers_lost") == 0
        finally:
            reap(proc)
        tally("worker clock +1 h (faketime)", 504, 504, 0, delta(client, before, "duplicates"),
              workers_lost=0)


# ================================================================= 9. bounded memory
def memory_benchmark():
    """benchmarks/memory.py, imported."""
    import importlib.util
    path = Path(conftest.REPO_DIR, "benchmarks", "memory.py")
    spec = importlib.util.spec_from_file_location("shoal_memory_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


BOUND = 100 * 2**20  # bytes a process may grow by during a streaming map


def streaming_map_stays_bounded(name: str, items: int, result_bytes: int = 0) -> None:
    """Run benchmarks/memory.py's generator map; every process grows by less than BOUND."""
    bench = memory_benchmark()
    figures = bench.measure(items, workers=2, result_bytes=result_bytes)
    print(bench.report(figures))
    growth = {process: p["growth"] for process, p in figures["processes"].items()}
    assert growth["broker"] < BOUND, growth
    assert all(g < BOUND for process, g in growth.items() if process.startswith("worker")), growth
    assert growth["client"] < BOUND, growth
    tally(name, items, items, 0, 0, broker_growth_mb=round(growth["broker"] / 2**20, 1),
          items_per_s=round(figures["items_per_s"]))


@pytest.mark.timeout(120)
def test_generator_map_of_200000_items_keeps_broker_worker_and_client_memory_bounded():
    streaming_map_stays_bounded("generator map of 200,000 items (memory)", 200_000)


@pytest.mark.timeout(120)
def test_generator_map_of_50_kb_results_keeps_broker_memory_bounded():
    """600 MB of results: batches are sized by measured bytes as well as time, so every
    process holds a bounded window of them, not batches of hundreds of megabytes."""
    streaming_map_stays_bounded("generator map of 12,000 50 kB results (memory)", 12_000,
                                result_bytes=50_000)


# ================================================================= the errors, where users look
def test_reliability_errors_are_exported_from_the_shoal_package():
    for name in ("WorkerLost", "TaskTimeout", "BrokerLost", "ResultTooLarge"):
        assert getattr(shoal, name) is getattr(shoal.errors, name)


@pytest.mark.timeout(60)
def test_task_waiting_when_the_last_worker_dies_fails_with_no_workers_error():
    with own_cluster(n_workers=1, restart=False) as cluster:
        client = cluster.client(worker_timeout=2)
        pid = client.submit(os.getpid).result(timeout=30)
        f = client.submit(wait_seconds, 60)
        wait_until(lambda: client.status()["running"] == 1, 20, message="the task to start")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(shoal.NoWorkersError):
            f.result(timeout=10)


def test_shoal_status_shows_duplicates_and_lost_workers():
    from shoal.cli import format_status
    text = format_status({"address": "tcp://127.0.0.1:1", "uptime": 1.0, "workers": 0,
                          "counts": {"done": 10, "failed": 0, "cancelled": 0,
                                     "duplicates": 7, "workers_lost": 3}})
    assert any("duplicate" in line and "7" in line for line in text.splitlines()), text
    assert any("lost" in line and "3" in line for line in text.splitlines()), text
