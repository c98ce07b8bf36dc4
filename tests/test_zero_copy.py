"""Large buffers: NumPy arrays and bytes travel out of band; shared memory is cleaned up."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from conftest import cluster_pids, running_cluster, shm_segments_of, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def big_array():
    rng = np.random.default_rng(1)
    return rng.integers(0, 2**31, size=100 * 2**20 // 8, dtype=np.int64)  # 100 MB


@pytest.fixture
def no_segments_left(cluster):
    """After the test, no segment created by this process or the cluster's remains."""
    yield
    gc.collect()
    pids = cluster_pids(cluster) | {os.getpid()}
    wait_until(lambda: not shm_segments_of(pids), 10, message="shared-memory segments to go")


def buffer_owner(array) -> str:
    """What holds a task's array argument: an mmap (shared memory) or a zmq frame."""
    view = array.base
    while getattr(view, "base", None) is not None:
        view = view.base
    return type(view.obj).__name__ if isinstance(view, memoryview) else type(view).__name__


def test_a_new_clusters_first_client_sends_large_arrays_through_shared_memory(monkeypatch):
    # (It connects while the workers start: the broker tells it where they run as
    # they join, not at its next heartbeat.)
    from shoal import clientio
    monkeypatch.setattr(clientio, "HEARTBEAT_SECONDS", 120.0)
    with running_cluster(n_workers=1) as cluster:
        client = cluster.client()
        assert client.submit(buffer_owner, np.ones(1 << 20)).result(timeout=30) == "mmap"


def test_hundred_megabyte_array_round_trips_unchanged(client, big_array, no_segments_left):
    out = client.submit(lambda x: x, big_array).result(timeout=60)
    assert out.dtype == big_array.dtype and out.shape == big_array.shape
    assert np.array_equal(out, big_array)
    del out


def test_array_computed_on_a_worker_comes_back(client, no_segments_left):
    arr = np.arange(20 * 2**20 // 8, dtype=np.float64)  # 20 MB
    out = client.submit(lambda x: x + 1, arr).result(timeout=60)
    assert np.array_equal(out, arr + 1)
    assert out is not arr
    del out


def test_returned_array_is_independent_of_the_argument(client, no_segments_left):
    arr = np.zeros(4 * 2**20, dtype=np.uint8)
    out = client.submit(lambda x: x, arr).result(timeout=60)
    arr[:] = 7  # the caller changes its array after the call
    assert not out.any()
    del out


def test_result_survives_the_next_tasks(client, no_segments_left):
    first = client.submit(lambda n: np.full(n, 3, dtype=np.int32), 2**20).result(timeout=60)
    for _ in range(3):
        client.submit(lambda n: np.full(n, 9, dtype=np.int32), 2**20).result(timeout=60)
    assert (first == 3).all() and first.size == 2**20
    del first


def test_large_bytes_payload_round_trips(client, no_segments_left):
    payload = os.urandom(8 * 2**20)
    out = client.submit(lambda b: b[::-1], payload).result(timeout=60)
    assert out == payload[::-1]


def test_bytes_just_under_and_over_the_out_of_band_threshold(client, no_segments_left):
    from shoal.serialize import OOB_MIN, SHM_MIN
    for size in (OOB_MIN - 1, OOB_MIN, SHM_MIN - 1, SHM_MIN, SHM_MIN + 1):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert client.submit(lambda b: (len(b), b[-3:]), data).result(timeout=60) == \
            (size, data[-3:]), size


def test_array_inside_a_structure_round_trips(client, no_segments_left):
    arrays = {"a": np.ones(2**18), "b": [np.arange(2**19), np.zeros(10)]}
    out = client.submit(lambda d: d, arrays).result(timeout=60)
    assert np.array_equal(out["a"], arrays["a"])
    assert np.array_equal(out["b"][0], arrays["b"][0])
    assert np.array_equal(out["b"][1], arrays["b"][1])


def test_map_over_large_arrays(client, no_segments_left):
    chunks = [np.full(2**18, i, dtype=np.float64) for i in range(6)]  # 2 MB each
    sums = client.map(lambda a: float(a.sum()), chunks).result(timeout=60)
    assert sums == [float(i * 2**18) for i in range(6)]


def test_unread_large_result_leaves_no_segment_after_its_future_is_dropped(fresh_cluster):
    cluster, client = fresh_cluster, fresh_cluster.client()
    arr = np.ones(2**20)  # 8 MB argument: the result comes back through shared memory too
    fut = client.submit(lambda x: x * 2, arr)
    fut.exception(timeout=60)  # finished, but its value is never read
    del fut
    gc.collect()
    pids = cluster_pids(cluster) | {os.getpid()}
    wait_until(lambda: not shm_segments_of(pids), 5, message="shared-memory segments to go")
