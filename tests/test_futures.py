"""shoal.Future is a concurrent.futures.Future; the executor is a concurrent.futures.Executor."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

import shoal

from conftest import hold, wait_for_gate, wait_until

pytestmark = pytest.mark.timeout(60)


def add(a, b):
    return a + b


def make_marker(path):
    """Task: leave evidence that it ran."""
    Path(path).touch()
    return path


def occupy_workers(client, gate, n=None) -> list:
    """Block ``n`` (default: all) worker slots on ``gate``; return once the tasks have started."""
    n = n or client.status()["slots"]
    futures = [client.submit(hold, gate.path, gate.started_dir) for _ in range(n)]
    wait_until(lambda: gate.started() >= n, 20, message="the blocking tasks to start")
    return futures


# ----------------------------------------------------------------- the stdlib contract
def test_future_is_a_concurrent_futures_future(client):
    fut = client.submit(add, 1, 2)
    assert isinstance(fut, cf.Future) and isinstance(fut, shoal.Future)
    assert fut.result(timeout=30) == 3


def test_stdlib_wait_returns_all_done(client):
    futs = [client.submit(add, i, i) for i in range(10)]
    done, not_done = cf.wait(futs, timeout=30)
    assert done == set(futs) and not not_done
    assert sorted(f.result() for f in done) == [2 * i for i in range(10)]


def test_stdlib_as_completed_yields_every_future_once(client):
    futs = [client.submit(add, i, 1) for i in range(10)]
    seen = list(cf.as_completed(futs, timeout=30))
    assert sorted(seen, key=id) == sorted(futs, key=id)
    assert sorted(f.result() for f in seen) == list(range(1, 11))


def test_shoal_wait_first_completed_returns_the_quick_task(idle_client, gate):
    slow = idle_client.submit(wait_for_gate, gate.path)
    quick = idle_client.submit(add, 2, 2)
    done, not_done = shoal.wait([slow, quick], timeout=30, return_when=shoal.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    gate.open()
    assert isinstance(slow.result(timeout=30), int)


def test_shoal_wait_first_exception_returns_the_failure(idle_client, gate):
    slow = idle_client.submit(wait_for_gate, gate.path)
    failing = idle_client.submit(add, 1, "x")
    done, not_done = shoal.wait([slow, failing], timeout=30, return_when=shoal.FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    assert isinstance(failing.exception(), TypeError)
    gate.open()
    slow.result(timeout=30)


def test_shoal_wait_for_all_receives_on_this_thread_and_honours_its_timeout(idle_client, gate):
    futs = [idle_client.submit(add, i, i) for i in range(200)]
    done, not_done = shoal.wait(futs, timeout=30)
    assert done == set(futs) and not not_done
    assert [f.result() for f in futs] == [2 * i for i in range(200)]
    # A pending one: the timeout is kept, and what finished is reported done.
    slow = idle_client.submit(wait_for_gate, gate.path)
    quick = idle_client.submit(add, 1, 1)
    local = cf.Future()  # not shoal's: left to the stdlib's wait
    local.set_result(7)
    t0 = time.monotonic()
    done, not_done = shoal.wait([slow, quick, local], timeout=0.5)
    assert 0.4 <= time.monotonic() - t0 < 10
    assert done == {quick, local} and not_done == {slow}
    gate.open()
    done, not_done = shoal.wait([slow, quick, local], timeout=30)
    assert done == {slow, quick, local} and not not_done


def test_shoal_as_completed_yields_in_completion_order(idle_client, gate):
    slow = idle_client.submit(wait_for_gate, gate.path)
    quick = idle_client.submit(add, 1, 1)
    it = shoal.as_completed([slow, quick], timeout=30)
    assert next(it) is quick
    gate.open()
    assert next(it) is slow


def test_await_a_future_in_asyncio(client):
    async def main():
        return await client.submit(add, 20, 22)

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 42


def test_asyncio_gather_of_futures(client):
    async def main():
        return await asyncio.gather(*(client.submit(add, i, 100) for i in range(8)))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == [100 + i for i in range(8)]


def test_await_a_failing_future_raises_its_exception(client):
    async def main():
        return await client.submit(add, None, 1)

    with pytest.raises(TypeError):
        asyncio.run(asyncio.wait_for(main(), 30))


def test_result_with_timeout_raises_timeout_error_for_a_slow_task(idle_client, gate):
    fut = idle_client.submit(wait_for_gate, gate.path)
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.3)
    assert not fut.done()
    gate.open()
    assert fut.result(timeout=30) != os.getpid()


def test_exception_with_timeout_raises_timeout_error_for_a_slow_task(idle_client, gate):
    fut = idle_client.submit(wait_for_gate, gate.path)
    with pytest.raises(cf.TimeoutError):
        fut.exception(timeout=0.3)
    gate.open()
    assert fut.exception(timeout=30) is None


def test_done_is_false_while_running_and_true_after(idle_client, gate):
    fut = idle_client.submit(wait_for_gate, gate.path)
    assert not fut.done()
    gate.open()
    cf.wait([fut], timeout=30)
    assert fut.done() and not fut.cancelled()


def test_add_done_callback_is_called_once_with_the_future(client):
    called = []
    finished = threading.Event()

    def callback(f):
        called.append((f, f.result()))
        finished.set()

    fut = client.submit(add, 3, 4)
    fut.add_done_callback(callback)
    assert finished.wait(30)
    fut.result(timeout=30)
    assert called == [(fut, 7)]
    late = []
    fut.add_done_callback(late.append)  # already done: called at once
    assert late == [fut]


def test_done_callback_sees_a_failure(client):
    got = []
    finished = threading.Event()
    fut = client.submit(add, 1, "a")
    fut.add_done_callback(lambda f: (got.append(f.exception()), finished.set()))
    assert finished.wait(30)
    assert isinstance(got[0], TypeError)


# ----------------------------------------------------------------- cancellation
# Cancellation tests use a cluster of their own: a worker that has run quick tasks
# gets queued work prefetched to it (see the warm-cluster test below).
@pytest.fixture
def cold_client(fresh_cluster):
    return fresh_cluster.client()


def test_cancel_of_a_queued_task_returns_true_and_it_never_runs(cold_client, gate, tmp_path):
    blockers = occupy_workers(cold_client, gate)
    marker = tmp_path / "ran"
    victim = cold_client.submit(make_marker, str(marker))
    assert victim.cancel() is True
    assert victim.cancelled() and victim.done()
    with pytest.raises(cf.CancelledError):
        victim.result(timeout=1)
    gate.open()
    cf.wait(blockers, timeout=30)
    # A later task on every worker completes: the victim would have run before it.
    later = [cold_client.submit(add, i, 0) for i in range(4)]
    assert cold_client.gather(later, timeout=30) == [0, 1, 2, 3]
    assert not marker.exists()
    wait_until(lambda: cold_client.status()["counts"]["cancelled"] >= 1, 10)


def test_stdlib_wait_and_as_completed_return_a_cancelled_future(cold_client, gate):
    blockers = occupy_workers(cold_client, gate)
    victim = cold_client.submit(add, 1, 1)
    assert victim.cancel() is True
    try:
        done, _ = cf.wait([victim], timeout=2)
        assert done == {victim}
        assert list(cf.as_completed([victim], timeout=2)) == [victim]
    finally:
        gate.open()
        cf.wait(blockers, timeout=30)


def test_cancel_return_value_matches_the_final_state_of_a_running_task(idle_client, tmp_path):
    from conftest import Gate
    outcomes = []
    for attempt in range(8):
        gate = Gate(tmp_path / f"gate-{attempt}")
        fut = idle_client.submit(hold, gate.path, gate.started_dir)
        wait_until(lambda: gate.started() == 1, 20, message="the task to start")
        said = fut.cancel()
        gate.open()
        wait_until(fut.done, 20, message="the future to settle")
        outcomes.append((said, fut.cancelled()))
    assert all(said == ended for said, ended in outcomes), outcomes


def prefetched_victim(client, gate, marker):
    """A queued task that a busy worker has already received (prefetched) from the broker."""
    # Quick tasks first: the broker then prefetches work to workers it sees are quick.
    assert client.map(add, range(2000), range(2000)).result(timeout=30)[-1] == 3998
    blockers = occupy_workers(client, gate)
    victim = client.submit(make_marker, str(marker))
    deadline = time.monotonic() + 1.0  # let the broker hand it on, if it is going to
    while client.status()["running"] <= len(blockers) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling with a deadline
    return blockers, victim


def test_cancel_of_a_task_prefetched_by_a_busy_worker_is_consistent(idle_client, gate, tmp_path):
    marker = tmp_path / "ran"
    blockers, victim = prefetched_victim(idle_client, gate, marker)
    cancelled = victim.cancel()
    gate.open()
    cf.wait(blockers, timeout=30)
    wait_until(victim.done, 10, message="the future of the withdrawn (or not) task to settle")
    assert victim.cancelled() is cancelled
    # Either the cancel worked, or it said it could not: never True for a task that ran.
    assert cancelled is not marker.exists()


def test_a_worker_held_by_a_long_task_takes_no_work_ahead(idle_client, gate):
    # Quick tasks first: the broker then deals work ahead to workers it sees are quick.
    assert idle_client.gather([idle_client.submit(add, i, 1) for i in range(300)],
                              timeout=30) == list(range(1, 301))
    (held,) = occupy_workers(idle_client, gate, n=1)

    def held_takes_nothing_ahead():
        busy = [w for w in idle_client.status()["worker_list"] if w["running"]]
        return len(busy) == 1 and busy[0]["prefetch"] == 0

    wait_until(held_takes_nothing_ahead, 10, message="the broker to see the worker held")
    # All of them run on the free worker while the gate stays shut: none waits behind it.
    quick = [idle_client.submit(add, i, 2) for i in range(300)]
    assert idle_client.gather(quick, timeout=20) == list(range(2, 302))
    assert not held.done()
    gate.open()
    assert held.result(timeout=30) is not None


def test_cancel_returns_promptly_while_the_worker_is_busy(idle_client, gate):
    (running,) = occupy_workers(idle_client, gate, n=1)
    started = time.monotonic()
    running.cancel()
    took = time.monotonic() - started
    gate.open()
    wait_until(running.done, 30, message="the future to settle")
    assert took < 2.0, f"cancel() blocked for {took:.1f} s"


def hold_then_mark(gate_path, started_dir, marker):
    """Task: wait for the gate, then leave evidence that it went on."""
    hold(gate_path, started_dir)
    Path(marker).touch()


def test_cancel_of_a_running_task_interrupts_it_and_the_worker_serves_on(idle_client, gate,
                                                                       tmp_path):
    marker = tmp_path / "went-on"
    running = idle_client.submit(hold_then_mark, gate.path, gate.started_dir, str(marker))
    wait_until(lambda: gate.started() == 1, 20, message="the task to start")
    running.cancel()  # its return value: see the test of its consistency below
    wait_until(running.done, 20, message="the interrupted task to settle")
    assert running.cancelled()
    with pytest.raises(cf.CancelledError):
        running.result(timeout=1)
    gate.open()
    later = [idle_client.submit(add, i, 0) for i in range(6)]
    assert idle_client.gather(later, timeout=30) == list(range(6))
    assert not marker.exists()
    assert idle_client.status()["workers"] == 2


def test_cancel_of_a_finished_task_returns_false(client):
    fut = client.submit(add, 1, 1)
    assert fut.result(timeout=30) == 2
    assert fut.cancel() is False
    assert not fut.cancelled()


def test_client_cancel_withdraws_several_queued_tasks(cold_client, gate, tmp_path):
    blockers = occupy_workers(cold_client, gate)
    victims = [cold_client.submit(make_marker, str(tmp_path / f"ran-{i}")) for i in range(5)]
    cold_client.cancel(victims)
    assert all(v.cancelled() for v in victims)
    gate.open()
    cf.wait(blockers, timeout=30)
    cold_client.gather([cold_client.submit(add, i, 0) for i in range(4)], timeout=30)
    assert not list(tmp_path.glob("ran-*"))


# ----------------------------------------------------------------- gather
def test_gather_returns_results_in_submission_order(client):
    futs = [client.submit(add, i, 0) for i in range(20)]
    assert client.gather(futs, timeout=30) == list(range(20))


def test_gather_raises_the_first_failure(client):
    futs = [client.submit(add, 1, 1), client.submit(add, 1, "no"), client.submit(add, 2, 2)]
    with pytest.raises(TypeError):
        client.gather(futs, timeout=30)


def test_gather_with_timeout_raises_timeout_error(idle_client, gate):
    fut = idle_client.submit(wait_for_gate, gate.path)
    with pytest.raises(cf.TimeoutError):
        idle_client.gather([fut], timeout=0.3)
    gate.open()
    fut.result(timeout=30)


# ----------------------------------------------------------------- threads
def test_futures_from_many_threads_all_resolve(client):
    results = {}

    def work(n):
        futs = [client.submit(add, n, i) for i in range(25)]
        results[n] = client.gather(futs, timeout=30)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {n: [n + i for i in range(25)] for n in range(6)}


def test_short_lived_submitting_threads_do_not_leak_file_descriptors(client):
    me = psutil.Process()

    def one():
        client.submit(add, 1, 1).result(timeout=30)

    def round_of(n):
        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    round_of(20)  # warm up whatever is cached per client
    gc.collect()
    before = me.num_fds()
    for _ in range(5):
        round_of(40)
    gc.collect()
    grown = me.num_fds() - before
    assert grown < 40, f"{grown} file descriptors leaked by 200 short-lived threads"


# ----------------------------------------------------------------- executor
def uses_an_executor(executor: cf.Executor) -> tuple:
    """Written for ProcessPoolExecutor; must run unchanged on client.executor()."""
    with executor as ex:
        futures = [ex.submit(pow, 2, i) for i in range(8)]
        firsts = sorted(f.result() for f in cf.as_completed(futures, timeout=30))
        mapped = list(ex.map(add, range(10), range(10), timeout=30, chunksize=3))
        done, _ = cf.wait([ex.submit(divmod, 7, 2)], timeout=30)
    return firsts, mapped, done.pop().result()


def test_code_written_for_process_pool_executor_runs_unchanged(client):
    firsts, mapped, last = uses_an_executor(client.executor())
    assert firsts == [2 ** i for i in range(8)]
    assert mapped == [2 * i for i in range(10)]
    assert last == (3, 1)


def test_executor_is_a_concurrent_futures_executor(client):
    assert isinstance(client.executor(), cf.Executor)


def test_executor_submit_passes_keyword_arguments(client):
    with client.executor() as ex:
        assert ex.submit(int, "ff", base=16).result(timeout=30) == 255


def test_executor_submit_passes_keywords_named_like_shoal_options_to_the_function(client):
    def takes(timeout, queue, priority=0, retries=None):
        return timeout, queue, priority, retries

    with client.executor() as ex:
        assert ex.submit(takes, timeout=5, queue="q", priority=2, retries=1).result(30) == \
            (5, "q", 2, 1)


def test_executor_map_honours_chunksize_and_order(client):
    with client.executor() as ex:
        assert list(ex.map(abs, range(-100, 0), chunksize=7, timeout=30)) == \
            list(range(100, 0, -1))


def test_executor_map_raises_timeout_error_for_a_slow_item(idle_client, gate):
    ex = idle_client.executor()
    it = ex.map(wait_for_gate, [gate.path], timeout=0.3)
    with pytest.raises(cf.TimeoutError):
        next(it)
    gate.open()
    ex.shutdown(wait=True)


def test_executor_shutdown_waits_for_pending_futures(idle_client, gate):
    ex = idle_client.executor()
    futs = [ex.submit(wait_for_gate, gate.path) for _ in range(2)]
    waiter = threading.Thread(target=ex.shutdown, kwargs={"wait": True})
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "shutdown(wait=True) returned while tasks were still blocked"
    gate.open()
    waiter.join(30)
    assert not waiter.is_alive()
    assert all(f.done() for f in futs)
    assert all(isinstance(f.result(), int) for f in futs)


def test_executor_shutdown_cancel_futures_cancels_queued_tasks(cold_client, gate, tmp_path):
    blockers = occupy_workers(cold_client, gate)
    ex = cold_client.executor()
    queued = [ex.submit(make_marker, str(tmp_path / f"ran-{i}")) for i in range(4)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.open()
    assert all(isinstance(r, int) for r in cold_client.gather(blockers, timeout=30))
    cold_client.gather([cold_client.submit(add, i, 0) for i in range(4)], timeout=30)
    assert not list(tmp_path.glob("ran-*"))


def test_executor_shutdown_cancel_futures_lets_running_tasks_finish(idle_client, gate):
    ex = idle_client.executor()
    running = ex.submit(hold, gate.path, gate.started_dir)
    wait_until(lambda: gate.started() == 1, 20, message="the task to start")
    ex.shutdown(wait=False, cancel_futures=True)
    gate.open()
    assert isinstance(running.result(timeout=30), int)
    assert not running.cancelled()


def test_executor_submit_after_shutdown_raises_runtime_error(client):
    ex = client.executor()
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(add, 1, 2)
    with pytest.raises(RuntimeError):
        ex.map(abs, [1])


def test_executor_context_manager_shuts_down_on_exit(client):
    with client.executor() as ex:
        fut = ex.submit(add, 5, 5)
    assert fut.done() and fut.result() == 10
    with pytest.raises(RuntimeError):
        ex.submit(add, 1, 1)


def test_future_condition_wakes_waiters_times_out_and_is_reentrant():
    # shoal's futures carry a light condition instead of threading.Condition;
    # it must behave as that does for the stdlib's waiters and for threads.
    from shoal.futures import Future, _Condition
    future = Future("k")
    assert isinstance(future._condition, _Condition)
    started = threading.Event()
    got = []

    def wait_for_it() -> None:
        started.set()
        got.append(future.result(timeout=30))

    threads = [threading.Thread(target=wait_for_it) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(10)
    future.set_result(42)
    for t in threads:
        t.join(30)
    assert got == [42, 42, 42]

    pending = Future("p")
    with pending._condition:
        with pending._condition:  # re-entrant, as threading.Condition() is
            t0 = time.monotonic()
            assert pending._condition.wait(0.05) is False
            assert time.monotonic() - t0 >= 0.04
        assert not pending._condition._waiters  # a timed-out waiter leaves no trace
    with pytest.raises(RuntimeError):
        pending._condition.wait(0)  # not held
    done, not_done = cf.wait([future, pending], timeout=0.05)
    assert done == {future} and not_done == {pending}
