"""One workload on the working tree and on another revision, interleaved.

    python benchmarks/ab.py                              # round trips, against HEAD
    python benchmarks/ab.py --rev 800f0a1 --pairs 8
    python benchmarks/ab.py --workload submit            # 10,000 submits, then wait
    python benchmarks/ab.py --workload small-map         # a map of 10 trivial items

On a small shared machine, figures taken a few minutes apart differ by more
than most changes make (the round trip's median moved 190 -> 260 us in an
evening here, on the same code).  So this exports the other revision's
``shoal/`` with ``git archive``, then runs the workload in a fresh process for
each side in turn (which goes first alternates: the first of two runs back to
back measured a few us faster on the same code), ``--pairs`` times, each on its
own 2-worker cluster, and prints every pair, the means, and in how many pairs
the working tree did better.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: workload -> (its figures, the one that decides a pair, whether higher is better)
WORKLOADS = {
    "round-trip": (("median_us", "p99_us"), "median_us", False),
    "submit": (("per_s",), "per_s", True),
    "small-map": (("median_us", "p90_us"), "median_us", False),
}


def run_workload(name: str, size: int) -> dict:
    """Run one workload on a fresh 2-worker cluster of the shoal on ``sys.path``."""
    import shoal
    from bench_tasks import inc
    with shoal.Cluster(2) as cluster:
        client = cluster.client()
        for i in range(200):  # warm-up: function cached, direct links open
            client.submit(inc, i).result()
        if name == "round-trip":
            samples = []
            for i in range(size):
                start = time.perf_counter()
                client.submit(inc, i).result()
                samples.append(time.perf_counter() - start)
            samples.sort()
            return {"median_us": statistics.median(samples) * 1e6,
                    "p99_us": samples[int(0.99 * len(samples))] * 1e6}
        if name == "submit":
            rates = []
            for _ in range(5):
                start = time.perf_counter()
                futures = [client.submit(inc, i) for i in range(size)]
                shoal.wait(futures)
                rates.append(size / (time.perf_counter() - start))
            return {"per_s": statistics.median(rates)}
        expected = list(range(1, 11))
        for _ in range(50):
            assert client.map(inc, range(10)).result() == expected
        samples = []
        for _ in range(size):
            start = time.perf_counter()
            client.map(inc, range(10)).result()
            samples.append(time.perf_counter() - start)
        samples.sort()
        return {"median_us": statistics.median(samples) * 1e6,
                "p90_us": samples[int(0.9 * len(samples))] * 1e6}


def side(source: str, workload: str, size: int) -> dict:
    """The workload's figures in a fresh process importing shoal from ``source``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source, HERE]))
    out = subprocess.run([sys.executable, __file__, "--child", workload, "--size", str(size)],
                         env=env, cwd=source, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"the {workload} run from {source} failed:\n{out.stderr[-3000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    if not os.path.abspath(figures.pop("shoal")).startswith(os.path.abspath(source) + os.sep):
        raise SystemExit(f"the run meant for {source} imported another shoal")
    return figures


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the other revision (default HEAD)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="round-trip")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--size", type=int, default=None,
                        help="round trips, submits or maps a run (default 2,500, 10,000, 400)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import shoal
        print(json.dumps({**run_workload(args.child, args.size), "shoal": shoal.__file__}))
        return 0
    size = args.size or {"round-trip": 2500, "submit": 10_000, "small-map": 400}[args.workload]
    figures, decides, higher = WORKLOADS[args.workload]
    with tempfile.TemporaryDirectory(prefix="shoal-ab-") as other:
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.rev, "shoal"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", other], input=archive, check=True)
        rows = {"tree": [], args.rev: []}
        sides = [("tree", ROOT), (args.rev, other)]
        for i in range(args.pairs):
            # In turn which goes first: the first of two runs back to back measured a
            # few us faster, the same code on both sides.
            for label, source in sides if i % 2 == 0 else sides[::-1]:
                rows[label].append(side(source, args.workload, size))
            print(f"pair {i + 1}: " + "   ".join(
                f"{label} " + " ".join(f"{k} {rows[label][-1][k]:,.0f}" for k in figures)
                for label in rows), flush=True)
    better = sum((a[decides] > b[decides]) == higher
                 for a, b in zip(rows["tree"], rows[args.rev]))
    for label, runs in rows.items():
        print(f"{label:>12}: " + ", ".join(
            f"{k} mean {statistics.mean(r[k] for r in runs):,.1f}" for k in figures))
    print(f"the working tree did better in {better} of {args.pairs} pairs ({decides})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
