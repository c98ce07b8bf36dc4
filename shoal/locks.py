"""Broker-held locks, from clients and from inside tasks.

>>> with client.lock("nightly-report", timeout=30):   # in a notebook or script
...     ...
>>> def task():
...     with shoal.lock("db-migration"):               # inside a task, on any worker
...         ...

A lock is held by the broker for one *owner*: a client's acquire (its client
id and a token per acquire), or a running task's (its worker, its unit and a
token).  It is released when the owner releases it, and when the owner dies:
a client silent for :data:`HOLDER_TIMEOUT` seconds (clients heartbeat every
second), a worker that is lost, or a task that ends while holding it.  Waiters
are served in order; ``timeout`` bounds the wait.

:class:`LockTable` is the broker's part: plain bookkeeping, no sockets.
:class:`Lock` is what users hold.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .protocol import Kind

logger = logging.getLogger(__name__)

#: A client holding a lock that stays silent this long (seconds) loses it.
HOLDER_TIMEOUT = 5.0
MAX_LOCK_NAME = 200


class LockTimeout(TimeoutError):
    """The lock was not acquired within the timeout; ``holder`` says who has it."""

    def __init__(self, name: str, timeout: float, holder: str = "") -> None:
        self.name, self.timeout, self.holder = name, timeout, holder
        super().__init__(f"lock {name!r} was not acquired within {timeout:g} s"
                         + (f"; it is held by {holder}" if holder else ""))

    def __reduce__(self):
        return type(self), (self.name, self.timeout, self.holder)


@dataclass
class Owner:
    """Who holds or waits for a lock: a client's acquire or a task's."""

    token: bytes
    reply_to: bytes  # the socket that asked (and gets the answer)
    cid: bytes = b""  # a client's id
    worker: str = ""  # a task's worker ...
    unit: int = 0  # ... and its unit
    describe: str = ""

    @property
    def is_task(self) -> bool:
        return bool(self.worker)


@dataclass
class _Entry:
    holder: Optional[Owner] = None
    since: float = 0.0
    waiting: deque = field(default_factory=deque)  # (owner, rq, deadline or None)


class LockTable:
    """The broker's locks by name (see the module docstring)."""

    def __init__(self) -> None:
        self._locks: dict[str, _Entry] = {}

    @staticmethod
    def check_name(name: Any) -> str:
        if not isinstance(name, str) or not name or len(name) > MAX_LOCK_NAME:
            raise ValueError(f"a lock name is a non-empty string of at most {MAX_LOCK_NAME} "
                             f"characters, not {name!r}")
        return name

    def acquire(self, name: str, owner: Owner, rq: Any, timeout: Optional[float]) -> bool:
        """Grant ``name`` to ``owner`` now (True) or queue it (False)."""
        entry = self._locks.setdefault(name, _Entry())
        if entry.holder is None:
            entry.holder, entry.since = owner, time.monotonic()
            return True
        if entry.holder.token == owner.token:
            raise ValueError(f"lock {name!r} is already held by this acquire")
        deadline = None if timeout is None else time.monotonic() + timeout
        entry.waiting.append((owner, rq, deadline))
        return False

    def release(self, name: str, token: bytes) -> list:
        """Release ``name`` held under ``token`` (or stop waiting for it).

        Returns ``[(name, owner, rq)]`` granted next.  Raises LookupError if that
        token neither holds nor waits for it.
        """
        entry = self._locks.get(name)
        if entry is not None and entry.holder is not None and entry.holder.token == token:
            return self._pass_on(name, entry)
        if entry is not None:
            for item in list(entry.waiting):
                if item[0].token == token:
                    entry.waiting.remove(item)
                    return []
        raise LookupError(f"lock {name!r} is not held by this owner")

    def _pass_on(self, name: str, entry: _Entry) -> list:
        entry.holder = None
        while entry.waiting:
            owner, rq, deadline = entry.waiting.popleft()
            if deadline is None or deadline > time.monotonic():
                entry.holder, entry.since = owner, time.monotonic()
                return [(name, owner, rq)]
        del self._locks[name]
        return []

    def release_where(self, dead: Callable[[Owner], bool]) -> tuple[list, list]:
        """Release every lock held by, and drop every wait of, an owner ``dead``
        says is gone.  Returns ``(released names with their old holders, granted)``."""
        released, granted = [], []
        for name, entry in list(self._locks.items()):
            entry.waiting = deque(w for w in entry.waiting if not dead(w[0]))
            if entry.holder is not None and dead(entry.holder):
                released.append((name, entry.holder))
                granted.extend(self._pass_on(name, entry))
            elif entry.holder is None and not entry.waiting:
                del self._locks[name]
        return released, granted

    def expired_waits(self) -> list:
        """``[(name, owner, rq, holder)]`` of waits past their timeout, removed."""
        now = time.monotonic()
        out = []
        for name, entry in self._locks.items():
            keep = deque()
            for owner, rq, deadline in entry.waiting:
                if deadline is not None and deadline <= now:
                    out.append((name, owner, rq, entry.holder))
                else:
                    keep.append((owner, rq, deadline))
            entry.waiting = keep
        return out

    def holder_of(self, name: str) -> Optional[Owner]:
        entry = self._locks.get(name)
        return entry.holder if entry is not None else None

    def restore(self, name: str, owner: Owner) -> None:
        """A lock held before a durable broker restarted (its owner must come back)."""
        self._locks[name] = _Entry(owner, time.monotonic())

    def summary(self) -> list:
        now = time.monotonic()
        return [{"name": name, "holder": e.holder.describe if e.holder else None,
                 "held_s": round(now - e.since, 3) if e.holder else None,
                 "waiting": len(e.waiting)}
                for name, e in sorted(self._locks.items())]

    def __len__(self) -> int:
        return len(self._locks)


