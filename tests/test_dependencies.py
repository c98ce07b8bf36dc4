"""Futures as arguments, chains, groups and chords; results by task id; future.status.

Dependent tasks wait at the broker; their inputs go worker to broker to
worker.  To show that the data does not pass through the client, a producer
returns a value whose unpickling in the client process would fail loudly.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import shoal
from conftest import Gate, hold, wait_until

pytestmark = pytest.mark.timeout(60)



def add(x, y):
    return x + y


def total(values) -> int:
    return sum(values)


def fail(message: str):
    raise ValueError(message)


def slow(value, seconds: float = 0.3):
    time.sleep(seconds)
    return value


class NotInTheClient:
    """Unpickles anywhere but in the process ``forbidden_pid`` (the test's, which
    is the client): proof of the route a dependency's value takes."""

    def __init__(self, value, forbidden_pid: int) -> None:
        self.value = value
        self.forbidden_pid = forbidden_pid

    def __reduce__(self):
        return _rebuild, (self.value, self.forbidden_pid)


def _rebuild(value, forbidden_pid):
    if os.getpid() == forbidden_pid:
        raise AssertionError("a dependency's value was unpickled in the client")
    return NotInTheClient(value, forbidden_pid)


def produce(value, forbidden_pid: int, seconds: float = 0.0):
    time.sleep(seconds)
    return NotInTheClient(value, forbidden_pid)


def consume(thing) -> int:
    return thing.value * 2


def nbytes(array) -> int:
    return int(array.nbytes)


# ----------------------------------------------------------------- futures as arguments
def test_a_task_taking_a_future_waits_for_it_and_gets_its_result(idle_client):
    a = idle_client.submit(slow, 20)
    b = idle_client.submit(add, a, 1)
    assert b.status == "waiting"
    assert b.result(timeout=10) == 21


def test_futures_inside_lists_tuples_and_dicts_are_resolved(idle_client):
    a, b = idle_client.submit(slow, 1, 0.1), idle_client.submit(slow, 2, 0.1)
    f = idle_client.submit(lambda xs, pair, d: (sum(xs), pair[1], d["k"][0]),
                           [a, b, 3], ("x", b), {"k": [a]})
    assert f.result(timeout=10) == (6, 2, 1)


def test_a_dependency_value_goes_from_worker_to_worker_not_through_the_client(idle_client):
    producer = idle_client.submit(produce, 21, os.getpid(), 0.2)
    consumer = idle_client.submit(consume, producer)
    assert consumer.result(timeout=10) == 42
    # And a future already done, whose result the client never decoded, too.
    done = idle_client.submit(produce, 5, os.getpid())
    shoal.wait([done], timeout=10)
    assert idle_client.submit(consume, done).result(timeout=10) == 10


def test_a_large_finished_result_travels_by_key_to_the_next_task(idle_client):
    big = idle_client.submit(np.ones, 1_000_000)  # 8 MB: kept by the broker
    assert big.result(timeout=20).nbytes == 8_000_000
    assert idle_client.submit(nbytes, big).result(timeout=20) == 8_000_000


def test_a_failed_dependency_fails_its_dependents_naming_it_and_its_error(idle_client):
    bad = idle_client.submit(fail, "no data")
    child = idle_client.submit(add, bad, 1)
    grandchild = idle_client.submit(add, child, 1)
    with pytest.raises(shoal.DependencyFailed) as info:
        child.result(timeout=10)
    error = info.value
    assert error.task == child.task_id and error.dependency == bad.task_id
    assert f"task {bad.task_id}" in str(error) and "raised ValueError: no data" in str(error)
    assert isinstance(error.__cause__, ValueError)
    with pytest.raises(shoal.DependencyFailed) as info:
        grandchild.result(timeout=10)
    assert info.value.root == bad.task_id
    assert f"did not run because task {bad.task_id} raised ValueError: no data" in str(info.value)
    assert child.status == "failed" and grandchild.status == "failed"


def test_a_task_taking_an_already_failed_future_fails_at_once_without_running(idle_client):
    bad = idle_client.submit(fail, "early")
    shoal.wait([bad], timeout=10)
    before = idle_client.status()["counts"]["submitted"]
    child = idle_client.submit(add, bad, 1)
    with pytest.raises(shoal.DependencyFailed, match="raised ValueError: early"):
        child.result(timeout=1)
    assert idle_client.status()["counts"]["submitted"] == before


def test_cancelling_a_dependency_fails_its_dependents(idle_client, tmp_path):
    gate = Gate(tmp_path / "gate")
    try:
        blockers = [idle_client.submit(hold, gate.path, gate.started_dir) for _ in range(2)]
        wait_until(lambda: gate.started() == 2, 20, message="the workers to be busy")
        queued = idle_client.submit(slow, 1)
        child = idle_client.submit(add, queued, 1)
        assert queued.cancel()
        with pytest.raises(shoal.DependencyFailed, match="was cancelled"):
            child.result(timeout=10)
    finally:
        gate.open()
    idle_client.gather(blockers, timeout=20)


def test_map_items_and_a_whole_map_can_be_taken_as_arguments(idle_client):
    res = idle_client.map(abs, range(-50, 50))
    assert idle_client.submit(total, res).result(timeout=20) == sum(abs(i) for i in range(-50, 50))
    first = res.futures[0]
    assert idle_client.submit(add, first, 1).result(timeout=20) == 51


