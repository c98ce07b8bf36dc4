"""``client.map``: batches sized from measured task time and size, results in input order."""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from . import serialize
from .errors import BrokerLost
from .futures import Encoded, Future, attach_traceback
from .protocol import Kind
from .records import task_key
from .refs import collect_refs

if TYPE_CHECKING:
    from .client import Client

#: A map batch is sized to take about this long on a worker ...
TARGET_BATCH_SECONDS = 0.05
#: ... or longer while much of a map remains, up to this long: each batch costs its
#: worker ~1 ms between two on a busy host (on 2 cores, 2,000 x 5 ms in 50 ms batches
#: lost 1.7%).  No batch is more than half a slot's share of what is left, so batches
#: shrink by about half each round near the end and the last ones balance the slots.
#: (At a twelfth of what was left, 2,000 x 5 ms on 2 workers went in 55 batches, 99.3%
#: efficient; in 35 at half a slot's share, 99.4-99.5%; 500 on 1 worker, 26 -> 11.)
MAX_BATCH_SECONDS = 0.5
#: ... and to carry at most about this many bytes of results (or of inputs), measured
#: per item, so large values do not make batches of hundreds of megabytes.
TARGET_BATCH_BYTES = 4 << 20
#: Near the end of a map batches shrink, so that every slot finishes at about the
#: same time, but never below about this much work each (nor below half a slot's
#: share of the map, so each slot gets two and the client decodes one batch's
#: results while the next runs): a message costs more than balancing so little saves.
MIN_BATCH_SECONDS = 0.005
#: Nor is a batch split below this much work: a map of less goes in one batch, as
#: spread over the slots it would save less than the messages cost, and alone it
#: goes straight to an idle worker on this host (shoal.direct).  10 trivial items on
#: 2 workers: ~1.0 ms in 4 batches through the broker, ~0.6 ms in one, ~0.29 ms direct.
UNSPLIT_SECONDS = 0.001
#: What a map's window of batches in flight may carry in all; with many slots each
#: batch gets a smaller share, so memory stays bounded however large the cluster.
IN_FLIGHT_BYTES = 64 << 20
MAX_BATCH = 100_000
#: ``map()`` itself sends batches of known size for at most this long (then a feeder
#: thread goes on), so a map that fits in its first window needs no thread.
INLINE_FEED_SECONDS = 0.002
#: A client remembers what the maps of this many functions measured: mapping one
#: again starts from that (batches measure and adapt as ever) instead of a probe.
REMEMBERED_FUNCTIONS = 256


class _Batch(Future):
    """One batch of a map on the wire; its result is ``(values, errors)``.

    ``items`` are its inputs (kept unless the map's input is a generator),
    ``started`` the wall-clock time it began on its worker and ``duration``
    the seconds its items took there.
    """

    def __init__(self, key, client, mapresult: "MapResult", start: int, count: int,
                 items: Optional[list]) -> None:
        super().__init__(key, client)
        self.map = mapresult
        self.start = start
        self.count = count
        self.items = items
        #: items of this batch that raised (their errors travel in the result)
        self.failed = 0
        self._inputs: Optional[list] = None
        if isinstance(key, int) and key > 0:
            self._task_key = task_key(client.cid, key)

    def _release(self) -> None:
        """Drop the values once a streaming iteration has passed them."""
        with self._condition:
            self._result = None
            self.items = None


