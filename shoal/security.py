"""Cluster keys and connection files.

A connection file is JSON, written with file mode 0600, holding what a client
or worker needs to join: the broker's address, the signing key (hex) and the
protocol version.  Give it to a remote machine to let it join; anyone holding
it can run code on the workers.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .protocol import PROTOCOL_VERSION

logger = logging.getLogger(__name__)

KEY_BYTES = 32
#: Connection files of these protocol versions hold the same fields (versions 2 and
#: 3 changed only messages), so files made before an upgrade still work.
READABLE_VERSIONS = frozenset({1, 2, PROTOCOL_VERSION})


def new_key() -> bytes:
    """A fresh random cluster key."""
    return secrets.token_bytes(KEY_BYTES)


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an ipc:// or tcp:// endpoint) reaches this host only."""
    host = address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    return address.startswith("ipc://") or host in ("localhost", "::1") or host.startswith("127.")


def runtime_dir() -> Path:
    """Where shoal keeps connection files and logs (``$SHOAL_RUNTIME_DIR`` overrides)."""
    base = os.environ.get("SHOAL_RUNTIME_DIR")
    if base:
        path = Path(base)
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        root = Path(xdg) if xdg and os.access(xdg, os.W_OK) else Path(tempfile.gettempdir())
        path = root / f"shoal-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class ConnectionInfo:
    """What a client or worker needs to reach a broker."""

    address: str
    key: bytes
    version: int = PROTOCOL_VERSION
    #: an IPC endpoint of the same broker, and the host it serves it on
    ipc: Optional[str] = None
    host: Optional[str] = None
    #: for a Curve-secured broker: its public key and this peer's keypair (z85)
    curve: Optional[dict] = None

    def to_json(self) -> dict:
        data = {"address": self.address, "key": self.key.hex(), "version": self.version,
                "ipc": self.ipc, "host": self.host}
        if self.curve:
            data["curve"] = self.curve
        return data

    def local_address(self) -> str:
        """The IPC endpoint when this process is on the broker's host, else the address."""
        from .serialize import host_id
        if self.ipc and self.host == host_id():
            return self.ipc
        return self.address

    def __repr__(self) -> str:  # never print the key
        return f"ConnectionInfo(address={self.address!r}, version={self.version})"


def write_connection_file(info: ConnectionInfo, path: str | os.PathLike) -> Path:
    """Write ``info`` to ``path`` with mode 0600, atomically, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info.to_json(), fh, indent=1)
    os.replace(tmp, path)
    os.chmod(path, 0o600)
    return path


def read_connection_file(path: str | os.PathLike) -> ConnectionInfo:
    """Read a connection file; raise ``ValueError`` naming what is wrong with it."""
    path = Path(path)
    try:
        check_private(path)
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"connection file {path} does not exist; the broker writes it on start "
            "(see `shoal broker --connection-file`)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"connection file {path} is not valid JSON: {exc}") from None
    try:
        address = data["address"]
        key = bytes.fromhex(data["key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"connection file {path} lacks a valid 'address' or 'key' ({exc})") from None
    version = data.get("version", PROTOCOL_VERSION)
    if not isinstance(version, int) or version not in READABLE_VERSIONS:
        raise ValueError(
            f"connection file {path} is for shoal protocol {version}, this is {PROTOCOL_VERSION}")
    curve = data.get("curve")
    if curve is not None and not (isinstance(curve, dict) and all(
            isinstance(curve.get(k), str) for k in ("server_key", "public_key", "secret_key"))):
        raise ValueError(f"connection file {path} has a malformed 'curve' section")
    return ConnectionInfo(address, key, version, ipc=data.get("ipc"), host=data.get("host"),
                          curve=curve)


def read_key_file(path: str | os.PathLike) -> bytes:
    """A key from a connection file or a file holding the key in hex."""
    check_private(path)
    text = Path(path).read_text().strip()
    if text.startswith("{"):
        return read_connection_file(path).key
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"key file {path} holds neither a connection file nor a hex key") from None


def local_connection_files(address: Optional[str] = None) -> list:
    """Connection files of live brokers on this host, newest first.

    Looks at stand-alone brokers (``broker-PID.json``) and local clusters
    (``cluster-*/connection.json``) in the runtime directory; a file whose
    broker's IPC socket is gone belongs to a broker that has stopped.
    """
    root = runtime_dir()
    found = []
    for path in [*root.glob("broker-*.json"), *root.glob("cluster-*/connection.json")]:
        try:
            mtime = path.stat().st_mtime
            info = read_connection_file(path)
        except (OSError, ValueError):
            continue
        if info.ipc and info.ipc.startswith("ipc://") and not Path(info.ipc[6:]).exists():
            continue
        if address is None or info.address == address:
            found.append((mtime, path))
    return [path for _, path in sorted(found, reverse=True)]


def find_local_broker(address: Optional[str] = None) -> ConnectionInfo:
    """The connection of a live broker on this host (the newest, or the one at ``address``)."""
    files = local_connection_files(address)
    if files:
        return read_connection_file(files[0])
    where = f"at {address}" if address else "on this host"
    raise LookupError(
        f"found no connection file of a running broker {where} in {runtime_dir()}: start one "
        "with shoal.Cluster() or `shoal cluster`, or pass its connection file (or key_file=)")


def resolve_connection(target=None, key: Optional[bytes] = None,
                       key_file: Optional[str] = None) -> ConnectionInfo:
    """Turn an address, a connection file, or nothing into :class:`ConnectionInfo`.

    Nothing means ``$SHOAL_CONNECTION_FILE`` or the newest local broker; an
    address without a key is looked up among the local brokers' files.
    """
    if isinstance(target, ConnectionInfo):
        return target
    if target is None:
        env = os.environ.get("SHOAL_CONNECTION_FILE")
        return read_connection_file(env) if env else find_local_broker()
    target = str(target)
    if "://" not in target or Path(target).exists():
        return read_connection_file(target)
    if key is None and key_file is not None:
        key = read_key_file(key_file)
    if key is None:
        return find_local_broker(target)
    if isinstance(key, str):
        key = bytes.fromhex(key)
    return ConnectionInfo(target, key)


# ---------------------------------------------------------------- file modes
def check_private(path: str | os.PathLike) -> None:
    """Refuse a secret-holding file that others can read, as ssh does."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path} is readable by others (mode {mode:o}) but holds a secret key; "
            f"refusing to use it. Run: chmod 600 {path}")


