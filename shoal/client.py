"""The client: submit, map, gather, scatter, cancel.

One background IO thread owns the ZeroMQ socket.  User threads hand it work
through a deque and a wake-up pipe; it sends, receives and resolves futures.
Results are decoded lazily in the thread that asks for them.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Callable, Iterable, Optional

import zmq
from zmq.backend import zmq_poll

from . import protocol, serialize
from .deps import AlreadyFailed, already_failed
from .errors import (BrokerError, BrokerLost, BrokerUnreachable, ClientClosed, DependencyFailed,
                     NoWorkersError, RemoteError, TaskNotUnique, TransferError, WorkerLost)
from .executor import Executor
from .futures import Encoded, Future, attach_traceback, cancel_and_notify
from .mapping import MapResult, _Batch
from .options import task_options
from .protocol import FrameAltered, Kind, ProtocolError
from .records import parse_task_id, task_key
from .refs import Ref, collect_refs, collected_deps
from .security import CURVE_ADVICE, HandshakeWatch, apply_curve, resolve_connection, runtime_dir
from .tasks import encode_function
from .taskqueue import TaskQueueAPI
from .transport import recv_frames, send_frames

logger = logging.getLogger(__name__)

_SESSION_BOUND = frozenset({Kind.SUBMIT, Kind.SCATTER, Kind.CANCEL, Kind.ATTACH, Kind.WORKER_LOST,
                            Kind.LOCK, Kind.SCHEDULE, Kind.FETCH})
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

#: A task whose payload exceeds this logs a warning suggesting ``client.scatter``.
LARGE_PAYLOAD = 1 << 20
#: A client heartbeats this often; it declares the broker lost when it has
#: tasks in flight and heard nothing for ``broker_timeout`` (default 10 s).
HEARTBEAT_SECONDS = 1.0
BROKER_TIMEOUT = 10.0


# ----------------------------------------------------------------- client
class Client(TaskQueueAPI):
    """A connection to a shoal broker.

    >>> client = shoal.Client("tcp://10.0.0.5:5555", key_file="cluster.json")
    >>> client = shoal.Client("cluster.json")     # a connection file
    >>> client.submit(pow, 2, 10).result()
    1024

    ``timeout`` bounds the wait for the broker to answer; ``worker_timeout``
    bounds how long tasks wait for a first worker before failing with
    :class:`~shoal.NoWorkersError`.
    """

    def __init__(self, address: Any = None, key: Optional[bytes] = None,
                 key_file: Optional[str] = None, timeout: float = 10.0,
                 worker_timeout: float = 30.0, broker_timeout: float = BROKER_TIMEOUT) -> None:
        try:
            self.info = resolve_connection(address, key, key_file)
        except LookupError as exc:
            raise BrokerUnreachable(str(exc)) from None
        self.address = self.info.address
        self.worker_timeout = worker_timeout
        self.broker_timeout = broker_timeout
        self._session: Optional[str] = None   # the broker run we talk to
        self._out = protocol.Session()
        self._guard = protocol.ReplayGuard()
        self._last_heard = time.monotonic()
        self._next_beat = 0.0
        self._key = self.info.key
        self._host = serialize.host_id()
        self._shm_here = serialize.shm_available()
        self._tids = itertools.count(1)
        #: this client's id: with a task's number it names the task anywhere (Future.task_id)
        self.cid = os.urandom(8)
        #: a broker with --store: its store's id, and the submits it has not yet stored
        self._store: Optional[str] = None
        self._unacked: dict[int, tuple] = {}
        self._events = None  # the EventStream this client feeds (shoal events, shoal top)
        self._asked: dict[int, tuple] = {}  # session-bound requests not yet answered
        self._fn_names: dict[bytes, str] = {}  # function digest -> its name
        self._pending: dict[int, Any] = {}      # task id -> Future or map batch
        self._segments: dict[int, list] = {}    # task id -> shared-memory segments it sent
        # Everything bound for the broker goes through one ordered outbox,
        # drained by whichever thread holds the socket: tasks submitted in a
        # burst leave in one message, and order (scatter before the task that
        # uses it, submit before cancel) is kept.
        self._commands: deque = deque()
        self._sent_objects: set[bytes] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._woken = False
        self._closed = False
        #: why the connection to the broker is gone for good (a refused key), once it is
        self._broken: Optional[str] = None
        # Leader/follower on the socket: a thread blocked in Future.result()
        # borrows it from the IO thread, sends what is queued and receives its
        # own result, saving two thread hand-offs (~150 us) per round trip.
        self._sock_lock = threading.Lock()
        self._lead_lock = threading.Lock()
        self._leader_wanted = False
        self._io_parked = False
        self._park = threading.Condition(threading.Lock())
        self._warned_large: set[bytes] = set()
        self._welcome = threading.Event()
        self._status_waiters: deque = deque()
        self._replies: dict[int, Future] = {}   # request id -> waiter (cancel requests)
        # Futures that pending tasks take as arguments, by key: the broker may ask
        # for one's value (NEED), and DependencyFailed names its exception.
        self._dependencies: dict[bytes, list] = {}  # key -> [future, tasks taking it]
        self.workers = 0
        self.slots = 0
        self.hosts: list = []
        self._no_workers_since: Optional[float] = None
        self._ctx = zmq.Context.instance()
        self._thread = threading.Thread(target=self._io_loop, name="shoal-client-io", daemon=True)
        self._thread.start()
        self._post((Kind.CLIENT_HELLO,))
        if not self._welcome.wait(timeout) or self._broken:
            self.close()
            if self._broken:
                raise BrokerUnreachable(self._broken)
            watch = getattr(self, "_watch", None)
            if watch is not None and watch.last_failure:
                raise BrokerUnreachable(
                    f"no shoal broker answered at {self.address} within {timeout:g} s: "
                    f"{watch.last_failure}, every time. {CURVE_ADVICE}.")
            raise BrokerUnreachable(
                f"no shoal broker answered at {self.address} within {timeout:g} s. Check that "
                "`shoal broker` (or a Cluster) is running, that the address matches, and that the "
                "key is the broker's: messages signed with another key are dropped "
                f"(the broker logs them). Connection files are in {runtime_dir()}.")
        _set_current(self)

    # ------------------------------------------------------------ public API
    def submit(self, fn: Callable, /, *args: Any, retries: int = 0,
               timeout: Optional[float] = None, retry_backoff: Optional[float] = None,
               retry_backoff_max: Optional[float] = None, retry_jitter: bool = True,
               retry_on: Any = None, queue: Optional[str] = None, priority: int = 0,
               resources: Any = None, delay: Optional[float] = None, at: Any = None,
               unique: Optional[str] = None, rate_limit: Optional[str] = None,
               **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; return a :class:`shoal.Future`.

        >>> client.submit(resize, "a.png", queue="io", priority=10, retries=3,
        ...               retry_backoff=1, retry_on=(IOError,))

        - ``retries``: run it again that many times when it raises;
          ``retry_backoff=S`` waits S, 2S, 4S... seconds between tries (with
          jitter, at most ``retry_backoff_max``, default 600 s), while the worker
          serves other tasks; ``retry_on=(IOError,)`` retries only those errors.
          A task may also ask for its own retry: ``raise shoal.Retry(delay=5)``.
        - ``timeout``: stop it after that many seconds with
          :class:`~shoal.TaskTimeout` (its worker goes on serving).
        - ``queue``, ``resources``, ``priority``: run it on a worker serving that
          queue (``shoal worker --queues gpu``) with those resources free
          (``--resources gpu=1``), higher priorities first.
        - ``delay`` (seconds) or ``at`` (a datetime; naive ones are local time):
          the broker holds the task until then.
        - ``unique="key"``: refused while another task with that key is queued
          or running (the error names it).
        - ``rate_limit="10/m"``: at most that often per task name, cluster-wide.

        A future passed as an argument, also inside lists, tuples and dicts,
        makes this task wait for it and receive its result (see :func:`shoal.chain`).
        These option names are shoal's: to pass an argument of the same name to
        ``fn`` itself, bind it with ``functools.partial``.

        Raises :class:`~shoal.SerializationError` at once, naming the argument
        or captured variable, if something cannot be pickled.
        """
        options = task_options(retries, timeout, retry_backoff=retry_backoff,
                               retry_backoff_max=retry_backoff_max, retry_jitter=retry_jitter,
                               retry_on=retry_on, queue=queue, priority=priority,
                               resources=resources, delay=delay, at=at, unique=unique,
                               rate_limit=rate_limit)
        return self._submit(fn, args, kwargs, None, options)

    def apply(self, fn: Callable, args: tuple = (), kwargs: Optional[dict] = None,
              **options: Any) -> Future:
        """:meth:`submit` with the call and the task options apart (as Celery's
        ``apply_async``), so ``fn`` may take keywords named like the options.

        >>> client.apply(plot, (data,), {"priority": "high"}, priority=10, queue="io")
        """
        return self._submit(fn, tuple(args), dict(kwargs or {}), None, task_options(**options))

    def submit_to(self, worker: str, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        """Like :meth:`submit`, on the worker named ``worker`` (see :meth:`worker_names`).

        The future fails with :class:`~shoal.BrokerError` if no worker has that name.
        """
        return self._submit(fn, args, kwargs, str(worker))

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> dict:
        """Run ``fn(*args, **kwargs)`` once on every worker: ``{worker name: Future}``."""
        return {name: self._submit(fn, args, kwargs, name) for name in self.worker_names()}

    def worker_names(self, timeout: float = 10.0) -> list:
        """Names of the workers registered now."""
        return [w["name"] for w in self.status(timeout)["worker_list"]]

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, worker: Optional[str],
                options: Optional[dict] = None) -> Future:
        self._check_open()
        tid = next(self._tids)
        future = Future(tid, self)
        future._task_key = task_key(self.cid, tid)
        try:
            fn_payload, fn_digest, name, frames, meta, refs = self._prepare(
                fn, args, kwargs, options, shm=self._shm_ok)
        except AlreadyFailed as failed:
            future.set_exception(already_failed(future.task_id, failed))
            return future
        if "dp" in meta:
            future.add_done_callback(lambda _f, deps=meta["dp"]: self._release_dependencies(deps))
        if worker is not None:
            meta["to"] = worker
        if "sb" in meta:
            meta["h"] = self._host
            self._segments[tid] = serialize.segment_names(meta)
        self._warn_if_large(fn, fn_digest or name, frames, meta)
        self._pending[tid] = future
        self._post((Kind.SUBMIT, tid, fn_digest, fn_payload, refs, frames, meta))
        return future

    def _prepare(self, fn: Any, args: tuple, kwargs: dict, options: Optional[dict],
                 shm: bool = False, dependencies: bool = True) -> tuple:
        """A call as it travels: ``(fn payload, fn digest, task name, frames, meta, refs)``.

        Raises SerializationError naming what does not pickle, and AlreadyFailed
        when it takes a future that failed.
        """
        fn_payload, fn_digest, name = encode_function(fn)
        if fn_digest is not None and fn_digest not in self._fn_names:
            self._fn_names[fn_digest] = serialize.task_name(fn)  # for the broker's events
        try:
            (frames, meta), refs = collect_refs(
                lambda: serialize.dumps_call(fn, args, kwargs, shm=shm),
                client=self if dependencies else None)
        finally:
            deps = collected_deps()
        if deps:
            meta["dp"] = deps
        if kwargs:
            meta["kw"] = 1
        if name is not None:
            meta["fn"] = name
        if options:
            meta.update(options)
            if "rl" in options:  # the limit is per task name
                meta["nm"] = name or serialize.task_name(fn)
        return fn_payload, fn_digest, name, frames, meta, refs

    def map(self, fn: Callable, *iterables: Iterable, batch_size: Optional[int] = None,
            timeout: Optional[float] = None, progress: Optional[bool] = None,
            key: Optional[str] = None, retries: int = 0,
            task_timeout: Optional[float] = None,
            keep_inputs: Optional[bool] = None, queue: Optional[str] = None,
            priority: int = 0, resources: Any = None) -> "MapResult":
        """Apply ``fn`` to every item (several iterables are zipped, like ``map``).

        Items go in batches sized from measured task time unless ``batch_size``
        is given.  Any iterable works, generators included; it is consumed as
        workers free up.  Iterate the result for values in input order.

        - ``timeout``: seconds for the whole iteration (as ``Executor.map``).
        - ``task_timeout``: seconds per item; an item past it fails with
          :class:`~shoal.TaskTimeout`, and the worker goes on with the next.
        - ``retries``: run an item again this many times when it raises.
        - ``key``: name the fan-out; the broker keeps its results, so after a
          kernel restart the same call returns finished items at once and runs
          only the rest (see :meth:`results`).
        - ``queue``, ``priority``, ``resources``: as for :meth:`submit`, per batch.
        - ``progress=False`` turns off the live display a notebook shows.
        - ``keep_inputs``: keep each item for :meth:`MapResult.to_frame`; the
          default keeps them for lists and ranges, not for generators, whose
          results stream (and are released as you iterate) to bound memory.
        """
        self._check_open()
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a string, not {type(key).__name__}")
        result = MapResult(self, fn, iterables, batch_size, timeout, key=key,
                           options=task_options(retries, task_timeout, queue=queue,
                                                priority=priority, resources=resources),
                           keep_inputs=keep_inputs)
        result.progress = progress
        return result

    def sweep(self, fn: Callable, progress: Optional[bool] = None, **grids: Iterable):
        """Run ``fn(**point)`` over the cartesian product of keyword ``grids``.

        >>> df = client.sweep(simulate, alpha=[0.1, 0.5], seed=range(100))

        Returns a pandas DataFrame, one row per point (see :meth:`MapResult.to_frame`).
        """
        from .frames import sweep
        return sweep(self, fn, progress=progress, **grids)

    def gather(self, futures: Iterable[Any], timeout: Optional[float] = None) -> list:
        """Results of ``futures`` (a list, or a MapResult) in order; raises the first error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if isinstance(futures, MapResult):
            return futures.result(timeout)
        futures = list(futures)
        out = []
        try:
            for f in futures:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                out.append(f.result(remaining) if hasattr(f, "result") else f)
        except KeyboardInterrupt:
            # Ctrl-C (a kernel interrupt): stop what this call was waiting for.
            self.cancel([f for f in futures if isinstance(f, Future)], timeout=2.0)
            raise
        return out

    def scatter(self, obj: Any) -> Ref:
        """Send ``obj`` to the workers once; return a :class:`Ref` to pass to tasks."""
        self._check_open()
        try:
            frames, _ = serialize.dumps(obj)
        except Exception as exc:
            raise serialize.SerializationError(
                f"cannot scatter object of type {type(obj).__qualname__}: {exc}") from exc
        digest = serialize.digest(frames[0] + b"".join(bytes(memoryview(f)[:64]) for f in frames[1:])
                                  + str([memoryview(f).nbytes for f in frames]).encode())
        ref = Ref(digest, serialize.nbytes(frames), type(obj).__qualname__)
        self._post((Kind.SCATTER, digest, frames))
        return ref

    def executor(self) -> "Executor":
        """A :class:`concurrent.futures.Executor` running on this cluster."""
        return Executor(self)

    def status(self, timeout: float = 10.0) -> dict:
        """The broker's view: workers, slots, queued/running/done counts."""
        self._check_open()
        waiter = Future("status")
        self._status_waiters.append(waiter)
        self._post((Kind.STATUS,))
        return waiter.result(timeout)

    def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> None:
        """Block until at least ``n`` workers are registered."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.status(timeout=max(0.1, deadline - time.monotonic()))
            if state["workers"] >= n:
                return
            if time.monotonic() >= deadline:
                raise NoWorkersError(f"{state['workers']} of {n} workers registered with "
                                     f"{self.address} after {timeout:g} s")
            time.sleep(0.02)  # polling the broker with a deadline, not synchronising

    def cancel(self, futures: Iterable[Future], running: bool = True,
               timeout: float = 10.0) -> int:
        """Cancel several futures with one request; return how many were cancelled.

        A task still queued (at the broker, or prefetched by a worker) is
        withdrawn.  A running task is interrupted (an exception is raised inside
        it; its worker goes on serving) unless ``running=False``, which leaves
        running tasks alone as ``concurrent.futures`` executors do.
        """
        futures = [f for f in futures if not f.done()]
        by_key = {f.key: f for f in futures}
        withdrawn = self._cancel_keys(list(by_key), timeout, running)
        n = 0
        for key in withdrawn:
            future = by_key.get(key)
            if future is not None and cf_cancel(future):
                n += 1
        return n

    def close(self) -> None:
        """Disconnect; pending futures fail with :class:`~shoal.ClientClosed`.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._post(("close",))
        if self._events is not None:  # a watcher of this client's events stops
            self._events.fail(ClientClosed("the client was closed"))
            self._events = None
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for tid in list(self._pending):
            self._fail(tid, ClientClosed("the client was closed before the task finished"))
        for names in self._segments.values():
            for name in names:
                serialize.segments.unlink(name)
        self._segments.clear()
        _set_current(None)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.workers} workers, {self.slots} slots"
        return f"<shoal.Client {self.address} {state}>"

    # ------------------------------------------------------------ internals
    @property
    def _shm_ok(self) -> bool:
        return self._shm_here and self._host in self.hosts

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this client is closed; create a new one")
        if self._broken:
            raise BrokerUnreachable(self._broken)

    def _warn_if_large(self, fn, digest: bytes, frames: list, meta: dict) -> None:
        size = serialize.payload_size(frames, meta)
        if size > LARGE_PAYLOAD and digest not in self._warned_large:
            self._warned_large.add(digest)
            logger.warning(
                "a task of %s carries %.1f MiB of arguments; if tasks share this data, send it "
                "once with ref = client.scatter(obj) and pass ref instead",
                serialize.fn_name(fn), size / 2**20)

    def _post(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
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

    def _park_io(self) -> None:
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

    def _lead(self, future: Future, timeout: Optional[float]) -> None:
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
                items = [(sock, _POLLIN), (self._wake_r, _POLLIN)]
                if not self._flush(sock, leader=True):
                    return
                while not future.done() and not self._closed:
                    wait = 100 if deadline is None else min(100, int((deadline - time.monotonic()) * 1000))
                    if wait < 0:
                        return
                    if zmq_poll(items, wait):
                        self._receive(sock)
                        if self._woken and not self._flush(sock, leader=True):
                            return
                    else:
                        self._housekeeping(sock)  # the parked IO thread cannot
            finally:
                self._sock_lock.release()
        finally:
            self._leader_wanted = False
            self._lead_lock.release()

    def _report_lost(self, name: str, why: str) -> None:
        """Tell the broker a worker process ended (a local cluster saw it exit)."""
        if not self._closed:
            self._post((Kind.WORKER_LOST, name, why))

    def _cancel_keys(self, keys: list, timeout: float = 10.0, running: bool = True) -> set:
        """Ask the broker to withdraw (and, if ``running``, interrupt) tasks.

        Returns the keys it withdrew or interrupted.
        """
        if not keys or self._closed:
            return set()
        if threading.current_thread() is self._thread:
            # A done-callback on the IO thread cannot wait for the answer.
            self._post((Kind.CANCEL, keys, None, running, None))
            return set()
        try:
            withdrawn = set(self._request((Kind.CANCEL, keys, None, running), timeout))
        except FuturesTimeout:
            return set()
        for key in withdrawn:
            self._release(key)
        return withdrawn

    def _fail(self, tid: int, exc: BaseException) -> None:
        target = self._pending.pop(tid, None)
        if target is not None and not target.done():
            target.set_exception(exc)

    # ------------------------------------------------------------ IO thread
    def _io_loop(self) -> None:
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
            while not self._broken:
                with lock:
                    # Commands queued while this thread was parked wrote no
                    # wake-up byte: don't wait on the poll before sending them.
                    for s, _ in poller.poll(0 if self._commands else 250):
                        if s is sock:
                            self._receive(sock)
                        elif s is watch.monitor:
                            why = watch.check()
                            if why is not None:
                                self._give_up(why)
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
            sock.close(linger=500)

    def _send(self, sock, kind: str, fields: Optional[dict] = None, frames=()) -> None:
        if kind in _SESSION_BOUND:
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

    def _give_up(self, why: str) -> None:
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

    def _flush(self, sock, leader: bool = False) -> bool:
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
                if self._store is not None:
                    self._unacked[tid] = cmd  # sent again if the broker restarts before storing it
                if fn_digest is None:  # a task sent by name
                    entries.append([tid, refs, len(parts), meta])
                else:
                    if fn_digest not in self._sent_objects:
                        self._sent_objects.add(fn_digest)
                        objects.append([fn_digest, 1, self._fn_names.get(fn_digest, "")])
                        frames.append(fn_payload)
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
                if ask_kind in _SESSION_BOUND and rq is not None:
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
        return True

    def _send_submit(self, sock, entries: list, objects: list, frames: list) -> None:
        fields = {"u": entries, "cid": self.cid}
        if objects:
            fields["ob"] = objects
        self._send(sock, Kind.SUBMIT, fields, frames)

    def _receive(self, sock) -> None:
        # Ask the socket whether more is waiting instead of reading until
        # zmq.Again: raising that costs more than the check.
        while sock.get(_EVENTS) & _POLLIN:
            frames = recv_frames(sock)
            self._last_heard = time.monotonic()
            try:
                msg = protocol.decode(self._key, frames, guard=self._guard)
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
                if "workers" in msg.header:
                    self.workers = msg.header["workers"]  # notice the last worker leaving
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

    def _learn(self, header: dict) -> None:
        self.workers = header.get("workers", 0)
        self.slots = header.get("slots", 0)
        self.hosts = header.get("hosts", [])
        if self.workers:
            self._no_workers_since = None

    def _housekeeping(self, sock) -> None:
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

    def _check_session(self, session: Optional[str], store: Optional[str] = None) -> None:
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

    def _lose_broker(self, why: str) -> None:
        """The broker died or restarted: what it held is gone; fail it, never hang."""
        self._sent_objects.clear()  # a new broker holds none of them
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

    def _check_workers(self, sock) -> None:
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

    def _release(self, tid: int) -> None:
        self._pending.pop(tid, None)
        for name in self._segments.pop(tid, ()):
            serialize.segments.unlink(name)

    def _on_results(self, msg: protocol.Message) -> None:
        frames = msg.frames
        pos = 0
        for tid, status, n, meta in msg.header["r"]:
            part = frames[pos:pos + n]
            pos += n
            target = self._pending.pop(tid, None)
            if self._asked or self._unacked:  # (a fetch by id; a durable broker's task)
                self._asked.pop(tid, None)
                self._unacked.pop(tid, None)
            # Our argument segments: unlinked now, but their mappings are kept
            # alive by the decoder because a result may be a view of them.
            held = [serialize.segments.release(name) for name in self._segments.pop(tid, ())]
            if target is not None:
                settle(target, status, part, meta, held)

    def _on_altered_results(self, msg: protocol.Message) -> None:
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

    # ------------------------------------------------------------ keyed maps
    def results(self, key: str, timeout: float = 30.0) -> MapResult:
        """Re-attach to the keyed map ``key`` without resubmitting anything.

        >>> res = client.map(simulate, params, key="sweep-1")   # before a kernel restart
        >>> res = client.results("sweep-1")                      # after it

        The result holds every part the broker kept or still runs, in input
        order; parts never submitted (the old client died while feeding) are
        absent: run the same ``map(..., key=...)`` to fill them in.
        """
        self._check_open()
        return MapResult(self, None, (), None, None, key=key)

    def forget(self, key: str, timeout: float = 30.0) -> None:
        """Drop the results the broker keeps for the keyed map ``key``."""
        self._request((Kind.ATTACH, key, True), timeout)

    def _attach(self, key: str, adopt: Callable[[list], None],
                timeout: float = 30.0) -> tuple:
        """``(done, running)`` parts of keyed map ``key`` (see Broker._on_attach).

        ``adopt(running)`` runs on the thread that receives the answer, before it
        handles the next message: the broker routes results of the running parts
        here from then on, and one arriving before its part is registered in
        ``_pending`` would be dropped.
        """
        header, frames = self._request((Kind.ATTACH, key, False), timeout,
                                       lambda reply: adopt(reply[0]["running"]))
        done, pos = [], 0
        for start, count, status, n, meta in header["done"]:
            done.append((start, count, status, frames[pos:pos + n], meta))
            pos += n
        return done, header["running"]

    def _request(self, command: tuple, timeout: float,
                 on_reply: Optional[Callable[[Any], None]] = None):
        """Send a request that the broker answers by id; return its answer.

        ``on_reply(answer)`` runs first, on the thread that receives it.
        """
        request = next(self._tids)
        reply = self._replies[request] = Future(("request", request))
        if on_reply is not None:
            reply.add_done_callback(lambda done: done.exception() or on_reply(done.result()))
        self._post(command + (request,))
        try:
            return reply.result(timeout)
        finally:
            self._replies.pop(request, None)


def settle(target: Future, status: str, frames: list, meta: dict, held: Iterable = ()) -> None:
    """Resolve a task's future from its outcome on the wire."""
    target.worker = meta.get("w")
    target.started = meta.get("s")
    target.duration = meta.get("t")
    if "o" in meta or "e" in meta:
        target._final_output(meta.get("o", ""), meta.get("e", ""))
    if isinstance(target, _Batch):
        target.failed = meta.get("f", 0)
        target.map.observe(meta)
    if target.done():  # cancelled meanwhile
        return
    if status == "ok":
        held = list(held)
        for name in serialize.segment_names(meta):
            if name not in serialize.segments.created:
                # The worker's segment: map it now and unlink its name, so it is
                # freed with the result even if the result is never read.
                held.append(serialize.segments.open(name))
                serialize.segments.unlink(name)
        target.set_result(Encoded(_decoder(frames, meta, held)))
    elif status == "cancelled":
        cf_cancel(target)
    elif status == "lost":
        if isinstance(target, _Batch) and target.map.split(target):
            return  # its items rerun one by one; only one that kills again fails
        target.set_exception(WorkerLost(target.key, meta.get("lost", [])))
    elif status == "dep":
        target.set_exception(_dependency_failed(target, meta))
    elif status == "berr":
        text = str(meta.get("msg", "the broker refused the task"))
        target.set_exception(TaskNotUnique(text, meta["uq"], meta.get("holder")) if "uq" in meta
                             else BrokerError(text))
    else:
        target.set_exception(decode_exception(frames, meta.get("w", "")))


def _dependency_failed(target: Future, meta: dict) -> DependencyFailed:
    """DependencyFailed for ``target``, caused by the dependency's own error when known."""
    dependency = str(meta.get("dep", "?"))
    error = DependencyFailed(target.task_id, dependency, str(meta.get("why", "failed")),
                             meta.get("root"), meta.get("rwhy"))
    client = target._client
    if client is not None:
        try:
            key = parse_task_id(str(meta.get("root", dependency)))
        except ValueError:
            key = None
        entry = client._dependencies.get(key) if key else None
        if entry is not None and entry[0].done() and not entry[0].cancelled():
            cause = entry[0].exception()
            error.__cause__ = cause.__cause__ if isinstance(cause, DependencyFailed) else cause
    return error


def cf_cancel(future) -> bool:
    """Mark a future cancelled locally, without asking the broker."""
    return cancel_and_notify(future)


def _decoder(frames: list, meta: dict, held: list) -> Callable[[], Any]:
    def decode():
        try:
            return serialize.loads(frames, meta)
        finally:
            held.clear()  # the mappings now live as long as the result does
    return decode


def decode_exception(frames: list, worker: str) -> BaseException:
    """The exception a worker sent, with its remote traceback as ``__cause__``."""
    try:
        exc, tb_text = serialize.loads(frames)
    except Exception as err:
        return RemoteError("UndecodableError", f"the task failed on {worker} and its exception "
                           f"could not be unpickled here: {err}")
    return attach_traceback(exc, tb_text, worker)


# ----------------------------------------------------------------- current client
_clients: list = []  # weak references, oldest first


def _set_current(client: Optional[Client]) -> None:
    """Make ``client`` the newest; ``None`` just forgets closed and collected ones."""
    _clients[:] = [r for r in _clients if r() is not None and not r()._closed]
    if client is not None:
        _clients.append(weakref.ref(client))


def _current() -> Optional[Client]:
    for ref in reversed(_clients):
        client = ref()
        if client is not None and not client._closed:
            return client
    return None


def get_client() -> Client:
    """The most recently created client that is still open; raise if there is none."""
    client = _current()
    if client is None:
        raise ValueError("no shoal client: create one with shoal.Client(...) or shoal.Cluster().client()")
    return client
