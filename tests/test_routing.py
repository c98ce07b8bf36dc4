"""Queues, resources and priorities: which worker takes what, and in which order.

Real workers with their own queues and resources (``shoal worker --queues gpu
--resources gpu=1``, started through ``Cluster.add_workers``).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from conftest import Gate, hold, running_cluster, wait_until

pytestmark = pytest.mark.timeout(90)


def record(path: str, tag) -> int:
    with open(path, "a") as fh:
        fh.write(f"{tag}\n")
    return os.getpid()


def hold_then_record(gate_path: str, started_dir: str, path: str, tag) -> int:
    hold(gate_path, started_dir)
    return record(path, tag)


@pytest.fixture(scope="module")
def routed():
    """One default worker, one that serves only queue "gpu" and has gpu=1 with two slots."""
    with running_cluster(n_workers=1) as cluster:
        yield cluster, cluster.add_workers(1, queues=["gpu"], resources={"gpu": 1}, slots=2)[0]


@pytest.fixture
def rclient(routed):
    cluster, _ = routed
    client = cluster.client()
    yield client
    client.close()


def worker_pid(client, name: str) -> int:
    return next(w["pid"] for w in client.status()["worker_list"] if w["name"] == name)


def test_status_lists_each_workers_queues_and_resources(rclient, routed):
    _, gpu = routed
    workers = {w["name"]: w for w in rclient.status()["worker_list"]}
    assert workers[gpu]["queues"] == ["gpu"]
    assert workers[gpu]["resources"] == {"gpu": 1}
    default = next(w for n, w in workers.items() if n != gpu)
    assert default["queues"] == ["default"] and default["resources"] == {}


def test_a_task_for_a_queue_runs_only_on_a_worker_serving_it_and_others_never_there(
        rclient, routed):
    _, gpu = routed
    gpu_pid = worker_pid(rclient, gpu)
    on_gpu = rclient.gather([rclient.submit(os.getpid, queue="gpu") for _ in range(20)],
                            timeout=30)
    assert set(on_gpu) == {gpu_pid}
    elsewhere = rclient.gather([rclient.submit(os.getpid) for _ in range(20)], timeout=30)
    assert gpu_pid not in elsewhere
    mapped = rclient.map(record, [os.devnull] * 50, range(50), queue="gpu", batch_size=5)
    assert set(mapped.result(timeout=30)) == {gpu_pid}


def test_a_resource_is_held_while_its_task_runs_so_a_second_waits(rclient, routed, tmp_path):
    gate = Gate(tmp_path / "gate")
    try:
        first = rclient.submit(hold, gate.path, gate.started_dir, queue="gpu",
                               resources={"gpu": 1})
        second = rclient.submit(hold, gate.path, gate.started_dir, queue="gpu",
                                resources={"gpu": 1})
        wait_until(lambda: gate.started() >= 1, 20, message="the first gpu task to start")
        # The worker has two slots but one gpu: the second task waits at the broker...
        assert wait_until(lambda: second.status == "queued", 5)
        # ... while a task needing no gpu takes the free slot beside the first.
        free_slot = rclient.submit(os.getpid, queue="gpu")
        assert free_slot.result(timeout=20) == worker_pid(rclient, routed[1])
        assert gate.started() == 1 and first.status == "running"
    finally:
        gate.open()
    assert first.result(timeout=20) == second.result(timeout=20)


def test_higher_priority_runs_first_and_fifo_within_a_priority(rclient, routed, tmp_path):
    gate, order = Gate(tmp_path / "gate"), str(tmp_path / "order")
    before = rclient.status()["counts"]["submitted"]
    # The default queue's one worker has one slot: occupy it, then queue the rest.
    # (Short tasks are sent to it ahead of time; it still starts them by priority.)
    rclient.gather([rclient.submit(record, os.devnull, i) for i in range(20)], timeout=20)
    blocker = rclient.submit(hold, gate.path, gate.started_dir)
    wait_until(lambda: gate.started() == 1, 20, message="the slot to be busy")
    plan = [("low-1", 0), ("mid-1", 5), ("low-2", 0), ("top", 10), ("mid-2", 5), ("neg", -1)]
    tasks = [rclient.submit(record, order, tag, priority=p) for tag, p in plan]
    wait_until(lambda: rclient.status()["counts"]["submitted"] >= before + 21 + len(plan), 10,
               message="all to reach the broker")
    gate.open()
    blockers = [blocker]
    rclient.gather(blockers + tasks, timeout=30)
    with open(order) as fh:
        ran = fh.read().split()
    assert ran == ["top", "mid-1", "mid-2", "low-1", "low-2", "neg"]


def test_a_task_no_worker_can_take_waits_is_reported_and_warned_then_runs_when_one_joins(
        rclient, routed, caplog):
    cluster, _ = routed
    with caplog.at_level(logging.WARNING, logger="shoal.client"):
        waiting = rclient.submit(os.getpid, queue="tpu", resources={"tpu": 2})
        again = rclient.submit(os.getpid, queue="tpu", resources={"tpu": 2})
        wait_until(lambda: any("no connected worker serves queue 'tpu'" in r.getMessage()
                               for r in caplog.records), 10, message="the client's warning")
    warnings = [r.getMessage() for r in caplog.records if "'tpu'" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per kind of need, not once per task
    assert "--queues tpu --resources tpu=2" in warnings[0]
    unrunnable = rclient.status()["unrunnable"]
    assert unrunnable == [{"needs": "queue 'tpu' with resources tpu=2", "count": 2,
                           "start": "shoal worker ADDRESS --queues tpu --resources tpu=2"}]
    assert waiting.status == "queued" and not waiting.done()
    name = cluster.add_workers(1, queues=["tpu"], resources={"tpu": 4})[0]
    tpu_pid = worker_pid(rclient, name)
    assert waiting.result(timeout=20) == again.result(timeout=20) == tpu_pid
    assert rclient.status()["unrunnable"] == []


def test_a_task_needing_more_than_any_worker_has_is_reported(rclient):
    f = rclient.submit(os.getpid, queue="gpu", resources={"gpu": 2})
    try:
        wait_until(lambda: rclient.status()["unrunnable"], 10, message="the report")
        assert rclient.status()["unrunnable"][0]["needs"] == "queue 'gpu' with resources gpu=2"
    finally:
        assert f.cancel()


@pytest.mark.parametrize("options,message", [
    ({"queue": ""}, "queue must be a non-empty name"),
    ({"queue": 3}, "queue must be a non-empty name"),
    ({"priority": 1.5}, "priority must be an integer"),
    ({"resources": {"gpu": -1}}, "resource 'gpu' must be a non-negative number"),
    ({"resources": "gpu"}, "resource 'gpu' needs an amount, e.g. gpu=1"),
    ({"resources": "gpu=lots"}, "resource 'gpu' has amount 'lots', which is not a number"),
])
def test_bad_routing_options_raise_at_submit_naming_the_option(rclient, options, message):
    with pytest.raises(ValueError, match=message):
        rclient.submit(os.getpid, **options)


def test_resources_given_as_a_string_mean_the_same_as_a_mapping(rclient, routed):
    _, gpu = routed
    assert rclient.submit(os.getpid, queue="gpu", resources="gpu=1").result(timeout=20) == \
        worker_pid(rclient, gpu)


def test_shoal_worker_refuses_malformed_resources_naming_the_option():
    out = subprocess.run([sys.executable, "-m", "shoal", "worker", "tcp://127.0.0.1:1",
                          "--key-file", os.devnull, "--resources", "gpu"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "--resources: resource 'gpu' needs an amount" in out.stderr


def test_a_worker_with_slot_threads_returns_every_result_of_many_bursts(rclient, routed):
    # Slot threads wake the worker's socket thread to send results; a lost
    # wake-up would leave results unsent for ever (this once hung a map).
    _, gpu = routed
    for burst in range(30):
        futures = [rclient.submit(abs, -i, queue="gpu") for i in range(40)]
        assert rclient.gather(futures, timeout=20) == list(range(40)), f"burst {burst}"
