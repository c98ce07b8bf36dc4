"""Counting a map's or a list of futures' progress in items, for the displays
of :mod:`shoal.progress`: done, failed, running, queued, per worker, with the
failures' tracebacks.  A :class:`Tracker` is polled by its views (about ten
times a second), so nothing runs per task on the hot path."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

#: Failures listed in a display (all are counted).
MAX_LISTED_FAILURES = 20


def format_duration(seconds: Optional[float]) -> str:
    """``75.3`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``; ``None`` -> ``'?'``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------- counting
@dataclass
class Snapshot:
    """Item counts of a map (or futures) at one moment; ``None`` where unknown."""

    label: str = ""
    total: Optional[int] = None
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    running: Optional[int] = None
    queued: Optional[int] = None
    elapsed: float = 0.0
    finished: bool = False
    workers: dict = field(default_factory=dict)    # name -> [done, failed]
    failures: list = field(default_factory=list)   # (index, "Type: message", traceback)

    @property
    def completed(self) -> int:
        """Items that will not change any more: done, failed or cancelled."""
        return self.done + self.failed + self.cancelled

    @property
    def rate(self) -> float:
        return (self.done + self.failed) / max(self.elapsed, 1e-9)

    @property
    def eta(self) -> Optional[float]:
        if self.total is None or self.finished:
            return None
        left = self.total - self.completed
        return left / self.rate if self.rate > 0 else None

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return 1.0 if self.finished else None
        return min(1.0, self.completed / self.total)


def _error_summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _error_traceback(exc: BaseException, tb_text: Optional[str] = None) -> str:
    if tb_text:
        return tb_text
    cause = getattr(exc, "__cause__", None)
    tb = getattr(cause, "tb", None)
    return tb or _error_summary(exc)


class Tracker:
    """Counts the items of a map, a list of futures, or anything with map-like counters.

    ``poll()`` returns a :class:`Snapshot`; each finished batch is read once.
    A map's per-item failures are found in its finished batches' results, so
    the tracker decodes those (once; the values are kept for the caller).
    """

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.started = getattr(obj, "started", None) or time.monotonic()
        self._finished_at: Optional[float] = None
        self._lock = threading.Lock()
        if isinstance(obj, (list, tuple)):
            self.kind = "futures"
            self.label = f"{len(obj)} futures"
        elif hasattr(obj, "batches"):
            self.kind = "map"
            self.label = _callable_name(getattr(obj, "fn", None)) or "map"
        else:
            self.kind = "counters"
            self.label = ""
        self._seen = 0               # batches read from the map's list so far
        self._open: list = []        # batches not yet finished, in send order
        self._done = self._failed = self._cancelled = 0
        self._workers: dict = {}
        self._failures: list = []

    # -- public
    def done(self) -> bool:
        """True once every item has finished."""
        obj = self.obj
        if self.kind == "futures":
            return all(f.done() for f in obj)
        return bool(obj.done())

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`done` or ``timeout``; return whether it is done."""
        if self.kind == "map" and hasattr(self.obj, "wait"):
            return bool(self.obj.wait(timeout))
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.kind == "futures":
            import concurrent.futures as cf
            while True:
                pending = [f for f in self.obj if not f.done()]
                remaining = None if deadline is None else deadline - time.monotonic()
                if not pending or (remaining is not None and remaining <= 0):
                    return not pending
                # Bounded: a future cancelled without notifying waiters wakes no one.
                cf.wait(pending, 0.5 if remaining is None else min(0.5, remaining),
                        return_when=cf.FIRST_COMPLETED)
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)  # a duck-typed object offers nothing to wait on
        return True

    def poll(self) -> Snapshot:
        """The counts now."""
        with self._lock:
            finished = self.done()  # read first: counts read after it are final
            if self.kind == "map":
                snap = self._poll_map()
            elif self.kind == "futures":
                snap = self._poll_futures()
            else:
                snap = self._poll_counters()
            now = time.monotonic()
            if finished and self._finished_at is None:
                self._finished_at = now
            snap.finished = finished
            snap.elapsed = (self._finished_at or now) - self.started
            snap.label = self.label
            return snap

    # -- kinds
    def _poll_counters(self) -> Snapshot:
        m = self.obj
        return Snapshot(total=m.total, done=m.done_count, failed=m.failed_count)

    def _record(self, worker: Optional[str], done: int, failed: int) -> None:
        counts = self._workers.setdefault(worker or "?", [0, 0])
        counts[0] += done
        counts[1] += failed

    def _note_failure(self, index: Any, exc: BaseException, tb_text: Optional[str]) -> None:
        if len(self._failures) < MAX_LISTED_FAILURES:
            self._failures.append((index, _error_summary(exc), _error_traceback(exc, tb_text)))

    def _read_batch(self, batch: Any) -> None:
        if batch.cancelled():
            self._cancelled += batch.count
            return
        exc = batch.exception()
        if exc is not None:  # the whole batch failed (its worker was lost, ...)
            self._failed += batch.count
            self._record(batch.worker, 0, batch.count)
            last = batch.start + batch.count - 1
            index = batch.start if batch.count == 1 else f"{batch.start}-{last}"
            self._note_failure(index, exc, None)
            return
        failed = getattr(batch, "failed", None)  # per-item failures, when the core counts them
        errors: dict = {}
        if failed is None or (failed and len(self._failures) < MAX_LISTED_FAILURES):
            _, errors = batch.result()
            failed = len(errors)
        for i, (err, tb_text) in sorted(errors.items()):
            self._note_failure(batch.start + i, err, tb_text)
        self._done += batch.count - failed
        self._failed += failed
        self._record(batch.worker, batch.count - failed, failed)

    def _poll_map(self) -> Snapshot:
        m = self.obj
        batches = m.batches
        self._open.extend(batches[self._seen:])
        self._seen = len(batches)
        still_open = []
        for batch in self._open:
            if batch.done():
                self._read_batch(batch)
            else:
                still_open.append(batch)
        self._open = still_open
        in_flight = sum(b.count for b in still_open)
        # Which sent batches run and which wait is the broker's to know; the
        # first `slots` of them in send order are the ones most likely running.
        slots = max(1, getattr(getattr(m, "client", None), "slots", 0) or 1)
        running = sum(b.count for b in still_open[:slots])
        sent = sum(b.count for b in batches)
        total = m.total
        unsent = max(0, total - sent) if total is not None else 0
        return Snapshot(total=total, done=self._done, failed=self._failed,
                        cancelled=self._cancelled, running=running,
                        queued=in_flight - running + unsent,
                        workers={k: list(v) for k, v in self._workers.items()},
                        failures=list(self._failures))

    def _poll_futures(self) -> Snapshot:
        futures = self.obj
        done = failed = cancelled = pending = 0
        workers: dict = {}
        failures = []
        for index, f in enumerate(futures):
            if not f.done():
                pending += 1
                continue
            if f.cancelled():
                cancelled += 1
                continue
            exc = f.exception()
            counts = workers.setdefault(getattr(f, "worker", None) or "?", [0, 0])
            if exc is None:
                done += 1
                counts[0] += 1
            else:
                failed += 1
                counts[1] += 1
                if len(failures) < MAX_LISTED_FAILURES:
                    failures.append((index, _error_summary(exc), _error_traceback(exc)))
        client = next((getattr(f, "_client", None) for f in futures
                       if getattr(f, "_client", None) is not None), None)
        slots = getattr(client, "slots", 0) or 0
        running = min(pending, slots) if slots else None
        return Snapshot(total=len(futures), done=done, failed=failed, cancelled=cancelled,
                        running=running, queued=None if running is None else pending - running,
                        workers=workers, failures=failures)


def _callable_name(fn: Any) -> str:
    """``square``, ``Model.fit``; a partial is named after its function."""
    while getattr(fn, "func", None) is not None and callable(fn.func):
        fn = fn.func
    if fn is None:
        return ""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def tracker_for(obj: Any) -> Tracker:
    """A :class:`Tracker` for a map, a list of futures, or an existing tracker."""
    return obj if isinstance(obj, Tracker) else Tracker(obj)