# ----------------------------------------------------------------- the user's side
class Lock:
    """A broker-held lock; use ``with``, or :meth:`acquire` and :meth:`release`.

    Made by :meth:`shoal.Client.lock` or :func:`shoal.lock`.  ``timeout``
    (seconds, ``None`` for no limit) bounds how long ``with`` waits; past it
    :class:`LockTimeout` is raised naming the holder.  A Lock may be acquired
    again after it was released, from any thread of its process.
    """

    def __init__(self, name: str, request: Callable[..., dict],
                 timeout: Optional[float] = None) -> None:
        self.name = LockTable.check_name(name)
        self.timeout = timeout
        self._request = request
        self._token: Optional[bytes] = None
        self._guard = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: Optional[float] = -1) -> bool:
        """Acquire it; return whether it was (False when ``timeout`` passed first).

        ``timeout=-1`` (the default) uses the lock's own timeout.
        """
        with self._guard:
            if self._token is not None:
                raise RuntimeError(f"lock {self.name!r} is already acquired by this Lock object")
            token = os.urandom(8)
        wait = 0.0 if not blocking else (self.timeout if timeout == -1 else timeout)
        try:
            answer = self._request({"op": "acquire", "name": self.name, "tok": token,
                                    "tmo": wait}, wait)
        except BaseException:  # Ctrl-C, or the task was cancelled while it waited
            self._abandon(token)
            raise
        if not answer.get("ok"):
            return False
        with self._guard:
            self._token = token
        return True

    def release(self) -> None:
        """Release it; RuntimeError if it is not held."""
        with self._guard:
            token, self._token = self._token, None
        if token is None:
            raise RuntimeError(f"lock {self.name!r} is not held")
        self._request({"op": "release", "name": self.name, "tok": token}, 10.0)

    def _abandon(self, token: bytes) -> None:
        try:
            self._request({"op": "release", "name": self.name, "tok": token}, 2.0)
        except Exception:
            pass

    def locked(self) -> bool:
        """Whether this Lock object holds the lock."""
        return self._token is not None

    def __enter__(self) -> "Lock":
        if not self.acquire():
            holder = ""
            try:
                holder = self._request({"op": "holder", "name": self.name}, 5.0).get("holder") or ""
            except Exception:
                pass
            raise LockTimeout(self.name, self.timeout or 0.0, holder)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<shoal.Lock {self.name!r} {'held' if self.locked() else 'not held'}>"


