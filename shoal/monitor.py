"""Monitoring: task and worker events from the broker, ``shoal events`` and ``shoal top``.

Both read the broker, never a worker.  ``shoal events`` streams events as
JSON lines, one object per line, for other tools::

    {"at": 1764581054.21, "event": "task-succeeded", "task": "9f86d0...-42",
     "name": "pkg.tasks.resize", "worker": "gpu-1", "queue": "default", "runtime": 0.012}

Event kinds: ``task-received``, ``task-started``, ``task-succeeded``,
``task-failed`` (with ``error``), ``task-retried``, ``task-cancelled``,
``task-lost``, ``worker-joined``, ``worker-left``, ``worker-lost``,
``schedule-run``, ``events-dropped`` (with ``count``: a watcher that did not
keep up lost that many).  Map batches are one event each (``items`` says how
many items).

``shoal top`` is a live terminal view, refreshed in place: workers, what
they run, queues, task rates and recent failures.

The broker sends events only while someone watches, in one message per
dispatch pass, and at most :data:`WINDOW` messages ahead of what a watcher
has acknowledged; beyond that it drops events (and says how many), so a slow
watcher never makes the broker's memory grow.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections import deque
from typing import Any, Callable, Iterator, Optional

from .protocol import Kind
from .records import task_id

#: Event messages a watcher may have unacknowledged before events are dropped for it.
WINDOW = 64
#: A watcher silent this long (no acknowledgement) is forgotten.
WATCHER_TIMEOUT = 30.0


class Watcher:
    __slots__ = ("ident", "kinds", "unacked", "dropped", "seq", "last_seen")

    def __init__(self, ident: bytes, kinds: Optional[set]) -> None:
        self.ident = ident
        self.kinds = kinds
        self.unacked = 0
        self.dropped = 0
        self.seq = 0
        self.last_seen = time.monotonic()


class Events:
    """The broker's event stream (a mixin of Broker)."""

    def _on_watch(self, ident: bytes, msg) -> None:
        h = msg.header
        self._client(ident)
        if h.get("stop"):
            self.watchers.pop(ident, None)
            return
        watcher = self.watchers.get(ident)
        if "ack" in h and watcher is not None:
            watcher.unacked = max(0, watcher.unacked - 1)
            watcher.last_seen = time.monotonic()
            return
        kinds = h.get("kinds")
        if kinds is not None and (not isinstance(kinds, list)
                                  or not all(isinstance(k, str) for k in kinds)):
            raise ValueError(f"malformed event kinds {kinds!r}")
        self.watchers[ident] = Watcher(ident, set(kinds) if kinds else None)

    def _event(self, kind: str, unit=None, **fields: Any) -> None:
        """Note an event for the watchers (call only when ``self.watchers``)."""
        event = {"at": time.time(), "event": kind}
        if unit is not None:
            event["task"] = task_id(unit.key) if unit.key else str(unit.bid)
            event["name"] = self._task_name(unit)
            event["queue"] = unit.queue
            if unit.meta.get("m"):
                event["items"] = unit.meta.get("n", 1)
        event.update(fields)
        self.pending_events.append(event)

    def _task_name(self, unit) -> str:
        name = unit.meta.get("fn") or unit.meta.get("nm")
        if name:
            return name
        obj = self.objects.get(unit.refs[0]) if unit.refs else None
        return getattr(obj, "name", "") or "?"

    def _flush_events(self) -> None:
        events, self.pending_events = self.pending_events, []
        now = time.monotonic()
        for ident, watcher in list(self.watchers.items()):
            if now - watcher.last_seen > WATCHER_TIMEOUT:
                del self.watchers[ident]
                continue
            chosen = events if watcher.kinds is None else [
                e for e in events if e["event"] in watcher.kinds]
            if not chosen:
                continue
            if watcher.unacked >= WINDOW:
                watcher.dropped += len(chosen)
                continue
            if watcher.dropped:
                chosen = [{"at": time.time(), "event": "events-dropped",
                           "count": watcher.dropped}] + chosen
                watcher.dropped = 0
            watcher.unacked += 1
            watcher.seq += 1
            self._send(ident, Kind.EVENTS, {"e": chosen, "n": watcher.seq})


# ----------------------------------------------------------------- the user's side
def watch(client, kinds: Optional[list] = None, timeout: Optional[float] = None
          ) -> Iterator[dict]:
    """Events from the broker as they happen (see the module docstring).

    >>> for event in shoal.monitor.watch(client, ["task-failed"]):
    ...     print(event["task"], event["error"])

    ``timeout``: stop after that many seconds without an event.  Watching
    starts at the call, not at the first ``next()``.
    """
    stream = client._watch_events(kinds)

    def events() -> Iterator[dict]:
        try:
            while True:
                try:
                    batch = stream.get(timeout)
                except TimeoutError:
                    return
                yield from batch
        finally:
            stream.close()

    return events()


def cmd_events(args) -> int:
    """``shoal events``: print the broker's events as JSON lines until Ctrl-C."""
    from .cli import _connect
    client = _connect(args)
    if isinstance(client, int):
        return client
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    count = 0
    try:
        with client:
            for event in watch(client, kinds, timeout=args.idle):
                print(json.dumps(event), flush=True)
                count += 1
                if args.count and count >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `shoal events | head`
        sys.stderr.close()
    return 0


