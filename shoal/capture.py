"""Capturing what a task prints, per task, while other tasks print too.

``sys.stdout`` and ``sys.stderr`` are replaced by routers: a write from a
thread running a task lands in that task's :class:`Capture`; any other write
goes to the real stream.  The worker's control thread reads captures while
tasks run, to stream their output live, and the whole text travels with the
result.
"""
from __future__ import annotations

import io
import threading
from typing import Optional

#: Captured output above this is cut, so a chatty task cannot flood the client.
MAX_OUTPUT = 1 << 20


class Capture:
    """One stream of one task: the text so far and how much was already streamed."""

    __slots__ = ("_lock", "_parts", "_size", "_streamed", "_cut")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list = []
        self._size = 0
        self._streamed = 0  # parts already sent live
        self._cut = False

    def write(self, text: str) -> int:
        with self._lock:
            if self._size < MAX_OUTPUT:
                room = MAX_OUTPUT - self._size
                self._parts.append(text[:room])
                self._size += min(len(text), room)
                if len(text) > room:
                    self._cut = True
                    self._parts.append(f"\n[shoal: output cut at {MAX_OUTPUT} characters]\n")
        return len(text)

    def take_new(self) -> str:
        """Text written since the last call (for live streaming)."""
        with self._lock:
            if self._streamed == len(self._parts):
                return ""
            new = self._parts[self._streamed:]
            self._streamed = len(self._parts)
        return "".join(new)

    def text(self) -> str:
        """Everything written."""
        if not self._parts:  # the common case: nothing (only the task's own thread writes)
            return ""
        with self._lock:
            return "".join(self._parts)


class OutputRouter(io.TextIOBase):
    """Stands in for sys.stdout/stderr: a task's writes go to its own Capture."""

    def __init__(self, original) -> None:
        self._original = original
        self._local = threading.local()

    @property
    def original(self):
        return self._original

    def begin(self) -> Capture:
        capture = self._local.capture = Capture()
        return capture

    def end(self) -> str:
        capture: Optional[Capture] = getattr(self._local, "capture", None)
        self._local.capture = None
        return capture.text() if capture is not None else ""

    def write(self, s: str) -> int:
        capture = getattr(self._local, "capture", None)
        if capture is None:
            return self._original.write(s)
        return capture.write(s)

    def flush(self) -> None:
        if getattr(self._local, "capture", None) is None:
            self._original.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):
        return getattr(self._original, "encoding", "utf-8")
