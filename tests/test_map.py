"""client.map: order, several iterables, generators, failures, futures, batching."""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import time

import pytest

import shoal

from conftest import Gate, hold, running_cluster, wait_for_gate, wait_until

pytestmark = pytest.mark.timeout(60)


def inc(x):
    return x + 1


def fail_on_five(x):
    if x == 5:
        raise KeyError(f"item {x}")
    return x


def where_and_what(x):
    return os.getpid(), x


def test_map_yields_results_in_input_order(client):
    def uneven(x):
        # Later items are quicker, so they finish first on the other worker.
        total = 0
        for i in range((20 - x) * 2000):
            total += i
        return x

    assert list(client.map(uneven, range(20), batch_size=1)) == list(range(20))


def test_map_result_returns_a_list_in_order(client):
    res = client.map(inc, range(1000))
    assert res.result(timeout=30) == list(range(1, 1001))


def test_map_zips_several_iterables_and_stops_at_the_shortest(client):
    res = client.map(pow, [2, 3, 4, 5], [3, 2, 1])
    assert res.result(timeout=30) == [8, 9, 4]


def test_map_consumes_a_generator_of_fifty_thousand_items(client):
    items = (i for i in range(50_000))
    res = client.map(inc, items)
    with pytest.raises(TypeError):
        len(res)
    out = res.result(timeout=60)
    assert len(out) == 50_000
    assert out[0] == 1 and out[-1] == 50_000 and out == list(range(1, 50_001))


def test_map_of_an_infinite_generator_can_be_consumed_partly(client):
    res = client.map(inc, itertools.count())
    first = list(itertools.islice(iter(res), 100))
    res.cancel()
    assert first == list(range(1, 101))


def test_map_raises_a_failing_items_error_when_reached_after_earlier_items(client):
    it = iter(client.map(fail_on_five, range(10), batch_size=3))
    got = [next(it) for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="item 5") as info:
        next(it)
    assert isinstance(info.value.__cause__, shoal.RemoteTraceback)
    assert "fail_on_five" in str(info.value.__cause__)


def test_map_result_raises_the_first_failure(client):
    with pytest.raises(KeyError):
        client.map(fail_on_five, range(10)).result(timeout=30)


def test_map_futures_give_one_future_per_item(client):
    res = client.map(fail_on_five, range(12), batch_size=4)
    futures = res.futures
    assert len(futures) == 12
    assert all(isinstance(f, cf.Future) for f in futures)
    done, not_done = cf.wait(futures, timeout=30)
    assert not not_done
    assert [f.result() for i, f in enumerate(futures) if i != 5] == \
        [i for i in range(12) if i != 5]
    with pytest.raises(KeyError):
        futures[5].result()


def test_map_batch_size_puts_that_many_items_on_each_worker_call(client):
    res = client.map(where_and_what, range(40), batch_size=10)
    out = res.result(timeout=30)
    assert [x for _, x in out] == list(range(40))
    # One batch runs on one worker: each run of 10 items shares a pid.
    for start in range(0, 40, 10):
        assert len({pid for pid, _ in out[start:start + 10]}) == 1


def test_map_batch_size_must_be_positive(client):
    with pytest.raises(ValueError):
        client.map(inc, range(3), batch_size=0)


def test_map_of_empty_input_is_empty(client):
    res = client.map(inc, [])
    assert list(res) == []
    assert res.result(timeout=10) == []
    assert len(res) == 0
    assert res.futures == []


def test_map_of_empty_generator_is_empty(client):
    assert client.map(inc, iter(())).result(timeout=10) == []


def test_map_len_is_the_shortest_input_length(client):
    res = client.map(pow, range(7), range(5))
    assert len(res) == 5
    assert res.result(timeout=30) == [i ** i for i in range(5)]


def test_map_with_timeout_raises_timeout_error_for_a_slow_item(idle_client, gate):
    res = idle_client.map(wait_for_gate, [gate.path], timeout=0.3)
    with pytest.raises(cf.TimeoutError):
        res.result()
    gate.open()
    assert isinstance(res.result(timeout=30)[0], int)


def test_map_of_a_failing_generator_raises_its_error(client):
    def items():
        yield 1
        yield 2
        raise RuntimeError("generator broke")

    res = client.map(inc, items(), batch_size=1)
    with pytest.raises(RuntimeError, match="generator broke"):
        res.result(timeout=30)


def test_map_of_an_unpicklable_item_names_the_item(client):
    import threading
    with pytest.raises(shoal.SerializationError, match="item 2"):
        client.map(inc, [1, 2, threading.Lock()], batch_size=1).result(timeout=30)


def test_map_over_a_scattered_reference(client):
    table = client.scatter({i: i * i for i in range(100)})
    res = client.map(lambda key, t: t[key], range(10), [table] * 10)
    assert res.result(timeout=30) == [i * i for i in range(10)]


