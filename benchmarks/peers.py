"""Run the side-by-side workloads on one tool, in this process, and write JSON.

    python benchmarks/peers.py --tool dask --part main --workers 2 --json out.json

``compare.py`` starts one such process per tool and part, so each tool runs
in a clean process with no cross-talk; run it by hand to debug one tool.
The parts:

- ``main``: cluster start to first result, round-trip latency, 10,000
  submits, the trivial map, a map of 10 trivial items, the 5 ms map and the
  100 MB array;
- ``stream``: a map over a generator of 1,000,000 items, with the peak memory
  of this (client) process and of the broker, in a fresh process so that
  earlier workloads do not inflate the figures;
- ``scale``: the trivial map (best variant again at each size) and the 5 ms
  map with 1, 2, 4, ... workers.

Every workload records its figures or, when it fails, its error, and the
next one runs.  Every wait is bounded by ``--op-timeout`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Workers import the task functions from bench_tasks.py, here, as this process does.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.abspath(__file__))] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p])

from adapters import ADAPTERS, Adapter  # noqa: E402
from bench_tasks import SPIN_SECONDS  # noqa: E402


def percentile(values: list, q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Sizes:
    """How much work each workload does: full figures, or a quick pass."""

    def __init__(self, quick: bool, repeats: Optional[int]) -> None:
        self.repeats = repeats or (1 if quick else 3)
        self.startups = 1 if quick else 3
        self.latency_n = 300 if quick else 2_000
        self.submit_n = 2_000 if quick else 10_000
        self.map_n = 20_000
        self.small_map_n = 10
        self.small_map_times = 50 if quick else 200
        self.spin_n = 200 if quick else 2_000
        self.array_mb = 100
        self.array_repeats = 2 if quick else 5
        self.stream_n = 100_000 if quick else 1_000_000
        self.scale_spin_n = 100 if quick else 500


# ----------------------------------------------------------------- workloads
def bench_startup(make: Callable[[], Adapter], workers: int, times: int) -> tuple:
    """Start a cluster and get one result, ``times`` times; keep the last cluster running."""
    samples = []
    adapter = None
    for i in range(times):
        adapter = make()
        start = time.perf_counter()
        adapter.start(workers)
        try:
            assert adapter.call("inc", 1) == 2
            samples.append(time.perf_counter() - start)
        except BaseException:
            adapter.stop()
            raise
        if i < times - 1:
            adapter.stop()
    return adapter, {"startup_s": statistics.median(samples), "startup_samples": samples}


def bench_latency(a: Adapter, n: int, rounds: int) -> dict:
    """``n`` tasks, each awaited before the next is sent, in ``rounds`` rounds.

    The median is the median of the rounds' medians, so a burst of other work
    on the machine during one round moves it little; the p99 is over all tasks.
    """
    for i in range(50):  # warm-up: function cached on the workers, sockets connected
        a.call("inc", i)
    samples, medians = [], []
    per_round = max(1, n // rounds)
    for r in range(rounds):
        mine = []
        for i in range(r * per_round, (r + 1) * per_round):
            start = time.perf_counter()
            value = a.call("inc", i)
            mine.append(time.perf_counter() - start)
            assert value == i + 1
        medians.append(statistics.median(mine))
        samples += mine
    return {"latency_median_us": statistics.median(medians) * 1e6,
            "latency_p99_us": percentile(samples, 99) * 1e6, "latency_n": len(samples),
            "latency_round_medians_us": [m * 1e6 for m in medians]}


def bench_submit(a: Adapter, n: int, repeats: int) -> dict:
    """``n`` individual submits, then wait for all of them."""
    def run() -> None:
        handles = [a.submit("inc", i) for i in range(n)]
        a.wait_all(handles)
        assert a.result(handles[-1]) == n
    run()  # warm-up
    rates = [n / timed(run) for _ in range(repeats)]
    return {"submit_per_s": statistics.median(rates), "submit_samples": rates, "submit_n": n}


def _best_variant(a: Adapter, fn: str, n: int, workers: int, repeats: int,
                  check: Callable[[list], None]) -> tuple:
    """Time each of the tool's map variants; return (index, label, median s, samples, all)."""
    variants = list(enumerate(a.map_variants(fn, n, workers)))
    timings = {}
    index_of = {}
    for index, (label, run) in variants:
        index_of[label] = index
        check(run(range(n)))  # warm-up: pools started, functions cached, batch sizes learnt
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run(range(n))
            samples.append(time.perf_counter() - start)
            check(out)
        timings[label] = samples
    best = min(timings, key=lambda label: statistics.median(timings[label]))
    return index_of[best], best, statistics.median(timings[best]), timings[best], timings


def bench_map(a: Adapter, n: int, workers: int, repeats: int) -> dict:
    """The trivial map: each tool's idiomatic map with its best chunking."""
    def check(out: list) -> None:
        assert len(out) == n and out[-1] == n
    index, label, median, samples, every = _best_variant(a, "inc", n, workers, repeats, check)
    return {"map_per_s": n / median, "map_samples": [n / s for s in samples], "map_n": n,
            "map_variant": label, "map_variant_index": index,
            "map_variants": {k: n / statistics.median(v) for k, v in every.items()}}


