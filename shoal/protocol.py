"""The wire protocol: message kinds, framing, signing and verification.

Every message is a ZeroMQ multipart ``[signature, header, *frames]``:

* ``header`` is a msgpack map (never pickle) holding the protocol version ``v``,
  the message kind ``k``, the frame count ``nf`` and kind-specific fields.
* ``frames`` are opaque bytes: cloudpickled payloads and out-of-band buffers.
* ``signature`` is HMAC-SHA256 with the cluster key over the frame count and
  the length of the header and of every frame (8 bytes each, so where each
  frame begins and ends is signed too), then the header and every frame
  smaller than :data:`BIG_FRAME`.  Frames of that size or larger are covered
  by their SHA-256 digest, listed in the signed header under ``bd``, so a
  broker can route a large buffer without hashing it and the receiver that
  decodes it checks the digest before use (:class:`FrameAltered` if it fails).
* Replays are refused: each sending socket has a :class:`Session` (a random
  ``sid``) and numbers its messages (``seq``); a :class:`ReplayGuard` on the
  receiving side refuses a message not newer than the last from its ``sid``.
  Requests that act also name the broker run they are meant for (``bs``), so
  a message captured in one run of the broker does nothing in the next.

This module is pure: no sockets, no pickle.  Nothing else builds frames.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import os
import struct
from dataclasses import dataclass, field
from typing import Sequence

import msgpack

#: 2: the signature covers every frame's length (1 signed the bytes alone).
#: 3: small frames travel bundled (shoal.transport); a client's copy of its direct
#: tasks carries their values, and workers send no copy of what they delivered.
PROTOCOL_VERSION = 3
SIGNATURE_SIZE = 32
BIG_FRAME = 1 << 16
MAX_HEADER = 1 << 24


class Kind:
    """Message kinds; short strings keep headers small."""

    # client -> broker
    CLIENT_HELLO = "ch"
    SUBMIT = "sub"          # one or more task units
    CANCEL = "can"          # task ids to withdraw from the queue
    STATUS = "st"           # ask for cluster state
    SCATTER = "sc"          # data to keep on the broker for tasks to reference
    CLIENT_BYE = "cb"
    WORKER_LOST = "wl"       # a local cluster saw a worker process exit
    ATTACH = "at"            # finished and running parts of a keyed map
    TASK_INFO = "ti"         # the states of tasks (future.status)
    FETCH = "fe"             # a task's result by id, now or when it finishes
    LOCK = "lk"              # acquire or release a broker-held lock (clients and tasks)
    SCHEDULE = "sch"         # create, list or cancel periodic tasks
    WATCH = "wa"             # stream task and worker events to this socket
    RESUME = "rsm"           # after a durable broker restarted: re-adopt these tasks
    # worker -> broker
    WORKER_HELLO = "wh"
    RESULTS = "res"          # one or more finished units
    HEARTBEAT = "hb"
    OUTPUT = "out"           # what a running task printed (worker -> broker -> client)
    WORKER_BYE = "wb"
    # broker -> worker
    TASKS = "tk"
    SHUTDOWN = "sd"
    # broker -> client
    WELCOME = "wel"
    STATUS_REPLY = "sr"
    ATTACHED = "atd"
    CANCELLED = "cd"         # task ids removed from the queue before running
    ERROR = "err"            # a request was refused; ``msg`` says why
    NOTICE = "nt"            # something the user should know (``msg``); the client logs it
    REPLY = "rp"             # the answer to a request, matched by ``rq``
    EVENTS = "ev"            # task and worker events, to a socket that asked (WATCH)
    ACK = "ack"              # a durable broker stored these submitted tasks
    NEED = "nd"              # the broker asks a client for a dependency's value

    ALL = frozenset(
        v for k, v in vars().items() if k.isupper() and isinstance(v, str)
    )


#: Requests that act must name this run of the broker (``bs``): replayed from
#: an earlier run, they are refused.
SESSION_BOUND = frozenset({Kind.SUBMIT, Kind.SCATTER, Kind.CANCEL, Kind.ATTACH, Kind.WORKER_LOST,
                           Kind.LOCK, Kind.SCHEDULE, Kind.FETCH})


class ProtocolError(Exception):
    """A message that must be dropped: unsigned, forged, truncated or malformed."""


class VersionMismatch(ProtocolError):
    """A correctly signed message from a peer speaking another protocol version."""


class FrameAltered(ProtocolError):
    """A correctly signed message one of whose large frames does not match its
    signed digest: it was altered in transit.

    The header is authentic, so the receiver may answer what it names (fail
    the tasks it carries, say); ``message`` holds it with every altered frame
    replaced by ``None``, so nothing of those can be unpickled, and
    ``altered`` lists their indices.
    """

    def __init__(self, text: str, message: "Message", altered: list) -> None:
        super().__init__(text)
        self.message = message
        self.altered = altered


class Replayed(ProtocolError):
    """A correctly signed message seen before (or older than one seen): a replay."""


class Session:
    """A sending socket's identity for replay protection: a random id and a counter."""

    __slots__ = ("sid", "_seq")

    def __init__(self) -> None:
        self.sid = os.urandom(8)
        self._seq = itertools.count(1)

    def stamp(self, header: dict) -> None:
        header["sid"] = self.sid
        header["seq"] = next(self._seq)


