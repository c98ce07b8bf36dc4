"""Progress: TextProgress on a stand-in map, trackers on real maps, terminal IPython."""
from __future__ import annotations

import io
import os
import threading
import time

import pytest

from shoal.progress import TextProgress, format_duration


class FakeMap:
    """The attributes TextProgress polls, driven by the test."""

    def __init__(self, total):
        self.total = total
        self.done_count = 0
        self.failed_count = 0
        self.started = time.monotonic() - 2.0
        self.finished = threading.Event()

    def done(self) -> bool:
        return self.finished.is_set()


def test_format_duration():
    assert format_duration(75.3) == "1:15"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?"


def test_render_shows_bar_counts_failures_rate_and_eta():
    m = FakeMap(100)
    m.done_count, m.failed_count = 40, 10
    with TextProgress(m, file=io.StringIO(), live=False) as progress:
        line = progress.render()
        m.finished.set()
    assert "[############------------]" in line
    assert " 50/100" in line and "50%" in line and "10 failed" in line
    assert "/s" in line and "ETA" in line


def test_render_without_total_counts_only():
    m = FakeMap(None)
    m.done_count = 7
    m.finished.set()
    line = TextProgress(m, file=io.StringIO(), live=False).render()
    assert line.startswith("7 done") and "ETA" not in line


@pytest.mark.timeout(30)
def test_live_display_redraws_in_place_and_ends_with_a_final_line_when_the_map_is_done():
    m = FakeMap(10)
    out = io.StringIO()
    progress = TextProgress(m, file=out, interval=0.01, live=True)
    m.done_count = 10
    m.finished.set()
    assert progress.wait(10)
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert text.rstrip("\n").rsplit("\r", 1)[1].lstrip().startswith("[" + "#" * 24 + "]")


@pytest.mark.timeout(30)
def test_plain_display_prints_whole_lines_and_context_exit_stops_it():
    m = FakeMap(10)
    out = io.StringIO()
    with TextProgress(m, file=out, interval=0.01, live=False):
        m.done_count = 3
    assert "\r" not in out.getvalue()
    assert " 3/10" in out.getvalue() and "30%" in out.getvalue()
    assert out.getvalue().count("\n") == 1


# ----------------------------------------------------------------- trackers on real maps

from conftest import wait_for_gate, wait_until  # noqa: E402

from shoal.progress import (Tracker, progress_mode, render_html, render_line,  # noqa: E402
                            summary_line)


def fail_on_multiples_of_five(x):
    if x % 5 == 0:
        raise ValueError(f"{x} is a multiple of five")
    return x


@pytest.mark.timeout(60)
def test_tracker_counts_items_not_batches_and_lists_failures_with_tracebacks(idle_client):
    res = idle_client.map(fail_on_multiples_of_five, range(1, 21), batch_size=4)
    assert res.wait(30)
    snap = Tracker(res).poll()
    assert snap.finished and snap.total == 20
    assert (snap.done, snap.failed, snap.cancelled) == (16, 4, 0)
    assert [f[0] for f in snap.failures] == [4, 9, 14, 19]           # item indexes
    assert snap.failures[0][1] == "ValueError: 5 is a multiple of five"
    assert "fail_on_multiples_of_five" in snap.failures[0][2]          # the remote traceback
    assert sum(d for d, _ in snap.workers.values()) == 16
    assert sum(f for _, f in snap.workers.values()) == 4
    line = render_line(snap)
    assert "20/20" in line and "100%" in line and "4 failed" in line and "ETA" not in line
    assert summary_line(snap).startswith("fail_on_multiples_of_five: 16/20 done, 4 failed in ")
    html = render_html(snap)
    assert "<details>" in html and "5 is a multiple of five" in html


@pytest.mark.timeout(60)
def test_tracker_shows_running_and_queued_items_while_a_map_runs(idle_client, gate):
    res = idle_client.map(wait_for_gate, [gate.path] * 6, batch_size=1)
    tracker = Tracker(res)
    wait_until(lambda: (tracker.poll().running or 0) >= 2, 10, message="two running items")
    snap = tracker.poll()
    assert not snap.finished and snap.done == 0
    assert snap.running == 2 and snap.queued == 4
    assert "2 running" in render_line(snap) and "4 queued" in render_line(snap)
    gate.open()
    assert tracker.wait(30)
    snap = tracker.poll()
    assert snap.finished and snap.done == 6 and snap.running == 0


@pytest.mark.timeout(60)
def test_text_progress_on_a_real_map_ends_with_the_final_line(idle_client):
    out = io.StringIO()
    res = idle_client.map(fail_on_multiples_of_five, range(1, 11))
    with TextProgress(res, file=out, live=False):
        res.wait(30)
    assert out.getvalue().splitlines()[-1].startswith("[" + "#" * 24 + "]  10/10  100%  2 failed")


@pytest.mark.timeout(60)
def test_tracker_over_a_list_of_futures(idle_client):
    futures = [idle_client.submit(fail_on_multiples_of_five, i) for i in (1, 5, 7)]
    tracker = Tracker(futures)
    assert tracker.wait(30)
    snap = tracker.poll()
    assert (snap.total, snap.done, snap.failed) == (3, 2, 1)
    assert snap.failures[0][0] == 1 and "multiple of five" in snap.failures[0][2]


def test_progress_mode_follows_the_flag_and_the_environment(monkeypatch):
    monkeypatch.delenv("SHOAL_PROGRESS", raising=False)
    monkeypatch.setenv("CI", "true")
    assert progress_mode(False) == "off"
    assert progress_mode(None) == "summary"            # CI: no one watches
    monkeypatch.setenv("SHOAL_PROGRESS", "text")
    assert progress_mode(None) == "text"
    monkeypatch.setenv("SHOAL_PROGRESS", "0")
    assert progress_mode(None) == "summary"
    assert progress_mode(False) == "off"
    monkeypatch.delenv("CI")
    monkeypatch.delenv("SHOAL_PROGRESS")
    assert progress_mode(True) == "text"               # a script asked for progress


@pytest.mark.timeout(90)
def test_terminal_ipython_shows_a_displayed_map_as_one_text_line(tmp_path):
    pytest.importorskip("IPython")
    import subprocess
    import sys
    session = "\n".join([
        "import shoal",
        "cluster = shoal.Cluster(2); client = cluster.client()",
        "res = client.map(abs, range(-30, 0))",
        "res",
        "cluster.close()",
        "exit()"]) + "\n"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SHOAL_PROGRESS")}
    env["IPYTHONDIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--simple-prompt",
                          "--colors=nocolor"], input=session, capture_output=True, text=True,
                         timeout=80, env=env)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "30/30" in line]
    assert len(lines) == 1 and "[" + "#" * 24 + "]  30/30  100%" in lines[0]
