"""Durable broker state: ``shoal broker --store PATH``.

Without a store the broker keeps everything in memory (:class:`MemoryOnly`,
whose methods do nothing).  With one (:class:`SQLiteStore`), queued tasks,
the objects they need (functions, scattered data), results, periodic
schedules and locks are written to an embedded SQLite database in WAL mode,
so a broker killed (SIGKILL included) and started again on the same store
loses no acknowledged task and no result.

Writes made while the broker handles a burst of messages are committed
together at the end of that pass, before it acknowledges the tasks it
stored (``ACK``): a task is *acknowledged* once it is on disk.  SQLite's
``synchronous=NORMAL`` in WAL mode makes a commit survive the process being
killed; surviving a power cut as well needs ``--store-sync full`` (slower).
A task that was running when the broker died runs again after the restart
(at least once); its result reaches the user once.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import msgpack

logger = logging.getLogger(__name__)

#: Bumped when the tables change; a store of another version is refused.
SCHEMA_VERSION = 1


class MemoryOnly:
    """The broker's state lives in memory only: nothing to write or load."""

    durable = False
    store_id = ""

    def unit_added(self, unit) -> None: ...
    def unit_updated(self, unit) -> None: ...
    def unit_removed(self, unit) -> None: ...
    def object_added(self, digest: bytes, obj) -> None: ...
    def object_removed(self, digest: bytes) -> None: ...
    def result_kept(self, key: bytes, status: str, frames: list, meta: dict,
                    digests: Optional[dict] = None) -> None: ...
    def result(self, key: bytes) -> None:
        return None
    def expire_results(self, before: float) -> None: ...
    def schedule_saved(self, schedule) -> None: ...
    def schedule_removed(self, name: str) -> None: ...
    def lock_saved(self, name: str, holder: dict) -> None: ...
    def lock_removed(self, name: str) -> None: ...
    def commit(self) -> bool:
        return False
    def close(self) -> None: ...


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def _blobs(frames) -> bytes:
    return _pack([bytes(memoryview(f)) for f in frames])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (k TEXT PRIMARY KEY, v BLOB);
CREATE TABLE IF NOT EXISTS units (
    bid INTEGER PRIMARY KEY, cid BLOB, tid INTEGER, refs BLOB, meta BLOB, frames BLOB,
    digests BLOB, due REAL, attempts INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS objects (digest BLOB PRIMARY KEY, frames BLOB, digests BLOB);
CREATE TABLE IF NOT EXISTS results (key BLOB PRIMARY KEY, status TEXT, frames BLOB,
    meta BLOB, digests BLOB, at REAL);
CREATE INDEX IF NOT EXISTS results_at ON results (at);
CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, holder BLOB);
"""


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message says why and what to do."""


