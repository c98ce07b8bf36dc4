"""The broker: one ROUTER socket that clients and workers both connect to.

It routes bytes.  It never unpickles a task, a function or a result: it reads
only the signed msgpack headers.  It keeps the FIFO queue of task units, each
worker's credits (free slots plus a prefetch allowance earned by short tasks),
and a store of objects (function payloads and scattered data) by digest, so
each object travels to each worker once.

This module holds the socket, the main loop and the message dispatch; the
broker's other jobs are mixins in their own modules: submissions
(:mod:`~shoal.admission`), workers (:mod:`~shoal.workerside`,
:mod:`~shoal.liveness`), results and dependencies (:mod:`~shoal.flow`),
restarts (:mod:`~shoal.recovery`), requests (:mod:`~shoal.requests`), locks,
schedules and events.

Run it with ``shoal broker`` or ``python -m shoal.broker``.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import zmq

from . import protocol
from .protocol import SESSION_BOUND, Kind, ProtocolError, ReplayGuard, Session, VersionMismatch
from .admission import Admission
from .direct import Early
from .directside import DirectUnits
from .durable import MemoryOnly
from .flow import Flow
from .liveness import Liveness
from .locks import LockRequests, LockTable
from .monitor import Events
from .periodic import ScheduleRequests, Schedules
from .recovery import Recovery
from .requests import Requests
from .records import QUEUED, CancelRequest, ClientRecord, StoredObject, Unit, WorkerRecord
from .routing import TaskQueue
from .security import (AllowList, BrokerSecrets, ConnectionInfo, broker_secrets, create_peer,
                       new_key, read_connection_file, runtime_dir, write_connection_file)
from .serialize import host_id
from .scheduling import RateLimits, Timers
from .store import ResultStore, TaskResults
from .transport import MalformedBundle, MessageTooLarge, recv_frames, release_memory, send_frames
from .workerside import WorkerSide

logger = logging.getLogger(__name__)

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

#: Limits on what one message may hold (``--max-frames``, ``--max-message-size``).
MAX_FRAMES = 100_000
MAX_MESSAGE_BYTES = 4 << 30
#: Log at most this many dropped-message lines per second; the rest are counted.
DROP_LOG_PER_SECOND = 5

class Broker(Admission, WorkerSide, DirectUnits, Liveness, Flow, Recovery, Requests,
             LockRequests, ScheduleRequests, Events):
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
        # Each client's base for the ids of units it hands straight to workers.
        self._direct_bases = itertools.count(int.from_bytes(os.urandom(2), "big"))
        self.early = Early()  # direct units' results that beat their submissions
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
        #: joins still to tell the launcher of on stdout (shoal broker --announce-workers)
        self.announce_workers = 0
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
                    # Ask the socket whether more waits rather than reading until
                    # zmq.Again: raising that costs more than the check.
                    for _ in range(512):
                        if not sock.get(_EVENTS) & _POLLIN:
                            break
                        try:
                            frames = recv_frames(sock, max_frames=self.max_frames + 1,
                                                 max_bytes=self.max_message_bytes, envelope=1)
                        except zmq.Again:
                            break
                        except MessageTooLarge as exc:
                            self._drop(b"?", str(exc))
                            self._trim_due = True
                            continue
                        except MalformedBundle as exc:
                            self._drop(b"?", str(exc))
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
        if self.early:
            self.early.expire()
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
                                                             digests, self.out)], envelope=1)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False  # gone, or not yet reconnected (see ROUTER_MANDATORY above)
        return True

    def _handle(self, frames: list) -> None:
        ident = frames[0].bytes
        if self.allow is not None:
            self._peer_key = frames[0].get("User-Id")  # (the routing frame: never bundled)
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
            if msg.kind in SESSION_BOUND and msg.header.get("bs") != self.session:
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
            record = self.clients[ident] = ClientRecord(ident,
                                                        direct_base=next(self._direct_bases))
        record.last_seen = time.monotonic()
        return record

    def _on_client_hello(self, ident: bytes, msg: protocol.Message) -> None:
        record = self._client(ident)
        self._send(ident, Kind.WELCOME, {**self._summary(), **self._direct_offer(record)})

    def _summary(self) -> dict:
        summary = {"workers": len(self.workers), "session": self.session,
                   "slots": sum(w.slots for w in self.workers.values()),
                   "hosts": sorted({w.host for w in self.workers.values()}),
                   "broker_host": host_id()}
        if self.durable.durable:
            summary["store"] = self.durable.store_id  # a client of a restart resumes its tasks
        return summary


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


def main(argv: Optional[list] = None) -> int:
    """``shoal broker``: see :mod:`shoal.broker_cli`."""
    from .broker_cli import main as run
    return run(argv)


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: pickles refer to
    # shoal.broker's globals (the object store), which must be the ones in use.
    from shoal import broker as _module
    sys.exit(_module.main())