def lock(name: str, timeout: Optional[float] = None) -> Lock:
    """A broker-held lock: inside a task, through its worker; elsewhere, through
    the current client (see :meth:`shoal.Client.lock`)."""
    from .worker import current_worker
    worker = current_worker()
    if worker is not None:
        return Lock(name, worker.control.lock_request, timeout)
    from .client import get_client
    return get_client().lock(name, timeout)


# ----------------------------------------------------------------- the broker's handler
class LockRequests:
    """The broker's handling of LOCK requests (a mixin of Broker)."""

    def _on_lock(self, ident: bytes, msg) -> None:
        h = msg.header
        name = LockTable.check_name(h.get("name"))
        op, rq = h.get("op"), h.get("rq")
        if op == "holder":
            holder = self.locks.holder_of(name)
            self._send(ident, Kind.REPLY, {"rq": rq, "holder": holder.describe if holder else None})
            return
        token = h.get("tok")
        if not isinstance(token, bytes) or not 1 <= len(token) <= 32:
            raise ValueError(f"malformed lock token {token!r}")
        owner = self._lock_owner(ident, h, token)
        if op == "acquire":
            wait = h.get("tmo")
            if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float))
                                     or wait < 0):
                raise ValueError(f"malformed lock timeout {wait!r}")
            if self.locks.acquire(name, owner, rq, wait):
                self._granted(name, owner, rq)
            elif wait == 0:  # a try: it must not wait
                self.locks.release(name, token)
                holder = self.locks.holder_of(name)
                self._send(ident, Kind.REPLY, {"rq": rq, "ok": False,
                                               "holder": holder.describe if holder else None})
        elif op == "release":
            try:
                granted = self.locks.release(name, token)
            except LookupError as exc:
                self._send(ident, Kind.REPLY, {"rq": rq, "error": str(exc)})
                return
            self.durable.lock_removed(name)
            self._send(ident, Kind.REPLY, {"rq": rq, "ok": True})
            for next_name, next_owner, next_rq in granted:
                self._granted(next_name, next_owner, next_rq)
        else:
            raise ValueError(f"unknown lock operation {op!r}")

    def _lock_owner(self, ident: bytes, header: dict, token: bytes) -> Owner:
        if "wid" in header:  # from a task, through its worker's control socket
            worker = self._worker_of(ident, header)
            if worker is None:
                raise ValueError("a lock request from a worker that is not registered")
            unit = header.get("b", 0)
            return Owner(token, ident, worker=worker.name, unit=unit if type(unit) is int else 0,
                         describe=f"a task on worker {worker.name}")
        client = self._client(ident)
        cid = header.get("cid")
        if isinstance(cid, bytes) and len(cid) == 8:
            client.cid = cid
        return Owner(token, ident, cid=client.cid,
                     describe=f"client {client.cid.hex() or ident.hex()}")

    def _granted(self, name: str, owner: Owner, rq: Any) -> None:
        self.durable.lock_saved(name, {"tok": owner.token, "cid": owner.cid,
                                       "worker": owner.worker, "unit": owner.unit,
                                       "describe": owner.describe})
        self._send(owner.reply_to, Kind.REPLY, {"rq": rq, "ok": True})

    def _check_locks(self) -> None:
        """On each tick: release the locks of owners that died, and answer waits
        that timed out."""
        if not len(self.locks):
            return
        for name, owner, rq, holder in self.locks.expired_waits():
            self._send(owner.reply_to, Kind.REPLY, {
                "rq": rq, "ok": False, "holder": holder.describe if holder else None})
        now = time.monotonic()
        alive = {c.cid for c in self.clients.values()
                 if c.cid and now - c.last_seen <= HOLDER_TIMEOUT}
        workers = {w.name: w for w in self.workers.values()}
        # After a durable broker restarted, holders get as long to come back as a
        # live holder may stay silent.
        grace = now - self._restored_at < HOLDER_TIMEOUT

        def dead(owner: Owner) -> bool:
            if grace:
                return False
            if owner.is_task:
                worker = workers.get(owner.worker)
                return worker is None or (owner.unit and owner.unit not in worker.running)
            return owner.cid not in alive

        released, granted = self.locks.release_where(dead)
        for name, holder in released:
            logger.warning("lock %r released: its holder, %s, is gone", name, holder.describe)
            self.durable.lock_removed(name)
        for name, owner, rq in granted:
            self._granted(name, owner, rq)
