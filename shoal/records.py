"""The broker's records of tasks, stored objects, workers, clients and requests."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

#: Keep this much work (seconds of measured compute) queued at each worker
#: beyond its running tasks, so a worker of short tasks never waits on a round trip.
PREFETCH_SECONDS = 0.004
#: ... and at most this many units per slot (tiny tasks cost more to handle than to run:
#: 64 left a 2-worker cluster idle for a round trip every 64 trivial tasks).
MAX_PREFETCH = 256
#: A busy worker that finished nothing for this long, and for this many of its
#: mean task times, runs something long: it takes nothing ahead until it finishes
#: a unit, so new tasks wait at the broker for the first worker free (or one that
#: joins) instead of behind that task.  Above the 1 ms a worker holds its results
#: to send them together, with room for a loaded host's scheduling delays.
STALL_SECONDS = 0.02
STALL_FACTOR = 10
#: A worker whose units take up to this long gets the next map batch ahead while it
#: runs one (see Broker._deal_batches_ahead): more than a map batch's longest (0.5 s,
#: shoal.mapping.MAX_BATCH_SECONDS), or each boundary between long batches costs a
#: broker round trip (at 0.2 s: 2,000 x 5 ms on 2 workers 99.2-99.3% efficient, now 99.5%).
BATCH_AHEAD_SECONDS = 0.75

QUEUED, RUNNING, PARKED = "queued", "running", "parked"
#: Waiting for the futures it takes as arguments; for its time (delay, at, a
#: retry's back-off); for a rate limit's next token.
WAITING, SCHEDULED, LIMITED = "waiting", "scheduled", "limited"
DEFAULT_QUEUE = "default"
#: The count in ``status()["counts"]`` a finished unit adds to, by its status.
COUNTED = {"ok": "done", "err": "failed", "cancelled": "cancelled"}
#: States of a unit that has not started: a cancel withdraws it at the broker.
WAITING_STATES = frozenset({QUEUED, PARKED, WAITING, SCHEDULED, LIMITED})
#: The owner of an object whose client left while tasks that use it wait.
ORPHANED = b""


@dataclass
class Unit:
    """A task unit in the broker: one call, or one batch of a map."""

    bid: int
    client: bytes
    tid: int
    refs: list
    frames: list
    digests: dict
    meta: dict
    state: str = QUEUED
    worker: Optional[bytes] = None
    queued_at: float = 0.0
    failures: Optional[list] = None  # [worker name, why] per worker lost running it
    suspect: bool = False  # held by a worker that died with others: runs alone from now on
    queue: str = DEFAULT_QUEUE
    priority: int = 0  # higher runs first; FIFO within a queue and priority
    resources: Optional[dict] = None  # abstract resources it holds while it runs
    due: Optional[float] = None  # epoch seconds before which it must not run
    key: bytes = b""  # see task_key: how others name it (results, dependencies)
    watchers: Optional[list] = None  # [client ident, its task number]: also gets the result
    dependents: Optional[list] = None  # units waiting for this one's result
    waiting_on: Optional[set] = None  # keys of the units whose results this one waits for
    admitted: bool = False  # given its rate limit's token while it waited for one


@dataclass
class StoredObject:
    """A function payload or scattered value, opaque to the broker."""

    frames: list
    digests: dict
    owners: set = field(default_factory=set)
    name: str = ""  # a function's name, as its client sent it (for events and shoal top)


@dataclass
class WorkerRecord:
    ident: bytes
    name: str
    slots: int
    host: str
    pid: int
    running: dict = field(default_factory=dict)
    objects: set = field(default_factory=set)
    done: int = 0
    mean_time: Optional[float] = None
    last_seen: float = 0.0
    control: Optional[bytes] = None  # the worker's control socket (heartbeats, interrupts)
    reported: list = field(default_factory=list)  # units running at its last heartbeat
    alone: Optional[int] = None  # a suspect unit it runs with nothing beside it
    queues: frozenset = frozenset({DEFAULT_QUEUE})
    resources: dict = field(default_factory=dict)  # what it has, e.g. {"gpu": 1}
    used: dict = field(default_factory=dict)  # what its running units hold
    task_names: frozenset = frozenset()  # named tasks it has (shoal worker --import)
    registered_only: bool = False  # runs named tasks of task_names only
    blocked_until: float = 0.0  # its task socket was unreachable: no tasks before then
    key: Optional[str] = None  # its Curve public key, on a Curve-secured broker
    direct: str = ""  # its direct endpoint, where local clients hand it lone tasks
    progress_at: float = 0.0  # when it last finished a unit, or last became busy

    @property
    def prefetch(self) -> int:
        """How many units it may hold beyond its slots: PREFETCH_SECONDS of its measured
        task time, none before it has a measure or while it seems stalled."""
        mean = self.mean_time
        if mean is None:
            return 0
        if self.running and time.monotonic() - self.progress_at > max(STALL_SECONDS,
                                                                       STALL_FACTOR * mean):
            return 0
        return min(MAX_PREFETCH, int(PREFETCH_SECONDS / max(mean, 1e-6))) * self.slots

    @property
    def capacity(self) -> int:
        return self.slots + self.prefetch - len(self.running)

    def start(self, unit: Unit) -> None:
        """``unit`` now runs here: it holds a slot and its resources."""
        if not self.running:
            self.progress_at = time.monotonic()
        self.running[unit.bid] = unit
        if unit.resources:
            for name, amount in unit.resources.items():
                self.used[name] = self.used.get(name, 0) + amount

    def finish(self, bid: int) -> Optional[Unit]:
        """Unit ``bid`` no longer runs here; return it (None if it was not running)."""
        unit = self.running.pop(bid, None)
        if unit is not None and unit.resources:
            for name, amount in unit.resources.items():
                self.used[name] = self.used.get(name, 0) - amount
        return unit

    def clear(self) -> list:
        """Forget every running unit (the worker left); return them."""
        units = list(self.running.values())
        self.running.clear()
        self.used.clear()
        return units

    def fits(self, needs: dict) -> bool:
        """Whether ``needs`` fit in what is free here now."""
        have, used = self.resources, self.used
        return all(used.get(name, 0) + amount <= have.get(name, 0)
                   for name, amount in needs.items())

    def accepts(self, unit: Unit) -> bool:
        """Whether this worker runs ``unit``'s function (see registered_only)."""
        return not self.registered_only or unit.meta.get("fn") in self.task_names

    def could_ever_run(self, unit: Unit) -> bool:
        """Whether ``unit`` could run here once this worker is idle."""
        if unit.queue not in self.queues or not self.accepts(unit):
            return False
        needs = unit.resources
        return not needs or all(amount <= self.resources.get(name, 0)
                                for name, amount in needs.items())

    def observe(self, seconds: float) -> None:
        self.mean_time = seconds if self.mean_time is None else 0.8 * self.mean_time + 0.2 * seconds

    def __repr__(self) -> str:
        return f"<Worker {self.name} slots={self.slots} running={len(self.running)}>"


