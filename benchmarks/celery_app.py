"""The Celery app of the side-by-side benchmarks: Redis as broker and result backend.

The runner starts its own ``redis-server`` on a free loopback port and passes
its URL as ``$BENCH_REDIS_URL``; the Celery worker (``celery -A celery_app
worker``) and the benchmark process both import this module.
"""
from __future__ import annotations

import os

from celery import Celery

import bench_tasks

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    # pickle: NumPy arrays and Python ints both ways, as the other tools send them
    task_serializer="pickle", result_serializer="pickle", accept_content=["pickle"],
    result_accept_content=["pickle"],
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=False,
    result_expires=600,
)

inc = app.task(name="bench.inc")(bench_tasks.inc)
identity = app.task(name="bench.identity")(bench_tasks.identity)
spin = app.task(name="bench.spin")(bench_tasks.spin)
inc_chunk = app.task(name="bench.inc_chunk")(bench_tasks.inc_chunk)
spin_chunk = app.task(name="bench.spin_chunk")(bench_tasks.spin_chunk)
