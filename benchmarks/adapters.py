"""One small adapter per tool: how shoal and each peer start, submit, map and stop.

Every adapter offers the same verbs, so ``peers.py`` runs the very same
workload code on each tool.  Each verb uses the tool's own idiom; where a
tool has several ways to map, :meth:`Adapter.map_variants` lists the
candidates and the workload keeps the fastest (the tool's best chunking).

Handles returned by :meth:`Adapter.submit` are the tool's own futures.  Every
wait is bounded by ``timeout`` seconds.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
import sys
from typing import Any, Callable, Iterable, Iterator, Optional

import bench_tasks
from bench_tasks import chunks

#: the task functions by name, as every tool except Celery receives them
FUNCTIONS = {"inc": bench_tasks.inc, "identity": bench_tasks.identity, "spin": bench_tasks.spin}
#: the per-chunk version of each, for tools whose map needs hand-made chunks
CHUNK_OF = {"inc": bench_tasks.inc_chunk, "spin": bench_tasks.spin_chunk}
#: items per chunk when a generator is fed to a tool that needs hand-made chunks
STREAM_CHUNK = 10_000

MapFn = Callable[[Iterable], list]


def split(seq: Any, parts: int) -> list:
    """``seq`` cut into ``parts`` contiguous lists of near-equal length."""
    items = list(seq)
    size = max(1, math.ceil(len(items) / parts))
    return [items[i:i + size] for i in range(0, len(items), size)]


def flatten(lists: Iterable[list]) -> list:
    return list(itertools.chain.from_iterable(lists))


class Adapter:
    """The verbs every tool offers; subclasses fill them in with the tool's idiom."""

    name = "?"
    #: where the tool's scheduler lives, for the memory figures
    broker_label = "broker"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def start(self, workers: int) -> None:
        """Start a local cluster of ``workers`` worker processes (may return before it is ready)."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def submit(self, fn: str, arg: Any) -> Any:
        """Submit ``FUNCTIONS[fn](arg)``; return the tool's future."""
        raise NotImplementedError

    def result(self, handle: Any) -> Any:
        raise NotImplementedError

    def call(self, fn: str, arg: Any) -> Any:
        """One task there and back."""
        return self.result(self.submit(fn, arg))

    def wait_all(self, handles: list) -> None:
        """Block until every handle is done."""
        for handle in handles:
            self.result(handle)

    def map_variants(self, fn: str, n: int, workers: int) -> list:
        """``[(label, map_fn)]``: the tool's ways to map ``fn`` over ``n`` items, idiom first."""
        raise NotImplementedError

    def stream(self, fn: str, items: Iterator) -> Iterator:
        """Map ``fn`` over a generator; yield the values in order."""
        raise NotImplementedError

    def broker_pids(self) -> Optional[list]:
        """Pids of the broker/scheduler processes, or None when it runs inside this process."""
        return None


# ------------------------------------------------------------------ shoal
class Shoal(Adapter):
    name = "shoal"

    def start(self, workers: int) -> None:
        import shoal
        logging.getLogger("shoal").setLevel(logging.ERROR)  # the 100 MB task's advice to scatter
        self.shoal = shoal
        self.cluster = shoal.Cluster(n_workers=workers, timeout=self.timeout)
        self.client = self.cluster.client()
        # on one host, clients and workers reach the broker over IPC when it offers it
        self.transport = "ipc" if getattr(self.cluster.info, "ipc", None) else "tcp"

    def stop(self) -> None:
        self.cluster.close()

    def submit(self, fn: str, arg: Any) -> Any:
        return self.client.submit(FUNCTIONS[fn], arg)

    def result(self, handle: Any) -> Any:
        return handle.result(self.timeout)

    def wait_all(self, handles: list) -> None:
        _, not_done = self.shoal.wait(handles, timeout=self.timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} tasks not done after {self.timeout} s")

    def map_variants(self, fn: str, n: int, workers: int) -> list:
        f = FUNCTIONS[fn]
        return [("client.map(f, items), default batching",
                 lambda seq: self.client.map(f, seq, timeout=self.timeout).result())]

    def stream(self, fn: str, items: Iterator) -> Iterator:
        return iter(self.client.map(FUNCTIONS[fn], items, timeout=self.timeout))

    def broker_pids(self) -> Optional[list]:
        return [self.cluster.broker.pid]


