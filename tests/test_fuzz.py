"""Fuzzing the broker and a worker with random and mutated multipart messages.

Property-based (hypothesis) against real processes:

* the broker, over a raw DEALER: random frames, mutations of real signed
  messages (flipped bytes, truncated, dropped, duplicated, reordered and
  appended frames), random msgpack headers signed with the right key, and
  huge frame counts;
* a worker, through a fake broker (a ROUTER this test binds; a real
  ``shoal.worker`` process connects to it): the same mutations of TASKS and
  CANCEL messages, and signed TASKS whose payloads are not pickles or are
  pickles of harmless objects.

After each input the test asks the process something on the same connection
and waits for the answer, so every input has been handled before the next
(no sleeping).  Forged messages carry a pickle that would create a marker
file if it were ever unpickled; the marker must never appear.  The number of
inputs tried is printed (run with ``-s``) and summed at the end of the module.
"""
from __future__ import annotations

import itertools
import os
import pickle
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import protocol, serialize
from shoal.errors import TransferError
from shoal.protocol import BIG_FRAME, Kind
from shoal.transport import bundle, recv_frames

from conftest import wait_until
from test_security import (BrokerProcess, RawPeer, spawn, start_worker, stop_process,
                           submit_fields)

pytestmark = pytest.mark.timeout(120)

#: Inputs tried, by test; printed per test and summed at the end of the module.
TRIED: Counter = Counter()
REFUSED: Counter = Counter()

