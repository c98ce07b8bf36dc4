"""Futures: ``shoal.Future`` extends :class:`concurrent.futures.Future`.

A shoal future is a stdlib future, so ``concurrent.futures.wait`` and
``as_completed`` accept it, and it is awaitable in asyncio.  Results are
decoded lazily, in the thread that first asks for them, which keeps the
client's IO thread free to move bytes.
"""
from __future__ import annotations

import _thread
import asyncio
import concurrent.futures as cf
import linecache
import re
import time
from collections import deque
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION  # noqa: F401
from typing import Any, Callable, Iterable, Iterator, Optional

__all__ = ["Future", "as_completed", "wait", "RemoteTraceback",
           "FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"]


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised on a worker.

    Set as ``__cause__`` of the re-raised exception, so Python prints the
    remote lines above the local ones.
    """

    def __init__(self, tb: str, worker: str = "") -> None:
        super().__init__(tb)
        self.tb = tb
        self.worker = worker

    def __str__(self) -> str:
        where = f" (on worker {self.worker})" if self.worker else ""
        return f"\n\nRemote traceback{where}:\n\"\"\"\n{self.tb.rstrip()}\n\"\"\""


class Encoded:
    """A result still in its wire form; decoded on first access."""

    __slots__ = ("decode",)

    def __init__(self, decode: Callable[[], Any]) -> None:
        self.decode = decode


class _Condition:
    """The part of :class:`threading.Condition` that futures and the stdlib's
    ``wait``/``as_completed`` use, made light: a client makes a future per task,
    and ``threading.Condition`` keeps eight objects alive for the garbage
    collector to scan again and again (its bound methods, a queue of waiters);
    this keeps one, and makes the queue only when a thread waits.  Re-entrant,
    as ``threading.Condition()`` is.
    """

    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = _thread.RLock()
        self._waiters: Optional[deque] = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if not self._lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append(waiter)
        saved = self._lock._release_save()
        woken = False
        try:
            if timeout is None:
                woken = waiter.acquire()
            elif timeout > 0:
                woken = waiter.acquire(True, timeout)
            else:
                woken = waiter.acquire(False)
            return woken
        finally:
            self._lock._acquire_restore(saved)
            if not woken:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def notify(self, n: int = 1) -> None:
        if not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        while waiters and n > 0:
            waiter = waiters[0]
            try:
                waiter.release()
            except RuntimeError:  # it timed out meanwhile
                pass
            else:
                n -= 1
            try:
                waiters.remove(waiter)
            except ValueError:
                pass

    def notify_all(self) -> None:
        if self._waiters:
            self.notify(len(self._waiters))
        elif not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")


#: What ``concurrent.futures.Future.__init__`` sets, on this Python: shoal's
#: futures set the same themselves (with a light condition), or, should a
#: later Python set more, call it and swap the condition in.
_BASE = cf.Future()
_BASE_STATE = frozenset(vars(_BASE))
_PENDING = _BASE._state
_LEAN_INIT = _BASE_STATE == {"_condition", "_state", "_result", "_exception", "_waiters",
                             "_done_callbacks"}


class Future(cf.Future):
    """The eventual result of a task run on a shoal worker.

    A :class:`concurrent.futures.Future` (so the stdlib's ``wait`` and
    ``as_completed`` work) that is also awaitable::

        fut = client.submit(pow, 2, 10)
        fut.result(timeout=10)      # -> 1024
        await fut                   # in asyncio

    ``cancel()`` withdraws a queued task and interrupts a running one.
    ``stdout``, ``stderr`` and ``worker`` tell what the task printed (so far,
    while it runs) and where it ran.
    """

    def __init__(self, key: Any = None, client: Any = None) -> None:
        if _LEAN_INIT:
            self._condition = _Condition()
            self._state = _PENDING
            self._result = None
            self._exception = None
            self._waiters: list = []
            self._done_callbacks: list = []
        else:
            super().__init__()
            self._condition = _Condition()
        self.key = key
        self.worker: Optional[str] = None
        #: wall-clock time the task started on its worker, and the seconds it ran
        self.started: Optional[float] = None
        self.duration: Optional[float] = None
        self.stdout: str = ""
        self.stderr: str = ""
        self._client = client
        self._output_callbacks: Any = ()  # a list once one is added
        #: how the broker names the task (see shoal.records.task_key); for a map
        #: item, its batch's key and ``_item`` its place in the batch
        self._task_key: Optional[bytes] = None
        self._item: Optional[int] = None
        self._batch: Optional["Future"] = None
        #: True once a broker with ``--store`` has stored the task (it survives a restart)
        self.acknowledged = False

    @property
    def task_id(self) -> Optional[str]:
        """The task's id: any client can fetch its result with ``client.result(task_id)``.

        None for a map's items (a keyed map is fetched with ``client.results(key)``).
        """
        if self._task_key is None or self._item is not None:
            return None
        from .records import task_id
        return task_id(self._task_key)

    @property
    def status(self) -> str:
        """``"queued"``, ``"waiting"`` (for the futures it takes), ``"scheduled"``,
        ``"running"``, ``"retrying"``, ``"done"``, ``"failed"`` or ``"cancelled"``.

        A pending task's state is asked of the broker (a round trip).
        """
        if self.cancelled():
            return "cancelled"
        if self.done():
            return "failed" if self.exception() is not None else "done"
        if self._client is None:
            return "pending"
        return self._client._status_of(self)

    def __reduce__(self):
        # Only as an argument of a task submitted to the same client: the task
        # then waits for this one and receives its result (shoal.deps).
        from .deps import reduce_future
        return reduce_future(self)

    # -- output ----------------------------------------------------------------
    def add_output_callback(self, fn: Callable[[str, str], Any]) -> None:
        """Call ``fn(stream, text)`` as the task prints (``stream``: "stdout" or "stderr").

        Called from the client's IO thread, about every 0.1 s while the task
        runs, and once more with whatever remained when it finishes.  Output
        printed before the callback was added is replayed to it first.
        """
        if not self._output_callbacks:
            self._output_callbacks = []
        self._output_callbacks.append(fn)
        for stream in ("stdout", "stderr"):
            text = getattr(self, stream)
            if text:
                _call(fn, stream, text)

    def _live_output(self, out: str, err: str) -> None:
        for stream, text in (("stdout", out), ("stderr", err)):
            if text:
                setattr(self, stream, getattr(self, stream) + text)
                for fn in self._output_callbacks:
                    _call(fn, stream, text)

    def _final_output(self, out: str, err: str) -> None:
        # The result carries all output; pass on what live updates did not.
        for stream, full in (("stdout", out), ("stderr", err)):
            seen = getattr(self, stream)
            rest = full[len(seen):] if full.startswith(seen) else full
            setattr(self, stream, full)
            if rest:
                for fn in self._output_callbacks:
                    _call(fn, stream, rest)

    # -- results -----------------------------------------------------------
    def result(self, timeout: Optional[float] = None) -> Any:
        """Return the task's result, waiting up to ``timeout`` seconds.

        Raises the task's exception (with the remote traceback as its cause),
        ``concurrent.futures.TimeoutError`` or ``CancelledError``.
        """
        value = self._wait(super().result, timeout)
        if type(value) is Encoded:
            value = self._decode(value)
        return value

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Return the task's exception (``None`` if it succeeded), waiting up to ``timeout``."""
        return self._wait(super().exception, timeout)

    def _wait(self, get: Callable[[Optional[float]], Any], timeout: Optional[float]) -> Any:
        """``get(timeout)`` after receiving on this thread while the task is pending
        (see Client._lead); Ctrl-C meanwhile cancels the task."""
        if self._client is None or self._state != "PENDING":
            return get(timeout)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._client._lead(self, timeout)
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            return get(timeout)
        except KeyboardInterrupt:
            self._interrupted()
            raise

    def _interrupted(self) -> None:
        """Ctrl-C while waiting on this future: stop the task (best effort, quickly)."""
        if self._client is not None and not self.done():
            self._client.cancel([self], timeout=2.0)

    def _decode(self, encoded: Encoded) -> Any:
        with self._condition:
            if self._result is not encoded:  # another thread decoded it first
                return self._result
            value = encoded.decode()
            self._result = value
            return value

    # -- cancellation --------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel the task; return whether it was cancelled.

        A queued task (at the broker, or prefetched by a worker) is withdrawn;
        a running one is interrupted: an exception is raised inside it (a
        blocking ``time.sleep`` included) and its worker goes on serving.
        Returns False once the result has arrived, and for one item of a map
        (it shares a batch with others: ``MapResult.cancel()`` cancels them all).
        """
        with self._condition:
            if self._state == "FINISHED":
                return False
            if self._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED"):
                return True
        if self._client is None:
            return self._cancel_locally()
        if self._item is not None:
            return False  # one item of a map's batch is not withdrawn alone: cancel the map
        if self.key in self._client._cancel_keys([self.key]):
            return self._cancel_locally()
        # Its result may have overtaken the answer: an interrupted task reports
        # "cancelled" as its result, which cancels this future on arrival.
        return self.cancelled()

    def _cancel_locally(self) -> bool:
        return cancel_and_notify(self)

    # -- asyncio -------------------------------------------------------------
    def __await__(self):
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        with self._condition:
            state = self._state.lower()
            if self._state == "FINISHED":
                state = "error" if self._exception is not None else "finished"
        where = f" on {self.worker}" if self.worker else ""
        return f"<shoal.Future {self.key!r} {state}{where}>"


def attach_traceback(exc: BaseException, tb_text: str, worker: str) -> BaseException:
    """Set ``exc.__cause__`` to the remote traceback, so Python prints it; return ``exc``."""
    if tb_text:  # a lost worker, for one, leaves no traceback to show
        exc.__cause__ = RemoteTraceback(with_local_source(tb_text), worker)
    return exc


_FRAME_LINE = re.compile(r'  File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def with_local_source(tb_text: str) -> str:
    """Fill in the source lines a worker could not show from this process's own.

    A function defined in a notebook cell travels by value; the worker has no
    copy of the cell, but this process does (IPython keeps cells in
    ``linecache``), so the user still sees the line that failed.
    """
    lines = tb_text.splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME_LINE.match(line)
        if match is None or (i + 1 < len(lines) and lines[i + 1].startswith("    ")):
            continue
        source = linecache.getline(match["file"], int(match["line"])).strip()
        if source:
            out.append(f"    {source}\n")
    return "".join(out)


def cancel_and_notify(future: cf.Future) -> bool:
    """Cancel ``future`` here and wake the stdlib's ``wait()`` and ``as_completed()``.

    Those see only CANCELLED_AND_NOTIFIED as done, which ``cancel()`` alone
    does not reach.  Safe when several threads cancel the same future.
    """
    if not cf.Future.cancel(future):
        return False
    with future._condition:  # re-entrant: set_running_or_notify_cancel takes it too
        if future._state == "CANCELLED":
            future.set_running_or_notify_cancel()
    return True


def _call(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        import logging
        logging.getLogger(__name__).exception("output callback %r failed", fn)


def as_completed(futures: Iterable[cf.Future], timeout: Optional[float] = None) -> Iterator[cf.Future]:
    """Yield futures as they finish (the stdlib's ``as_completed``)."""
    return cf.as_completed(futures, timeout)


def wait(futures: Iterable[cf.Future], timeout: Optional[float] = None,
         return_when: str = ALL_COMPLETED):
    """Wait for futures; return ``(done, not_done)`` (the stdlib's ``wait``).

    Waiting for all of shoal's futures, this thread receives their results
    itself, one pending future after another, instead of hanging a waiter on
    every future as the stdlib does (which costs more than the tasks when
    they are many and short); the stdlib's ``wait`` does the rest.
    """
    fs = set(futures)
    if return_when == ALL_COMPLETED:
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in fs:
            if f._state in _DONE_STATES or not isinstance(f, Future) or f._client is None:
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            f._client._lead(f, remaining)
        if all(f._state in _DONE_STATES for f in fs):
            return cf._base.DoneAndNotDoneFutures(fs, set())
        if deadline is not None:
            timeout = max(0.0, deadline - time.monotonic())
    return cf.wait(fs, timeout, return_when)


#: States in which the stdlib's ``wait`` counts a future as done.
_DONE_STATES = frozenset({cf._base.CANCELLED_AND_NOTIFIED, cf._base.FINISHED})
