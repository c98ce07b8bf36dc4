"""Periodic tasks, held by the broker: a Pythonic cron.

>>> client.every("*/5 * * * *", refresh, "prices", name="prices")      # cron, UTC
>>> client.every("0 9 * * mon-fri", report, name="report", tz="Europe/Paris")
>>> client.every(timedelta(seconds=30), ping, name="ping")
>>> client.schedules()            # name, when, next run, last run and its task id
>>> client.cancel_schedule("ping")

The broker keeps the function, its arguments and the schedule, and submits
a run each time one is due, whether or not any client is connected; each run
is a task with its own id and a kept result (``client.result(task_id)``).

Cron expressions have five fields (minute hour day month weekday) or six
(a sixth for seconds), parsed by `croniter <https://pypi.org/project/croniter/>`_,
in the schedule's time zone (``tz``, default UTC), daylight saving included.

**Runs missed while the broker was down** (a broker with ``--store`` keeps its
schedules across restarts): ``missed="skip"`` (the default) drops them and
carries on from the next time due after the restart; ``missed="once"`` runs
once at start-up to catch up, then carries on.  Missed runs are never run
once each.
"""
from __future__ import annotations

import datetime as dt
import heapq
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .protocol import Kind
from .records import StoredObject
from .routing import unit_route

logger = logging.getLogger(__name__)

MISSED = ("skip", "once")
#: The shortest interval a schedule may have.
MIN_INTERVAL = 0.1


def _zone(tz: Optional[str]):
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    if tz is None or tz == "UTC":
        return dt.timezone.utc
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r}; use an IANA name such as "
                         "'Europe/Paris' or 'America/New_York'") from None


def check_cron(expression: str) -> None:
    """Raise ValueError naming what is wrong with a cron expression."""
    from croniter import croniter
    fields = expression.split()
    if len(fields) not in (5, 6) or not croniter.is_valid(expression):
        raise ValueError(
            f"{expression!r} is not a cron expression: give five fields (minute hour "
            "day-of-month month day-of-week, e.g. '*/5 * * * *') or six (a sixth for "
            "seconds, e.g. '*/10 * * * * *')")


def next_time(kind: str, spec: Any, tz: Optional[str], after: float) -> float:
    """The first time (epoch seconds) strictly after ``after`` the schedule is due."""
    if kind == "every":
        return after + float(spec)
    from croniter import croniter
    start = dt.datetime.fromtimestamp(after, _zone(tz))
    return float(croniter(spec, start).get_next(float))


@dataclass
class Schedule:
    """A periodic task as the broker holds it (the function and arguments opaque)."""

    name: str
    kind: str  # "cron" or "every"
    spec: Any  # the cron expression, or the interval in seconds
    tz: Optional[str]
    missed: str
    refs: list  # [function digest, *scattered refs], or [] for a task sent by name
    frames: list  # the pickled arguments
    digests: dict
    meta: dict  # the unit metadata each run gets (options, a named task's "fn")
    objects: dict = field(default_factory=dict)  # digest -> (frames, digests) it needs
    next_run: float = 0.0
    last_run: Optional[float] = None
    runs: int = 0
    last_key: bytes = b""
    last_status: Optional[str] = None
    created: float = 0.0
    sid: bytes = b""  # its 8-byte id: with the run number it names each run's task

    def describe(self) -> dict:
        """What ``client.schedules()`` shows."""
        from .records import task_id
        return {"name": self.name,
                "every": self.spec if self.kind == "every" else None,
                "cron": self.spec if self.kind == "cron" else None,
                "tz": self.tz or "UTC", "missed": self.missed,
                "next_run": self.next_run, "last_run": self.last_run, "runs": self.runs,
                "last_task": task_id(self.last_key) if self.last_key else None,
                "last_status": self.last_status}


