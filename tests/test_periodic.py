"""Periodic tasks: the broker owns the schedule and runs it with no client connected."""
from __future__ import annotations

import datetime as dt
import os
import time

import pytest

from conftest import wait_until

pytestmark = pytest.mark.timeout(60)


def stamp(path: str, tag: str = "") -> float:
    now = time.time()
    with open(path, "a") as fh:
        fh.write(f"{now} {tag}\n")
    return now


def stamps(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [float(line.split()[0]) for line in fh]


def test_an_interval_schedule_runs_again_and_again_and_stops_when_cancelled(idle_client, tmp_path):
    path = str(tmp_path / "runs")
    schedule = idle_client.every(dt.timedelta(seconds=0.5), stamp, path, name="ticker")
    assert schedule["name"] == "ticker" and schedule["every"] == 0.5
    try:
        wait_until(lambda: len(stamps(path)) >= 3, 20, message="three runs")
        listed = {s["name"]: s for s in idle_client.schedules()}
        assert listed["ticker"]["runs"] >= 3
        assert listed["ticker"]["next_run"] > time.time() - 1
        assert listed["ticker"]["last_task"]
    finally:
        assert idle_client.cancel_schedule("ticker")
    times = stamps(path)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Runs are due every 0.5 s on the broker's clock; each starts a little after.
    assert 0.4 <= (times[-1] - times[0]) / len(gaps) <= 0.8 and max(gaps) < 1.5, gaps
    after = len(stamps(path))
    wait_until(lambda: idle_client.status()["queued"] == 0 and
               idle_client.status()["running"] == 0, 10, message="the last run to end")
    assert "ticker" not in {s["name"] for s in idle_client.schedules()}
    time.sleep(1.2)  # a window in which a live schedule would have run twice more
    assert len(stamps(path)) <= after + 1
    assert not idle_client.cancel_schedule("ticker")


def test_a_cron_schedule_with_seconds_runs_on_the_second(idle_client, tmp_path):
    path = str(tmp_path / "runs")
    idle_client.every("* * * * * *", stamp, path, name="each-second")
    try:
        wait_until(lambda: len(stamps(path)) >= 3, 20, message="three runs")
    finally:
        idle_client.cancel_schedule("each-second")
    for t in stamps(path)[:3]:
        assert t - int(t) < 0.5  # started just after a whole second


def test_a_schedule_runs_while_no_client_is_connected(cluster, tmp_path):
    path = str(tmp_path / "runs")
    owner = cluster.client()
    owner.every(0.3, stamp, path, "alone", name="while-away")
    owner.close()  # the notebook is closed; the broker keeps running it
    before = len(stamps(path))
    wait_until(lambda: len(stamps(path)) >= before + 3, 20, message="runs with no client")
    later = cluster.client()
    try:
        listed = {s["name"]: s for s in later.schedules()}["while-away"]
        assert later.result(listed["last_task"], timeout=10) > 0  # a run's kept result
    finally:
        later.cancel_schedule("while-away")
        later.close()


def test_adding_a_schedule_of_the_same_name_replaces_it(idle_client, tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    idle_client.every(0.3, stamp, first, name="same")
    replaced = idle_client.every(0.3, stamp, second, name="same")
    try:
        assert replaced["name"] == "same"
        wait_until(lambda: len(stamps(second)) >= 2, 20, message="the new schedule to run")
        assert [s["name"] for s in idle_client.schedules()].count("same") == 1
    finally:
        idle_client.cancel_schedule("same")
    assert len(stamps(first)) <= 1  # it ran at most once before being replaced


def test_a_schedule_in_a_time_zone_lists_its_next_run(idle_client):
    entry = idle_client.every("0 9 * * mon-fri", stamp, os.devnull, name="paris-9am",
                              tz="Europe/Paris")
    try:
        nxt = dt.datetime.fromtimestamp(entry["next_run"], dt.timezone.utc).astimezone(
            __import__("zoneinfo").ZoneInfo("Europe/Paris"))
        assert (nxt.hour, nxt.minute, nxt.second) == (9, 0, 0) and nxt.weekday() < 5
        assert idle_client.status()["schedules"] == 1
    finally:
        idle_client.cancel_schedule("paris-9am")


@pytest.mark.parametrize("when,message", [
    ("*/5 * *", "is not a cron expression"),
    ("61 * * * *", "is not a cron expression"),
    (0.01, "interval must be at least"),
    ([1], "every\\(\\) takes a cron expression"),
])
def test_bad_schedules_are_refused_at_once(idle_client, when, message):
    with pytest.raises((TypeError, ValueError), match=message):
        idle_client.every(when, stamp, os.devnull, name="bad")


def test_a_bad_time_zone_or_missed_policy_is_refused(idle_client):
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        idle_client.every(60, stamp, os.devnull, name="bad", tz="Mars/Olympus")
    with pytest.raises(ValueError, match="missed must be"):
        idle_client.every(60, stamp, os.devnull, name="bad", missed="all")


def test_the_schedules_own_next_times_follow_cron_and_dst():
    from shoal.periodic import next_time
    paris = "Europe/Paris"
    # 2026-03-29 is the spring-forward Sunday in Paris: 09:00 is 07:00 UTC after it.
    before = dt.datetime(2026, 3, 28, 12, tzinfo=dt.timezone.utc).timestamp()
    first = next_time("cron", "0 9 * * *", paris, before)
    second = next_time("cron", "0 9 * * *", paris, first)
    assert dt.datetime.fromtimestamp(first, dt.timezone.utc).hour == 7
    assert dt.datetime.fromtimestamp(second, dt.timezone.utc).hour == 7
    assert second - first == 24 * 3600
    assert next_time("every", 30.0, None, 100.0) == 130.0


def test_shoal_status_lists_each_schedule_with_its_next_run(idle_client, cluster):
    import subprocess
    import sys
    idle_client.every("30 4 * * *", stamp, os.devnull, name="nightly")
    try:
        out = subprocess.run([sys.executable, "-m", "shoal", "status", cluster.connection_file],
                             capture_output=True, text=True, timeout=30)
    finally:
        idle_client.cancel_schedule("nightly")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "'nightly'" in line)
    assert "30 4 * * *" in line and "next run 20" in line and "UTC" in line
