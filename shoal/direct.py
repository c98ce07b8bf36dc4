"""The direct path: a client hands a lone task straight to an idle worker on its
own host, and the worker answers it straight back, so a round trip crosses
two IPC hops instead of four through the broker.

The broker still learns everything it would otherwise see, from the client: a
copy of the submission, marked as handed to that worker (so it records the unit
as running there, holds its frames to run it again should the worker die, and
serves cancels, dependents and ``shoal status`` as usual), with the outcomes the
client has by then, values included, marked as delivered (so the broker keeps
them and settles dependents, but does not forward them; a unit done by then
travels without its arguments, as it will not run again).  The copy waits up
to :data:`NOTICE_SECONDS` to leave with others, and before anything else the
client sends the broker, so the order of its messages holds and its own next
request sees those tasks done.  The worker sends the broker only what it could
not deliver (a large result, a client gone), bounces and retries: once it also
sent a copy of each delivered result, and the broker's work on the two copies
(~20 us a task, now ~11) came in bursts that held up round trips on 2 cores (over
600 us: ~1.6% of them, now ~0.9%).
A worker's result (or bounce) may reach the broker before the client's
submission; it is held until the submission comes (:class:`Early`).

The two sides talk over a Unix socket of the SEQPACKET kind, one record per
message, read and written by the thread that needs it: no libzmq IO thread
stands between them (a pyzmq echo over IPC takes ~110 us on 2 cores, one over
such a socket ~60 us).  The worker's socket lives in the private runtime
directory (0700), it accepts only peers of its own user (``SO_PEERCRED``), and
every message is signed and verified as on any other socket.

A worker that is busy when a direct task arrives *bounces* it: it tells the
broker, which queues the unit as if it had been submitted the usual way.  So
the direct path is never slower than the broker's beyond one message, and the
broker's FIFO and load balancing decide whenever there is contention.

Only what needs nothing of the broker goes direct: a task with a pickled
function and small plain arguments (no scattered data, futures, queue,
resources, delay, unique key or rate limit), from a client with nothing else in
flight, to a broker without ``--store`` or Curve.  A small map's one batch is
such a task (see shoal.mapping.UNSPLIT_SECONDS).  Everything else, and every
task of a burst, takes the broker's path.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Optional

from . import protocol
from .protocol import Kind, ProtocolError

logger = logging.getLogger(__name__)

#: Ids of directly handed units: the broker's own never reach this bit, so the
#: client can name the unit (its task number on the base the broker gave it).
DIRECT_BIT = 1 << 62
TID_BITS = 32
TID_MASK = (1 << TID_BITS) - 1
#: Tasks and results up to this size go direct; bigger ones are not latency-bound.
MAX_DIRECT_BYTES = 1 << 16
#: The largest message on a direct socket (a function sent with its first task
#: included); a larger one takes the broker's path.
MAX_RECORD = 4 * MAX_DIRECT_BYTES
#: The scheme of a worker's direct endpoint: a Unix SEQPACKET socket's path.
SCHEME = "unix://"
#: The broker's copy of direct traffic (the client's submissions and outcomes)
#: waits up to this long to leave in batches: woken for every round trip, the
#: broker's process takes a core from the client and worker on a small host
#: (2 cores here: round trip median 255-300 us told at once, 205-220 us at 5 ms,
#: 190-205 us at 10 ms, 187-195 us never told).
NOTICE_SECONDS = 0.01
#: Task options the worker itself carries out (the rest need the broker).
WORKER_OPTIONS = frozenset({"kw", "m", "n", "rty", "tmo", "rb", "rbm", "rj", "ron"})
#: A worker's result or bounce that beat its client's submission waits this long.
EARLY_SECONDS = 60.0
#: The broker remembers this many finished direct units, to tell a late duplicate
#: result of one (its worker was declared lost, then came back) from an early one.
FINISHED_KEPT = 50_000


#: ``meta["dd"]`` of an outcome the broker need not forward: its client's copy of
#: what the worker delivered straight to it.
CLIENT_COPY = 2


def ms_until(due: float) -> int:
    """Milliseconds to wait for a poll to end by monotonic time ``due`` (0 once it is past)."""
    return max(0, 1 + int((due - time.monotonic()) * 1000))


def direct_bid(base: int, tid: int) -> int:
    """The unit id of a client's task ``tid`` handed direct (``base`` from the broker)."""
    return DIRECT_BIT | (base << TID_BITS) | tid


