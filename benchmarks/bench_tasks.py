"""The task functions every tool runs in the side-by-side benchmarks.

They live in an importable module (the runner puts ``benchmarks/`` on
``PYTHONPATH`` for every process it starts), so each tool ships them by
reference, the same way for all, and the stdlib's ProcessPoolExecutor can
pickle them at all.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

#: seconds one "5 ms" task keeps its CPU busy
SPIN_SECONDS = 0.005


def inc(x: int) -> int:
    return x + 1


def identity(x: Any) -> Any:
    return x


def spin(x: int) -> int:
    """Keep the CPU busy for :data:`SPIN_SECONDS`, like real work (a sleep would not compete)."""
    end = time.perf_counter() + SPIN_SECONDS
    while time.perf_counter() < end:
        pass
    return x


def inc_chunk(xs: list) -> list:
    """``inc`` over a chunk: the batching a tool without a chunked map needs by hand."""
    return [x + 1 for x in xs]


def spin_chunk(xs: list) -> list:
    return [spin(x) for x in xs]


def chunks(iterable: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` items from ``iterable`` (the last may be shorter), lazily."""
    chunk: list = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
