"""The broker: one ROUTER socket that clients and workers both connect to.

It routes bytes.  It never unpickles a task, a function or a result: it reads
only the signed msgpack headers.  It keeps the FIFO queue of task units, each
worker's credits (free slots plus a prefetch allowance earned by short tasks),
and a store of objects (function payloads and scattered data) by digest, so
each object travels to each worker once.

Run it with ``shoal broker`` or ``python -m shoal.broker``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import zmq

from . import protocol
from .protocol import Kind, ProtocolError, VersionMismatch
from .security import ConnectionInfo, new_key, runtime_dir, write_connection_file
from .serialize import host_id
from .transport import recv_frames, send_frames

logger = logging.getLogger(__name__)

#: Keep this much work (seconds of measured compute) queued at each worker
#: beyond its running tasks, so a worker of short tasks never waits on a round trip.
PREFETCH_SECONDS = 0.004
MAX_PREFETCH = 64
#: Log at most this many dropped-message lines per second; the rest are counted.
DROP_LOG_PER_SECOND = 5

#: A unit whose function or data has not arrived waits this long for it.
#: (A client sends from one socket per thread, so an object sent by one
#: thread can arrive after a task another thread submitted that uses it.)
PARK_SECONDS = 30.0

QUEUED, RUNNING, PARKED = "queued", "running", "parked"
_COUNTED = {"ok": "done", "err": "failed", "cancelled": "cancelled"}


@dataclass
class Unit:
    """A task unit in the broker: one call, or one batch of a map."""

    bid: int
    client: bytes
    tid: int
    refs: list
    frames: list
    digests: dict
    meta: dict
    state: str = QUEUED
    worker: Optional[bytes] = None
    queued_at: float = 0.0


@dataclass
class StoredObject:
    """A function payload or scattered value, opaque to the broker."""

    frames: list
    digests: dict
    owners: set = field(default_factory=set)


@dataclass
class WorkerRecord:
    ident: bytes
    name: str
    slots: int
    host: str
    pid: int
    running: dict = field(default_factory=dict)
    objects: set = field(default_factory=set)
    done: int = 0
    mean_time: Optional[float] = None
    last_seen: float = 0.0
    control: Optional[bytes] = None  # the worker's control socket (heartbeats, interrupts)

    @property
    def prefetch(self) -> int:
        if self.mean_time is None:
            return 0
        return min(MAX_PREFETCH, int(PREFETCH_SECONDS / max(self.mean_time, 1e-6))) * self.slots

    @property
    def capacity(self) -> int:
        return self.slots + self.prefetch - len(self.running)

    def observe(self, seconds: float) -> None:
        self.mean_time = seconds if self.mean_time is None else 0.8 * self.mean_time + 0.2 * seconds

    def __repr__(self) -> str:
        return f"<Worker {self.name} slots={self.slots} running={len(self.running)}>"


@dataclass
class CancelRequest:
    """A client's cancel request waiting on the workers that hold some of its tasks."""

    client: bytes
    rq: Any
    at: float
    withdrawn: list = field(default_factory=list)
    workers: set = field(default_factory=set)
    interrupted: int = 0  # counted when their results (status "cancelled") arrive


@dataclass
class ClientRecord:
    ident: bytes
    tasks: dict = field(default_factory=dict)  # client task id -> bid
    last_seen: float = 0.0