FUZZ = dict(deadline=None, database=None, derandomize=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    lines = [f"  {name}: {n} inputs, {REFUSED[name]} refused" for name, n in sorted(TRIED.items())]
    print(f"\nfuzz inputs tried: {sum(TRIED.values())} "
          f"(refused as forged or malformed: {sum(REFUSED.values())})\n" + "\n".join(lines))


# ----------------------------------------------------------------- the forged pickle
class _Touch:
    """Pickles to a call of ``Path(path).touch()``: unpickling it creates the file.

    The pickle names only ``pathlib``, so it would work in any process that loads it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __reduce__(self):
        return self.path.touch, ()


@pytest.fixture(scope="module")
def markers():
    """A directory where unpickling a forged payload would leave a file."""
    path = Path(tempfile.mkdtemp(prefix="shoal-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def forged_payload(markers: Path) -> bytes:
    return pickle.dumps(_Touch(markers / f"executed-{time.monotonic_ns()}"), protocol=5)


def assert_nothing_executed(markers: Path) -> None:
    leftovers = sorted(p.name for p in markers.iterdir())
    assert not leftovers, f"a forged payload was unpickled: {leftovers}"


# ----------------------------------------------------------------- strategies
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1),
                    st.floats(), st.text(max_size=12), st.binary(max_size=24))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=4),
                                                      st.integers(-3, 3)), inner, max_size=4)),
    max_leaves=10)
small_frames = st.lists(st.binary(max_size=200), min_size=1, max_size=10)
random_multipart = st.one_of(
    small_frames,
    st.builds(lambda sig, rest: [sig, *rest], st.binary(min_size=32, max_size=32), small_frames))

#: Mutations of a signed message, moving bytes across the boundary of two frames
#: included (the signature covers where each frame begins and ends).
mutation = st.one_of(
    st.tuples(st.just("move"), st.integers(0, 30), st.integers(-64, 64)),
    st.tuples(st.just("flip"), st.integers(0, 30), st.integers(0, 10 ** 6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 30), st.integers(0, 10 ** 6)),
    st.tuples(st.just("drop"), st.integers(0, 30)),
    st.tuples(st.just("duplicate"), st.integers(0, 30)),
    st.tuples(st.just("swap"), st.integers(0, 30), st.integers(0, 30)),
    st.tuples(st.just("append"), st.binary(max_size=64)),
    st.tuples(st.just("insert"), st.integers(0, 30), st.binary(max_size=64)),
    st.tuples(st.just("reverse")),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


def mutate(frames: list, ops: list) -> list:
    frames = [bytes(f) for f in frames]
    for op in ops:
        name, args = op[0], op[1:]
        if name == "flip" and frames:
            i = args[0] % len(frames)
            if frames[i]:
                b = bytearray(frames[i])
                b[args[1] % len(b)] ^= args[2]
                frames[i] = bytes(b)
        elif name == "truncate" and frames:
            i = args[0] % len(frames)
            frames[i] = frames[i][:args[1] % (len(frames[i]) + 1)]
        elif name == "drop" and len(frames) > 1:
            frames.pop(args[0] % len(frames))
        elif name == "duplicate" and frames:
            i = args[0] % len(frames)
            frames.insert(i, frames[i])
        elif name == "swap" and frames:
            i, j = args[0] % len(frames), args[1] % len(frames)
            frames[i], frames[j] = frames[j], frames[i]
        elif name == "append":
            frames.append(args[0])
        elif name == "insert":
            frames.insert(args[0] % (len(frames) + 1), args[1])
        elif name == "reverse":
            frames.reverse()
        elif name == "move" and len(frames) > 1:
            # Shift the boundary between frames i and i+1 by ``shift`` bytes.
            i = args[0] % (len(frames) - 1)
            joined = frames[i] + frames[i + 1]
            cut = min(max(len(frames[i]) + args[1], 0), len(joined))
            frames[i], frames[i + 1] = joined[:cut], joined[cut:]
    return frames


# ================================================================= the broker
@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory):
    """A broker (at most 2,000 frames and 8 MB a message) with one worker."""
    directory = tmp_path_factory.mktemp("fuzz-broker")
    broker = BrokerProcess(directory, "--max-frames", "2000", "--max-message-size",
                           str(8 << 20), "--log-level", "ERROR")
    worker = start_worker(directory, broker.connection_file, "fuzz-1")
    try:
        with broker.client() as client:
            client.wait_for_workers(1, 30)
        yield broker
    finally:
        stop_process(worker)
        broker.stop()


@pytest.fixture
def peer(fuzz_broker):
    p = RawPeer(fuzz_broker.address, fuzz_broker.info.key)
    p.hello()
    yield p
    p.close()


def _serves(broker: BrokerProcess) -> None:
    """The broker is alive and a new client's task runs once fake workers are gone."""
    assert broker.proc.poll() is None, f"the broker died: {broker.log_text()[-2000:]}"
    with broker.client(timeout=10) as client:
        wait_until(lambda: [w["name"] for w in client.status()["worker_list"]] == ["fuzz-1"],
                   20, 0.05, "fake workers registered by fuzzed hellos to time out")
        assert client.submit(pow, 2, 11).result(timeout=30) == 2048


def _refused_by_broker(peer: RawPeer, frames: list, name: str) -> None:
    before, _ = peer.status()
    peer.send(frames)
    after, others = peer.status()
    TRIED[name] += 1
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1, frames[:3]
    assert after["counts"]["submitted"] == before["counts"]["submitted"]
    assert not others, f"the broker answered a forged message: {others}"
    REFUSED[name] += 1


def test_broker_refuses_random_multipart_messages(fuzz_broker, peer, markers):
    @settings(max_examples=1000, **FUZZ)
    @given(frames=random_multipart)
    def check(frames):
        _refused_by_broker(peer, frames, "broker: random frames")

    check()
    print(f"\nbroker: {TRIED['broker: random frames']} random multipart messages refused")
    _serves(fuzz_broker)


def _signed_samples(peer: RawPeer, markers: Path) -> list:
    """Real signed messages of each kind a client or worker sends; the SUBMIT, SCATTER and
    RESULTS carry the forged pickle, so running any of them would leave a marker."""
    touch = forged_payload(markers)
    fields, frames = submit_fields(abs, (-3,), 99, peer.bs)
    fields["ob"] = [[b"\x01" * 16, 1]]
    fields["u"][0][1] = [b"\x01" * 16]
    session = protocol.Session()
    key = peer.key
    return [
        protocol.encode(key, Kind.SUBMIT, fields, [touch, touch], session=session),
        protocol.encode(key, Kind.SCATTER, {"bs": peer.bs, "ob": [[b"\x02" * 16, 2]]},
                        [touch, b"buffer"], session=session),
        protocol.encode(key, Kind.CANCEL, {"bs": peer.bs, "t": [1, 2], "rq": 1},
                        session=session),
        protocol.encode(key, Kind.CLIENT_HELLO, session=session),
        protocol.encode(key, Kind.HEARTBEAT, session=session),
        protocol.encode(key, Kind.WORKER_HELLO, {"name": "mut", "slots": 1, "pid": 1},
                        session=session),
        protocol.encode(key, Kind.RESULTS, {"r": [[1, "ok", 1, {}]]}, [touch],
                        session=session),
        protocol.encode(key, Kind.STATUS, {}, [b"a", b"bc", b""], session=session),
    ]


def test_broker_refuses_mutated_signed_messages(fuzz_broker, peer, markers):
    @settings(max_examples=1200, **FUZZ)
    @given(which=st.integers(0, 7), bundled=st.booleans(), ops=mutations)
    def check(which, bundled, ops):
        original = _signed_samples(peer, markers)[which]
        if bundled:  # as it travels: small frames joined (shoal.transport), layout included
            original = bundle(original)
        mutated = mutate(original, ops)
        if [bytes(f) for f in mutated] == [bytes(f) for f in original]:
            return  # the mutations cancelled out: the very same frames
        _refused_by_broker(peer, mutated, "broker: mutated signed messages")

    check()
    print(f"\nbroker: {TRIED['broker: mutated signed messages']} mutated signed messages refused")
    assert_nothing_executed(markers)
    _serves(fuzz_broker)


def test_broker_drops_messages_with_huge_frame_counts(fuzz_broker, peer):
    @settings(max_examples=15, **FUZZ)
    @given(count=st.integers(2001, 60_000), size=st.integers(0, 64))
    def check(count, size):
        _refused_by_broker(peer, [b"s" * 32, b"h" * 16] + [b"x" * size] * (count - 2),
                           "broker: huge frame counts")

    check()
    _serves(fuzz_broker)


IDENT_FIELDS = ("wid", "rt", "ctl")  # socket identities: mostly bytes, sometimes not
FIELDS = ("u", "ob", "t", "r", "b", "i", "rq", "slots", "name", "pid", "host", "running",
          "key", "drop", "to", "msg", "session", "o", "e", "why", "bd", "stale", "x")
unit_entry = st.tuples(st.one_of(st.integers(-5, 2 ** 40), values),
                       st.lists(st.binary(min_size=16, max_size=16), max_size=2),
                       st.integers(-2, 4),
                       st.dictionaries(st.sampled_from(["to", "k", "ks", "n", "x"]), values,
                                       max_size=3)).map(list)
field_values = {name: values for name in FIELDS}
field_values.update({name: st.one_of(st.binary(max_size=17), values) for name in IDENT_FIELDS})
field_values["u"] = st.one_of(values, st.lists(unit_entry, max_size=3))
field_values["r"] = st.one_of(values, st.lists(unit_entry, max_size=3))
field_values["ob"] = st.one_of(values, st.lists(st.tuples(st.binary(min_size=16, max_size=16),
                                                          st.integers(0, 3)).map(list),
                                                max_size=2))
field_values["bs"] = st.sampled_from(["THIS RUN", "another run"])
signed_headers = st.tuples(
    st.one_of(st.sampled_from(sorted(Kind.ALL - {Kind.STATUS})), st.text(max_size=4)),
    st.fixed_dictionaries({}, optional=field_values),
    st.lists(st.binary(max_size=100), max_size=4))


def test_broker_survives_random_signed_headers(fuzz_broker, peer):
    """Signed (a peer with the key, so a bug, not an attack): never a reason to stop."""
    @settings(max_examples=1000, **FUZZ)
    @given(message=signed_headers)
    def check(message):
        kind, fields, frames = message
        if fields.get("bs") == "THIS RUN":
            fields["bs"] = peer.bs
        peer.send(peer.encode(kind, fields, frames))
        peer.status(timeout=10)  # handled, and the broker still answers
        TRIED["broker: signed random headers"] += 1

    try:
        check()
    finally:
        assert fuzz_broker.proc.poll() is None, fuzz_broker.log_text()[-3000:]
    print(f"\nbroker: {TRIED['broker: signed random headers']} signed random headers handled")
    _serves(fuzz_broker)


# ----------------------------------------------------------------- broker bugs found here
@pytest.fixture
def lone_broker(tmp_path):
    """A broker of its own, for inputs that may break it."""
    broker = BrokerProcess(tmp_path, "--log-level", "ERROR")
    yield broker
    broker.stop()


def test_broker_survives_signed_worker_hello_whose_identity_is_not_bytes(lone_broker):
    peer = RawPeer(lone_broker.address, lone_broker.info.key)
    try:
        peer.hello()
        peer.send(peer.encode(Kind.WORKER_HELLO, {"wid": 5, "slots": 1, "name": "bad"}))
        refused, _ = peer.wait_for(Kind.ERROR)
        assert "malformed" in refused.header["msg"] and "'wid'" in refused.header["msg"]
        for field, value in (("ctl", [1]), ("wid", b""), ("wid", b"w" * 256)):
            peer.send(peer.encode(Kind.WORKER_HELLO, {field: value, "slots": 1, "name": "bad"}))
            assert f"'{field}'" in peer.wait_for(Kind.ERROR)[0].header["msg"]
        for kind in (Kind.SCATTER, Kind.CANCEL):
            peer.send(peer.encode(kind, {"bs": peer.bs, "rt": 5, "t": [], "ob": []}))
            assert "'rt'" in peer.wait_for(Kind.ERROR)[0].header["msg"]
        # On the same connection, so handled right after: a task nobody can take.
        peer.send(peer.encode(Kind.SUBMIT, *submit_fields(pow, (2, 2), 1, peer.bs)))
        # The broker dispatches once no message is waiting; a quick question-and-answer
        # keeps its burst going, so ask at a gentler pace for a while.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            state, _ = peer.status(timeout=5)
            assert lone_broker.proc.poll() is None
            assert state["workers"] == 0, "a hello with a malformed identity registered a worker"
            time.sleep(0.05)  # polling with a deadline
        assert state["counts"]["submitted"] == 1 and state["counts"]["dropped"] == 6
    finally:
        peer.close()


def test_a_cancel_naming_what_is_not_task_numbers_is_answered_as_naming_none(lone_broker):
    peer = RawPeer(lone_broker.address, lone_broker.info.key)
    try:
        peer.hello()
        for rq, named in enumerate(([[7, 0]], "all", [1.5], {"t": 1}), start=1):
            peer.send(peer.encode(Kind.CANCEL, {"bs": peer.bs, "t": named, "rq": rq, "r": True}))
            answer, _ = peer.wait_for(Kind.CANCELLED)
            assert answer.header["rq"] == rq and answer.header["t"] == []
        state, _ = peer.status(timeout=5)
        assert lone_broker.proc.poll() is None and state["clients"] >= 1
    finally:
        peer.close()


def test_a_task_whose_large_frame_was_altered_does_not_block_the_worker(tmp_path):
    """The broker routes large frames unhashed (by design); the worker finds the altered
    one, runs and unpickles nothing of it, and fails the task at once, so its one slot
    serves the next task."""
    broker = BrokerProcess(tmp_path, "--log-level", "ERROR")
    worker = start_worker(tmp_path, broker.connection_file, "one-slot")
    peer = RawPeer(broker.address, broker.info.key)
    try:
        with broker.client() as client:
            client.wait_for_workers(1, 30)
            peer.hello()
            fields, frames = submit_fields(len, (b"\x00" * BIG_FRAME,), 1, peer.bs)
            message = peer.encode(Kind.SUBMIT, fields, frames)
            assert len(message[-1]) >= BIG_FRAME
            middle = len(message[-1]) // 2
            message[-1] = message[-1][:middle] + b"\x01" + message[-1][middle + 1:]  # in flight
            peer.send(message)
            state, before_status = peer.status()
            assert state["counts"]["submitted"] == 1
            # The answer may come before the status reply, or after it.
            answers = [m for m in before_status if m.kind == Kind.RESULTS]
            answer = answers[0] if answers else peer.wait_for(Kind.RESULTS, 30)[0]
            [(tid, status, n, _meta)] = answer.header["r"]
            assert (tid, status) == (1, "err")
            error, _ = serialize.loads(answer.frames[:n])
            assert isinstance(error, TransferError), error
            assert "altered in transit" in str(error) and "one-slot" in str(error)
            assert client.submit(pow, 2, 3).result(timeout=5) == 8
            state = client.status()
            assert state["counts"]["failed"] == 1 and state["running"] == 0
        assert "altered in transit" in (tmp_path / "one-slot.log").read_text()
    finally:
        peer.close()
        stop_process(worker)
        broker.stop()


def test_a_result_whose_large_frame_was_altered_fails_its_future(lone_broker):
    """The other way: a RESULTS frame altered between the worker and the client fails the
    client's future with TransferError instead of leaving it waiting for ever."""
    fake = RawPeer(lone_broker.address, lone_broker.info.key)  # a worker, by hand
    try:
        fake.send(fake.encode(Kind.WORKER_HELLO, {"name": "forger", "slots": 1}))
        fake.wait_for(Kind.WELCOME)
        with lone_broker.client() as client:
            future = client.submit(pow, 2, 5)
            tasks, _ = fake.wait_for(Kind.TASKS, 30)
            bid = tasks.header["u"][0][0]
            value, _ = serialize.dumps(b"\x02" * BIG_FRAME)
            reply = fake.encode(Kind.RESULTS, {"r": [[bid, "ok", len(value), {}]]}, value)
            reply[-1] = b"\x03" + bytes(reply[-1])[1:]  # altered after signing
            fake.send(reply)
            with pytest.raises(TransferError, match="altered in transit"):
                future.result(timeout=10)
            assert client.status()["counts"]["done"] == 1  # the broker routed it unhashed
    finally:
        fake.close()


def test_the_signature_covers_where_body_frames_begin_and_end():
    key = os.urandom(32)
    sig, header, first, second = protocol.encode(key, Kind.STATUS, {}, [b"ab", b"cd"])
    assert protocol.decode(key, [sig, header, first, second]).frames == [b"ab", b"cd"]
    for moved in ([b"a", b"bcd"], [b"abc", b"d"], [b"", b"abcd"], [b"abcd", b""]):
        with pytest.raises(protocol.ProtocolError, match="bad signature"):
            protocol.decode(key, [sig, header, *moved])
    # Between the header and the first frame too, and with a large frame beside them.
    with pytest.raises(protocol.ProtocolError, match="bad signature"):
        protocol.decode(key, [sig, bytes(header) + b"a", b"b", second])
    big = b"\x07" * BIG_FRAME
    sig, header, small, large = protocol.encode(key, Kind.STATUS, {}, [b"ab", big])
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(key, [sig, header, small + large[:1], large[1:]])


# ================================================================= a worker, via a fake broker
class FakeBroker:
    """A ROUTER this test binds, with a real ``shoal.worker`` process connected to it."""

    def __init__(self, directory: Path, name: str = "fuzzed") -> None:
        self.key = os.urandom(32)
        key_file = directory / f"{name}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, self.key.hex().encode())
        os.close(fd)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.session = protocol.Session()
        self.log = directory / f"{name}.log"
        self.proc = spawn(["-m", "shoal.worker", f"tcp://127.0.0.1:{port}", "--key-file",
                           str(key_file), "--name", name, "--log-level", "INFO"],
                          os.environ.copy(), self.log)
        self.main = self.control = None
        self.heartbeats = 0
        self.outcomes: dict = {}  # unit id -> the frames of its result
        self._bids = itertools.count(10_000_000)
        self.fn_payload, self.fn_digest = serialize.dumps_function(abs)
        deadline = time.monotonic() + 30
        while self.main is None or self.control is None:
            assert time.monotonic() < deadline, f"the worker never said hello: {self.log_text()}"
            self.recv(0.5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def encode(self, kind: str, fields=None, frames=()) -> list:
        return protocol.encode(self.key, kind, fields, frames, session=self.session)

    def send(self, ident: bytes, frames: list) -> None:
        self.sock.send_multipart([ident, *frames], copy=True)

    def recv(self, timeout: float):
        """One message from the worker (answering its hello), or None."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        ident, *frames = recv_frames(self.sock, block=True, envelope=1)
        msg = protocol.decode(self.key, frames)
        if msg.kind == Kind.WORKER_HELLO:
            self.main = ident
            self.send(ident, self.encode(Kind.WELCOME, {"name": "fuzzed"}))
        elif msg.kind == Kind.HEARTBEAT:
            self.control = ident
            self.heartbeats += 1
        return msg

    def tasks(self, units: list, objects: list = (), frames: list = ()) -> list:
        fields = {"u": units}
        if objects:
            fields["ob"] = objects
        return self.encode(Kind.TASKS, fields, frames)

    def probe(self, timeout: float = 10.0, expect=()) -> dict:
        """Run ``abs(-bid)`` and wait for its result: every message sent before has then been
        handled.  Returns ``{bid: status}`` of every result seen, ``expect``'s included."""
        bid = next(self._bids)
        parts, meta = serialize.dumps_call(abs, (-bid,), {})
        self.send(self.main, self.tasks([[bid, [self.fn_digest], len(parts), meta]],
                                        [[self.fn_digest, 1]], [self.fn_payload, *parts]))
        seen: dict = {}
        deadline = time.monotonic() + timeout
        while bid not in seen or not set(expect) <= set(seen):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"the worker did not answer (exit code {self.proc.poll()}); "
                                     f"log: {self.log_text()[-2000:]}")
            msg = self.recv(min(left, 0.2))
            if msg is not None and msg.kind == Kind.RESULTS:
                pos = 0
                for entry in msg.header["r"]:
                    seen[entry[0]] = entry[1]
                    self.outcomes[entry[0]] = msg.frames[pos:pos + entry[2]]
                    pos += entry[2]
        assert seen[bid] == "ok"
        return seen

    def heartbeating(self, timeout: float = 5.0) -> bool:
        """True once a new heartbeat arrives (the control thread is alive)."""
        start = self.heartbeats
        deadline = time.monotonic() + timeout
        while self.heartbeats == start and time.monotonic() < deadline:
            self.recv(0.1)
        return self.heartbeats > start

    def close(self) -> None:
        stop_process(self.proc)
        self.sock.close(0)


@pytest.fixture(scope="module")
def fake_broker(tmp_path_factory):
    fake = FakeBroker(tmp_path_factory.mktemp("fake-broker"))
    yield fake
    fake.close()


def _worker_still_serves(fake: FakeBroker) -> None:
    assert fake.proc.poll() is None, f"the worker died: {fake.log_text()[-2000:]}"
    fake.probe()
    assert fake.heartbeating(), "the worker's control thread stopped heartbeating"


def test_worker_drops_random_multipart_messages(fake_broker, markers):
    @settings(max_examples=600, **FUZZ)
    @given(frames=random_multipart, to_control=st.booleans())
    def check(frames, to_control):
        fake_broker.send(fake_broker.control if to_control else fake_broker.main, frames)
        fake_broker.probe()
        TRIED["worker: random frames"] += 1
        REFUSED["worker: random frames"] += 1

    check()
    print(f"\nworker: {TRIED['worker: random frames']} random multipart messages dropped")
    _worker_still_serves(fake_broker)


def test_worker_never_unpickles_a_mutated_signed_message(fake_broker, markers):
    def samples() -> list:
        touch = forged_payload(markers)
        digest = os.urandom(16)
        session = protocol.Session()
        return [
            protocol.encode(fake_broker.key, Kind.TASKS, {
                "ob": [[digest, 1]], "u": [[next(fake_broker._bids), [digest], 1, {}]]},
                [touch, touch], session=session),
            protocol.encode(fake_broker.key, Kind.TASKS, {"u": [], "fg": [digest]},
                            session=session),
            protocol.encode(fake_broker.key, Kind.CANCEL, {"b": [1, 2], "rq": 5, "r": True},
                            session=session),
            protocol.encode(fake_broker.key, Kind.SHUTDOWN, session=session),
        ]

    @settings(max_examples=800, **FUZZ)
    @given(which=st.integers(0, 3), ops=mutations, to_control=st.booleans())
    def check(which, ops, to_control):
        original = samples()[which]
        mutated = mutate(original, ops)
        if mutated == [bytes(f) for f in original]:
            return  # the mutations cancelled out: the very same frames
        fake_broker.send(fake_broker.control if to_control else fake_broker.main, mutated)
        seen = fake_broker.probe()
        assert len(seen) == 1, f"the worker ran a mutated task: {seen}"
        TRIED["worker: mutated signed messages"] += 1
        REFUSED["worker: mutated signed messages"] += 1

    check()
    print(f"\nworker: {TRIED['worker: mutated signed messages']} mutated signed messages dropped")
    assert_nothing_executed(markers)
    _worker_still_serves(fake_broker)


harmless = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.binary(max_size=20),
                     st.lists(st.integers(), max_size=5),
                     st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
                     st.floats())
