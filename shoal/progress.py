"""Progress displays for maps and lists of futures.

A display is a thin view over a :class:`Tracker`, which reads a map's batches
(or a list of futures) and counts *items*: done, failed, running, queued, per
worker, with the failures' tracebacks.  Views poll the tracker from their own
thread about ten times a second, so nothing runs per task on the hot path,
and always draw a final update once everything has finished.

- :class:`WidgetProgress`: an ipywidgets bar in a notebook, with a text/plain
  and text/html fallback in the saved output;
- :class:`TextProgress`: one live line in a terminal, plain lines in logs;
- a single summary line where no one watches (nbconvert, CI, ``SHOAL_PROGRESS=0``).

The counting itself is :mod:`shoal.tracking`.

:func:`display_progress` picks one; ``MapResult._ipython_display_`` calls it.
IPython and ipywidgets are imported only inside the functions that use them.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from html import escape
from typing import Any, Optional, TextIO

from .tracking import Snapshot, Tracker, format_duration, tracker_for

__all__ = ["TextProgress", "WidgetProgress", "Tracker", "Snapshot", "display_progress", "show",
           "progress_mode", "format_duration", "render_line", "render_html", "summary_line",
           "wait_displays"]

#: Seconds between plain lines where the output is not a live terminal.
PLAIN_INTERVAL = 1.0
#: Seconds between widget updates (at most ten a second).
WIDGET_INTERVAL = 0.1


# ----------------------------------------------------------------- rendering
def render_line(s: Snapshot, width: int = 24) -> str:
    """One line: bar, done/total, percent, failures, running/queued, rate, elapsed, ETA."""
    parts = []
    finished = s.completed
    if s.total:
        fraction = s.fraction or 0.0
        filled = int(fraction * width)
        parts.append("[" + "#" * filled + "-" * (width - filled) + "]")
        parts.append(f"{finished:>{len(str(s.total))}}/{s.total}")
        parts.append(f"{fraction:4.0%}")
    else:
        parts.append(f"{finished} done")
    if s.failed:
        parts.append(f"{s.failed} failed")
    if s.cancelled:
        parts.append(f"{s.cancelled} cancelled")
    if not s.finished and s.running:
        parts.append(f"{s.running} running")
    if not s.finished and s.queued:
        parts.append(f"{s.queued} queued")
    parts.append(f"{s.rate:,.0f}/s")
    parts.append(format_duration(s.elapsed))
    if s.total and not s.finished and finished < s.total:
        parts.append(f"ETA {format_duration(s.eta)}")
    return "  ".join(parts)


def summary_line(s: Snapshot) -> str:
    """One line for the end of a run, e.g. ``square: 100/100 done, 2 failed in 0:03 (...)``."""
    label = f"{s.label}: " if s.label else ""
    total = f"/{s.total}" if s.total is not None else ""
    parts = [f"{label}{s.done}{total} done"]
    if s.failed:
        parts.append(f"{s.failed} failed")
    if s.cancelled:
        parts.append(f"{s.cancelled} cancelled")
    text = ", ".join(parts)
    text += f" in {format_duration(s.elapsed)} ({s.rate:,.0f}/s)"
    named = [w for w in s.workers if w != "?"]
    if named:
        text += f" on {len(named)} worker{'s' if len(named) != 1 else ''}"
    if not s.finished:
        text += " (still running)"
    return text


def _counts_html(s: Snapshot) -> str:
    bits = [f"<b>{s.completed}</b>" + (f"/{s.total}" if s.total is not None else "")]
    bits.append(f"{s.done} done")
    if s.failed:
        bits.append(f"<span style='color:#c62828'>{s.failed} failed</span>")
    if s.cancelled:
        bits.append(f"{s.cancelled} cancelled")
    if not s.finished:
        if s.running is not None:
            bits.append(f"{s.running} running")
        if s.queued is not None:
            bits.append(f"{s.queued} queued")
    bits.append(f"{s.rate:,.0f}/s")
    bits.append(f"elapsed {format_duration(s.elapsed)}")
    if s.total and not s.finished:
        bits.append(f"ETA {format_duration(s.eta)}")
    return " &middot; ".join(bits)


def _details_html(s: Snapshot) -> str:
    parts = []
    if s.workers:
        cells = []
        for name, (done, failed) in sorted(s.workers.items()):
            extra = f", <span style='color:#c62828'>{failed} failed</span>" if failed else ""
            cells.append(f"<code>{escape(str(name))}</code> {done}{extra}")
        parts.append("<div>per worker: " + " &middot; ".join(cells) + "</div>")
    if s.failures:
        items = []
        for index, summary, tb in s.failures:
            items.append(f"<details><summary>item {escape(str(index))}: {escape(summary)}"
                         f"</summary><pre>{escape(tb)}</pre></details>")
        more = s.failed - len(s.failures)
        if more > 0:
            items.append(f"<div>... and {more} more failures</div>")
        parts.append("<div><b>failures</b> (click one for its traceback)" + "".join(items)
                     + "</div>")
    return "".join(parts)


def render_html(s: Snapshot) -> str:
    """A static HTML view (bar, counts, workers, failures): the fallback without widgets."""
    pct = 100.0 * (s.fraction or 0.0)
    colour = "#c62828" if s.failed else ("#2e7d32" if s.finished else "#1976d2")
    label = f"<b>{escape(s.label)}</b> " if s.label else ""
    bar = (f"<div style='display:inline-block;width:240px;height:10px;background:#e0e0e0;"
           f"vertical-align:middle'><div style='width:{pct:.1f}%;height:100%;"
           f"background:{colour}'></div></div>")
    return (f"<div class='shoal-progress'>{label}{bar} {_counts_html(s)}"
            f"{_details_html(s)}</div>")


# ----------------------------------------------------------------- terminal
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

    The line shows a bar, done/total, failures, running and queued items,
    rate, elapsed time and ETA, for example
    ``[##########----------]  5000/10000  50%  8,210/s  0:01  ETA 0:01``.
    ``live`` (default: the file is a terminal and ``$CI`` is unset) chooses
    between redrawing in place with ``\\r`` and printing a plain line about
    once a second.
    """

    def __init__(self, mapresult: Any, file: Optional[TextIO] = None, interval: float = 0.1,
                 width: int = 24, live: Optional[bool] = None) -> None:
        self.mapresult = mapresult
        self.tracker = tracker_for(mapresult)
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
        return render_line(self.tracker.poll(), self.width)

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
        while not (self._stop.is_set() or self.tracker.done()):
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


