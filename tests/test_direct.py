"""The direct path (shoal.direct): a lone task from a local client goes straight
to an idle worker and its result straight back, while the broker records
everything as if it had routed it: counts, results kept by id, dependents,
cancels, and the task run again when its worker dies or is busy."""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import zmq

from conftest import Gate, hold, running_cluster, wait_until
from shoal import direct, protocol
from shoal.direct import DIRECT_BIT
from shoal.protocol import Kind

pytestmark = pytest.mark.timeout(120)


def inc(x: int) -> int:
    return x + 1


def pid_and(x):
    return os.getpid(), x


def direct_sent(client) -> int:
    return client._direct.sent


def offered_worker(client) -> str:
    """The worker this client hands its lone tasks to."""
    wait_until(lambda: client._direct.offered, 10, message="the broker to offer direct workers")
    name, _ = client._direct.offered[client._direct._salt % len(client._direct.offered)]
    return name


def test_a_lone_task_goes_straight_to_a_worker_and_the_broker_still_counts_it(cluster):
    with cluster.client() as client:
        before = client.status()["counts"]["done"]
        sent = direct_sent(client)
        assert [client.submit(inc, i).result(timeout=10) for i in range(20)] == list(range(1, 21))
        assert direct_sent(client) - sent == 20
        wait_until(lambda: client.status()["counts"]["done"] - before >= 20, 10,
                   message="the broker to count the direct tasks done")
        status = client.status()
        assert status["running"] == 0 and status["queued"] == 0


def test_a_client_learns_of_a_direct_worker_when_it_joins(monkeypatch):
    # (Not at the client's next heartbeat: a cluster's first client connects while
    # its workers start.)
    from shoal import clientio
    monkeypatch.setattr(clientio, "HEARTBEAT_SECONDS", 120.0)
    with running_cluster(n_workers=0) as cluster:
        client = cluster.client()
        assert not client._direct.offered
        cluster.scale(1)
        client.status()  # (told before this reply, on the same socket)
        assert client._direct.offered
        sent = direct_sent(client)
        assert client.submit(inc, 1).result(timeout=10) == 2
        assert direct_sent(client) - sent == 1


def test_the_broker_is_told_of_a_direct_task_soon_without_more_traffic(cluster):
    # Client and worker hold the broker's copies a moment, to send them in batches
    # (NOTICE_SECONDS); they must still leave when nothing else follows.
    with cluster.client() as client, cluster.client() as observer:
        before = observer.status()["counts"]
        sent = direct_sent(client)
        assert client.submit(inc, 41).result(timeout=10) == 42
        assert direct_sent(client) - sent == 1
        t0 = time.monotonic()
        wait_until(lambda: observer.status()["counts"]["submitted"] > before["submitted"]
                   and observer.status()["counts"]["done"] > before["done"], 5,
                   message="the broker to hear of the direct task from client and worker")
        assert time.monotonic() - t0 < 2.0


def test_a_clients_own_requests_see_its_direct_tasks_done_at_once(cluster):
    # The client tells the broker of its direct tasks before its next request, with
    # the outcomes it already has: no waiting for the worker's copy.
    with cluster.client() as client:
        for i in range(3):
            before = client.status()["counts"]
            assert client.submit(inc, i).result(timeout=10) == i + 1
            status = client.status()
            assert status["counts"]["submitted"] == before["submitted"] + 1
            assert status["counts"]["done"] == before["done"] + 1
            assert status["running"] == 0
        failing = client.submit(divmod, 1, 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=10)
        assert client.future(failing.task_id).exception(timeout=10).__class__ is ZeroDivisionError


def test_a_direct_tasks_result_is_kept_by_id_and_feeds_a_dependent_task(cluster):
    with cluster.client() as client:
        sent = direct_sent(client)
        first = client.submit(inc, 1)
        assert first.result(timeout=10) == 2
        assert direct_sent(client) - sent == 1
        assert client.result(first.task_id, timeout=10) == 2  # the broker kept it
        with cluster.client() as other:  # also for another client
            assert other.result(first.task_id, timeout=10) == 2
        # A task that takes a direct task's future gets its value.
        lone = client.submit(inc, 10)
        assert client.submit(inc, lone).result(timeout=10) == 12


def test_a_direct_tasks_value_does_not_wait_behind_its_workers_next_task(cluster, tmp_path):
    # The client's copy brings the broker the value: a task that takes it, or a
    # request for it by id, need not wait for the worker, busy with its next task.
    gate = Gate(tmp_path / "gate")
    with cluster.client() as client, cluster.client() as other:
        sent = direct_sent(client)
        first = client.submit(inc, 1)
        assert first.result(timeout=10) == 2
        busy = client.submit(hold, gate.path, gate.started_dir)  # the same worker
        try:
            wait_until(lambda: gate.started() == 1, 10, message="the held task to start")
            assert direct_sent(client) - sent == 2
            # Both run on the other worker, or are answered, while the gate is shut.
            assert client.submit(inc, first).result(timeout=10) == 3
            assert other.result(first.task_id, timeout=10) == 2
            assert not busy.done()
        finally:
            gate.open()
        assert busy.result(timeout=10) > 0


