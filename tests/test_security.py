"""Security on one host: Curve beyond loopback, private files, replays, limits, keys.

Every broker and worker here is a real process.  A broker that must listen
beyond loopback runs in a network namespace of its own (``unshare --net``)
where one exists, so no port opens on this machine's interfaces; the test
reaches it through the IPC endpoint every broker also binds.

The helpers at the top (processes, raw sockets, signed messages) are shared
with ``test_netns.py`` and ``test_fuzz.py``.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import shoal
from shoal import protocol, serialize
from shoal.protocol import Kind
from shoal.security import ConnectionInfo, HandshakeWatch, apply_curve, read_connection_file
from shoal.transport import recv_frames

from conftest import wait_until

pytestmark = pytest.mark.timeout(90)

PYTHON = sys.executable
CURVE = zmq.has("curve")
needs_curve = pytest.mark.skipif(not CURVE, reason="this libzmq has no CurveZMQ support")


# ================================================================= shared helpers
def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line ``proc`` writes to stdout (a pipe), within ``timeout`` seconds."""
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line from {proc.args!r} within {timeout:g} s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{proc.args!r} exited ({proc.wait()}) before printing a "
                                   f"line (got {data!r})")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    finally:
        if proc.stdout:
            proc.stdout.close()


def spawn(args: list, env: dict, log: Path, prefix: tuple = ()) -> subprocess.Popen:
    """Start ``python -m ARGS`` (after ``prefix``, e.g. ``ip netns exec NS``), stderr to ``log``."""
    with open(log, "ab") as err:
        return subprocess.Popen([*prefix, PYTHON, *args], env=env, stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)


class BrokerProcess:
    """A ``python -m shoal.broker`` process and what it printed on start."""

    def __init__(self, directory: Path, *args: str, env: Optional[dict] = None,
                 prefix: tuple = (), name: str = "broker", timeout: float = 30.0) -> None:
        self.log = directory / f"{name}.log"
        self.connection_file = str(directory / f"{name}.json")
        self.proc = spawn(["-m", "shoal.broker", "--connection-file", self.connection_file,
                           *args], env or os.environ.copy(), self.log, prefix)
        try:
            line = read_line(self.proc, timeout)
        except Exception:
            stop_process(self.proc)
            raise RuntimeError(f"the broker did not start: {self.log_text()}") from None
        assert line.startswith("SHOAL-BROKER "), line
        self.address = line.split()[1]
        self.info = read_connection_file(self.connection_file)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, timeout: float = 10.0) -> shoal.Client:
        return shoal.Client(self.connection_file, timeout=timeout)

    def stop(self) -> None:
        stop_process(self.proc)


def start_worker(directory: Path, connection_file: str, name: str, env: Optional[dict] = None,
                 prefix: tuple = (), *extra: str) -> subprocess.Popen:
    """A ``python -m shoal.worker --connection-file FILE`` process, its log in ``directory``."""
    return spawn(["-m", "shoal.worker", "--connection-file", str(connection_file), "--name", name,
                  "--log-level", "DEBUG", *extra], env or os.environ.copy(),
                 directory / f"{name}.log", prefix)


def private_copy(src, dst) -> Path:
    """Copy a connection file as a remote machine would keep it: mode 0600."""
    dst = Path(dst)
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)
    return dst


_PEER_IDS = itertools.count(1)