class Broker:
    """A shoal broker bound to ``listen`` (``tcp://127.0.0.1:0`` picks a free port).

    Also binds an IPC endpoint beside the TCP one so that processes on this
    host skip the TCP stack.
    """

    def __init__(self, listen: str = "tcp://127.0.0.1:0", key: Optional[bytes] = None,
                 connection_file: Optional[str] = None, parent_pid: Optional[int] = None,
                 ipc: bool = True) -> None:
        self.key = key or new_key()
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.address = _bind(self.sock, listen)
        self.ipc_address: Optional[str] = None
        if ipc and hasattr(zmq, "IPC_PATH_MAX_LEN"):
            path = runtime_dir() / f"broker-{os.getpid()}-{self.address.rsplit(':', 1)[-1]}.sock"
            try:
                self.sock.bind(f"ipc://{path}")
                self.ipc_address = f"ipc://{path}"
            except zmq.ZMQError as exc:
                logger.info("no IPC endpoint (%s); local peers use TCP", exc)
        self.info = ConnectionInfo(self.address, self.key, ipc=self.ipc_address, host=host_id())
        self.connection_file = None
        if connection_file:
            self.connection_file = str(write_connection_file(self.info, connection_file))
        self.parent_pid = parent_pid
        self.workers: dict[bytes, WorkerRecord] = {}
        self.clients: dict[bytes, ClientRecord] = {}
        self.tasks: dict[int, Unit] = {}
        self.queue: deque[Unit] = deque()
        self.objects: dict[bytes, StoredObject] = {}
        self.parked: dict[bytes, list] = {}  # missing object digest -> units waiting for it
        self.cancels: dict[int, CancelRequest] = {}  # awaiting workers' answers
        self._ids = itertools.count(1)
        self._stopping = False
        self.started = time.time()
        self.counts = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0,
                       "dropped": 0, "duplicates": 0}
        self._drop_window = (0.0, 0)
        self._handlers = {
            Kind.CLIENT_HELLO: self._on_client_hello,
            Kind.SUBMIT: self._on_submit,
            Kind.CANCEL: self._on_cancel,
            Kind.CANCELLED: self._on_worker_cancelled,
            Kind.STATUS: self._on_status,
            Kind.SCATTER: self._on_scatter,
            Kind.CLIENT_BYE: self._on_client_bye,
            Kind.WORKER_HELLO: self._on_worker_hello,
            Kind.RESULTS: self._on_results,
            Kind.HEARTBEAT: self._on_heartbeat,
            Kind.OUTPUT: self._on_output,
            Kind.WORKER_BYE: self._on_worker_bye,
        }

    # ------------------------------------------------------------ main loop
    def run(self) -> None:
        """Serve until :meth:`stop` or SIGTERM/SIGINT."""
        sock = self.sock
        next_tick = time.monotonic() + 0.5
        try:
            while not self._stopping:
                timeout = max(0.0, next_tick - time.monotonic())
                if sock.poll(int(timeout * 1000) + 1):
                    # Drain what is waiting before dispatching: one dispatch pass
                    # then serves a burst, and credits are up to date.
                    for _ in range(512):
                        try:
                            frames = recv_frames(sock)
                        except zmq.Again:
                            break
                        self._handle(frames)
                    if self.queue:
                        self._dispatch()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + 0.5
                    self._tick()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stopping = True

    def _tick(self) -> None:
        if self.parked:
            self._expire_parked()
        now = time.monotonic()
        for rid, request in list(self.cancels.items()):
            if now - request.at > 30:  # a worker that never answered
                del self.cancels[rid]
                self._finish_cancel(request)
        if self.parent_pid and os.getppid() != self.parent_pid:
            logger.info("parent process %d is gone; broker stopping", self.parent_pid)
            self._stopping = True

    def _shutdown(self) -> None:
        for w in list(self.workers.values()):
            self._send(w.ident, Kind.SHUTDOWN)
        self.sock.close(linger=100)
        if self.connection_file:
            try:
                os.unlink(self.connection_file)  # nobody should find a stopped broker
            except OSError:
                pass
        if self.ipc_address:
            try:
                os.unlink(self.ipc_address[len("ipc://"):])
            except OSError:
                pass

    # ------------------------------------------------------------ messages
    def _send(self, ident: bytes, kind: str, fields: Optional[dict] = None,
              frames=(), digests: Optional[dict] = None) -> None:
        send_frames(self.sock, [ident, *protocol.encode(self.key, kind, fields, frames, digests)])

    def _handle(self, frames: list) -> None:
        ident = frames[0].bytes
        try:
            msg = protocol.decode(self.key, frames[1:], verify_buffers=False)
        except VersionMismatch as exc:
            self._drop(ident, str(exc))
            self._send(ident, Kind.ERROR, {"msg": str(exc)})
            return
        except ProtocolError as exc:
            self._drop(ident, str(exc))
            return
        try:
            self._handlers[msg.kind](ident, msg)
        except Exception as exc:
            # Signed but malformed: a bug in a peer, never a reason to stop serving.
            logger.warning("malformed %s message from %s: %r", msg.kind, ident.hex(), exc)
            self.counts["dropped"] += 1
            self._send(ident, Kind.ERROR, {"msg": f"malformed {msg.kind} message: {exc!r}"})

    def _drop(self, ident: bytes, reason: str) -> None:
        self.counts["dropped"] += 1
        second, logged = self._drop_window
        now = time.monotonic()
        if now - second >= 1.0:
            second, logged = now, 0
        if logged < DROP_LOG_PER_SECOND:
            logger.warning("dropped a message from peer %s: %s", ident.hex(), reason)
        self._drop_window = (second, logged + 1)

    # -- clients
    def _client(self, ident: bytes) -> ClientRecord:
        record = self.clients.get(ident)
        if record is None:
            record = self.clients[ident] = ClientRecord(ident)
        record.last_seen = time.monotonic()
        return record

    def _on_client_hello(self, ident: bytes, msg: protocol.Message) -> None:
        self._client(ident)
        self._send(ident, Kind.WELCOME, self._summary())

    def _summary(self) -> dict:
        return {"workers": len(self.workers),
                "slots": sum(w.slots for w in self.workers.values()),
                "hosts": sorted({w.host for w in self.workers.values()}),
                "broker_host": host_id()}

    def _store_objects(self, ident: bytes, msg: protocol.Message, pos: int = 0) -> int:
        for digest, n in msg.header.get("ob", ()):
            obj = self.objects.get(digest)
            if obj is None:
                obj = self.objects[digest] = StoredObject(
                    msg.frames[pos:pos + n], protocol.frame_digests(msg.header, pos, pos + n))
                for unit in self.parked.pop(digest, ()):
                    if unit.state == PARKED:
                        self._enqueue(unit)
            obj.owners.add(ident)
            pos += n
        return pos

    def _enqueue(self, unit: Unit) -> None:
        for ref in unit.refs:
            if ref not in self.objects:
                unit.state = PARKED
                self.parked.setdefault(ref, []).append(unit)
                return
        unit.state = QUEUED
        self.queue.append(unit)

    def _on_submit(self, ident: bytes, msg: protocol.Message) -> None:
        frames, header = msg.frames, msg.header
        ident = header.get("rt", ident)  # results go to the client's receiving socket
        client = self._client(ident)
        pos = self._store_objects(ident, msg)
        now = time.monotonic()
        for tid, refs, n, meta in header["u"]:
            if not refs or not isinstance(meta, dict):
                raise ValueError(f"task {tid!r} names no function")
            unit = Unit(next(self._ids), ident, tid, refs, frames[pos:pos + n],
                        protocol.frame_digests(header, pos, pos + n), meta, queued_at=now)
            pos += n
            target = meta.get("to")
            if target is not None and not any(w.name == target for w in self.workers.values()):
                names = ", ".join(sorted(w.name for w in self.workers.values())) or "none"
                self._send(ident, Kind.ERROR, {"t": [tid], "msg": (
                    f"no worker is named {target!r} (workers now: {names})")})
                continue
            self.tasks[unit.bid] = unit
            client.tasks[tid] = unit.bid
            self._enqueue(unit)
        self.counts["submitted"] += len(header["u"])

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for digest, units in list(self.parked.items()):
            expired = [u for u in units if now - u.queued_at > PARK_SECONDS]
            if not expired:
                continue
            self.parked[digest] = [u for u in units if u not in expired]
            if not self.parked[digest]:
                del self.parked[digest]
            by_client: dict[bytes, list] = {}
            for unit in expired:
                if self.tasks.pop(unit.bid, None) is not None:
                    unit.state = "failed"
                    by_client.setdefault(unit.client, []).append(unit.tid)
            for client, tids in by_client.items():
                self._send(client, Kind.ERROR, {
                    "msg": f"the function or scattered data of this task never reached the broker "
                           f"within {PARK_SECONDS:g} s (was the broker restarted?)", "t": tids})

    def _on_scatter(self, ident: bytes, msg: protocol.Message) -> None:
        ident = msg.header.get("rt", ident)
        self._client(ident)
        self._store_objects(ident, msg)

    def _on_cancel(self, ident: bytes, msg: protocol.Message) -> None:
        """Withdraw tasks not yet started: queued here, or prefetched by a worker."""
        header = msg.header
        ident = header.get("rt", ident)
        client = self._client(ident)
        request = CancelRequest(ident, header.get("rq"), time.monotonic())
        running_too = bool(header.get("r", True))
        forward: dict[bytes, list] = {}
        for tid in header["t"]:
            bid = client.tasks.get(tid)
            unit = self.tasks.get(bid) if bid is not None else None
            if unit is None:
                continue
            if unit.state in (QUEUED, PARKED):
                del self.tasks[bid]
                del client.tasks[tid]
                unit.state = "cancelled"  # left in the deque; skipped when reached
                request.withdrawn.append(tid)
            elif unit.state == RUNNING and unit.worker in self.workers:
                forward.setdefault(unit.worker, []).append(bid)
        if not forward:
            self._finish_cancel(request)
            return
        rid = next(self._ids)
        request.workers = set(forward)
        self.cancels[rid] = request
        for worker, bids in forward.items():
            record = self.workers[worker]
            self._send(record.control or worker, Kind.CANCEL, {"b": bids, "rq": rid, "r": running_too})

    def _on_worker_cancelled(self, ident: bytes, msg: protocol.Message) -> None:
        """A worker's answer: units it withdrew before they started (``b``) and running
        units it interrupted (``i``; their results, status "cancelled", follow)."""
        worker = self._worker_of(ident, msg.header)
        request = self.cancels.get(msg.header.get("rq"))
        if request is not None and worker is not None:
            for bid in msg.header.get("i", ()):
                unit = worker.running.get(bid)
                if unit is not None:
                    request.withdrawn.append(unit.tid)
                    request.interrupted += 1
        for bid in msg.header["b"]:
            unit = worker.running.pop(bid, None) if worker else None
            if unit is None or self.tasks.pop(bid, None) is None:
                continue
            client = self.clients.get(unit.client)
            if client is not None:
                client.tasks.pop(unit.tid, None)
            unit.state = "cancelled"
            if request is not None:
                request.withdrawn.append(unit.tid)
        if request is not None and worker is not None:
            self._cancel_answered(msg.header["rq"], worker.ident)

    def _cancel_answered(self, rid: int, worker: bytes) -> None:
        request = self.cancels[rid]
        request.workers.discard(worker)
        if not request.workers:
            del self.cancels[rid]
            self._finish_cancel(request)

    def _finish_cancel(self, request: "CancelRequest") -> None:
        self.counts["cancelled"] += len(request.withdrawn) - request.interrupted
        self._send(request.client, Kind.CANCELLED, {"t": request.withdrawn, "rq": request.rq})

    def _on_status(self, ident: bytes, msg: protocol.Message) -> None:
        self._client(ident)
        running = sum(len(w.running) for w in self.workers.values())
        reply = {
            **self._summary(),
            "address": self.address,
            "uptime": time.time() - self.started,
            "queued": len(self.tasks) - running,
            "running": running,
            "clients": len(self.clients),
            "counts": self.counts,
            "worker_list": [
                {"name": w.name, "slots": w.slots, "running": len(w.running), "done": w.done,
                 "host": w.host.split(":")[0], "pid": w.pid,
                 "mean_task_ms": None if w.mean_time is None else round(w.mean_time * 1000, 3)}
                for w in self.workers.values()],
        }
        self._send(ident, Kind.STATUS_REPLY, reply)

    def _on_client_bye(self, ident: bytes, msg: protocol.Message) -> None:
        client = self.clients.pop(ident, None)
        if client is None:
            return
        for bid in client.tasks.values():
            unit = self.tasks.get(bid)
            if unit is not None and unit.state in (QUEUED, PARKED):
                del self.tasks[bid]
                unit.state = "cancelled"
        released = []
        for digest, obj in list(self.objects.items()):
            obj.owners.discard(ident)
            if not obj.owners:
                del self.objects[digest]
                released.append(digest)
        if released:
            for w in self.workers.values():
                if w.objects.intersection(released):
                    w.objects.difference_update(released)
                    self._send(w.ident, Kind.TASKS, {"u": [], "fg": released})

    # -- workers
    def _on_worker_hello(self, ident: bytes, msg: protocol.Message) -> None:
        h = msg.header
        slots = h.get("slots", 1)
        if not isinstance(slots, int) or not 1 <= slots <= 100_000:
            raise ValueError(f"worker announced {slots!r} slots")
        name = str(h.get("name") or f"worker-{h.get('pid')}")
        taken = {w.name for w in self.workers.values() if w.ident != ident}
        base, n = name, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        old = self.workers.get(ident)
        if old is not None:
            self._requeue(old)
        self.workers[ident] = WorkerRecord(ident, name, slots, str(h.get("host", "")),
                                           int(h.get("pid", 0)), last_seen=time.monotonic(),
                                           control=h.get("ctl"))
        logger.info("worker %s joined with %d slot(s)", name, slots)
        self._send(ident, Kind.WELCOME, {"name": name})

    def _on_worker_bye(self, ident: bytes, msg: protocol.Message) -> None:
        worker = self.workers.pop(ident, None)
        if worker is not None:
            logger.info("worker %s left", worker.name)
            self._fail_addressed_to(worker)
            self._requeue(worker)

    def _fail_addressed_to(self, worker: WorkerRecord) -> None:
        """Units addressed to a worker that left cannot run anywhere else: fail them."""
        by_client: dict[bytes, list] = {}
        for unit in list(self.tasks.values()):
            if unit.meta.get("to") == worker.name and unit.state in (QUEUED, PARKED, RUNNING):
                del self.tasks[unit.bid]
                worker.running.pop(unit.bid, None)
                unit.state = "failed"
                by_client.setdefault(unit.client, []).append(unit.tid)
        for client, tids in by_client.items():
            self._send(client, Kind.ERROR, {"t": tids, "msg": f"worker {worker.name} left before "
                                                              "running the task addressed to it"})

    def _requeue(self, worker: WorkerRecord) -> None:
        for rid, request in list(self.cancels.items()):
            if worker.ident in request.workers:
                self._cancel_answered(rid, worker.ident)
        # Put its unfinished units back at the head of the queue, oldest first.
        units = sorted(worker.running.values(), key=lambda u: u.bid, reverse=True)
        for unit in units:
            if unit.bid in self.tasks:
                unit.state, unit.worker = QUEUED, None
                self.queue.appendleft(unit)
        worker.running.clear()

    def _worker_of(self, ident: bytes, header: dict) -> Optional[WorkerRecord]:
        """The worker a message speaks for: its main socket, or its control socket (``wid``)."""
        worker = self.workers.get(header.get("wid", ident))
        if worker is not None and ident not in (worker.ident, worker.control):
            return None  # a control message must come from that worker's control socket
        return worker

    def _on_heartbeat(self, ident: bytes, msg: protocol.Message) -> None:
        worker = self._worker_of(ident, msg.header)
        if worker is not None:
            worker.last_seen = time.monotonic()
        elif "wid" not in msg.header:
            self._client(ident)

    def _on_output(self, ident: bytes, msg: protocol.Message) -> None:
        """What a running task printed: pass it on to the task's client."""
        worker = self._worker_of(ident, msg.header)
        unit = worker.running.get(msg.header["b"]) if worker is not None else None
        if unit is None:
            return  # finished meanwhile: its result carries all of its output
        worker.last_seen = time.monotonic()
        fields = {"t": unit.tid}
        for stream in ("o", "e"):
            if stream in msg.header:
                fields[stream] = msg.header[stream]
        self._send(unit.client, Kind.OUTPUT, fields)

    def _on_results(self, ident: bytes, msg: protocol.Message) -> None:
        worker = self.workers.get(ident)
        if worker is None:
            logger.warning("results from an unregistered worker %s ignored", ident.hex())
            return
        worker.last_seen = time.monotonic()
        header, frames = msg.header, msg.frames
        outgoing: dict[bytes, tuple[list, list, dict]] = {}
        pos = 0
        for bid, status, n, meta in header["r"]:
            start, pos = pos, pos + n
            unit = worker.running.pop(bid, None)
            if unit is None or self.tasks.pop(bid, None) is None:
                self.counts["duplicates"] += 1
                continue
            client = self.clients.get(unit.client)
            if client is not None:
                client.tasks.pop(unit.tid, None)
            worker.done += 1
            t = meta.get("t")
            if t is not None:
                worker.observe(t / max(1, meta.get("n", 1)) if meta.get("n") else t)
            self.counts[_COUNTED.get(status, "failed")] += 1
            meta["w"] = worker.name
            entries, out_frames, digests = outgoing.setdefault(unit.client, ([], [], {}))
            base = len(out_frames)
            for i, d in protocol.frame_digests(header, start, start + n).items():
                digests[base + i] = d
            out_frames.extend(frames[start:start + n])
            entries.append([unit.tid, status, n, meta])
        for client, (entries, out_frames, digests) in outgoing.items():
            self._send(client, Kind.RESULTS, {"r": entries}, out_frames, digests)

    # ------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        """Hand queued units to workers by credit, FIFO, spreading a short queue evenly."""
        free = [w for w in self.workers.values() if w.capacity > 0]
        while self.queue and free:
            # Idle slots first, so a new task never waits behind another's prefetch.
            free.sort(key=lambda w: len(w.running) - w.slots)
            share = max(1, math.ceil(len(self.queue) / len(free)))
            progressed = False
            for worker in list(free):
                units = self._take(worker, min(worker.capacity, share))
                if units:
                    progressed = True
                    self._send_units(worker, units)
                if worker.capacity <= 0 or not units:
                    free.remove(worker)
                if not self.queue:
                    break
            if not progressed:
                break

    def _take(self, worker: WorkerRecord, n: int) -> list:
        taken, skipped = [], []
        queue = self.queue
        scanned = 0
        while queue and len(taken) < n and scanned < n + 256:
            unit = queue.popleft()
            if unit.state != QUEUED:
                continue
            scanned += 1
            host = unit.meta.get("h")
            if host and host != worker.host:
                skipped.append(unit)  # needs shared memory on another host
                continue
            target = unit.meta.get("to")
            if target is not None and target != worker.name:
                skipped.append(unit)  # addressed to another worker
                continue
            taken.append(unit)
        if skipped:
            queue.extendleft(reversed(skipped))
        return taken

    def _send_units(self, worker: WorkerRecord, units: list) -> None:
        frames: list = []
        digests: dict = {}
        objects = []
        for unit in units:
            for ref in unit.refs:
                if ref not in worker.objects:
                    obj = self.objects[ref]
                    for i, d in obj.digests.items():
                        digests[len(frames) + i] = d
                    frames.extend(obj.frames)
                    objects.append([ref, len(obj.frames)])
                    worker.objects.add(ref)
        entries = []
        for unit in units:
            for i, d in unit.digests.items():
                digests[len(frames) + i] = d
            frames.extend(unit.frames)
            entries.append([unit.bid, unit.refs, len(unit.frames), unit.meta])
            unit.state, unit.worker = RUNNING, worker.ident
            worker.running[unit.bid] = unit
        fields = {"u": entries}
        if objects:
            fields["ob"] = objects
        self._send(worker.ident, Kind.TASKS, fields, frames, digests)


