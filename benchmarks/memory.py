"""Peak memory of a streaming map: client, broker and each worker, and items per second.

    python benchmarks/memory.py                        # a generator of 1,000,000 items, 2 workers
    python benchmarks/memory.py --items 200000         # a quicker run
    python benchmarks/memory.py --result-bytes 10000 --items 20000 --slow-consumer
                                                       # 200 MB of results, read slowly
    python benchmarks/memory.py --json out.json        # also write the figures as JSON

``client.map`` over a generator keeps a bounded window of batches in flight and
releases each value once the iteration has passed it, so no process should
grow with the length of the input.  Each process's resident set is taken
before the run (after a warm-up map, so imports and caches are in place) and
its peak during the run: on Linux the kernel's high-water mark (``VmHWM``,
reset through ``/proc/PID/clear_refs`` just before the run, so it is exact),
elsewhere the largest of psutil samples taken every 10 ms.

The task functions are defined here and shipped by value (as ``__main__`` code,
or registered with cloudpickle when imported): workers need not import this file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Optional

import psutil

import shoal

MiB = 1 << 20


def inc(x: int) -> int:
    return x + 1


def payload(x: int, size: int) -> bytes:
    return x.to_bytes(8, "little") * (size // 8)


def _peak_of(pid: int) -> Optional[int]:
    """The kernel's peak RSS of ``pid`` in bytes (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak(pid: int) -> bool:
    """Reset the kernel's peak RSS of ``pid`` to its current RSS (Linux 4.0+)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakSampler(threading.Thread):
    """Samples the RSS of some processes every ``interval`` seconds; keeps each one's maximum."""

    def __init__(self, pids: dict, interval: float = 0.01) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peaks = {name: 0 for name in pids}
        self.interval = interval
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            for name, proc in self.procs.items():
                try:
                    self.peaks[name] = max(self.peaks[name], proc.memory_info().rss)
                except psutil.Error:
                    pass
            if self._halt.wait(self.interval):
                return

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return self.peaks


def measure(items: int = 1_000_000, workers: int = 2, result_bytes: int = 0,
            slow_consumer: bool = False) -> dict:
    """Run ``client.map`` over a generator of ``items`` on a fresh local cluster.

    Returns ``{"items", "seconds", "items_per_s", "method", "processes": {name:
    {"pid", "before", "peak", "growth"}}}``, sizes in bytes.  ``result_bytes``
    makes each result that large; ``slow_consumer`` makes the reading loop
    pause 1 ms every 100 values, so results arrive faster than they are read.
    """
    if __name__ != "__main__":  # imported (by the tests): still ship the tasks by value
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if result_bytes:
        fn, check = (lambda x: payload(x, result_bytes)), (lambda i, v: len(v) == result_bytes
                                                           and v[:8] == i.to_bytes(8, "little"))
    else:
        fn, check = inc, (lambda i, v: v == i + 1)
    with shoal.Cluster(n_workers=workers) as cluster:
        client = cluster.client()
        # Warm-up: the function on every worker, the batch sizing, the sockets.
        for _ in client.map(fn, (i for i in range(2_000))):
            pass
        pids = {"client": os.getpid(), "broker": cluster.broker.pid}
        for w in client.status()["worker_list"]:
            pids[f"worker {w['name']}"] = w["pid"]
        before = {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}
        exact = all(_reset_peak(pid) for pid in pids.values()) and \
            all(_peak_of(pid) is not None for pid in pids.values())
        sampler = PeakSampler(pids)
        sampler.start()
        start = time.perf_counter()
        n = 0
        for i, value in enumerate(client.map(fn, (i for i in range(items)))):
            if not check(i, value):
                raise AssertionError(f"item {i}: wrong value {value!r:.60}")
            n += 1
            if slow_consumer and i % 100 == 0:
                time.sleep(0.001)  # a reader slower than the workers (not synchronisation)
        seconds = time.perf_counter() - start
        sampled = sampler.stop()
        if n != items:
            raise AssertionError(f"{n} of {items} values came back")
        processes = {}
        for name, pid in pids.items():
            peak = max(sampled[name], (_peak_of(pid) or 0) if exact else 0)
            processes[name] = {"pid": pid, "before": before[name], "peak": peak,
                               "growth": peak - before[name]}
        return {"items": items, "workers": workers, "result_bytes": result_bytes,
                "slow_consumer": slow_consumer, "seconds": seconds,
                "items_per_s": items / seconds,
                "method": "VmHWM (reset before the run) and 10 ms psutil samples" if exact
                else "10 ms psutil samples",
                "processes": processes}


def report(figures: dict) -> str:
    lines = [f"client.map over a generator of {figures['items']:,} items"
             + (f", {figures['result_bytes']:,}-byte results" if figures["result_bytes"] else "")
             + (", slow consumer" if figures["slow_consumer"] else "")
             + f", {figures['workers']} workers",
             f"  {figures['seconds']:.2f} s, {figures['items_per_s']:,.0f} items/s",
             f"  peak RSS ({figures['method']}):",
             f"  {'process':<18} {'before':>10} {'peak':>10} {'growth':>10}"]
    for name, p in figures["processes"].items():
        lines.append(f"  {name:<18} {p['before'] / MiB:>8.1f} MB {p['peak'] / MiB:>7.1f} MB "
                     f"{p['growth'] / MiB:>+8.1f} MB")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--result-bytes", type=int, default=0,
                        help="size of each result (default: a small int)")
    parser.add_argument("--slow-consumer", action="store_true",
                        help="read the results more slowly than they are produced")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = measure(args.items, args.workers, args.result_bytes, args.slow_consumer)
    print(report(figures))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**figures, "python": sys.version.split()[0], "cpus": os.cpu_count()},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
