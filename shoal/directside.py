"""The broker's side of the direct path (:mod:`shoal.direct`): what it offers
clients, and the units clients hand straight to workers (a mixin of
:class:`~shoal.broker.Broker`).

Such a unit is recorded as running on its worker, never dispatched; its
frames are kept, so it runs again elsewhere should that worker die.  A
worker's result, retry or bounce of it may come before the client's
submission does: it is held (:class:`~shoal.direct.Early`) and replayed then.
Its outcome may come twice, from the worker and from the client that had it:
the first settles it, the other is dropped (a third is a counted duplicate).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from . import protocol
from .direct import WORKER_OPTIONS, direct_bid
from .protocol import Kind
from .records import COUNTED, DEFAULT_QUEUE, RUNNING, ClientRecord, Unit, task_key

if TYPE_CHECKING:
    from .broker import Broker


class DirectUnits:
    """Direct endpoints offered, direct units recorded (a mixin of Broker)."""

    def _direct_offer(self: "Broker", client: ClientRecord) -> dict:
        """The fields of a WELCOME or HEARTBEAT that let a local client go direct:
        its id base, and the workers with a direct endpoint (none on a Curve-secured
        or durable broker: there every task goes through the broker)."""
        if self.allow is not None or self.durable.durable:
            return {}
        return {"db": client.direct_base,
                "dx": [[w.name, w.direct, w.host] for w in self.workers.values()
                       if w.direct and DEFAULT_QUEUE in w.queues and not w.registered_only]}

    def _start_direct(self: "Broker", unit: Unit, name: str) -> bool:
        """Record ``unit``, handed by its client to worker ``name``, as running there.

        False (the caller queues it as usual) when that worker is gone or bounced it.
        """
        early = self.early.pop(unit.bid)
        worker = self._worker_named(name)
        if worker is None or (early is not None and early[1][1] == "bounce"):
            return False
        unit.state, unit.worker = RUNNING, worker.ident
        worker.start(unit)
        if self.watchers:
            self._event("task-started", unit, worker=worker.name)
        if early is not None:
            ident, entry, frames, digests, _ = early
            header = {"r": [entry]}
            if digests:
                header["bd"] = dict(digests)
            self._on_results(ident, protocol.Message(Kind.RESULTS, header, frames))
        return True

    def _reported(self: "Broker", units, done: list, frames: list, pos: int) -> Optional[dict]:
        """``{task number: (status, frames, meta)}`` of the outcomes a client's copy brought
        (``do``: their frames follow those of ``units``, which begin at ``pos``); None
        when ``units`` are of a shape the caller will refuse."""
        for unit in units:
            if not (isinstance(unit, list) and len(unit) == 4 and type(unit[2]) is int
                    and unit[2] >= 0):
                return None
            pos += unit[2]
        outcomes = {}
        for tid, status, n, meta in done:
            outcomes[tid] = (status, frames[pos:pos + n], meta)
            pos += n
        return outcomes

    def _settle_reported(self: "Broker", client: ClientRecord, worker, bid: int, tid: int,
                         unit_meta: dict, outcome: tuple, now: float) -> bool:
        """Settle at once a direct unit that its client's copy brings with its outcome:
        its result kept and counted as a unit's would be, no unit made, queued, started
        and settled (the broker's CPU a direct round trip: ~20 -> ~11 us).

        False, for the caller to take the usual path, when anything more is asked of
        it: events watched, a request for it by id waiting, a message of its worker's
        come early, task options, a result in shared memory, its worker gone.
        """
        status, frames, meta = outcome
        key = task_key(client.cid, tid) if client.cid else b""
        if (worker is None or self.watchers or status not in ("ok", "err") or "sb" in meta
                or bid in self.early or not WORKER_OPTIONS.issuperset(unit_meta)
                or (key and (key in self.fetches or key in self.by_key))):
            return False
        meta.pop("dd", None)
        self.early.finished(bid)
        worker.done += 1
        worker.progress_at = now
        t = meta.get("t")
        if t is not None:
            worker.observe(t)
        self.counts[COUNTED[status]] += 1
        meta["w"] = worker.name
        if key and "m" not in unit_meta:  # (a map's batch is its client's to read)
            self._keep_by_id(key, status, frames, meta, {})
        return True

    def _reported_outcomes(self: "Broker", base: int, name: str, outcomes: dict) -> None:
        """Outcomes of direct units that their client had before it told the broker of
        them and that were not settled at once (see _settle_reported): settled now, so
        that client sees them done (and their results kept) at once."""
        worker = self._worker_named(name)
        entries, kept = [], []
        for tid, (status, frames, meta) in outcomes.items():
            bid = direct_bid(base, tid)
            unit = self.tasks.get(bid)
            # (One queued again, its worker gone before the broker heard of it, runs
            # again and settles then: it may not be taken from the queue here.)
            if unit is None or unit.state == RUNNING:
                entries.append([bid, status, len(frames), meta])
                kept.extend(frames)
        if entries:
            self._on_results(worker.ident if worker is not None else b"",
                             protocol.Message(Kind.RESULTS, {"r": entries}, kept))

    def _bounced(self: "Broker", bid: int, worker) -> None:
        """A worker was busy when a direct unit reached it: queue the unit as usual."""
        unit = self.tasks.get(bid)
        if unit is None or unit.state != RUNNING or worker is None or unit.worker != worker.ident:
            return
        worker.finish(bid)
        unit.worker = None
        self._enqueue(unit)

    def _worker_named(self: "Broker", name: str):
        for worker in self.workers.values():
            if worker.name == name:
                return worker
        return None
