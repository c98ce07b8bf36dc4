"""The broker: one ROUTER socket that clients and workers both connect to.

It routes bytes.  It never unpickles a task, a function or a result: it reads
only the signed msgpack headers.  It keeps the FIFO queue of task units, each
worker's credits (free slots plus a prefetch allowance earned by short tasks),
and a store of objects (function payloads and scattered data) by digest, so
each object travels to each worker once.

Run it with ``shoal broker`` or ``python -m shoal.broker``.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import zmq

from . import protocol
from .protocol import Kind, ProtocolError, ReplayGuard, Session, VersionMismatch, identity_field
from .durable import MemoryOnly
from .flow import Flow
from .liveness import Liveness
from .locks import LockRequests, LockTable, Owner
from .monitor import Events
from .periodic import ScheduleRequests, Schedules
from .requests import Requests
from .records import (DEFAULT_QUEUE, ORPHANED, PARKED, QUEUED, RUNNING,
                      CancelRequest, ClientRecord, StoredObject, Unit, WorkerRecord, task_id,
                      task_key)
from .routing import (TaskQueue, describe_route, parse_resources, runnable_somewhere, unit_route,
                      worker_command)
from .security import (AllowList, BrokerSecrets, ConnectionInfo, broker_secrets, create_peer,
                       new_key, read_connection_file, runtime_dir, write_connection_file)
from .serialize import host_id
from .options import due_at
from .scheduling import RateLimits, Timers, check_rate
from .store import ResultStore, TaskResults
from .transport import MessageTooLarge, recv_frames, release_memory, send_frames

logger = logging.getLogger(__name__)

#: Limits on what one message may hold (``--max-frames``, ``--max-message-size``).
MAX_FRAMES = 100_000
MAX_MESSAGE_BYTES = 4 << 30
#: Log at most this many dropped-message lines per second; the rest are counted.
DROP_LOG_PER_SECOND = 5

#: A unit whose function or data has not arrived waits this long for it.
#: (A client sends from one socket per thread, so an object sent by one
#: thread can arrive after a task another thread submitted that uses it.)
PARK_SECONDS = 30.0

_COUNTED = {"ok": "done", "err": "failed", "cancelled": "cancelled"}
#: Requests that act must name this run of the broker (``bs``): replayed from
#: an earlier run, they are refused.
_SESSION_BOUND = frozenset({Kind.SUBMIT, Kind.SCATTER, Kind.CANCEL, Kind.ATTACH, Kind.WORKER_LOST,
                            Kind.LOCK, Kind.SCHEDULE, Kind.FETCH})
#: Task options that need reading at submit (the broker skips the rest quickly).
_SPECIAL = frozenset({"q", "pr", "rs", "at", "dl", "rl", "to", "uq"})


class Broker(Liveness, Flow, Requests, LockRequests, ScheduleRequests, Events):
    """A shoal broker bound to ``listen`` (``tcp://127.0.0.1:0`` picks a free port).

    Also binds an IPC endpoint beside the TCP one so that processes on this
    host skip the TCP stack.
    """

    def __init__(self, listen: str = "tcp://127.0.0.1:0", key: Optional[bytes] = None,
                 connection_file: Optional[str] = None, parent_pid: Optional[int] = None,
                 ipc: bool = True, home: Optional[Path] = None, ipc_path: Optional[str] = None,
                 max_frames: int = MAX_FRAMES, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 store=None, result_ttl: Optional[float] = None,
                 result_memory: Optional[int] = None) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.max_frames = max_frames
        self.max_message_bytes = max_message_bytes
        # libzmq drops an oversized frame (and its sender's connection) before buffering it.
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # With a home directory the broker is Curve-secured: every peer
        # authenticates with a key on its allow-list, and traffic is encrypted.
        self.home = home
        self.allow: Optional[AllowList] = None
        self.authenticator = None
        curve = None
        if home is not None:
            secrets_ = broker_secrets(home)
            key = secrets_.key
            self.allow = AllowList(home / "allowed")
            from zmq.auth.thread import ThreadAuthenticator
            self.authenticator = ThreadAuthenticator(self.ctx)
            self.authenticator.start()
            self.authenticator.configure_curve_callback("*", self.allow)
            self.sock.curve_server = True
            self.sock.curve_secretkey = secrets_.secret
            self.sock.curve_publickey = secrets_.public
            curve = secrets_
        self.key = key or new_key()
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # A send to a peer that is not connected fails instead of vanishing: a
        # worker's task socket may reconnect after its control socket has spoken.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.address = _bind(self.sock, listen)
        self.ipc_address: Optional[str] = None
        if ipc and hasattr(zmq, "IPC_PATH_MAX_LEN"):
            # Named by port, not process: peers of a broker restarted on the same
            # address find it again.  A stale socket file of a dead broker goes.
            path = ipc_path or (runtime_dir() / f"broker-{self.address.rsplit(':', 1)[-1]}.sock")
            if os.path.exists(path):
                os.unlink(path)
            try:
                self.sock.bind(f"ipc://{path}")
                self.ipc_address = f"ipc://{path}"
            except zmq.ZMQError as exc:
                logger.info("no IPC endpoint (%s); local peers use TCP", exc)
        self.info = ConnectionInfo(self.address, self.key, ipc=self.ipc_address, host=host_id())
        if curve is not None:
            self.info = self._local_peer(curve)
        self.connection_file = None
        if connection_file:
            self.connection_file = str(write_connection_file(self.info, connection_file))
        self.parent_pid = parent_pid
        self.workers: dict[bytes, WorkerRecord] = {}
        self.clients: dict[bytes, ClientRecord] = {}
        self.tasks: dict[int, Unit] = {}
        self.queue = TaskQueue()
        self.objects: dict[bytes, StoredObject] = {}
        self.parked: dict[bytes, list] = {}  # missing object digest -> units waiting for it
        self.cancels: dict[int, CancelRequest] = {}  # awaiting workers' answers
        self.results = ResultStore()  # finished parts of keyed maps
        self.kept = TaskResults(**{k: v for k, v in (("ttl", result_ttl),
                                                      ("max_bytes", result_memory)) if v})
        self.by_key: dict[bytes, Unit] = {}  # unfinished units by key
        self.result_users: dict[bytes, int] = {}  # key -> waiting tasks that take its result
        self.awaiting_values: dict[bytes, list] = {}  # key -> dependents, value asked of a client
        self.fetches: dict[bytes, list] = {}  # key -> [ident, tid, deadline] asked before it came
        #: where state survives a restart (``--store``); MemoryOnly does nothing
        self.durable = store if store is not None else MemoryOnly()
        self.acks: dict[bytes, list] = {}  # client -> task numbers stored, not yet acknowledged
        self.unreachable: dict[bytes, tuple] = {}  # worker hellos whose task socket is not up
        self.unique: dict[str, Unit] = {}  # submit(unique=...) key -> the unit holding it
        self.locks = LockTable()
        self.schedules = Schedules()  # periodic tasks
        self.watchers: dict = {}  # sockets that watch events (shoal events, shoal top)
        self.pending_events: list = []
        self.timers = Timers()  # units held until a time (delay, at, retry back-off)
        self.limits = RateLimits()  # units waiting for their task name's rate limit
        # Task ids start at a random offset in each run, so a result of an
        # earlier run's task can never be taken for one of this run's.
        self._ids = itertools.count(int.from_bytes(os.urandom(5), "big") << 16)
        # Identifies this run of the broker: a client that sees it change knows
        # the broker restarted and what it had in flight is gone.
        self.session = os.urandom(8).hex()
        self.out = Session()
        self.guard = ReplayGuard()
        self._stopping = False
        #: the Curve public key of the message being handled (a Curve-secured broker)
        self._peer_key: Optional[str] = None
        self._trim_due = False  # a message dropped for its size left freed memory
        self.started = time.time()
        self.counts = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0,
                       "dropped": 0, "duplicates": 0}
        self._drop_window = (0.0, 0)
        self._registered_only = False  # some connected worker runs named tasks only
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
            Kind.WORKER_LOST: self._on_worker_lost,
            Kind.ATTACH: self._on_attach,
            Kind.FETCH: self._on_fetch,
            Kind.TASK_INFO: self._on_task_info,
            Kind.LOCK: self._on_lock,
            Kind.SCHEDULE: self._on_schedule,
            Kind.WATCH: self._on_watch,
            Kind.RESUME: self._on_resume,
        }
        self._restored_at = 0.0  # when state was loaded from the store
        if self.durable.durable:
            self._restore()

    def _local_peer(self, curve: BrokerSecrets) -> ConnectionInfo:
        """The keys this host's own clients and workers use (the allowed peer "local")."""
        peer = self.home / "peers" / "local.json"
        if not (self.home / "allowed" / "local.key").exists():
            create_peer(self.home, "local", self.address)
        local = read_connection_file(peer)
        return ConnectionInfo(self.address, self.key, ipc=self.ipc_address, host=host_id(),
                              curve={**local.curve, "server_key": curve.public.decode()})

    # ------------------------------------------------------------ main loop
    def run(self) -> None:
        """Serve until :meth:`stop` or SIGTERM/SIGINT."""
        sock = self.sock
        next_tick = time.monotonic() + 0.5
        try:
            while not self._stopping:
                wake = next_tick
                if self._timed:
                    wake = min(wake, self._next_timed())
                timeout = max(0.0, wake - time.monotonic())
                if sock.poll(int(timeout * 1000) + 1):
                    # Drain what is waiting before dispatching: one dispatch pass
                    # then serves a burst, and credits are up to date.
                    for _ in range(512):
                        try:
                            frames = recv_frames(sock, max_frames=self.max_frames + 1,
                                                 max_bytes=self.max_message_bytes)
                        except zmq.Again:
                            break
                        except MessageTooLarge as exc:
                            self._drop(b"?", str(exc))
                            self._trim_due = True
                            continue
                        self._handle(frames)
                    if self.queue:
                        self._dispatch()
                if self._timed and time.monotonic() >= self._next_timed():
                    self._release_timed()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + 0.5
                    self._tick()
                if self.acks or self.pending_events or self.durable.durable:
                    self._end_of_pass()
        finally:
            self._shutdown()

    def _end_of_pass(self) -> None:
        """After a pass: make its writes durable, then acknowledge what was stored
        (a task is acknowledged once it is on disk), then send the pass's events."""
        self.durable.commit()
        for ident, tids in self.acks.items():
            self._send(ident, Kind.ACK, {"t": tids})
        self.acks.clear()
        if self.pending_events:
            if self.watchers:
                self._flush_events()
            else:
                self.pending_events.clear()

    def stop(self) -> None:
        self._stopping = True

    @property
    def _timed(self) -> bool:
        """Whether some unit waits for a time or a rate limit's token, or a schedule exists."""
        return bool(self.timers) or self.limits.has_waiting() or bool(self.schedules)

    def _next_timed(self) -> float:
        """Monotonic time at which the next held unit (or periodic run) may go."""
        soonest = float("inf")
        due = self.timers.next_due()
        run = self.schedules.next_due() if self.schedules else None
        if run is not None:
            due = run if due is None else min(due, run)
        if due is not None:
            soonest = time.monotonic() + (due - time.time())
        release = self.limits.next_release()
        if release is not None:
            soonest = min(soonest, release)
        return soonest

    def _release_timed(self) -> None:
        """Queue the units whose time or token has come, and dispatch them."""
        now = time.time()
        if self.schedules:
            self._run_schedules(now)
        for unit in self.timers.pop_due(now):
            unit.due = None
            self._enqueue(unit)
        self.limits.release(self._requeue_front)
        if self.queue:
            self._dispatch()

    def _requeue_front(self, unit: Unit) -> None:
        unit.state = QUEUED
        self.queue.appendleft(unit)

    def _tick(self) -> None:
        if self.parked:
            self._expire_parked()
        now = time.monotonic()
        self._check_liveness(now)
        if self.allow is not None:
            self._check_revoked()
        if self._trim_due:  # at most once a tick: trimming costs ~0.1 ms per MB freed
            self._trim_due = False
            release_memory()
        self.results.expire()
        self._expire_kept()
        if self.fetches:
            self._expire_fetches()
        self._collect_orphans()
        self._check_locks()
        if self.unreachable:
            self._retry_unreachable()
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
        self.durable.close()
        if self.authenticator is not None:
            self.authenticator.stop()
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
              frames=(), digests: Optional[dict] = None) -> bool:
        """Send a message to the peer ``ident``; False if no such peer is connected."""
        try:
            send_frames(self.sock, [ident, *protocol.encode(self.key, kind, fields, frames,
                                                             digests, self.out)])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False  # gone, or not yet reconnected (see ROUTER_MANDATORY above)
        return True

    def _handle(self, frames: list) -> None:
        ident = frames[0].bytes
        if self.allow is not None:
            self._peer_key = frames[-1].get("User-Id")
            if self.allow.name_of(self._peer_key) is None:
                # ZAP checks a key when a connection opens; this catches one revoked since.
                self._drop(ident, "its key is no longer on the allow-list")
                self._deregister_revoked(ident)
                return
        try:
            msg = protocol.decode(self.key, frames[1:], verify_buffers=False, guard=self.guard)
        except VersionMismatch as exc:
            self._drop(ident, str(exc))
            self._send(ident, Kind.ERROR, {"msg": str(exc)})
            return
        except ProtocolError as exc:
            self._drop(ident, str(exc))
            return
        try:
            if msg.kind in _SESSION_BOUND and msg.header.get("bs") != self.session:
                self._refuse_stale(ident, msg)
                return
            self._handlers[msg.kind](ident, msg)
        except Exception as exc:
            # Signed but malformed: a bug in a peer, never a reason to stop serving.
            logger.warning("malformed %s message from %s: %r", msg.kind, ident.hex(), exc)
            self.counts["dropped"] += 1
            self._send(ident, Kind.ERROR, {"msg": f"malformed {msg.kind} message: {exc!r}"})

    def _refuse_stale(self, ident: bytes, msg: protocol.Message) -> None:
        """A request meant for another run of the broker: a replay, or a client that
        has not yet seen the restart; tell it which run this is."""
        self._drop(ident, f"a {msg.kind} message for another run of the broker")
        units = msg.header.get("u", ())
        tids = [u[0] for u in units if isinstance(u, list) and u] if isinstance(units, list) else []
        self._send(ident, Kind.ERROR, {"stale": True, "session": self.session, "t": tids,
                                       "store": self.durable.store_id, "rq": msg.header.get("rq"),
                                       "msg": "the broker restarted; resubmit"})

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
        summary = {"workers": len(self.workers), "session": self.session,
                   "slots": sum(w.slots for w in self.workers.values()),
                   "hosts": sorted({w.host for w in self.workers.values()}),
                   "broker_host": host_id()}
        if self.durable.durable:
            summary["store"] = self.durable.store_id  # a client of a restart resumes its tasks
        return summary

    def _store_objects(self, ident: bytes, msg: protocol.Message, pos: int = 0) -> int:
        for entry in msg.header.get("ob", ()):
            digest, n = entry[0], entry[1]
            obj = self.objects.get(digest)
            if obj is None:
                obj = self.objects[digest] = StoredObject(
                    msg.frames[pos:pos + n], protocol.frame_digests(msg.header, pos, pos + n),
                    name=entry[2] if len(entry) > 2 and isinstance(entry[2], str) else "")
                if self.durable.durable and not digest.startswith(b"R"):
                    self.durable.object_added(digest, obj)  # (a task's result is stored as one)
                for unit in self.parked.pop(digest, ()):
                    if unit.state == PARKED:
                        self._enqueue(unit)
                if digest in self.awaiting_values:  # a dependency's value, asked of its client
                    self._release_dependents(digest, self.awaiting_values.pop(digest))
            obj.owners.add(ident)
            pos += n
        return pos

    def _enqueue(self, unit: Unit) -> None:
        """Queue ``unit``, or hold it until what it waits for: its function or
        data, the futures it takes, its time."""
        for ref in unit.refs:
            if ref not in self.objects:
                unit.state = PARKED
                self.parked.setdefault(ref, []).append(unit)
                return
        if unit.due is not None and unit.due > time.time():
            self.timers.hold(unit, unit.due)
            return
        unit.state = QUEUED
        self.queue.append(unit)

    def _admit(self, unit: Unit) -> bool:
        """Whether a unit a worker could take may go now (its rate limit allows)."""
        limit = unit.meta.get("rl")
        if limit is None:
            return True
        if unit.admitted:  # released from its line with a token
            unit.admitted = False
            return True
        return self.limits.admit(unit, str(unit.meta.get("nm", "")), *limit)

    def _on_submit(self, ident: bytes, msg: protocol.Message) -> None:
        frames, header = msg.frames, msg.header
        ident = identity_field(header, "rt", ident)  # results go to the client's receiving socket
        client = self._client(ident)
        cid = header.get("cid")
        if cid is not None:
            if not isinstance(cid, bytes) or len(cid) != 8:
                raise ValueError(f"malformed client id {cid!r}")
            client.cid = cid
        pos = self._store_objects(ident, msg)
        now = time.monotonic()
        durable = self.durable.durable
        for tid, refs, n, meta in header["u"]:
            if not isinstance(meta, dict) or not (refs or isinstance(meta.get("fn"), str)):
                raise ValueError(f"task {tid!r} names no function")
            if type(tid) is not int or not 0 < tid < 1 << 56:
                raise ValueError(f"malformed task number {tid!r}")
            unit = Unit(next(self._ids), ident, tid, refs, frames[pos:pos + n],
                        protocol.frame_digests(header, pos, pos + n), meta, queued_at=now,
                        key=task_key(client.cid, tid) if client.cid else b"")
            pos += n
            if unit.key and self._known_again(client, unit):
                continue  # sent again after a restart: it is here already
            if not _SPECIAL.isdisjoint(meta):
                refusal = self._check_options(unit)
                if refusal is not None:
                    self._send(ident, Kind.RESULTS, {"r": [[tid, "berr", 0, refusal]]})
                    continue
            self.tasks[unit.bid] = unit
            client.tasks[tid] = unit.bid
            if unit.key:
                self._index(unit)
            if durable:
                self.durable.unit_added(unit)
                self.acks.setdefault(ident, []).append(tid)
            if self.watchers:
                self._event("task-received", unit)
            if "dp" in meta and self._held_by_dependencies(unit):
                continue
            self._enqueue(unit)
            if self.workers and (unit.queue != DEFAULT_QUEUE or unit.resources or "fn" in meta
                                 or self._registered_only):
                if self._refuse_pickled(unit):
                    continue
                self._warn_if_unrunnable(client, unit)
        self.counts["submitted"] += len(header["u"])

    # -- durable state
    def _restore(self) -> None:
        """Load what a durable broker stored before it stopped (--store)."""
        store = self.durable
        self._restored_at = time.monotonic()
        for digest, frames, digests in store.objects():
            obj = self.objects[digest] = StoredObject(frames, digests)
            obj.owners.add(ORPHANED)  # until no task uses it, or its client is back
        for key, status, frames, meta, digests, at in store.results(time.time() - self.kept.ttl):
            if "m" not in meta:
                self.kept.put(key, status, frames, meta, digests, at)
        units = []
        for row in store.units():
            cid, tid = row["cid"], row["tid"]
            unit = Unit(row["bid"], b"", tid, row["refs"], row["frames"], row["digests"],
                        row["meta"], queued_at=time.monotonic(),
                        key=task_key(cid, tid) if cid else b"", due=row["due"])
            self._check_options(unit)  # routing and unique keys, as at submit
            self.tasks[unit.bid] = unit
            if unit.key:
                self._index(unit)
            units.append(unit)
        if units:  # this run's ids must not meet the stored ones
            self._ids = itertools.count(max(u.bid for u in units) + (1 << 20))
        for unit in units:
            if "dp" in unit.meta and self._held_by_dependencies(unit):
                continue
            self._enqueue(unit)
        for body in store.schedules():
            self._restore_schedule(body)
        for name, holder in store.locks():
            self.locks.restore(name, Owner(holder["tok"], b"", cid=holder["cid"],
                                           worker=holder["worker"], unit=holder["unit"],
                                           describe=holder["describe"]))
        logger.info("store %s: %d queued task(s), %d result(s), %d schedule(s), %d lock(s) "
                    "restored", store.path, len(units), len(self.kept), len(self.schedules),
                    len(self.locks))

    def _on_resume(self, ident: bytes, msg: protocol.Message) -> None:
        """A client of the broker's previous run is back (a durable broker restarted):
        its tasks in ``t`` are sent to it from now on; finished ones' outcomes at once."""
        h = msg.header
        cid, tids = h.get("cid"), h.get("t", [])
        if not isinstance(cid, bytes) or len(cid) != 8 or not isinstance(tids, list):
            raise ValueError("malformed resume request")
        client = self._client(ident)
        client.cid = cid
        lost = []
        for tid in tids:
            if type(tid) is not int or not 0 < tid < 1 << 56:
                continue
            key = task_key(cid, tid)
            unit = self._unit_of(key)
            if unit is not None:
                unit.client = ident
                client.tasks[tid] = unit.bid
            elif self._stored_outcome(key) is not None:
                self._send_kept(ident, tid, key)
            else:
                lost.append(tid)
        logger.info("client %s resumed %d task(s) after the restart (%d unknown)", cid.hex(),
                    len(tids) - len(lost), len(lost))
        self._send(ident, Kind.REPLY, {"rq": h.get("rq"), "lost": lost})

    def _check_options(self, unit: Unit) -> Optional[dict]:
        """Read a unit's task options; the metadata of its refusal if they are bad,
        or its unique key is taken, or the worker it names does not exist."""
        meta = unit.meta
        try:
            if "q" in meta or "pr" in meta or "rs" in meta:
                unit.queue, unit.priority, unit.resources = unit_route(meta)
            if "at" in meta or "dl" in meta:
                unit.due = due_at(meta)
            if "rl" in meta:
                check_rate(meta["rl"])
        except (TypeError, ValueError) as exc:
            return {"msg": str(exc)}
        target = meta.get("to")
        if target is not None and not any(w.name == target for w in self.workers.values()):
            names = ", ".join(sorted(w.name for w in self.workers.values())) or "none"
            return {"msg": f"no worker is named {target!r} (workers now: {names})"}
        key = meta.get("uq")
        if key is not None:
            if not isinstance(key, str):
                return {"msg": f"malformed unique key {key!r}"}
            holder = self.unique.get(key)
            if holder is not None and self.tasks.get(holder.bid) is holder:
                return {"msg": (f"a task with unique key {key!r} is already {holder.state}: task "
                                f"{task_id(holder.key) if holder.key else holder.bid}; it is "
                                "refused until that one has finished"),
                        "uq": key, "holder": task_id(holder.key) if holder.key else None}
            self.unique[key] = unit
        return None

    def _known_again(self, client: ClientRecord, unit: Unit) -> bool:
        """A task its client sends again (it was not acknowledged when the broker
        restarted): adopt the stored one, or answer with its result."""
        existing = self.by_key.get(unit.key)
        if existing is not None and self.tasks.get(existing.bid) is existing:
            existing.client, existing.tid = client.ident, unit.tid
            client.tasks[unit.tid] = existing.bid
        elif self.durable.durable and self._stored_outcome(unit.key) is not None:
            self._send_kept(client.ident, unit.tid, unit.key)
        else:
            return False
        if self.durable.durable:
            self.acks.setdefault(client.ident, []).append(unit.tid)
        return True

    def _refuse_pickled(self, unit: Unit) -> bool:
        """Fail a unit of pickled code when every connected worker of its queue refuses
        such code (they run registered tasks only)."""
        if "fn" in unit.meta:
            return False
        target = unit.meta.get("to")
        serving = [w for w in self.workers.values()
                   if (w.name == target if target is not None else unit.queue in w.queues)]
        if not serving or not all(w.registered_only for w in serving):
            return False
        names = sorted({t for w in serving for t in w.task_names})
        where = f"worker {target}" if target is not None else \
            f"every connected worker of queue {unit.queue!r}"
        why = (f"{where} runs registered tasks only "
               "(shoal worker --registered-only) and refuses pickled code: submit a task by "
               "name, e.g. "
               f"client.submit({(names or ['pkg.tasks.resize'])[0]!r}, ...); the workers have "
               f"{', '.join(names) or 'no tasks'}")
        self.tasks.pop(unit.bid, None)
        self.clients[unit.client].tasks.pop(unit.tid, None)
        unit.state = "failed"
        self.counts["failed"] += 1
        self._send(unit.client, Kind.RESULTS, {"r": [[unit.tid, "berr", 0, {"msg": why}]]})
        self._settled(unit, "berr", [], {"msg": why})
        return True

    def _warn_if_unrunnable(self, client: ClientRecord, unit: Unit) -> None:
        """Tell a client, once per kind of need, that no connected worker can take its task."""
        needs = describe_route(unit)
        if needs in client.warned or runnable_somewhere(unit, self.workers.values()):
            return
        client.warned.add(needs)
        self._send(client.ident, Kind.NOTICE, {"msg": (
            f"no connected worker serves {needs}: the task waits until one joins "
            f"(start one with `{worker_command(unit)}`); `shoal status` lists such tasks")})

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for digest, units in list(self.parked.items()):
            expired = [u for u in units if now - u.queued_at > PARK_SECONDS]
            if not expired:
                continue
            self.parked[digest] = [u for u in units if u not in expired]
            if not self.parked[digest]:
                del self.parked[digest]
            why = (f"the function or scattered data of this task never reached the broker "
                   f"within {PARK_SECONDS:g} s (was the broker restarted?)")
            by_client: dict[bytes, list] = {}
            for unit in expired:
                if self.tasks.pop(unit.bid, None) is not None:
                    unit.state = "failed"
                    by_client.setdefault(unit.client, []).append(unit.tid)
                    self._settled(unit, "berr", [], {"msg": why})
            for client, tids in by_client.items():
                self._send(client, Kind.ERROR, {"msg": why, "t": tids})

    def _on_scatter(self, ident: bytes, msg: protocol.Message) -> None:
        ident = identity_field(msg.header, "rt", ident)
        self._client(ident)
        failed = msg.header.get("failed")
        if failed is not None:  # the answer to NEED: that dependency did not succeed
            key, why = failed
            if isinstance(key, bytes) and isinstance(why, str):
                self._value_failed(key, why)
            return
        self._store_objects(ident, msg)

    def _on_worker_hello(self, ident: bytes, msg: protocol.Message) -> None:
        h = msg.header
        sender = ident
        # A worker re-registering after a broker restart says hello from its
        # control socket, naming its main socket (``wid``), where tasks go.
        ident = identity_field(h, "wid", ident)
        control = identity_field(h, "ctl", None)
        old = self.workers.get(ident)
        if old is not None and old.control == control and old.pid == h.get("pid"):
            # The same process again (heartbeats queued while the broker was down each
            # asked it to register): it holds what it held; just welcome it.
            self._send(ident, Kind.WELCOME, {"name": old.name, "session": self.session})
            return
        slots = h.get("slots", 1)
        if not isinstance(slots, int) or not 1 <= slots <= 100_000:
            raise ValueError(f"worker announced {slots!r} slots")
        name = str(h.get("name") or f"worker-{h.get('pid')}")
        taken = {w.name for w in self.workers.values() if w.ident != ident}
        base, n = name, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        queues = h.get("qs", [DEFAULT_QUEUE])
        if (not isinstance(queues, list) or not queues
                or not all(isinstance(q, str) and q for q in queues)):
            raise ValueError(f"worker announced queues {queues!r}")
        resources = parse_resources(h.get("rs") or {})
        task_names = h.get("tk", [])
        if not isinstance(task_names, list) or not all(isinstance(t, str) for t in task_names):
            raise ValueError(f"worker announced tasks {task_names!r}")
        if not self._send(ident, Kind.WELCOME, {"name": name, "session": self.session}):
            # Its main socket has not reconnected yet (its control socket spoke for
            # it): tasks sent there would be lost.  Register it once it can be reached.
            self.unreachable[ident] = (sender, msg, time.monotonic())
            return
        self.unreachable.pop(ident, None)
        old = self.workers.pop(ident, None)
        if old is not None:
            self._requeue(old)  # it restarted its session: what it held never ran
        self.workers[ident] = WorkerRecord(ident, name, slots, str(h.get("host", "")),
                                           int(h.get("pid", 0)), last_seen=time.monotonic(),
                                           control=control, key=self._peer_key,
                                           queues=frozenset(queues), resources=resources,
                                           task_names=frozenset(task_names),
                                           registered_only=bool(h.get("ro")))
        self._workers_changed()
        if self.watchers:
            self._event("worker-joined", worker=name, slots=slots, queues=queues)
        logger.info("worker %s joined with %d slot(s)%s%s%s", name, slots,
                    "" if queues == [DEFAULT_QUEUE] else f", queues {','.join(queues)}",
                    f", resources {_format_resources(resources)}" if resources else "",
                    f", {len(task_names)} named task(s)" + (
                        ", registered tasks only" if h.get("ro") else "") if task_names else "")

    def _retry_unreachable(self) -> None:
        """Register workers whose main socket could not be reached at their hello."""
        now = time.monotonic()
        for ident, (sender, msg, since) in list(self.unreachable.items()):
            if now - since > self.worker_timeout:
                del self.unreachable[ident]
                logger.warning("worker %s said hello but its task socket never became reachable",
                               msg.header.get("name"))
            else:
                self._on_worker_hello(sender, msg)

    def _workers_changed(self) -> None:
        """A worker joined or left: what every client was told about unrunnable tasks may
        no longer hold."""
        self._registered_only = any(w.registered_only for w in self.workers.values())
        for client in self.clients.values():
            client.warned.clear()

    def _on_worker_bye(self, ident: bytes, msg: protocol.Message) -> None:
        worker = self.workers.pop(ident, None)
        if worker is not None:
            self._workers_changed()
            if self.watchers:
                self._event("worker-left", worker=worker.name)
            logger.info("worker %s left", worker.name)
            self._fail_addressed_to(worker)
            self._requeue(worker)

    def _worker_of(self, ident: bytes, header: dict) -> Optional[WorkerRecord]:
        """The worker a message speaks for: its main socket, or its control socket (``wid``)."""
        worker = self.workers.get(identity_field(header, "wid", ident))
        if worker is not None and ident not in (worker.ident, worker.control):
            return None  # a control message must come from that worker's control socket
        return worker

    def _on_heartbeat(self, ident: bytes, msg: protocol.Message) -> None:
        header = msg.header
        if "wid" not in header:  # a client's: answer, so it knows this broker is alive
            self._client(ident)
            self._send(ident, Kind.HEARTBEAT, {"session": self.session,
                                               "store": self.durable.store_id,
                                               "workers": len(self.workers)})
            return
        worker = self._worker_of(ident, header)
        if worker is not None:
            self._note_heartbeat(worker, header)
        elif identity_field(header, "wid", None) not in self.workers:
            # A worker this broker does not know (it restarted): ask it to register.
            self._send(ident, Kind.WELCOME, {"rehello": True})

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
        # Results are matched by task, whoever sends them: a worker declared
        # lost that was only slow may still deliver first.  The first result
        # wins; any later one for the same task is a counted duplicate.
        worker = self.workers.get(ident)
        if worker is not None:
            worker.last_seen = time.monotonic()
        header, frames = msg.header, msg.frames
        outgoing: dict[bytes, tuple[list, list, dict]] = {}
        settled = []
        pos = 0
        for bid, status, n, meta in header["r"]:
            start, pos = pos, pos + n
            if status == "retry":
                self._retry_later(bid, meta, worker)
                continue
            unit = self.tasks.pop(bid, None)
            if unit is None:
                self.counts["duplicates"] += 1
                continue
            holder = self.workers.get(unit.worker) if unit.worker else None
            if holder is not None:
                holder.finish(bid)
            client = self.clients.get(unit.client)
            if client is not None:
                client.tasks.pop(unit.tid, None)
            unit.state = "done"
            if worker is not None:
                worker.done += 1
                t = meta.get("t")
                if t is not None:
                    worker.observe(t)  # per unit: prefetch counts units, batches included
            self.counts[_COUNTED.get(status, "failed")] += 1
            meta["w"] = worker.name if worker is not None else "a worker no longer registered"
            unit_frames = frames[start:start + n]
            unit_digests = protocol.frame_digests(header, start, start + n)
            self._keep_result(unit, status, unit_frames, meta, unit_digests)
            settled.append((unit, status, unit_frames, meta, unit_digests))
            entries, out_frames, digests = outgoing.setdefault(unit.client, ([], [], {}))
            base = len(out_frames)
            for i, d in unit_digests.items():
                digests[base + i] = d
            out_frames.extend(unit_frames)
            entries.append([unit.tid, status, n, meta])
        for client, (entries, out_frames, digests) in outgoing.items():
            if client:  # (none for a periodic run, or a restored task not yet resumed)
                self._send(client, Kind.RESULTS, {"r": entries}, out_frames, digests)
        # After the results themselves: a dependent's failure then reaches a
        # client that already has the exception it names.
        for outcome in settled:
            self._settled(*outcome)

    def _retry_later(self, bid: int, meta: dict, worker: Optional[WorkerRecord]) -> None:
        """A worker asks to run unit ``bid`` again after ``meta["dl"]`` seconds
        (a retry with back-off): the broker holds it meanwhile, the slot serves others."""
        unit = self.tasks.get(bid)
        if unit is None or unit.state != RUNNING or worker is None or unit.worker != worker.ident:
            self.counts["duplicates"] += 1  # it was lost and requeued meanwhile
            return
        worker.finish(bid)
        worker.done += 1
        delay = meta.get("dl", 0.0)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
            delay = 0.0
        attempt = meta.get("att")
        unit.meta["att"] = attempt if type(attempt) is int else unit.meta.get("att", 0) + 1
        unit.worker = None
        unit.due = time.time() + delay
        self.durable.unit_updated(unit)
        if self.watchers:
            self._event("task-retried", unit, worker=worker.name, delay=delay,
                        attempt=unit.meta["att"])
        self.counts["retried"] = self.counts.get("retried", 0) + 1
        logger.debug("task %d retries in %.3f s (attempt %d)", bid, delay, unit.meta["att"] + 1)
        self._enqueue(unit)

    def _dispatch(self) -> None:
        """Hand queued units to workers by credit, FIFO, spreading a short queue evenly."""
        now = time.monotonic()
        free = [w for w in self.workers.values() if w.capacity > 0 and w.blocked_until <= now]
        while self.queue and free:
            # Idle slots first, so a new task never waits behind another's prefetch.
            free.sort(key=lambda w: len(w.running) - w.slots)
            share = max(1, math.ceil(len(self.queue) / len(free)))
            progressed = False
            for worker in list(free):
                units = self.queue.take(worker, min(worker.capacity, share), self._admit)
                if units:
                    progressed = True
                    if not self._send_units(worker, units):
                        units = None  # unreachable for now
                if worker.capacity <= 0 or not units:
                    free.remove(worker)
                if not self.queue:
                    break
            if not progressed:
                break

    def _send_units(self, worker: WorkerRecord, units: list) -> bool:
        """Send ``units`` to ``worker``; False (and the units back in the queue) if its
        task socket cannot be reached."""
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
            if unit.bid not in worker.running:  # (units with resources are claimed when taken)
                worker.start(unit)
            if self.watchers:
                self._event("task-started", unit, worker=worker.name)
        fields = {"u": entries}
        if objects:
            fields["ob"] = objects
        if self._send(worker.ident, Kind.TASKS, fields, frames, digests):
            return True
        # Its task socket is not connected: it died (liveness will say so, and
        # charge what it was running) or it is reconnecting.  These units never
        # left: put them back, and try the worker again in a moment.
        for unit in reversed(units):
            worker.finish(unit.bid)
            unit.state, unit.worker = QUEUED, None
            self.queue.appendleft(unit)
        worker.objects.difference_update(ref for ref, _ in objects)
        worker.blocked_until = time.monotonic() + 0.5
        logger.info("worker %s cannot be reached now; %d task(s) stay queued", worker.name,
                    len(units))
        return False


def _format_resources(resources: dict) -> str:
    return ",".join(f"{name}={amount:g}" for name, amount in sorted(resources.items()))


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
    """``shoal broker``: see :mod:`shoal.broker_cli`."""
    from .broker_cli import main as run
    return run(argv)


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: pickles refer to
    # shoal.broker's globals (the object store), which must be the ones in use.
    from shoal import broker as _module
    sys.exit(_module.main())
