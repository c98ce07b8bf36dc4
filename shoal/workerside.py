"""The broker's side of its workers: registration, heartbeats, units handed
out by credit, results taken back (a mixin of :class:`~shoal.broker.Broker`).

What happens when a worker dies or goes silent is :mod:`shoal.liveness`.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from . import protocol
from .direct import DIRECT_BIT, SCHEME as DIRECT_SCHEME
from .protocol import Kind, identity_field
from .records import (BATCH_AHEAD_SECONDS, COUNTED, DEFAULT_QUEUE, QUEUED, RUNNING, ClientRecord, Unit,
                      WorkerRecord)
from .routing import parse_resources

if TYPE_CHECKING:
    from .broker import Broker

logger = logging.getLogger(__name__)


def _worker_label(worker: Optional[WorkerRecord]) -> str:
    """How an outcome names the worker that sent it."""
    return worker.name if worker is not None else "a worker no longer registered"


class WorkerSide:
    """Workers joining and leaving, units sent to them, their results (a mixin of Broker)."""

    def _on_worker_hello(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        h = msg.header
        sender = ident
        # A worker re-registering after a broker restart says hello from its
        # control socket, naming its main socket (``wid``), where tasks go.
        ident = identity_field(h, "wid", ident)
        control = identity_field(h, "ctl", None)
        old = self.workers.get(ident)
        if old is not None and old.control == control and old.pid == h.get("pid"):
            # The same process again (heartbeats queued while the broker was down each
            # asked it to register): it holds what it held; just welcome it.
            self._send(ident, Kind.WELCOME, {"name": old.name, "session": self.session})
            return
        slots = h.get("slots", 1)
        if not isinstance(slots, int) or not 1 <= slots <= 100_000:
            raise ValueError(f"worker announced {slots!r} slots")
        name = str(h.get("name") or f"worker-{h.get('pid')}")
        taken = {w.name for w in self.workers.values() if w.ident != ident}
        base, n = name, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        queues = h.get("qs", [DEFAULT_QUEUE])
        if (not isinstance(queues, list) or not queues
                or not all(isinstance(q, str) and q for q in queues)):
            raise ValueError(f"worker announced queues {queues!r}")
        resources = parse_resources(h.get("rs") or {})
        direct = h.get("dx", "")
        if not isinstance(direct, str) or (direct and not direct.startswith(DIRECT_SCHEME)):
            raise ValueError(f"worker announced direct endpoint {direct!r:.80}")
        task_names = h.get("tk", [])
        if not isinstance(task_names, list) or not all(isinstance(t, str) for t in task_names):
            raise ValueError(f"worker announced tasks {task_names!r}")
        if not self._send(ident, Kind.WELCOME, {"name": name, "session": self.session}):
            # Its main socket has not reconnected yet (its control socket spoke for
            # it): tasks sent there would be lost.  Register it once it can be reached.
            self.unreachable[ident] = (sender, msg, time.monotonic())
            return
        self.unreachable.pop(ident, None)
        old = self.workers.pop(ident, None)
        if old is not None:
            self._requeue(old)  # it restarted its session: what it held never ran
        self.workers[ident] = WorkerRecord(ident, name, slots, str(h.get("host", "")),
                                           int(h.get("pid", 0)), last_seen=time.monotonic(),
                                           control=control, key=self._peer_key,
                                           queues=frozenset(queues), resources=resources,
                                           task_names=frozenset(task_names),
                                           registered_only=bool(h.get("ro")), direct=direct)
        self._workers_changed()
        self._tell_clients_of_workers()
        if self.announce_workers:
            self._announce(name)
        if self.watchers:
            self._event("worker-joined", worker=name, slots=slots, queues=queues)
        logger.info("worker %s joined with %d slot(s)%s%s%s", name, slots,
                    "" if queues == [DEFAULT_QUEUE] else f", queues {','.join(queues)}",
                    f", resources {_format_resources(resources)}" if resources else "",
                    f", {len(task_names)} named task(s)" + (
                        ", registered tasks only" if h.get("ro") else "") if task_names else "")

    def _announce(self: "Broker", name: str) -> None:
        """Tell the launcher that started this broker that a worker joined (see
        ``shoal broker --announce-workers``); it stops reading once all have."""
        self.announce_workers -= 1
        try:
            print(f"SHOAL-WORKER {name}", flush=True)
        except (OSError, ValueError):  # the launcher is gone, or its pipe is closed
            self.announce_workers = 0

    def _retry_unreachable(self: "Broker") -> None:
        """Register workers whose main socket could not be reached at their hello."""
        now = time.monotonic()
        for ident, (sender, msg, since) in list(self.unreachable.items()):
            if now - since > self.worker_timeout:
                del self.unreachable[ident]
                logger.warning("worker %s said hello but its task socket never became reachable",
                               msg.header.get("name"))
            else:
                self._on_worker_hello(sender, msg)

    def _workers_changed(self: "Broker") -> None:
        """A worker joined or left: what every client was told about unrunnable tasks may
        no longer hold."""
        self._registered_only = any(w.registered_only for w in self.workers.values())
        for client in self.clients.values():
            client.warned.clear()

    def _on_worker_bye(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        worker = self.workers.pop(ident, None)
        if worker is not None:
            self._workers_changed()
            if self.watchers:
                self._event("worker-left", worker=worker.name)
            logger.info("worker %s left", worker.name)
            self._fail_addressed_to(worker)
            self._requeue(worker)

    def _send_heartbeat(self: "Broker", client: ClientRecord) -> None:
        """What a client learns of the cluster: its workers, their hosts, the direct path."""
        self._send(client.ident, Kind.HEARTBEAT, {**self._summary(),
                                                  "store": self.durable.store_id,
                                                  **self._direct_offer(client)})

    def _tell_clients_of_workers(self: "Broker") -> None:
        """A worker joined: tell every client now, not at its next heartbeat (a cluster's
        first client connects while its workers start, and would neither go direct nor
        use shared memory with them until then)."""
        for client in list(self.clients.values()):
            self._send_heartbeat(client)

    def _worker_of(self: "Broker", ident: bytes, header: dict) -> Optional[WorkerRecord]:
        """The worker a message speaks for: its main socket, or its control socket (``wid``)."""
        worker = self.workers.get(identity_field(header, "wid", ident))
        if worker is not None and ident not in (worker.ident, worker.control):
            return None  # a control message must come from that worker's control socket
        return worker

    def _on_heartbeat(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        header = msg.header
        if "wid" not in header:  # a client's: answer, so it knows this broker is alive
            self._send_heartbeat(self._client(ident))
            return
        worker = self._worker_of(ident, header)
        if worker is not None:
            self._note_heartbeat(worker, header)
        elif identity_field(header, "wid", None) not in self.workers:
            # A worker this broker does not know (it restarted, or declared the worker
            # lost): ask it to register.  (Naming the heartbeat's registration: the
            # worker ignores the asking of one it sent before it registered again.)
            self._send(ident, Kind.WELCOME, {"rehello": True, "rg": header.get("rg")})

    def _on_output(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        """What a running task printed: pass it on to the task's client."""
        worker = self._worker_of(ident, msg.header)
        unit = worker.running.get(msg.header["b"]) if worker is not None else None
        if unit is None:
            return  # finished meanwhile: its result carries all of its output
        worker.last_seen = time.monotonic()
        fields = {"t": unit.tid}
        for stream in ("o", "e"):
            if stream in msg.header:
                fields[stream] = msg.header[stream]
        self._send(unit.client, Kind.OUTPUT, fields)

    def _on_results(self: "Broker", ident: bytes, msg: protocol.Message) -> None:
        # Results are matched by task, whoever sends them: a worker declared
        # lost that was only slow may still deliver first.  The first result
        # wins; any later one for the same task is a counted duplicate.
        header, frames = msg.header, msg.frames
        worker = self.workers.get(ident)
        if worker is None and "wid" in header:  # bounces a busy worker's control thread sent
            worker = self._worker_of(ident, header)
        now = time.monotonic()
        if worker is not None:
            worker.last_seen = now
        outgoing: dict[bytes, tuple[list, list, dict]] = {}
        settled = []
        pos = 0
        # Per message, not per unit (a burst's results come ~100 a message).
        tasks, clients, counts = self.tasks, self.clients, self.counts
        label = _worker_label(worker)
        big = "bd" in header  # large frames: their digests re-indexed per unit
        finished = 0
        for bid, status, n, meta in header["r"]:
            start, pos = pos, pos + n
            direct = bid >= DIRECT_BIT
            if direct and bid not in tasks:
                if self.early.late(bid):
                    self.counts["duplicates"] += 1
                else:  # it beat its client's submission: held until that comes
                    self.early.hold(ident, [bid, status, n, meta], frames[start:pos],
                                    protocol.frame_digests(header, start, pos))
                continue
            if status == "retry":
                self._retry_later(bid, meta, worker)
                continue
            if status == "bounce":
                self._bounced(bid, worker)
                continue
            unit = tasks.pop(bid, None)
            if unit is None:
                counts["duplicates"] += 1
                continue
            # Its client's copy of an outcome it has: kept, not sent on.
            delivered = meta.pop("dd", 0)
            if direct:
                self.early.finished(bid)
            if unit.worker:
                holder = worker if worker is not None and unit.worker == worker.ident \
                    else self.workers.get(unit.worker)
                if holder is not None:
                    holder.finish(bid)
            client = clients.get(unit.client)
            if client is not None:
                client.tasks.pop(unit.tid, None)
            unit.state = "done"
            if worker is not None:
                finished += 1
                t = meta.get("t")
                if t is not None:
                    worker.observe(t)  # per unit: prefetch counts units, batches included
            counts[COUNTED.get(status, "failed")] += 1
            meta["w"] = label
            unit_frames = frames[start:pos]
            unit_digests = protocol.frame_digests(header, start, pos) if big else {}
            if "k" in unit.meta:
                self._keep_result(unit, status, unit_frames, meta, unit_digests)
            settled.append((unit, status, unit_frames, meta, unit_digests))
            if delivered:
                continue
            parts = outgoing.get(unit.client)
            if parts is None:
                parts = outgoing[unit.client] = ([], [], {})
            entries, out_frames, digests = parts
            base = len(out_frames)
            for i, d in unit_digests.items():
                digests[base + i] = d
            out_frames.extend(unit_frames)
            entries.append([unit.tid, status, n, meta])
        if finished:
            worker.done += finished
            worker.progress_at = now
        for client, (entries, out_frames, digests) in outgoing.items():
            if client:  # (none for a periodic run, or a restored task not yet resumed)
                self._send(client, Kind.RESULTS, {"r": entries}, out_frames, digests)
        # After the results themselves: a dependent's failure then reaches a
        # client that already has the exception it names.
        for outcome in settled:
            self._settled(*outcome)

    def _retry_later(self: "Broker", bid: int, meta: dict, worker: Optional[WorkerRecord]) -> None:
        """A worker asks to run unit ``bid`` again after ``meta["dl"]`` seconds
        (a retry with back-off): the broker holds it meanwhile, the slot serves others."""
        unit = self.tasks.get(bid)
        if unit is None or unit.state != RUNNING or worker is None or unit.worker != worker.ident:
            self.counts["duplicates"] += 1  # it was lost and requeued meanwhile
            return
        worker.finish(bid)
        worker.done += 1
        delay = meta.get("dl", 0.0)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
            delay = 0.0
        attempt = meta.get("att")
        unit.meta["att"] = attempt if type(attempt) is int else unit.meta.get("att", 0) + 1
        unit.worker = None
        unit.due = time.time() + delay
        self.durable.unit_updated(unit)
        if self.watchers:
            self._event("task-retried", unit, worker=worker.name, delay=delay,
                        attempt=unit.meta["att"])
        self.counts["retried"] = self.counts.get("retried", 0) + 1
        logger.debug("task %d retries in %.3f s (attempt %d)", bid, delay, unit.meta["att"] + 1)
        self._enqueue(unit)

    def _dispatch(self: "Broker") -> None:
        """Hand queued units to workers by credit, FIFO, dealt in turn to the free workers
        (idle slots first), so a burst of map batches is spread evenly; one message each."""
        now = time.monotonic()
        if not self.queue:
            return
        free = [w for w in self.workers.values() if w.capacity > 0 and w.blocked_until <= now]
        # Idle slots first, so a new task never waits behind another's prefetch.
        free.sort(key=lambda w: len(w.running) - w.slots)
        dealt: dict[bytes, list] = {}
        while self.queue and free:
            # One unit a turn while the queue is short (a map's few large batches);
            # a long queue goes in chunks, as dealing one by one would gain nothing.
            chunk = max(1, len(self.queue) // (4 * len(free)))
            for worker in list(free):
                units = self._deal(worker, min(chunk, worker.capacity), dealt)
                if not units or worker.capacity <= 0 or worker.alone is not None:
                    free.remove(worker)
                if not self.queue:
                    break
        self._deal_batches_ahead(dealt, now)
        for ident, units in dealt.items():
            self._send_units(self.workers[ident], units)

    def _deal(self: "Broker", worker: WorkerRecord, n: int, dealt: dict,
              only: Optional[Callable[[Unit], bool]] = None) -> list:
        """Take up to ``n`` queued units for ``worker`` into ``dealt``; return them."""
        units = self.queue.take(worker, n, self._admit, only=only)
        for unit in units:
            if unit.bid not in worker.running:
                # Counted at once: its capacity, and whether a suspect may join
                # it, must see what this pass has dealt it already.
                worker.start(unit)
        if units:
            dealt.setdefault(worker.ident, []).extend(units)
        return units

    def _deal_batches_ahead(self: "Broker", dealt: dict, now: float) -> None:
        """A worker busy with map batches gets the next one ahead, one a slot.

        Batches take 50-500 ms, too long for the time-based prefetch, so
        without this a worker idles a broker round trip (~1 ms) between two.
        Only map batches go ahead, only behind map batches, and only on a worker
        whose units are short (BATCH_AHEAD_SECONDS): a lone task never waits
        behind another's work and stays withdrawable at the broker, and a long
        batch does not hold the next one from a worker that frees up first.
        Not in a map's tail either (no more queued than there are workers), where
        the last batches should go to whichever worker frees up first.
        """
        if len(self.queue) <= len(self.workers):
            return
        for worker in self.workers.values():
            running = worker.running
            ahead = len(running) - worker.slots
            if not 0 <= ahead < worker.slots or worker.prefetch or worker.alone is not None \
                    or worker.blocked_until > now or worker.mean_time is None \
                    or worker.mean_time > BATCH_AHEAD_SECONDS:
                continue
            if not all(map(_is_batch, running.values())):
                continue
            self._deal(worker, worker.slots - ahead, dealt, only=_is_batch)
            if len(self.queue) <= len(self.workers):
                return

    def _send_units(self: "Broker", worker: WorkerRecord, units: list) -> bool:
        """Send ``units`` to ``worker``; False (and the units back in the queue) if its
        task socket cannot be reached."""
        frames: list = []
        digests: dict = {}
        objects = []
        for unit in units:
            for ref in unit.refs:
                if ref not in worker.objects:
                    obj = self.objects[ref]
                    for i, d in obj.digests.items():
                        digests[len(frames) + i] = d
                    frames.extend(obj.frames)
                    objects.append([ref, len(obj.frames)])
                    worker.objects.add(ref)
        entries = []
        for unit in units:
            for i, d in unit.digests.items():
                digests[len(frames) + i] = d
            frames.extend(unit.frames)
            entries.append([unit.bid, unit.refs, len(unit.frames), unit.meta])
            unit.state, unit.worker = RUNNING, worker.ident
            if unit.bid not in worker.running:  # (units with resources are claimed when taken)
                worker.start(unit)
            if self.watchers:
                self._event("task-started", unit, worker=worker.name)
        fields = {"u": entries}
        if objects:
            fields["ob"] = objects
        if self._send(worker.ident, Kind.TASKS, fields, frames, digests):
            return True
        # Its task socket is not connected: it died (liveness will say so, and
        # charge what it was running) or it is reconnecting.  These units never
        # left: put them back, and try the worker again in a moment.
        for unit in reversed(units):
            worker.finish(unit.bid)
            unit.state, unit.worker = QUEUED, None
            self.queue.appendleft(unit)
        worker.objects.difference_update(ref for ref, _ in objects)
        worker.blocked_until = time.monotonic() + 0.5
        logger.info("worker %s cannot be reached now; %d task(s) stay queued", worker.name,
                    len(units))
        return False


def _is_batch(unit: Unit) -> bool:
    """Whether ``unit`` is a batch of a map."""
    return bool(unit.meta.get("m"))


def _format_resources(resources: dict) -> str:
    return ",".join(f"{name}={amount:g}" for name, amount in sorted(resources.items()))