payload = st.one_of(st.binary(max_size=200),
                    harmless.map(lambda obj: pickle.dumps(obj, protocol=5)))


def test_worker_answers_signed_tasks_whose_payloads_are_garbage(fake_broker):
    """Signed by the broker, so trusted; still, a payload that is not a pickle, or a pickle
    of something that is not a function, fails its task and never the worker."""
    @settings(max_examples=500, **FUZZ)
    @given(fn=payload, args=st.lists(payload, max_size=3), units=st.integers(1, 3))
    def check(fn, args, units):
        digest = os.urandom(16)
        bids = [next(fake_broker._bids) for _ in range(units)]
        entries = [[bid, [digest], len(args), {}] for bid in bids]
        fake_broker.send(fake_broker.main, fake_broker.tasks(
            entries, [[digest, 1]], [fn, *(args * units)]))
        seen = fake_broker.probe(expect=bids)
        assert all(seen[bid] == "err" for bid in bids), seen
        TRIED["worker: signed garbage payloads"] += 1

    check()
    print(f"\nworker: {TRIED['worker: signed garbage payloads']} signed TASKS with garbage "
          "payloads failed cleanly")
    _worker_still_serves(fake_broker)


def test_worker_answers_signed_cancels_of_unknown_tasks(fake_broker):
    @settings(max_examples=300, **FUZZ)
    @given(bids=st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), max_size=5),
           running=st.booleans(), rq=st.integers(0, 2 ** 31))
    def check(bids, running, rq):
        fake_broker.send(fake_broker.control, fake_broker.encode(
            Kind.CANCEL, {"b": bids, "r": running, "rq": rq}))
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "no answer to a cancel"
            msg = fake_broker.recv(0.5)
            if msg is not None and msg.kind == Kind.CANCELLED and msg.header["rq"] == rq:
                assert msg.header["b"] == [] and msg.header["i"] == []
                break
        TRIED["worker: signed cancels"] += 1

    check()
    _worker_still_serves(fake_broker)