# ----------------------------------------------------------------- notebook
_active: "list[WidgetProgress]" = []
_active_lock = threading.Lock()


def wait_displays(timeout: Optional[float] = None) -> bool:
    """Block until every live notebook display has drawn its final state.

    Returns whether all have; useful before saving a notebook, and in tests.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with _active_lock:
        views = list(_active)
    for view in views:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not view.wait(remaining):
            return False
    return True


class WidgetProgress:
    """A live ipywidgets display of a map or a list of futures, for notebooks.

    A bar with the item counts, rate, elapsed time and ETA, a per-worker
    breakdown, and the failures (click one for its traceback).  A daemon
    thread updates it at most every ``interval`` seconds, also while the
    kernel runs other cells, and draws the final state when all is done.
    The output also carries text/plain and text/html renderings of the final
    state, which a saved notebook shows where widgets cannot render.
    ``widgets=False`` draws HTML updates instead of widgets.
    """

    def __init__(self, obj: Any, interval: float = WIDGET_INTERVAL, widgets: bool = True) -> None:
        self.tracker = tracker_for(obj)
        self.interval = interval
        self.use_widgets = widgets
        self.handle: Any = None
        self._finished = threading.Event()
        self._thread: Optional[threading.Thread] = None
        snap = self.tracker.poll()
        if widgets:
            import ipywidgets as w
            self.title = w.HTML(value=f"<b>{escape(snap.label)}</b>" if snap.label else "")
            self.bar = w.IntProgress(min=0, max=max(1, snap.total or 1), value=0,
                                     bar_style="info",
                                     layout=w.Layout(width="320px"))
            self.counts = w.HTML()
            self.details = w.HTML()
            self.box = w.VBox([w.HBox([self.title, self.bar, self.counts]), self.details])
            self._apply(snap)

    # ------------------------------------------------------------ public
    def show(self) -> "WidgetProgress":
        """Display it in the current cell and start updating."""
        from IPython.display import display
        snap = self.tracker.poll()
        if self.use_widgets:
            self._apply(snap)
        self.handle = display(self._bundle(snap), raw=True, display_id=True)
        with _active_lock:
            _active[:] = [v for v in _active if not v._finished.is_set()] + [self]
        self._thread = threading.Thread(target=self._run, name="shoal-widget-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the final state has been drawn; return whether it has."""
        return self._finished.wait(timeout)

    def snapshot(self) -> Snapshot:
        return self.tracker.poll()

    # ------------------------------------------------------------ drawing
    def _bundle(self, snap: Snapshot) -> dict:
        data = {"text/plain": render_line(snap) if snap.total else summary_line(snap),
                "text/html": render_html(snap)}
        if self.use_widgets:
            data["application/vnd.jupyter.widget-view+json"] = {
                "version_major": 2, "version_minor": 0, "model_id": self.box.model_id}
        return data

    def _apply(self, snap: Snapshot) -> None:
        """Set the widgets from a snapshot; only changed values are sent."""
        total = snap.total if snap.total is not None else max(1, snap.completed)
        if snap.finished and snap.total is None:
            total = max(1, snap.completed)
        with self.box.hold_sync():
            self.bar.max = max(1, total)
            self.bar.value = min(snap.completed, self.bar.max)
            if snap.finished:
                self.bar.bar_style = "danger" if snap.failed else "success"
            elif snap.failed:
                self.bar.bar_style = "warning"
            self.counts.value = _counts_html(snap)
            self.details.value = _details_html(snap)

    def _run(self) -> None:
        try:
            while True:
                finished = self.tracker.wait(self.interval)
                snap = self.tracker.poll()
                if self.use_widgets:
                    self._apply(snap)
                else:
                    self.handle.update(self._bundle(snap), raw=True)
                if finished or snap.finished:
                    break
            # The final state, also as the text fallback a saved notebook shows.
            self.handle.update(self._bundle(snap), raw=True)
        except Exception:  # a display must never take the kernel down
            import logging
            logging.getLogger(__name__).exception("shoal progress display failed")
        finally:
            self._finished.set()


