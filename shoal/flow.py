"""What happens around a task's result, in the broker (a mixin of Broker).

* **Kept results**: a single task's outcome is kept by its key (see
  :mod:`shoal.store`), so any client can fetch it later by id
  (``client.result(task_id)``), and a task submitted later can take it as
  an argument without the data going through a client.
* **Dependencies**: a task that takes futures as arguments names their keys
  (``dp``).  It waits (state ``waiting``) until they have finished; each
  finished result becomes a stored object under the producer's key and is
  shipped to the consumer's worker like scattered data.  A producer that
  failed fails its dependents with ``DependencyFailed`` naming it, and so on
  down the chain.
* **Watchers**: a client that asks for a task it did not submit gets its
  result too when it finishes.
* **Task info**: ``future.status`` asks here.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from .protocol import Kind
from .records import (LIMITED, PARKED, QUEUED, RUNNING, SCHEDULED, WAITING, StoredObject, Unit,
                      task_id)

if TYPE_CHECKING:
    from .broker import Broker

logger = logging.getLogger(__name__)

#: Outcomes that are not a value: the dependents of such a task fail.
_FAILED = frozenset({"err", "lost", "cancelled", "berr", "dep"})
#: The owner of a finished task's result while tasks that take it may come.
RESULT_OWNER = b"\x00result"
#: A task asked for by id waits this long for the task to arrive before it is unknown.
FETCH_GRACE = 2.0
_EVENT_OF = {"ok": "task-succeeded", "err": "task-failed", "cancelled": "task-cancelled",
             "lost": "task-lost"}


def _event_details(status: str, meta: dict) -> dict:
    if status == "ok":
        return {"runtime": meta.get("t")}
    if status == "err":
        return {"error": meta.get("x", "an exception")}
    if status == "lost":
        return {"error": "; ".join(f"{w} ({why})" for w, why in meta.get("lost", ()))}
    if status in ("berr", "dep"):
        return {"error": meta.get("msg") or f"dependency {meta.get('dep')} {meta.get('why')}"}
    return {}


class Flow:
    """Kept results, dependencies, watchers and task info (see the module docstring)."""

    # ------------------------------------------------------------ submit
    def _index(self: "Broker", unit: Unit) -> None:
        self.by_key[unit.key] = unit
        early = self.fetches.pop(unit.key, None)
        if early:  # asked for by id before it arrived (from another client's socket)
            unit.watchers = [(ident, tid) for ident, tid, _ in early]

    def _unit_of(self: "Broker", key: bytes) -> Optional[Unit]:
        """The unfinished unit named ``key``, if there is one."""
        unit = self.by_key.get(key)
        if unit is not None and self.tasks.get(unit.bid) is not unit:
            del self.by_key[key]  # finished meanwhile
            return None
        return unit

    def _wire_dependencies(self: "Broker", unit: Unit, keys: list) -> Optional[tuple]:
        """Make ``unit`` wait for the tasks named by ``keys``.

        Returns ``(key, kept result)`` of a dependency that already failed
        (the unit must fail at once), else None.
        """
        waiting = set()
        for key in keys:
            if not isinstance(key, bytes) or len(key) != 16:
                raise ValueError(f"malformed dependency {key!r}")
        for key in keys:
            self.result_users[key] = self.result_users.get(key, 0) + 1
            if key in self.objects:
                continue  # finished, and its result is at hand
            producer = self._unit_of(key)
            if producer is not None:
                if producer.dependents is None:
                    producer.dependents = []
                producer.dependents.append(unit)
                if producer.state != RUNNING:
                    # Its worker must send the result as frames, not in shared
                    # memory that its client unlinks on arrival.
                    producer.meta["ns"] = 1
                waiting.add(key)
                continue
            kept = self.kept.get(key)
            if kept is None and key[1:9] == self.clients[unit.client].cid:
                # Its own task that finished before this one arrived, and whose
                # result the broker did not keep (a map batch, a large result):
                # the client has it.
                waiting.add(key)
                self._await_value(key, unit.client, [unit])
                continue
            if kept is None:
                raise LookupError(
                    f"task {task_id(key)}, which this task takes as an argument, is not known "
                    f"to the broker: its result expired (results are kept "
                    f"{self.kept.ttl:g} s) or the broker restarted without --store")
            if kept.status in _FAILED:
                return key, kept
            self._result_object(key, kept.frames, kept.digests)
        if waiting:
            unit.waiting_on = waiting
        return None

    def _held_by_dependencies(self: "Broker", unit: Unit) -> bool:
        """Wire a new unit to the tasks it takes; True if it must not be queued now:
        it waits for them, or it failed because one failed or is unknown."""
        try:
            failed = self._wire_dependencies(unit, unit.meta["dp"])
        except LookupError as exc:
            self._fail_dependency(unit, unit.meta["dp"][0], "berr", {"msg": str(exc)})
            return True
        if failed is not None:
            self._fail_dependency(unit, failed[0], failed[1].status, failed[1].meta)
            return True
        if unit.waiting_on:
            unit.state = WAITING
            return True
        return False

    def _result_object(self: "Broker", key: bytes, frames: list, digests: dict) -> None:
        """A finished task's result as an object tasks can take (see _release_result)."""
        if key not in self.objects:
            self.objects[key] = StoredObject(list(frames), dict(digests))
        obj = self.objects[key]
        if self.kept.get(key) is not None:
            obj.owners.add(RESULT_OWNER)

    def _unuse(self: "Broker", key: bytes) -> None:
        """A task that took ``key``'s result has finished."""
        users = self.result_users.get(key, 0) - 1
        if users > 0:
            self.result_users[key] = users
            return
        self.result_users.pop(key, None)
        self._release_result(key)

    def _release_result(self: "Broker", key: bytes) -> None:
        """Drop a result object once it is neither kept nor used by a waiting task."""
        obj = self.objects.get(key)
        if obj is None or key in self.result_users:
            return
        if self.kept.get(key) is None:
            obj.owners.discard(RESULT_OWNER)
        if not obj.owners:
            del self.objects[key]
            self._release_objects([key])

    # ------------------------------------------------------------ outcomes
    def _keep_by_id(self: "Broker", key: bytes, status: str, frames: list, meta: dict,
                    digests: dict) -> None:
        """Keep a finished task's result for requests by id and the tasks that take it,
        releasing the older results that it pushes out."""
        for gone in self.kept.put(key, status, frames, meta, digests):
            self._release_result(gone)

    def _settled(self: "Broker", unit: Unit, status: str, frames: list = (), meta: Optional[dict] = None,
                 digests: Optional[dict] = None) -> None:
        """``unit`` reached its end (any status): keep its result, tell those
        who wait for it.  Its own client is told by the caller."""
        meta = meta if meta is not None else {}
        digests = digests if digests is not None else {}
        key = unit.key
        if self.by_key.get(key) is unit:
            del self.by_key[key]
        for dep in unit.meta.get("dp", ()):
            self._unuse(dep)
        if "m" not in unit.meta and key and "sb" not in meta:
            # (A result in shared memory is its client's: not kept.)
            self._keep_by_id(key, status, frames, meta, digests)
        if self.durable.durable:
            self.durable.unit_removed(unit)
            if key and "sb" not in meta:  # every task's, maps too: a resuming client asks
                self.durable.result_kept(key, status, frames, meta, digests)
        unique = unit.meta.get("uq")
        if unique is not None and self.unique.get(unique) is unit:
            del self.unique[unique]
        if "sch" in unit.meta:
            self._schedule_ran(unit, status)
        if self.watchers:
            self._event(_EVENT_OF.get(status, "task-failed"), unit, worker=meta.get("w"),
                        **_event_details(status, meta))
        if unit.watchers:
            for ident, tid in unit.watchers:
                self._send_outcome(ident, tid, status, frames, meta, digests)
        if unit.dependents:
            dependents, unit.dependents = unit.dependents, None
            if status in _FAILED or "sb" in meta:
                if status not in _FAILED:  # its value is in shared memory, out of reach
                    self._ask_client_for(unit, dependents)
                    return
                for dependent in dependents:
                    self._fail_dependency(dependent, unit.key, status, meta)
            else:
                self._result_object(key, frames, digests)
                self._release_dependents(key, dependents)

    def _release_dependents(self: "Broker", key: bytes, dependents: list) -> None:
        for dependent in dependents:
            if dependent.state != WAITING or dependent.waiting_on is None:
                continue
            dependent.waiting_on.discard(key)
            if not dependent.waiting_on:
                dependent.waiting_on = None
                self._enqueue(dependent)

    def _ask_client_for(self: "Broker", unit: Unit, dependents: list) -> None:
        """A producer's result came back in shared memory (it started before a
        task took it as an argument): its client has the value; ask for it."""
        self._await_value(unit.key, unit.client, dependents)

    def _await_value(self: "Broker", key: bytes, client: bytes, dependents: list) -> None:
        """Ask ``client`` for the value of its task ``key``; ``dependents`` wait for it."""
        waiting = self.awaiting_values.get(key)
        if waiting is None:
            self.awaiting_values[key] = list(dependents)
            self._send(client, Kind.NEED, {"key": key})
        else:
            waiting.extend(dependents)

    def _value_failed(self: "Broker", key: bytes, why: str) -> None:
        """The client asked for a dependency's value says it failed, or is gone."""
        for dependent in self.awaiting_values.pop(key, ()):
            if dependent.state == WAITING:
                self._fail_dependency(dependent, key, "berr", {"msg": why})

    def _fail_dependency(self: "Broker", unit: Unit, dep_key: bytes, dep_status: str,
                         dep_meta: dict) -> None:
        """Fail ``unit`` because a task it takes as an argument did not succeed."""
        if self.tasks.pop(unit.bid, None) is None:
            return
        unit.state = "failed"
        self.counts["failed"] += 1
        client = self.clients.get(unit.client)
        if client is not None:
            client.tasks.pop(unit.tid, None)
        if dep_status == "dep":  # it did not run either: name the task that failed
            root = dep_meta.get("root") or dep_meta.get("dep")
            root_why = dep_meta.get("rwhy") or dep_meta.get("why")
            meta = {"dep": task_id(dep_key), "why": f"did not run because task {root} {root_why}",
                    "root": root, "rwhy": root_why}
        else:
            if dep_status == "err":
                why = f"raised {dep_meta['x']}" if dep_meta.get("x") else "raised an exception"
            elif dep_status == "lost":
                why = "was lost with the workers that ran it"
            elif dep_status == "cancelled":
                why = "was cancelled"
            else:
                why = f"was refused by the broker ({dep_meta.get('msg', '')})"
            meta = {"dep": task_id(dep_key), "why": why, "w": dep_meta.get("w", "")}
        self._send_outcome(unit.client, unit.tid, "dep", [], meta, {})
        self._settled(unit, "dep", [], meta, {})

    def _send_outcome(self: "Broker", ident: bytes, tid: int, status: str, frames: list,
                      meta: dict, digests: dict) -> None:
        self._send(ident, Kind.RESULTS, {"r": [[tid, status, len(frames), meta]]},
                   list(frames), digests)

    # ------------------------------------------------------------ requests
    def _on_fetch(self: "Broker", ident: bytes, msg) -> None:
        """A task's outcome by key for the local task number ``t``: now if kept,
        else when it finishes; an error if the broker knows no such task."""
        key, tid = msg.header["key"], msg.header["t"]
        if not isinstance(key, bytes) or len(key) != 16:
            raise ValueError(f"malformed task key {key!r}")
        self._client(ident)
        if self._stored_outcome(key) is not None:
            self._send_kept(ident, tid, key)
            return
        unit = self._unit_of(key)
        if unit is None:
            # Another client may have just submitted it: its message can arrive
            # after this one.  Wait a little before calling the id unknown.
            self.fetches.setdefault(key, []).append((ident, tid, time.monotonic() + FETCH_GRACE))
            return
        if unit.watchers is None:
            unit.watchers = []
        unit.watchers.append((ident, tid))

    def _stored_outcome(self: "Broker", key: bytes) -> Optional[tuple]:
        """``(status, frames, meta, digests)`` of a finished task: kept in memory,
        or on disk (``--store``); None if neither has it."""
        kept = self.kept.get(key)
        if kept is not None:
            return kept.status, kept.frames, kept.meta, kept.digests
        stored = self.durable.result(key)
        if stored is not None and time.time() - stored[4] <= self.kept.ttl:
            return stored[:4]
        return None

    def _send_kept(self: "Broker", ident: bytes, tid: int, key: bytes) -> None:
        status, frames, meta, digests = self._stored_outcome(key)
        self._send_outcome(ident, tid, status, frames, meta, digests)

    def _on_task_info(self: "Broker", ident: bytes, msg) -> None:
        """States of this client's tasks (``t``: its task numbers) or of any (``k``: keys)."""
        client = self._client(ident)
        states = []
        for tid in msg.header.get("t", ()):
            bid = client.tasks.get(tid)
            unit = self.tasks.get(bid) if bid is not None else None
            states.append(self._state_of(unit, None))
        for key in msg.header.get("k", ()):
            unit = self._unit_of(key) if isinstance(key, bytes) else None
            states.append(self._state_of(unit, key))
        self._send(ident, Kind.REPLY, {"rq": msg.header.get("rq"), "s": states})

    def _state_of(self: "Broker", unit: Optional[Unit], key: Optional[bytes]) -> str:
        if unit is None:
            kept = self.kept.get(key) if key else None
            if kept is None:
                return "unknown"
            return {"ok": "done", "cancelled": "cancelled"}.get(kept.status, "failed")
        state = unit.state
        if state == SCHEDULED:
            return "retrying" if unit.meta.get("att") else "scheduled"
        if state in (QUEUED, PARKED, LIMITED):
            return "queued"
        if state in (RUNNING, WAITING):
            return state
        return "unknown"

    def _expire_fetches(self: "Broker") -> None:
        now = time.monotonic()
        for key, waiting in list(self.fetches.items()):
            due = [w for w in waiting if w[2] <= now]
            if not due:
                continue
            rest = [w for w in waiting if w[2] > now]
            if rest:
                self.fetches[key] = rest
            else:
                del self.fetches[key]
            for ident, tid, _ in due:
                self._send(ident, Kind.ERROR, {"t": [tid], "msg": (
                    f"no task {task_id(key)} is known to the broker: it never existed here, or "
                    f"its result expired (results are kept {self.kept.ttl:g} s after they "
                    f"finish, {self.kept.max_bytes >> 20} MiB in all; larger ones only with "
                    "--store), or the broker restarted without --store")})

    def _expire_kept(self: "Broker") -> None:
        for key in self.kept.expire(time.time()):
            self._release_result(key)
        self.durable.expire_results(time.time() - self.kept.ttl)