def is_direct(bid: int) -> bool:
    return bid >= DIRECT_BIT


# ----------------------------------------------------------------- client
class Link:
    """The client's connection to one worker's direct endpoint."""

    __slots__ = ("name", "endpoint", "sock", "session", "objects")

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.setblocking(False)
            self.sock.connect(endpoint[len(SCHEME):])  # (EAGAIN: its backlog is full)
        except OSError:
            self.sock.close()
            raise
        self.session = protocol.Session()
        self.objects: set = set()  # function digests this worker was sent

    def close(self) -> None:
        self.sock.close()


class DirectLinks:
    """The workers a client may hand a lone task to, and its sockets to them.

    Used only by the thread that holds the client's socket lock.  The client
    keeps to one worker (chosen by its id, so clients spread over workers) while
    that worker is offered: its function cache and CPU caches stay warm.
    """

    def __init__(self, host: str, salt: bytes) -> None:
        self._host = host
        self._salt = int.from_bytes(salt[:4], "big")
        self.base: Optional[int] = None  # from the broker; None: no direct path
        self.offered: list = []  # [[name, endpoint]] of this host's direct workers
        self.links: dict[str, Link] = {}  # endpoint -> link
        self.version = 0  # changes when a link opens or closes (pollers re-read links)
        self.sent = 0
        self._buffer = bytearray(MAX_RECORD)
        # Asked before reading, as the worker's endpoint does (see DirectInbox).
        self._ready = select.poll()
        self._by_fd: dict[int, str] = {}  # a link's fd -> its endpoint

    def learn(self, header: dict) -> None:
        """Read what a broker's WELCOME or HEARTBEAT offers; close links to workers gone."""
        base, offered = header.get("db"), header.get("dx")
        if base is None and offered is None:
            return
        self.base = base if type(base) is int and 0 <= base < 1 << 28 else None
        here = []
        if isinstance(offered, list) and self.base is not None:
            for entry in offered:
                if (isinstance(entry, list) and len(entry) == 3 and entry[2] == self._host
                        and isinstance(entry[0], str) and isinstance(entry[1], str)
                        and entry[1].startswith(SCHEME)):
                    here.append((entry[0], entry[1]))
        self.offered = here
        endpoints = {endpoint for _, endpoint in here}
        for endpoint in [e for e in self.links if e not in endpoints]:
            self._drop(endpoint)

    def forget_objects(self) -> None:
        """The broker restarted (its workers may have too): resend functions."""
        for link in self.links.values():
            link.objects.clear()

    def pick(self) -> Optional[Link]:
        """The link to hand a task to, opened if need be; None when none is offered
        (or its worker does not take connections: until the broker offers it again)."""
        if self.base is None or not self.offered:
            return None
        name, endpoint = self.offered[self._salt % len(self.offered)]
        link = self.links.get(endpoint)
        if link is None:
            try:
                link = Link(name, endpoint)
            except OSError as exc:
                logger.debug("no direct link to %s (%s): through the broker", name, exc)
                self.offered = [entry for entry in self.offered if entry[1] != endpoint]
                return None
            self.links[endpoint] = link
            fd = link.sock.fileno()
            self._by_fd[fd] = endpoint
            self._ready.register(fd, select.POLLIN)
            self.version += 1
        return link

    def receive(self, key: bytes, guard: protocol.ReplayGuard) -> list:
        """The verified RESULTS messages waiting on the links (others are dropped),
        one a link (a poll finds the rest); a link whose worker closed it is closed too."""
        messages = []
        for fd, _ in self._ready.poll(0):
            endpoint = self._by_fd.get(fd)
            if endpoint is None:
                continue
            frames, still_open = recv_record(self.links[endpoint].sock, self._buffer)
            if frames is not None:
                messages.extend(verified([frames], key, guard, Kind.RESULTS, "on a direct link"))
            if not still_open:
                self._drop(endpoint)
        return messages

    def _drop(self, endpoint: str) -> None:
        link = self.links.pop(endpoint)
        fd = link.sock.fileno()
        self._by_fd.pop(fd, None)
        self._ready.unregister(fd)
        link.close()
        self.version += 1

    def close(self) -> None:
        for endpoint in list(self.links):
            self._drop(endpoint)