def test_a_signed_forged_pickle_does_run_which_proves_the_marker_works(fake_broker, tmp_path):
    """The control: the same payload, correctly signed, is unpickled (by design: whoever
    holds the key runs code).  So the marker not appearing above means something."""
    digest = os.urandom(16)
    bid = next(fake_broker._bids)
    touch = pickle.dumps(_Touch(tmp_path / "signed-ran"), protocol=5)
    fake_broker.send(fake_broker.main, fake_broker.tasks([[bid, [digest], 1, {}]],
                                                         [[digest, 1]], [touch, touch]))
    fake_broker.probe(expect=[bid])
    assert (tmp_path / "signed-ran").exists()


# ----------------------------------------------------------------- worker bugs found here
@pytest.fixture
def lone_worker(tmp_path):
    """A worker and fake broker of their own, for inputs that may break the worker."""
    fake = FakeBroker(tmp_path, "lone")
    yield fake
    fake.close()


def test_a_function_that_arrived_altered_fails_every_task_that_uses_it(lone_worker, markers):
    digest, bid = os.urandom(16), next(lone_worker._bids)
    big_touch = pickle.dumps((_Touch(markers / "altered-function"), b"\x00" * BIG_FRAME))
    message = lone_worker.tasks([[bid, [digest], 0, {}]], [[digest, 1]], [big_touch])
    message[2] = bytes(message[2])[:-1] + b"\x01"  # altered after signing
    lone_worker.send(lone_worker.main, message)
    assert lone_worker.probe(expect=[bid])[bid] == "err"
    later = next(lone_worker._bids)  # the broker counts the function as sent: not again
    lone_worker.send(lone_worker.main, lone_worker.tasks([[later, [digest], 0, {}]]))
    assert lone_worker.probe(expect=[later])[later] == "err"
    for unit in (bid, later):
        error, _ = serialize.loads(lone_worker.outcomes[unit])
        assert isinstance(error, TransferError) and "altered in transit" in str(error), error
    assert_nothing_executed(markers)


