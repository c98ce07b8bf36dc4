"""Time in the broker: units held until a time, and rate limits.

* :class:`Timers` holds units until they are due: ``submit(delay=...)``,
  ``submit(at=...)``, and a retry's back-off.  Times are the broker's wall
  clock (``time.time()``), so ``at=`` means the same instant on every host.
* :class:`RateLimits` spaces out the runs of each task name
  (``submit(rate_limit="10/m")``): a token bucket per name, held by the
  broker, so the limit holds across every worker and client.  A unit that
  finds no token waits in its name's line, in order, off the queue, so it
  never blocks other work.
"""
from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import deque
from typing import Callable, Optional

from .records import SCHEDULED, LIMITED, Unit


class Timers:
    """Units waiting for their time, soonest first."""

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()

    def hold(self, unit: Unit, due: float) -> None:
        unit.state = SCHEDULED
        unit.due = due
        heapq.heappush(self._heap, (due, next(self._seq), unit))

    def pop_due(self, now: float) -> list:
        """The units whose time has come (still scheduled), in due order."""
        heap, ready = self._heap, []
        while heap and heap[0][0] <= now:
            _, _, unit = heapq.heappop(heap)
            if unit.state == SCHEDULED and unit.due is not None and unit.due <= now:
                ready.append(unit)
        return ready

    def __bool__(self) -> bool:
        return bool(self._heap)

    def next_due(self) -> Optional[float]:
        heap = self._heap
        while heap and heap[0][2].state != SCHEDULED:
            heapq.heappop(heap)  # cancelled meanwhile
        return heap[0][0] if heap else None

    def __len__(self) -> int:
        return sum(1 for _, _, u in self._heap if u.state == SCHEDULED)

    def units(self) -> list:
        return [u for _, _, u in sorted(self._heap) if u.state == SCHEDULED]


def backoff_delay(base: float, attempt: int, cap: float, jitter: bool = True,
                  rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)``,
    at most ``cap``; with ``jitter``, a uniform draw between half of it and all
    of it, so retries of many failed tasks do not arrive together."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    if jitter:
        delay *= 0.5 + 0.5 * rng()
    return delay


class _Bucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp", "line")

    def __init__(self, count: float, period: float) -> None:
        self.rate = count / period       # tokens per second
        self.capacity = 1.0              # no bursts: runs are spaced evenly
        self.tokens = 1.0
        self.stamp = time.monotonic()
        self.line: deque = deque()       # units waiting for a token, in order

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def next_token(self) -> float:
        """Monotonic time of the next whole token."""
        return self.stamp + max(0.0, (1.0 - self.tokens) / self.rate)


class RateLimits:
    """Token buckets by task name; see the module docstring.

    ``"10/m"`` allows one run every 6 seconds (like Celery's rate limits, with
    no burst); the first runs at once.
    """

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, unit: Unit, name: str, count: float, period: float) -> bool:
        """Take a token for ``unit`` now, or put it in its name's line and return False."""
        bucket = self._buckets.get(name)
        if bucket is None or bucket.rate != count / period:
            previous = bucket
            bucket = self._buckets[name] = _Bucket(count, period)
            if previous is not None:
                bucket.line = previous.line
                bucket.tokens = min(previous.tokens, 1.0)
        now = time.monotonic()
        bucket.refill(now)
        if not bucket.line and bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        unit.state = LIMITED
        bucket.line.append(unit)
        return False

    def release(self, requeue: Callable[[Unit], None]) -> None:
        """Hand each line's head to ``requeue`` as tokens become available.

        A released unit holds its token: the dispatch pass that takes it next
        admits it without asking again.
        """
        now = time.monotonic()
        for name, bucket in list(self._buckets.items()):
            line = bucket.line
            while line and line[0].state != LIMITED:
                line.popleft()  # cancelled while it waited
            if not line:
                if bucket.tokens >= 1.0 and now - bucket.stamp > 3600:
                    del self._buckets[name]  # unused for an hour
                continue
            bucket.refill(now)
            while line and bucket.tokens >= 1.0:
                unit = line.popleft()
                if unit.state != LIMITED:
                    continue
                bucket.tokens -= 1.0
                unit.admitted = True
                requeue(unit)

    def has_waiting(self) -> bool:
        for bucket in self._buckets.values():
            if bucket.line:
                return True
        return False

    def next_release(self) -> Optional[float]:
        """Monotonic time at which some waiting unit gets its token."""
        soonest = None
        for bucket in self._buckets.values():
            if bucket.line:
                at = bucket.next_token()
                soonest = at if soonest is None else min(soonest, at)
        return soonest

    def waiting(self) -> dict:
        """``{name: units waiting for a token}``."""
        return {name: sum(1 for u in b.line if u.state == LIMITED)
                for name, b in self._buckets.items() if b.line}


def check_rate(limit) -> None:
    """Check a unit's ``rl`` field, ``[count, period]``; raise ValueError if malformed."""
    if (not isinstance(limit, list) or len(limit) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                       for x in limit)):
        raise ValueError(f"malformed rate limit {limit!r}")
