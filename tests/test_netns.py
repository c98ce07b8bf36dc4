"""Real separate hosts: network namespaces joined by veth pairs through a bridge.

Five "hosts" and a switch, each a network namespace with its own address, its
own hostname (``unshare --uts``) and its own ``SHOAL_HOME``::

    10.213.0.1  broker     10.213.0.2  w1 (worker)   10.213.0.3  w2 (worker)
    10.213.0.4  client     10.213.0.5  intruder      switch: a bridge joining the veths

The broker listens on its own address, so it is Curve-secured without being
asked.  Remote peers get connection files made with ``shoal keys create`` on
the broker host, copied (0600) to theirs.  The test process observes the
broker through its IPC endpoint (a path in the shared filesystem) with the
broker's own "local" key, and runs everything else with ``ip netns exec``.
No traffic leaves these namespaces.

Needs root, ``ip`` and ``unshare``; tcpdump for the capture tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
import zmq

import shoal
from shoal import protocol
from shoal.protocol import Kind
from shoal.security import ConnectionInfo, read_connection_file
from shoal.transport import unbundle

from conftest import wait_until
from test_security import (PYTHON, BrokerProcess, private_copy, start_worker, stop_process)

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CurveZMQ")]

SUBNET = "10.213.0"
HOSTS = {"broker": 1, "w1": 2, "w2": 3, "client": 4, "intruder": 5}
PORT, INSECURE_PORT = 5555, 5556
BROKER_IP = f"{SUBNET}.1"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=check)


class Network:
    """The namespaces, the bridge and the processes started in them; ``close`` removes all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tag = f"shoal{os.getpid() % 100000}"
        self.switch = f"{tag}-sw"
        self.ns = {host: f"{tag}-{host}" for host in HOSTS}
        self.created: list = []
        self.procs: list = []
        self.dirs = {}
        for host in HOSTS:
            d = root / host
            (d / "run").mkdir(parents=True, mode=0o700)
            self.dirs[host] = d

    def build(self) -> None:
        for name in [self.switch, *self.ns.values()]:
            _run("ip", "netns", "add", name)
            self.created.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for host, n in HOSTS.items():
            ns = self.ns[host]
            _run("ip", "link", "add", "eth0", "netns", ns, "type", "veth",
                 "peer", "name", f"p{n}", "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", f"p{n}", "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")

    def prefix(self, host: str) -> tuple:
        """Run a command on ``host``: in its namespace, under its own hostname."""
        return ("ip", "netns", "exec", self.ns[host], "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', f"host-{host}")

    def env(self, host: str) -> dict:
        env = os.environ.copy()
        env["SHOAL_HOME"] = str(self.dirs[host] / "home")
        env["SHOAL_RUNTIME_DIR"] = str(self.dirs[host] / "run")
        env.pop("SHOAL_CONNECTION_FILE", None)
        return env

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def python(self, host: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        """Run ``python ARGS`` on ``host`` to completion."""
        return subprocess.run([*self.prefix(host), PYTHON, *args], env=self.env(host),
                              capture_output=True, text=True, timeout=timeout)

    def peer(self, host: str, *args: str, timeout: float = 90) -> dict:
        """Run the peer script on ``host``; return the JSON it prints last."""
        done = self.python(host, str(self.root / "peer.py"), *args, timeout=timeout)
        assert done.returncode == 0, f"peer {args} on {host} failed:\n{done.stderr[-3000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, timeout=3)
        for name in reversed(self.created):
            _run("ip", "netns", "del", name, check=False)
        self.created.clear()


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    probe = f"shoalprobe{os.getpid() % 100000}"
    try:
        done = _run("ip", "netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return ""


@pytest.fixture(scope="module")
def net():
    why = _netns_unavailable()
    if why:
        pytest.skip(f"no separate hosts: {why}")
    root = Path(tempfile.mkdtemp(prefix="shoal-n-", dir="/tmp"))
    network = Network(root)
    try:
        network.build()
        (root / "peer.py").write_text(PEER_SCRIPT)
        (root / "shared").mkdir()
        yield network
    finally:
        network.close()
        shutil.rmtree(root, ignore_errors=True)
        names = {network.switch, *network.ns.values()}
        leftover = [n for n in _run("ip", "netns", "list").stdout.split() if n in names]
        assert not leftover, f"namespaces left behind: {leftover}"


def _observer(broker: BrokerProcess, timeout: float = 10) -> shoal.Client:
    """A client of the broker's IPC endpoint, with the broker's own (local) key."""
    info = read_connection_file(broker.connection_file)
    return shoal.Client(ConnectionInfo(info.ipc, info.key, curve=info.curve), timeout=timeout)


def _remote_file(net: Network, name: str, host: str) -> Path:
    """``shoal keys create NAME`` on the broker host; the file copied to ``host``."""
    done = net.python("broker", "-m", "shoal", "keys", "create", name, "--address",
                      f"tcp://{BROKER_IP}:{PORT}")
    assert done.returncode == 0, done.stderr
    made = net.dirs["broker"] / "home" / "broker" / "peers" / f"{name}.json"
    return private_copy(made, net.dirs[host] / f"{name}.json")


@pytest.fixture(scope="module")
def secure(net):
    """A broker on 10.213.0.1 (Curve, automatically) and workers w1, w2 on their own hosts."""
    broker = BrokerProcess(net.dirs["broker"], "--listen", f"{BROKER_IP}:{PORT}",
                           "--log-level", "DEBUG", env=net.env("broker"),
                           prefix=net.prefix("broker"))
    net.track(broker.proc)
    assert "Curve-secured" in broker.log_text()
    assert broker.info.curve is not None
    files = {host: _remote_file(net, host, host) for host in ("w1", "w2", "client")}
    for host in ("w1", "w2"):
        net.track(start_worker(net.dirs[host], str(files[host]), host, net.env(host),
                               net.prefix(host)))
    with _observer(broker) as observer:
        observer.wait_for_workers(2, 60)
    broker.files = files
    yield broker
    broker.stop()


# ================================================================= the peer script
PEER_SCRIPT = r'''
"""What a remote host runs: a client, an attacker's replay, an intruder's probe."""
import json, os, socket, sys, time
import zmq
from zmq.utils.monitor import recv_monitor_message
import shoal
from shoal import protocol, serialize
from shoal.protocol import Kind
from shoal.security import apply_curve, read_connection_file
from shoal.transport import recv_frames


def where(x):
    import os, socket, time
    time.sleep(0.02)  # long enough that both workers get items
    return x * x, socket.gethostname(), os.getpid()


def echo(arg):
    import socket
    return arg.replace("ARG", "RESULT"), socket.gethostname()


def mark(directory, token):
    import os, socket, time
    open(os.path.join(directory, f"{token}-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    return socket.gethostname()


def main():
    mode, conn = sys.argv[1], sys.argv[2]
    out = {"host": socket.gethostname(), "pid": os.getpid()}
    if mode == "map":
        with shoal.Client(conn, timeout=30) as c:
            c.wait_for_workers(2, 60)
            r = c.map(where, range(24), batch_size=1)
            out["values"] = r.result(timeout=120)
            out["counts"] = r.worker_counts()
            out["run"] = {n: [f.result(60)[1:], f.worker] for n, f in c.run(where, 2).items()}
    elif mode == "echo":
        with shoal.Client(conn, timeout=30) as c:
            f = c.submit(echo, sys.argv[3])
            out["echo"], out["worker"] = f.result(60), f.worker
            if len(sys.argv) > 4:
                out["mark"] = c.submit(mark, sys.argv[4], sys.argv[5]).result(60)
    elif mode == "replay-signed":
        # A peer holding an allowed key sends one signed SUBMIT twice.
        info = read_connection_file(conn)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        apply_curve(sock, info)
        sock.connect(info.address)
        session = protocol.Session()
        def send(kind, fields=None, frames=()):
            m = protocol.encode(info.key, kind, fields, frames, session=session)
            sock.send_multipart(m)
            return m
        def wait_for(kind):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if sock.poll(500):
                    msg = protocol.decode(info.key, recv_frames(sock, block=True))
                    if msg.kind == kind:
                        return msg
            raise TimeoutError(kind)
        send(Kind.CLIENT_HELLO)
        bs = wait_for(Kind.WELCOME).header["session"]
        payload, digest = serialize.dumps_function(mark)
        parts, meta = serialize.dumps_call(mark, (sys.argv[3], sys.argv[4]), {})
        captured = send(Kind.SUBMIT, {"bs": bs, "ob": [[digest, 1]],
                                      "u": [[1, [digest], len(parts), meta]]}, [payload, *parts])
        result = wait_for(Kind.RESULTS)
        out["first"] = result.header["r"][0][1]
        send(Kind.STATUS)
        before = wait_for(Kind.STATUS_REPLY).header["counts"]
        sock.send_multipart(captured)
        send(Kind.STATUS)
        after = wait_for(Kind.STATUS_REPLY).header["counts"]
        out["before"], out["after"] = before, after
        sock.close(0)
    elif mode == "replay-frames":
        # An attacker on the wire re-sends messages it captured, from its own connection.
        messages = [[bytes.fromhex(f) for f in m] for m in json.loads(open(sys.argv[3]).read())]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(conn)
        for m in messages:
            sock.send_multipart(m)
        out["sent"] = len(messages)
        out["received"] = len(sock.recv_multipart()) if sock.poll(1000) else 0
        sock.close()
    elif mode == "replay-bytes":
        # An attacker re-sends a captured TCP byte stream over a new connection.
        host, port = conn.rsplit(":", 1)
        data = open(sys.argv[3], "rb").read()
        s = socket.create_connection((host, int(port)), timeout=10)
        received, closed = 0, False
        try:
            # As a real peer does: the broker's greeting first (its 10-byte signature).
            while received < 10:
                chunk = s.recv(64)
                if not chunk:
                    break
                received += len(chunk)
            s.sendall(data)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                received += len(chunk)
        except (ConnectionResetError, BrokenPipeError, socket.timeout):
            closed = True
        s.close()
        out["sent"], out["received"], out["closed"] = len(data), received, closed
    elif mode == "intrude":
        # Knows the address, the signing key and the broker's public key; its own Curve
        # keypair was never allowed.  Also tries without Curve at all.
        info = read_connection_file(conn)
        ctx = zmq.Context.instance()
        results = {}
        public, secret = zmq.curve_keypair()
        for how in ("unknown-key", "no-curve"):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if how == "unknown-key":
                sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.curve_serverkey = info.curve["server_key"].encode()
            mon = sock.get_monitor_socket()
            sock.connect(info.address)
            sock.send_multipart(protocol.encode(info.key, Kind.WORKER_HELLO,
                                                {"name": "intruder-" + how, "slots": 1}))
            sock.send_multipart(protocol.encode(info.key, Kind.CLIENT_HELLO))
            events = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                    e in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED)
                    for e in events):
                if mon.poll(100):
                    events.append(recv_monitor_message(mon)["event"])
            received = 0
            deadline = time.monotonic() + 1.0  # anything already sent would be here by now
            while time.monotonic() < deadline:
                if sock.poll(100):
                    sock.recv_multipart()
                    received += 1
            results[how] = {"events": events, "received": received,
                            "succeeded": zmq.EVENT_HANDSHAKE_SUCCEEDED in events}
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)
        out["results"], out["public_key"] = results, public.decode()
    print(json.dumps(out))


main()
'''


# ================================================================= capture
class Capture:
    """tcpdump on the broker host's eth0, writing a pcap file."""

    def __init__(self, net: Network, name: str) -> None:
        if shutil.which("tcpdump") is None:
            pytest.skip("tcpdump is not installed (apt-get install -y tcpdump)")
        self.net = net
        self.path = net.root / f"{name}.pcap"
        self.log = net.root / f"{name}.tcpdump.log"
        with open(self.log, "wb") as err:
            self.proc = net.track(subprocess.Popen(
                ["ip", "netns", "exec", net.ns["broker"], "tcpdump", "-i", "eth0", "-n", "-U",
                 "-Z", "root", "-s", "0", "-w", str(self.path)],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
        wait_until(lambda: "listening on" in self.log.read_text() or self.proc.poll() is not None,
                   20, 0.02, "tcpdump to start")
        assert self.proc.poll() is None, self.log.read_text()

    def finish(self) -> list:
        """Stop once everything sent so far is in the file; return the packets."""
        sentinel = f"CAPTURE-END-{os.urandom(6).hex()}".encode()
        self.net.python("client", "-c", (
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto("
            f"{sentinel!r}, ({BROKER_IP!r}, 9))"))
        wait_until(lambda: sentinel in self.path.read_bytes(), 20, 0.02,
                   "the capture to see everything before the sentinel")
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        return read_pcap(self.path.read_bytes())


def read_pcap(data: bytes) -> list:
    """``[(src, dst, sport, dport, flags, seq, payload)]`` of the TCP packets in a pcap."""
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, f"not an Ethernet capture (link type {linktype})"
    packets, pos = [], 24
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[pos + 8:pos + 12])[0]
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < incl or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6:
            continue
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        offset = (tcp[12] >> 4) * 4
        packets.append((src, dst, sport, dport, tcp[13], seq, tcp[offset:]))
    return packets


def tcp_streams(packets: list, dst: str, dport: int) -> dict:
    """The byte stream each connection sent to ``dst:dport``, by ``(src, sport)``."""
    segments: dict = {}
    for src, d, sport, dp, flags, seq, payload in packets:
        if d == dst and dp == dport:
            conn = segments.setdefault((src, sport), {})
            if flags & 0x02:  # SYN
                conn["isn"] = seq
            elif payload:
                conn[seq] = payload
    streams = {}
    for conn, parts in segments.items():
        isn = parts.pop("isn", None)
        if isn is None:
            continue
        stream, expect = bytearray(), (isn + 1) & 0xFFFFFFFF
        for seq in sorted(parts, key=lambda s: (s - expect) & 0xFFFFFFFF):
            payload = parts[seq]
            skip = (expect - seq) & 0xFFFFFFFF
            if skip < len(payload):  # skip what a retransmission repeats
                stream += payload[skip:]
                expect = (expect + len(payload) - skip) & 0xFFFFFFFF
        streams[conn] = bytes(stream)
    return streams


def zmtp_messages(stream: bytes) -> list:
    """The multipart messages in a ZMTP 3 stream (greeting and commands skipped)."""
    messages, frames, pos = [], [], 64  # the greeting is 64 bytes
    while pos < len(stream):
        flags = stream[pos]
        if flags & 0x02:
            if pos + 9 > len(stream):
                break
            size = struct.unpack("!Q", stream[pos + 1:pos + 9])[0]
            pos += 9
        else:
            if pos + 2 > len(stream):
                break
            size = stream[pos + 1]
            pos += 2
        body = stream[pos:pos + size]
        pos += size
        if len(body) < size:
            break
        if flags & 0x04:
            continue  # a command (READY, ...)
        frames.append(body)
        if not flags & 0x01:
            messages.append(frames)
            frames = []
    return messages


def _payload_bytes(packets: list, port: int) -> tuple:
    to = sum(len(p[6]) for p in packets if p[1] == BROKER_IP and p[3] == port)
    back = sum(len(p[6]) for p in packets if p[0] == BROKER_IP and p[2] == port)
    return to, back


def _runs(net: Network, token: str) -> list:
    return [p.name for p in (net.root / "shared").iterdir() if p.name.startswith(token + "-")]


# ================================================================= the tests
def test_a_map_completes_across_hosts(net, secure):
    out = net.peer("client", "map", str(secure.files["client"]))
    assert [v[0] for v in out["values"]] == [x * x for x in range(24)]
    hosts = {v[1] for v in out["values"]}
    assert hosts <= {"host-w1", "host-w2"} and out["host"] == "host-client"
    assert out["host"] not in hosts
    assert out["pid"] not in {v[2] for v in out["values"]}
    assert set(out["counts"]) == {"w1", "w2"} and sum(out["counts"].values()) == 24
    # client.run reaches each worker by name, on its own host.
    assert {name: (where[0], worker) for name, (where, worker) in out["run"].items()} == {
        "w1": ("host-w1", "w1"), "w2": ("host-w2", "w2")}
    with _observer(secure) as observer:
        state = observer.status()
    assert {w["name"]: w["host"] for w in state["worker_list"]} == {"w1": "host-w1",
                                                                     "w2": "host-w2"}


def _denied(broker: BrokerProcess, public_key: str) -> int:
    return sum(1 for line in broker.log_text().splitlines()
               if "DENIED" in line and public_key in line)


def test_a_worker_without_the_right_key_cannot_join_and_learns_nothing(net, secure):
    # The intruder holds the address, the signing key and the broker's public key.
    leaked = private_copy(secure.files["client"], net.dirs["intruder"] / "leaked.json")
    out = net.peer("intruder", "intrude", str(leaked))
    unknown, plain = out["results"]["unknown-key"], out["results"]["no-curve"]
    assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in unknown["events"], unknown
    assert not unknown["succeeded"] and unknown["received"] == 0
    assert not plain["succeeded"] and plain["received"] == 0, plain
    assert _denied(secure, out["public_key"]) >= 1
    print(f"\nintruder: {out['results']}")

    # A real worker process with a keypair of its own making.
    data = json.loads(leaked.read_text())
    public, secret = zmq.curve_keypair()
    data["curve"].update(public_key=public.decode(), secret_key=secret.decode())
    stranger = net.dirs["intruder"] / "stranger.json"
    fd = os.open(stranger, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    worker = net.track(start_worker(net.dirs["intruder"], str(stranger), "stranger",
                                    net.env("intruder"), net.prefix("intruder")))
    try:
        wait_until(lambda: _denied(secure, public.decode()) >= 2, 30, 0.05,
                   "the broker to refuse the stranger worker's sockets")
        with _observer(secure) as observer:
            names = {w["name"] for w in observer.status()["worker_list"]}
        assert names == {"w1", "w2"}
        assert worker.wait(10) == 1, "the refused stranger worker did not exit with 1"
        log = (net.dirs["intruder"] / "stranger.log").read_text()
        assert "refused this worker's key" in log, log
        assert "registered with the broker" not in log
        assert "dropped a message" not in log, "the stranger received something"
    finally:
        stop_process(worker, timeout=1)


def test_a_signed_message_replayed_by_an_allowed_peer_is_refused(net, secure):
    out = net.peer("client", "replay-signed", str(secure.files["client"]),
                   str(net.root / "shared"), "signed-replay")
    assert out["first"] == "ok"
    assert out["after"]["dropped"] == out["before"]["dropped"] + 1
    assert out["after"]["submitted"] == out["before"]["submitted"]
    assert len(_runs(net, "signed-replay")) == 1


def test_capture_of_a_curve_broker_holds_no_plaintext_and_its_replay_does_nothing(net, secure):
    marker = f"SHOAL-ARG-{os.urandom(8).hex()}"
    capture = Capture(net, "curve")
    out = net.peer("client", "echo", str(secure.files["client"]), marker,
                   str(net.root / "shared"), "curve-task")
    packets = capture.finish()
    assert out["echo"] == [marker.replace("ARG", "RESULT"), out["echo"][1]]
    assert out["echo"][1] in ("host-w1", "host-w2")
    raw = capture.path.read_bytes()
    to, back = _payload_bytes(packets, PORT)
    assert to > 1000 and back > 1000, f"the capture saw too little traffic ({to}, {back} bytes)"
    assert marker.encode() not in raw, "the task's argument crossed the wire in plaintext"
    assert marker.replace("ARG", "RESULT").encode() not in raw, "the result is in plaintext"
    assert b"shoal" not in raw.lower(), "plaintext on the wire"

    # An attacker re-sends the client's captured byte streams over new connections.
    streams = {c: s for c, s in tcp_streams(packets, BROKER_IP, PORT).items()
               if c[0] == f"{SUBNET}.{HOSTS['client']}"}
    assert streams, "no client connection in the capture"
    replays = []
    with _observer(secure) as observer:
        before = observer.status()["counts"]
        for i, stream in enumerate(streams.values()):
            path = net.root / f"stream-{i}.bin"
            path.write_bytes(stream)
            replay = net.peer("intruder", "replay-bytes", f"{BROKER_IP}:{PORT}", str(path))
            assert replay["sent"] == len(stream)
            assert replay["received"] >= 10, "the replayed stream never reached the broker"
            assert replay["closed"], "the broker kept a connection replaying a Curve stream"
            replays.append(replay)
        after = observer.status()["counts"]
    assert after["submitted"] == before["submitted"], "a replayed byte stream was decrypted"
    assert after["dropped"] == before["dropped"], "a replayed byte stream reached the broker loop"
    assert len(_runs(net, "curve-task")) == 1
    print(f"\nCurve capture: {len(packets)} TCP packets, {to:,} bytes to the broker and "
          f"{back:,} back; marker absent. Replayed {len(replays)} captured client stream(s) "
          f"from another host: {replays}; nothing submitted")


@pytest.fixture(scope="module")
def insecure(net):
    """A second broker on the same host, ``--insecure``, with one worker: the control."""
    directory = net.dirs["broker"] / "insecure"
    directory.mkdir()
    broker = BrokerProcess(directory, "--listen", f"{BROKER_IP}:{INSECURE_PORT}", "--insecure",
                           env=net.env("broker"), prefix=net.prefix("broker"), name="insecure")
    net.track(broker.proc)
    assert "WITHOUT ENCRYPTION" in broker.log_text()
    assert broker.info.curve is None
    files = {host: private_copy(broker.connection_file, net.dirs[host] / "insecure.json")
             for host in ("w1", "client")}
    net.track(start_worker(net.dirs["w1"], str(files["w1"]), "insecure-w1", net.env("w1"),
                           net.prefix("w1")))
    with shoal.Client(ConnectionInfo(broker.info.ipc, broker.info.key), timeout=10) as c:
        c.wait_for_workers(1, 60)
    broker.files = files
    yield broker
    broker.stop()


def test_capture_of_an_insecure_broker_shows_the_marker_and_a_replayed_frame_is_refused(
        net, insecure):
    marker = f"SHOAL-ARG-{os.urandom(8).hex()}"
    capture = Capture(net, "insecure")
    out = net.peer("client", "echo", str(insecure.files["client"]), marker,
                   str(net.root / "shared"), "insecure-task")
    packets = capture.finish()
    assert out["echo"][0] == marker.replace("ARG", "RESULT")
    raw = capture.path.read_bytes()
    # The control: without Curve the same capture does show the plaintext.
    assert marker.encode() in raw
    assert marker.replace("ARG", "RESULT").encode() in raw

    # Take every message the client sent off the wire, signed and all, and replay it.
    key = insecure.info.key
    captured = []
    for (src, _), stream in tcp_streams(packets, BROKER_IP, INSECURE_PORT).items():
        if src == f"{SUBNET}.{HOSTS['client']}":
            captured += zmtp_messages(stream)
    kinds = [protocol.decode(key, unbundle(m)).kind for m in captured]  # all validly signed
    assert Kind.SUBMIT in kinds and Kind.CLIENT_HELLO in kinds, kinds
    path = net.root / "captured.json"
    path.write_text(json.dumps([[f.hex() for f in m] for m in captured]))
    with shoal.Client(ConnectionInfo(insecure.info.ipc, key), timeout=10) as observer:
        before = observer.status()["counts"]
        replay = net.peer("intruder", "replay-frames", f"tcp://{BROKER_IP}:{INSECURE_PORT}",
                          str(path))
        assert replay["sent"] == len(captured) and replay["received"] == 0
        wait_until(lambda: observer.status()["counts"]["dropped"]
                   >= before["dropped"] + len(captured), 20, 0.05,
                   "the broker to refuse every replayed message")
        after = observer.status()["counts"]
    assert after["dropped"] == before["dropped"] + len(captured)
    assert after["submitted"] == before["submitted"]
    assert len(_runs(net, "insecure-task")) == 1
    print(f"\ninsecure control: marker seen in the capture; {len(captured)} captured messages "
          f"({', '.join(kinds)}) replayed from another host, all refused")