class RawPeer:
    """A DEALER socket that speaks the protocol by hand, as an attacker (or fuzzer) would."""

    def __init__(self, address: str, key: bytes, curve: Optional[dict] = None,
                 monitor: bool = False) -> None:
        self.key = key
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        if curve:
            apply_curve(self.sock, ConnectionInfo(address, key, curve=curve))
        # A numbered endpoint: pyzmq's default reuses file descriptors (see below).
        self.monitor = self.sock.get_monitor_socket(
            addr=f"inproc://raw-peer-{next(_PEER_IDS)}") if monitor else None
        self.sock.connect(address)
        self.session = protocol.Session()
        self.bs: Optional[str] = None

    def send(self, frames: list) -> None:
        """Send a message; nothing happens once libzmq gave the connection up for good (a
        refused handshake: SNDHWM is 0, so only then would a send block, for ever)."""
        try:
            self.sock.send_multipart(frames, copy=True, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def encode(self, kind: str, fields: Optional[dict] = None, frames=()) -> list:
        return protocol.encode(self.key, kind, fields, frames, session=self.session)

    def recv(self, timeout: float) -> Optional[protocol.Message]:
        """The next message (unchecked for replays), or None after ``timeout`` seconds."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return protocol.decode(self.key, recv_frames(self.sock, block=True))

    def wait_for(self, kind: str, timeout: float = 10.0) -> tuple:
        """``(message of kind, [messages of other kinds received meanwhile])``."""
        others = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} message within {timeout:g} s (got {others})")
            msg = self.recv(left)
            if msg is None:
                continue
            if msg.kind == kind:
                return msg, others
            others.append(msg)

    def hello(self, timeout: float = 10.0) -> str:
        """Say hello as a client; return (and keep) the broker run's session, ``bs``."""
        self.send(self.encode(Kind.CLIENT_HELLO))
        welcome, _ = self.wait_for(Kind.WELCOME, timeout)
        self.bs = welcome.header["session"]
        return self.bs

    def status(self, timeout: float = 10.0) -> tuple:
        """Ask on this very socket: every message sent before has been handled when the
        reply comes (one connection's messages arrive in order).  ``(state, others)``."""
        self.send(self.encode(Kind.STATUS))
        reply, others = self.wait_for(Kind.STATUS_REPLY, timeout)
        return reply.header, others

    def auth_failed(self, timeout: float = 10.0) -> bool:
        """True once the monitor reports that the broker refused this socket's key."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.monitor.poll(100):
                event = recv_monitor_message(self.monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return True
        return False

    def disconnected(self, timeout: float = 10.0) -> bool:
        """True once the monitor reports that the connection was closed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.monitor.poll(100):
                if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                    return True
        return False

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(0)
        self.sock.close(0)


def submit_fields(fn, args: tuple, tid: int, bs: Optional[str]) -> tuple:
    """``(fields, frames)`` of a SUBMIT of ``fn(*args)``, as a client builds it."""
    payload, fn_digest = serialize.dumps_function(fn)
    parts, meta = serialize.dumps_call(fn, args, {})
    fields = {"ob": [[fn_digest, 1]], "u": [[tid, [fn_digest], len(parts), meta]]}
    if bs is not None:
        fields["bs"] = bs
    return fields, [payload, *parts]


def results_for(peer: RawPeer, tid: int, timeout: float = 30.0) -> list:
    """Wait for the RESULTS entry of task ``tid`` on a raw peer; return it."""
    deadline = time.monotonic() + timeout
    while True:
        msg, _ = peer.wait_for(Kind.RESULTS, max(0.01, deadline - time.monotonic()))
        for entry in msg.header["r"]:
            if entry[0] == tid:
                return entry


@pytest.fixture
def short_dir():
    """A short private directory (IPC socket paths must stay under ~100 characters)."""
    path = Path(tempfile.mkdtemp(prefix="shoal-t-", dir="/tmp"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def shoal_env(directory: Path, **extra: str) -> dict:
    env = os.environ.copy()
    env["SHOAL_RUNTIME_DIR"] = str(directory / "run")
    env["SHOAL_HOME"] = str(directory / "home")
    env.update(extra)
    return env


@functools.lru_cache(maxsize=None)
def isolated() -> tuple:
    """Where a broker that listens beyond loopback runs: a network namespace of its own
    (only its IPC endpoint is reachable), else here (Curve protects it; ``--insecure``
    then exposes a signed-only port for the moment the test needs)."""
    try:
        if subprocess.run(["unshare", "--net", "true"], capture_output=True,
                          timeout=10).returncode == 0:
            return ("unshare", "--net", "--")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ()


def keys_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "shoal", "keys", *args], env=env, capture_output=True,
                          text=True, timeout=60)


# ----------------------------------------------------------------- task functions
def record_run(directory: str, token: str) -> int:
    """Task: leave a file saying it ran (once per run); return the worker's pid."""
    Path(directory, f"{token}-{os.getpid()}-{time.monotonic_ns()}").touch()
    return os.getpid()


def runs_of(directory, token: str) -> list:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(token + "-"))