def test_exceptions_output_and_keywords_travel_the_direct_path(cluster):
    def shout(x, *, suffix):
        print("hello from", x)
        if x < 0:
            raise ValueError(f"negative {x}{suffix}")
        return f"{x}{suffix}"

    with cluster.client() as client:
        sent = direct_sent(client)
        ok = client.submit(shout, 3, suffix="!")
        assert ok.result(timeout=10) == "3!"
        assert ok.stdout == "hello from 3\n"
        with pytest.raises(ValueError, match="negative -1!") as failed:
            client.submit(shout, -1, suffix="!").result(timeout=10)
        assert "in shout" in str(failed.value.__cause__)  # the remote traceback
        assert direct_sent(client) - sent == 2


def test_tasks_submitted_in_a_burst_go_through_the_broker(cluster):
    with cluster.client() as client:
        client.submit(inc, 0).result(timeout=10)
        sent = direct_sent(client)
        futures = [client.submit(inc, i) for i in range(300)]
        assert client.gather(futures, timeout=30) == list(range(1, 301))
        # At most the first of them, alone in flight when it was sent, went direct.
        assert direct_sent(client) - sent <= 1


def test_a_small_map_goes_in_one_batch_straight_to_a_worker(cluster):
    with cluster.client() as client:
        offered = offered_worker(client)
        for _ in range(3):  # measures (the first, a one-item probe, may be slow: cold)
            assert client.map(inc, range(100)).result(timeout=10) == list(range(1, 101))
        before = client.status()["counts"]["done"]
        sent = direct_sent(client)
        res = client.map(inc, range(10))
        assert res.result(timeout=10) == list(range(1, 11))
        assert len(res.batches) == 1 and direct_sent(client) - sent == 1
        assert res.worker_counts() == {offered: 10}
        wait_until(lambda: client.status()["counts"]["done"] - before >= 1, 10,
                   message="the broker to count the direct batch done")
        # Enough work to be worth spreading goes in several batches (which the broker
        # deals out, but for a first one that may leave alone).
        big = client.map(inc, range(20_000))
        assert big.result(timeout=30)[-1] == 20_000 and len(big.batches) > 1


def test_a_busy_worker_bounces_a_direct_task_which_then_runs_on_another(tmp_path):
    gate = Gate(tmp_path / "gate")
    with running_cluster(n_workers=2) as cluster, cluster.client() as client, \
            cluster.client() as other:
        target = offered_worker(client)
        held = other.submit_to(target, hold, gate.path, gate.started_dir)
        wait_until(lambda: gate.started() == 1, 20, message="the holding task to start")
        busy_pid = {w["name"]: w["pid"] for w in client.status()["worker_list"]}[target]
        sent = direct_sent(client)
        t0 = time.monotonic()
        pid, value = client.submit(pid_and, 7).result(timeout=10)
        assert direct_sent(client) - sent == 1
        assert value == 7 and pid != busy_pid  # not queued behind the held task
        assert time.monotonic() - t0 < 5
        gate.open()
        assert held.result(timeout=20) == busy_pid


def _held_task(client, gate):
    future = client.submit(hold, gate.path, gate.started_dir)
    return lambda: future.result(timeout=30)


def _held_map(client, gate):
    res = client.map(hold, [gate.path], [gate.started_dir])  # one item: one batch
    return lambda: res.result(timeout=30)[0]


@pytest.mark.parametrize("start", [_held_task, _held_map], ids=["task", "map batch"])
def test_a_direct_unit_whose_worker_is_killed_runs_again_on_another(start, tmp_path):
    gate = Gate(tmp_path / "gate")
    with running_cluster(n_workers=2) as cluster, cluster.client() as client:
        offered_worker(client)
        sent = direct_sent(client)
        pid_of_the_run = start(client, gate)
        wait_until(lambda: gate.started() == 1, 20, message="the task to start")
        assert direct_sent(client) - sent == 1
        victim = int(os.listdir(gate.started_dir)[0].split("-")[0])
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: gate.started() == 2, 30, message="the task to start again")
        gate.open()
        assert pid_of_the_run() != victim


def test_cancelling_a_running_direct_task_stops_it(tmp_path):
    gate = Gate(tmp_path / "gate")
    with running_cluster(n_workers=2) as cluster, cluster.client() as client:
        offered_worker(client)
        future = client.submit(hold, gate.path, gate.started_dir)
        wait_until(lambda: gate.started() == 1, 20, message="the task to start")
        assert future.cancel()
        assert future.cancelled()
        assert client.submit(inc, 1).result(timeout=10) == 2
        wait_until(lambda: client.status()["counts"]["cancelled"] == 1, 10,
                   message="the broker to count the cancel")


