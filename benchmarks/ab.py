"""One workload on the working tree and on another revision, interleaved.

    python benchmarks/ab.py                              # round trips, against HEAD
    python benchmarks/ab.py --rev 800f0a1 --pairs 8
    python benchmarks/ab.py --workload submit            # 10,000 submits, then wait
    python benchmarks/ab.py --workload small-map         # a map of 10 trivial items

On a small shared machine, figures taken a few minutes apart differ by more
than most changes make (the round trip's median moved 190 -> 260 us in an
evening here, on the same code).  So this exports the other revision's
``shoal/`` with ``git archive``, then runs the workload, timed as compare.py
times it, in a fresh process for each side in turn (which goes first
alternates: the first of two runs back to back measured a few us faster on the
same code), ``--pairs`` times, each on its own 2-worker cluster, and prints
every pair, the means, and in how many pairs the working tree did better.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: workload -> (its figures, the one that decides a pair, whether higher is better)
WORKLOADS = {
    "round-trip": (("median_us", "p99_us"), "median_us", False),
    "submit": (("per_s",), "per_s", True),
    "small-map": (("median_us",), "median_us", False),
}


def run_workload(name: str, size: int) -> dict:
    """Run one workload, as compare.py's peers.py times it, on a fresh 2-worker
    cluster of the shoal on ``sys.path``."""
    import peers
    from adapters import Shoal
    adapter = Shoal(timeout=60.0)
    adapter.start(2)
    try:
        if name == "round-trip":
            figures = peers.bench_latency(adapter, size, 3)
            return {"median_us": figures["latency_median_us"], "p99_us": figures["latency_p99_us"]}
        if name == "submit":
            return {"per_s": peers.bench_submit(adapter, size, 3)["submit_per_s"]}
        return {"median_us": peers.bench_small_map(adapter, 10, 2, size)["small_map_us"]}
    finally:
        adapter.stop()


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