@dataclass
class CancelRequest:
    """A client's cancel request waiting on the workers that hold some of its tasks."""

    client: bytes
    rq: Any
    at: float
    withdrawn: list = field(default_factory=list)
    workers: set = field(default_factory=set)
    interrupted: int = 0  # counted when their results (status "cancelled") arrive


@dataclass
class ClientRecord:
    ident: bytes
    tasks: dict = field(default_factory=dict)  # client task id -> bid
    last_seen: float = 0.0
    warned: set = field(default_factory=set)  # needs no worker met, already told
    cid: bytes = b""  # the id it names its tasks with (task_key)
    direct_base: int = 0  # names the units it hands straight to workers (shoal.direct)


# ---------------------------------------------------------------- task ids
#: A task's key: "R", its client's 8-byte id, its number in that client (7 bytes).
#: 16 bytes, like an object digest, so a finished task's result can travel to
#: the tasks that take it as an argument the way scattered data does.
_KEY_PREFIX = b"R"


def task_key(cid: bytes, tid: int) -> bytes:
    return _KEY_PREFIX + cid + tid.to_bytes(7, "big")


def task_id(key: bytes) -> str:
    """The id users see: ``"<client id>-<number>"``."""
    return f"{key[1:9].hex()}-{int.from_bytes(key[9:], 'big')}"


def parse_task_id(text: str) -> bytes:
    """The key of a task id from :func:`task_id`; raises ValueError for anything else."""
    if not isinstance(text, str):
        raise TypeError(f"a task id is a string such as '9f86d081884c7d65-42', not {text!r}")
    cid, sep, number = text.partition("-")
    try:
        if not sep or len(cid) != 16:
            raise ValueError
        return task_key(bytes.fromhex(cid), int(number))
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not a shoal task id (they look like "
                         "'9f86d081884c7d65-42'; see Future.task_id)") from None
