"""The worker process: connects out to the broker, runs tasks, sends results.

The main thread owns the socket.  A one-slot worker (the default) runs tasks
on that thread, which keeps the hand-offs off the latency path; with more
slots each slot is a thread fed from a queue.
Function payloads and scattered data arrive once per worker and are kept by
digest.  Each unit's stdout and stderr are captured and sent with its result.

Run it with ``shoal worker tcp://HOST:PORT`` or ``shoal worker --connection-file FILE``.
"""
from __future__ import annotations

import argparse
import faulthandler
import heapq
import itertools
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Optional

import zmq

from . import protocol, serialize, tasks
from .capture import OutputRouter
from .control import CancelInterrupt, Control, Interrupted, TimeoutInterrupt
from .errors import (RemoteError, ResultTooLarge, RetriesExhausted, Retry, TaskTimeout,
                     TransferError)
from .objects import ObjectStore
from .options import RETRY_BACKOFF_MAX
from .protocol import FrameAltered, Kind, ProtocolError
from .records import DEFAULT_QUEUE
from .routing import parse_resources
from .scheduling import backoff_delay
from .security import (ConnectionInfo, HandshakeWatch, apply_curve, find_local_broker,
                       read_connection_file, read_key_file)
from .transport import recv_frames, send_frames

logger = logging.getLogger(__name__)

#: A result larger than this (bytes, pickled) fails with a clear error instead
#: of being sent; ``shoal worker --max-result-size`` changes it.
MAX_RESULT_SIZE = 1 << 30

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


# ----------------------------------------------------------------- objects
store = ObjectStore()  # this process's; Ref pickles resolve through it

#: A namespace that lives as long as the worker process, for code that sets up
#: state once and uses it in later tasks (the notebook's ``%%remote`` cells).
namespace: dict = {"__name__": "__shoal_worker__"}


_current: Optional["Worker"] = None


def current_worker() -> Optional["Worker"]:
    """The worker this process runs, if it is a worker (tasks ask it for locks)."""
    return _current


def resolve_ref(digest: bytes) -> Any:
    """Unpickling hook for :class:`shoal.client.Ref`: the scattered value itself."""
    return store.get(digest)


def _remote_traceback(exc: BaseException) -> str:
    # Drop the worker's own frames so the user's function is the first line shown.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def describe(exc: BaseException) -> dict:
    """``{"x": "ValueError: bad value"}``: a failed task's error in words, for the
    broker (which never unpickles it) to tell dependents and event watchers."""
    text = str(exc)
    if len(text) > 200:
        text = text[:197] + "..."
    return {"x": f"{type(exc).__name__}: {text}" if text else type(exc).__name__}


def encode_exception(exc: BaseException) -> list:
    exc, tb_text = _portable(exc)
    frames, _ = serialize.dumps((exc, tb_text))
    return frames


def _parse_tasks(header: dict, frames: list) -> tuple:
    """``(objects, digests to forget, units)`` of a TASKS message, checked whole.

    Raises KeyError, TypeError or ValueError for a message of the wrong shape
    (a bug in the broker, yet no reason to stop), before anything is kept.
    """
    pos, objects = 0, []
    for digest, n in header.get("ob", ()):
        if type(digest) is not bytes or type(n) is not int or n < 0:
            raise ValueError(f"object entry {[digest, n]!r:.80} is not [digest, frame count]")
        objects.append((digest, frames[pos:pos + n]))
        pos += n
    forget = header.get("fg") or []
    if not isinstance(forget, list) or not all(type(d) is bytes for d in forget):
        raise ValueError(f"'fg' {forget!r:.80} is not a list of digests")
    units = []
    for bid, refs, n, meta in header["u"]:
        if (type(bid) is not int or not isinstance(refs, list)
                or not all(type(r) is bytes for r in refs) or type(n) is not int or n < 0
                or not isinstance(meta, dict)
                or not (refs or isinstance(meta.get("fn"), str))):  # a function, or a task name
            raise ValueError(f"unit entry {[bid, refs, n, meta]!r:.80} is not "
                             "[id, [function digest, ...], frame count, meta]")
        units.append((bid, refs, frames[pos:pos + n], meta))
        pos += n
    if pos != len(frames):
        raise ValueError(f"its entries name {pos} frames, it has {len(frames)}")
    return objects, forget, units


