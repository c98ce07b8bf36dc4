"""How a worker runs a unit: its function found (cached by digest, or named),
called with retries, back-off and timeouts, its outcome encoded for the wire
(a mixin of :class:`~shoal.worker.Worker`).

Exceptions travel with their remote traceback text; one that does not survive
pickling is replaced by a :class:`~shoal.RemoteError` of the same name, so it
cannot spoil the results of the rest of its batch.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from . import serialize, tasks
from .control import CancelInterrupt, Interrupted, TimeoutInterrupt
from .errors import RemoteError, ResultTooLarge, RetriesExhausted, Retry, TaskTimeout
from .options import RETRY_BACKOFF_MAX
from .scheduling import backoff_delay

if TYPE_CHECKING:
    from .worker import Worker

logger = logging.getLogger(__name__)

#: A result larger than this (bytes, pickled) fails with a clear error instead
#: of being sent; ``shoal worker --max-result-size`` changes it.
MAX_RESULT_SIZE = 1 << 30


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


class Backlog:
    """Units received and not started: higher priorities first, FIFO within one.

    Units the broker sent ahead (prefetch) wait here; a unit of higher
    priority that arrives later still starts before them.  Priority 0, the
    common case, is a plain deque.
    """

    def __init__(self: "Worker") -> None:
        self._fifo: deque = deque()      # priority 0
        self._ranked: list = []          # (-priority, arrival, bid), others
        self._arrivals = itertools.count()
        self._ready = threading.Condition(threading.Lock())

    def put(self: "Worker", bid: Optional[int], priority: int = 0) -> None:
        with self._ready:
            if priority:
                heapq.heappush(self._ranked, (-priority, next(self._arrivals), bid))
            else:
                self._fifo.append(bid)
            self._ready.notify()

    def pop(self: "Worker") -> Optional[int]:
        """The next unit; IndexError if there is none."""
        ranked = self._ranked
        if ranked and (ranked[0][0] < 0 or not self._fifo):
            return heapq.heappop(ranked)[2]
        return self._fifo.popleft()

    def get(self: "Worker") -> Optional[int]:
        """The next unit, waiting for one (slot threads)."""
        with self._ready:
            while not (self._fifo or self._ranked):
                self._ready.wait()
            return self.pop()

    def __bool__(self: "Worker") -> bool:
        return bool(self._fifo) or bool(self._ranked)


class _RetryLater(Exception):
    """Hand a unit back to the broker to run again after ``delay`` seconds."""

    def __init__(self: "Worker", delay: float, attempt: int) -> None:
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


class Execution:
    """Running units and encoding their outcomes (a mixin of Worker)."""

    def _run_unit(self: "Worker", unit: tuple) -> tuple:
        try:
            return self._execute(*unit)
        except Interrupted:
            # An interrupt that landed after the task itself had finished.
            return unit[0], "cancelled", [], {}

    def _execute(self: "Worker", bid: int, refs: list, frames: list, meta: dict) -> tuple:
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

    def _encode_result(self: "Worker", fn, value, shm: bool, check_size: bool = True) -> tuple:
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

    def _portable_batch(self: "Worker", fn, outcome: tuple) -> tuple:
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

    def _function(self: "Worker", refs: list, meta: dict):
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
        return self.store.get(refs[0])

    def _call(self: "Worker", bid: int, fn, args, kwargs: dict, meta: dict) -> Any:
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

    def _run_batch(self: "Worker", bid: int, fn, items: list, star: bool, meta: dict) -> tuple:
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
