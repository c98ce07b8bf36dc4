"""Time in the broker: delayed and timed tasks, retries with back-off, rate limits.

The broker holds what waits (not the client); the tests measure when tasks
ran from inside them (``time.time()`` on the worker).
"""
from __future__ import annotations

import datetime as dt
import os
import time
from zoneinfo import ZoneInfo

import pytest

import shoal
from conftest import wait_until

pytestmark = pytest.mark.timeout(60)


def now() -> float:
    return time.time()


def count_tries(path: str, fail_times: int, error: str = "OSError") -> int:
    """Fail the first ``fail_times`` calls (counted in a file), then return the count."""
    tries = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as fh:
        fh.write(str(tries + 1))
    with open(path + ".times", "a") as fh:
        fh.write(f"{time.time()}\n")
    if tries < fail_times:
        raise {"OSError": OSError, "KeyError": KeyError}[error](f"try {tries}")
    return tries


def tries_at(path: str) -> list:
    with open(path + ".times") as fh:
        return [float(line) for line in fh]


def ask_for_retry(path: str, times: int, delay=None, max_retries=None) -> int:
    tries = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as fh:
        fh.write(str(tries + 1))
    if tries < times:
        try:
            raise ConnectionError(f"not yet ({tries})")
        except ConnectionError as exc:
            raise shoal.Retry(delay=delay, max_retries=max_retries) from exc
    return tries


# ----------------------------------------------------------------- delay and at
def test_delay_holds_the_task_at_the_broker_until_its_time(idle_client):
    sent = time.time()
    f = idle_client.submit(now, delay=0.6)
    assert f.status == "scheduled"
    assert idle_client.status()["queued"] == 1  # held by the broker, not the client
    ran = f.result(timeout=10)
    assert 0.6 <= ran - sent < 2.0


def test_at_an_aware_datetime_in_another_zone_runs_at_that_instant(idle_client):
    when = dt.datetime.now(ZoneInfo("Asia/Tokyo")) + dt.timedelta(seconds=0.8)
    ran = idle_client.submit(now, at=when).result(timeout=10)
    assert when.timestamp() <= ran < when.timestamp() + 1.0


def test_at_a_naive_datetime_is_local_time(idle_client):
    when = dt.datetime.now() + dt.timedelta(seconds=0.5)
    ran = idle_client.submit(now, at=when).result(timeout=10)
    assert when.timestamp() <= ran < when.timestamp() + 1.0


def test_a_time_in_the_past_runs_at_once(idle_client):
    assert idle_client.submit(os.getpid, at=dt.datetime(2001, 1, 1)).result(timeout=10)


def test_a_scheduled_task_can_be_cancelled_before_its_time(idle_client, tmp_path):
    marker = tmp_path / "ran"
    f = idle_client.submit(count_tries, str(marker), 0, delay=30)
    assert f.cancel()
    assert f.status == "cancelled"
    assert idle_client.status()["queued"] == 0
    assert not marker.exists()


def test_a_scheduled_task_outlives_its_client(cluster, tmp_path):
    marker = tmp_path / "ran"
    first = cluster.client()
    f = first.submit(count_tries, str(marker), 0, delay=0.5)
    task_id = f.task_id
    first.close()  # the notebook is gone; the broker still holds the task
    wait_until(marker.exists, 10, message="the task to run after its client left")
    later = cluster.client()
    try:
        assert later.result(task_id, timeout=10) == 0
    finally:
        later.close()


@pytest.mark.parametrize("options,message", [
    ({"delay": -1}, "delay must be a non-negative number of seconds"),
    ({"delay": 1, "at": dt.datetime.now()}, "not both"),
    ({"at": dt.date.today()}, "at= needs a datetime, not the date"),
    ({"at": "tomorrow"}, "at= must be a datetime"),
])
def test_bad_times_raise_at_submit(idle_client, options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        idle_client.submit(now, **options)


# ----------------------------------------------------------------- retries
def test_retries_with_backoff_wait_longer_each_time_and_free_the_worker_meanwhile(
        idle_client, tmp_path):
    path = str(tmp_path / "tries")
    f = idle_client.submit(count_tries, path, 3, retries=3, retry_backoff=0.2,
                           retry_jitter=False, retry_on=(OSError,))
    # While the task waits out its back-off, its slot runs other work.
    others = idle_client.gather([idle_client.submit(os.getpid) for _ in range(10)], timeout=10)
    assert len(others) == 10
    assert f.result(timeout=20) == 3
    times = tries_at(path)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8]):
        assert expected <= gap < expected + 0.5, gaps


