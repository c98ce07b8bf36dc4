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

from typing import TYPE_CHECKING

from . import protocol
from .direct import direct_bid
from .protocol import Kind
from .records import DEFAULT_QUEUE, RUNNING, ClientRecord, Unit

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

    def _reported_outcomes(self: "Broker", base: int, name: str, done: list,
                           frames: list) -> None:
        """Outcomes of direct units that their client had before it told the broker of
        them (``do``, frames after the units'): settled now, so that client sees them
        done (and their results kept) at once, not when the worker's copy comes."""
        worker = self._worker_named(name)
        entries, kept, pos = [], [], 0
        for tid, status, n, meta in done:
            bid = direct_bid(base, tid)
            unit = self.tasks.get(bid)
            # (One queued again, its worker gone before the broker heard of it, runs
            # again and settles then: it may not be taken from the queue here.)
            if unit is None or unit.state == RUNNING:
                entries.append([bid, status, n, meta])
                kept.extend(frames[pos:pos + n])
            pos += n
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