class MapResult:
    """The results of :meth:`Client.map`, iterable in input order as they arrive.

    >>> res = client.map(f, range(100))
    >>> for value in res: ...        # in input order; a failed item raises here
    >>> res.result()                 # all values as a list
    >>> res.futures                  # one Future per item
    """

    def __init__(self, client: "Client", fn: Optional[Callable], iterables: tuple,
                 batch_size: Optional[int], timeout: Optional[float],
                 key: Optional[str] = None, options: Optional[dict] = None,
                 keep_inputs: Optional[bool] = None) -> None:
        self.client = client
        self.fn = fn
        self.timeout = timeout
        #: a keyed map's results are kept by the broker (see Client.results)
        self.key = key
        self._options = options or {}
        self._star = len(iterables) > 1
        if not iterables:  # re-attaching to a keyed map: nothing to feed
            self._iter = None
        else:
            self._iter = iter(zip(*iterables)) if self._star else iter(iterables[0])
        try:
            self.total: Optional[int] = min(len(it) for it in iterables)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.total = None
        self._fixed_batch = batch_size
        #: inputs are kept per batch (for to_frame) unless the input is a generator
        self.keep_inputs = self.total is not None if keep_inputs is None else keep_inputs
        self.progress: Optional[bool] = None
        self._batches: list[_Batch] = []
        self._cond = threading.Condition()
        self._in_flight = 0
        self._submitted = 0
        self._exhausted = False
        self._feed_error: Optional[BaseException] = None
        self._cancelled = False
        self._per_item: Optional[float] = None
        # Bytes per item of results (measured by workers) and of inputs (measured here).
        self._result_bytes: Optional[float] = None
        self._input_bytes: Optional[float] = None
        self._item_futures: Optional[list] = None
        # A map over a generator streams: once the caller iterates, values are
        # released as they are passed and the feeder waits for a consumer that
        # falls behind, so memory stays bounded however long the input is.
        self._streaming = self.total is None and key is None and not self.keep_inputs
        self._consumed = 0   # batches the iterator has passed
        self._iterating = False  # a streaming iteration bounds the feed by what it consumed
        self._released = False
        self.done_count = 0
        self.failed_count = 0
        self.started = time.monotonic()
        self._measure_key = None  # what the client remembers this map's measures by
        if fn is not None:
            from .tasks import encode_function
            self._fn_payload, self._fn_digest, self._fn_name = encode_function(fn)
            if self._fn_digest is not None:
                client._fn_names.setdefault(self._fn_digest, serialize.task_name(fn))
            self._measure_key = self._fn_digest or self._fn_name
            known = client._map_measures.get(self._measure_key)
            if known is not None and batch_size is None:
                self._per_item, self._result_bytes = known  # no probe: start from these
        self._feeder: Optional[threading.Thread] = None
        if self._feed_first_window():
            return  # all of it is on its way: no feeder thread needed
        self._feeder = threading.Thread(target=self._feed, name="shoal-map-feeder", daemon=True)
        self._feeder.start()

    def _feed_first_window(self) -> bool:
        """Send the first window of batches from the calling thread when their sizes are
        known (a fixed batch size, or measures of an earlier map of this function) and
        the input is a sequence; True if that was all of it.

        A feeder thread costs a start and, worse, the GIL: while it pickles, the
        threads that would send and receive wait for it.  Past
        :data:`INLINE_FEED_SECONDS` the feeder takes over, so ``map()`` returns soon.
        """
        if (self._iter is None or self.key is not None or self.total is None
                or (self._per_item is None and not self._fixed_batch)):
            return False
        deadline = time.perf_counter() + INLINE_FEED_SECONDS
        try:
            while self._in_flight < self._window():
                size = self._next_size()
                items = list(itertools.islice(self._iter, size))
                if items:
                    # The first wakes no IO thread (~25 us of this process's CPU, and
                    # then the GIL it takes): the caller's result() or iteration,
                    # usually next, sends it, or a parked IO thread within 5 ms; the
                    # next ones wake it, so that a large map starts while this sends.
                    self._send_batch(items, soon=self._submitted > 0)
                if len(items) < size:
                    break
                if time.perf_counter() > deadline:
                    return False
            else:
                return False  # more than a window: the feeder sends the rest
        except BaseException as exc:  # an unpicklable item: raised where the map is read
            self._feed_error = exc
        with self._cond:
            self._exhausted = True
            self._cond.notify_all()
        return True

    # -- feeding (its own thread, so a slow generator never blocks the IO thread)
    def _window(self) -> int:
        return 2 * max(1, self.client.slots) + 2

    def _next_size(self) -> int:
        if self._fixed_batch:
            return self._fixed_batch
        slots = max(1, self.client.slots)
        if self._per_item is None:
            return 1  # a probe: measure before sending more
        per_item = max(self._per_item, 1e-7)
        size = int(TARGET_BATCH_SECONDS / per_item)
        if self.total is not None:
            remaining = self.total - self._submitted
            balanced = -(-remaining // (2 * slots))  # half a slot's share of what is left
            size = max(size, min(balanced, int(MAX_BATCH_SECONDS / per_item)))
            smallest = min(int(MIN_BATCH_SECONDS / per_item),
                           max(-(-self.total // (2 * slots)), int(UNSPLIT_SECONDS / per_item)))
            size = min(size, max(balanced, smallest))
        per_item_bytes = max(self._result_bytes or 0.0, self._input_bytes or 0.0)
        if per_item_bytes:
            budget = min(TARGET_BATCH_BYTES, IN_FLIGHT_BYTES / self._window())
            size = min(size, int(budget / per_item_bytes))
        return max(1, min(size, MAX_BATCH))

    def _feed(self) -> None:
        try:
            parts = self._attach_parts() if self.key is not None else []
            for start, count, batch in parts:
                if self._iter is not None:
                    if not self._feed_until(start):
                        return
                    skipped = sum(1 for _ in itertools.islice(self._iter, count))
                    if skipped < count:
                        return  # the input is shorter than what was kept
                with self._cond:
                    self._batches.append(batch)
                    self._submitted = start + count
                    self._in_flight += 1
                    self._cond.notify_all()
                batch.add_done_callback(self._batch_done)  # at once if already done
            if self._iter is not None:
                self._feed_until(None)
        except BaseException as exc:  # a failing generator or an unpicklable item
            self._feed_error = exc
        finally:
            with self._cond:
                self._exhausted = True
                self._cond.notify_all()

    def _feed_until(self, limit: Optional[int]) -> bool:
        """Send batches of fresh input up to item ``limit`` (or the end); False once done."""
        client = self.client
        while limit is None or self._submitted < limit:
            with self._cond:
                while not self._cancelled and (
                        self._in_flight >= self._window()
                        or (self._iterating
                            and len(self._batches) - self._consumed >= 4 * self._window())
                        or (self._per_item is None and self._in_flight > 0
                            and not self._fixed_batch)):
                    self._cond.wait(0.5)
                if self._cancelled or client._closed:
                    return False
                size = self._next_size()
            if limit is not None:
                size = min(size, limit - self._submitted)
            items = list(itertools.islice(self._iter, size))
            if not items:
                return False
            self._send_batch(items)
            if len(items) < size:
                return False
        return True

    def _attach_parts(self) -> list:
        """The parts of this keyed map the broker kept or still runs, as batches."""
        from .outcomes import settle
        client = self.client
        adopted: dict = {}

        def adopt(running: list) -> None:  # on the receiving thread (see Client._attach)
            for start, count, tid in running:
                adopted[tid] = client._pending[tid] = _Batch(tid, client, self, start, count,
                                                             None)

        done, running = client._attach(self.key, adopt)
        parts = []
        for start, count, status, frames, meta in done:
            batch = _Batch(("kept", self.key, start), client, self, start, count, None)
            settle(batch, status, frames, meta)
            parts.append((start, count, batch))
        for start, count, tid in running:
            parts.append((start, count, adopted[tid]))
        if parts and self._per_item is None:
            self._per_item = 1e-3  # measured again from the next results
        return sorted(parts, key=lambda p: p[0])

    def _send_batch(self, items: list, soon: bool = True) -> None:
        start = self._submitted
        frames, meta, refs = self._encode(items, start)
        size = serialize.payload_size(frames, meta)
        self._input_bytes = _average(self._input_bytes, size / len(items))
        batch = _Batch(next(self.client._tids), self.client, self, start, len(items),
                       items if self.keep_inputs else None)
        batch._inputs = items  # until it finishes: a lost batch is rerun item by item
        batch.add_done_callback(self._batch_done)
        with self._cond:
            self._batches.append(batch)
            self._submitted += len(items)
            self._in_flight += 1
            self._cond.notify_all()
        self._submit(batch, frames, meta, refs, soon)

    def _encode(self, items: list, start: int) -> tuple:
        """``(frames, meta, refs)`` of a unit running ``items`` (input ``start`` onwards)."""
        # A keyed map's results are kept by the broker, so they travel as frames,
        # never as shared memory that a departed client would have unlinked.
        shm = self.client._shm_ok and self.key is None
        try:
            (frames, meta), refs = collect_refs(lambda: serialize.dumps(items, shm=shm))
        except Exception as exc:
            for i, item in enumerate(items):
                detail = serialize.explain_call(self.fn, item if self._star else (item,), {})
                if detail:
                    raise serialize.SerializationError(
                        f"cannot send item {start + i} of map over {serialize.fn_name(self.fn)!r}: "
                        f"{detail}") from exc
            raise
        meta["m"] = 2 if self._star else 1
        meta["n"] = len(items)
        if self._fn_name is not None:
            meta["fn"] = self._fn_name
        meta.update(self._options)
        if self.key is not None:
            meta["k"], meta["ks"] = self.key, start
        return frames, meta, refs

    def _submit(self, batch: "_Batch", frames: list, meta: dict, refs: list,
                soon: bool = True) -> None:
        client = self.client
        if "sb" in meta:
            meta["h"] = client._host
            client._segments[batch.key] = serialize.segment_names(meta)
        client._pending[batch.key] = batch
        client._post((Kind.SUBMIT, batch.key, self._fn_digest, self._fn_payload, refs, frames, meta),
                     soon=soon)

    def split(self, batch: "_Batch") -> bool:
        """Rerun a batch whose worker died, one item per unit; False if it cannot be.

        One item that kills its worker would otherwise fail every item of its
        batch; run alone, only that item fails (with WorkerLost), and the
        batch resolves once all its items have.
        """
        items = batch._inputs
        if items is None or batch.count <= 1:
            return False
        subs: list = [None] * len(items)
        waiting = [len(items)]
        lock = threading.Lock()

        def finished(i: int, sub: "_Batch") -> None:
            with lock:
                subs[i] = sub
                waiting[0] -= 1
                if waiting[0]:
                    return
            values, errors = _combine(subs)
            batch.failed = len(errors)
            if not batch.done():
                batch.set_result(Encoded(lambda: (values, errors)))

        for i, item in enumerate(items):
            frames, meta, refs = self._encode([item], batch.start + i)
            sub = _Batch(next(self.client._tids), self.client, self, batch.start + i, 1, None)
            sub.add_done_callback(lambda done, i=i: finished(i, done))
            self._submit(sub, frames, meta, refs)
        return True

    def observe(self, meta: dict) -> None:
        """Learn per-item time and result size from a finished batch (IO thread)."""
        t, n, size = meta.get("t"), max(1, meta.get("n", 1)), meta.get("rb")
        if t is not None:
            self._per_item = _average(self._per_item, t / n)
        if size is not None:
            self._result_bytes = _average(self._result_bytes, size / n)
        if self._measure_key is not None and self._per_item is not None:
            measures = self.client._map_measures
            measures.pop(self._measure_key, None)  # (dicts keep order: the newest last)
            measures[self._measure_key] = (self._per_item, self._result_bytes)
            if len(measures) > REMEMBERED_FUNCTIONS:
                del measures[next(iter(measures))]

    def _batch_done(self, batch: _Batch) -> None:
        batch._inputs = None
        with self._cond:
            self._in_flight -= 1
            if batch.cancelled():
                pass
            elif batch.exception() is not None:
                self.failed_count += batch.count
                if isinstance(batch.exception(), BrokerLost):
                    self._cancelled = True  # the broker is gone: feed it nothing more
            else:
                self.failed_count += batch.failed
                self.done_count += batch.count - batch.failed
            self._cond.notify_all()

    # -- results
    def _batch_at(self, index: int, deadline: Optional[float]) -> Optional[_Batch]:
        with self._cond:
            while index >= len(self._batches):
                if self._exhausted:
                    if self._feed_error is not None:
                        raise self._feed_error
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise FuturesTimeout(f"map item {self._submitted} not sent within the timeout")
                self._cond.wait(remaining if remaining is not None else 1.0)
            return self._batches[index]

    def _batch_values(self, batch: _Batch, deadline: Optional[float]) -> tuple:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return batch.result(remaining)

    def __iter__(self) -> Iterator[Any]:
        # Chained in C: a generator resumed per item cost ~30 ns of the ~140 ns
        # a streamed trivial item costs its client in all.
        return itertools.chain.from_iterable(self._cancelling_on_interrupt())

    def _cancelling_on_interrupt(self) -> Iterator[list]:
        """The values batch by batch (:meth:`_chunks`); Ctrl-C meanwhile cancels the map."""
        try:
            yield from self._chunks()
        except KeyboardInterrupt:
            # Ctrl-C (a kernel interrupt) while iterating: stop this map's work.
            self.cancel()
            raise

    def _chunks(self) -> Iterator[list]:
        """The values batch by batch, in input order.  A failed item raises when
        reached: the values before it in its batch come first, as their own chunk."""
        self._check_not_released()
        if self._streaming:
            self._iterating = True
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        index = 0
        while True:
            batch = self._batch_at(index, deadline)
            if batch is None:
                return
            values, errors = self._batch_values(batch, deadline)
            if errors:
                first = min(errors)
                if first:
                    yield values[:first]
                exc, tb_text = errors[first]
                raise attach_traceback(exc, tb_text, batch.worker or "")
            yield values
            index += 1
            if self._streaming:
                batch._release()
                with self._cond:
                    self._released = True
                    self._consumed = index
                    self._cond.notify_all()

    def _check_not_released(self) -> None:
        if self._released:
            raise ValueError(
                "this map's input was a generator, so its results stream: each value is "
                "released once iteration has passed it. Keep them as you iterate "
                "(values = list(res)), or pass a list or range to keep them in the MapResult.")

    def result(self, timeout: Optional[float] = None) -> list:
        """All values as a list, in input order; raises the first failed item's error."""
        if timeout is not None:
            saved, self.timeout = self.timeout, timeout
            try:
                return self._collect()
            finally:
                self.timeout = saved
        return self._collect()

    def _collect(self) -> list:
        # A batch at a time: a generator step per item would cost more than the map.
        values: list = []
        for chunk in self._cancelling_on_interrupt():
            values.extend(chunk)
        return values

    @property
    def futures(self) -> list:
        """One :class:`Future` per item (waits until the whole input has been sent)."""
        self._check_not_released()
        with self._cond:
            while not self._exhausted:
                self._cond.wait(1.0)
            if self._item_futures is None:
                self._item_futures = []
                for batch in self._batches:
                    items = [Future((batch.key, i), self.client) for i in range(batch.count)]
                    for i, item in enumerate(items):
                        item._task_key, item._item, item._batch = batch._task_key, i, batch
                    self._item_futures.extend(items)
                    batch.add_done_callback(lambda b, items=items: _settle_items(b, items))
            return list(self._item_futures)

    def _all_batches(self) -> list:
        """Every batch, once the whole input has been sent."""
        with self._cond:
            while not self._exhausted:
                self._cond.wait(1.0)
            if self._feed_error is not None:
                raise self._feed_error
            return list(self._batches)

    def __reduce__(self):
        # Only as an argument of a task, which then receives the list of values.
        from .deps import reduce_map
        return reduce_map(self)

    @property
    def batches(self) -> list:
        """The batches sent so far (futures with ``start``, ``count``, ``items``, ``worker``)."""
        with self._cond:
            return list(self._batches)

    def to_frame(self):
        """A pandas DataFrame, one row per item so far: inputs, result, status, worker, timings."""
        from .frames import to_frame
        return to_frame(self)

    def _ipython_display_(self) -> None:
        from .progress import display_progress
        display_progress(self)

    def cancel(self) -> None:
        """Stop sending items and cancel every batch not yet finished."""
        with self._cond:
            self._cancelled = True
            batches = list(self._batches)
            self._cond.notify_all()
        self.client.cancel([b for b in batches if not b.done()])

    def done(self) -> bool:
        """True once every item has been sent and every batch has finished."""
        with self._cond:
            return self._exhausted and self._in_flight == 0

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`done` (without decoding results); return whether it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self._exhausted and self._in_flight == 0):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
            return True

    def worker_counts(self) -> dict:
        """How many items each worker has finished so far: ``{worker name: count}``."""
        counts: dict = {}
        with self._cond:
            batches = list(self._batches)
        for batch in batches:
            if batch.done() and not batch.cancelled() and batch.worker:
                counts[batch.worker] = counts.get(batch.worker, 0) + batch.count
        return counts

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this map's input has no length (a generator); iterate it instead")
        return self.total

    def __repr__(self) -> str:
        total = "?" if self.total is None else self.total
        return (f"<shoal.MapResult {serialize.fn_name(self.fn)} {self.done_count}/{total} done"
                f"{f', {self.failed_count} failed' if self.failed_count else ''}>")


def _average(mean: Optional[float], sample: float) -> float:
    """A running mean that follows change quickly (each new sample weighs half)."""
    return sample if mean is None else 0.5 * mean + 0.5 * sample


def _combine(subs: list) -> tuple:
    """One batch's ``(values, errors)`` from the one-item units it was split into."""
    values: list = []
    errors: dict = {}
    for i, sub in enumerate(subs):
        if sub.cancelled():
            values.append(None)
            errors[i] = (CancelledError(f"item {sub.start} was cancelled"), "")
        elif sub.exception() is not None:
            values.append(None)
            errors[i] = (sub.exception(), "")
        else:
            sub_values, sub_errors = sub.result()
            values.append(sub_values[0])
            if 0 in sub_errors:
                errors[i] = sub_errors[0]
    return values, errors


def _settle_items(batch: _Batch, items: list) -> None:
    if batch.cancelled():
        for f in items:
            f._cancel_locally()  # (the broker knows the batch, not its items)
        return
    exc = batch.exception()
    if exc is not None:
        for f in items:
            f.set_exception(exc)
        return
    values, errors = batch.result()
    for i, f in enumerate(items):
        f.worker = batch.worker
        if i in errors:
            e, tb_text = errors[i]
            f.set_exception(attach_traceback(e, tb_text, batch.worker or ""))
        else:
            f.set_result(values[i])