@pytest.mark.parametrize("fields, failed", [
    ({}, []), ({"u": 5}, []), ({"u": [[1, 2]]}, [1]), ({"u": [], "ob": [[[], 1]]}, []),
    ({"u": [[2, [b"f" * 16], 3, {}]]}, [2]), ({"u": [[3, [b"f" * 16], 0, "meta"]]}, [3]),
    ({"u": [[4, [], 0, {}], [5, [b"f" * 16], 0, {}]]}, [4, 5]), ({"u": [], "fg": [[]]}, []),
], ids=["no-units", "units-not-a-list", "unit-too-short", "object-digest-unhashable",
        "frame-count-lies", "meta-not-a-map", "no-function", "forget-unhashable"])
def test_worker_survives_a_signed_tasks_message_of_the_wrong_shape(lone_worker, fields, failed):
    lone_worker.send(lone_worker.main, lone_worker.encode(Kind.TASKS, fields))
    # Tasks it can name fail back at once (none is left running for ever); none runs.
    seen = lone_worker.probe(expect=failed)
    assert all(seen[bid] == "err" for bid in failed), seen
    assert len(seen) == len(failed) + 1, seen
    for bid in failed:
        error, _ = serialize.loads(lone_worker.outcomes[bid])
        assert isinstance(error, TransferError) and "as malformed" in str(error), error
    assert "as malformed" in lone_worker.log_text()
    _worker_still_serves(lone_worker)


@pytest.mark.parametrize("fields", [{"rq": 1}, {"rq": 1, "b": 5}, {"rq": 1, "b": [[1]]},
                                    {"rq": 1, "b": ["x"], "r": True}],
                         ids=["no-tasks", "tasks-not-a-list", "task-id-unhashable",
                              "task-id-not-an-int"])
def test_worker_survives_a_signed_cancel_of_the_wrong_shape(lone_worker, fields):
    lone_worker.send(lone_worker.control, lone_worker.encode(Kind.CANCEL, fields))
    # Answered as a cancel that named no task, so the broker's request does not wait.
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, "no answer to a malformed cancel"
        msg = lone_worker.recv(0.5)
        if msg is not None and msg.kind == Kind.CANCELLED:
            assert msg.header["rq"] == 1 and msg.header["b"] == [] and msg.header["i"] == []
            break
    lone_worker.probe()
    assert lone_worker.heartbeating(3), "the control thread died"
