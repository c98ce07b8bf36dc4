"""The broker: where it listens, its connection file, and how it survives bad peers."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest
import zmq

import shoal
from shoal import protocol
from shoal.protocol import BIG_FRAME, PROTOCOL_VERSION, Kind
from shoal.security import read_connection_file

from conftest import wait_until

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------- address and connection file
def test_broker_binds_loopback_on_a_free_port_by_default(cluster):
    assert cluster.address.startswith("tcp://127.0.0.1:")
    port = int(cluster.address.rsplit(":", 1)[1])
    assert 0 < port < 65536


def test_two_clusters_get_different_ports(cluster, fresh_cluster):
    assert fresh_cluster.address != cluster.address


def test_connection_file_is_private_json_with_address_key_and_version(cluster):
    mode = stat.S_IMODE(os.stat(cluster.connection_file).st_mode)
    assert mode == 0o600
    with open(cluster.connection_file) as fh:
        data = json.load(fh)
    assert data["address"] == cluster.address
    assert data["version"] == PROTOCOL_VERSION
    assert len(bytes.fromhex(data["key"])) >= 32


def test_client_from_connection_file_runs_tasks(cluster):
    with shoal.Client(cluster.connection_file, timeout=10) as c:
        assert c.submit(pow, 2, 10).result(timeout=30) == 1024


def test_client_from_address_and_key_file_runs_tasks(cluster):
    with shoal.Client(cluster.address, key_file=cluster.connection_file, timeout=10) as c:
        assert c.address == cluster.address
        assert c.submit(pow, 3, 3).result(timeout=30) == 27


def test_client_with_the_wrong_key_is_unreachable(cluster, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_text(os.urandom(32).hex())
    wrong.chmod(0o600)  # key files readable by others are refused before use
    with pytest.raises(shoal.BrokerUnreachable, match="key"):
        shoal.Client(cluster.address, key_file=str(wrong), timeout=1)


def test_get_client_returns_the_newest_client(cluster):
    with cluster.client() as newest:
        assert shoal.get_client() is newest


def test_get_client_falls_back_to_an_older_open_client_when_the_newest_closes(cluster):
    with cluster.client() as older:
        with cluster.client():
            pass
        assert shoal.get_client() is older


def test_status_reports_workers_and_counts(client):
    state = client.status()
    assert state["workers"] == 2
    assert state["address"] == client.address
    assert {"submitted", "done", "failed", "cancelled", "dropped"} <= set(state["counts"])


# ----------------------------------------------------------------- bad frames on the wire
@pytest.fixture
def raw_socket(cluster):
    """A raw DEALER socket connected to the shared broker, as an attacker would use."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(cluster.address)
    yield sock
    sock.close(linger=1000)


def dropped(client) -> int:
    return client.status()["counts"]["dropped"]


def _bad_messages(key: bytes) -> dict:
    good = protocol.encode(key, Kind.STATUS, {}, [b"payload"])
    wrong_key = os.urandom(32)
    return {
        "unsigned": [b"", *good[1:]],
        "forged": protocol.encode(wrong_key, Kind.SUBMIT, {"u": [[1, [], 1, {}]]}, [b"x"]),
        "forged-status": protocol.encode(wrong_key, Kind.STATUS),
        "truncated": good[:-1],
        "one-frame": good[:1],
        "garbage": [os.urandom(32), os.urandom(200), os.urandom(10)],
        "empty": [b""],
        "huge-garbage": [os.urandom(32), os.urandom(64), os.urandom(8 * BIG_FRAME)],
        "extra-frame": [*good, b"appended"],
        "flipped-header": [good[0], bytes([good[1][0] ^ 1]) + good[1][1:], *good[2:]],
    }


@pytest.mark.parametrize("name", list(_bad_messages(b"k" * 32)))
def test_broker_drops_bad_message_and_keeps_serving(name, cluster, client, raw_socket):
    message = _bad_messages(cluster.info.key)[name]
    before = dropped(client)
    raw_socket.send_multipart(message)
    wait_until(lambda: dropped(client) >= before + 1, 10, message="the broker to count the drop")
    assert client.submit(pow, 2, 5).result(timeout=30) == 32


def test_broker_survives_a_burst_of_every_bad_message(cluster, client, raw_socket):
    messages = list(_bad_messages(cluster.info.key).values()) * 20
    before = dropped(client)
    for message in messages:
        raw_socket.send_multipart(message)
    wait_until(lambda: dropped(client) >= before + len(messages), 20,
               message="the broker to count every drop")
    assert client.map(abs, range(-50, 0)).result(timeout=30) == list(range(50, 0, -1))


def test_broker_gives_no_answer_to_a_forged_message(cluster, raw_socket):
    raw_socket.send_multipart(protocol.encode(os.urandom(32), Kind.CLIENT_HELLO))
    # The real key gets an answer on the same socket; the forged hello never did.
    raw_socket.send_multipart(protocol.encode(cluster.info.key, Kind.CLIENT_HELLO))
    assert raw_socket.poll(10_000)
    reply = protocol.decode(cluster.info.key, raw_socket.recv_multipart())
    assert reply.kind == Kind.WELCOME
    assert not raw_socket.poll(200)


