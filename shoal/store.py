"""Results of keyed maps, kept by the broker for clients that come back.

``client.map(fn, items, key="sweep-1")`` tags each batch with the key and
its place in the input.  The broker keeps every finished batch of the key
here, as opaque frames, so that after a kernel restart the same call gets the
finished part at once and runs only the rest, and ``client.results(key)``
re-attaches without resubmitting.

Bounded by :data:`MAX_BYTES` in all (least recently used keys go first) and
:data:`TTL_SECONDS` since a key was last used.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MAX_BYTES = 1 << 30
TTL_SECONDS = 24 * 3600.0


@dataclass
class Part:
    """One finished batch of a keyed map."""

    start: int
    count: int
    status: str
    frames: list
    meta: dict
    digests: dict


@dataclass
class KeyedRun:
    parts: dict = field(default_factory=dict)  # start -> Part
    nbytes: int = 0
    touched: float = 0.0


class ResultStore:
    """Finished parts of keyed maps, by key."""

    def __init__(self, max_bytes: int = MAX_BYTES, ttl: float = TTL_SECONDS) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.runs: dict[str, KeyedRun] = {}
        self.nbytes = 0

    def put(self, key: str, start: int, count: int, status: str, frames: list, meta: dict,
            digests: dict) -> None:
        run = self.runs.setdefault(key, KeyedRun())
        size = sum(len(f) for f in frames) + 256
        old = run.parts.get(start)
        if old is not None:
            run.nbytes -= sum(len(f) for f in old.frames) + 256
            self.nbytes -= sum(len(f) for f in old.frames) + 256
        run.parts[start] = Part(start, count, status, list(frames), dict(meta), dict(digests))
        run.nbytes += size
        self.nbytes += size
        run.touched = time.monotonic()
        self._evict(keep=key)

    def get(self, key: str) -> list:
        """The finished parts of ``key``, in input order."""
        run = self.runs.get(key)
        if run is None:
            return []
        run.touched = time.monotonic()
        return [run.parts[s] for s in sorted(run.parts)]

    def drop(self, key: str) -> bool:
        run = self.runs.pop(key, None)
        if run is not None:
            self.nbytes -= run.nbytes
        return run is not None

    def expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, r in self.runs.items() if now - r.touched > self.ttl]:
            logger.info("keyed results %r expired (unused for %.0f s)", key, self.ttl)
            self.drop(key)

    def _evict(self, keep: str) -> None:
        while self.nbytes > self.max_bytes and len(self.runs) > 1:
            oldest = min((k for k in self.runs if k != keep), key=lambda k: self.runs[k].touched)
            logger.warning("result store over %d bytes: dropping keyed results %r",
                           self.max_bytes, oldest)
            self.drop(oldest)

    def summary(self) -> dict:
        return {"keys": len(self.runs), "bytes": self.nbytes}


#: Results of single tasks are kept this long after they finish (``--result-ttl``)...
RESULT_TTL = 24 * 3600.0
#: ...and while all of them fit in this many bytes (``--result-memory``), oldest dropped first.
RESULT_MAX_BYTES = 128 << 20


class KeptResult:
    """A finished task's outcome as it travelled: status, frames, metadata,
    its size and the ``time.time()`` it finished.  (Slotted: the broker keeps
    one per finished task.)"""

    __slots__ = ("status", "frames", "meta", "digests", "nbytes", "at")

    def __init__(self, status: str, frames: list, meta: dict, digests: dict, nbytes: int,
                 at: float) -> None:
        self.status, self.frames, self.meta = status, frames, meta
        self.digests, self.nbytes, self.at = digests, nbytes, at

    def __repr__(self) -> str:
        return f"KeptResult({self.status!r}, {len(self.frames)} frames, {self.nbytes} bytes)"


class TaskResults:
    """Results of single tasks by task key, for ``client.result(task_id)`` and
    for tasks that take a finished task's result as an argument.

    Bounded by ``max_bytes`` (oldest first) and ``ttl`` seconds after each finished.
    """

    def __init__(self, max_bytes: int = RESULT_MAX_BYTES, ttl: float = RESULT_TTL) -> None:
        from collections import OrderedDict
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._entries: "OrderedDict[bytes, KeptResult]" = OrderedDict()
        self.nbytes = 0
        self.expired = 0

    def put(self, key: bytes, status: str, frames: list, meta: dict, digests: dict,
            at: float = 0.0) -> list:
        """Keep a result; return the keys of older ones dropped to make room.

        A result over an eighth of ``max_bytes`` is not kept in memory (only
        a broker with ``--store`` keeps such results).
        """
        size = sum(map(len, frames)) + 128
        if size > self.max_bytes // 8:
            return [key] if self.pop(key) is not None else []
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._entries[key] = KeptResult(status, list(frames), meta, digests, size,
                                        at or time.time())
        self.nbytes += size
        gone = []
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            gone.append(self._evict_oldest())
        return gone

    def _evict_oldest(self) -> bytes:
        key, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        self.expired += 1
        return key

    def get(self, key: bytes) -> "KeptResult | None":
        return self._entries.get(key)

    def pop(self, key: bytes) -> "KeptResult | None":
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def expire(self, now: float = 0.0) -> list:
        """Drop results older than the TTL; return their keys."""
        now = now or time.time()
        gone = []
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.at <= self.ttl:
                break
            self._evict_oldest()
            gone.append(key)
        return gone

    def __len__(self) -> int:
        return len(self._entries)

    def summary(self) -> dict:
        return {"tasks": len(self._entries), "bytes": self.nbytes, "ttl_s": self.ttl}
