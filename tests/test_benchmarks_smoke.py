"""The side-by-side benchmark runner still runs: a quick pass over shoal and the stdlib.

It uses this interpreter (``--no-venv``: nothing is installed) and writes to a
temporary directory, so the committed ``docs/benchmarks`` stay as they are.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_compare_quick_pass_writes_table_and_floor(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare.py"), "--quick", "--only",
         "shoal,stdlib", "--no-venv", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=220, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round trip, median" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for tool in ("shoal", "stdlib"):
        main = results["tools"][tool]["main"]
        assert "fatal" not in main and not main.get("errors"), main
        assert main["latency_median_us"] > 0 and main["map_per_s"] > 0
        assert main["small_map_us"] > 0
        assert results["tools"][tool]["stream"]["stream_per_s"] > 0
        assert results["tools"][tool]["scale"]["scaling"]["1"]["map_per_s"] > 0
        assert not any(results["tools"][tool][p].get("leftovers") for p in ("main", "stream"))
    assert results["floor"]["tcp_relay"]["latency_median_us"] > 0
    page = (tmp_path / "results.md").read_text()
    assert "Distance from the floor" in page and "| round trip, median |" in page


@pytest.mark.timeout(120)
def test_cpu_per_task_reports_every_process(tmp_path):
    out = tmp_path / "cpu.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cpu_per_task.py"), "--quick",
         "--json", str(out)], capture_output=True, text=True, timeout=100,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round trip" in done.stdout and "broker" in done.stdout
    results = json.loads(out.read_text())
    for workload in ("submit", "round trip"):
        figures = results[workload]
        assert figures["tasks_per_s"] > 0
        assert set(figures["cpu_us_per_task"]) == {"client", "broker", "worker"}
        assert all(v >= 0 for v in figures["cpu_us_per_task"].values())


@pytest.mark.timeout(120)
def test_ab_runs_the_tree_and_a_revision_in_turn_and_counts_the_pairs():
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: there is no other revision to compare with")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ab.py"), "--pairs", "2", "--size", "100"],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["pair 1", "pair 2"]
    assert "tree median_us" in lines[0] and "HEAD median_us" in lines[0]
    assert lines[-1].startswith("the working tree did better in ") and "of 2 pairs" in lines[-1]
