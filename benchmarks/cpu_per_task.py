"""CPU time each shoal process spends per task: client, broker, workers.

    python benchmarks/cpu_per_task.py              # 10 x 10,000 submits, then 3,000 round trips
    python benchmarks/cpu_per_task.py --quick      # a smoke test
    python benchmarks/cpu_per_task.py --json out.json

Wall-clock rates on two cores hide where the time goes: the client, the broker
and the workers share the cores, so a saving anywhere shows.  This reads each
process's CPU time (user + system, all its threads, libzmq's IO threads
included) before and after a workload and divides by the tasks run:

- ``submit``: bursts of individual ``client.submit(inc, i)`` calls, then
  ``shoal.wait`` for each burst (throughput; batching and GC matter here);
- ``round trip``: ``client.submit(inc, i).result()`` one at a time (latency;
  every process handles every task alone).

Linux only (it reads ``/proc``).  Compare figures from one machine only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional

import shoal

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def inc(x: int) -> int:
    return x + 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cluster_processes(cluster: "shoal.Cluster") -> dict:
    """``{pid: "broker" | "worker"}`` for the cluster's processes."""
    roles = {proc.pid: "worker" for proc in cluster.workers}
    roles[cluster.broker.pid] = "broker"
    return roles


def measure(cluster: "shoal.Cluster", workload: Callable[[], None], tasks: int) -> dict:
    """Wall rate and µs of CPU per task, per role, while ``workload()`` runs ``tasks`` tasks."""
    roles = cluster_processes(cluster)
    before = {pid: cpu_seconds(pid) for pid in roles}
    client_before = time.process_time()
    start = time.perf_counter()
    workload()
    wall = time.perf_counter() - start
    per_task = {"client": (time.process_time() - client_before) / tasks * 1e6}
    for pid, role in roles.items():
        per_task[role] = per_task.get(role, 0.0) + (cpu_seconds(pid) - before[pid]) / tasks * 1e6
    return {"tasks_per_s": tasks / wall, "cpu_us_per_task": per_task}


def run(quick: bool, workers: int) -> dict:
    bursts, burst, trips = (2, 2_000, 300) if quick else (10, 10_000, 3_000)
    with shoal.Cluster(n_workers=workers) as cluster:
        client = cluster.client()
        shoal.wait([client.submit(inc, i) for i in range(burst)])  # warm: function cached

        def submits() -> None:
            for _ in range(bursts):
                futures = [client.submit(inc, i) for i in range(burst)]
                shoal.wait(futures)
                assert futures[-1].result() == burst

        def round_trips() -> None:
            for i in range(trips):
                assert client.submit(inc, i).result() == i + 1

        return {"workers": workers, "submit": measure(cluster, submits, bursts * burst),
                "round trip": measure(cluster, round_trips, trips)}


def report(results: dict) -> str:
    lines = [f"{'workload':<12} {'tasks/s':>10}   CPU per task ({results['workers']} workers)"]
    for name in ("submit", "round trip"):
        figures = results[name]
        cpu = figures["cpu_us_per_task"]
        parts = ", ".join(f"{role} {cpu[role]:.1f} µs" for role in ("client", "broker", "worker")
                          if role in cpu)
        lines.append(f"{name:<12} {figures['tasks_per_s']:>10,.0f}   {parts}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks: a smoke test")
    parser.add_argument("--workers", type=int, default=2, help="local workers (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args(argv)
    if not os.path.isdir("/proc/self"):
        print("cpu_per_task.py reads /proc: it runs on Linux only", file=sys.stderr)
        return 2
    results = run(args.quick, args.workers)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
