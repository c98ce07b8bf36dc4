"""A task's outcome on the wire, turned into its future's result or exception."""
from __future__ import annotations

from typing import Any, Iterable

from . import serialize
from .errors import BrokerError, DependencyFailed, RemoteError, TaskNotUnique, WorkerLost
from .futures import Encoded, Future, attach_traceback, cancel_and_notify
from .mapping import _Batch
from .records import parse_task_id


def settle(target: Future, status: str, frames: list, meta: dict, held: Iterable = ()) -> None:
    """Resolve a task's future from its outcome on the wire."""
    target.worker = meta.get("w")
    target.started = meta.get("s")
    target.duration = meta.get("t")
    if "o" in meta or "e" in meta:
        target._final_output(meta.get("o", ""), meta.get("e", ""))
    if isinstance(target, _Batch):
        target.failed = meta.get("f", 0)
        target.map.observe(meta)
    if target.done():  # cancelled meanwhile
        return
    if status == "ok":
        if "sb" in meta:
            held = list(held)
            for name in serialize.segment_names(meta):
                if name not in serialize.segments.created:
                    # The worker's segment: map it now and unlink its name, so it is
                    # freed with the result even if the result is never read.
                    held.append(serialize.segments.open(name))
                    serialize.segments.unlink(name)
        target.set_result(Encoded(_WireValue(frames, meta, held)))
    elif status == "cancelled":
        cf_cancel(target)
    elif status == "lost":
        if isinstance(target, _Batch) and target.map.split(target):
            return  # its items rerun one by one; only one that kills again fails
        target.set_exception(WorkerLost(target.key, meta.get("lost", [])))
    elif status == "dep":
        target.set_exception(_dependency_failed(target, meta))
    elif status == "berr":
        text = str(meta.get("msg", "the broker refused the task"))
        target.set_exception(TaskNotUnique(text, meta["uq"], meta.get("holder")) if "uq" in meta
                             else BrokerError(text))
    else:
        target.set_exception(decode_exception(frames, meta.get("w", "")))


def _dependency_failed(target: Future, meta: dict) -> DependencyFailed:
    """DependencyFailed for ``target``, caused by the dependency's own error when known."""
    dependency = str(meta.get("dep", "?"))
    error = DependencyFailed(target.task_id, dependency, str(meta.get("why", "failed")),
                             meta.get("root"), meta.get("rwhy"))
    client = target._client
    if client is not None:
        try:
            key = parse_task_id(str(meta.get("root", dependency)))
        except ValueError:
            key = None
        entry = client._dependencies.get(key) if key else None
        if entry is not None and entry[0].done() and not entry[0].cancelled():
            cause = entry[0].exception()
            error.__cause__ = cause.__cause__ if isinstance(cause, DependencyFailed) else cause
    return error


def cf_cancel(future) -> bool:
    """Mark a future cancelled locally, without asking the broker."""
    return cancel_and_notify(future)


class _WireValue:
    """A result's frames, unpickled when first asked for (the ``decode`` of an
    :class:`~shoal.futures.Encoded`).  ``held`` keeps shared-memory mappings
    alive until then; the decoded value keeps them from then on."""

    __slots__ = ("frames", "meta", "held")

    def __init__(self, frames: list, meta: dict, held: Any) -> None:
        self.frames, self.meta, self.held = frames, meta, held

    def __call__(self) -> Any:
        try:
            return serialize.loads(self.frames, self.meta)
        finally:
            self.held = ()


def decode_exception(frames: list, worker: str) -> BaseException:
    """The exception a worker sent, with its remote traceback as ``__cause__``."""
    try:
        exc, tb_text = serialize.loads(frames)
    except Exception as err:
        return RemoteError("UndecodableError", f"the task failed on {worker} and its exception "
                           f"could not be unpickled here: {err}")
    return attach_traceback(exc, tb_text, worker)