def _unit_ids(header: dict) -> list:
    """The unit ids a TASKS header names, as far as they can be made out."""
    units = header.get("u")
    if not isinstance(units, list):
        return []
    return [u[0] for u in units if isinstance(u, list) and u and type(u[0]) is int]


# ----------------------------------------------------------------- worker
class Worker:
    """A worker process connected to the broker at ``address``."""

    def __init__(self, address: str, key: bytes, slots: int = 1, name: Optional[str] = None,
                 parent_pid: Optional[int] = None, max_result_size: int = MAX_RESULT_SIZE,
                 curve: Optional[dict] = None, queues: Optional[list] = None,
                 resources: Optional[dict] = None, imports: Optional[list] = None,
                 registered_only: bool = False) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        #: named tasks this worker has (its --import modules define them)
        self.task_names = tasks.import_modules(imports or [])
        self.broker_session: Optional[str] = None  # the broker run it registered with
        self.registered_only = registered_only
        store.safe = registered_only
        #: the queues this worker takes tasks from, and the resources it offers
        self.queues = list(queues) if queues else [DEFAULT_QUEUE]
        self.resources = parse_resources(resources or {})
        self.address = address
        self.key = key
        self.slots = slots
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.parent_pid = parent_pid
        self.max_result_size = max_result_size
        self.host = serialize.host_id()
        self.ctx = zmq.Context.instance()
        #: the process's exit status: 1 once the connection failed for good (see fail)
        self.exit_code = 0
        self._failure: Optional[str] = None
        # Named sockets: the control thread's socket tells the broker which
        # worker it speaks for by this identity.
        self.ident = b"w" + secrets.token_bytes(15)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.ident)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # Retry soon: a local cluster starts workers while its broker is still binding.
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.curve = curve
        self.apply_curve(self.sock)
        # Read by the control thread: a broker that refuses this worker's key is
        # said so, and the worker exits, instead of waiting in silence.
        self.watch = HandshakeWatch(self.sock, ConnectionInfo(address, key, curve=curve), "worker")
        self.sock.connect(address)
        self.session = protocol.Session()
        self.guard = protocol.ReplayGuard()
        self.inbox = Backlog()  # for slot threads
        self.outbox: deque = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._woken = False
        self._stopping = False
        self.stdout = OutputRouter(sys.stdout)
        self.stderr = OutputRouter(sys.stderr)
        # One slot runs tasks inline on the socket thread: no thread hand-off on
        # the latency path.  More slots are threads fed through ``inbox``.
        self.inline = slots == 1
        self.pending = Backlog()  # for the inline slot
        # Units received and not started, by id: a cancel removes them here.
        self.waiting: dict[int, tuple] = {}
        # Running units: the thread running each, its output, its deadline.
        self.running_now: dict[int, int] = {}
        self.captures: dict[int, tuple] = {}
        self.deadlines: dict[int, float] = {}
        self.control = Control(self)
        self.threads = [] if self.inline else [
            threading.Thread(target=self._slot, name=f"shoal-slot-{i}", daemon=True)
            for i in range(slots)]

    def _send(self, kind: str, fields: Optional[dict] = None, frames=()) -> None:
        try:
            send_frames(self.sock, protocol.encode(self.key, kind, fields, frames,
                                                   session=self.session), block=False)
        except zmq.Again:
            # SNDHWM is 0: the socket refuses a message only when libzmq has given
            # its connection up for good, and a blocking send would never return.
            # (Why, the control thread reads from the socket monitor: it owns it.)
            self.fail(f"the connection to the broker at {self.address} was closed for good "
                      "(its handshake failed); check that this worker has the broker's "
                      "connection file")

    def run(self) -> None:
        """Serve until the broker says stop, SIGTERM, or the parent process dies."""
        global _current
        _current = self
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.control.install()
        for t in self.threads:
            t.start()
        self._send(Kind.WORKER_HELLO, self.hello_fields())
        self.control.start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stopping:
                if self.inline:
                    # Only the socket to watch: the cheapest wait on the latency path.
                    if self.sock.poll(250):
                        self._receive()
                        self._run_pending()
                else:
                    for sock, _ in poller.poll(250):
                        if sock is self.sock:
                            self._receive()
                        else:
                            self._flush_results()
        finally:
            self._close()

    def apply_curve(self, sock) -> None:
        """Set a socket's Curve keys when the broker is Curve-secured."""
        if self.curve:
            apply_curve(sock, ConnectionInfo(self.address, self.key, curve=self.curve))

    def hello_fields(self) -> dict:
        """What this worker tells the broker when it registers."""
        fields = {"name": self.name, "slots": self.slots, "host": self.host,
                  "pid": os.getpid(), "ctl": self.control.socket_id}
        if self.queues != [DEFAULT_QUEUE]:
            fields["qs"] = self.queues
        if self.resources:
            fields["rs"] = self.resources
        if self.task_names:
            fields["tk"] = self.task_names
        if self.registered_only:
            fields["ro"] = 1
        return fields

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")

    def fail(self, why: str) -> None:
        """The broker cannot be reached, for good: say why, stop, exit with status 1."""
        if why != self._failure:  # the main and control threads may both find out
            self._failure = why
            logger.error("%s", why)
        self.exit_code = 1
        self.stop()

    def _close(self) -> None:
        self.control.stop()
        if self._failure is None:
            try:
                self._send(Kind.WORKER_BYE)
            except zmq.ZMQError:
                pass
        self.control.join(2)
        for _ in self.threads:
            self.inbox.put(None)
        self.watch.close()  # on this thread, which owns the socket; the control thread is done
        self.sock.close(linger=500)
        serialize.segments.unlink_all()
        sys.stdout, sys.stderr = self.stdout.original, self.stderr.original

    def _receive(self) -> None:
        sock = self.sock
        # Check for waiting messages rather than reading until zmq.Again:
        # raising it costs more than the check, twice per task.
        while sock.get(_EVENTS) & _POLLIN:
            frames = recv_frames(sock)
            try:
                msg = protocol.decode(self.key, frames, guard=self.guard)
            except FrameAltered as exc:
                logger.error("a message from the broker was altered in transit: %s", exc)
                if exc.message.kind == Kind.TASKS:
                    self._on_altered_tasks(exc.message)
                continue
            except ProtocolError as exc:
                logger.warning("dropped a message from the broker: %s", exc)
                continue
            if msg.kind == Kind.TASKS:
                self._on_tasks(msg)
            elif msg.kind == Kind.SHUTDOWN:
                logger.info("broker asked this worker to stop")
                self._stopping = True
            elif msg.kind == Kind.WELCOME:
                name = msg.header.get("name")
                self.name = name if isinstance(name, str) else self.name
                session = msg.header.get("session")
                self.broker_session = session if isinstance(session, str) else None
                logger.info("registered with the broker as %s", self.name)
            elif msg.kind == Kind.ERROR:
                logger.error("broker refused a message: %s", msg.header.get("msg"))

    def _on_tasks(self, msg: protocol.Message) -> None:
        try:
            objects, forget, units = _parse_tasks(msg.header, msg.frames)
        except (KeyError, TypeError, ValueError) as exc:
            self._fail_units(msg.header, f"worker {self.name} refused the TASKS message that "
                             f"carried this task, as malformed: {exc!r}. This is a bug in the "
                             "broker (or in a peer holding the cluster key)")
            return
        for digest, frames in objects:
            store.add(digest, frames)
        if forget:
            store.forget(forget)
        put = self.pending.put if self.inline else self.inbox.put
        waiting = self.waiting
        for unit in units:
            waiting[unit[0]] = unit
            put(unit[0], unit[3].get("pr", 0))

    def _on_altered_tasks(self, msg: protocol.Message) -> None:
        """A TASKS message whose signature held but a large frame did not match its digest.

        Nothing of it runs and nothing altered is unpickled; its tasks fail at once, so
        none holds a slot for ever.  Intact objects are kept (the broker counts them sent).
        """
        why = (f"a frame of the message that carried this task to worker {self.name} was "
               "altered in transit (it does not match its signed digest), so nothing of it "
               "was run or unpickled. Check the network path to the broker; a Curve-secured "
               "broker (the default beyond loopback) rules this out. Submit it again")
        try:
            objects, forget, _ = _parse_tasks(msg.header, msg.frames)
        except (KeyError, TypeError, ValueError):
            objects, forget = [], []
        for digest, frames in objects:
            if any(frame is None for frame in frames):
                store.refuse(digest, f"function or scattered data {digest.hex()} reached worker "
                             f"{self.name} altered in transit (it does not match its signed "
                             "digest); tasks that use it fail here")
            else:
                store.add(digest, frames)
        if forget:
            store.forget(forget)
        self._fail_units(msg.header, why)

    def _fail_units(self, header: dict, why: str) -> None:
        """Fail the units a TASKS message names with TransferError(why), at once."""
        bids = _unit_ids(header)
        logger.error("failing %d task(s): %s", len(bids), why)
        frames = encode_exception(TransferError(why))
        for bid in bids:
            self.outbox.append((bid, "err", frames, {}))
        self._flush_results()

    # -- slots
    def _slot(self) -> None:
        while True:
            try:
                bid = self.inbox.get()
                if bid is None:
                    return
                unit = self.waiting.pop(bid, None)
                if unit is None:
                    continue  # cancelled before it started
                self.outbox.append(self._run_unit(unit))
                if not self._woken:
                    self._woken = True
                    os.write(self._wake_w, b"x")
            except Interrupted:
                continue  # an interrupt that missed its unit must not end the slot

    def _run_pending(self) -> None:
        """Run queued units inline, sending results in batches of ~1 ms of work."""
        pending, outbox = self.pending, self.outbox
        flushed = time.perf_counter()
        waiting = self.waiting
        while pending and not self._stopping:
            unit = waiting.pop(pending.pop(), None)
            if unit is not None:  # else cancelled before it started
                outbox.append(self._run_unit(unit))
            if not pending:
                self._receive()  # pick up work that arrived meanwhile
            now = time.perf_counter()
            if now - flushed > 0.001 or not pending:
                self._flush_results()
                flushed = now

    def _flush_results(self) -> None:
        if not self.inline:  # slot threads write a wake-up byte; inline needs none
            # Read the byte before clearing the flag: cleared first, a slot could set
            # it and write between the two, and that byte, read here, would leave the
            # flag set with the pipe empty, so later results would wait for ever.
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            self._woken = False
        entries, frames = [], []
        outbox = self.outbox
        while outbox:
            bid, status, out_frames, meta = outbox.popleft()
            entries.append([bid, status, len(out_frames), meta])
            frames.extend(out_frames)
        if entries:
            self._send(Kind.RESULTS, {"r": entries}, frames)

    def _run_unit(self, unit: tuple) -> tuple:
        try:
            return self._execute(*unit)
        except Interrupted:
            # An interrupt that landed after the task itself had finished.
            return unit[0], "cancelled", [], {}

    def _execute(self, bid: int, refs: list, frames: list, meta: dict) -> tuple:
        reply_shm = "h" in meta and not meta.get("ns")  # "ns": other tasks take the result
        started = time.time()
        thread = threading.get_ident()
        self.captures[bid] = (self.stdout.begin(), self.stderr.begin())
        timeout = meta.get("tmo")
        if timeout:
            self.deadlines[bid] = time.monotonic() + timeout
        self.running_now[bid] = thread
        elapsed = 0.0
        try:
            fn = self._function(refs, meta)
            args = serialize.loads(frames, meta, safe=self.registered_only)
            kind = meta.get("m")
            start = time.perf_counter()
            if kind:
                value = self._run_batch(bid, fn, args, kind == 2, meta)
            else:
                kwargs = {}
                if meta.get("kw"):
                    args, kwargs = args
                value = self._call(bid, fn, args, kwargs, meta)
            elapsed = time.perf_counter() - start
            del args
            try:
                out_frames, shm_meta = self._encode_result(fn, value, reply_shm)
                status = "ok"
            except Exception as exc:
                if kind:  # fall back to failing only the items at fault
                    out_frames, shm_meta = self._encode_result(
                        fn, self._portable_batch(fn, value), reply_shm, check_size=False)
                    status = "ok"
                else:
                    out_frames, shm_meta, status = encode_exception(exc), describe(exc), "err"
        except _RetryLater as later:
            out_frames, shm_meta, status = [], {"dl": later.delay, "att": later.attempt}, "retry"
        except CancelInterrupt:
            out_frames, shm_meta, status = [], {}, "cancelled"
        except TimeoutInterrupt:
            err = TaskTimeout(f"the task ran past its timeout of {timeout:g} s on worker "
                              f"{self.name} and was stopped", timeout)
            out_frames, shm_meta, status = encode_exception(err), describe(err), "err"
        except BaseException as exc:  # the task's own failure, reported, never fatal here
            if elapsed == 0.0 and "start" in locals():
                elapsed = time.perf_counter() - start
            out_frames, shm_meta, status = encode_exception(exc), describe(exc), "err"
        finally:
            # First of all, so a late interrupt no longer targets this unit.
            self.running_now.pop(bid, None)
            self.deadlines.pop(bid, None)
            self.captures.pop(bid, None)
            self.control.consume(thread)
        reply = {"t": elapsed, "s": started}
        if shm_meta:
            reply.update(shm_meta)
        if meta.get("m"):
            reply["n"] = meta.get("n", 1)
            # Its size, so the client sizes later batches by bytes as well as by time.
            reply["rb"] = serialize.payload_size(out_frames, shm_meta)
            if status == "ok" and value[1]:
                reply["f"] = len(value[1])  # items that failed, for progress counts
        out, err = self.stdout.end(), self.stderr.end()
        if out:
            reply["o"] = out
        if err:
            reply["e"] = err
        return bid, status, out_frames, reply

    def _encode_result(self, fn, value, shm: bool, check_size: bool = True) -> tuple:
        """``(frames, meta)`` of a result; raises SerializationError or ResultTooLarge.

        A map batch's limit is per item (see _portable_batch), not on its total.
        """
        try:
            out_frames, shm_meta = serialize.dumps(value, shm=shm, hold=False)
        except Exception as exc:
            raise serialize.SerializationError(
                f"the result of {serialize.fn_name(fn)!r}, of type "
                f"{type(value).__module__}.{type(value).__qualname__}, cannot be pickled: {exc}"
            ) from exc
        size = serialize.payload_size(out_frames, shm_meta)
        if check_size and size > self.max_result_size:
            for name in serialize.segment_names(shm_meta):
                serialize.segments.unlink(name)
            raise ResultTooLarge(
                f"the result of {serialize.fn_name(fn)!r} is {size:,} bytes, over this "
                f"worker's maximum of {self.max_result_size:,}; return a smaller value "
                "(or write it to shared storage and return its path), or start workers "
                "with a larger --max-result-size")
        return out_frames, shm_meta

    def _portable_batch(self, fn, outcome: tuple) -> tuple:
        """A batch's ``(values, errors)`` where a value that will not pickle, or is
        over the size limit, has become that item's error."""
        values, errors = outcome
        for i, value in enumerate(values):
            if i in errors:
                continue
            try:
                item_size = serialize.nbytes(serialize.dumps(value)[0])
            except Exception as exc:
                values[i] = None
                errors[i] = _portable(serialize.SerializationError(
                    f"the result of {serialize.fn_name(fn)!r} for item {i}, of type "
                    f"{type(value).__module__}.{type(value).__qualname__}, cannot be pickled: {exc}"))
                continue
            if item_size > self.max_result_size:
                values[i] = None
                errors[i] = _portable(ResultTooLarge(
                    f"the result of {serialize.fn_name(fn)!r} for item {i} is {item_size:,} bytes, "
                    f"over this worker's maximum of {self.max_result_size:,}"))
        return values, errors

    def _function(self, refs: list, meta: dict):
        """The unit's function: a named task, or the pickled one it refers to."""
        name = meta.get("fn")
        if name is not None:
            return tasks.lookup(name, allow_import=not self.registered_only)
        if self.registered_only:
            raise tasks.RefusedPickle(
                f"worker {self.name} runs registered tasks only (shoal worker "
                "--registered-only) and refuses pickled code; submit a task by name, e.g. "
                "client.submit('pkg.tasks.resize', path), from a module this worker imports "
                f"(--import; it has: {', '.join(sorted(tasks.registry)) or 'none'})")
        return store.get(refs[0])

    def _call(self, bid: int, fn, args, kwargs: dict, meta: dict) -> Any:
        """``fn(*args, **kwargs)`` under the unit's retry policy.

        Without back-off a failed try runs again here at once.  With back-off,
        or when the task raises :class:`shoal.Retry`, _RetryLater hands the
        unit back to the broker, which holds it for the delay while this slot
        serves other work.
        """
        retries = meta.get("rty", 0)
        attempt = meta.get("att", 0)  # tries made before this run
        while True:
            try:
                return fn(*args, **kwargs)
            except Retry as request:
                limit = request.max_retries if request.max_retries is not None else (retries or 3)
                if attempt >= limit:
                    if isinstance(request.__cause__, Exception):
                        raise request.__cause__ from None
                    raise RetriesExhausted(
                        f"{serialize.fn_name(fn)!r} asked to be retried after {attempt} "
                        f"retries, its limit; pass retries=N to submit, or "
                        f"shoal.Retry(max_retries=N), to allow more") from None
                delay = request.delay
                if delay is None:
                    delay = self._backoff(meta, attempt + 1) if "rb" in meta else 0.0
                raise _RetryLater(delay, attempt + 1) from None
            except Exception as exc:
                if attempt >= retries or not _retries_on(exc, meta.get("ron")):
                    raise
                attempt += 1
                if "rb" in meta:
                    raise _RetryLater(self._backoff(meta, attempt), attempt) from None
                logger.info("task %d raised %s; retry %d of %d", bid, type(exc).__name__,
                            attempt, retries)

    @staticmethod
    def _backoff(meta: dict, attempt: int) -> float:
        return backoff_delay(meta["rb"], attempt, meta.get("rbm", RETRY_BACKOFF_MAX),
                             jitter=bool(meta.get("rj", 1)))

    def _run_batch(self, bid: int, fn, items: list, star: bool, meta: dict) -> tuple:
        """Run ``fn`` over a batch: ``(values, {index: (exception, traceback)})``.

        ``rty`` retries an item that raises; ``tmo`` is a deadline per item.
        """
        values: list = []
        errors: dict = {}
        append = values.append
        retries, timeout = meta.get("rty", 0), meta.get("tmo")
        if not retries and not timeout:  # the common case: nothing per item
            for i, item in enumerate(items):
                try:
                    append(fn(*item) if star else fn(item))
                except Exception as exc:
                    append(None)
                    errors[i] = _portable(exc)
            return values, errors
        deadlines = self.deadlines
        for i, item in enumerate(items):
            for attempt in range(retries, -1, -1):
                if timeout:
                    deadlines[bid] = time.monotonic() + timeout
                try:
                    append(fn(*item) if star else fn(item))
                    break
                except TimeoutInterrupt:
                    append(None)
                    errors[i] = _portable(TaskTimeout(
                        f"item {i} ran past its timeout of {timeout:g} s on worker {self.name} "
                        "and was stopped", timeout))
                    break
                except Exception as exc:
                    if not attempt:
                        append(None)
                        errors[i] = _portable(exc)
        deadlines.pop(bid, None)
        return values, errors