def _bind(sock: zmq.Socket, listen: str) -> str:
    """Bind ``listen``; port 0 (or none) picks a free port.  Return the address bound."""
    if "://" not in listen:
        listen = f"tcp://{listen}"
    if listen.startswith("tcp://"):
        hostport = listen[len("tcp://"):]
        host, _, port = hostport.rpartition(":")
        if not host:
            host, port = hostport, "0"
        if port in ("", "0", "*"):
            port_n = sock.bind_to_random_port(f"tcp://{host}")
            return f"tcp://{host}:{port_n}"
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc}; is another broker running "
                          "there? Leave the port out to pick a free one") from None
        return f"tcp://{host}:{port}"
    sock.bind(listen)
    return listen


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    return address.startswith("ipc://") or host in ("localhost", "::1") or host.startswith("127.")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal broker", description="Run a shoal broker.")
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="address to bind (default 127.0.0.1 and a free port)")
    parser.add_argument("--connection-file", help="where to write the connection file "
                        "(default: in the runtime directory)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback address without encryption (dangerous)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s broker %(levelname)s %(message)s", stream=sys.stderr)
    listen = args.listen if "://" in args.listen else f"tcp://{args.listen}"
    if not is_loopback(listen):
        if not args.insecure:
            print(f"shoal broker: refusing to listen on {args.listen} without encryption: anyone "
                  "who reaches that port could run code on your workers. Listen on 127.0.0.1 "
                  "and tunnel (ssh -L), or pass --insecure on a network you trust.",
                  file=sys.stderr)
            return 2
        logger.warning("LISTENING ON %s WITHOUT ENCRYPTION (--insecure): messages are signed "
                       "but readable by anyone on the network", args.listen)
    path = args.connection_file or str(runtime_dir() / f"broker-{os.getpid()}.json")
    broker = Broker(listen, connection_file=path, parent_pid=args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    print(f"SHOAL-BROKER {broker.address} {broker.connection_file}", flush=True)
    logger.info("listening on %s; connection file %s", broker.address, broker.connection_file)
    broker.run()
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: pickles refer to
    # shoal.broker's globals (the object store), which must be the ones in use.
    from shoal import broker as _module
    sys.exit(_module.main())
