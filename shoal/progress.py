"""Progress displays for maps.

:class:`TextProgress` is a thin view of a :class:`~shoal.MapResult`: a daemon
thread polls the map's counters about ten times a second and redraws one
terminal line.  Where the output is not a terminal (a log file, CI) it prints
a plain line about once a second instead, so logs stay readable.

The notebook widget will live here too; it must import ipywidgets lazily.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Optional, TextIO

__all__ = ["TextProgress", "format_duration"]

#: Seconds between plain lines where the output is not a live terminal.
PLAIN_INTERVAL = 1.0


def format_duration(seconds: Optional[float]) -> str:
    """``75.3`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``; ``None`` -> ``'?'``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_live(file: TextIO) -> bool:
    """Redraw in place only on a real terminal, and never under CI."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        return False
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class TextProgress:
    """A one-line terminal progress display for a :class:`~shoal.MapResult`.

    Starts at once and stops by itself when the map is done, ending with a
    final line and a newline.  As a context manager it also stops (and prints
    the final line) when the block exits, even on an error::

        res = client.map(f, range(100_000))
        with TextProgress(res):
            values = res.result()

    The line shows a bar, done/total, failures, rate, elapsed time and ETA,
    for example ``[##########----------]  5000/10000  50%  8,210/s  0:01 ETA 0:01``.
    ``live`` (default: the file is a terminal and ``$CI`` is unset) chooses
    between redrawing in place with ``\\r`` and printing a plain line about
    once a second.
    """

    def __init__(self, mapresult: Any, file: Optional[TextIO] = None, interval: float = 0.1,
                 width: int = 24, live: Optional[bool] = None) -> None:
        self.mapresult = mapresult
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.width = width
        self.live = _is_live(self.file) if live is None else live
        self._stop = threading.Event()
        self._last_len = 0
        self._thread = threading.Thread(target=self._run, name="shoal-progress", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public
    def render(self) -> str:
        """The progress line for the map's current state (no ``\\r``, no newline)."""
        m = self.mapresult
        done, failed, total = m.done_count, m.failed_count, m.total
        finished = done + failed
        elapsed = max(time.monotonic() - m.started, 1e-9)
        rate = finished / elapsed
        parts = []
        if total:
            fraction = min(1.0, finished / total)
            filled = int(fraction * self.width)
            parts.append("[" + "#" * filled + "-" * (self.width - filled) + "]")
            parts.append(f"{finished:>{len(str(total))}}/{total}")
            parts.append(f"{fraction:4.0%}")
        else:
            parts.append(f"{finished} done")
        if failed:
            parts.append(f"{failed} failed")
        parts.append(f"{rate:,.0f}/s")
        parts.append(format_duration(elapsed))
        if total and finished < total:
            eta = (total - finished) / rate if rate > 0 else None
            parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)

    def close(self) -> None:
        """Stop updating and print the final line; safe to call more than once."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the display has finished (the map is done); return whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> "TextProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "finished"
        return f"<shoal.TextProgress {state}: {self.render()}>"

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        # This thread is the only writer to the file, so lines never interleave.
        last_plain = time.monotonic()
        while not (self._stop.is_set() or self.mapresult.done()):
            if self.live:
                self._draw()
            elif time.monotonic() - last_plain >= PLAIN_INTERVAL:
                last_plain = time.monotonic()
                self._write(self.render() + "\n")
            self._stop.wait(self.interval)
        if self.live:
            self._draw()
            self._write("\n")
        else:
            self._write(self.render() + "\n")

    def _draw(self) -> None:
        line = self.render()
        # Pad with spaces over a longer previous line rather than rely on ANSI codes.
        self._write("\r" + line.ljust(self._last_len))
        self._last_len = len(line)

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except (OSError, ValueError):  # a closed pipe or file must not kill the caller
            self._stop.set()