class SQLiteStore:
    """The broker's state in a SQLite database (see the module docstring)."""

    durable = True

    def __init__(self, path: str, sync: str = "normal") -> None:
        self.path = str(Path(path).expanduser())
        if sync not in ("normal", "full"):
            raise StoreError(f"--store-sync must be 'normal' or 'full', not {sync!r}")
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        new = not os.path.exists(self.path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if new:
                os.chmod(self.path, 0o600)  # it holds task payloads and results
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={sync.upper()}")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}; is it a shoal store? "
                             "Give --store a new file to start afresh") from None
        version = self._info("schema")
        if version is None:
            self._set_info("schema", SCHEMA_VERSION)
            self._set_info("store_id", os.urandom(8).hex())
        elif version != SCHEMA_VERSION:
            raise StoreError(f"the store {self.path} has schema version {version}, this shoal "
                             f"uses {SCHEMA_VERSION}; use a new --store file")
        #: identifies this store across broker restarts: clients resume when it is the same
        self.store_id = self._info("store_id")
        self._dirty = False
        self.db.execute("BEGIN")

    # ------------------------------------------------------------ info
    def _info(self, key: str) -> Any:
        row = self.db.execute("SELECT v FROM info WHERE k = ?", (key,)).fetchone()
        return None if row is None else _unpack(row[0])

    def _set_info(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (key, _pack(value)))

    # ------------------------------------------------------------ writes
    def _write(self, sql: str, args: tuple) -> None:
        self.db.execute(sql, args)
        self._dirty = True

    def unit_added(self, unit) -> None:
        self._write("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (unit.bid, unit.key[1:9], unit.tid, _pack(list(unit.refs)),
                     _pack(unit.meta), _blobs(unit.frames), _pack(unit.digests), unit.due,
                     unit.meta.get("att", 0)))

    def unit_updated(self, unit) -> None:
        """A unit's time or metadata changed (a retry)."""
        self._write("UPDATE units SET meta = ?, due = ?, attempts = ? WHERE bid = ?",
                    (_pack(unit.meta), unit.due, unit.meta.get("att", 0), unit.bid))

    def unit_removed(self, unit) -> None:
        self._write("DELETE FROM units WHERE bid = ?", (unit.bid,))

    def object_added(self, digest: bytes, obj) -> None:
        self._write("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)",
                    (digest, _blobs(obj.frames), _pack(obj.digests)))

    def object_removed(self, digest: bytes) -> None:
        self._write("DELETE FROM objects WHERE digest = ?", (digest,))

    def result_kept(self, key: bytes, status: str, frames: list, meta: dict,
                    digests: Optional[dict] = None) -> None:
        self._write("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                    (key, status, _blobs(frames), _pack(meta), _pack(digests or {}), time.time()))

    def expire_results(self, before: float) -> None:
        self._write("DELETE FROM results WHERE at < ?", (before,))

    def schedule_saved(self, schedule) -> None:
        body = {k: getattr(schedule, k) for k in (
            "name", "kind", "spec", "tz", "missed", "refs", "meta", "next_run", "last_run",
            "runs", "last_key", "last_status", "created", "sid")}
        body["frames"] = [bytes(memoryview(f)) for f in schedule.frames]
        body["digests"] = schedule.digests
        body["objects"] = {d: ([bytes(memoryview(f)) for f in fr], dg)
                           for d, (fr, dg) in schedule.objects.items()}
        self._write("INSERT OR REPLACE INTO schedules VALUES (?, ?)", (schedule.name, _pack(body)))

    def schedule_removed(self, name: str) -> None:
        self._write("DELETE FROM schedules WHERE name = ?", (name,))

    def lock_saved(self, name: str, holder: dict) -> None:
        self._write("INSERT OR REPLACE INTO locks VALUES (?, ?)", (name, _pack(holder)))

    def lock_removed(self, name: str) -> None:
        self._write("DELETE FROM locks WHERE name = ?", (name,))

    def commit(self) -> bool:
        """Make the writes since the last commit durable; True if there were any."""
        if not self._dirty:
            return False
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")
        self._dirty = False
        return True

    def close(self) -> None:
        try:
            self.commit()
            self.db.execute("COMMIT")
        except sqlite3.Error:
            pass
        self.db.close()

    # ------------------------------------------------------------ reads (start-up)
    def units(self) -> Iterator[dict]:
        for bid, cid, tid, refs, meta, frames, digests, due, _ in self.db.execute(
                "SELECT * FROM units ORDER BY bid"):
            yield {"bid": bid, "cid": cid, "tid": tid, "refs": _unpack(refs),
                   "meta": _unpack(meta), "frames": _unpack(frames), "digests": _unpack(digests),
                   "due": due}

    def objects(self) -> Iterator[tuple]:
        for digest, frames, digests in self.db.execute("SELECT * FROM objects"):
            yield digest, _unpack(frames), _unpack(digests)

    def result(self, key: bytes) -> Optional[tuple]:
        """``(status, frames, meta, digests, at)`` of a stored result, or None."""
        row = self.db.execute("SELECT status, frames, meta, digests, at FROM results "
                              "WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        status, frames, meta, digests, at = row
        return status, _unpack(frames), _unpack(meta), _unpack(digests), at

    def results(self, since: float) -> Iterator[tuple]:
        for key, status, frames, meta, digests, at in self.db.execute(
                "SELECT * FROM results WHERE at >= ? ORDER BY at", (since,)):
            yield key, status, _unpack(frames), _unpack(meta), _unpack(digests), at

    def schedules(self) -> Iterator[dict]:
        for _, body in self.db.execute("SELECT * FROM schedules"):
            yield _unpack(body)

    def locks(self) -> Iterator[tuple]:
        for name, holder in self.db.execute("SELECT * FROM locks"):
            yield name, _unpack(holder)

    def counts(self) -> dict:
        return {table: self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("units", "objects", "results", "schedules", "locks")}
