"""A durable broker's restart (``shoal broker --store``): what it stored is
loaded, and the clients of its previous run take their tasks back (a mixin of
:class:`~shoal.broker.Broker`)."""
from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

from . import protocol
from .locks import Owner
from .protocol import Kind
from .records import ORPHANED, StoredObject, Unit, task_key

if TYPE_CHECKING:
    from .broker import Broker

logger = logging.getLogger(__name__)


class Recovery:
    """Loading the store at start, and clients of the previous run resuming (a mixin of Broker)."""

    # -- durable state
    def _restore(self: "Broker") -> None:
        """Load what a durable broker stored before it stopped (--store)."""
        store = self.durable
        self._restored_at = time.monotonic()
        for digest, frames, digests in store.objects():
            obj = self.objects[digest] = StoredObject(frames, digests)
            obj.owners.add(ORPHANED)  # until no task uses it, or its client is back
        for key, status, frames, meta, digests, at in store.results(time.time() - self.kept.ttl):
            if "m" not in meta:
                self.kept.put(key, status, frames, meta, digests, at)
        units = []
        for row in store.units():
            cid, tid = row["cid"], row["tid"]
            unit = Unit(row["bid"], b"", tid, row["refs"], row["frames"], row["digests"],
                        row["meta"], queued_at=time.monotonic(),
                        key=task_key(cid, tid) if cid else b"", due=row["due"])
            self._check_options(unit)  # routing and unique keys, as at submit
            self.tasks[unit.bid] = unit
            if unit.key:
                self._index(unit)
            units.append(unit)
        if units:  # this run's ids must not meet the stored ones
            self._ids = itertools.count(max(u.bid for u in units) + (1 << 20))
        for unit in units:
            if "dp" in unit.meta and self._held_by_dependencies(unit):
                continue
            self._enqueue(unit)
        for body in store.schedules():
            self._restore_schedule(body)
        for name, holder in store.locks():
            self.locks.restore(name, Owner(holder["tok"], b"", cid=holder["cid"],
                                           worker=holder["worker"], unit=holder["unit"],
                                           describe=holder["describe"]))
        logger.info("store %s: %d queued task(s), %d result(s), %d schedule(s), %d lock(s) "
                    "restored", store.path, len(units), len(self.kept), len(self.schedules),
                    len(self.locks))

    def _on_resume(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        """A client of the broker's previous run is back (a durable broker restarted):
        its tasks in ``t`` are sent to it from now on; finished ones' outcomes at once."""
        h = msg.header
        cid, tids = h.get("cid"), h.get("t", [])
        if not isinstance(cid, bytes) or len(cid) != 8 or not isinstance(tids, list):
            raise ValueError("malformed resume request")
        client = self._client(ident)
        client.cid = cid
        lost = []
        for tid in tids:
            if type(tid) is not int or not 0 < tid < 1 << 56:
                continue
            key = task_key(cid, tid)
            unit = self._unit_of(key)
            if unit is not None:
                unit.client = ident
                client.tasks[tid] = unit.bid
            elif self._stored_outcome(key) is not None:
                self._send_kept(ident, tid, key)
            else:
                lost.append(tid)
        logger.info("client %s resumed %d task(s) after the restart (%d unknown)", cid.hex(),
                    len(tids) - len(lost), len(lost))
        self._send(ident, Kind.REPLY, {"rq": h.get("rq"), "lost": lost})
