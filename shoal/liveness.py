"""Lost workers and silent clients: detection, requeueing, poison tasks.

Defaults (all documented in docs/reliability.md):

* a worker heartbeats every second (its control thread, even mid-task); the
  broker declares it lost after :data:`WORKER_TIMEOUT` seconds of silence,
  or at once when a local cluster sees its process exit;
* a lost worker's running tasks go back to the head of the queue; a task
  that was running on :data:`ALLOWED_FAILURES` workers when they died fails
  with :class:`shoal.WorkerLost` instead of killing more of them;
* a client heartbeats every second; the broker forgets a client silent for
  :data:`CLIENT_TIMEOUT` seconds and drops its queued tasks, except those of
  keyed maps, whose results it keeps for the client's return;
* on a Curve-secured broker, a worker whose key is revoked is deregistered at
  once (its first message after, or the next tick) and what it held is requeued
  without counting against it, so it is sent no task from then on.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from . import protocol
from .protocol import Kind
from .records import (ORPHANED, PARKED, QUEUED, RUNNING, WAITING_STATES, Unit,
                      WorkerRecord)

if TYPE_CHECKING:
    from .broker import Broker

logger = logging.getLogger(__name__)

WORKER_TIMEOUT = 5.0
CLIENT_TIMEOUT = 60.0
ALLOWED_FAILURES = 3


class Liveness:
    """The broker's handling of workers and clients that go away (a mixin of Broker)."""

    allowed_failures: int = ALLOWED_FAILURES
    worker_timeout: float = WORKER_TIMEOUT
    client_timeout: float = CLIENT_TIMEOUT

    def _check_liveness(self: "Broker", now: float) -> None:
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if silent > self.worker_timeout:
                self._lose_worker(worker, f"no heartbeat for {silent:.1f} s")
        for ident, client in list(self.clients.items()):
            if now - client.last_seen > self.client_timeout:
                logger.info("client %s silent for %.0f s: forgetting it", ident.hex(),
                            now - client.last_seen)
                self._forget_client(ident)

    def _lose_worker(self: "Broker", worker: WorkerRecord, reason: str) -> None:
        """A worker died or went silent: requeue or fail what it was running."""
        if self.workers.get(worker.ident) is not worker:
            return
        del self.workers[worker.ident]
        self._workers_changed()
        if self.watchers:
            self._event("worker-lost", worker=worker.name, why=reason)
        logger.warning("worker %s lost (%s); %d task(s) it held go back to the queue",
                       worker.name, reason, len(worker.running))
        self.counts["workers_lost"] = self.counts.get("workers_lost", 0) + 1
        self._fail_addressed_to(worker, f"worker {worker.name} was lost ({reason})")
        self._requeue(worker, reason)

    def _requeue(self: "Broker", worker: WorkerRecord, reason: str = "") -> None:
        """Put a departed worker's units back at the head of the queue, oldest first.

        With a ``reason`` (the worker died) the units it was running count a
        failure; those at the limit fail with WorkerLost instead.
        """
        for rid, request in list(self.cancels.items()):
            if worker.ident in request.workers:
                self._cancel_answered(rid, worker.ident)
        units = sorted((u for u in worker.clear() if u.bid in self.tasks), key=lambda u: u.bid)
        # Charge the death only where the culprit is certain: a worker holding
        # one unit.  Holding several (prefetched, or results not yet flushed),
        # none is charged.  Either way each becomes a suspect that runs alone
        # from then on, so every later death is attributed exactly.  Blame stays exact (no
        # innocent task fails) at the cost of at most one uncharged death.
        charged = units if reason and len(units) == 1 else []
        poisoned = []
        for unit in reversed(units):
            if reason:
                unit.suspect = True
            if unit in charged:
                unit.failures = (unit.failures or []) + [[worker.name, reason]]
                if len(unit.failures) >= self.allowed_failures:
                    poisoned.append(unit)
                    continue
            unit.state, unit.worker = QUEUED, None
            self.queue.appendleft(unit)
        if poisoned:
            self._deliver_lost(poisoned)

    def _deliver_lost(self: "Broker", units: list) -> None:
        """Fail units with status "lost"; the client raises WorkerLost from ``meta["lost"]``."""
        by_client: dict[bytes, list] = {}
        for unit in units:
            self.tasks.pop(unit.bid, None)
            unit.state = "failed"
            self.counts["failed"] += 1
            meta = {"lost": unit.failures, "w": unit.failures[-1][0]}
            by_client.setdefault(unit.client, []).append([unit.tid, "lost", 0, meta])
            self._keep_result(unit, "lost", [], {"lost": unit.failures})
            self._settled(unit, "lost", [], meta)
        for client, entries in by_client.items():
            self._send(client, Kind.RESULTS, {"r": entries})

    def _fail_addressed_to(self: "Broker", worker: WorkerRecord, why: str = "") -> None:
        """Units addressed to a worker that left cannot run anywhere else: fail them."""
        doomed: list[Unit] = []
        for unit in list(self.tasks.values()):
            if unit.meta.get("to") == worker.name and unit.state in (QUEUED, PARKED, RUNNING):
                worker.finish(unit.bid)
                unit.failures = (unit.failures or []) + [[worker.name, why or "it left"]]
                doomed.append(unit)
        if doomed:
            self._deliver_lost(doomed)

    def _check_revoked(self: "Broker") -> None:
        """Deregister workers whose key left the allow-list (each tick: a lookup per worker)."""
        for worker in list(self.workers.values()):
            if worker.key is not None and self.allow.name_of(worker.key) is None:
                self._revoke_worker(worker)

    def _deregister_revoked(self: "Broker", ident: bytes) -> None:
        """A message came from a socket whose key was revoked: forget its worker or client."""
        for worker in list(self.workers.values()):
            if ident in (worker.ident, worker.control):
                self._revoke_worker(worker)
        if ident in self.clients:
            logger.warning("client %s: its key was revoked; forgetting it", ident.hex())
            self._forget_client(ident)

    def _revoke_worker(self: "Broker", worker: WorkerRecord) -> None:
        if self.workers.get(worker.ident) is not worker:
            return
        del self.workers[worker.ident]
        logger.warning("worker %s: its key was revoked; deregistered, and the %d task(s) it "
                       "held go back to the queue", worker.name, len(worker.running))
        self._fail_addressed_to(worker, f"the key of worker {worker.name} was revoked")
        self._requeue(worker)  # no reason given: its tasks are not to blame

    def _on_worker_lost(self: "Broker", ident: bytes, msg) -> None:
        """A local cluster saw a worker process exit: act now, not after the timeout."""
        name = msg.header["name"]
        for worker in list(self.workers.values()):
            if worker.name == name:
                self._lose_worker(worker, str(msg.header.get("why", "its process exited")))

    def _note_heartbeat(self: "Broker", worker: WorkerRecord, header: dict) -> None:
        worker.last_seen = time.monotonic()
        running = header.get("running")
        if isinstance(running, list):
            worker.reported = running

    # ------------------------------------------------------------ clients that leave
    def _outlives_client(self: "Broker", unit: Unit) -> bool:
        """Tasks that stay queued when their client leaves, their results kept for
        whoever asks (client.result, client.results): keyed maps, timed tasks
        (delay, at), and every task of a broker with --store (durable queues)."""
        return (self.durable.durable or "k" in unit.meta or "at" in unit.meta
                or "dl" in unit.meta)

    def _on_client_bye(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        self._forget_client(ident)

    def _forget_client(self: "Broker", ident: bytes) -> None:
        """Drop a client that left: its queued tasks go too, unless they outlive
        it (see _outlives_client); the objects those use stay while they do."""
        client = self.clients.pop(ident, None)
        self.watchers.pop(ident, None)
        if client is None:
            return
        kept: set = set()
        for bid in client.tasks.values():
            unit = self.tasks.get(bid)
            if unit is None:
                continue
            if self._outlives_client(unit) or unit.state not in WAITING_STATES:
                kept.update(unit.refs)
            else:
                del self.tasks[bid]
                unit.state = "cancelled"
                self._settled(unit, "cancelled")
        released = []
        for digest, obj in list(self.objects.items()):
            obj.owners.discard(ident)
            if digest in kept:
                obj.owners.add(ORPHANED)  # until no task uses it (_collect_orphans)
            elif not obj.owners:
                del self.objects[digest]
                released.append(digest)
        self._release_objects(released)

    def _collect_orphans(self: "Broker") -> None:
        """Forget objects of departed clients that no task uses any more."""
        orphans = {d for d, obj in self.objects.items() if obj.owners == {ORPHANED}}
        if not orphans:
            return
        for unit in self.tasks.values():
            orphans.difference_update(unit.refs)
            if not orphans:
                return
        for digest in orphans:
            del self.objects[digest]
        self._release_objects(list(orphans))

    def _release_objects(self: "Broker", released: list) -> None:
        """Tell the workers holding these objects to drop them."""
        for digest in released:
            self.durable.object_removed(digest)
        if released:
            for w in self.workers.values():
                if w.objects.intersection(released):
                    w.objects.difference_update(released)
                    self._send(w.ident, Kind.TASKS, {"u": [], "fg": released})

    # -- workers
