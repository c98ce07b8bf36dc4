"""TextProgress against a stand-in map (no cluster needed)."""
from __future__ import annotations

import io
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
    m.finished.set()
    line = TextProgress(m, file=io.StringIO(), live=False).render()
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
