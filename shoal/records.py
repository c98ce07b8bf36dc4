"""The broker's records of tasks, stored objects, workers, clients and requests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

#: Keep this much work (seconds of measured compute) queued at each worker
#: beyond its running tasks, so a worker of short tasks never waits on a round trip.
PREFETCH_SECONDS = 0.004
MAX_PREFETCH = 64

QUEUED, RUNNING, PARKED = "queued", "running", "parked"


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
    failures: list = field(default_factory=list)  # [worker name, why] per worker lost running it
    suspect: bool = False  # held by a worker that died with others: runs alone from now on


@dataclass
class StoredObject:
    """A function payload or scattered value, opaque to the broker."""

    frames: list
    digests: dict
    owners: set = field(default_factory=set)


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
    key: Optional[str] = None  # its Curve public key, on a Curve-secured broker

    @property
    def prefetch(self) -> int:
        if self.mean_time is None:
            return 0
        return min(MAX_PREFETCH, int(PREFETCH_SECONDS / max(self.mean_time, 1e-6))) * self.slots

    @property
    def capacity(self) -> int:
        return self.slots + self.prefetch - len(self.running)

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