class Backlog:
    """Units received and not started: higher priorities first, FIFO within one.

    Units the broker sent ahead (prefetch) wait here; a unit of higher
    priority that arrives later still starts before them.  Priority 0, the
    common case, is a plain deque.
    """

    def __init__(self) -> None:
        self._fifo: deque = deque()      # priority 0
        self._ranked: list = []          # (-priority, arrival, bid), others
        self._arrivals = itertools.count()
        self._ready = threading.Condition(threading.Lock())

    def put(self, bid: Optional[int], priority: int = 0) -> None:
        with self._ready:
            if priority:
                heapq.heappush(self._ranked, (-priority, next(self._arrivals), bid))
            else:
                self._fifo.append(bid)
            self._ready.notify()

    def pop(self) -> Optional[int]:
        """The next unit; IndexError if there is none."""
        ranked = self._ranked
        if ranked and (ranked[0][0] < 0 or not self._fifo):
            return heapq.heappop(ranked)[2]
        return self._fifo.popleft()

    def get(self) -> Optional[int]:
        """The next unit, waiting for one (slot threads)."""
        with self._ready:
            while not (self._fifo or self._ranked):
                self._ready.wait()
            return self.pop()

    def __bool__(self) -> bool:
        return bool(self._fifo) or bool(self._ranked)