class ReplayGuard:
    """Refuses a message whose ``seq`` is not above the last seen from its ``sid``.

    ZeroMQ delivers each connection's messages in order, so a sender's
    numbers only grow; anything else is a captured message sent again.
    """

    def __init__(self, max_senders: int = 100_000) -> None:
        self.max_senders = max_senders
        self._last: dict = {}
        self.refused = 0

    def check(self, header: dict) -> None:
        sid, seq = header.get("sid"), header.get("seq")
        if not isinstance(sid, bytes) or type(seq) is not int:
            self.refused += 1
            raise Replayed("message carries no session and sequence number")
        last = self._last.get(sid, 0)
        if seq <= last:
            self.refused += 1
            raise Replayed(f"message {seq} from session {sid.hex()} was already seen "
                           f"(last {last}): a replay")
        if last == 0 and len(self._last) >= self.max_senders:
            self._last.pop(next(iter(self._last)))  # forget the oldest sender
        self._last[sid] = seq


@dataclass
class Message:
    """A verified, decoded message."""

    kind: str
    header: dict
    frames: list = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Message({self.kind!r}, {len(self.frames)} frames)"


# Always set by encode; a field of the same name would vanish.
_RESERVED = frozenset({"v", "k", "nf", "sid", "seq"})


#: Packers of the lengths block (frame count, header length, each frame's length),
#: by frame count: building a Struct per message would cost more than the hash.
_LENGTHS = [struct.Struct(f"<{n + 2}Q").pack for n in range(64)]


@functools.lru_cache(maxsize=16)
def _keyed(key: bytes):
    """HMAC-SHA256 keyed with ``key``, to copy: the key schedule is paid once, not per message."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _sign(key: bytes, header, frames: Sequence) -> bytes:
    # The lengths come first, so moving bytes from one frame to the next changes
    # what is signed.  One update of the joined small frames costs less than an
    # update per frame (the copy is cheaper than the calls).
    mac = _keyed(key).copy()
    n = len(frames)
    if n == 0:
        mac.update(_LENGTHS[0](0, len(header)) + header)
        return mac.digest()
    lengths = [n, len(header)]
    parts = [b"", header]
    for frame in frames:
        size = len(frame)
        lengths.append(size)
        if size < BIG_FRAME:
            parts.append(frame)
    parts[0] = (_LENGTHS[n] if n < 64 else struct.Struct(f"<{n + 2}Q").pack)(*lengths)
    mac.update(b"".join(parts))
    return mac.digest()


def _signed_by_version_1(key: bytes, header, frames: Sequence, sig: bytes) -> bool:
    """Whether ``sig`` is version 1's signature (no lengths): an older peer to tell so."""
    mac = hmac.new(key, header, hashlib.sha256)
    for frame in frames:
        if len(frame) < BIG_FRAME:
            mac.update(frame)
    return hmac.compare_digest(mac.digest(), sig)


def frame_digest(frame) -> bytes:
    """SHA-256 of one large frame, as carried in a header's ``bd`` map."""
    return hashlib.sha256(frame).digest()


def encode(key: bytes, kind: str, fields: dict | None = None,
           frames: Sequence = (), digests: dict | None = None,
           session: Session | None = None) -> list:
    """Return the frames of a signed message of ``kind``.

    ``frames`` are bytes-like; large ones are covered by digest.  ``digests``
    maps frame index to an already known digest (a broker forwarding a buffer
    it did not hash passes the digest it received).  ``session`` numbers the
    message for the receiver's :class:`ReplayGuard`; without one the message
    gets a session of its own (still refused if sent twice).
    """
    header = dict(fields) if fields else {}
    if _RESERVED.intersection(header):
        raise ValueError(f"header fields {sorted(_RESERVED.intersection(header))} are reserved")
    (session or Session()).stamp(header)
    header["v"] = PROTOCOL_VERSION
    header["k"] = kind
    header["nf"] = len(frames)
    big = {}
    for i, frame in enumerate(frames):
        if len(frame) >= BIG_FRAME:
            known = digests.get(i) if digests else None
            big[i] = known if known is not None else frame_digest(frame)
    if big:
        header["bd"] = big
    packed = msgpack.packb(header, use_bin_type=True)
    return [_sign(key, packed, frames), packed, *frames]


