"""The broker's queue: named queues, priorities, and which worker may take what.

Units wait in *lanes*, one per ``(priority, queue)``: FIFO within a lane,
higher priorities first.  A worker takes from the lanes of the queues it
serves (``shoal worker --queues gpu,io``), only units whose resources fit in
what it has free (``--resources gpu=1``), and never a unit addressed to
another worker or needing shared memory on another host.

The common case, one queue at one priority, is one deque: a dispatch pass
costs what it did before queues existed.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Callable, Iterator, Optional

from .records import DEFAULT_QUEUE, QUEUED, Unit, WorkerRecord

#: How many units a dispatch pass may look at and skip, per worker, beyond
#: those it takes: bounds the cost of a queue whose head no worker can take.
SCAN_LIMIT = 256

#: Units with names and priorities beyond these are refused at submit.
MAX_QUEUE_NAME = 200
MAX_PRIORITY = 1 << 31


def unit_route(meta: dict) -> tuple[str, int, Optional[dict]]:
    """``(queue, priority, resources)`` of a unit from its metadata; raises ValueError."""
    queue = meta.get("q", DEFAULT_QUEUE)
    if not isinstance(queue, str) or not queue or len(queue) > MAX_QUEUE_NAME:
        raise ValueError(f"queue must be a non-empty string, not {queue!r}")
    priority = meta.get("pr", 0)
    if type(priority) is not int or not -MAX_PRIORITY < priority < MAX_PRIORITY:
        raise ValueError(f"priority must be an integer, not {priority!r}")
    resources = meta.get("rs")
    if resources is not None:
        resources = parse_resources(resources)
    return queue, priority, resources or None


def parse_resources(resources) -> dict:
    """``{"gpu": 1}`` from a mapping or ``"gpu=1,mem=4"``; raises ValueError."""
    if isinstance(resources, str):
        pairs = {}
        for part in filter(None, (p.strip() for p in resources.split(","))):
            name, sep, amount = part.partition("=")
            if not sep:
                raise ValueError(f"resource {part!r} needs an amount, e.g. {part}=1")
            try:
                pairs[name.strip()] = float(amount)
            except ValueError:
                raise ValueError(f"resource {name.strip()!r} has amount {amount!r}, "
                                 "which is not a number") from None
        resources = pairs
    if not isinstance(resources, dict):
        raise ValueError(f"resources must be a mapping of name to amount, not {resources!r}")
    out = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"resource names must be non-empty strings, not {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
            raise ValueError(f"resource {name!r} must be a non-negative number, not {amount!r}")
        out[name] = amount
    return out


class TaskQueue:
    """Queued units in lanes by priority and queue name (see the module docstring).

    Cancelled or otherwise settled units may stay in a lane until a dispatch
    pass reaches them; they are skipped there, so ``len`` counts them too.
    """

    def __init__(self) -> None:
        self.lanes: dict[tuple, deque] = {}
        # Lane keys in dispatch order: higher priority first, then queue name.
        self._order: list[tuple] = []

    def _lane(self, unit: Unit) -> deque:
        key = (-unit.priority, unit.queue)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = deque()
            bisect.insort(self._order, key)
        return lane

    def append(self, unit: Unit) -> None:
        self._lane(unit).append(unit)

    def appendleft(self, unit: Unit) -> None:
        self._lane(unit).appendleft(unit)

    def __bool__(self) -> bool:
        for lane in self.lanes.values():
            if lane:
                return True
        return False

    def __len__(self) -> int:
        return sum(len(lane) for lane in self.lanes.values())

    def __iter__(self) -> Iterator[Unit]:
        for key in self._order:
            yield from self.lanes[key]

    def queued(self) -> Iterator[Unit]:
        """The units still waiting, in dispatch order."""
        return (u for u in self if u.state == QUEUED)

    def _drop_empty(self) -> None:
        for key in [k for k in self._order if not self.lanes[k]]:
            del self.lanes[key]
            self._order.remove(key)

    def take(self, worker: WorkerRecord, n: int,
             admit: Optional[Callable[[Unit], bool]] = None,
             only: Optional[Callable[[Unit], bool]] = None) -> list:
        """Up to ``n`` units ``worker`` may run now, in dispatch order.

        ``admit(unit)`` is asked last, about a unit this worker could take;
        False means the unit was held elsewhere (a rate limit) and leaves the lane.
        With ``only``, taking stops at the first unit this worker could take
        that ``only(unit)`` refuses: nothing is taken from behind it.
        """
        if worker.alone is not None:
            if worker.alone in worker.running:
                # Nothing joins a suspect, or its worker's death would blame no one.
                return []
            worker.alone = None
        taken: list = []
        queues = worker.queues
        emptied = False
        for key in self._order:
            if key[1] not in queues:
                continue
            lane = self.lanes[key]
            if self._take_from(lane, worker, n - len(taken), taken, admit, only):
                break  # a suspect was taken (it runs alone), or ``only`` refused one
            emptied = emptied or not lane
            if len(taken) >= n:
                break
        if emptied:
            self._drop_empty()
        return taken

    @staticmethod
    def _take_from(lane: deque, worker: WorkerRecord, n: int, taken: list,
                   admit: Optional[Callable[[Unit], bool]],
                   only: Optional[Callable[[Unit], bool]] = None) -> bool:
        """Move up to ``n`` units from ``lane`` to ``taken``; True if one was a suspect,
        or ``only`` refused one (the caller then stops)."""
        skipped = []
        scanned = 0
        wanted = len(taken) + n
        alone = False
        while lane and len(taken) < wanted and scanned < n + SCAN_LIMIT:
            unit = lane.popleft()
            if unit.state != QUEUED:
                continue
            scanned += 1
            meta = unit.meta
            host = meta.get("h")
            if host and host != worker.host:
                skipped.append(unit)  # needs shared memory on another host
                continue
            target = meta.get("to")
            if target is not None and target != worker.name:
                skipped.append(unit)  # addressed to another worker
                continue
            if unit.resources and not worker.fits(unit.resources):
                skipped.append(unit)  # waits for resources to free up
                continue
            if worker.registered_only and not worker.accepts(unit):
                skipped.append(unit)  # pickled code, or a task it does not have
                continue
            if only is not None and (unit.suspect or not only(unit)):
                skipped.append(unit)
                alone = True  # (stop: nothing behind it is taken)
                break
            if unit.suspect:
                if taken or worker.running:
                    skipped.append(unit)  # a suspect runs alone on an idle worker
                    continue
                if admit is not None and not admit(unit):
                    continue
                taken.append(unit)
                worker.alone = unit.bid
                alone = True
                break
            if admit is not None and not admit(unit):
                continue
            taken.append(unit)
            if unit.resources:
                # Claimed now, so the next unit of this pass sees what is left.
                worker.start(unit)
        if skipped:
            lane.extendleft(reversed(skipped))
        return alone


def runnable_somewhere(unit: Unit, workers) -> bool:
    """Whether some connected worker could run ``unit`` once it is idle."""
    for worker in workers:
        if worker.could_ever_run(unit):
            return True
    return False


def describe_route(unit: Unit) -> str:
    """``queue 'gpu' with resources gpu=1``: what a unit needs of a worker."""
    text = f"queue {unit.queue!r}"
    if "fn" in unit.meta:
        text = f"task {unit.meta['fn']!r} on {text}"
    if unit.resources:
        text += " with resources " + ",".join(
            f"{name}={amount:g}" for name, amount in sorted(unit.resources.items()))
    return text


def worker_command(unit: Unit) -> str:
    """The ``shoal worker`` options that would serve ``unit``."""
    options = "" if unit.queue == DEFAULT_QUEUE else f" --queues {unit.queue}"
    name = unit.meta.get("fn")
    if name and "." in name:
        options += f" --import {name.rpartition('.')[0]}"
    if unit.resources:
        options += " --resources " + ",".join(
            f"{name}={amount:g}" for name, amount in sorted(unit.resources.items()))
    return f"shoal worker ADDRESS{options}"


def unrunnable(units, workers, limit: int = 100_000) -> list:
    """Queued units no connected worker can take, grouped by what they need.

    ``[{"needs": "queue 'gpu'", "count": 3, "start": "shoal worker ..."}]``
    """
    workers = list(workers)
    groups: dict = {}
    for i, unit in enumerate(units):
        if i >= limit:
            break
        key = (unit.queue, tuple(sorted((unit.resources or {}).items())), unit.meta.get("fn"))
        entry = groups.get(key)
        if entry is None:
            if runnable_somewhere(unit, workers):
                groups[key] = None
                continue
            entry = groups[key] = {"needs": describe_route(unit), "count": 0,
                                   "start": worker_command(unit)}
        if entry is not None:
            entry["count"] += 1
    return [g for g in groups.values() if g is not None]
