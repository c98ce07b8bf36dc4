"""What the broker does with a submission: objects stored, options read, units
queued or held (a mixin of :class:`~shoal.broker.Broker`).

A unit is held while its function or data has not arrived (parked), while
the futures it takes are unfinished, until its time (``delay``/``at``) or
while its rate limit is spent; it is refused at once for bad options, a
taken unique key, a worker name that does not exist, or pickled code that
every worker of its queue refuses.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from . import protocol
from .direct import TID_MASK, direct_bid
from .options import due_at
from .protocol import Kind, identity_field
from .records import (DEFAULT_QUEUE, PARKED, QUEUED, RUNNING, ClientRecord, StoredObject,
                      Unit, task_id, task_key)
from .routing import describe_route, runnable_somewhere, unit_route, worker_command
from .scheduling import check_rate

if TYPE_CHECKING:
    from .broker import Broker

logger = logging.getLogger(__name__)

#: A unit whose function or data has not arrived waits this long for it.
#: (A client sends from one socket per thread, so an object sent by one
#: thread can arrive after a task another thread submitted that uses it.)
PARK_SECONDS = 30.0

#: Task options that need reading at submit (the broker skips the rest quickly).
_SPECIAL = frozenset({"q", "pr", "rs", "at", "dl", "rl", "to", "uq"})


class Admission:
    """Submissions and scattered data, as they arrive (a mixin of Broker)."""

    def _store_objects(self: "Broker", ident: bytes, msg: protocol.Message, pos: int = 0) -> int:
        for entry in msg.header.get("ob", ()):
            digest, n = entry[0], entry[1]
            obj = self.objects.get(digest)
            if obj is None:
                obj = self.objects[digest] = StoredObject(
                    msg.frames[pos:pos + n], protocol.frame_digests(msg.header, pos, pos + n),
                    name=entry[2] if len(entry) > 2 and isinstance(entry[2], str) else "")
                if self.durable.durable and not digest.startswith(b"R"):
                    self.durable.object_added(digest, obj)  # (a task's result is stored as one)
                for unit in self.parked.pop(digest, ()):
                    if unit.state == PARKED:
                        self._enqueue(unit)
                if digest in self.awaiting_values:  # a dependency's value, asked of its client
                    self._release_dependents(digest, self.awaiting_values.pop(digest))
            obj.owners.add(ident)
            pos += n
        return pos

    def _enqueue(self: "Broker", unit: Unit) -> None:
        """Queue ``unit``, or hold it until what it waits for: its function or
        data, the futures it takes, its time."""
        for ref in unit.refs:
            if ref not in self.objects:
                unit.state = PARKED
                self.parked.setdefault(ref, []).append(unit)
                return
        if unit.due is not None and unit.due > time.time():
            self.timers.hold(unit, unit.due)
            return
        unit.state = QUEUED
        self.queue.append(unit)

    def _admit(self: "Broker", unit: Unit) -> bool:
        """Whether a unit a worker could take may go now (its rate limit allows)."""
        limit = unit.meta.get("rl")
        if limit is None:
            return True
        if unit.admitted:  # released from its line with a token
            unit.admitted = False
            return True
        return self.limits.admit(unit, str(unit.meta.get("nm", "")), *limit)

    def _on_submit(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        frames, header = msg.frames, msg.header
        ident = identity_field(header, "rt", ident)  # results go to the client's receiving socket
        client = self._client(ident)
        cid = header.get("cid")
        if cid is not None:
            if not isinstance(cid, bytes) or len(cid) != 8:
                raise ValueError(f"malformed client id {cid!r}")
            client.cid = cid
        # The client handed these to worker "dw" itself (shoal.direct).
        direct = header.get("dw")
        if direct is not None and not isinstance(direct, str):
            raise ValueError(f"malformed direct worker name {direct!r:.80}")
        # The id base the client named them on: the broker's gives a new one to a client
        # it forgot (it fell silent), which may send some on the old one meanwhile.
        base = header.get("db", client.direct_base)
        if direct is not None and (type(base) is not int or not 0 <= base < 1 << 28):
            raise ValueError(f"malformed direct id base {base!r:.80}")
        done = header.get("do") if direct is not None else None  # outcomes it had already
        if done is not None and (not isinstance(done, list) or not all(
                isinstance(d, list) and len(d) == 4 and type(d[0]) is int
                and isinstance(d[1], str) and type(d[2]) is int and d[2] >= 0
                and isinstance(d[3], dict) for d in done)):
            raise ValueError(f"malformed direct outcomes {done!r:.80}")
        done_tids = {d[0] for d in done} if done else None
        pos = self._store_objects(ident, msg)
        # What its client had of them, by task number: most settle at once, below.
        reported = self._reported(header["u"], done, frames, pos) if done else None
        worker = self._worker_named(direct) if reported else None
        now = time.monotonic()
        durable = self.durable.durable
        for tid, refs, n, meta in header["u"]:
            if not isinstance(meta, dict) or not (refs or isinstance(meta.get("fn"), str)):
                raise ValueError(f"task {tid!r} names no function")
            if type(tid) is not int or not 0 < tid < (1 << 56 if direct is None else TID_MASK + 1):
                raise ValueError(f"malformed task number {tid!r}")
            bid = next(self._ids) if direct is None else direct_bid(base, tid)
            if reported and tid in reported and self._settle_reported(
                    client, worker, bid, tid, meta, reported[tid], now):
                del reported[tid]
                pos += n
                continue
            unit = Unit(bid, ident, tid, refs, frames[pos:pos + n],
                        protocol.frame_digests(header, pos, pos + n), meta, queued_at=now,
                        key=task_key(client.cid, tid) if client.cid else b"")
            pos += n
            if unit.key and self._known_again(client, unit):
                continue  # sent again after a restart: it is here already
            if not _SPECIAL.isdisjoint(meta):
                refusal = self._check_options(unit)
                if refusal is not None:
                    self._send(ident, Kind.RESULTS, {"r": [[tid, "berr", 0, refusal]]})
                    continue
            self.tasks[unit.bid] = unit
            client.tasks[tid] = unit.bid
            if unit.key:
                self._index(unit)
            if durable:
                self.durable.unit_added(unit)
                self.acks.setdefault(ident, []).append(tid)
            if self.watchers:
                self._event("task-received", unit)
            if "dp" in meta and self._held_by_dependencies(unit):
                continue
            if direct is not None and self._start_direct(unit, direct):
                continue
            if done_tids and tid in done_tids:
                # Its worker is gone, yet its client has the outcome: settled below,
                # never run again (its client may not have sent its arguments).
                unit.state = RUNNING
                continue
            self._enqueue(unit)
            if self.workers and (unit.queue != DEFAULT_QUEUE or unit.resources or "fn" in meta
                                 or self._registered_only):
                if self._refuse_pickled(unit):
                    continue
                self._warn_if_unrunnable(client, unit)
        self.counts["submitted"] += len(header["u"])
        if done:
            if reported is None:  # (units of a shape the loop above refused raise there)
                reported = self._reported((), done, frames, pos)
            if reported:
                self._reported_outcomes(base, direct, reported)

    def _check_options(self: "Broker", unit: Unit) -> Optional[dict]:
        """Read a unit's task options; the metadata of its refusal if they are bad,
        or its unique key is taken, or the worker it names does not exist."""
        meta = unit.meta
        try:
            if "q" in meta or "pr" in meta or "rs" in meta:
                unit.queue, unit.priority, unit.resources = unit_route(meta)
            if "at" in meta or "dl" in meta:
                unit.due = due_at(meta)
            if "rl" in meta:
                check_rate(meta["rl"])
        except (TypeError, ValueError) as exc:
            return {"msg": str(exc)}
        target = meta.get("to")
        if target is not None and not any(w.name == target for w in self.workers.values()):
            names = ", ".join(sorted(w.name for w in self.workers.values())) or "none"
            return {"msg": f"no worker is named {target!r} (workers now: {names})"}
        key = meta.get("uq")
        if key is not None:
            if not isinstance(key, str):
                return {"msg": f"malformed unique key {key!r}"}
            holder = self.unique.get(key)
            if holder is not None and self.tasks.get(holder.bid) is holder:
                return {"msg": (f"a task with unique key {key!r} is already {holder.state}: task "
                                f"{task_id(holder.key) if holder.key else holder.bid}; it is "
                                "refused until that one has finished"),
                        "uq": key, "holder": task_id(holder.key) if holder.key else None}
            self.unique[key] = unit
        return None

    def _known_again(self: "Broker", client: ClientRecord, unit: Unit) -> bool:
        """A task its client sends again (it was not acknowledged when the broker
        restarted): adopt the stored one, or answer with its result."""
        existing = self.by_key.get(unit.key)
        if existing is not None and self.tasks.get(existing.bid) is existing:
            existing.client, existing.tid = client.ident, unit.tid
            client.tasks[unit.tid] = existing.bid
        elif self.durable.durable and self._stored_outcome(unit.key) is not None:
            self._send_kept(client.ident, unit.tid, unit.key)
        else:
            return False
        if self.durable.durable:
            self.acks.setdefault(client.ident, []).append(unit.tid)
        return True

    def _refuse_pickled(self: "Broker", unit: Unit) -> bool:
        """Fail a unit of pickled code when every connected worker of its queue refuses
        such code (they run registered tasks only)."""
        if "fn" in unit.meta:
            return False
        target = unit.meta.get("to")
        serving = [w for w in self.workers.values()
                   if (w.name == target if target is not None else unit.queue in w.queues)]
        if not serving or not all(w.registered_only for w in serving):
            return False
        names = sorted({t for w in serving for t in w.task_names})
        where = f"worker {target}" if target is not None else \
            f"every connected worker of queue {unit.queue!r}"
        why = (f"{where} runs registered tasks only "
               "(shoal worker --registered-only) and refuses pickled code: submit a task by "
               "name, e.g. "
               f"client.submit({(names or ['pkg.tasks.resize'])[0]!r}, ...); the workers have "
               f"{', '.join(names) or 'no tasks'}")
        self.tasks.pop(unit.bid, None)
        self.clients[unit.client].tasks.pop(unit.tid, None)
        unit.state = "failed"
        self.counts["failed"] += 1
        self._send(unit.client, Kind.RESULTS, {"r": [[unit.tid, "berr", 0, {"msg": why}]]})
        self._settled(unit, "berr", [], {"msg": why})
        return True

    def _warn_if_unrunnable(self: "Broker", client: ClientRecord, unit: Unit) -> None:
        """Tell a client, once per kind of need, that no connected worker can take its task."""
        needs = describe_route(unit)
        if needs in client.warned or runnable_somewhere(unit, self.workers.values()):
            return
        client.warned.add(needs)
        self._send(client.ident, Kind.NOTICE, {"msg": (
            f"no connected worker serves {needs}: the task waits until one joins "
            f"(start one with `{worker_command(unit)}`); `shoal status` lists such tasks")})

    def _expire_parked(self: "Broker") -> None:
        now = time.monotonic()
        for digest, units in list(self.parked.items()):
            expired = [u for u in units if now - u.queued_at > PARK_SECONDS]
            if not expired:
                continue
            self.parked[digest] = [u for u in units if u not in expired]
            if not self.parked[digest]:
                del self.parked[digest]
            why = (f"the function or scattered data of this task never reached the broker "
                   f"within {PARK_SECONDS:g} s (was the broker restarted?)")
            by_client: dict[bytes, list] = {}
            for unit in expired:
                if self.tasks.pop(unit.bid, None) is not None:
                    unit.state = "failed"
                    by_client.setdefault(unit.client, []).append(unit.tid)
                    self._settled(unit, "berr", [], {"msg": why})
            for client, tids in by_client.items():
                self._send(client, Kind.ERROR, {"msg": why, "t": tids})

    def _on_scatter(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        ident = identity_field(msg.header, "rt", ident)
        self._client(ident)
        failed = msg.header.get("failed")
        if failed is not None:  # the answer to NEED: that dependency did not succeed
            key, why = failed
            if isinstance(key, bytes) and isinstance(why, str):
                self._value_failed(key, why)
            return
        self._store_objects(ident, msg)
