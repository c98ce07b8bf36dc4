"""The client: submit, map, gather, scatter, cancel.

One background IO thread owns the ZeroMQ socket (:mod:`shoal.clientio`).
User threads hand it work through a deque and a wake-up pipe; it sends,
receives and resolves futures (:mod:`shoal.outcomes`).  Results are decoded
lazily in the thread that asks for them.
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

from . import protocol, serialize
from .clientio import BROKER_TIMEOUT, ClientIO
from .deps import AlreadyFailed, already_failed
from .direct import DirectLinks
from .errors import BrokerUnreachable, ClientClosed, NoWorkersError
from .executor import Executor
from .futures import Future
from .mapping import MapResult
from .options import task_options
from .outcomes import cf_cancel
from .protocol import Kind
from .records import task_key
from .refs import Ref, collect_refs, collected_deps
from .security import CURVE_ADVICE, resolve_connection, runtime_dir
from .tasks import encode_function
from .taskqueue import TaskQueueAPI

logger = logging.getLogger(__name__)

#: A task whose payload exceeds this logs a warning suggesting ``client.scatter``.
LARGE_PAYLOAD = 1 << 20


# ----------------------------------------------------------------- client
class Client(ClientIO, TaskQueueAPI):
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
        #: function digest (or task name) -> what its last map measured (shoal.mapping)
        self._map_measures: dict = {}
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
        # Its own context, ended on close, so a closed client leaves no libzmq
        # threads behind (a process without threads can fork its next cluster).
        self._ctx = zmq.Context()
        #: local workers a lone task may be handed to straight (shoal.direct)
        self._direct = DirectLinks(self._host, self.cid)
        #: (worker name, id base) -> what the broker is yet to be told of the direct tasks
        #: handed to that worker (see ClientIO._noted_group)
        self._noted: dict = {}
        self._noted_due = 0.0
        #: direct task id -> its (worker name, id base), until the broker has its outcome
        self._direct_open: dict = {}
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
        if not kwargs and serialize.plain(args):
            # Numbers, strings, bytes, None: no ref or future can hide in them.
            (frames, meta), refs = serialize.dumps_plain(args), []
        else:
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
        if not self._thread.is_alive():  # its sockets are closed: this returns at once
            self._ctx.term()             # (or once their last messages left, 0.5 s at most)
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
    def _release(self, tid: int) -> None:
        self._pending.pop(tid, None)
        for name in self._segments.pop(tid, ()):
            serialize.segments.unlink(name)

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