class _RetryLater(Exception):
    """Hand a unit back to the broker to run again after ``delay`` seconds."""

    def __init__(self, delay: float, attempt: int) -> None:
        super().__init__(delay)
        self.delay = float(delay)
        self.attempt = attempt


def _retries_on(exc: BaseException, names: Optional[list]) -> bool:
    """Whether ``exc`` is one of the classes ``retry_on`` named (all, if none named)."""
    if not names:
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in names for cls in type(exc).__mro__)


def _portable(exc: BaseException) -> tuple:
    """An exception and its traceback text; RemoteError stands in for one that
    does not survive a pickle round trip (so it cannot spoil a batch's results)."""
    tb_text = _remote_traceback(exc)
    try:
        serialize.loads(serialize.dumps(exc)[0])
    except Exception:
        exc = RemoteError(type(exc).__qualname__, str(exc))
    return exc, tb_text


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal worker", description="Run a shoal worker.")
    parser.add_argument("address", nargs="?", help="broker address, tcp://HOST:PORT")
    parser.add_argument("--connection-file", help="connection file written by the broker")
    parser.add_argument("--key-file", help="file holding the cluster key (with ADDRESS)")
    parser.add_argument("--slots", type=int, default=1, help="tasks run at once (default 1)")
    parser.add_argument("--pool", choices=["thread", "process"], default="thread",
                        help="how slots run: threads of this process (default), or one process "
                             "each (pure-Python tasks in parallel; a crash takes one slot)")
    parser.add_argument("--name", help="worker name shown in status (default HOST-PID)")
    parser.add_argument("--queues", default=DEFAULT_QUEUE,
                        help="comma-separated queues to take tasks from (default: %(default)s); "
                             "list 'default' too to serve tasks submitted without a queue")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import this module (its @shoal.task functions "
                        "can then be sent by name); repeat it or separate modules by commas")
    parser.add_argument("--registered-only", action="store_true",
                        help="run only named tasks of the --import modules, refuse pickled code "
                             "and take only plain data as arguments (for shared workers)")
    parser.add_argument("--resources", default="",
                        help="abstract resources this worker offers, e.g. gpu=1,mem=64; a task "
                             "submitted with resources={'gpu': 1} holds them while it runs")
    parser.add_argument("--max-result-size", type=int, default=MAX_RESULT_SIZE,
                        help="largest result in bytes a task may return (default 1 GiB)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s worker %(levelname)s %(message)s", stream=sys.stderr)
    if args.address and "://" not in args.address:
        args.address = f"tcp://{args.address}"
    if args.slots < 1:
        parser.error(f"--slots must be at least 1, not {args.slots}")
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    try:
        resources = parse_resources(args.resources)
    except ValueError as exc:
        parser.error(f"--resources: {exc}")
    if not queues:
        parser.error("--queues needs at least one queue name")
    imports = [m.strip() for arg in args.imports for m in arg.split(",") if m.strip()]
    if args.registered_only and not imports:
        parser.error("--registered-only runs named tasks only: give the modules that define "
                     "them with --import MODULE")
    curve = None
    try:
        if args.connection_file:
            info = read_connection_file(args.connection_file)
            address, key, curve = args.address or info.local_address(), info.key, info.curve
        elif args.address and (args.key_file or os.environ.get("SHOAL_KEY")):
            address = args.address
            key = (read_key_file(args.key_file) if args.key_file
                   else bytes.fromhex(os.environ["SHOAL_KEY"]))
        elif args.address:
            info = find_local_broker(args.address)  # a broker on this host
            address, key, curve = info.local_address(), info.key, info.curve
        else:
            parser.error("give the broker's ADDRESS, or --connection-file FILE")
    except (LookupError, OSError, ValueError) as exc:  # PermissionError included
        print(f"shoal worker: {exc}", file=sys.stderr)
        return 2
    if "://" not in address:
        address = f"tcp://{address}"
    if args.pool == "process" and args.slots > 1:
        from .pool import run_process_pool
        target = args.connection_file or address
        return run_process_pool(list(sys.argv[1:] if argv is None else argv), args.slots,
                                args.name or f"{socket.gethostname()}-{os.getpid()}",
                                client_args=(target, None if args.connection_file else key))
    try:
        worker = Worker(address, key, slots=args.slots, name=args.name,
                        parent_pid=args.parent_pid, max_result_size=args.max_result_size,
                        curve=curve, queues=queues, resources=resources, imports=imports,
                        registered_only=args.registered_only)
    except ImportError as exc:
        print(f"shoal worker: --import: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    # `kill -USR1 <pid>` writes every thread's stack to the log: what is it doing?
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logger.info("worker %s connecting to %s with %d slot(s)", worker.name, address, args.slots)
    worker.run()
    return worker.exit_code


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: pickles refer to
    # shoal.worker's globals (the object store), which must be the ones in use.
    from shoal import worker as _module
    sys.exit(_module.main())
