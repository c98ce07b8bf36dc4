"""A joblib backend: joblib's and scikit-learn's parallel loops on a shoal cluster.

::

    import joblib
    import shoal.joblib            # registers the "shoal" backend (%load_ext shoal does too)

    with joblib.parallel_config(backend="shoal"):
        GridSearchCV(estimator, grid, n_jobs=-1).fit(X, y)

The backend uses ``shoal.get_client()`` (the latest client made), or the
client given as ``parallel_config(backend="shoal", client=client)``.  joblib
batches quick calls itself; each batch is one shoal task.  Parallel loops
nested inside a task run sequentially on its worker.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

__all__ = ["ShoalBackend", "register"]


class ShoalBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib ``ParallelBackendBase`` that submits each batch of calls as a shoal task."""

    supports_retrieve_callback = True
    default_n_jobs = -1
    # Batches taking 0.05 to 1 s keep the per-task overhead (well under 1 ms) negligible.
    MIN_IDEAL_BATCH_DURATION = 0.05
    MAX_IDEAL_BATCH_DURATION = 1.0

    def __init__(self, client: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client = client
        self._pending: set = set()
        self._lock = threading.Lock()
        self._callbacks: Optional[ThreadPoolExecutor] = None

    def __reduce__(self):
        # joblib may pickle the backend with a batch; a worker gets a fresh one.
        return (ShoalBackend, ())

    @property
    def client(self) -> Any:
        """The shoal client tasks go to."""
        if self._client is None or self._client._closed:
            from .client import get_client
            try:
                self._client = get_client()
            except ValueError:
                raise RuntimeError(
                    "the joblib backend 'shoal' needs a shoal client: start a cluster first "
                    "(`%shoal start`, or shoal.Cluster().client()), or pass one with "
                    "parallel_config(backend='shoal', client=client)") from None
        return self._client

    def effective_n_jobs(self, n_jobs: Optional[int]) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        client = self.client
        slots = client.slots
        if not slots:
            client.wait_for_workers(1)
            slots = max(1, client.status()["slots"])
        if n_jobs is None or n_jobs < 0:
            return slots
        return min(n_jobs, slots)

    def configure(self, n_jobs: int = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def start_call(self) -> None:
        # joblib's completion callback may dispatch (and pickle) the next batch:
        # run it on our own thread, never on the client's IO thread.
        if self._callbacks is None:
            self._callbacks = ThreadPoolExecutor(1, thread_name_prefix="shoal-joblib")

    def stop_call(self) -> None:
        pool, self._callbacks = self._callbacks, None
        if pool is not None:
            pool.shutdown(wait=False)

    def terminate(self) -> None:
        self.stop_call()

    def submit(self, func: Callable, callback: Optional[Callable] = None) -> Any:
        future = self.client.submit(func)
        future.get = future.result  # the AsyncResult API joblib may call
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(lambda f: self._run_callback(callback, f))
        return future

    def _forget(self, future: Any) -> None:
        with self._lock:
            self._pending.discard(future)

    def _run_callback(self, callback: Callable, future: Any) -> None:
        pool = self._callbacks
        if pool is None:
            callback(future)
            return
        try:
            pool.submit(callback, future)
        except RuntimeError:  # the pool was shut down: the call is over
            callback(future)

    def retrieve_result_callback(self, out: Any) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
        if pending:
            self.client.cancel(pending)

    def get_nested_backend(self):
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def register() -> None:
    """Register the backend under the name ``"shoal"`` (done on import)."""
    register_parallel_backend("shoal", ShoalBackend)


register()
