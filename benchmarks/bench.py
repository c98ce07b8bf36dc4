"""shoal benchmarks: start-up, latency and throughput of a 2-worker local cluster.

    python benchmarks/bench.py                 # full run (about ten seconds)
    python benchmarks/bench.py --quick         # fewer repetitions, for a smoke test
    python benchmarks/bench.py --json out.json # also write the figures as JSON

The task functions are defined here, in ``__main__``, so cloudpickle ships them
by value: the workers need not import this file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import shoal

#: name -> (comparison, threshold, unit): what "good enough" means for each figure.
TARGETS = {
    "cluster_ready_s": ("<", 1.0, "s"),
    "round_trip_median_us": ("<", 350.0, "us"),
    "submit_tasks_per_s": (">", 15_000.0, "/s"),
    "map_tasks_per_s": (">", 300_000.0, "/s"),
    "array_100mb_median_s": ("<", 0.2, "s"),
}


def inc(x: int) -> int:
    return x + 1


def identity(x: Any) -> Any:
    return x


def percentile(values: list, q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------- benchmarks
def bench_round_trip(client: shoal.Client, n: int) -> dict:
    """``client.submit(inc, i).result()`` one after another."""
    for i in range(50):  # warm-up: function cached on both workers, sockets connected
        client.submit(inc, i).result()
    samples = [timed(lambda i=i: client.submit(inc, i).result()) for i in range(n)]
    return {"round_trip_median_us": statistics.median(samples) * 1e6,
            "round_trip_p99_us": percentile(samples, 99) * 1e6,
            "round_trip_n": n}


def bench_submit(client: shoal.Client, n: int, repeats: int) -> dict:
    """``n`` individual submits, then wait for all of them."""
    def run() -> None:
        futures = [client.submit(inc, i) for i in range(n)]
        shoal.wait(futures)
        assert futures[-1].result() == n
    run()  # warm-up
    rates = [n / timed(run) for _ in range(repeats)]
    return {"submit_tasks_per_s": statistics.median(rates), "submit_samples": rates,
            "submit_n": n}


def bench_map(client: shoal.Client, n: int, repeats: int) -> dict:
    """``client.map(inc, range(n)).result()`` over trivial items."""
    def run() -> None:
        values = client.map(inc, range(n)).result()
        assert values[-1] == n
    run()  # warm-up: the map learns the per-item time and sizes its batches
    rates = [n / timed(run) for _ in range(repeats)]
    return {"map_tasks_per_s": statistics.median(rates), "map_samples": rates, "map_n": n}


def bench_array(client: shoal.Client, megabytes: int, repeats: int) -> dict:
    """``client.submit(identity, arr).result()`` for a NumPy array of ``megabytes`` MiB."""
    try:
        import numpy as np
    except ImportError:
        return {}
    arr = np.arange(megabytes * 2**20 // 8, dtype=np.float64)
    client.submit(identity, arr[:1024]).result()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = client.submit(identity, arr).result()
        samples.append(time.perf_counter() - start)
        assert out.shape == arr.shape and out[-1] == arr[-1]
        del out
    return {"array_100mb_best_s": min(samples), "array_100mb_median_s": statistics.median(samples),
            "array_100mb_samples": samples, "array_mb": megabytes}


def bench_submit_store(n: int, repeats: int, workers: int) -> dict:
    """The same submits on a cluster whose broker has a store (``--store``): each
    pass's writes are committed before its tasks are acknowledged."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        with shoal.Cluster(n_workers=workers, store=os.path.join(tmp, "broker.db")) as cluster:
            client = cluster.client()
            figures = bench_submit(client, n, repeats)
    return {"submit_store_tasks_per_s": figures["submit_tasks_per_s"],
            "submit_store_samples": figures["submit_samples"]}


def run_all(quick: bool, workers: int) -> dict:
    results: dict = {}
    start = time.perf_counter()
    cluster = shoal.Cluster(n_workers=workers)
    results["cluster_ready_s"] = time.perf_counter() - start
    try:
        client = cluster.client()
        results.update(bench_round_trip(client, 300 if quick else 2_000))
        results.update(bench_submit(client, 2_000 if quick else 10_000, 1 if quick else 3))
        results.update(bench_map(client, 20_000, 1 if quick else 3))
        results.update(bench_array(client, 100, 2 if quick else 5))
    finally:
        start = time.perf_counter()
        cluster.close()
        results["cluster_close_s"] = time.perf_counter() - start
    results.update(bench_submit_store(2_000 if quick else 10_000, 1 if quick else 3, workers))
    return results


# ----------------------------------------------------------------- report
ROWS = [  # (key, label, scale, format)
    ("cluster_ready_s", "cluster ready ({w} workers)", 1, "{:.2f} s"),
    ("round_trip_median_us", "round trip, median", 1, "{:,.0f} us"),
    ("round_trip_p99_us", "round trip, p99", 1, "{:,.0f} us"),
    ("submit_tasks_per_s", "submit + wait, {submit_n:,} tasks", 1, "{:,.0f} /s"),
    ("submit_store_tasks_per_s", "the same, broker with --store", 1, "{:,.0f} /s"),
    ("map_tasks_per_s", "map, {map_n:,} items", 1, "{:,.0f} /s"),
    ("array_100mb_best_s", "100 MB array round trip, best", 1, "{:.3f} s"),
    ("array_100mb_median_s", "100 MB array round trip, median", 1, "{:.3f} s"),
    ("cluster_close_s", "cluster close", 1, "{:.2f} s"),
]


def verdict(key: str, value: float) -> tuple:
    """(target text, 'ok' / 'MISS' / '') for a figure."""
    if key not in TARGETS:
        return "", ""
    op, threshold, unit = TARGETS[key]
    ok = value < threshold if op == "<" else value > threshold
    return f"{op} {threshold:,g} {unit}", "ok" if ok else "MISS"


def table(results: dict, workers: int) -> str:
    rows = [("benchmark", "result", "target", "")]
    for key, label, _, fmt in ROWS:
        if key not in results:
            continue
        target, mark = verdict(key, results[key])
        rows.append((label.format(w=workers, **results), fmt.format(results[key]), target, mark))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]), row[3]]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--workers", type=int, default=2, help="local workers (default 2)")
    args = parser.parse_args(argv)
    # The 100 MB task is meant to be large: keep the client's advice to scatter quiet.
    logging.getLogger("shoal").setLevel(logging.ERROR)
    results = run_all(args.quick, args.workers)
    print(table(results, args.workers))
    if args.json:
        report = {
            "results": results,
            "targets": {k: {"op": op, "value": v, "unit": u} for k, (op, v, u) in TARGETS.items()},
            "met": {k: verdict(k, results[k])[1] == "ok" for k in TARGETS if k in results},
            "quick": args.quick, "workers": args.workers,
            "shoal": shoal.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
