"""Futures as task arguments: the task waits for them and receives their results.

>>> raw = client.submit(load, "day-1.csv")
>>> clean = client.submit(tidy, raw)           # runs once ``raw`` is done, with its result
>>> report = client.submit(summarise, [clean, other], by={"day": raw})

While a task's arguments are pickled (see :func:`shoal.refs.collect_refs`), a
future of the same client pickles as a placeholder that the worker resolves
from its object store, and its key is noted in the unit's ``dp`` field.  The
broker holds the task until those tasks have finished, then ships their
results to the worker as it ships scattered data: worker to broker to
worker, never through the client.  A dependency that failed fails the task
with :class:`~shoal.errors.DependencyFailed`.

A future already done is named by its key too: the broker keeps single tasks'
results, and asks the client (which then sends it) for one it did not keep.
A map's item futures, and a whole :class:`~shoal.MapResult`, may be passed too.
"""
from __future__ import annotations

from typing import Any

from .errors import DependencyFailed
from .refs import collecting

class AlreadyFailed(BaseException):
    """Raised while pickling a task that takes a future which already failed.

    A BaseException, so pickling's own ``except Exception`` handlers let it
    through to ``submit``, which returns a failed future instead of sending.
    """

    def __init__(self, dependency: Any, reason: str = "", cause: Any = None) -> None:
        super().__init__(dependency)
        self.dependency = dependency
        self.reason = reason
        self.cause = cause


def reduce_future(future) -> tuple:
    """``__reduce__`` of a :class:`shoal.Future` pickled as a task's argument."""
    context = collecting()
    if context is None or future._task_key is None:
        raise TypeError(
            "a shoal.Future can only be pickled as an argument of a task, which then waits for "
            "it and receives its result: client.submit(fn, future). To send its value "
            "elsewhere, send future.result()")
    client, refs, deps = context
    if future._client is not client:
        raise TypeError(f"this task takes a future of another client ({future!r}); pass "
                        "future.result() instead, or submit both tasks with the same client")
    if future.done() and (future.cancelled() or future.exception() is not None):
        raise AlreadyFailed(future)
    # Done or not, by key: the broker has a finished single task's result, and
    # for one it does not keep (a map batch, a large result) it asks this
    # client, which holds the future until the task that takes it is done.
    return _by_key(client, future, refs, deps)


def _by_key(client, future, refs: list, deps: list) -> tuple:
    key = future._task_key
    refs.append(key)
    deps.append(key)
    # For a map item the broker may ask for the whole batch's value.
    client._hold_dependency(key, future if future._item is None else future._batch)
    if future._item is None:
        from .worker import resolve_ref
        return resolve_ref, (key,)
    return resolve_item, (key, future._item)


def reduce_map(result) -> tuple:
    """``__reduce__`` of a :class:`shoal.MapResult` pickled as a task's argument:
    the task receives the list of its values."""
    context = collecting()
    if context is None:
        raise TypeError("a MapResult can only be pickled as an argument of a task, which then "
                        "receives the list of its values: client.submit(fn, map_result)")
    client, refs, deps = context
    if result.client is not client:
        raise TypeError("this task takes a MapResult of another client; pass its values instead")
    parts = []
    for batch in result._all_batches():
        if batch.done():
            if batch.cancelled() or batch.exception() is not None:
                raise AlreadyFailed(batch)
            values, errors = batch.result()
            if errors:
                index = min(errors)
                exc = errors[index][0]
                raise AlreadyFailed(batch, f"item {batch.start + index} raised "
                                           f"{type(exc).__name__}: {exc}", exc)
            parts.append(list(values))
        else:
            key = batch._task_key
            refs.append(key)
            deps.append(key)
            client._hold_dependency(key, batch)
            parts.append(key)
    return resolve_parts, (parts,)


def resolve_item(key: bytes, index: int) -> Any:
    """Unpickling hook on a worker: item ``index`` of the map batch named ``key``."""
    from .records import task_id
    from .worker import store
    values, errors = store.get(key)
    if index in errors:
        exc, _tb = errors[index]
        raise DependencyFailed(None, f"{task_id(key)}/{index}",
                               f"raised {type(exc).__name__}: {exc}") from exc
    return values[index]


def resolve_parts(parts: list) -> list:
    """Unpickling hook on a worker: a whole map's values, from finished values
    sent with the task and batches named by key."""
    from .records import task_id
    from .worker import store
    out: list = []
    for part in parts:
        if isinstance(part, bytes):
            values, errors = store.get(part)
            if errors:
                index = min(errors)
                exc, _tb = errors[index]
                raise DependencyFailed(None, f"{task_id(part)}/{index}",
                                       f"raised {type(exc).__name__}: {exc}") from exc
            out.extend(values)
        else:
            out.extend(part)
    return out


def already_failed(task: Any, failed: AlreadyFailed) -> DependencyFailed:
    """The error of a task submitted with a future that had already failed."""
    dependency = failed.dependency
    reason, cause = failed.reason, failed.cause
    root = root_reason = None
    if not reason:
        if dependency.cancelled():
            reason = "was cancelled"
        else:
            cause = dependency.exception()
            if isinstance(cause, DependencyFailed):  # it did not run either
                root, root_reason = cause.root, cause.root_reason
                reason = f"did not run because task {root} {root_reason}"
                cause = cause.__cause__
            else:
                reason = f"raised {type(cause).__name__}: {cause}"
    error = DependencyFailed(task, dependency.task_id, reason, root, root_reason)
    error.__cause__ = cause
    return error
