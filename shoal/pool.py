"""``shoal worker --pool process --slots N``: N worker processes under one supervisor.

A thread pool (``--pool thread``, the default) runs a worker's slots as
threads of one process: cheap, and right for tasks that release the GIL (I/O,
NumPy).  A process pool runs each slot in its own process, so pure-Python
tasks run in parallel and a crash takes down one slot, not all of them.

The supervisor starts ``N`` single-slot workers (named ``NAME-1`` ...
``NAME-N``, so the broker lists ``N`` workers), restarts one that dies, and on
SIGTERM or SIGINT stops them all before it exits.  Each child also watches
the supervisor and exits if it dies, even by SIGKILL.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)

#: A child that dies this soon after starting, this many times in a row,
#: is not started again (it would only die again: a bad option, a missing module).
QUICK_DEATH_SECONDS = 5.0
QUICK_DEATHS = 5


def strip_pool_options(argv: list) -> list:
    """The worker's arguments without --pool, --slots and --name (set per child)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--pool", "--slots", "--name", "--parent-pid"):
            skip = True
            continue
        if arg.split("=", 1)[0] in ("--pool", "--slots", "--name", "--parent-pid"):
            continue
        out.append(arg)
    return out


def run_process_pool(argv: list, slots: int, name: str, client_args: tuple = (),
                     stop: Optional[threading.Event] = None) -> int:
    """Supervise ``slots`` single-slot workers started with ``argv``; return the exit code.

    ``client_args`` (a connection file or address, and a key) reach the broker
    to tell it at once when a child dies, as a local cluster does: its tasks
    run elsewhere without waiting for its heartbeats to stop.
    """
    stop = stop or threading.Event()
    base = [sys.executable, "-m", "shoal.worker", *strip_pool_options(argv), "--slots", "1",
            "--parent-pid", str(os.getpid())]
    children: dict[int, tuple] = {}  # slot -> (process, started at)
    quick: dict[int, int] = {}
    reporter: list = []  # the client that reports deaths, made at the first

    def report(child: str, code: int) -> None:
        from .cluster import describe_exit
        try:
            if not reporter:
                from .client import Client
                reporter.append(Client(client_args[0], key=client_args[1], timeout=5))
            reporter[0]._report_lost(child, describe_exit(code))
        except Exception as exc:  # the broker sees it lost after its heartbeats stop
            logger.warning("could not tell the broker that %s died: %s", child, exc)

    def start(slot: int) -> None:
        proc = subprocess.Popen([*base, "--name", f"{name}-{slot}"], stdin=subprocess.DEVNULL)
        children[slot] = (proc, time.monotonic())

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for slot in range(1, slots + 1):
        start(slot)
    logger.info("process pool %s: %d worker process(es) started", name, slots)
    status = 0
    try:
        while not stop.wait(0.2):
            for slot, (proc, started) in list(children.items()):
                code = proc.poll()
                if code is None:
                    continue
                if code == 2 and time.monotonic() - started < QUICK_DEATH_SECONDS:
                    logger.error("worker %s-%d refused its options (exit code 2); stopping "
                                 "the pool", name, slot)
                    return 2
                quick[slot] = quick.get(slot, 0) + 1 if \
                    time.monotonic() - started < QUICK_DEATH_SECONDS else 0
                if quick[slot] >= QUICK_DEATHS:
                    logger.error("worker %s-%d died right after starting %d times in a row; "
                                 "not starting it again", name, slot, QUICK_DEATHS)
                    del children[slot]
                    status = 1
                    continue
                logger.warning("worker %s-%d exited with code %s; starting it again", name, slot,
                               code)
                if client_args:
                    report(f"{name}-{slot}", code)
                start(slot)
            if not children:
                return status or 1
    finally:
        for client in reporter:
            client.close()
        for proc, _ in children.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc, _ in children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return status