def _unpack_header(raw) -> dict:
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=False,
            max_bin_len=MAX_HEADER, max_str_len=MAX_HEADER,
            max_array_len=1 << 22, max_map_len=1 << 22, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    return header


def decode(key: bytes, frames: Sequence, verify_buffers: bool = True,
           guard: ReplayGuard | None = None) -> Message:
    """Verify and decode a multipart message; raise :class:`ProtocolError` if bad.

    The signature is checked before the header is parsed.  With
    ``verify_buffers=False`` (the broker, which never reads buffers) large
    frames are not hashed; their digests stay in the header for the receiver.
    A large frame that does not match its digest raises :class:`FrameAltered`
    (after the replay check).  With a ``guard``, a message seen before raises
    :class:`Replayed`.
    """
    if len(frames) < 2:
        raise ProtocolError(f"truncated message: {len(frames)} frame(s), need at least 2")
    sig, raw = frames[0], frames[1]
    body = frames[2:]
    if len(sig) != SIGNATURE_SIZE:
        raise ProtocolError("missing or malformed signature")
    if len(raw) > MAX_HEADER:
        raise ProtocolError("header too large")
    sig = bytes(sig)
    if not hmac.compare_digest(_sign(key, raw, body), sig):
        if _signed_by_version_1(key, raw, body, sig):
            _check_version(_unpack_header(raw))
        raise ProtocolError("bad signature")
    header = _unpack_header(raw)
    try:
        message, altered = _check(header, body, verify_buffers)
        if guard is not None:
            guard.check(header)
    except (TypeError, AttributeError, ValueError, OverflowError) as exc:
        # Correctly signed yet the wrong shape: a buggy peer, dropped all the same.
        raise ProtocolError(f"malformed header ({exc!r})") from None
    if altered:
        for i in altered:
            message.frames[i] = None
        raise FrameAltered(f"large frame(s) {altered} do not match their signed digest: "
                           "altered in transit", message, altered)
    return message


def _check_version(header: dict) -> None:
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"peer speaks shoal protocol version {version!r}, this process speaks "
            f"{PROTOCOL_VERSION}; install the same shoal version on every machine"
        )


def _check(header: dict, body: Sequence, verify_buffers: bool) -> tuple:
    """``(message, indices of large frames that do not match their digest)``."""
    _check_version(header)
    kind = header.get("k")
    if not isinstance(kind, str) or kind not in Kind.ALL:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if header.get("nf") != len(body):
        raise ProtocolError(f"frame count {len(body)} does not match header ({header.get('nf')!r})")
    big = header.get("bd") or {}
    if not isinstance(big, dict):
        raise ProtocolError("digest map is not a map")
    altered = []
    for i, frame in enumerate(body):
        if len(frame) >= BIG_FRAME:
            digest = big.get(i)
            if not isinstance(digest, bytes):
                raise ProtocolError(f"large frame {i} has no digest")
            if verify_buffers and not hmac.compare_digest(frame_digest(frame), digest):
                altered.append(i)
        elif i in big:
            raise ProtocolError(f"frame {i} was truncated")
    return Message(kind, header, list(body)), altered


def frame_digests(header: dict, start: int, stop: int) -> dict:
    """Digests of the large frames in ``[start, stop)``, re-indexed from 0.

    Used when forwarding a slice of one message's frames inside another.
    """
    big = header.get("bd")
    if not big:
        return _NO_DIGESTS
    return {i - start: d for i, d in big.items() if start <= i < stop}


#: What :func:`frame_digests` returns for frames with no large ones: shared by
#: every unit of every small task, so never to be written to.
_NO_DIGESTS: dict = {}

def identity_field(header: dict, name: str, default):
    """The socket identity that header field ``name`` holds, or ``default`` without one.

    Peers name their other sockets by identity (``rt``: a client's receiving
    socket, ``wid``/``ctl``: a worker's main and control sockets), and the broker
    later routes to them; anything but 1 to 255 bytes (ZeroMQ's routing ids)
    is refused here, as a malformed message, not when a send fails.
    """
    value = header.get(name, default)
    if value is not default and (type(value) is not bytes or not 1 <= len(value) <= 255):
        raise ValueError(f"header field {name!r} is not a socket identity: {value!r:.40}")
    return value