# ------------------------------------------------------------------ stdlib
class Stdlib(Adapter):
    name = "stdlib"
    broker_label = "in client"

    def _executor(self, workers: int):
        from concurrent.futures import ProcessPoolExecutor
        return ProcessPoolExecutor(max_workers=workers)

    def start(self, workers: int) -> None:
        self.ex = self._executor(workers)

    def stop(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: str, arg: Any) -> Any:
        return self.ex.submit(FUNCTIONS[fn], arg)

    def result(self, handle: Any) -> Any:
        return handle.result(self.timeout)

    def wait_all(self, handles: list) -> None:
        from concurrent.futures import wait
        _, not_done = wait(handles, timeout=self.timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} tasks not done after {self.timeout} s")

    def map_variants(self, fn: str, n: int, workers: int) -> list:
        f = FUNCTIONS[fn]
        sizes = dict.fromkeys([math.ceil(n / workers), math.ceil(n / (4 * workers))])
        return [(f"Executor.map(f, items, chunksize={c})",
                 lambda seq, c=c: list(self.ex.map(f, seq, chunksize=c, timeout=self.timeout)))
                for c in sizes]

    def stream(self, fn: str, items: Iterator) -> Iterator:
        return self.ex.map(FUNCTIONS[fn], items, chunksize=STREAM_CHUNK, timeout=self.timeout)


class Loky(Stdlib):
    name = "loky"

    def _executor(self, workers: int):
        from loky import get_reusable_executor
        return get_reusable_executor(max_workers=workers, timeout=None)

    def stop(self) -> None:
        self.ex.shutdown(wait=True, kill_workers=True)


# ------------------------------------------------------------------ Dask
class Dask(Adapter):
    name = "dask"
    broker_label = "in client"  # LocalCluster runs its scheduler in the client process

    def start(self, workers: int) -> None:
        from dask.distributed import Client, LocalCluster
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster, timeout=self.timeout)

    def stop(self) -> None:
        self.client.close(timeout=self.timeout)
        self.cluster.close(timeout=self.timeout)

    def submit(self, fn: str, arg: Any) -> Any:
        return self.client.submit(FUNCTIONS[fn], arg, pure=False)

    def result(self, handle: Any) -> Any:
        return handle.result(timeout=self.timeout)

    def wait_all(self, handles: list) -> None:
        from dask.distributed import wait
        wait(handles, timeout=self.timeout)

    def map_variants(self, fn: str, n: int, workers: int) -> list:
        import dask.bag as db
        f = FUNCTIONS[fn]
        parts = dict.fromkeys([workers, 4 * workers])
        return [(f"dask.bag.from_sequence(items, npartitions={p}).map(f)",
                 lambda seq, p=p: db.from_sequence(seq, npartitions=p).map(f).compute())
                for p in parts]

    def stream(self, fn: str, items: Iterator) -> Iterator:
        # Dask maps no iterators: the generator goes in chunks, all submitted at once.
        futures = self.client.map(CHUNK_OF[fn], list(chunks(items, STREAM_CHUNK)), pure=False)
        for future in futures:
            yield from future.result(timeout=self.timeout)
            future.release()


# ------------------------------------------------------------------ Ray
class Ray(Adapter):
    name = "ray"
    broker_label = "gcs+raylet"

    def start(self, workers: int) -> None:
        import ray
        self.ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        self.remote = {name: ray.remote(f) for name, f in FUNCTIONS.items()}
        self.remote_chunk = {name: ray.remote(f) for name, f in CHUNK_OF.items()}

    def stop(self) -> None:
        self.ray.shutdown()

    def submit(self, fn: str, arg: Any) -> Any:
        return self.remote[fn].remote(arg)

    def result(self, handle: Any) -> Any:
        return self.ray.get(handle, timeout=self.timeout)

    def wait_all(self, handles: list) -> None:
        ready, _ = self.ray.wait(handles, num_returns=len(handles), timeout=self.timeout)
        if len(ready) != len(handles):
            raise TimeoutError(f"{len(handles) - len(ready)} tasks not done after {self.timeout} s")

    def map_variants(self, fn: str, n: int, workers: int) -> list:
        f = self.remote_chunk[fn]
        parts = dict.fromkeys([workers, 4 * workers])
        return [(f"ray.get([f_chunk.remote(c) for c in {p} chunks])",
                 lambda seq, p=p: flatten(self.ray.get([f.remote(c) for c in split(seq, p)],
                                                       timeout=self.timeout)))
                for p in parts]

    def stream(self, fn: str, items: Iterator) -> Iterator:
        f = self.remote_chunk[fn]
        refs = [f.remote(c) for c in chunks(items, STREAM_CHUNK)]
        for ref in refs:
            yield from self.ray.get(ref, timeout=self.timeout)

    def broker_pids(self) -> Optional[list]:
        import psutil
        found = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.name() in ("gcs_server", "raylet"):
                    found.append(proc.pid)
            except psutil.Error:
                continue
        return found