def write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- CurveZMQ
# A broker that listens beyond loopback encrypts and authenticates with
# CurveZMQ.  Its home directory (default ~/.shoal/broker, mode 0700) holds:
#   hmac.key              the cluster's signing key (kept, so peers' files stay valid)
#   broker.key_secret     the broker's Curve keypair (pyzmq certificate format)
#   allowed/NAME.key      the public key of each peer allowed to connect
#   peers/NAME.json       the connection file made for each peer (give it to them)
PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_home() -> Path:
    return Path(os.environ.get("SHOAL_HOME", Path.home() / ".shoal")) / "broker"


@dataclass(frozen=True)
class BrokerSecrets:
    """A secure broker's signing key and Curve keypair (z85)."""

    key: bytes
    public: bytes
    secret: bytes

    def __repr__(self) -> str:
        return f"BrokerSecrets(public={self.public.decode()!r})"


def broker_secrets(home: Path) -> BrokerSecrets:
    """Load the broker's keys from ``home``, creating them on first use."""
    import zmq.auth
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    hmac_path = home / "hmac.key"
    if not hmac_path.exists():
        write_private(hmac_path, new_key().hex())
    check_private(hmac_path)
    cert = home / "broker.key_secret"
    if not cert.exists():
        zmq.auth.create_certificates(str(home), "broker")
        os.chmod(cert, 0o600)
    check_private(cert)
    public, secret = zmq.auth.load_certificate(str(cert))
    return BrokerSecrets(bytes.fromhex(hmac_path.read_text().strip()), public, secret)


