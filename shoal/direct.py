"""The direct path: a client hands a lone task straight to an idle worker on its
own host, and the worker answers it straight back, so a round trip crosses
two IPC hops instead of four through the broker.

The broker still learns everything it would otherwise see, in parallel: the
client sends it the same submission, marked as handed to that worker (so it
records the unit as running there, holds its frames to run it again should the
worker die, and serves cancels, dependents and ``shoal status`` as usual), and
the worker sends it the result too, marked as delivered (so it keeps it and
settles dependents, but does not forward it).  Both copies wait up to
:data:`NOTICE_SECONDS` to leave in batches (the client's before anything else it
sends the broker, so the order of its messages holds); the client's carries the
outcomes it has by then, so its own next request sees them.  A worker's result
(or bounce) may reach the broker before the client's submission; it is held
until the submission comes (:class:`Early`).

A worker that is busy when a direct task arrives *bounces* it: it tells the
broker, which queues the unit as if it had been submitted the usual way.  So
the direct path is never slower than the broker's beyond one message, and the
broker's FIFO and load balancing decide whenever there is contention.

Only what needs nothing of the broker goes direct: a task with a pickled
function and small plain arguments (no scattered data, futures, queue,
resources, delay, unique key or rate limit), from a client with nothing else in
flight, to a broker without ``--store`` or Curve.  Everything else, and every
task of a burst, takes the broker's path.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

import zmq

from . import protocol
from .protocol import Kind, ProtocolError
from .transport import recv_frames, send_frames

logger = logging.getLogger(__name__)

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

#: Ids of directly handed units: the broker's own never reach this bit, so the
#: client can name the unit (its task number on the base the broker gave it).
DIRECT_BIT = 1 << 62
TID_BITS = 32
TID_MASK = (1 << TID_BITS) - 1
#: Tasks and results up to this size go direct; bigger ones are not latency-bound.
MAX_DIRECT_BYTES = 1 << 16
#: The broker's copies of direct traffic (the client's submissions, the worker's
#: results) wait up to this long to leave in batches: woken for every round trip,
#: the broker's process takes a core from the client and worker on a small host
#: (2 cores here: round trip median 255-300 us told at once, 205-220 us at 5 ms,
#: 190-205 us at 10 ms, 187-195 us never told).  A worker killed within this
#: long of finishing a direct task has that task run again elsewhere.
NOTICE_SECONDS = 0.01
#: Task options the worker itself carries out (the rest need the broker).
WORKER_OPTIONS = frozenset({"kw", "m", "rty", "tmo", "rb", "rbm", "rj", "ron"})
#: A worker's result or bounce that beat its client's submission waits this long.
EARLY_SECONDS = 60.0
#: The broker remembers this many finished direct units, to tell a late duplicate
#: result of one (its worker was declared lost, then came back) from an early one.
FINISHED_KEPT = 50_000


#: ``meta["dd"]`` of an outcome the broker need not forward: sent by the worker
#: that delivered it straight to its client, or by that client, which had it.
WORKER_COPY, CLIENT_COPY = 1, 2


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

    def __init__(self, ctx: zmq.Context, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.session = protocol.Session()
        self.objects: set = set()  # function digests this worker was sent

    def close(self) -> None:
        self.sock.close(linger=0)


class DirectLinks:
    """The workers a client may hand a lone task to, and its sockets to them.

    Used only by the thread that holds the client's socket lock.  The client
    keeps to one worker (chosen by its id, so clients spread over workers) while
    that worker is offered: its function cache and CPU caches stay warm.
    """

    def __init__(self, ctx: zmq.Context, host: str, salt: bytes) -> None:
        self._ctx = ctx
        self._host = host
        self._salt = int.from_bytes(salt[:4], "big")
        self.base: Optional[int] = None  # from the broker; None: no direct path
        self.offered: list = []  # [[name, endpoint]] of this host's direct workers
        self.links: dict[str, Link] = {}  # endpoint -> link
        self.version = 0  # changes when a link opens or closes (pollers re-read links)
        self.sent = 0

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
                        and entry[1].startswith("ipc://")):
                    here.append((entry[0], entry[1]))
        self.offered = here
        endpoints = {endpoint for _, endpoint in here}
        for endpoint in [e for e in self.links if e not in endpoints]:
            self.links.pop(endpoint).close()
            self.version += 1

    def forget_objects(self) -> None:
        """The broker restarted (its workers may have too): resend functions."""
        for link in self.links.values():
            link.objects.clear()

    def pick(self) -> Optional[Link]:
        """The link to hand a task to, opened if need be; None when none is offered."""
        if self.base is None or not self.offered:
            return None
        name, endpoint = self.offered[self._salt % len(self.offered)]
        link = self.links.get(endpoint)
        if link is None:
            link = self.links[endpoint] = Link(self._ctx, name, endpoint)
            self.version += 1
        return link

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.version += 1


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


def receive_results(sock: zmq.Socket, key: bytes, guard: protocol.ReplayGuard) -> list:
    """The verified RESULTS messages waiting on a direct socket (others are dropped)."""
    messages = []
    while sock.get(_EVENTS) & _POLLIN:
        frames = recv_frames(sock)
        try:
            msg = protocol.decode(key, frames, guard=guard)
        except ProtocolError as exc:
            logger.warning("dropped a message from a worker: %s", exc)
            continue
        if msg.kind == Kind.RESULTS:
            messages.append(msg)
        else:
            logger.warning("dropped a %r message on a direct link: only results come there",
                           msg.kind)
    return messages


# ----------------------------------------------------------------- worker
class DirectInbox:
    """A worker's direct endpoint: an IPC ROUTER that local clients hand tasks to.

    Holds the route back to each direct unit's client until its result leaves.
    A one-slot worker's main thread holds ``lock`` except while it runs a task;
    then its control thread may take the socket and bounce what arrives.
    """

    def __init__(self, ctx: zmq.Context, key: bytes, directory: str) -> None:
        self.key = key
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone client: the broker delivers
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_DIRECT_BYTES)
        self.path = os.path.join(directory, f"w-{os.getpid()}-{os.urandom(4).hex()}.sock")
        self.sock.bind(f"ipc://{self.path}")
        self.endpoint = f"ipc://{self.path}"
        self.session = protocol.Session()
        self.guard = protocol.ReplayGuard()
        self.routes: dict[int, bytes] = {}  # direct unit id -> its client's route
        self.lock = threading.Lock()

    def receive(self) -> list:
        """``(route, message)`` for each verified TASKS message waiting."""
        messages = []
        sock = self.sock
        while sock.get(_EVENTS) & _POLLIN:
            frames = recv_frames(sock)
            try:
                msg = protocol.decode(self.key, frames[1:], guard=self.guard)
            except ProtocolError as exc:
                logger.warning("dropped a message on the direct endpoint: %s", exc)
                continue
            if msg.kind != Kind.TASKS:
                logger.warning("dropped a %r message on the direct endpoint: only tasks come "
                               "there", msg.kind)
                continue
            messages.append((frames[0].bytes, msg))
        return messages

    def deliver(self, entries: list, name: str) -> set:
        """Send each ``(bid, status, frames, meta)`` whose unit came direct to its
        client; return the ids delivered (the broker is told they need no forwarding)."""
        routes = self.routes
        out: dict[bytes, tuple[list, list]] = {}
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
            try:
                send_frames(self.sock, [route, *protocol.encode(
                    self.key, Kind.RESULTS, {"r": [r[:4] for r in results]}, frames,
                    session=self.session)], block=False)
            except zmq.ZMQError:
                continue  # its client left: the broker keeps and forwards the result
            delivered.update(r[4] for r in results)
        return delivered

    def close(self) -> None:
        self.sock.close(linger=0)
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
        # The last FINISHED_KEPT direct units done -> which copy of the outcome settled
        # each: WORKER_COPY, CLIENT_COPY, or 0 (a run the broker itself dispatched).
        self._finished: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def finished(self, bid: int, copy: int) -> None:
        finished = self._finished
        finished[bid] = copy
        if len(finished) > FINISHED_KEPT:
            del finished[next(iter(finished))]

    def late(self, bid: int, copy: int) -> Optional[bool]:
        """For an outcome of ``bid`` that comes after it finished: True if it is a
        duplicate (a second run), False if it is the other copy of the one outcome
        (the worker's after the client's, or the reverse); None if ``bid`` is not
        known to have finished (the outcome is early)."""
        first = self._finished.get(bid)
        if first is None:
            return None
        if first and copy and first != copy:
            del self._finished[bid]  # both copies are in: a third would be a duplicate
            return False
        return True

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