def test_a_map_item_that_failed_fails_the_task_that_takes_it(idle_client):
    res = idle_client.map(lambda x: 1 / x, [1, 0, 2], batch_size=3)
    with pytest.raises(shoal.DependencyFailed, match="ZeroDivisionError"):
        idle_client.submit(total, res).result(timeout=20)


def test_a_future_of_another_client_is_refused_with_advice(idle_client, cluster):
    other = cluster.client()
    try:
        theirs = other.submit(slow, 1, 0.1)
        with pytest.raises(shoal.SerializationError, match="future of another client"):
            idle_client.submit(add, theirs, 1)
        theirs.result(timeout=10)
    finally:
        other.close()


def test_pickling_a_future_elsewhere_says_what_to_do():
    import pickle
    f = shoal.Future(1)
    with pytest.raises(TypeError, match=r"only be pickled as an argument of a task"):
        pickle.dumps(f)


# ----------------------------------------------------------------- chain, group, chord
def test_chain_passes_each_result_to_the_next_step(idle_client):
    f = shoal.chain(shoal.s(add, 2, 2), shoal.s(add, 4), shoal.s(add, 8)).submit()
    assert f.result(timeout=10) == 16
    assert (shoal.s(add, 1, 1) | shoal.s(add, 1))().result(timeout=10) == 3


def test_an_immutable_signature_ignores_the_previous_result(idle_client):
    f = shoal.chain(shoal.s(add, 1, 1), shoal.si(add, 100, 1)).submit()
    assert f.result(timeout=10) == 101


def test_group_runs_in_parallel_and_gives_results_in_order(idle_client):
    g = shoal.group(shoal.s(slow, i, 0.1) for i in range(6)).submit()
    assert isinstance(g, shoal.GroupResult) and len(g) == 6
    assert g.result(timeout=10) == list(range(6))
    assert g.done()


def test_chord_gives_the_callback_the_list_of_results(idle_client):
    header = shoal.group(shoal.s(add, i, i) for i in range(10))
    assert shoal.chord(header, shoal.s(total)).submit().result(timeout=10) == 90
    assert shoal.chord([shoal.s(add, i, 1) for i in range(3)])(shoal.s(total)).result(
        timeout=10) == 6  # Celery's chord(header)(callback)


def test_a_group_inside_a_chain_is_a_chord(idle_client):
    flow = shoal.s(add, 1, 1) | shoal.group(shoal.s(add, 10), shoal.s(add, 20)) | shoal.s(total)
    assert flow.submit().result(timeout=10) == (2 + 10) + (2 + 20)


def test_signature_options_reach_the_task(idle_client):
    f = shoal.s(fail, "x").set(retries=2, retry_backoff=0.01).submit()
    with pytest.raises(ValueError):
        f.result(timeout=10)
    assert shoal.s(add, 1, 2).set(priority=5).submit().result(timeout=10) == 3


# ----------------------------------------------------------------- ids and status
def test_any_client_fetches_a_result_by_task_id(idle_client, cluster):
    f = idle_client.submit(add, 20, 22)
    assert f.result(timeout=10) == 42
    other = cluster.client()
    try:
        assert other.result(f.task_id, timeout=10) == 42
        pending = idle_client.submit(slow, "later", 0.3)
        assert other.future(pending.task_id).result(timeout=10) == "later"
        failed = idle_client.submit(fail, "by id")
        with pytest.raises(ValueError, match="by id"):
            other.result(failed.task_id, timeout=10)
    finally:
        other.close()


def test_an_unknown_task_id_is_a_clear_error(idle_client):
    with pytest.raises(shoal.BrokerError, match="no task 0123456789abcdef-7 is known"):
        idle_client.result("0123456789abcdef-7", timeout=10)
    with pytest.raises(ValueError, match="is not a shoal task id"):
        idle_client.result("not-an-id")


def test_status_follows_a_task_from_queued_to_running_to_done(idle_client, tmp_path):
    gate = Gate(tmp_path / "gate")
    try:
        blockers = [idle_client.submit(hold, gate.path, gate.started_dir) for _ in range(2)]
        wait_until(lambda: gate.started() == 2, 20, message="the workers to be busy")
        assert blockers[0].status == "running"
        # Workers that ran quick tasks before take more ahead, until the broker sees
        # them held by something long (shoal.records.STALL_SECONDS).
        wait_until(lambda: not any(w["prefetch"] for w in idle_client.status()["worker_list"]),
                   10, message="the held workers to take nothing ahead")
        queued = idle_client.submit(os.getpid)
        assert queued.status == "queued"
    finally:
        gate.open()
    queued.result(timeout=10)
    assert queued.status == "done"
    idle_client.gather(blockers, timeout=10)


def test_apply_keeps_the_call_and_the_task_options_apart(idle_client):
    def takes(priority, queue="none"):
        return priority, queue

    assert idle_client.apply(takes, ("high",), {"queue": "mine"}, priority=3).result(10) == \
        ("high", "mine")
    sig = shoal.s(takes, "low", queue="theirs").set(priority=1)
    assert sig.submit().result(10) == ("low", "theirs")