# ----------------------------------------------------------------- shoal top
class TopView:
    """The state ``shoal top`` shows, updated from status replies and events."""

    def __init__(self, history: int = 8) -> None:
        self.status: dict = {}
        self.previous: Optional[tuple] = None
        self.rate = 0.0
        self.failures: deque = deque(maxlen=history)
        self.running: dict = {}  # task id -> (name, worker, started)

    def update(self, status: dict, events: list) -> None:
        now = time.monotonic()
        done = status.get("counts", {}).get("done", 0) + status.get("counts", {}).get("failed", 0)
        if self.previous is not None:
            then, before = self.previous
            if now > then:
                self.rate = max(0.0, (done - before) / (now - then))
        self.previous = (now, done)
        self.status = status
        for event in events:
            kind = event.get("event")
            if kind == "task-started":
                self.running[event["task"]] = (event.get("name", "?"), event.get("worker", "?"),
                                               event.get("at", time.time()))
            elif kind in ("task-succeeded", "task-failed", "task-cancelled", "task-lost",
                          "task-retried"):
                self.running.pop(event.get("task"), None)
                if kind in ("task-failed", "task-lost"):
                    self.failures.append(event)

    def render(self, width: int = 100) -> str:
        from .cli import format_status
        s = self.status
        lines = [f"shoal top — {time.strftime('%H:%M:%S')}   {self.rate:,.1f} tasks/s   "
                 f"(q to quit)", ""]
        lines.extend(format_status(s).splitlines())
        queues = s.get("queues") or {}
        if queues:
            lines += ["", "QUEUE            QUEUED   RUNNING"]
            lines += [f"{name:<16} {q.get('queued', 0):>6}   {q.get('running', 0):>7}"
                      for name, q in sorted(queues.items())]
        if self.running:
            lines += ["", "RUNNING TASK                     ON WORKER        FOR"]
            now = time.time()
            for tid, (name, worker, started) in sorted(self.running.items(),
                                                       key=lambda kv: kv[1][2])[:10]:
                lines.append(f"{name[:32]:<32} {worker[:16]:<16} {now - started:6.1f} s")
        if s.get("schedules"):
            lines += ["", f"schedules: {s['schedules']}"]
        if self.failures:
            lines += ["", "RECENT FAILURES"]
            for event in reversed(self.failures):
                when = time.strftime("%H:%M:%S", time.localtime(event.get("at", 0)))
                lines.append(f"{when}  {event.get('name', '?')[:30]}  "
                             f"{event.get('error', event.get('event'))}"[:width])
        return "\n".join(line[:width] for line in lines)


def cmd_top(args) -> int:
    """``shoal top``: a live view of the cluster, refreshed in place, until Ctrl-C (or q)."""
    from .cli import _connect
    client = _connect(args)
    if isinstance(client, int):
        return client
    view = TopView()
    interactive = sys.stdout.isatty()
    frames = 0
    restore = _keys_without_enter() if interactive else None
    try:
        with client:
            stream = client._watch_events(None)
            try:
                while True:
                    events = []
                    deadline = time.monotonic() + args.interval
                    while True:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            events.extend(stream.get(remaining))
                        except TimeoutError:
                            break
                    view.update(client.status(timeout=10), events)
                    width = shutil.get_terminal_size((100, 40)).columns if interactive else 100
                    text = view.render(width)
                    if interactive:
                        # Home and clear, then the frame: it refreshes in place.
                        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
                    else:
                        sys.stdout.write(text + "\n\n")
                    sys.stdout.flush()
                    frames += 1
                    if args.iterations and frames >= args.iterations:
                        break
                    if interactive and _quit_pressed():
                        break
            finally:
                stream.close()
    except KeyboardInterrupt:
        pass
    finally:
        if restore is not None:
            restore()
    return 0


def _keys_without_enter() -> Optional[Callable[[], None]]:
    """Let single key presses through (so 'q' quits); return what undoes it."""
    try:
        import termios
        import tty
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    except (ImportError, OSError, ValueError):
        return None
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed() -> bool:
    """Whether 'q' was typed (the terminal is read without waiting)."""
    import select
    try:
        ready, _, _ = select.select([sys.stdin], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(ready) and sys.stdin.read(1).lower() == "q"


class EventStream:
    """Batches of events for one watcher of a client (see Client._watch_events)."""

    def __init__(self, send: Callable[[dict], None], close: Callable[[], None]) -> None:
        import queue
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._send = send
        self._close = close

    def deliver(self, events: list) -> None:
        """From the client's IO thread: a batch arrived; acknowledge it."""
        self._queue.put(events)
        self._send({"ack": 1})

    def fail(self, error: BaseException) -> None:
        """The broker is gone: the watcher's next ``get`` raises ``error``."""
        self._queue.put(error)

    def get(self, timeout: Optional[float] = None) -> list:
        """The next batch of events; TimeoutError after ``timeout`` seconds without one."""
        import queue
        try:
            batch = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if isinstance(batch, BaseException):
            raise batch
        return batch

    def close(self) -> None:
        self._close()