# ----------------------------------------------------------------- choosing a display
def _ipython() -> Any:
    """The running IPython shell, without importing IPython where it is not loaded."""
    module = sys.modules.get("IPython")
    if module is None:
        return None
    try:
        return module.get_ipython()
    except Exception:
        return None


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def progress_mode(flag: Optional[bool] = None) -> str:
    """How progress is shown here: ``"widget"``, ``"html"``, ``"text"``, ``"summary"`` or ``"off"``.

    ``flag`` is a map's ``progress`` argument: False turns the display off, True
    asks for a live one even where no one seems to watch.  ``$SHOAL_PROGRESS``
    may be ``0`` (summary only), ``1`` (live), or a mode's name.  Otherwise a
    live display is drawn in a notebook or terminal, and a summary line where
    no one watches: under CI, and in a kernel run by nbconvert or papermill
    (they execute without stdin, which an interactive frontend offers).
    """
    if flag is False:
        return "off"
    env = os.environ.get("SHOAL_PROGRESS", "").strip().lower()
    if env in ("widget", "html", "text", "summary", "off"):
        return env
    if env in ("0", "false", "no", "none") and flag is not True:
        return "summary"
    ip = _ipython()
    kernel = getattr(ip, "kernel", None) if ip is not None else None
    if flag is not True and env not in ("1", "true", "yes", "on"):
        if _truthy_env("CI"):
            return "summary"
        if kernel is not None and not getattr(kernel, "_allow_stdin", True):
            return "summary"
    if kernel is not None:
        import importlib.util
        return "widget" if importlib.util.find_spec("ipywidgets") is not None else "html"
    if ip is not None:
        return "text"
    return "text" if _is_live(sys.stderr) or flag is True else "summary"


def display_progress(obj: Any, flag: Optional[bool] = None) -> Any:
    """Display progress for a map or a list of futures, the way :func:`progress_mode` says.

    Called when a :class:`~shoal.MapResult` is displayed in IPython.  Returns
    the live view (a :class:`WidgetProgress` or :class:`TextProgress`), or None.
    """
    if flag is None:
        flag = getattr(obj, "progress", None)
    mode = progress_mode(flag)
    from IPython.display import display
    if mode == "off":
        display({"text/plain": repr(obj)}, raw=True)
        return None
    if mode in ("widget", "html"):
        return WidgetProgress(obj, widgets=mode == "widget").show()
    tracker = tracker_for(obj)
    if mode == "text":
        view = TextProgress(tracker, file=sys.stdout)
        try:
            view.wait()
        except KeyboardInterrupt:  # stop watching; the work goes on
            view.close()
            print("shoal: stopped showing progress; the work goes on (.cancel() stops it)")
        return view
    # summary: no one watches, so wait and print one line with the final state
    tracker.wait()
    print(summary_line(tracker.poll()))
    return None


def show(obj: Any, flag: Optional[bool] = None) -> Any:
    """Show progress for ``obj`` wherever this runs: a notebook, a terminal or a log.

    Unlike :func:`display_progress` this works without IPython: in a script
    it draws a :class:`TextProgress` line on stderr (and returns it) while
    the caller waits, or nothing where stderr is not a terminal and
    ``flag`` is not True.
    """
    if _ipython() is not None:
        return display_progress(obj, flag)
    mode = progress_mode(flag)
    if mode == "text":
        return TextProgress(obj)
    return None
