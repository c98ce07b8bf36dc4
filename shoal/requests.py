"""Requests clients make of the broker beyond submitting (a mixin of Broker):
cancelling tasks, the cluster's status, and re-attaching to keyed maps."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from . import protocol
from .protocol import Kind, identity_field
from .records import RUNNING, WAITING, WAITING_STATES, CancelRequest, Unit
from .routing import unrunnable

if TYPE_CHECKING:
    from .broker import Broker

logger = logging.getLogger("shoal.broker")


class Requests:
    """Cancel, status and attach (see the module docstring)."""

    def _on_cancel(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        """Withdraw tasks not yet started: queued here, or prefetched by a worker."""
        header = msg.header
        ident = identity_field(header, "rt", ident)
        client = self._client(ident)
        request = CancelRequest(ident, header.get("rq"), time.monotonic())
        running_too = bool(header.get("r", True))
        forward: dict[bytes, list] = {}
        tids = header.get("t")
        if not isinstance(tids, list) or not all(type(tid) is int for tid in tids):
            # Answered as naming no task, so the client is not left waiting.
            logger.warning("a cancel request naming %.80r (not a list of task numbers) from %s: "
                           "answered as naming none", tids, ident.hex())
            tids = []
        for tid in tids:
            bid = client.tasks.get(tid)
            unit = self.tasks.get(bid) if bid is not None else None
            if unit is None:
                continue
            if unit.state in WAITING_STATES:
                del self.tasks[bid]
                del client.tasks[tid]
                unit.state = "cancelled"  # left where it waited; skipped when reached
                request.withdrawn.append(tid)
                self._settled(unit, "cancelled")
            elif unit.state == RUNNING and unit.worker in self.workers:
                forward.setdefault(unit.worker, []).append(bid)
        if not forward:
            self._finish_cancel(request)
            return
        rid = next(self._ids)
        request.workers = set(forward)
        self.cancels[rid] = request
        for worker, bids in forward.items():
            record = self.workers[worker]
            self._send(record.control or worker, Kind.CANCEL, {"b": bids, "rq": rid, "r": running_too})

    def _on_worker_cancelled(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        """A worker's answer: units it withdrew before they started (``b``) and running
        units it interrupted (``i``; their results, status "cancelled", follow)."""
        worker = self._worker_of(ident, msg.header)
        request = self.cancels.get(msg.header.get("rq"))
        if request is not None and worker is not None:
            for bid in msg.header.get("i", ()):
                unit = worker.running.get(bid)
                if unit is not None:
                    request.withdrawn.append(unit.tid)
                    request.interrupted += 1
        for bid in msg.header["b"]:
            unit = worker.finish(bid) if worker else None
            if unit is None or self.tasks.pop(bid, None) is None:
                continue
            client = self.clients.get(unit.client)
            if client is not None:
                client.tasks.pop(unit.tid, None)
            unit.state = "cancelled"
            self._settled(unit, "cancelled")
            if request is not None:
                request.withdrawn.append(unit.tid)
        if request is not None and worker is not None:
            self._cancel_answered(msg.header["rq"], worker.ident)

    def _cancel_answered(self: "Broker", rid: int, worker: bytes) -> None:
        request = self.cancels[rid]
        request.workers.discard(worker)
        if not request.workers:
            del self.cancels[rid]
            self._finish_cancel(request)

    def _finish_cancel(self: "Broker", request: "CancelRequest") -> None:
        self.counts["cancelled"] += len(request.withdrawn) - request.interrupted
        self._send(request.client, Kind.CANCELLED, {"t": request.withdrawn, "rq": request.rq})

    def _on_status(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        self._client(ident)
        running = sum(len(w.running) for w in self.workers.values())
        reply = {
            **self._summary(),
            "address": self.address,
            "uptime": time.time() - self.started,
            "queued": len(self.tasks) - running,
            "running": running,
            # (of the queued: held for their time, waiting for others' results, for a token)
            "scheduled": len(self.timers),
            "waiting": sum(1 for u in self.by_key.values() if u.state == WAITING),
            "rate_limited": self.limits.waiting(),
            "clients": len(self.clients),
            "counts": self.counts,
            "kept_results": self.results.summary(),  # keyed maps
            "task_results": self.kept.summary(),
            "worker_list": [
                {"name": w.name, "slots": w.slots, "running": len(w.running), "done": w.done,
                 "host": w.host.split(":")[0], "pid": w.pid,
                 "mean_task_ms": None if w.mean_time is None else round(w.mean_time * 1000, 3),
                 "prefetch": w.prefetch,  # units it may hold beyond its slots now
                 "queues": sorted(w.queues), "resources": w.resources,
                 "tasks": sorted({self._task_name(u) for u in w.running.values()})[:8]}
                for w in self.workers.values()],
            "queues": self._queue_counts(),
            "unrunnable": self._unrunnable(),
            "locks": self.locks.summary(),
            "schedules": len(self.schedules),
            "schedule_list": [s.describe() for s in sorted(self.schedules.by_name.values(),
                                                           key=lambda s: s.next_run)][:20],
            "stored": self.durable.counts() if self.durable.durable else None,
            "watchers": [{"unacked": w.unacked, "dropped": w.dropped}
                         for w in self.watchers.values()],
        }
        self._send(ident, Kind.STATUS_REPLY, reply)

    def _queue_counts(self) -> dict:
        """``{queue: {"queued": n, "running": n}}`` for the queues in use."""
        counts: dict = {}
        for unit in self.tasks.values():
            entry = counts.setdefault(unit.queue, {"queued": 0, "running": 0})
            entry["running" if unit.state == RUNNING else "queued"] += 1
        return counts

    def _unrunnable(self) -> list:
        return unrunnable(self.queue.queued(), self.workers.values())

    def _on_attach(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        """What exists of a keyed map: finished parts (with their results) and
        parts still queued or running, which this client adopts: their results
        now come to it, under task id ``-bid``."""
        header = msg.header
        key = header["key"]
        if not isinstance(key, str):
            raise ValueError("a map key must be a string")
        client = self._client(ident)
        if header.get("drop"):
            self.results.drop(key)
            self._send(ident, Kind.ATTACHED, {"rq": header.get("rq"), "done": [], "running": []})
            return
        entries, frames, digests = [], [], {}
        for part in self.results.get(key):
            for i, d in part.digests.items():
                digests[len(frames) + i] = d
            frames.extend(part.frames)
            entries.append([part.start, part.count, part.status, len(part.frames), part.meta])
        running = []
        for unit in list(self.tasks.values()):
            if unit.meta.get("k") != key:
                continue
            previous = self.clients.get(unit.client)
            if previous is not None:
                previous.tasks.pop(unit.tid, None)
            unit.client, unit.tid = ident, -unit.bid
            client.tasks[unit.tid] = unit.bid
            running.append([unit.meta.get("ks", 0), unit.meta.get("n", 1), unit.tid])
        self._send(ident, Kind.ATTACHED, {"rq": header.get("rq"), "done": entries,
                                          "running": running}, frames, digests)

    def _keep_result(self: "Broker", unit: Unit, status: str, frames: list, meta: dict,
                     digests: Optional[dict] = None) -> None:
        """Results of keyed maps are kept, so a client can re-attach after a restart."""
        key = unit.meta.get("k")
        if key is not None:
            self.results.put(key, unit.meta.get("ks", 0), unit.meta.get("n", 1), status,
                             frames, meta, digests or {})

    # ------------------------------------------------------------ dispatch