def eligible(tid: int, fn_digest: Optional[bytes], refs: list, parts: list, meta: dict) -> bool:
    """Whether a submitted task may go direct (see the module's docstring)."""
    if fn_digest is None or refs or tid > TID_MASK:
        return False
    if meta and not WORKER_OPTIONS.issuperset(meta):
        return False
    size = 0
    for part in parts:
        size += len(part)
    return size <= MAX_DIRECT_BYTES


def send_record(sock: socket.socket, frames: list) -> bool:
    """Send one message as one record, without blocking; False if it did not go
    (its peer is gone or not reading, or it is larger than :data:`MAX_RECORD`)."""
    sizes = [memoryview(frame).nbytes for frame in frames]
    if sum(sizes) > MAX_RECORD or len(sizes) > 255:
        return False
    try:
        sock.sendmsg([struct.pack(f"!B{len(sizes)}I", len(sizes), *sizes), *frames])
    except OSError:  # EAGAIN (its buffer is full), EPIPE, ECONNRESET, EMSGSIZE, EBADF
        return False
    return True


def recv_record(sock: socket.socket, buffer: bytearray) -> tuple:
    """``(frames, open)``: the next message on ``sock`` (a poll found it readable: no
    read then ends in EAGAIN, whose exception costs more than the poll), None if
    there is none or it is malformed (dropped with a log line); and False once its
    peer closed it."""
    try:
        n, _, flags, _ = sock.recvmsg_into([buffer])
    except (BlockingIOError, InterruptedError):
        return None, True
    except OSError:  # ECONNRESET
        return None, False
    if n == 0:
        return None, False  # (no record here is empty: this is the end)
    frames = None if flags & socket.MSG_TRUNC else _unpack(memoryview(buffer)[:n])
    if frames is None:
        logger.warning("dropped a malformed record (%d bytes) on a direct socket", n)
    return frames, True


def verified(records: list, key: bytes, guard: protocol.ReplayGuard, kind: str,
             where: str) -> list:
    """The messages of ``kind`` among ``records``, verified; the rest dropped and logged."""
    messages = []
    for frames in records:
        try:
            msg = protocol.decode(key, frames, guard=guard)
        except ProtocolError as exc:
            logger.warning("dropped a message %s: %s", where, exc)
            continue
        if msg.kind == kind:
            messages.append(msg)
        else:
            logger.warning("dropped a %r message %s: only %r messages come there", msg.kind,
                           where, kind)
    return messages


def _unpack(record: memoryview) -> Optional[list]:
    """A record's frames, or None if its framing does not add up."""
    if len(record) < 1:
        return None
    count = record[0]
    start = 1 + 4 * count
    if len(record) < start:
        return None
    sizes = struct.unpack_from(f"!{count}I", record, 1)
    if start + sum(sizes) != len(record):
        return None
    frames = []
    for size in sizes:
        frames.append(bytes(record[start:start + size]))
        start += size
    return frames


