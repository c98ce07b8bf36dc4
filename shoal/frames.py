"""Results as pandas DataFrames: one row per task, and parameter sweeps.

>>> res = client.map(simulate, [{"alpha": 0.1, "seed": 1}, {"alpha": 0.5, "seed": 2}])
>>> res.to_frame()           # alpha, seed, <result columns>, status, error, worker, started, duration
>>> client.sweep(simulate, alpha=[0.1, 0.5], seed=range(100))   # the grid's product, as a frame

Workers import this module to run sweeps (:class:`KwargsCall`), so pandas is
imported only inside the functions that build frames.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Iterable, Optional

__all__ = ["to_frame", "sweep", "KwargsCall", "STATUS_COLUMNS"]

#: The columns every frame ends with, after the inputs and the results.
STATUS_COLUMNS = ("status", "error", "worker", "started", "duration")


class KwargsCall:
    """``KwargsCall(fn)(point)`` calls ``fn(**point)``: how a sweep runs each grid point."""

    def __init__(self, func: Any) -> None:
        self.func = func

    def __call__(self, point: dict) -> Any:
        return self.func(**point)

    def __repr__(self) -> str:
        return f"KwargsCall({self.func!r})"


# ----------------------------------------------------------------- rows
class _Row:
    __slots__ = ("position", "item", "has_item", "status", "value", "error", "worker", "started",
                 "duration")

    def __init__(self, position: Any, item: Any = None, has_item: bool = False,
                 status: str = "pending", value: Any = None, error: Optional[str] = None,
                 worker: Optional[str] = None, started: Optional[float] = None,
                 duration: Optional[float] = None) -> None:
        self.position = position
        self.item = item
        self.has_item = has_item
        self.status = status
        self.value = value
        self.error = error
        self.worker = worker
        self.started = started
        self.duration = duration


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _map_rows(mapresult: Any) -> list:
    """Rows for every item of a map sent so far, finished or not."""
    rows = []
    for batch in mapresult.batches:
        items = batch.items
        has_items = items is not None
        base = dict(worker=batch.worker, started=batch.started)
        per_item = (batch.duration / batch.count) if (batch.duration is not None
                                                      and batch.count) else None
        if not batch.done():
            state: tuple = ("pending", None, None)
            values, errors = None, {}
        elif batch.cancelled():
            state, values, errors = ("cancelled", None, None), None, {}
        elif batch.exception() is not None:
            state, values, errors = ("error", None, _error_text(batch.exception())), None, {}
        else:
            state = ("ok", None, None)
            values, errors = batch.result()
        for i in range(batch.count):
            status, value, error = state
            if values is not None:
                if i in errors:
                    status, error = "error", _error_text(errors[i][0])
                else:
                    value = values[i]
            done = status in ("ok", "error")
            rows.append(_Row(batch.start + i, items[i] if has_items else None, has_items, status,
                             value, error, base["worker"], base["started"] if done else None,
                             per_item if done else None))
    return rows


def _future_row(position: Any, future: Any) -> _Row:
    row = _Row(position, worker=getattr(future, "worker", None),
               started=getattr(future, "started", None),
               duration=getattr(future, "duration", None))
    if not future.done():
        row.status = "pending"
    elif future.cancelled():
        row.status = "cancelled"
    elif future.exception() is not None:
        row.status, row.error = "error", _error_text(future.exception())
    else:
        row.status, row.value = "ok", future.result()
    return row


def _rows(obj: Any) -> tuple:
    """``(rows, index labels or None)`` for a map, futures (a list or a dict) or one future."""
    if hasattr(obj, "batches"):
        return _map_rows(obj), None
    if isinstance(obj, Mapping):
        labels = list(obj)
        return [_future_row(i, obj[k]) for i, k in enumerate(labels)], labels
    if hasattr(obj, "result") and hasattr(obj, "done"):
        return [_future_row(0, obj)], None
    return [_future_row(i, f) for i, f in enumerate(obj)], None


# ----------------------------------------------------------------- expanding
def _fields(value: Any) -> Optional[dict]:
    """A mapping, namedtuple, dataclass or Series as ``{column: value}``; None for others."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return dict(zip(value._fields, value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    module = type(value).__module__ or ""
    if module.startswith("pandas") and type(value).__name__ == "Series":
        return dict(value.items())
    return None


