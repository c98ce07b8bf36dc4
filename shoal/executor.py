"""A :class:`concurrent.futures.Executor` running on a shoal cluster."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from .futures import Future

if TYPE_CHECKING:
    from .client import Client


class Executor(cf.Executor):
    """A :class:`concurrent.futures.Executor` over a shoal client.

    Code written for ``ProcessPoolExecutor`` runs unchanged::

        with client.executor() as ex:
            list(ex.map(f, range(10), timeout=30))
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._futures: "weakref.WeakSet[Future]" = weakref.WeakSet()
        self._shutdown = False
        self._lock = threading.Lock()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            # As the stdlib's executors do, every keyword goes to ``fn`` (none is
            # taken as a shoal task option, such as ``timeout`` or ``queue``).
            future = self.client._submit(fn, args, kwargs, None)
            self._futures.add(future)
            return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: Optional[float] = None,
            chunksize: int = 1) -> Iterator[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        result = self.client.map(fn, *iterables, batch_size=chunksize if chunksize > 1 else None,
                                 timeout=timeout)
        self._futures.update(result._batches)
        return iter(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = [f for f in list(self._futures) if not f.done()]
        if cancel_futures:  # as the stdlib does: only what has not started
            self.client.cancel(pending, running=False)
        if wait:
            cf.wait(pending)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=True)