def test_a_direct_result_reaches_a_client_that_waits_on_callbacks_not_result(cluster):
    """Nobody blocks in result(), so the client's IO thread reads the direct link."""
    import threading
    with cluster.client() as client:
        client.submit(inc, 0).result(timeout=10)
        for i in range(5):
            sent = direct_sent(client)
            future = client.submit(inc, i)
            done = threading.Event()
            future.add_done_callback(lambda _: done.set())
            assert done.wait(10), f"task {i}: no result through the IO thread"
            assert direct_sent(client) == sent + 1 and future.result() == i + 1


def test_bad_frames_on_a_workers_direct_endpoint_are_dropped_and_it_serves_on(cluster):
    with cluster.client() as client:
        client.submit(inc, 0).result(timeout=10)
        endpoints = [endpoint for _, endpoint in client._direct.offered]
        assert endpoints, "the broker offers no direct worker"
        assert all(endpoint.startswith(direct.SCHEME) for endpoint in endpoints)
        key = client._key
        for endpoint in endpoints:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(endpoint[len(direct.SCHEME):])
                # Records whose framing does not add up.
                for raw in (b"\x05", b"\x01\x00\x00\x00\x09abc", b"\x02" + b"\xff" * 8):
                    sock.send(raw)
                session = protocol.Session()
                bad = [
                    [b"garbage"],
                    [b"\0" * 32, b"not a header", b"x"],
                    protocol.encode(b"another key" * 3, Kind.TASKS, {"u": []}),
                    # Signed, but not a task, or a unit id the broker would hand out itself.
                    protocol.encode(key, Kind.SHUTDOWN, session=session),
                    protocol.encode(key, Kind.TASKS, {"u": [[5, [b"d" * 16], 0, {}]]},
                                    session=session),
                    protocol.encode(key, Kind.TASKS, {"u": "nonsense"}, session=session),
                    protocol.encode(key, Kind.TASKS, {"u": [[DIRECT_BIT + 1, [b"d" * 16], 3, {}]]},
                                    session=session),
                ]
                for frames in bad:
                    assert direct.send_record(sock, frames)
            finally:
                sock.close()
        sent = direct_sent(client)
        assert [client.submit(inc, i).result(timeout=10) for i in range(5)] == [1, 2, 3, 4, 5]
        assert direct_sent(client) - sent == 5
        assert len(client.status()["worker_list"]) == 2


def test_a_message_too_large_for_a_direct_record_takes_the_brokers_path(cluster):
    big = os.urandom(3 * direct.MAX_RECORD)

    def uses_big(x):  # a function whose pickle is larger than a direct record
        return len(big) + x

    with cluster.client() as client:
        client.submit(inc, 0).result(timeout=10)
        sent = direct_sent(client)
        assert client.submit(uses_big, 1).result(timeout=20) == len(big) + 1
        assert direct_sent(client) == sent  # it went through the broker
        assert client.submit(inc, 1).result(timeout=10) == 2
        assert direct_sent(client) == sent + 1  # and the next small one went direct


def test_a_client_of_a_curve_secured_broker_is_offered_no_direct_path(tmp_path):
    from shoal.broker import Broker
    broker = Broker(home=tmp_path / "home")
    record = broker._client(b"c" * 5)
    try:
        assert broker._direct_offer(record) == {}
    finally:
        broker._shutdown()


MALFORMED_DIRECT_SUBMITS = {
    "worker-name-not-a-string": {"dw": 5},
    "id-base-not-an-int": {"dw": "w", "db": "nope"},
    "id-base-too-large": {"dw": "w", "db": 1 << 40},
    "outcomes-not-a-list": {"dw": "w", "db": 1, "do": "nonsense"},
    "outcome-too-short": {"dw": "w", "db": 1, "do": [[1, "ok"]]},
    "task-number-beyond-direct-ids": {"dw": "w", "db": 1,
                                      "u": [[1 << 40, [b"d" * 16], 0, {}]]},
}


def test_malformed_direct_submissions_are_refused_by_name_and_the_broker_serves_on(cluster):
    from shoal.security import read_connection_file
    key = read_connection_file(cluster.connection_file).key
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.address)
    session = protocol.Session()

    def ask(kind, fields=None):
        sock.send_multipart(protocol.encode(key, kind, fields, session=session))
        assert sock.poll(10_000), f"no answer to {kind}"
        return protocol.decode(key, sock.recv_multipart())

    try:
        broker_session = ask(Kind.CLIENT_HELLO, {"cid": b"c" * 8}).header["session"]
        for name, fields in MALFORMED_DIRECT_SUBMITS.items():
            fields = {"u": [], "cid": b"c" * 8, "bs": broker_session, **fields}
            answer = ask(Kind.SUBMIT, fields)
            assert answer.kind == Kind.ERROR and "malformed" in answer.header["msg"], name
    finally:
        sock.close()
    with cluster.client() as client:
        sent = direct_sent(client)
        assert client.submit(inc, 1).result(timeout=10) == 2
        assert direct_sent(client) - sent == 1