# ================================================================= Curve beyond loopback
@needs_curve
def test_non_loopback_listen_turns_on_curve_and_refuses_a_client_without_keys(short_dir):
    env = shoal_env(short_dir)
    broker = BrokerProcess(short_dir, "--listen", "0.0.0.0:0", env=env, prefix=isolated())
    try:
        assert "Curve-secured" in broker.log_text()
        info = broker.info
        assert info.curve and info.ipc, "a non-loopback broker's connection file has no Curve keys"
        # Even the right signing key is not enough without an allowed Curve keypair, and the
        # client says why: at once when libzmq reports the mismatch of security mechanisms,
        # at its timeout when the broker's side closed the connection first (libzmq retries).
        started = time.monotonic()
        with pytest.raises(shoal.BrokerUnreachable,
                           match=r"handshake with the broker at \S+ failed") as refused:
            shoal.Client(ConnectionInfo(info.ipc, info.key), timeout=2)
        assert "Curve" in str(refused.value), refused.value
        assert time.monotonic() - started < 4
        # Nor is a Curve keypair the broker never allowed.
        public, secret = zmq.curve_keypair()
        stranger = RawPeer(info.ipc, info.key, monitor=True, curve={
            "server_key": info.curve["server_key"], "public_key": public.decode(),
            "secret_key": secret.decode()})
        try:
            stranger.send(stranger.encode(Kind.CLIENT_HELLO))
            assert stranger.auth_failed(10), "the broker did not refuse an unknown Curve key"
            assert stranger.recv(0.2) is None
        finally:
            stranger.close()
        # The broker's own connection file (the allowed key "local") gets in.
        with broker.client() as client:
            assert client.status()["workers"] == 0
        # Its keys are private: directory 0700, every key file 0600.
        home = short_dir / "home" / "broker"
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        for path in [home / "hmac.key", home / "broker.key_secret",
                     *home.glob("allowed/*"), *home.glob("peers/*"), Path(broker.connection_file)]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        broker.stop()


def test_insecure_non_loopback_listen_prints_a_loud_warning(short_dir):
    broker = BrokerProcess(short_dir, "--listen", "0.0.0.0:0", "--insecure",
                           env=shoal_env(short_dir), prefix=isolated())
    try:
        text = broker.log_text()
        assert "WITHOUT ENCRYPTION OR AUTHENTICATION (--insecure)" in text
        assert "!!!" in text and "WARNING" in text
        assert broker.info.curve is None
        with shoal.Client(ConnectionInfo(broker.info.ipc, broker.info.key), timeout=10) as c:
            assert c.status()["workers"] == 0
    finally:
        broker.stop()


def test_loopback_broker_needs_no_curve(cluster):
    assert cluster.address.startswith("tcp://127.0.0.1:")
    assert cluster.info.curve is None


# ================================================================= file modes
@pytest.fixture
def public_connection_file(cluster, tmp_path):
    """A copy of the shared cluster's connection file that others may read (0644)."""
    path = tmp_path / "cluster.json"
    shutil.copyfile(cluster.connection_file, path)
    os.chmod(path, 0o644)
    return path


def test_client_refuses_a_connection_file_others_can_read(public_connection_file):
    with pytest.raises(PermissionError, match=f"chmod 600 {public_connection_file}"):
        shoal.Client(str(public_connection_file), timeout=5)
    os.chmod(public_connection_file, 0o600)
    with shoal.Client(str(public_connection_file), timeout=10) as c:  # the fix works
        assert c.status()["workers"] >= 1


def test_client_refuses_a_key_file_others_can_read(cluster, public_connection_file):
    with pytest.raises(PermissionError, match="chmod 600"):
        shoal.Client(cluster.address, key_file=str(public_connection_file), timeout=5)


