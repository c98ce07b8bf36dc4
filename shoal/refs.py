"""Data scattered to the workers once, and the references tasks carry instead.

A :class:`Ref` pickles as a call to ``shoal.worker.resolve_ref(digest)``, so a
task that receives one receives the object itself, from the worker's store.
While pickling a task, :func:`collect_refs` notes the refs it carries, so the
broker can ship their data to a worker before the task.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

_collecting = threading.local()


class Ref:
    """A reference to data scattered to the workers; tasks receive the object itself.

    >>> table = client.scatter(big_table)      # sent once
    >>> client.submit(lookup, table, "key")    # each task gets big_table
    """

    __slots__ = ("digest", "nbytes", "type_name")

    def __init__(self, digest: bytes, nbytes: int, type_name: str) -> None:
        self.digest = digest
        self.nbytes = nbytes
        self.type_name = type_name

    def __reduce__(self):
        refs = getattr(_collecting, "refs", None)
        if refs is not None:
            refs.append(self.digest)
        from .worker import resolve_ref
        return resolve_ref, (self.digest,)

    def __repr__(self) -> str:
        return f"<shoal.Ref {self.type_name} {self.nbytes} bytes {self.digest.hex()[:8]}>"


def collect_refs(pickle: Callable[[], Any], client: Any = None) -> tuple[Any, list]:
    """Run ``pickle()`` noting the refs it pickles: ``(its value, refs)``.

    With ``client``, futures of that client may be pickled too (a task that
    takes them waits for their results); their keys are in ``deps()`` after.
    """
    _collecting.refs = refs = []
    _collecting.deps = [] if client is not None else None
    _collecting.client = client
    try:
        return pickle(), refs
    finally:
        _collecting.refs = None
        _collecting.client = None


def collecting():
    """``(client, refs, deps)`` while a task of ``client`` is being pickled, else None."""
    client = getattr(_collecting, "client", None)
    if client is None:
        return None
    return client, _collecting.refs, _collecting.deps


def collected_deps() -> list:
    """The keys of the futures the last :func:`collect_refs` pickled (in order, unique)."""
    deps = getattr(_collecting, "deps", None) or []
    _collecting.deps = None
    return list(dict.fromkeys(deps))


