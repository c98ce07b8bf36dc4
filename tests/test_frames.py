"""Results as DataFrames: to_frame for maps and futures, sweeps, frames of rows."""
from __future__ import annotations

import math
import time
from collections import namedtuple
from dataclasses import dataclass

import pytest

pd = pytest.importorskip("pandas")

import shoal  # noqa: E402
from conftest import wait_for_gate, wait_until  # noqa: E402

STATUS = ["status", "error", "worker", "started", "duration"]


def measure(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return {"square": x * x, "half": x / 2}


def plus(a, b):
    return a + b


def from_record(row):
    return row["a"] * 10


def from_tuple(row):
    return row.a * 10


def simulate(alpha, seed):
    if alpha < 0:
        raise ArithmeticError("negative alpha")
    return {"score": alpha * seed, "seed": seed}   # "seed" clashes with the input column


Point = namedtuple("Point", "x y")


@dataclass
class Stats:
    mean: float
    n: int


def as_point(i):
    return Point(i, -i)


def as_stats(i):
    return Stats(i / 2, i)


@pytest.mark.timeout(60)
def test_map_frame_has_one_row_per_item_with_inputs_results_and_status(idle_client):
    res = idle_client.map(measure, range(6), batch_size=2)
    assert res.wait(30)
    df = res.to_frame()
    assert list(df.columns) == ["input", "square", "half"] + STATUS
    assert list(df.index) == list(range(6)) and list(df.input) == list(range(6))
    assert list(df.status) == ["ok", "ok", "ok", "error", "ok", "ok"]
    assert df.loc[3, "error"] == "ValueError: three is not allowed"
    assert math.isnan(df.loc[3, "square"]) and df.loc[5, "square"] == 25
    assert df.error.isna().sum() == 5
    assert set(df.worker) <= {"local-1", "local-2"}
    assert df.started.dtype.kind == "M" and df.duration.dtype == "float64"
    assert (df.duration >= 0).all()
    assert abs(df.started.iloc[0] - pd.Timestamp.now()) < pd.Timedelta(minutes=1)
    assert shoal.to_frame(res).equals(df)


@pytest.mark.timeout(60)
def test_tuples_become_arg_columns_and_scalar_results_a_result_column(idle_client):
    res = idle_client.map(plus, [1, 2, 3], [10, 20, 30])
    assert res.wait(30)
    df = res.to_frame()
    assert list(df.columns) == ["arg0", "arg1", "result"] + STATUS
    assert list(df.result) == [11, 22, 33]


@pytest.mark.timeout(60)
def test_namedtuple_and_dataclass_results_are_expanded(idle_client):
    points = idle_client.map(as_point, range(3))
    stats = idle_client.map(as_stats, range(3))
    assert points.wait(30) and stats.wait(30)
    assert list(points.to_frame().columns[:3]) == ["input", "x", "y"]
    df = stats.to_frame()
    assert list(df.columns[:3]) == ["input", "mean", "n"] and list(df.n) == [0, 1, 2]


@pytest.mark.timeout(60)
def test_frame_of_a_running_map_has_the_rows_so_far(idle_client, gate):
    res = idle_client.map(wait_for_gate, [gate.path] * 4, batch_size=1)
    wait_until(lambda: len(res.batches) >= 2, 10, message="two batches sent")
    df = res.to_frame()
    assert len(df) >= 2 and set(df.status) == {"pending"}
    assert df.worker.isna().all() and df.duration.isna().all()
    gate.open()
    assert res.wait(30)
    df = res.to_frame()
    assert len(df) == 4 and set(df.status) == {"ok"}
    assert df.worker.notna().all()


@pytest.mark.timeout(60)
def test_map_over_dataframe_rows_keeps_the_frames_index(idle_client):
    frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}, index=[10, 20, 30])
    res = idle_client.map(from_tuple, list(frame.itertuples()))
    assert res.wait(30)
    df = res.to_frame()
    assert list(df.index) == [10, 20, 30]
    assert list(df.columns[:3]) == ["a", "b", "result"] and list(df.result) == [10, 20, 30]
    records = idle_client.map(from_record, frame.to_dict("records"))
    assert records.wait(30)
    df = shoal.to_frame(records, index=frame.index)
    assert list(df.index) == [10, 20, 30] and list(df.result) == [10, 20, 30]


@pytest.mark.timeout(60)
def test_map_over_a_row_generator_with_keep_inputs_keeps_the_index(idle_client):
    frame = pd.DataFrame({"a": [1, 2, 3]}, index=["p", "q", "r"])
    res = idle_client.map(from_tuple, frame.itertuples(), keep_inputs=True)
    assert res.wait(30)
    df = res.to_frame()
    assert list(df.index) == ["p", "q", "r"] and list(df.result) == [10, 20, 30]


@pytest.mark.timeout(60)
def test_futures_list_and_dict_frames(idle_client):
    futures = [idle_client.submit(measure, i) for i in (1, 3)]
    shoal.wait(futures, 30)
    df = shoal.to_frame(futures)
    assert list(df.columns) == ["square", "half"] + STATUS
    assert list(df.status) == ["ok", "error"] and df.loc[0, "square"] == 1
    labelled = {"one": idle_client.submit(plus, 1, 1), "two": idle_client.submit(plus, 2, 2)}
    shoal.wait(list(labelled.values()), 30)
    df = shoal.to_frame(labelled)
    assert list(df.index) == ["one", "two"] and list(df.result) == [2, 4]


@pytest.mark.timeout(60)
def test_sweep_runs_the_grid_product_and_returns_a_frame(idle_client):
    df = idle_client.sweep(simulate, progress=False, alpha=[-1.0, 0.5, 2.0], seed=range(4))
    assert len(df) == 12
    assert list(df.columns) == ["alpha", "seed", "score", "result_seed"] + STATUS
    assert list(df.alpha[:4]) == [-1.0] * 4 and list(df.seed[:4]) == [0, 1, 2, 3]
    failed = df[df.status == "error"]
    assert len(failed) == 4 and set(failed.error) == {"ArithmeticError: negative alpha"}
    ok = df[df.status == "ok"]
    assert (ok.score == ok.alpha * ok.seed).all() and (ok.result_seed == ok.seed).all()


@pytest.mark.timeout(60)
def test_sweep_treats_a_scalar_or_string_as_one_value(idle_client):
    df = idle_client.sweep(plus, progress=False, a="x", b=["1", "2"])
    assert list(df.result) == ["x1", "x2"]
    with pytest.raises(TypeError, match="at least one keyword grid"):
        idle_client.sweep(plus)


def test_worker_side_modules_import_no_pandas_ipython_or_ipywidgets():
    import subprocess
    import sys
    code = ("import sys, shoal.worker, shoal.frames, shoal.progress, shoal.magics; "
            "print(sorted(m for m in ('pandas', 'IPython', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_empty_inputs_give_an_empty_frame_with_the_status_columns(idle_client):
    res = idle_client.map(measure, [])
    assert res.wait(30)
    df = res.to_frame()
    assert len(df) == 0 and list(df.columns) == ["result"] + STATUS
    started = time.monotonic()
    assert shoal.to_frame([]).empty and time.monotonic() - started < 5