# ------------------------------------------------------------------ ipyparallel
class IPyParallel(Adapter):
    name = "ipyparallel"
    broker_label = "controller"

    def start(self, workers: int) -> None:
        import ipyparallel as ipp
        self.workers = workers
        self.cluster = ipp.Cluster(n=workers, log_level=logging.ERROR)
        self.rc = self.cluster.start_and_connect_sync(activate=False)
        self.rc.wait_for_engines(workers, timeout=self.timeout)
        self.lview = self.rc.load_balanced_view()
        self.dview = self.rc[:]

    def stop(self) -> None:
        try:
            self.rc.close()
        finally:
            self.cluster.stop_cluster_sync()

    def submit(self, fn: str, arg: Any) -> Any:
        return self.lview.apply_async(FUNCTIONS[fn], arg)

    def result(self, handle: Any) -> Any:
        return handle.get(timeout=self.timeout)

    def wait_all(self, handles: list) -> None:
        if not self.rc.wait(handles, timeout=self.timeout):
            raise TimeoutError(f"tasks not done after {self.timeout} s")

    def map_variants(self, fn: str, n: int, workers: int) -> list:
        f = FUNCTIONS[fn]
        c = math.ceil(n / (4 * workers))
        return [
            ("DirectView.map(f, items): one chunk per engine",
             lambda seq: self.dview.map_async(f, seq).get(timeout=self.timeout)),
            (f"LoadBalancedView.map(f, items, chunksize={c})",
             lambda seq: self.lview.map_async(f, seq, chunksize=c).get(timeout=self.timeout)),
        ]

    def stream(self, fn: str, items: Iterator) -> Iterator:
        # imap consumes the generator lazily; two chunks in flight per engine
        results = self.lview.imap(CHUNK_OF[fn], chunks(items, STREAM_CHUNK),
                                  max_outstanding=2 * self.workers)
        for values in results:
            yield from values

    def broker_pids(self) -> Optional[list]:
        proc = self.cluster.controller.process
        return [proc.pid] + [p.pid for p in proc.children(recursive=True)]


# ------------------------------------------------------------------ Celery
class Celery(Adapter):
    name = "celery"
    broker_label = "redis-server"

    def start(self, workers: int) -> None:
        import celery_app
        self.tasks = {"inc": celery_app.inc, "identity": celery_app.identity,
                      "spin": celery_app.spin}
        self.chunk_tasks = {"inc": celery_app.inc, "spin": celery_app.spin}
        celery_app.app.control.purge()  # nothing left over from a workload that failed
        self.log_path = os.path.join(os.environ.get("BENCH_LOG_DIR", "/tmp"),
                                     f"celery-{os.getpid()}.log")
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        if os.geteuid() == 0:
            # Celery refuses pickle as root unless told; the broker is our own loopback Redis.
            env["C_FORCE_ROOT"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
             "--concurrency", str(workers), "--pool", "prefork", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--hostname", f"bench{os.getpid()}@localhost"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()

    def stop(self) -> None:
        self.proc.terminate()  # warm shutdown: the pool's children go with it
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def submit(self, fn: str, arg: Any) -> Any:
        return self.tasks[fn].delay(arg)

    def result(self, handle: Any) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout
        try:
            return handle.get(timeout=1.0)
        except CeleryTimeout:  # slow, or no worker at all: look before waiting longer
            self._check_worker()
            return handle.get(timeout=self.timeout)

    def _check_worker(self) -> None:
        if self.proc.poll() is not None:
            with open(self.log_path, errors="replace") as fh:
                tail = fh.read()[-400:].strip().replace("\n", " ")
            raise RuntimeError(f"the celery worker exited with code {self.proc.returncode}: "
                               f"{tail}")

    def wait_all(self, handles: list) -> None:
        from celery.result import ResultSet
        ResultSet(handles).get(timeout=self.timeout)

    def map_variants(self, fn: str, n: int, workers: int) -> list:
        task = self.chunk_tasks[fn]
        sizes = dict.fromkeys([math.ceil(n / workers), math.ceil(n / (4 * workers))])
        return [(f"task.chunks(items, {c}).group()",
                 lambda seq, c=c: flatten(task.chunks(((x,) for x in seq), c).group()
                                          .apply_async().get(timeout=self.timeout)))
                for c in sizes]

    def stream(self, fn: str, items: Iterator) -> Iterator:
        task = self.chunk_tasks[fn]
        group = task.chunks(((x,) for x in items), STREAM_CHUNK).group().apply_async()
        for result in group.results:
            yield from result.get(timeout=self.timeout)

    def broker_pids(self) -> Optional[list]:
        pid = os.environ.get("BENCH_REDIS_PID")
        return [int(pid)] if pid else None


ADAPTERS = {cls.name: cls for cls in (Shoal, Stdlib, Loky, Dask, IPyParallel, Ray, Celery)}
#: the import that tells whether a tool is installed
IMPORTS = {"shoal": "shoal", "stdlib": "concurrent.futures", "loky": "loky",
           "dask": "distributed", "ipyparallel": "ipyparallel", "ray": "ray",
           "celery": "celery"}