def bench_small_map(a: Adapter, n: int, workers: int, times: int) -> dict:
    """A map of ``n`` trivial items, the size a notebook maps every day, ``times`` times
    one after another: the median time of one, with the tool's best chunking (one chunk
    included: for so little work spreading it may cost more than it saves)."""
    variants = dict(a.map_variants("inc", n, workers) + a.map_variants("inc", n, 1))
    expected = list(range(1, n + 1))
    medians = {}
    for label, run in variants.items():
        assert run(range(n)) == expected  # warm-up
        samples = []
        for _ in range(times):
            start = time.perf_counter()
            out = run(range(n))
            samples.append(time.perf_counter() - start)
            assert out == expected
        medians[label] = statistics.median(samples)
    best = min(medians, key=medians.get)
    return {"small_map_us": medians[best] * 1e6, "small_map_n": n, "small_map_variant": best,
            "small_map_variants_us": {k: v * 1e6 for k, v in medians.items()}}


def bench_spin(a: Adapter, n: int, workers: int, repeats: int) -> dict:
    """``n`` tasks of 5 ms CPU each; efficiency is ideal time (n x 5 ms / workers) / actual."""
    # The chunking for tasks this long: the tool's finer candidate (four chunks per
    # worker), so that one slow chunk does not hold up the end; shoal has only its own.
    label, run = a.map_variants("spin", n, workers)[-1]
    run(range(min(n, 8 * workers)))  # warm-up, small
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(range(n))
        samples.append(time.perf_counter() - start)
        assert len(out) == n and out[-1] == n - 1
    ideal = n * SPIN_SECONDS / workers
    median = statistics.median(samples)
    return {"spin_efficiency": ideal / median, "spin_s": median, "spin_ideal_s": ideal,
            "spin_samples": samples, "spin_n": n, "spin_variant": label}