def create_peer(home: Path, name: str, address: str) -> Path:
    """Allow a new client or worker: make its keypair and connection file; return the file."""
    import zmq
    if not PEER_NAME.match(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
    if (home / "allowed" / f"{name}.key").exists():
        raise FileExistsError(f"a key named {name!r} exists; revoke it first or pick another name")
    secrets_ = broker_secrets(home)
    public, secret = zmq.curve_keypair()
    write_private(home / "allowed" / f"{name}.key", public.decode() + "\n")
    info = ConnectionInfo(address, secrets_.key, curve={
        "server_key": secrets_.public.decode(), "public_key": public.decode(),
        "secret_key": secret.decode(), "name": name})
    return write_connection_file(info, home / "peers" / f"{name}.json")


def list_peers(home: Path) -> list:
    """``[(name, public key)]`` of the allowed peers."""
    allowed = home / "allowed"
    if not allowed.is_dir():
        return []
    return [(p.stem, p.read_text().strip()) for p in sorted(allowed.glob("*.key"))]


def revoke_peer(home: Path, name: str) -> bool:
    """Remove a peer from the allow-list (its connections are refused from now on)."""
    path = home / "allowed" / f"{name}.key"
    if not path.exists():
        return False
    path.unlink()
    peer_file = home / "peers" / f"{name}.json"
    if peer_file.exists():
        peer_file.unlink()
    return True


class AllowList:
    """The broker's allow-list of peer public keys, re-read when the directory changes.

    Used as the ZAP credentials callback, and per message to drop what a peer
    sends after its key was revoked (ZAP only runs when a connection opens).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp = None
        self._keys: dict = {}

    def _refresh(self) -> None:
        try:
            stamp = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._keys = {key.encode(): name for name, key in list_peers(self.directory.parent)}

    def callback(self, domain, key: bytes) -> bool:
        """ZAP: may this public key (z85) connect?"""
        self._refresh()
        return key in self._keys

    def name_of(self, key) -> Optional[str]:
        self._refresh()
        if isinstance(key, str):
            key = key.encode()
        return self._keys.get(key)


#: Numbers the monitor endpoints: pyzmq's default name reuses the socket's file
#: descriptor, so one socket's endpoint can still be bound when a new socket gets
#: that descriptor, and binding it fails ("Address already in use").
_WATCH_IDS = itertools.count(1)
CURVE_ADVICE = ("A Curve-secured broker needs a connection file it wrote for you (`shoal keys "
                "create NAME` on its machine), holding its current server key")


class HandshakeWatch:
    """Watches a socket's handshakes with the broker through libzmq's socket monitor.

    libzmq never retries a connection whose key the broker refused, nor one where
    only one side uses Curve: the socket is left with no connection, and a peer
    would wait in silence.  :meth:`check` says why instead.  Attach before
    ``connect``; call :meth:`check` from one thread only, and :meth:`close` from
    the socket's own thread, before closing it.

    libzmq sends each event from its IO thread and waits while the event cannot
    be queued, which would stall every socket of the process; so the queue has no
    limit (nobody may read for a long while: a client's IO thread is parked while
    a caller waits in ``result()``), and monitoring stops before the reader goes.
    """

    def __init__(self, sock, info: ConnectionInfo, role: str) -> None:
        import zmq
        self._zmq = zmq
        self.sock = sock
        self.info = info
        self.role = role  # "worker" or "client", for the advice
        address = f"inproc://shoal-handshake-{next(_WATCH_IDS)}"
        sock.monitor(address, zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.monitor = sock.context.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 0)  # with it, the queue has no limit
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.monitor.connect(address)
        self._warned = False
        #: the last handshake failure libzmq retries after, as a sentence, if any
        self.last_failure: Optional[str] = None

    def check(self) -> Optional[str]:
        """Why the connection failed for good (a sentence saying what to do), or None."""
        zmq = self._zmq
        from zmq.utils.monitor import parse_monitor_message
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return None
            why = self._explain(int(event["event"]), int(event["value"]))
            if why is not None:
                return why

    def _explain(self, event: int, value: int) -> Optional[str]:
        zmq, info = self._zmq, self.info
        name = (info.curve or {}).get("name") or "NAME"
        use = (f"shoal worker --connection-file {name}.json" if self.role == "worker"
               else f'shoal.Client("{name}.json")')
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = (info.curve or {}).get("public_key", "none")
            return (f"the broker at {info.address} refused this {self.role}'s key (Curve public "
                    f"key {key}): it is not on the broker's allow-list, or it was revoked. Ask "
                    f"the broker's admin to run `shoal keys create {name} --address "
                    f"{info.address}` and give you the connection file it writes, then use "
                    f"it: `{use}`")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", None):
                mismatch = ("this {0} has Curve keys and the broker does not use Curve"
                            if info.curve else "the broker uses Curve and this {0} has no Curve "
                            "keys").format(self.role)
                return (f"the handshake with the broker at {info.address} failed: {mismatch}. "
                        f"Use a connection file that broker wrote for you (`shoal keys create "
                        f"{name}` on its machine): `{use}`")
            return (f"the handshake with the broker at {info.address} failed (ZeroMQ protocol "
                    f"error {value:#x}); is a shoal broker of the same version listening there?")
        # libzmq retries these (a wrong server key; or, racing the mismatch report, one
        # side without Curve): keep the latest for a timeout to quote, say it once.
        self.last_failure = (f"the handshake with the broker at {info.address} failed "
                             f"({os.strerror(value) if value > 0 else 'no detail'})")
        if not self._warned:
            self._warned = True
            logger.warning("%s; retrying. %s", self.last_failure, CURVE_ADVICE)
        return None

    def close(self) -> None:
        """Stop monitoring, then close the reader (never the other way round: see above)."""
        self.sock.disable_monitor()
        self.monitor.close(0)


def apply_curve(sock, info: ConnectionInfo) -> None:
    """Configure a client or worker socket for a Curve-secured broker (before connect)."""
    if not info.curve:
        return
    sock.curve_secretkey = info.curve["secret_key"].encode()
    sock.curve_publickey = info.curve["public_key"].encode()
    sock.curve_serverkey = info.curve["server_key"].encode()