def test_map_item_error_that_cannot_be_unpickled_spoils_only_that_item(client):
    class TwoArgs(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}-{b}")

    def picky(x):
        if x == 2:
            raise TwoArgs("a", "b")
        return x

    it = iter(client.map(picky, range(4), batch_size=4))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(Exception):
        next(it)


def fifty_kb(x):
    return bytes([x % 256]) * 50_000


def test_map_batches_of_large_results_are_bounded_by_bytes_too(client):
    from shoal.mapping import TARGET_BATCH_BYTES
    res = client.map(fifty_kb, range(1000))
    assert [v[0] for v in res] == [x % 256 for x in range(1000)]
    # By time alone a batch would be hundreds of items (~25 MB): the measured result
    # size bounds it, from the first (one-item) batch on.
    largest = max(b.count for b in res.batches)
    assert largest * 50_000 <= TARGET_BATCH_BYTES, [b.count for b in res.batches]
    assert len(res.batches) >= 1000 * 50_000 // TARGET_BATCH_BYTES


def test_map_batches_of_large_inputs_are_bounded_by_bytes_too(client):
    from shoal.mapping import TARGET_BATCH_BYTES
    res = client.map(len, (b"x" * 50_000 for _ in range(1000)))
    assert list(res) == [50_000] * 1000
    assert max(b.count for b in res.batches) * 50_000 <= TARGET_BATCH_BYTES


def triple(x):
    return 3 * x


def test_a_map_of_a_function_mapped_before_starts_from_its_measures_without_a_probe(cluster):
    with cluster.client() as client:
        first = client.map(triple, range(4000))
        assert first.result(timeout=30) == [3 * x for x in range(4000)]
        assert first.batches[0].count == 1  # a probe: nothing was known of triple
        again = client.map(triple, range(4000))
        assert again.result(timeout=30) == [3 * x for x in range(4000)]
        assert again.batches[0].count > 1  # sized from what the first map measured
        # A fixed batch size is kept as given, and another function is probed afresh.
        fixed, other = client.map(triple, range(100), batch_size=7), client.map(inc, range(100))
        assert fixed.result(timeout=30)[-1] == 297 and other.result(timeout=30)[-1] == 100
        assert fixed.batches[0].count == 7
        assert other.batches[0].count == 1


# ----------------------------------------------------------------- a batch ahead
def held_item(x, gate_path: str, started_dir: str):
    hold(gate_path, started_dir)
    return x


@pytest.mark.timeout(90)
def test_a_worker_busy_with_a_map_batch_gets_the_next_ahead_and_cancelling_withdraws_it(
        tmp_path):
    gate = Gate(tmp_path / "gate")
    with running_cluster(n_workers=1) as cluster:
        client = cluster.client()
        # ~20 ms units: too long for the time-based prefetch, short enough for a batch ahead.
        client.map(time.sleep, [0.02] * 5, batch_size=1).result(timeout=30)
        try:
            res = client.map(held_item, range(6), [gate.path] * 6, [gate.started_dir] * 6,
                             batch_size=1)
            wait_until(lambda: gate.started() == 1, 20, message="the first batch to start")
            wait_until(lambda: client.status()["worker_list"][0]["running"] == 2, 20,
                       message="the worker to hold the next batch ahead")
            state = client.status()
            assert state["worker_list"][0]["running"] == 2 and state["queued"] >= 1
            # A lone task is never sent ahead: it waits at the broker, where a cancel
            # withdraws it at once (the worker is busy).
            lone = client.submit(abs, -1, priority=5)
            assert lone.cancel() and lone.cancelled()
            res.cancel()  # the running batch is interrupted, the one ahead withdrawn
            wait_until(lambda: all(f.done() for f in res.futures), 20,
                       message="every batch of the cancelled map to settle")
            assert all(f.cancelled() for f in res.futures)
        finally:
            gate.open()
        assert client.submit(abs, -3).result(timeout=20) == 3
        assert gate.started() == 1  # the batch ahead never ran


def pause_a_millisecond(x):
    time.sleep(0.001)
    return x


def test_a_long_map_grows_its_batches_and_keeps_each_to_half_a_slots_share(client):
    client.map(pause_a_millisecond, range(100)).result(timeout=30)  # measured: ~1 ms an item
    res = client.map(pause_a_millisecond, range(2400))
    assert res.result(timeout=60) == list(range(2400))
    counts = [batch.count for batch in res._batches]
    assert max(counts) > 60  # past the ~50 ms target: fewer gaps between batches
    # None more than half a slot's share of what was left (or the ~5 ms floor), so the
    # batches shrink towards the end and the last ones balance the slots.
    left = 2400
    for count in counts:
        assert count <= max(-(-left // (2 * client.slots)), 5), (count, left, counts)
        left -= count
    # ... and few of them, halving each round near the end: 22 here on 2 slots (each a
    # twelfth of what was left, as before, made 38).
    assert len(counts) <= 14 * client.slots, counts
    assert counts[-1] < max(counts)  # and smaller again at the end
