"""The client's IO: the thread that owns the socket, and the leader protocol
by which a thread blocked in ``result()`` receives for itself (a mixin of
:class:`~shoal.client.Client`).

User threads hand commands to the IO thread through a deque and a wake-up
pipe.  A thread that waits on one future may take the socket over
(:meth:`ClientIO._lead`) while the IO thread parks, so a round trip costs no
thread switch in the client.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Optional

import zmq
from zmq.backend import zmq_poll

from . import protocol, serialize
from .errors import (BrokerError, BrokerLost, BrokerUnreachable, ClientClosed, NoWorkersError,
                     TransferError)
from .direct import (CLIENT_COPY, NOTICE_SECONDS, direct_bid, eligible, ms_until,
                     send_record)
from .futures import Future
from .outcomes import settle
from .protocol import SESSION_BOUND, FrameAltered, Kind, ProtocolError
from .security import HandshakeWatch, apply_curve, runtime_dir
from .transport import recv_frames, send_frames

if TYPE_CHECKING:
    from .client import Client

logger = logging.getLogger(__name__)

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

#: A client heartbeats this often; it declares the broker lost when it has
#: tasks in flight and heard nothing for ``broker_timeout`` (default 10 s).
HEARTBEAT_SECONDS = 1.0
BROKER_TIMEOUT = 10.0


class _Noted:
    """What the broker is yet to be told of the direct tasks handed to one worker: their
    submission (objects; each unit's entry and frames) and the outcomes this client has."""

    __slots__ = ("objects", "object_frames", "units", "done", "done_frames")

    def __init__(self) -> None:
        self.objects: list = []
        self.object_frames: list = []
        self.units: dict = {}  # task number -> [entry, frames]
        self.done: list = []
        self.done_frames: list = []


class ClientIO:
    """The socket, owned by the IO thread or lent to a leading thread (a mixin of Client)."""

    def _post(self: "Client", command: tuple, soon: bool = False) -> None:
        """Queue ``command`` for the broker.  ``soon``: have it sent now even when no
        thread leads (a map's feeder: its first batches should not wait the parked IO
        thread's 5 ms recheck); a submit waits, as ``result()`` usually follows to send it."""
        self._commands.append(command)
        if soon and self._io_parked and not self._leader_wanted:
            with self._park:
                self._park.notify()
            return
        self._wake()

    def _wake(self: "Client") -> None:
        if self._io_parked and not self._leader_wanted:
            return  # no one polls the pipe: the parked IO thread rechecks within 5 ms
        if not self._woken:
            # Write, then raise the flag; _flush drains the pipe, then lowers it.  So
            # no byte stays behind with the flag down (a leader would see the pipe
            # readable for ever and spin without heartbeating), and the flag never
            # stays up with the pipe empty (later commands would wait for a timeout).
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._woken = True

    def _park_io(self: "Client") -> None:
        """Keep the IO thread off the socket while threads lead.

        It rechecks every 5 ms rather than being woken when a leader ends or
        a task is queued, so back-to-back round trips from one thread cost no
        IO-thread wake-up; work queued between leaders waits at most that long.
        """
        with self._park:
            self._io_parked = True
            while self._leader_wanted and not self._closed:
                self._park.wait(0.005)
            self._io_parked = False

    def _lead(self: "Client", future: Future, timeout: Optional[float]) -> None:
        """Receive on this thread until ``future`` is done or ``timeout`` passes.

        Does nothing (the caller then waits as usual) when another thread is
        already receiving, or when called from the IO thread itself.
        """
        if self._closed or self._broken or threading.current_thread() is self._thread:
            return
        if not self._lead_lock.acquire(blocking=False):
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._park:
                self._leader_wanted = True
                parked = self._io_parked
            if not parked:
                self._wake()  # the IO thread leaves its poll and parks
            if not self._sock_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                return
            try:
                sock = self._sock
                if not self._flush(sock, leader=True):
                    return
                direct = self._direct
                version, items = -1, None
                while not future.done() and not self._closed:
                    wait = 100 if deadline is None else min(100, int((deadline - time.monotonic()) * 1000))
                    if wait < 0:
                        return
                    if self._noted:
                        if time.monotonic() >= self._noted_due:
                            self._send_noted(sock)
                        else:
                            wait = min(wait, ms_until(self._noted_due))
                    if version != direct.version:  # a direct link opened or closed
                        version = direct.version
                        items = [(sock, _POLLIN), (self._wake_r, _POLLIN)] + [
                            (link.sock.fileno(), _POLLIN) for link in direct.links.values()]
                    ready = zmq_poll(items, wait)
                    if ready:
                        # Only what is ready: asking the broker's socket costs ~2-5 us.
                        if ready[0][0] is sock:
                            self._receive(sock)
                        if direct.links and ready[-1][0] not in (sock, self._wake_r):
                            self._receive_direct()
                        if self._woken and not self._flush(sock, leader=True):
                            return
                    else:
                        self._housekeeping(sock)  # the parked IO thread cannot
            finally:
                self._sock_lock.release()
        finally:
            self._leader_wanted = False
            self._lead_lock.release()

    def _io_loop(self: "Client") -> None:
        sock = self._ctx.socket(zmq.DEALER)
        watch = None
        try:
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            apply_curve(sock, self.info)
            self._watch = watch = HandshakeWatch(sock, self.info, "client")
            sock.connect(self.info.local_address())
            self._sock = sock
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            poller.register(watch.monitor, zmq.POLLIN)
            lock = self._sock_lock
            direct, version, polled = self._direct, -1, set()
            while not self._broken:
                with lock:
                    if version != direct.version:  # a direct link opened or closed
                        version = direct.version
                        # (by fd: a poller answers a plain socket's readiness with its fd)
                        links = {link.sock.fileno() for link in direct.links.values()}
                        for s in polled - links:
                            poller.unregister(s)
                        for s in links - polled:
                            poller.register(s, zmq.POLLIN)
                        polled = links
                    # Commands queued while this thread was parked wrote no
                    # wake-up byte: don't wait on the poll before sending them.
                    wait = 0 if self._commands else 250
                    if self._noted:
                        wait = min(wait, ms_until(self._noted_due))
                    for s, _ in poller.poll(wait):
                        if s is sock:
                            self._receive(sock)
                        elif s is watch.monitor:
                            why = watch.check()
                            if why is not None:
                                self._give_up(why)
                        elif s in polled:
                            self._receive_direct()
                    if not self._flush(sock):
                        break
                    self._housekeeping(sock)
                if self._leader_wanted:
                    self._park_io()
        except Exception as exc:  # the IO thread must never die silently
            logger.exception("shoal client IO thread failed")
            self._broken = self._broken or f"the client's IO thread failed ({exc!r}); see the log"
            for tid in list(self._pending):
                self._fail(tid, ClientClosed("the client's IO thread failed; see the log"))
            self._welcome.set()  # Client() stops waiting, and raises saying why
        finally:
            if watch is not None:
                watch.close()
            with self._sock_lock:
                self._direct.close()
            sock.close(linger=500)

    def _send(self: "Client", sock, kind: str, fields: Optional[dict] = None, frames=()) -> None:
        if self._noted and kind != Kind.HEARTBEAT:
            self._send_noted(sock)  # what the broker must know before this message
        if kind in SESSION_BOUND:
            fields = dict(fields or (), bs=self._session)
        try:
            send_frames(sock, protocol.encode(self._key, kind, fields, frames, session=self._out),
                        block=False)
        except zmq.Again:
            # SNDHWM is 0: refused only once libzmq gave the connection up for good
            # (a refused or failed handshake), when a blocking send would never return.
            self._give_up(self._watch.check() or (
                f"the connection to the broker at {self.address} was closed for good (its "
                "handshake failed); check that this client has the broker's connection file"))

    def _give_up(self: "Client", why: str) -> None:
        """The broker cannot be reached, for good: fail everything waiting with
        BrokerUnreachable(why); from now on the client can only be closed."""
        if self._broken is None:
            self._broken = why
            logger.error("%s", why)
        error = BrokerUnreachable(why)
        for tid in list(self._pending):
            self._fail(tid, error)
        waiters = list(self._replies.values()) + list(self._status_waiters)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._welcome.set()  # Client() stops waiting, and raises

    def _flush(self: "Client", sock, leader: bool = False) -> bool:
        """Send everything queued, submits coalesced; False once the client closes.

        A leader leaves ``close`` to the IO thread and stops leading.
        """
        if self._woken:
            # Drain, then lower the flag (see _wake).
            try:
                os.read(self._wake_r, 4096)
            except (BlockingIOError, OSError):
                pass
            self._woken = False
        commands = self._commands
        entries: list = []
        objects: list = []
        frames: list = []
        unit_frames: list = []
        while commands:
            cmd = commands.popleft()
            kind = cmd[0]
            if kind == Kind.SUBMIT:
                _, tid, fn_digest, fn_payload, refs, parts, meta = cmd
                if (not commands and not entries and len(self._pending) == 1
                        and self._direct.base is not None and self._store is None
                        and tid in self._pending and tid not in self._segments
                        and eligible(tid, fn_digest, refs, parts, meta)
                        and self._send_direct(sock, cmd)):
                    continue
                if self._store is not None:
                    self._unacked[tid] = cmd  # sent again if the broker restarts before storing it
                if fn_digest is None:  # a task sent by name
                    entries.append([tid, refs, len(parts), meta])
                else:
                    self._add_object(fn_digest, fn_payload, objects, frames)
                    entries.append([tid, [fn_digest, *refs], len(parts), meta])
                unit_frames.extend(parts)
                if len(entries) >= 4096:
                    self._send_submit(sock, entries, objects, frames + unit_frames)
                    entries, objects, frames, unit_frames = [], [], [], []
                continue
            if entries:  # keep order: queued tasks leave before what follows them
                self._send_submit(sock, entries, objects, frames + unit_frames)
                entries, objects, frames, unit_frames = [], [], [], []
            if kind == Kind.SCATTER:
                _, digest, parts = cmd
                if digest not in self._sent_objects:
                    self._sent_objects.add(digest)
                    self._send(sock, Kind.SCATTER, {"ob": [[digest, len(parts)]]}, parts)
            elif kind == Kind.CANCEL:
                self._send(sock, Kind.CANCEL, {"t": cmd[1], "rq": cmd[4], "r": cmd[3]})
            elif kind == Kind.ATTACH:
                self._send(sock, Kind.ATTACH, {"key": cmd[1], "drop": cmd[2], "rq": cmd[3]})
            elif kind == Kind.WORKER_LOST:
                self._send(sock, Kind.WORKER_LOST, {"name": cmd[1], "why": cmd[2]})
            elif kind == "ask":
                _, ask_kind, fields, parts, rq = cmd
                if ask_kind in SESSION_BOUND and rq is not None:
                    self._asked[rq] = cmd  # sent again if it reaches a restarted broker
                self._send(sock, ask_kind, dict(fields, rq=rq), parts)
            elif kind == "dep-failed":
                self._send(sock, Kind.SCATTER, {"failed": [cmd[1], cmd[2]]})
            elif kind == "watch":
                self._send(sock, Kind.WATCH, cmd[1])
            elif kind == Kind.CLIENT_HELLO:
                self._send(sock, kind, {"cid": self.cid})
            elif kind == "close":
                if leader:
                    commands.appendleft(cmd)
                    return False
                self._send(sock, Kind.CLIENT_BYE)
                return False
            else:
                self._send(sock, kind)  # STATUS or CLIENT_HELLO
        if entries:
            self._send_submit(sock, entries, objects, frames + unit_frames)
        if self._noted and time.monotonic() >= self._noted_due:
            self._send_noted(sock)
        return True

    def _send_submit(self: "Client", sock, entries: list, objects: list, frames: list,
                     direct: Optional[tuple] = None, done: list = ()) -> None:
        fields = {"u": entries, "cid": self.cid}
        if objects:
            fields["ob"] = objects
        if direct is not None:  # handed to that worker, named on that id base
            fields["dw"], fields["db"] = direct
        if done:
            fields["do"] = done
        self._send(sock, Kind.SUBMIT, fields, frames)

    def _send_direct(self: "Client", sock, cmd: tuple) -> bool:
        """Hand a lone task straight to a local worker, and tell the broker so
        (see shoal.direct); False when no worker is offered or its link refuses."""
        link = self._direct.pick()
        if link is None:
            return False
        _, tid, fn_digest, fn_payload, _, parts, meta = cmd
        fields = {"u": [[direct_bid(self._direct.base, tid), [fn_digest], len(parts), meta]]}
        frames = list(parts)
        if fn_digest not in link.objects:
            fields["ob"] = [[fn_digest, 1]]
            frames.insert(0, fn_payload)
        if not send_record(link.sock, protocol.encode(self._key, Kind.TASKS, fields, frames,
                                                      session=link.session)):
            return False  # the worker left, does not read, or this is too large: the broker's path
        link.objects.add(fn_digest)
        self._direct.sent += 1
        # The same submission for the broker, which records it as running there;
        # held a moment, to leave with others (see shoal.direct.NOTICE_SECONDS).
        group = (link.name, self._direct.base)
        held = self._noted_group(group)
        self._add_object(fn_digest, fn_payload, held.objects, held.object_frames)
        held.units[tid] = [[tid, [fn_digest], len(parts), meta], parts]
        self._direct_open[tid] = group
        return True

    def _add_object(self: "Client", digest: bytes, payload, objects: list, frames: list) -> None:
        """Put a function the broker does not hold yet into a submission's objects."""
        if digest not in self._sent_objects:
            self._sent_objects.add(digest)
            objects.append([digest, 1, self._fn_names.get(digest, "")])
            frames.append(payload)

    def _noted_group(self: "Client", group: tuple) -> "_Noted":
        """What the broker is yet to be told of one worker's direct tasks (the first
        thing noted starts the clock: see shoal.direct.NOTICE_SECONDS)."""
        if not self._noted:
            self._noted_due = time.monotonic() + NOTICE_SECONDS
        held = self._noted.get(group)
        if held is None:
            held = self._noted[group] = _Noted()
        return held

    def _send_noted(self: "Client", sock) -> None:
        """Tell the broker of the tasks handed straight to workers since it was last told,
        and the outcomes this client has of them (so it counts them done at once: this
        client's next request sees them so, however long they took)."""
        noted, self._noted = self._noted, {}
        for (name, base), held in noted.items():
            entries, frames = [], held.object_frames
            if held.units:
                frames = list(frames)
                for entry, parts in held.units.values():
                    entries.append(entry)
                    frames.extend(parts)
            self._send_submit(sock, entries, held.objects, frames + held.done_frames,
                              direct=(name, base), done=held.done)

    def _receive_direct(self: "Client") -> None:
        for msg in self._direct.receive(self._key, self._guard):
            self._last_heard = time.monotonic()
            pos = 0
            for tid, status, n, meta in msg.header["r"]:
                group = self._direct_open.pop(tid, None)
                if group is not None:  # the broker gets this client's copy too
                    held = self._noted_group(group)
                    # With its outcome, and without the arguments of a unit the
                    # broker is yet to hear of: it will not run again.
                    unit = held.units.get(tid)
                    if unit is not None:
                        entry = unit[0]
                        unit[0], unit[1] = [tid, entry[1], 0, entry[3]], ()
                    held.done.append([tid, status, n, {**meta, "dd": CLIENT_COPY}])
                    held.done_frames.extend(msg.frames[pos:pos + n])
                elif (tid not in self._pending and isinstance(meta.get("w"), str)
                      and self._direct.base is not None):
                    # Its worker's late result: the unit ran again elsewhere (that worker
                    # was declared lost), and the broker counts this as a duplicate.
                    held = self._noted_group((meta["w"], self._direct.base))
                    held.done.append([tid, status, 0, {"dd": CLIENT_COPY}])
                pos += n
            self._on_results(msg)

    def _receive(self: "Client", sock) -> None:
        # Ask the socket whether more is waiting instead of reading until
        # zmq.Again: raising that costs more than the check.
        while sock.get(_EVENTS) & _POLLIN:
            self._last_heard = time.monotonic()
            try:
                msg = protocol.decode(self._key, recv_frames(sock), guard=self._guard)
            except FrameAltered as exc:
                logger.error("a message from the broker was altered in transit: %s", exc)
                if exc.message.kind == Kind.RESULTS:
                    self._on_altered_results(exc.message)
                continue
            except ProtocolError as exc:
                logger.warning("dropped a message from the broker: %s", exc)
                continue
            kind = msg.kind
            if kind == Kind.RESULTS:
                self._on_results(msg)
            elif kind == Kind.OUTPUT:
                target = self._pending.get(msg.header.get("t"))
                if target is not None:
                    target._live_output(msg.header.get("o", ""), msg.header.get("e", ""))
            elif kind == Kind.CANCELLED:
                waiter = self._replies.get(msg.header.get("rq"))
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg.header["t"])
            elif kind == Kind.ATTACHED or kind == Kind.REPLY:
                if self._asked:
                    self._asked.pop(msg.header.get("rq"), None)
                waiter = self._replies.get(msg.header.get("rq"))
                if waiter is not None and not waiter.done():
                    waiter.set_result((msg.header, msg.frames))
            elif kind == Kind.ACK:
                self._on_ack(msg.header.get("t"))
            elif kind == Kind.EVENTS:
                if self._events is not None:
                    self._events.deliver(msg.header.get("e", []))
            elif kind == Kind.HEARTBEAT:
                self._check_session(msg.header.get("session"), msg.header.get("store"))
                self._learn(msg.header)  # (notices the last worker leaving, too)
            elif kind == Kind.WELCOME or kind == Kind.STATUS_REPLY:
                self._check_session(msg.header.get("session"), msg.header.get("store"))
                self._learn(msg.header)
                if kind == Kind.WELCOME:
                    self._welcome.set()
                elif self._status_waiters:
                    waiter = self._status_waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(msg.header)
            elif kind == Kind.NOTICE:
                logger.warning("broker: %s", msg.header.get("msg", ""))
            elif kind == Kind.NEED:
                self._send_dependency(msg.header.get("key"))
            elif kind == Kind.ERROR and msg.header.get("stale"):
                # Our request named an earlier run of the broker: it restarted.
                self._check_session(msg.header.get("session"), msg.header.get("store"))
                error = BrokerLost(f"the broker at {self.address} restarted; resubmit")
                for tid in msg.header.get("t") or ():
                    again = self._unacked.get(tid) if self._store else None
                    if again is not None:
                        self._post(again)  # a durable broker takes it again
                    else:
                        self._fail(tid, error)
                asked = self._asked.pop(msg.header.get("rq"), None)
                if asked is not None:
                    self._post(asked)  # a request it sent before it saw the restart
            elif kind == Kind.ERROR:
                text = msg.header.get("msg", "unknown error")
                tids = msg.header.get("t")
                if not tids:  # otherwise the failed futures carry the message
                    logger.error("broker: %s", text)
                for tid in tids or ():
                    self._asked.pop(tid, None)
                    self._unacked.pop(tid, None)
                    self._fail(tid, BrokerError(text))

    def _learn(self: "Client", header: dict) -> None:
        self._direct.learn(header)
        self.workers = header.get("workers", 0)
        self.slots = header.get("slots", 0)
        self.hosts = header.get("hosts", [])
        if self.workers:
            self._no_workers_since = None

    def _housekeeping(self: "Client", sock) -> None:
        """Heartbeat the broker; fail tasks if it or every worker is gone."""
        self._check_workers(sock)
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + HEARTBEAT_SECONDS
        self._send(sock, Kind.HEARTBEAT)
        silent = now - self._last_heard
        if silent > self.broker_timeout and (self._pending or self._replies or self._events):
            self._lose_broker(f"the broker at {self.address} has not answered for {silent:.0f} s")

    def _check_session(self: "Client", session: Optional[str], store: Optional[str] = None) -> None:
        if session is None:
            return
        store = store or None  # (a broker without --store says "")
        restarted = self._session is not None and session != self._session
        durable = restarted and store is not None and store == self._store
        self._session = session
        if restarted and durable:
            self._resume()  # the same store: what it acknowledged is still there
        elif restarted:
            self._lose_broker(f"the broker at {self.address} restarted")
        self._store = store

    def _lose_broker(self: "Client", why: str) -> None:
        """The broker died or restarted: what it held is gone; fail it, never hang."""
        self._sent_objects.clear()  # a new broker holds none of them
        self._direct.forget_objects()
        self._noted.clear()  # (their tasks fail below, with every other in flight)
        self._direct_open.clear()
        lost = len(self._pending)
        error = BrokerLost(f"{why}; {lost} task(s) in flight were lost. Submit them again once "
                           "it is back (a keyed map resumes where it stopped).")
        if lost:
            logger.error("%s", error)
        for tid in list(self._pending):
            self._fail(tid, error)
        for waiter in list(self._replies.values()):
            if not waiter.done():
                waiter.set_exception(error)
        if self._events is not None:
            self._events.fail(error)
            self._events = None
        self._last_heard = time.monotonic()

    def _check_workers(self: "Client", sock) -> None:
        """Fail pending tasks if no worker has joined within ``worker_timeout``."""
        if self.workers or not self._pending:
            self._no_workers_since = None
            return
        now = time.monotonic()
        if self._no_workers_since is None:
            self._no_workers_since = now
            self._send(sock, Kind.STATUS)
            return
        if now - self._no_workers_since > self.worker_timeout:
            error = NoWorkersError(
                f"no worker joined the broker at {self.address} within {self.worker_timeout:g} s. "
                f"Start one with `shoal worker {self.address}` (or shoal.Cluster), check that it "
                "was given this broker's address and connection file, and see its log "
                f"(local clusters log to {runtime_dir()}).")
            for tid in list(self._pending):
                self._fail(tid, error)
            self._no_workers_since = None
        else:
            self._send(sock, Kind.STATUS)  # learn when the first worker joins

    def _on_results(self: "Client", msg: protocol.Message) -> None:
        frames = msg.frames
        pos = 0
        for tid, status, n, meta in msg.header["r"]:
            part = frames[pos:pos + n]
            pos += n
            target = self._pending.pop(tid, None)
            if self._direct_open:  # (a direct task bounced, or run again, by the broker)
                self._direct_open.pop(tid, None)
            if self._asked or self._unacked:  # (a fetch by id; a durable broker's task)
                self._asked.pop(tid, None)
                self._unacked.pop(tid, None)
            # Our argument segments: unlinked now, but their mappings are kept
            # alive by the decoder because a result may be a view of them.
            names = self._segments.pop(tid, None) if self._segments else None
            held = [serialize.segments.release(name) for name in names] if names else ()
            if target is not None:
                settle(target, status, part, meta, held)

    def _on_altered_results(self: "Client", msg: protocol.Message) -> None:
        """RESULTS whose large frame did not match its signed digest: fail their futures
        (nothing of them is unpickled) rather than leave them waiting for ever."""
        entries = msg.header.get("r")
        for entry in entries if isinstance(entries, list) else ():
            tid = entry[0] if isinstance(entry, list) and entry else None
            if not isinstance(tid, int) or tid not in self._pending:
                continue
            self._fail(tid, TransferError(
                f"the result of task {tid} was altered in transit on its way from the "
                "worker (a frame does not match its signed digest), so it was not unpickled. "
                "Check the network path; a Curve-secured broker (the default beyond loopback) "
                "rules this out. Run the task again"))
            self._release(tid)
