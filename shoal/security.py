"""Cluster keys and connection files.

A connection file is JSON, written with file mode 0600, holding what a client
or worker needs to join: the broker's address, the signing key (hex) and the
protocol version.  Give it to a remote machine to let it join; anyone holding
it can run code on the workers.
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .protocol import PROTOCOL_VERSION

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh random cluster key."""
    return secrets.token_bytes(KEY_BYTES)


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

    def to_json(self) -> dict:
        return {"address": self.address, "key": self.key.hex(), "version": self.version,
                "ipc": self.ipc, "host": self.host}

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
    if version != PROTOCOL_VERSION:
        raise ValueError(
            f"connection file {path} is for shoal protocol {version}, this is {PROTOCOL_VERSION}")
    return ConnectionInfo(address, key, version, ipc=data.get("ipc"), host=data.get("host"))


def read_key_file(path: str | os.PathLike) -> bytes:
    """A key from a connection file or a file holding the key in hex."""
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
