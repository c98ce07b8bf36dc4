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


def collect_refs(pickle: Callable[[], Any]) -> tuple[Any, list]:
    _collecting.refs = refs = []
    try:
        return pickle(), refs
    finally:
        _collecting.refs = None