def test_worker_cli_refuses_a_connection_file_others_can_read(public_connection_file):
    done = subprocess.run([PYTHON, "-m", "shoal", "worker", "--connection-file",
                           str(public_connection_file)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert f"chmod 600 {public_connection_file}" in done.stderr
    assert "readable by others" in done.stderr


@pytest.mark.parametrize("how", ["file", "key-file"])
def test_status_cli_refuses_a_connection_file_others_can_read(how, cluster,
                                                              public_connection_file):
    args = ([str(public_connection_file)] if how == "file"
            else [cluster.address, "--key-file", str(public_connection_file)])
    done = subprocess.run([PYTHON, "-m", "shoal", "status", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert f"chmod 600 {public_connection_file}" in done.stderr


@needs_curve
def test_broker_refuses_a_signing_key_others_can_read(short_dir):
    env = shoal_env(short_dir)
    created = keys_cli("create", "w1", "--address", "tcp://127.0.0.1:5555", env=env)
    assert created.returncode == 0, created.stderr
    hmac_key = short_dir / "home" / "broker" / "hmac.key"
    os.chmod(hmac_key, 0o644)
    done = subprocess.run([PYTHON, "-m", "shoal.broker", "--curve"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"chmod 600 {hmac_key}" in done.stderr


# ================================================================= replays
@pytest.fixture
def raw_peer(cluster):
    peer = RawPeer(cluster.address, cluster.info.key)
    peer.hello()
    yield peer
    peer.close()


def test_a_signed_submit_sent_twice_runs_once(cluster, raw_peer, tmp_path):
    token = "replay"
    fields, frames = submit_fields(record_run, (str(tmp_path), token), 1, raw_peer.bs)
    captured = raw_peer.encode(Kind.SUBMIT, fields, frames)
    raw_peer.send(captured)
    entry = results_for(raw_peer, 1)
    assert entry[1] == "ok"
    before, _ = raw_peer.status()

    raw_peer.send(captured)  # the very same frames again
    after, _ = raw_peer.status()
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
    assert after["counts"]["submitted"] == before["counts"]["submitted"], "the replay was queued"
    assert len(runs_of(tmp_path, token)) == 1


def test_a_captured_submit_replayed_from_another_connection_is_refused(cluster, raw_peer,
                                                                       tmp_path):
    token = "elsewhere"
    fields, frames = submit_fields(record_run, (str(tmp_path), token), 7, raw_peer.bs)
    captured = raw_peer.encode(Kind.SUBMIT, fields, frames)
    raw_peer.send(captured)
    assert results_for(raw_peer, 7)[1] == "ok"
    attacker = RawPeer(cluster.address, cluster.info.key)
    try:
        before, _ = attacker.status()
        attacker.send(captured)
        after, others = attacker.status()
        assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
        assert after["counts"]["submitted"] == before["counts"]["submitted"]
        assert not others, f"the broker answered a replay: {others}"
    finally:
        attacker.close()
    assert len(runs_of(tmp_path, token)) == 1


def test_an_older_message_of_a_session_is_refused_after_a_newer_one(raw_peer, tmp_path):
    older = raw_peer.encode(Kind.SUBMIT, *submit_fields(record_run, (str(tmp_path), "old"), 2,
                                                        raw_peer.bs))
    newer = raw_peer.encode(Kind.SUBMIT, *submit_fields(record_run, (str(tmp_path), "new"), 3,
                                                        raw_peer.bs))
    raw_peer.send(newer)
    assert results_for(raw_peer, 3)[1] == "ok"
    before, _ = raw_peer.status()
    raw_peer.send(older)
    after, _ = raw_peer.status()
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
    assert after["counts"]["submitted"] == before["counts"]["submitted"]
    assert runs_of(tmp_path, "old") == []


def test_a_submit_for_another_broker_run_is_refused(raw_peer, tmp_path):
    assert raw_peer.bs
    other_run = os.urandom(8).hex()
    before, _ = raw_peer.status()
    fields, frames = submit_fields(record_run, (str(tmp_path), "stale"), 4, other_run)
    raw_peer.send(raw_peer.encode(Kind.SUBMIT, fields, frames))
    after, others = raw_peer.status()
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
    assert after["counts"]["submitted"] == before["counts"]["submitted"]
    # The sender is told which run this is (a client that missed a restart resubmits).
    errors = [m for m in others if m.kind == Kind.ERROR]
    assert errors and errors[0].header["stale"] and errors[0].header["session"] == raw_peer.bs
    assert errors[0].header["t"] == [4]
    assert runs_of(tmp_path, "stale") == []


def test_a_submit_naming_no_broker_run_is_refused(raw_peer, tmp_path):
    before, _ = raw_peer.status()
    fields, frames = submit_fields(record_run, (str(tmp_path), "unbound"), 5, None)
    raw_peer.send(raw_peer.encode(Kind.SUBMIT, fields, frames))
    after, _ = raw_peer.status()
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
    assert after["counts"]["submitted"] == before["counts"]["submitted"]
    assert runs_of(tmp_path, "unbound") == []


# ================================================================= limits
MAX_FRAMES = 8
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A broker with small limits (8 frames, 200 kB a message) and one worker."""
    directory = tmp_path_factory.mktemp("limited")
    broker = BrokerProcess(directory, "--max-frames", str(MAX_FRAMES),
                           "--max-message-size", str(MAX_BYTES))
    worker = start_worker(directory, broker.connection_file, "limited-1")
    try:
        with broker.client() as client:
            client.wait_for_workers(1, 30)
        yield broker
    finally:
        stop_process(worker)
        broker.stop()


@pytest.fixture
def limited_peer(limited):
    peer = RawPeer(limited.address, limited.info.key, monitor=True)
    yield peer
    peer.close()


def _limited_serves(limited) -> None:
    with limited.client() as client:
        assert client.submit(pow, 2, 9).result(timeout=30) == 512


def test_a_message_of_exactly_max_frames_is_accepted(limited, limited_peer):
    body = [b"f%d" % i for i in range(MAX_FRAMES - 2)]  # signature + header + body
    before, _ = limited_peer.status()
    limited_peer.send(limited_peer.encode(Kind.STATUS, {}, body))
    reply, _ = limited_peer.wait_for(Kind.STATUS_REPLY)
    assert reply.header["counts"]["dropped"] == before["counts"]["dropped"]


def test_a_message_over_max_frames_is_dropped_and_the_broker_serves_on(limited, limited_peer):
    body = [b"f%d" % i for i in range(MAX_FRAMES - 1)]
    before, _ = limited_peer.status()
    limited_peer.send(limited_peer.encode(Kind.STATUS, {}, body))
    after, others = limited_peer.status()
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
    assert not others, "the broker answered a message over the frame limit"
    _limited_serves(limited)


def test_a_huge_frame_count_is_dropped(limited, limited_peer):
    before, _ = limited_peer.status()
    limited_peer.send([b""] * 100_000)
    after, _ = limited_peer.status(timeout=30)
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
    _limited_serves(limited)


def test_a_message_over_max_size_in_small_frames_is_dropped(limited, limited_peer):
    body = [os.urandom(60_000) for _ in range(MAX_FRAMES - 4)]  # 240 kB over 4 frames
    before, _ = limited_peer.status()
    limited_peer.send(limited_peer.encode(Kind.STATUS, {}, body))
    after, others = limited_peer.status()
    assert after["counts"]["dropped"] == before["counts"]["dropped"] + 1
    assert not others
    _limited_serves(limited)


def test_a_frame_over_max_size_closes_the_connection_before_it_is_buffered(limited,
                                                                           limited_peer):
    limited_peer.status()  # connected
    limited_peer.send([os.urandom(MAX_BYTES + 1)])
    assert limited_peer.disconnected(10), "the broker kept a connection sending an oversized frame"
    _limited_serves(limited)


def _status_mb(pid: int, field: str) -> int:
    """A size from /proc/PID/status, in MB: VmHWM (peak resident) or VmRSS (resident now)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    raise LookupError(f"no {field}")


def _peak_rss_mb(pid: int) -> int:
    return _status_mb(pid, "VmHWM")


def _rss_mb(pid: int) -> int:
    return _status_mb(pid, "VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_message_over_max_size_in_many_frames_is_buffered_once_then_dropped_and_freed(
        limited, limited_peer):
    """What is guaranteed for a message over --max-message-size made of frames each under it.

    libzmq assembles a whole multipart message before it hands the broker its first frame,
    and none of its options bounds the sum or the number of a message's frames
    (ZMQ_MAXMSGSIZE bounds each frame), so the broker cannot refuse such a message before
    it is buffered whole (docs/security.md, Limits).  What the broker does guarantee: it
    holds no second copy (frames past the limit are released as they are read), it drops
    and counts the message without answering, and it gives the memory back.
    """
    limited_peer.status()
    before = _peak_rss_mb(limited.proc.pid)
    rss_before = _rss_mb(limited.proc.pid)
    dropped = limited_peer.status()[0]["counts"]["dropped"]
    message_mb = 60_000 * 3000 / 2 ** 20
    limited_peer.send([b"x" * 60_000] * 3000)  # 180 MB in frames of 60 kB each
    after, others = limited_peer.status(timeout=30)
    assert after["counts"]["dropped"] == dropped + 1
    assert not others, "the broker answered a message over the size limit"
    grown = _peak_rss_mb(limited.proc.pid) - before
    assert grown < message_mb + 40, (
        f"the broker's peak memory grew by {grown} MB for a {message_mb:.0f} MB message: "
        "more than libzmq's one copy")
    if hasattr(ctypes.CDLL(None), "malloc_trim"):  # glibc: the broker trims the heap
        wait_until(lambda: _rss_mb(limited.proc.pid) < rss_before + 40, 10, 0.05,
                   "the broker to give back the memory of the dropped message")
    _limited_serves(limited)


# ================================================================= keys, allow-list, revocation
@pytest.fixture(scope="module")
def curve_broker(tmp_path_factory):
    """A Curve-secured broker on loopback (``--curve``) with one worker of its own."""
    if not CURVE:
        pytest.skip("this libzmq has no CurveZMQ support")
    directory = Path(tempfile.mkdtemp(prefix="shoal-c-", dir="/tmp"))
    env = shoal_env(directory)
    broker = BrokerProcess(directory, "--curve", "--log-level", "DEBUG", env=env)
    broker.env, broker.dir = env, directory
    local = start_worker(directory, broker.connection_file, "local-1", env)
    try:
        with broker.client() as client:
            client.wait_for_workers(1, 30)
        yield broker
    finally:
        stop_process(local)
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _workers(client) -> dict:
    return {w["name"]: w for w in client.status()["worker_list"]}


def _denied_count(broker, public_key: str) -> int:
    return sum(1 for line in broker.log_text().splitlines()
               if "DENIED" in line and public_key in line)


def test_keys_create_list_and_refuse_bad_names(curve_broker):
    env = curve_broker.env
    created = keys_cli("create", "alpha", "--address", curve_broker.address, env=env)
    assert created.returncode == 0, created.stderr
    peer_file = Path(curve_broker.dir, "home", "broker", "peers", "alpha.json")
    assert str(peer_file) in created.stdout and "shoal worker --connection-file" in created.stdout
    assert stat.S_IMODE(peer_file.stat().st_mode) == 0o600
    data = json.loads(peer_file.read_text())
    assert data["address"] == curve_broker.address
    assert set(data["curve"]) >= {"server_key", "public_key", "secret_key"}
    assert data["curve"]["server_key"] == curve_broker.info.curve["server_key"]

    listed = keys_cli("list", env=env)
    assert listed.returncode == 0
    names = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()}
    assert names["alpha"] == data["curve"]["public_key"]
    assert "local" in names
    assert data["curve"]["secret_key"] not in listed.stdout

    again = keys_cli("create", "alpha", "--address", curve_broker.address, env=env)
    assert again.returncode == 1 and "exists" in again.stderr
    bad = keys_cli("create", "../evil", "--address", curve_broker.address, env=env)
    assert bad.returncode == 1 and "key name" in bad.stderr
    missing = keys_cli("revoke", "nobody", env=env)
    assert missing.returncode == 1


def test_a_worker_with_a_created_key_joins_and_runs_tasks(curve_broker, tmp_path):
    env = curve_broker.env
    assert keys_cli("create", "w-join", "--address", curve_broker.address,
                    env=env).returncode == 0
    remote = private_copy(Path(curve_broker.dir, "home", "broker", "peers", "w-join.json"),
                          tmp_path / "w-join.json")
    worker = start_worker(tmp_path, str(remote), "w-join", env)
    try:
        with curve_broker.client() as client:
            wait_until(lambda: "w-join" in _workers(client), 30, message="w-join to join")
            futures = client.run(os.getpid)
            assert futures["w-join"].result(timeout=30) == worker.pid
            assert futures["w-join"].worker == "w-join"
    finally:
        stop_process(worker)


def _stranger(curve_broker, path: Path) -> tuple:
    """A connection file with the right address, signing key and server key, but a Curve
    keypair the broker never allowed: ``(path, its curve section)``."""
    info = read_connection_file(curve_broker.connection_file)
    public, secret = zmq.curve_keypair()
    curve = {"server_key": info.curve["server_key"], "public_key": public.decode(),
             "secret_key": secret.decode()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"address": curve_broker.address, "key": info.key.hex(), "version": info.version,
                   "curve": curve}, fh)
    return path, curve


def test_a_worker_with_an_unknown_key_cannot_join_and_learns_nothing(curve_broker, tmp_path):
    """Even holding the signing key: without an allowed Curve key, nothing gets through."""
    path, stranger = _stranger(curve_broker, tmp_path / "stranger.json")
    # A raw peer says hello as a worker: the handshake is refused, nothing comes back.
    peer = RawPeer(curve_broker.address, curve_broker.info.key, curve=stranger, monitor=True)
    worker = start_worker(tmp_path, str(path), "stranger", curve_broker.env)
    try:
        peer.send(peer.encode(Kind.WORKER_HELLO, {"name": "stranger-raw", "slots": 1}))
        assert peer.auth_failed(10), "the broker did not refuse an unknown Curve key"
        assert peer.recv(0.2) is None
        # The real worker process (two sockets, the same key): refused as well.
        wait_until(lambda: _denied_count(curve_broker, stranger["public_key"]) >= 3, 30,
                   message="the broker to refuse the unknown worker's key")
        with curve_broker.client() as client:
            names = set(_workers(client))
        assert not {"stranger", "stranger-raw"} & names
        # libzmq never retries a refused handshake: the worker says so and exits.
        assert worker.wait(10) == 1, "a worker whose key the broker refused did not exit with 1"
        log = (tmp_path / "stranger.log").read_text()
        assert "refused this worker's key" in log and "shoal keys create" in log, log
        assert "registered with the broker" not in log
        assert "dropped a message" not in log, "the unknown worker received a message"
    finally:
        peer.close()
        stop_process(worker)


def test_a_worker_refused_by_the_broker_stops_on_sigterm(curve_broker, tmp_path):
    path, stranger = _stranger(curve_broker, tmp_path / "refused.json")
    worker = start_worker(tmp_path, str(path), "refused", curve_broker.env)
    log = tmp_path / "refused.log"
    try:
        wait_until(lambda: _denied_count(curve_broker, stranger["public_key"]) >= 2, 30,
                   message="the broker to refuse the worker's key")
        wait_until(lambda: "refused this worker's key" in log.read_text(), 10,
                   message="the refused worker to say why it cannot join")
        worker.terminate()
        try:
            worker.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("a worker refused by the broker ignored SIGTERM for 5 s")
        assert worker.returncode == 1, f"a refused worker exited with {worker.returncode}"
        text = log.read_text()
        assert stranger["public_key"] in text and "shoal keys create" in text, text
        assert "--connection-file" in text, text
    finally:
        stop_process(worker, timeout=1)


def _io_threads() -> int:
    import threading
    return sum(1 for t in threading.enumerate() if t.name == "shoal-client-io" and t.is_alive())


def test_a_client_refused_by_curve_gives_up_within_its_timeout_and_leaves_no_thread(
        curve_broker):
    public, secret = zmq.curve_keypair()
    unknown = {"server_key": curve_broker.info.curve["server_key"],
               "public_key": public.decode(), "secret_key": secret.decode()}
    before = _io_threads()
    started = time.monotonic()
    with pytest.raises(shoal.BrokerUnreachable, match="refused this client's key") as info:
        shoal.Client(ConnectionInfo(curve_broker.address, curve_broker.info.key, curve=unknown),
                     timeout=1)
    elapsed = time.monotonic() - started
    assert elapsed < 1, f"Client(timeout=1) took {elapsed:.1f} s to give up"
    assert unknown["public_key"] in str(info.value) and "shoal keys create" in str(info.value)
    assert _io_threads() == before, "the refused client's IO thread is still running"


def test_handshake_watches_never_collide_however_many_sockets_come_and_go():
    """pyzmq names a socket monitor's endpoint by the socket's file descriptor, and a
    monitor whose reader is closed first stays bound until its socket is reaped, so a new
    socket could get that descriptor while the old endpoint was still bound ("Address
    already in use", one time in twenty here): a client's IO thread then died before
    saying hello.  Watches are numbered, and stop monitoring before their reader closes."""
    ctx = zmq.Context()  # its own: the churn must not crowd the shared context's sockets
    # A closed socket leaves the context only once libzmq's reaper thread has run: on a
    # busy machine it lags behind this loop, and the default limit of 1023 sockets a
    # context ("Too many open files") would be reached before any descriptor is reused.
    ctx.set(zmq.MAX_SOCKETS, 16_384)
    info = ConnectionInfo("tcp://127.0.0.1:9", b"k" * 32)
    sock = None
    try:
        for _ in range(1500):
            sock = ctx.socket(zmq.DEALER)
            watch = HandshakeWatch(sock, info, "client")
            assert watch.check() is None
            watch.close()
            sock.close(linger=0)
    finally:
        if sock is not None:
            sock.close(linger=0)  # (closing twice is harmless) else term() waits for it for ever
        ctx.term()


@needs_curve
@pytest.mark.timeout(60)
def test_a_handshake_watch_nobody_reads_never_stalls_the_process():
    """libzmq sends monitor events from its IO thread and waits while one cannot be queued,
    which stalls every socket of the process.  A watch's queue has no limit: thousands of
    unread failures (a wrong server key, retried every millisecond) stall nothing."""
    ctx = zmq.Context.instance()
    public, secret = zmq.curve_keypair()
    server = ctx.socket(zmq.ROUTER)
    server.curve_server, server.curve_publickey, server.curve_secretkey = True, public, secret
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    accepted = server.get_monitor_socket(zmq.EVENT_ACCEPTED, addr="inproc://accepted-count")
    client_public, client_secret = zmq.curve_keypair()
    wrong = zmq.curve_keypair()[0].decode()
    info = ConnectionInfo(f"tcp://127.0.0.1:{port}", b"k" * 32, curve={
        "server_key": wrong, "public_key": client_public.decode(),
        "secret_key": client_secret.decode()})
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 1)
    apply_curve(sock, info)
    watch = HandshakeWatch(sock, info, "client")
    sock.connect(info.address)
    try:
        seen = 0
        deadline = time.monotonic() + 40
        while seen < 3000:  # failed handshakes, counted on the server's side
            assert time.monotonic() < deadline, f"only {seen} handshakes in 40 s"
            if accepted.poll(100):
                accepted.recv_multipart()
                seen += 1
        # TCP through the same context (and IO thread) still works.
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        b.connect(f"tcp://127.0.0.1:{a.bind_to_random_port('tcp://127.0.0.1')}")
        b.send(b"ping")
        assert a.poll(5000) and a.recv() == b"ping", "the process's ZeroMQ IO thread stalled"
        a.close(0)
        b.close(0)
    finally:
        watch.close()
        sock.close(0)
        server.disable_monitor()
        accepted.close(0)
        server.close(0)


def test_a_revoked_worker_is_dropped_and_cannot_rejoin(curve_broker, tmp_path):
    env = curve_broker.env
    assert keys_cli("create", "w-revoke", "--address", curve_broker.address,
                    env=env).returncode == 0
    peer_file = Path(curve_broker.dir, "home", "broker", "peers", "w-revoke.json")
    remote = private_copy(peer_file, tmp_path / "w-revoke.json")
    public = json.loads(remote.read_text())["curve"]["public_key"]
    worker = start_worker(tmp_path, str(remote), "w-revoke", env)
    again = None
    try:
        with curve_broker.client() as client:
            wait_until(lambda: "w-revoke" in _workers(client), 30, message="w-revoke to join")
            dropped = client.status()["counts"]["dropped"]
            revoked = keys_cli("revoke", "w-revoke", env=env)
            assert revoked.returncode == 0 and "revoked" in revoked.stdout
            assert not peer_file.exists()
            assert "w-revoke" not in keys_cli("list", env=env).stdout
            # Its heartbeats (every second) are dropped from now on ...
            wait_until(lambda: client.status()["counts"]["dropped"] >= dropped + 2, 15,
                       message="the revoked worker's messages to be dropped")
            # ... and the first of them deregisters it, though its process still runs.
            wait_until(lambda: "w-revoke" not in _workers(client), 20,
                       message="the revoked worker to leave")
            assert worker.poll() is None
            # A new connection with the revoked key is refused at the handshake.
            denied = _denied_count(curve_broker, public)
            again = start_worker(tmp_path, str(remote), "w-revoke-again", env)
            wait_until(lambda: _denied_count(curve_broker, public) > denied, 30,
                       message="the broker to refuse the revoked key")
            assert "w-revoke-again" not in _workers(client)
            assert again.wait(10) == 1, "a worker with a revoked key did not exit with 1"
            assert "refused this worker's key" in (tmp_path / "w-revoke-again.log").read_text()
            assert client.submit(pow, 3, 4).result(timeout=30) == 81  # still serving
    finally:
        stop_process(worker)
        stop_process(again, timeout=1)


def test_a_revoked_worker_receives_no_task_after_revocation(curve_broker, tmp_path):
    env = curve_broker.env
    assert keys_cli("create", "w-late", "--address", curve_broker.address,
                    env=env).returncode == 0
    remote = private_copy(Path(curve_broker.dir, "home", "broker", "peers", "w-late.json"),
                          tmp_path / "w-late.json")
    worker = start_worker(tmp_path, str(remote), "w-late", env)
    runs = tmp_path / "runs"
    runs.mkdir()
    try:
        with curve_broker.client() as client:
            wait_until(lambda: "w-late" in _workers(client), 30, message="w-late to join")
            counts = client.status()["counts"]
            dropped, lost = counts["dropped"], counts.get("workers_lost", 0)
            assert keys_cli("revoke", "w-late", env=env).returncode == 0
            wait_until(lambda: client.status()["counts"]["dropped"] > dropped, 15,
                       message="the broker to notice the revocation")
            # Gone at once, not after its heartbeats time out; not counted as lost.
            assert "w-late" not in _workers(client)
            assert client.status()["counts"].get("workers_lost", 0) == lost
            futures = [client.submit(record_run, str(runs), "late") for _ in range(4)]
            pids = {f.result(timeout=30) for f in futures}
        assert worker.pid not in pids
        assert "w-late: its key was revoked; deregistered" in curve_broker.log_text()
        ran_there = [n for n in runs_of(runs, "late") if f"-{worker.pid}-" in n]
        assert not ran_there, f"the revoked worker ran {len(ran_there)} task(s) after revocation"
    finally:
        stop_process(worker)