class Schedules:
    """The broker's periodic tasks by name, and when each is next due."""

    def __init__(self) -> None:
        self.by_name: dict[str, Schedule] = {}
        self._heap: list = []  # (next_run, name)

    def add(self, schedule: Schedule, now: Optional[float] = None) -> Optional[Schedule]:
        """Add (or replace, by name) a schedule; return the one replaced."""
        now = time.time() if now is None else now
        if not schedule.next_run:
            schedule.next_run = next_time(schedule.kind, schedule.spec, schedule.tz, now)
        old = self.by_name.get(schedule.name)
        self.by_name[schedule.name] = schedule
        heapq.heappush(self._heap, (schedule.next_run, schedule.name))
        return old

    def restore(self, schedule: Schedule, now: Optional[float] = None) -> bool:
        """Add a schedule loaded from the store; True if a missed run is due now."""
        now = time.time() if now is None else now
        catch_up = schedule.next_run <= now and schedule.missed == "once"
        if schedule.next_run <= now:
            schedule.next_run = now if catch_up else next_time(
                schedule.kind, schedule.spec, schedule.tz, now)
        self.add(schedule, now)
        return catch_up

    def remove(self, name: str) -> Optional[Schedule]:
        return self.by_name.pop(name, None)  # its heap entries are skipped when reached

    def due(self, now: float) -> list:
        """Schedules due at ``now``, each moved on to its next time."""
        ready = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, name = heapq.heappop(heap)
            schedule = self.by_name.get(name)
            if schedule is None or schedule.next_run != at:
                continue  # cancelled, or replaced
            ready.append(schedule)
            # From the time it was due, not from now, so a run never drifts; a
            # broker that fell behind skips to the next time still ahead.
            following = next_time(schedule.kind, schedule.spec, schedule.tz, at)
            if following <= now:
                following = next_time(schedule.kind, schedule.spec, schedule.tz, now)
            schedule.next_run = following
            heapq.heappush(heap, (following, name))
        return ready

    def next_due(self) -> Optional[float]:
        heap = self._heap
        while heap:
            at, name = heap[0]
            schedule = self.by_name.get(name)
            if schedule is not None and schedule.next_run == at:
                return at
            heapq.heappop(heap)
        return None

    def __len__(self) -> int:
        return len(self.by_name)

    def __bool__(self) -> bool:
        return bool(self.by_name)


def parse_every(when: Any) -> tuple[str, Any]:
    """``("every", seconds)`` or ``("cron", expression)`` from what ``client.every`` takes."""
    if isinstance(when, dt.timedelta):
        when = when.total_seconds()
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        if not when >= MIN_INTERVAL:
            raise ValueError(f"a schedule's interval must be at least {MIN_INTERVAL} s, "
                             f"not {when!r}")
        return "every", float(when)
    if isinstance(when, str):
        check_cron(when)
        return "cron", " ".join(when.split())
    raise TypeError(f"every() takes a cron expression ('*/5 * * * *'), a timedelta or a "
                    f"number of seconds, not {when!r}")


# ----------------------------------------------------------------- the broker's handler
#: Owner of the objects (function, scattered data) a schedule's runs use.
_OWNER = b"\x00schedule:"