def test_retries_with_backoff_are_seen_as_retrying(idle_client, tmp_path):
    path = str(tmp_path / "tries")
    f = idle_client.submit(count_tries, path, 1, retries=1, retry_backoff=2)
    wait_until(lambda: os.path.exists(path), 10, message="the first try")
    assert wait_until(lambda: f.status == "retrying", 5)
    assert f.result(timeout=10) == 1


def test_retry_on_other_errors_fails_at_once(idle_client, tmp_path):
    path = str(tmp_path / "tries")
    f = idle_client.submit(count_tries, path, 5, "KeyError", retries=3, retry_backoff=0.1,
                           retry_on=(OSError, TimeoutError))
    with pytest.raises(KeyError, match="try 0"):
        f.result(timeout=10)
    assert len(tries_at(path)) == 1


def test_retries_that_run_out_fail_with_the_last_error(idle_client, tmp_path):
    path = str(tmp_path / "tries")
    f = idle_client.submit(count_tries, path, 10, retries=2, retry_backoff=0.05)
    with pytest.raises(OSError, match="try 2"):
        f.result(timeout=10)
    assert len(tries_at(path)) == 3


def test_a_task_can_ask_for_its_own_retry(idle_client, tmp_path):
    path = str(tmp_path / "tries")
    sent = time.time()
    assert idle_client.submit(ask_for_retry, path, 2, 0.3).result(timeout=10) == 2
    assert time.time() - sent >= 0.6
    assert idle_client.status()["counts"]["retried"] >= 2


def test_a_task_that_asks_too_often_fails_with_the_error_it_was_raised_from(
        idle_client, tmp_path):
    path = str(tmp_path / "tries")
    f = idle_client.submit(ask_for_retry, path, 10, 0, 2)
    with pytest.raises(ConnectionError, match=r"not yet \(2\)"):
        f.result(timeout=10)


def test_a_bare_retry_request_beyond_its_limit_fails_with_retries_exhausted(idle_client):
    def always_retry():
        raise shoal.Retry(delay=0)

    with pytest.raises(shoal.RetriesExhausted, match="after 3 retries, its limit"):
        idle_client.submit(always_retry).result(timeout=10)


@pytest.mark.parametrize("options,message", [
    ({"retry_backoff": 1}, "retry_backoff needs retries=N"),
    ({"retries": 2, "retry_backoff": -1}, "retry_backoff must be a non-negative number"),
    ({"retries": 2, "retry_backoff_max": 5}, "retry_backoff_max needs retry_backoff"),
    ({"retries": 2, "retry_on": "OSError"}, "retry_on takes exception classes"),
    ({"retries": -1}, "retries must be a non-negative integer"),
])
def test_bad_retry_options_raise_at_submit(idle_client, options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        idle_client.submit(now, **options)


# ----------------------------------------------------------------- rate limits
def test_a_rate_limit_spaces_runs_of_a_task_name_evenly_cluster_wide(idle_client, cluster):
    other = cluster.client()
    try:
        sent = time.time()
        mine = [idle_client.submit(now, rate_limit="4/s") for _ in range(3)]
        theirs = [other.submit(now, rate_limit="4/s") for _ in range(3)]
        times = sorted(idle_client.gather(mine, timeout=20) + other.gather(theirs, timeout=20))
    finally:
        other.close()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(gap >= 0.25 - 0.02 for gap in gaps), gaps  # two clients, one limit
    assert times[-1] - sent < 5 * 0.25 + 1.0


def test_a_rate_limited_task_does_not_hold_up_other_work(idle_client):
    limited = [idle_client.submit(now, rate_limit="2/s") for _ in range(4)]
    started = time.time()
    assert len(idle_client.gather([idle_client.submit(os.getpid) for _ in range(50)],
                                  timeout=10)) == 50
    assert time.time() - started < 1.0
    # Within that second at most three of the four had their turn: the rest wait in line.
    assert idle_client.status()["rate_limited"].get("test_scheduling.now", 0) >= 1
    idle_client.gather(limited, timeout=20)


@pytest.mark.parametrize("rate,message", [
    ("10", "is not a rate"), ("ten/m", "is not a rate"), ("0/m", "positive count"),
    (10, "rate_limit must be a string"),
])
def test_bad_rate_limits_raise_at_submit(idle_client, rate, message):
    with pytest.raises((TypeError, ValueError), match=message):
        idle_client.submit(now, rate_limit=rate)


def test_rate_limits_parse_as_celery_writes_them():
    from shoal.options import parse_rate
    assert parse_rate("10/m") == (10.0, 60.0)
    assert parse_rate("2/s") == (2.0, 1.0)
    assert parse_rate("100/h") == (100.0, 3600.0)
    assert parse_rate("5/10s") == (5.0, 10.0)
    assert parse_rate("1.5/min") == (1.5, 60.0)