def _input_columns(item: Any) -> tuple:
    """``(columns, index label or _NO_INDEX)`` for one input item."""
    if isinstance(item, tuple) and hasattr(item, "_fields"):  # df.itertuples()
        cols = dict(zip(item._fields, item))
        label = cols.pop("Index", _NO_INDEX)
        return cols, label
    fields = _fields(item)
    if fields is not None:
        return fields, _NO_INDEX
    if isinstance(item, tuple):
        return {f"arg{i}": v for i, v in enumerate(item)}, _NO_INDEX
    return {"input": item}, _NO_INDEX


_NO_INDEX = object()


def to_frame(obj: Any, index: Any = None) -> Any:
    """A pandas DataFrame with one row per task.

    ``obj`` is a :class:`~shoal.MapResult`, a list of futures, a dict of
    futures (its keys become the index) or one future.  Columns:

    - the inputs (maps only): a dict item gives one column per key, a
      namedtuple (``df.itertuples()``) its fields and its ``Index`` as the
      frame's index, a tuple ``arg0, arg1, ...``, anything else ``input``;
    - the results: a dict, namedtuple or dataclass result gives one column
      per field (renamed ``result_<name>`` where it would clash), anything
      else the column ``result``;
    - ``status`` (ok, error, pending, cancelled), ``error`` (``"Type: message"``),
      ``worker``, ``started`` (when the item's batch started, local time) and
      ``duration`` (seconds; for a batch, its mean per item).

    While tasks still run, the frame has a row for every item sent so far;
    unfinished ones have status ``pending``.  ``index`` sets the index.
    """
    import pandas as pd

    rows, labels = _rows(obj)
    inputs: list = []
    input_cols: dict = {}
    positions: list = []
    item_labels: list = []
    for row in rows:
        positions.append(row.position)
        if row.has_item:
            cols, label = _input_columns(row.item)
        else:
            cols, label = {}, _NO_INDEX
        inputs.append(cols)
        item_labels.append(label)
        for name in cols:
            input_cols.setdefault(name, None)
    reserved = set(input_cols) | set(STATUS_COLUMNS)
    results: list = []
    result_cols: dict = {}
    for row in rows:
        fields = _fields(row.value) if row.status == "ok" else None
        if fields is None:
            out = {"result": row.value} if row.status == "ok" else {}
        else:
            out = {(f"result_{k}" if k in reserved else k): v for k, v in fields.items()}
        results.append(out)
        for name in out:
            result_cols.setdefault(name, None)
    if not result_cols:
        result_cols["result"] = None
    data: dict = {}
    for name in input_cols:
        data[name] = [cols.get(name) for cols in inputs]
    for name in result_cols:
        data[name] = [out.get(name) for out in results]
    data["status"] = [r.status for r in rows]
    data["error"] = [r.error for r in rows]
    data["worker"] = [r.worker for r in rows]
    data["started"] = pd.to_datetime(
        [datetime.fromtimestamp(r.started) if r.started is not None else None for r in rows])
    data["duration"] = [float("nan") if r.duration is None else r.duration for r in rows]
    if index is None:
        if labels is not None:
            index = labels
        elif rows and all(label is not _NO_INDEX for label in item_labels):
            index = item_labels
        else:
            index = positions
    frame = pd.DataFrame(data, index=index)
    frame["duration"] = frame["duration"].astype("float64")
    for name in list(input_cols) + list(result_cols):
        frame[name] = frame[name].infer_objects()
    return frame


# ----------------------------------------------------------------- sweeps
def _grid(values: Any) -> list:
    """A grid axis: an iterable of values; a string or a non-iterable is one value."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        return [values]
    return list(values)


def sweep(client: Any, fn: Any, progress: Optional[bool] = None, **grids: Any) -> Any:
    """Run ``fn(**point)`` for every point of the cartesian product of ``grids``.

    >>> df = sweep(client, simulate, alpha=[0.1, 0.5], seed=range(100))   # 200 runs
    >>> df.groupby("alpha")["result"].mean()

    Blocks until all points have run, showing progress (``progress=False``
    turns it off), and returns :func:`to_frame` of the runs: one column per
    grid name, the results, status, error, worker, started, duration.  A
    failing point is a row with status ``error``, not an exception.
    Ctrl-C cancels the sweep.
    """
    if not grids:
        raise TypeError("sweep() needs at least one keyword grid, e.g. alpha=[0.1, 0.5]")
    names = list(grids)
    axes = [_grid(v) for v in grids.values()]
    points = [dict(zip(names, combo)) for combo in itertools.product(*axes)]
    res = client.map(KwargsCall(fn), points, progress=progress)
    from .progress import show
    view = show(res, progress)
    try:
        res.wait()
    except KeyboardInterrupt:
        res.cancel()
        raise
    finally:
        close = getattr(view, "close", None)
        if close is not None:
            close()
    return to_frame(res)