# ----------------------------------------------------------------- worker
class DirectInbox:
    """A worker's direct endpoint: a Unix socket that local clients hand tasks to.

    Holds the route back to each direct unit's client (its connection) until
    its result leaves.  A one-slot worker's main thread holds ``lock`` except
    while it runs a task; then its control thread may take the socket and
    bounce what arrives.  ``version`` changes when a connection opens or closes
    (pollers re-read :meth:`fds`).
    """

    def __init__(self, key: bytes, directory: str) -> None:
        self.key = key
        self.path = os.path.join(directory, f"w-{os.getpid()}-{os.urandom(4).hex()}.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.listener.bind(self.path)
            self.listener.listen(64)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self.endpoint = SCHEME + self.path
        self.session = protocol.Session()
        self.guard = protocol.ReplayGuard()
        self.routes: dict[int, socket.socket] = {}  # direct unit id -> its client's link
        self.lock = threading.Lock()
        self.version = 0
        self._conns: dict[int, socket.socket] = {}  # fd -> connection of a client
        self._buffer = bytearray(MAX_RECORD)
        self._uid = os.getuid()
        # Asked before reading: a look at every socket costs ~0.4 us, where trying
        # each in turn costs ~2 us (accept) and ~1 us (each connection) when, as
        # after most tasks, nothing is waiting.
        self._ready = select.poll()
        self._ready.register(self.listener.fileno(), select.POLLIN)

    def fds(self) -> list:
        """The file descriptors to poll: the listening socket and each connection."""
        return [self.listener.fileno(), *self._conns]

    def receive(self) -> list:
        """``(route, message)`` for each verified TASKS message waiting."""
        ready = self._ready.poll(0)
        if not ready:
            return []
        fds = {fd for fd, _ in ready}
        if self.listener.fileno() in fds:
            fds |= self._accept()  # (a new client sends its task at once)
        messages = []
        for fd in fds:
            conn = self._conns.get(fd)
            if conn is None:
                continue  # the listener
            frames, still_open = recv_record(conn, self._buffer)
            if frames is not None:
                for msg in verified([frames], self.key, self.guard, Kind.TASKS,
                                    "on the direct endpoint"):
                    messages.append((conn, msg))
            if not still_open:
                del self._conns[fd]
                self._ready.unregister(fd)
                conn.close()
                self.version += 1
        return messages

    def _accept(self) -> set:
        """Take the connections waiting; return their fds."""
        accepted = set()
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except OSError as exc:  # EMFILE: out of file descriptors
                logger.warning("the direct endpoint cannot take a connection: %s", exc)
                return accepted
            _, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != self._uid:
                logger.warning("refused a direct connection from user %d (only %d's are "
                               "taken)", uid, self._uid)
                conn.close()
                continue
            conn.setblocking(False)
            fd = conn.fileno()
            self._conns[fd] = conn
            self._ready.register(fd, select.POLLIN)
            accepted.add(fd)
            self.version += 1

    def deliver(self, entries: list, name: str) -> set:
        """Send each ``(bid, status, frames, meta)`` whose unit came direct to its
        client; return the ids delivered (the broker is told they need no forwarding)."""
        routes = self.routes
        out: dict = {}
        for bid, status, frames, meta in entries:
            route = routes.pop(bid, None)
            if route is None or status == "retry":
                continue  # (a retry is held by the broker: its result comes from there)
            size = 0
            for frame in frames:
                size += len(frame)
            if size > MAX_DIRECT_BYTES:
                continue  # large: through the broker, which keeps it anyway
            parts = out.get(route)
            if parts is None:
                parts = out[route] = ([], [])
            parts[0].append([bid & TID_MASK, status, len(frames), {**meta, "w": name}, bid])
            parts[1].extend(frames)
        delivered = set()
        for route, (results, frames) in out.items():
            if send_record(route, protocol.encode(
                    self.key, Kind.RESULTS, {"r": [r[:4] for r in results]}, frames,
                    session=self.session)):
                delivered.update(r[4] for r in results)
            # else its client left (or does not read): the broker keeps and forwards it
        return delivered

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# ----------------------------------------------------------------- broker
class Early:
    """Results and bounces of direct units that reached the broker before the
    client's submission of them: replayed when it comes, dropped when it never does."""

    def __init__(self) -> None:
        self._held: dict[int, tuple] = {}  # bid -> (worker ident, entry, frames, digests, at)
        self._finished: dict[int, None] = {}  # the last FINISHED_KEPT direct units done

    def __bool__(self) -> bool:
        return bool(self._held)

    def __contains__(self, bid: int) -> bool:
        return bid in self._held

    def finished(self, bid: int) -> None:
        finished = self._finished
        finished[bid] = None
        if len(finished) > FINISHED_KEPT:
            del finished[next(iter(finished))]

    def late(self, bid: int) -> bool:
        """Whether an outcome of ``bid`` the broker has no unit for comes after it
        finished (a duplicate: a second run), not before its submission (early)."""
        return bid in self._finished

    def hold(self, ident: bytes, entry: list, frames: list, digests: dict) -> None:
        self._held[entry[0]] = (ident, entry, frames, digests, time.monotonic())

    def pop(self, bid: int) -> Optional[tuple]:
        return self._held.pop(bid, None)

    def expire(self) -> int:
        now = time.monotonic()
        gone = [bid for bid, held in self._held.items() if now - held[4] > EARLY_SECONDS]
        for bid in gone:
            del self._held[bid]
        return len(gone)