class ScheduleRequests:
    """The broker's handling of SCHEDULE requests and of due runs (a mixin of Broker)."""

    def _on_schedule(self, ident: bytes, msg) -> None:
        h = msg.header
        op, rq = h.get("op"), h.get("rq")
        self._client(ident)
        if op == "list":
            self._send(ident, Kind.REPLY, {"rq": rq, "schedules": [
                s.describe() for s in sorted(self.schedules.by_name.values(),
                                             key=lambda s: s.name)]})
        elif op == "cancel":
            name = h.get("name")
            schedule = self.schedules.remove(name) if isinstance(name, str) else None
            if schedule is not None:
                self._drop_schedule_objects(schedule)
                self.durable.schedule_removed(name)
                logger.info("schedule %r cancelled after %d run(s)", name, schedule.runs)
            self._send(ident, Kind.REPLY, {"rq": rq, "cancelled": schedule is not None})
        elif op == "add":
            schedule = self._schedule_from(h, msg)
            old = self.schedules.add(schedule)
            if old is not None:
                self._drop_schedule_objects(old, keep=schedule)
            self.durable.schedule_saved(schedule)
            logger.info("schedule %r %s: every %s, next run %s", schedule.name,
                        "replaced" if old else "added", schedule.spec,
                        dt.datetime.fromtimestamp(schedule.next_run, dt.timezone.utc).isoformat())
            self._send(ident, Kind.REPLY, {"rq": rq, "schedule": schedule.describe(),
                                           "replaced": old is not None})
        else:
            raise ValueError(f"unknown schedule operation {op!r}")

    def _schedule_from(self, h: dict, msg) -> Schedule:
        name = h.get("name")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError(f"a schedule name is a non-empty string, not {name!r}")
        kind, spec = h.get("kind"), h.get("spec")
        if kind == "every":
            if not isinstance(spec, (int, float)) or not spec >= MIN_INTERVAL:
                raise ValueError(f"malformed interval {spec!r}")
        elif kind == "cron":
            if not isinstance(spec, str):
                raise ValueError(f"malformed cron expression {spec!r}")
            check_cron(spec)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}")
        tz = h.get("tz")
        if tz is not None:
            _zone(tz)
        missed = h.get("missed", "skip")
        if missed not in MISSED:
            raise ValueError(f"missed must be one of {MISSED}, not {missed!r}")
        refs, n, meta = h["u"]
        if not isinstance(meta, dict) or not isinstance(refs, list):
            raise ValueError("malformed scheduled task")
        owner = _OWNER + name.encode()
        pos = self._store_objects(owner, msg)
        objects = {}
        for ref in refs:
            obj = self.objects.get(ref)
            if obj is None:
                raise ValueError(f"the scheduled task's object {ref.hex()} did not arrive with it")
            obj.owners.add(owner)
            objects[ref] = (obj.frames, obj.digests)
        frames = msg.frames[pos:pos + n]
        from .protocol import frame_digests
        return Schedule(name, kind, spec, tz, missed, list(refs), list(frames),
                        frame_digests(h, pos, pos + n), meta, objects=objects,
                        created=time.time(), sid=os.urandom(8))

    def _drop_schedule_objects(self, schedule: Schedule, keep: Optional[Schedule] = None) -> None:
        owner = _OWNER + schedule.name.encode()
        if keep is not None and keep.name == schedule.name:
            return  # the same owner holds the new schedule's objects
        released = []
        for ref in schedule.refs:
            obj = self.objects.get(ref)
            if obj is not None:
                obj.owners.discard(owner)
                if not obj.owners:
                    del self.objects[ref]
                    released.append(ref)
        self._release_objects(released)

    def _run_schedules(self, now: float) -> None:
        """Submit a run of every schedule that is due."""
        for schedule in self.schedules.due(now):
            self._run_schedule(schedule)

    def _run_schedule(self, schedule: Schedule) -> None:
        from .records import Unit, task_key
        for ref, (frames, digests) in schedule.objects.items():
            if ref not in self.objects:  # restored from the store, or dropped meanwhile
                self.objects[ref] = StoredObject(list(frames), dict(digests))
            self.objects[ref].owners.add(_OWNER + schedule.name.encode())
        schedule.runs += 1
        schedule.last_run = time.time()
        meta = dict(schedule.meta, sch=schedule.name)
        unit = Unit(next(self._ids), b"", schedule.runs, list(schedule.refs), schedule.frames,
                    schedule.digests, meta, queued_at=time.monotonic(),
                    key=task_key(schedule.sid, schedule.runs))
        try:
            if "q" in meta or "pr" in meta or "rs" in meta:
                unit.queue, unit.priority, unit.resources = unit_route(meta)
        except ValueError:
            pass  # checked when the schedule was added
        schedule.last_key = unit.key
        schedule.last_status = "queued"
        self.tasks[unit.bid] = unit
        self._index(unit)
        self.counts["submitted"] += 1
        self.counts["scheduled_runs"] = self.counts.get("scheduled_runs", 0) + 1
        self.durable.unit_added(unit)
        self.durable.schedule_saved(schedule)
        if self.watchers:
            self._event("schedule-run", unit, schedule=schedule.name, run=schedule.runs)
        self._enqueue(unit)

    def _schedule_ran(self, unit, status: str) -> None:
        schedule = self.schedules.by_name.get(unit.meta.get("sch"))
        if schedule is not None and schedule.last_key == unit.key:
            schedule.last_status = {"ok": "done", "cancelled": "cancelled"}.get(status, "failed")
            self.durable.schedule_saved(schedule)

    def _restore_schedule(self, body: dict) -> None:
        """A schedule read from the store at start-up; a missed run may be due now."""
        frames = body.pop("frames")
        digests = body.pop("digests")
        objects = {d: (fr, dg) for d, (fr, dg) in body.pop("objects").items()}
        schedule = Schedule(body["name"], body["kind"], body["spec"], body["tz"],
                            body["missed"], body["refs"], frames, digests, body["meta"],
                            objects=objects, next_run=body["next_run"], last_run=body["last_run"],
                            runs=body["runs"], last_key=body["last_key"],
                            last_status=body["last_status"], created=body["created"],
                            sid=body["sid"])
        missed = schedule.next_run <= time.time()
        if self.schedules.restore(schedule):
            logger.info("schedule %r missed its run while the broker was down: running it once "
                        "now (missed='once')", schedule.name)
        elif missed:
            logger.info("schedule %r missed its run while the broker was down: skipped "
                        "(missed='skip'); next run %s", schedule.name,
                        dt.datetime.fromtimestamp(schedule.next_run, dt.timezone.utc).isoformat())