def test_broker_answers_another_protocol_version_with_a_clear_error(cluster, client, raw_socket,
                                                                    monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    message = protocol.encode(cluster.info.key, Kind.CLIENT_HELLO)
    monkeypatch.undo()
    raw_socket.send_multipart(message)
    assert raw_socket.poll(10_000), "the broker did not answer a peer of another version"
    frames = raw_socket.recv_multipart()
    reply = protocol.decode(cluster.info.key, frames)
    assert reply.kind == Kind.ERROR
    assert "version" in reply.header["msg"]
    assert client.submit(pow, 2, 2).result(timeout=30) == 4


# ----------------------------------------------------------------- signed but malformed
# A peer holding the key is trusted to run code, but a bug in it must not stop the
# broker serving everyone else.  Each case gets a cluster of its own, since a broker
# that dies would take the shared one down with it.
MALFORMED_SUBMITS = {
    "u-missing": {},
    "u-not-a-list": {"u": 5},
    "u-entry-too-short": {"u": [[1, 2]]},
    "u-entry-not-a-list": {"u": ["abcd"]},
    "refs-not-a-list": {"u": [[1, 5, 0, {}]]},
    "refs-unknown-object": {"u": [[1, [b"\x00" * 16], 0, {}]]},
    "count-not-an-int": {"u": [[1, [], "n", {}]]},
    "task-id-unhashable": {"u": [[[1], [], 0, {}]]},
    "objects-malformed": {"ob": 7, "u": []},
}


@pytest.fixture
def signed_socket(fresh_cluster):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(fresh_cluster.address)
    yield sock, read_connection_file(fresh_cluster.connection_file).key
    sock.close(linger=1000)


def _still_serving(cluster, sock, key) -> None:
    """The broker answers STATUS on the same socket, then runs a task for a new client."""
    sock.send_multipart(protocol.encode(key, Kind.STATUS))
    deadline = time.monotonic() + 10
    while True:
        assert cluster.broker.poll() is None, f"the broker died (exit code {cluster.broker.poll()})"
        assert time.monotonic() < deadline, "the broker stopped answering"
        if sock.poll(50):
            if protocol.decode(key, sock.recv_multipart()).kind == Kind.STATUS_REPLY:
                break
    with cluster.client(timeout=5) as c:
        assert c.submit(pow, 2, 8).result(timeout=20) == 256


@pytest.mark.parametrize("name", list(MALFORMED_SUBMITS))
def test_broker_survives_signed_malformed_submit(name, fresh_cluster, signed_socket):
    sock, key = signed_socket
    sock.send_multipart(protocol.encode(key, Kind.SUBMIT, MALFORMED_SUBMITS[name]))
    _still_serving(fresh_cluster, sock, key)


@pytest.mark.parametrize("meta", ["not-a-map", 5, [1, 2]], ids=["str", "int", "list"])
def test_broker_survives_signed_submit_whose_task_metadata_is_not_a_map(meta, fresh_cluster,
                                                                         signed_socket):
    sock, key = signed_socket
    fn = b"\x00" * 16  # a stored object, so the unit is queued and then dispatched
    sock.send_multipart(protocol.encode(
        key, Kind.SUBMIT, {"ob": [[fn, 1]], "u": [[1, [fn], 0, meta]]}, [b"not a pickle"]))
    _still_serving(fresh_cluster, sock, key)


def test_broker_survives_signed_message_with_unhashable_kind(fresh_cluster, signed_socket):
    sock, key = signed_socket
    sock.send_multipart(protocol.encode(key, ["sub"]))
    _still_serving(fresh_cluster, sock, key)


def test_broker_survives_signed_message_with_malformed_digest_map(fresh_cluster, signed_socket):
    sock, key = signed_socket
    sock.send_multipart(protocol.encode(key, Kind.STATUS, {"bd": 5}, [b"small frame"]))
    _still_serving(fresh_cluster, sock, key)


def test_broker_survives_signed_worker_hello_with_infinite_slots(fresh_cluster, signed_socket):
    sock, key = signed_socket
    sock.send_multipart(protocol.encode(key, Kind.WORKER_HELLO,
                                        {"slots": float("inf"), "name": "bad", "pid": 1}))
    _still_serving(fresh_cluster, sock, key)


def test_broker_survives_signed_worker_hello_with_no_slots(fresh_cluster, signed_socket):
    sock, key = signed_socket
    sock.send_multipart(protocol.encode(key, Kind.WORKER_HELLO, {"slots": 0, "name": "bad"}))
    _still_serving(fresh_cluster, sock, key)
    assert fresh_cluster.status()["workers"] == 2
