"""Errors that tell the user what went wrong and what to do: no broker, no workers,
unpicklable arguments, large payloads; and scatter, the fix those messages suggest."""
from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest
import zmq

import shoal

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- unreachable broker
@pytest.mark.timeout(10)
def test_client_to_an_address_without_broker_raises_broker_unreachable_within_timeout():
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(shoal.BrokerUnreachable, match="127.0.0.1") as info:
        shoal.Client(address, key=b"k" * 32, timeout=1)
    assert time.monotonic() - started < 3
    assert "shoal broker" in str(info.value) or "Cluster" in str(info.value)


def test_broker_unreachable_is_a_timeout_error():
    assert issubclass(shoal.BrokerUnreachable, TimeoutError)
    assert issubclass(shoal.BrokerUnreachable, shoal.ShoalError)


def test_client_to_a_missing_connection_file_says_what_is_missing(tmp_path):
    with pytest.raises((FileNotFoundError, shoal.BrokerUnreachable), match="connection file"):
        shoal.Client(str(tmp_path / "nowhere.json"), timeout=1)


@pytest.mark.timeout(10)
def test_client_to_a_silent_router_raises_broker_unreachable():
    # Something listens, but it is not a broker that knows our key.
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(shoal.BrokerUnreachable):
            shoal.Client(f"tcp://127.0.0.1:{port}", key=b"k" * 32, timeout=1)
    finally:
        router.close(linger=0)


# ----------------------------------------------------------------- no workers
@pytest.fixture(scope="module")
def empty_cluster():
    with shoal.Cluster(n_workers=0, timeout=30) as c:
        yield c


@pytest.mark.timeout(30)
def test_task_fails_with_no_workers_error_saying_what_to_check(empty_cluster):
    client = empty_cluster.client(worker_timeout=1)
    started = time.monotonic()
    fut = client.submit(pow, 2, 2)
    with pytest.raises(shoal.NoWorkersError) as info:
        fut.result(timeout=6)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "worker" in message and client.address in message
    assert "shoal worker" in message  # how to start one


@pytest.mark.timeout(10)
def test_no_workers_error_reaches_a_caller_blocked_without_timeout(empty_cluster):
    client = empty_cluster.client(worker_timeout=1)
    with pytest.raises(shoal.NoWorkersError):
        client.submit(pow, 2, 3).result()


@pytest.mark.timeout(30)
def test_map_fails_with_no_workers_error(empty_cluster):
    client = empty_cluster.client(worker_timeout=1)
    with pytest.raises(shoal.NoWorkersError):
        client.map(abs, range(5)).result(timeout=6)


def test_status_of_an_empty_cluster_shows_no_workers(empty_cluster):
    assert empty_cluster.status()["workers"] == 0


# ----------------------------------------------------------------- unpicklable arguments
def test_unpicklable_positional_argument_raises_at_submit_naming_position_and_type(client):
    def use(a, b):
        return a

    with pytest.raises(shoal.SerializationError) as info:
        client.submit(use, 1, threading.Lock())
    message = str(info.value)
    assert "argument 1" in message
    assert "lock" in message.lower()
    assert "use" in message


def test_unpicklable_keyword_argument_raises_at_submit_naming_the_keyword(client):
    def use(a, sock=None):
        return a

    with socket.socket() as sock:
        with pytest.raises(shoal.SerializationError) as info:
            client.submit(use, 1, sock=sock)
    message = str(info.value)
    assert "'sock'" in message
    assert "socket" in message


def test_serialization_error_is_a_type_error(client):
    with pytest.raises(TypeError):
        client.submit(print, threading.Lock())


def test_unpicklable_captured_variable_raises_at_submit_naming_the_variable(client):
    guard = threading.Lock()

    def locked_add(x):
        with guard:
            return x + 1

    with pytest.raises(shoal.SerializationError) as info:
        client.submit(locked_add, 1)
    message = str(info.value)
    assert "'guard'" in message
    assert "locked_add" in message
    assert "lock" in message.lower()


def test_map_of_a_function_with_an_unpicklable_capture_raises_at_once(client):
    guard = threading.Lock()

    def locked_inc(x):
        with guard:
            return x + 1

    with pytest.raises(shoal.SerializationError, match="guard"):
        client.map(locked_inc, range(3))


def test_submit_of_a_non_callable_raises_type_error(client):
    with pytest.raises(TypeError, match="callable"):
        client.submit(42)


def test_client_is_usable_after_a_serialization_error(client):
    with pytest.raises(shoal.SerializationError):
        client.submit(print, threading.Lock())
    assert client.submit(pow, 2, 4).result(timeout=30) == 16


# ----------------------------------------------------------------- large payloads and scatter
def test_large_payload_logs_a_warning_suggesting_scatter(client, caplog):
    data = np.zeros(2 * 2**20, dtype=np.uint8)  # 2 MiB
    with caplog.at_level(logging.WARNING, logger="shoal"):
        assert client.submit(lambda a: a.size, data).result(timeout=30) == data.size
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("client.scatter" in r.getMessage() for r in warnings)


def test_small_payload_logs_no_warning(client, caplog):
    with caplog.at_level(logging.WARNING, logger="shoal"):
        assert client.submit(len, b"x" * 1000).result(timeout=30) == 1000
    assert not [r for r in caplog.records if "scatter" in r.getMessage()]


def test_scattered_object_reaches_tasks_as_the_object(client):
    table = {"alpha": 1, "beta": 2}
    ref = client.scatter(table)
    assert isinstance(ref, shoal.Ref)
    assert client.submit(lambda t, k: t[k], ref, "beta").result(timeout=30) == 2
    assert client.submit(lambda t: sorted(t), ref).result(timeout=30) == ["alpha", "beta"]


def test_scattered_array_is_shared_by_many_tasks_without_a_warning(client, caplog):
    big = np.arange(2**20, dtype=np.float64)  # 8 MiB
    ref = client.scatter(big)
    with caplog.at_level(logging.WARNING, logger="shoal"):
        sums = client.gather([client.submit(lambda a, i: float(a[i]), ref, i)
                              for i in (0, 10, 2**20 - 1)], timeout=60)
    assert sums == [0.0, 10.0, float(2**20 - 1)]
    assert not [r for r in caplog.records if "scatter" in r.getMessage()]


def test_map_using_a_scattered_reference(client):
    ref = client.scatter(list(range(100)))
    out = client.map(lambda i, data: data[i] * 2, range(0, 100, 10), [ref] * 10)
    assert out.result(timeout=30) == [i * 2 for i in range(0, 100, 10)]


def test_scattered_reference_inside_a_structure_is_resolved(client):
    ref = client.scatter("shared text")
    assert client.submit(lambda d: d["x"][0].upper(), {"x": [ref]}).result(timeout=30) == \
        "SHARED TEXT"


def test_scatter_of_an_unpicklable_object_raises_serialization_error(client):
    with pytest.raises(shoal.SerializationError, match="lock"):
        client.scatter(threading.Lock())


def test_closed_client_refuses_new_work(cluster):
    c = cluster.client()
    c.close()
    c.close()  # twice is fine
    with pytest.raises(shoal.ClientClosed):
        c.submit(pow, 1, 1)