def bench_array(a: Adapter, megabytes: int, repeats: int) -> dict:
    """``identity(arr)`` there and back, ``arr`` a NumPy float64 array of ``megabytes`` MiB."""
    import numpy as np
    arr = np.arange(megabytes * 2**20 // 8, dtype=np.float64)
    a.call("identity", arr[:1024])  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = a.call("identity", arr)
        samples.append(time.perf_counter() - start)
        assert out.shape == arr.shape and out[-1] == arr[-1]
        del out
    return {"array_median_s": statistics.median(samples), "array_best_s": min(samples),
            "array_samples": samples, "array_mb": megabytes}


def _reset_hwm(pid: int) -> bool:
    """Linux: reset the kernel's resident high-water mark of ``pid`` (VmHWM)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm(pid: int) -> int:
    """Linux: the resident high-water mark of ``pid`` in bytes, or 0."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory(threading.Thread):
    """The peak resident memory of this process and of the ``broker`` pids during a run.

    psutil samples every 10 ms; on Linux the kernel's high-water mark, reset at
    the start, also catches peaks between samples.  The broker figure is the
    sum over its processes (sampled together; the high-water marks of several
    processes need not coincide, so for them the samples count).
    """

    def __init__(self, broker: Optional[list], interval: float = 0.01) -> None:
        super().__init__(daemon=True, name="peak-memory")
        import psutil
        self.client = psutil.Process()
        self.broker = [psutil.Process(pid) for pid in broker or ()]
        self.interval = interval
        self.stopped = threading.Event()
        self.client_peak = self.client_base = self.client.memory_info().rss
        self.broker_base = self.broker_peak = self._broker_rss()
        self.hwm = {pid: _reset_hwm(pid) for pid in [os.getpid()] + list(broker or ())}

    def _broker_rss(self) -> int:
        total = 0
        for proc in self.broker:
            try:
                total += proc.memory_info().rss
            except Exception:  # a scheduler child that went away
                pass
        return total

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.client_peak = max(self.client_peak, self.client.memory_info().rss)
            if self.broker:
                self.broker_peak = max(self.broker_peak, self._broker_rss())

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        if self.hwm.get(os.getpid()):
            self.client_peak = max(self.client_peak, _hwm(os.getpid()))
        if len(self.broker) == 1 and self.hwm.get(self.broker[0].pid):
            self.broker_peak = max(self.broker_peak, _hwm(self.broker[0].pid))


def bench_stream(a: Adapter, n: int) -> dict:
    """A map over a generator of ``n`` items, consumed as results arrive."""
    assert sum(a.stream("inc", (i for i in range(1000)))) == 500_500  # warm-up
    broker = a.broker_pids()
    sampler = PeakMemory(broker)
    sampler.start()
    start = time.perf_counter()
    total = count = 0
    try:
        for value in a.stream("inc", (i for i in range(n))):
            total += value
            count += 1
    finally:
        elapsed = time.perf_counter() - start
        sampler.stop()
    assert count == n and total == n * (n + 1) // 2
    mb = 1 / 2**20
    return {"stream_per_s": n / elapsed, "stream_n": n,
            "stream_client_peak_mb": sampler.client_peak * mb,
            "stream_client_base_mb": sampler.client_base * mb,
            "stream_broker_peak_mb": sampler.broker_peak * mb if broker else None,
            "stream_broker_base_mb": sampler.broker_base * mb if broker else None,
            "stream_broker": a.broker_label}


def worker_ladder(cores: int) -> list:
    """1, 2, 4, ... up to ``cores`` (and ``cores`` itself when it is no power of two)."""
    ladder = [1]
    while ladder[-1] * 2 <= cores:
        ladder.append(ladder[-1] * 2)
    if ladder[-1] != cores:
        ladder.append(cores)
    return ladder


# ----------------------------------------------------------------- parts
def guarded(results: dict, name: str, fn: Callable[[], dict]) -> None:
    """Run one workload; record its figures, or its error and go on."""
    start = time.perf_counter()
    try:
        results.update(fn())
    except Exception as exc:  # noqa: BLE001 - one workload failing must not stop the rest
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 2)
    print(f"[{results['tool']}] {name} done in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


def part_main(make: Callable[[], Adapter], args, sizes: Sizes, results: dict) -> None:
    w = args.workers
    holder: dict = {}

    def startup() -> dict:
        holder["a"], figures = bench_startup(make, w, sizes.startups)
        return figures
    guarded(results, "startup", startup)
    a = holder.get("a")
    if a is None:
        return
    if getattr(a, "transport", None):
        results["transport"] = a.transport
    try:
        guarded(results, "latency",
                lambda: bench_latency(a, sizes.latency_n, sizes.repeats))
        guarded(results, "submit", lambda: bench_submit(a, sizes.submit_n, sizes.repeats))
        guarded(results, "map", lambda: bench_map(a, sizes.map_n, w, sizes.repeats))
        guarded(results, "small_map",
                lambda: bench_small_map(a, sizes.small_map_n, w, sizes.small_map_times))
        guarded(results, "spin", lambda: bench_spin(a, sizes.spin_n, w, sizes.repeats))
        guarded(results, "array",
                lambda: bench_array(a, sizes.array_mb, sizes.array_repeats))
    finally:
        a.stop()


def part_stream(make: Callable[[], Adapter], args, sizes: Sizes, results: dict) -> None:
    a = make()
    a.start(args.workers)
    try:
        guarded(results, "stream", lambda: bench_stream(a, sizes.stream_n))
    finally:
        a.stop()


def part_scale(make: Callable[[], Adapter], args, sizes: Sizes, results: dict) -> None:
    scaling: dict = {}
    results["scaling"] = scaling
    for w in worker_ladder(args.cores):
        a = make()
        a.start(w)
        try:
            a.call("inc", 1)
            point: dict = {}
            try:
                point.update(bench_map(a, sizes.map_n, w, sizes.repeats))
            except Exception as exc:  # noqa: BLE001
                point["map_error"] = f"{type(exc).__name__}: {exc}"[:300]
            try:
                point.update(bench_spin(a, sizes.scale_spin_n, w, sizes.repeats))
            except Exception as exc:  # noqa: BLE001
                point["spin_error"] = f"{type(exc).__name__}: {exc}"[:300]
            scaling[str(w)] = {k: point[k] for k in ("map_per_s", "spin_efficiency", "map_error",
                                                     "spin_error", "map_variant", "spin_variant",
                                                     "spin_s")
                               if k in point}
        finally:
            a.stop()
        print(f"[{results['tool']}] scale {w} workers: {scaling[str(w)]}", file=sys.stderr,
              flush=True)


PARTS = {"main": part_main, "stream": part_stream, "scale": part_scale}


def versions(tool: str) -> dict:
    from importlib import metadata
    names = {"shoal": ["shoal", "pyzmq"], "stdlib": [], "loky": ["loky"],
             "dask": ["dask", "distributed"], "ipyparallel": ["ipyparallel"], "ray": ["ray"],
             "celery": ["celery", "redis", "kombu"]}[tool]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", required=True, choices=sorted(ADAPTERS))
    parser.add_argument("--part", required=True, choices=sorted(PARTS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--op-timeout", type=float, default=120.0)
    parser.add_argument("--json", required=True, metavar="PATH")
    args = parser.parse_args(argv)
    # SIGTERM from the runner unwinds like Ctrl-C, so every cluster is stopped
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sizes = Sizes(args.quick, args.repeats)
    results: dict = {"tool": args.tool, "part": args.part, "workers": args.workers,
                     "versions": versions(args.tool)}

    def make() -> Adapter:
        return ADAPTERS[args.tool](args.op_timeout)
    try:
        PARTS[args.part](make, args, sizes, results)
    except Exception as exc:  # noqa: BLE001 - the report says why
        results["fatal"] = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()
    finally:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 1 if "fatal" in results else 0


if __name__ == "__main__":
    sys.exit(main())
