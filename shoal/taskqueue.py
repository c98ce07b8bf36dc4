"""The client's task-queue side (a mixin of Client), for what Celery users expect:
results by task id and ``future.status``, dependencies' values, locks, periodic
tasks, the event stream, and picking its tasks up again when a broker with
``--store`` restarts.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import serialize
from .errors import BrokerError, BrokerLost
from .futures import Future
from .protocol import Kind
from .records import parse_task_id

if TYPE_CHECKING:
    from .client import Client

logger = logging.getLogger(__name__)


class TaskQueueAPI:
    """See the module docstring."""

    # ------------------------------------------------------------ dependencies
    def _hold_dependency(self: "Client", key: bytes, future: Future) -> None:
        """A task being submitted takes ``future``: keep it until that task is done."""
        entry = self._dependencies.get(key)
        if entry is None:
            self._dependencies[key] = [future, 1]
        else:
            entry[1] += 1

    def _release_dependencies(self: "Client", keys: list) -> None:
        for key in keys:
            entry = self._dependencies.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._dependencies[key]

    def _send_dependency(self: "Client", key) -> None:
        """The broker cannot reach a dependency's value (it came back in shared
        memory): send it, once it is here, as an object under the task's key."""
        if not isinstance(key, bytes):
            return
        entry = self._dependencies.get(key)
        if entry is None:
            self._post(("dep-failed", key, "is no longer known to its client"))
            return

        def send(future: Future) -> None:
            if future.cancelled():
                self._post(("dep-failed", key, "was cancelled"))
                return
            exc = future.exception()
            if exc is not None:
                self._post(("dep-failed", key, f"raised {type(exc).__name__}: {exc}"))
                return
            try:
                frames, _ = serialize.dumps(future.result())
            except Exception as err:
                self._post(("dep-failed", key, f"returned a value that cannot be sent ({err})"))
                return
            self._post((Kind.SCATTER, key, frames))

        entry[0].add_done_callback(send)

    def _status_of(self: "Client", future: Future) -> str:
        """A pending task's state, asked of the broker (see Future.status)."""
        if isinstance(future.key, int):
            fields = {"t": [future.key]}
        elif future._task_key is not None:
            fields = {"k": [future._task_key]}
        else:
            return "pending"
        header, _ = self._ask(Kind.TASK_INFO, fields)
        state = header["s"][0]
        if future.done():  # it finished while we asked
            return future.status
        return "running" if state in ("unknown", "done", "failed") else state

    def future(self: "Client", task_id: str) -> Future:
        """A :class:`Future` of any task by its id, also one another client
        submitted, or one submitted before a kernel restart (while its result
        is kept: see ``shoal broker --result-ttl``)."""
        self._check_open()
        key = parse_task_id(task_id)
        tid = next(self._tids)
        future = Future(tid, self)
        future._task_key = key
        self._pending[tid] = future
        self._post(("ask", Kind.FETCH, {"key": key, "t": tid}, [], tid))
        return future

    def result(self: "Client", task_id: str, timeout: Optional[float] = None) -> Any:
        """The result of any task by its id (see :meth:`future`); raises its error."""
        return self.future(task_id).result(timeout)

    def _ask(self: "Client", kind: str, fields: Optional[dict] = None, frames: list = (),
             timeout: float = 10.0) -> tuple:
        """Send a request of ``kind``; return the broker's REPLY ``(header, frames)``.

        Raises BrokerError with the broker's words when it refuses.
        """
        header, frames = self._request(("ask", kind, fields or {}, list(frames)), timeout)
        if "error" in header:
            raise BrokerError(header["error"])
        return header, frames


    # ------------------------------------------------------------ locks
    def lock(self: "Client", name: str, timeout: Optional[float] = None):
        """A lock held by the broker, shared with every client and task of the cluster.

        >>> with client.lock("nightly-report", timeout=30):
        ...     ...

        ``timeout`` (seconds; None waits for ever) bounds how long ``with``
        waits, then raises :class:`shoal.LockTimeout` naming the holder.  The
        broker releases it if this client dies (silent 5 s).  Inside a task use
        :func:`shoal.lock`.
        """
        from .locks import Lock
        self._check_open()
        return Lock(name, self._lock_request, timeout)

    def _lock_request(self: "Client", fields: dict, wait: Optional[float]) -> dict:
        header, _ = self._ask(Kind.LOCK, dict(fields, cid=self.cid),
                              timeout=None if wait is None else wait + 10.0)
        return header

    # ------------------------------------------------------------ periodic tasks
    def every(self: "Client", when: Any, fn: Callable, /, *args: Any, name: Optional[str] = None,
              tz: Optional[str] = None, missed: str = "skip", **kwargs: Any) -> dict:
        """Run ``fn(*args, **kwargs)`` periodically; the broker owns the schedule.

        >>> client.every("*/5 * * * *", refresh, "prices", name="prices")
        >>> client.every(timedelta(minutes=10), ping, name="ping", queue="io")

        ``when``: a cron expression (five fields, or six with seconds; in the
        time zone ``tz``, default UTC), a ``timedelta`` or seconds.  ``name``
        identifies the schedule (default: the function's name); adding one of
        the same name replaces it.  ``missed``: what a broker with ``--store``
        does with runs it missed while it was down: ``"skip"`` them (default)
        or run ``"once"`` at start-up.  Task options (``queue``, ``retries``,
        ``timeout``, ``priority``, ...) apply to every run.  Returns the
        schedule as :meth:`schedules` lists it.
        """
        from .options import task_options
        from .periodic import MISSED, _zone, parse_every
        kind, spec = parse_every(when)
        if tz is not None:
            _zone(tz)
        if missed not in MISSED:
            raise ValueError(f"missed must be one of {', '.join(MISSED)}, not {missed!r}")
        option_names = ("retries", "timeout", "retry_backoff", "retry_backoff_max",
                        "retry_jitter", "retry_on", "queue", "priority", "resources",
                        "rate_limit")
        options = task_options(**{k: kwargs.pop(k) for k in option_names if k in kwargs})
        if name is None:
            name = fn if isinstance(fn, str) else getattr(fn, "name", None) or \
                serialize.task_name(fn)
        fn_payload, fn_digest, task_name, frames, meta, refs = self._prepare(
            fn, args, kwargs, options, dependencies=False)
        objects, object_frames = [], []
        if fn_digest is not None:
            objects.append([fn_digest, 1])
            object_frames.append(fn_payload)
        unit_refs = ([fn_digest] if fn_digest else []) + list(refs)
        header, _ = self._ask(Kind.SCHEDULE, {
            "op": "add", "name": name, "kind": kind, "spec": spec, "tz": tz, "missed": missed,
            "u": [unit_refs, len(frames), meta], "ob": objects}, object_frames + list(frames))
        return header["schedule"]

    def schedules(self: "Client") -> list:
        """The broker's periodic tasks: name, cron or every, tz, next_run and
        last_run (epoch seconds), runs, last_task (its id) and last_status."""
        header, _ = self._ask(Kind.SCHEDULE, {"op": "list"})
        return header["schedules"]

    def cancel_schedule(self: "Client", name: str) -> bool:
        """Stop the periodic task ``name``; return whether there was one."""
        header, _ = self._ask(Kind.SCHEDULE, {"op": "cancel", "name": name})
        return bool(header["cancelled"])

    # ------------------------------------------------------------ events
    def _watch_events(self: "Client", kinds: Optional[list] = None):
        """Start receiving the broker's events; an EventStream (see shoal.monitor)."""
        from .monitor import EventStream
        if self._events is not None:
            raise RuntimeError("this client already watches events; use another client")
        fields = {"kinds": kinds} if kinds else {}
        stream = EventStream(lambda extra: self._post(("watch", extra)),
                             lambda: self._stop_watching())
        self._events = stream
        self._post(("watch", fields))
        return stream

    def _stop_watching(self: "Client") -> None:
        if self._events is not None:
            self._events = None
            if not self._closed:
                self._post(("watch", {"stop": 1}))

    # ------------------------------------------------------------ durable brokers
    def _on_ack(self: "Client", tids) -> None:
        """A broker with --store has stored these tasks."""
        for tid in tids if isinstance(tids, list) else ():
            self._unacked.pop(tid, None)
            future = self._pending.get(tid)
            if future is not None:
                future.acknowledged = True

    def _resume(self: "Client") -> None:
        """The broker restarted on the same store: its tasks are still there.

        Ask it to send this client the results of those it stored, and send
        again those it had not acknowledged (it ignores any it did have).
        """
        self._sent_objects.clear()  # it may not have them: send them again with their tasks
        acked = [t for t in self._pending if isinstance(t, int) and t > 0
                 and t not in self._unacked]
        again = list(self._unacked.values())
        logger.warning("the broker at %s restarted with its store: resuming %d task(s), "
                       "sending %d again", self.address, len(acked), len(again))
        self._commands.extendleft(reversed(again))
        if acked:
            request = next(self._tids)
            waiter = self._replies[request] = Future(("request", request))

            def lost(reply: Future) -> None:
                self._replies.pop(request, None)
                if reply.exception() is not None:
                    return
                error = BrokerLost(f"the broker at {self.address} restarted and no longer "
                                   "has this task (it was never stored); submit it again")
                for tid in reply.result()[0].get("lost", ()):
                    self._fail(tid, error)

            waiter.add_done_callback(lost)
            self._commands.appendleft(("ask", Kind.RESUME, {"cid": self.cid, "t": acked}, [],
                                       request))
        self._wake()
