"""The ``shoal`` command: run a broker, a worker or a local cluster; show status; demo.

::

    shoal cluster -n 4                       # a local cluster in the foreground
    shoal worker --connection-file FILE      # join a broker from another machine
    shoal status [ADDRESS|FILE] [--json]     # what the broker sees
    shoal top [ADDRESS|FILE]                 # a live view of it, refreshed in place
    shoal events [ADDRESS|FILE]              # task and worker events as JSON lines
    shoal demo                               # estimate pi over 20,000 tasks

``broker`` and ``worker`` hand their arguments to :func:`shoal.broker.main`
and :func:`shoal.worker.main`, so ``shoal worker --help`` shows theirs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["main", "count_inside", "worker_counts"]


def _broker_main(argv: list) -> int:
    from . import broker
    return broker.main(argv)


def _worker_main(argv: list) -> int:
    from . import worker
    return worker.main(argv)


#: Subcommands whose arguments belong to another module's parser.
_DELEGATED: dict[str, tuple[Callable[[list], int], str]] = {
    "broker": (_broker_main, "run a broker (see `shoal broker --help`)"),
    "worker": (_worker_main, "run a worker that joins a broker (see `shoal worker --help`)"),
}


def _fail(message: str) -> int:
    print(f"shoal: {message}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------- cluster
def cmd_cluster(args: argparse.Namespace) -> int:
    """Run a local cluster in the foreground until Ctrl-C or SIGTERM."""
    from .cluster import Cluster, ClusterError

    # While starting, both signals interrupt (Cluster closes itself on any
    # exception); once running, they only ask the main loop to stop, so the
    # shutdown itself is never interrupted halfway.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cluster = Cluster(n_workers=args.n_workers, slots=args.slots, listen=args.listen,
                          timeout=args.timeout, store=args.store)
    except KeyboardInterrupt:
        return _fail("interrupted while starting the cluster")
    except (ClusterError, OSError, ValueError) as exc:
        return _fail(f"cannot start the cluster: {exc}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"shoal cluster: {args.n_workers} worker(s) x {args.slots} slot(s), "
              f"broker at {cluster.address}")
        print(f"connection file: {cluster.connection_file}")
        print(f"logs: {cluster.log_dir}")
        print(f"join with: shoal worker --connection-file {cluster.connection_file}")
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            if cluster.broker is not None and cluster.broker.poll() is not None:
                return _fail(f"the broker exited with code {cluster.broker.returncode}; "
                             f"see {cluster.log_dir / 'broker.log'}")
        print("shoal cluster: stopping", flush=True)
        return 0
    finally:
        cluster.close()


# ----------------------------------------------------------------- status
def _find_local_broker() -> Optional[str]:
    """The newest connection file on this host whose broker still looks alive."""
    from .security import local_connection_files
    files = local_connection_files()
    return str(files[0]) if files else None


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_status(state: dict) -> str:
    """The broker's status reply as a readable table."""
    from .progress import format_duration
    counts = state.get("counts", {})
    workers = state.get("worker_list", [])
    lines = [
        f"broker    {state.get('address', '?')}   up {format_duration(state.get('uptime'))}",
        f"clients   {state.get('clients', 0)}",
        f"workers   {state.get('workers', len(workers))} ({state.get('slots', 0)} slots)",
        # The broker counts units: one per submit, one per map batch.
        f"units     {state.get('queued', 0)} queued   {state.get('running', 0)} running   "
        f"{counts.get('done', 0)} done   {counts.get('failed', 0)} failed   "
        f"{counts.get('cancelled', 0)} cancelled   (a unit is one submit or one map batch)",
        f"faults    {counts.get('duplicates', 0)} duplicate results dropped   "
        f"{counts.get('workers_lost', 0)} workers lost   {counts.get('dropped', 0)} bad messages "
        "dropped",
    ]
    held = (f"{state.get('scheduled', 0)} scheduled   {state.get('waiting', 0)} waiting for "
            f"other tasks   {sum((state.get('rate_limited') or {}).values())} rate-limited")
    if any(state.get(k) for k in ("scheduled", "waiting", "rate_limited")):
        lines.append(f"held      {held}")
    for entry in state.get("schedule_list") or ():
        when = entry.get("cron") or f"every {entry.get('every'):g} s"
        nxt = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["next_run"]))
        lines.append(f"periodic  {entry['name']!r} ({when}, {entry.get('tz')}): next run {nxt}, "
                     f"{entry.get('runs', 0)} run(s), last {entry.get('last_status') or '-'}")
    for lock in state.get("locks") or ():
        lines.append(f"lock      {lock['name']!r} held by {lock['holder'] or 'nobody'}"
                     + (f", {lock['waiting']} waiting" if lock.get("waiting") else ""))
    if state.get("stored"):
        stored = state["stored"]
        lines.append(f"store     {stored.get('units', 0)} task(s), {stored.get('results', 0)} "
                     f"result(s), {stored.get('schedules', 0)} schedule(s) on disk")
    for group in state.get("unrunnable") or ():
        lines.append(f"WAITING   {group['count']} task(s) need {group['needs']}, which no "
                     f"connected worker has: start one with `{group['start']}`")
    queues = state.get("queues") or {}
    if set(queues) - {"default"}:
        lines.append("queues    " + "   ".join(
            f"{name}: {q.get('queued', 0)} queued, {q.get('running', 0)} running"
            for name, q in sorted(queues.items())))
    if workers:
        header = ("NAME", "HOST", "PID", "SLOTS", "RUNNING", "DONE", "MEAN TASK ms", "QUEUES")
        rows = [(str(w.get("name", "?")), str(w.get("host", "?")), str(w.get("pid", "?")),
                 str(w.get("slots", "?")), str(w.get("running", 0)), str(w.get("done", 0)),
                 _ms(w.get("mean_task_ms")), ",".join(w.get("queues") or ["default"])
                 + "".join(f" {k}={v:g}" for k, v in sorted((w.get("resources") or {}).items())))
                for w in workers]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _connect(args: argparse.Namespace):
    """A Client of the broker ``args.target`` names (or the newest local one); on
    failure, the exit code, having said why."""
    from .client import Client
    from .errors import ShoalError
    target = args.target or os.environ.get("SHOAL_CONNECTION_FILE") or _find_local_broker()
    if target is None:
        return _fail("no running broker found on this host; give its address or connection "
                     "file, or start one with `shoal cluster`")
    try:
        return Client(target, key_file=args.key_file, timeout=args.timeout)
    except (ShoalError, LookupError, ValueError, OSError) as exc:  # BrokerUnreachable included
        return _fail(f"cannot reach the broker {target}: {exc}")


def cmd_status(args: argparse.Namespace) -> int:
    """Print the broker's view of the cluster."""
    from .client import Client
    from .errors import ShoalError
    target = args.target or os.environ.get("SHOAL_CONNECTION_FILE") or _find_local_broker()
    if target is None:
        return _fail("no running broker found on this host; give its address or connection "
                     "file, or start one with `shoal cluster`")
    try:
        with Client(target, key_file=args.key_file, timeout=args.timeout) as client:
            state = client.status(timeout=args.timeout)
    except (ShoalError, LookupError, ValueError) as exc:  # BrokerUnreachable included
        hint = ""
        if "://" in str(target) and not args.key_file and not Path(target).exists():
            hint = ("\nFor a broker on another host, pass --key-file FILE (its connection file), "
                    "or give that file instead of the address.")
        return _fail(f"status of {target}: {exc}{hint}")
    except (TimeoutError, FuturesTimeout):  # distinct classes before Python 3.11
        return _fail(f"the broker at {target} did not answer a status request within "
                     f"{args.timeout:g} s")
    except OSError as exc:  # after TimeoutError, which is an OSError
        return _fail(f"status of {target}: {exc}")
    if args.json:
        state = {k: v for k, v in state.items() if k not in ("v", "k", "nf")}  # wire fields
        print(json.dumps(state, indent=2, default=str))
    else:
        print(format_status(state))
    return 0


# ----------------------------------------------------------------- demo
def count_inside(seed: int, samples: int) -> int:
    """How many of ``samples`` random points in the unit square fall in the quarter circle.

    >>> count_inside(0, 1000)   # about 785 (pi / 4 of them)
    """
    rand = random.Random(seed).random
    inside = 0
    for _ in range(samples):
        x, y = rand(), rand()
        if x * x + y * y <= 1.0:
            inside += 1
    return inside


def worker_counts(mapresult: Any) -> dict:
    """How many items of a finished map each worker ran, by worker name."""
    public = getattr(mapresult, "worker_counts", None)
    if callable(public):
        return dict(public())
    # Until MapResult grows worker_counts(): each batch knows its worker and size.
    counts: Counter = Counter()
    for batch in list(getattr(mapresult, "_batches", ())):
        if batch.done() and not batch.cancelled() and batch.exception() is None:
            counts[batch.worker or "?"] += batch.count
    return dict(sorted(counts.items()))


def cmd_demo(args: argparse.Namespace) -> int:
    """Estimate pi with a Monte-Carlo map over a local cluster."""
    from .cluster import Cluster, ClusterError
    from .progress import TextProgress

    if args.tasks < 1 or args.samples < 1:
        return _fail("--tasks and --samples must be positive")
    n_workers = args.n_workers or os.cpu_count() or 2
    print(f"starting a local cluster with {n_workers} worker(s)...", flush=True)
    t0 = time.perf_counter()
    try:
        cluster = Cluster(n_workers=n_workers)
    except (ClusterError, OSError) as exc:
        return _fail(f"cannot start the cluster: {exc}")
    try:
        with cluster:
            print(f"cluster ready in {time.perf_counter() - t0:.2f} s at {cluster.address}")
            print(f"estimating pi: {args.tasks:,} tasks x {args.samples:,} random points",
                  flush=True)
            client = cluster.client()
            start = time.perf_counter()
            result = client.map(functools.partial(count_inside, samples=args.samples),
                                range(args.tasks))
            with TextProgress(result, file=sys.stdout):
                counts = result.result()
            seconds = time.perf_counter() - start
            per_worker = worker_counts(result)
    except KeyboardInterrupt:
        return _fail("interrupted; the cluster is stopped")
    points = args.tasks * args.samples
    pi = 4.0 * sum(counts) / points
    print(f"pi estimate: {pi:.6f}   (error {abs(pi - 3.141592653589793):.2e}, "
          f"{points:,} points)")
    print(f"throughput: {args.tasks / seconds:,.0f} tasks/s   "
          f"({args.tasks:,} tasks in {seconds:.2f} s on {n_workers} worker(s))")
    print("tasks per worker: " + "   ".join(f"{name} {n:,}" for name, n in per_worker.items()))
    return 0


# ----------------------------------------------------------------- keys
def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list or revoke the keys peers use to reach a Curve-secured broker."""
    from pathlib import Path

    from .security import create_peer, default_home, list_peers, revoke_peer
    home = Path(args.home).expanduser() if args.home else default_home()
    try:
        if args.action == "create":
            if not args.name or not args.address:
                print("shoal keys create: give NAME and --address tcp://HOST:PORT (the address "
                      "the remote machine reaches the broker at)", file=sys.stderr)
                return 2
            address = args.address if "://" in args.address else f"tcp://{args.address}"
            path = create_peer(home, args.name, address)
            print(f"created key {args.name!r}; its connection file is {path}\n"
                  f"copy it to the remote machine (keep it private) and run there:\n"
                  f"  shoal worker --connection-file {path.name}")
        elif args.action == "list":
            peers = list_peers(home)
            if not peers:
                print(f"no keys in {home / 'allowed'}")
            for name, public in peers:
                print(f"{name:<24} {public}")
        elif args.action == "revoke":
            if not args.name:
                print("shoal keys revoke: give the NAME of the key", file=sys.stderr)
                return 2
            if not revoke_peer(home, args.name):
                print(f"shoal keys: no key named {args.name!r} in {home}", file=sys.stderr)
                return 1
            print(f"revoked {args.name!r}: the broker refuses it from now on")
    except (OSError, ValueError) as exc:
        print(f"shoal keys: {exc}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------- main
def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="ADDRESS|CONNECTION_FILE",
                   help="default: $SHOAL_CONNECTION_FILE, else the newest local broker")
    p.add_argument("--key-file", help="the broker's connection file, when giving an ADDRESS")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")


def _monitor(command: str, args: argparse.Namespace) -> int:
    from . import monitor
    return getattr(monitor, command)(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Interactive distributed computing over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("cluster", help="run a local broker and workers until Ctrl-C",
                       description="Run a local broker and workers in the foreground until "
                                   "Ctrl-C or SIGTERM, then stop them all.")
    p.add_argument("-n", "--n-workers", type=int, default=os.cpu_count() or 1,
                   help="number of workers (default: one per CPU core)")
    p.add_argument("--slots", type=int, default=1, help="tasks each worker runs at once")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="address the broker binds (default 127.0.0.1 and a free port)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds allowed to start")
    p.add_argument("--store", metavar="PATH",
                   help="keep queued tasks, results, schedules and locks in this SQLite file")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("status", help="show a broker's workers and task counts",
                       description="Show a broker's workers and task counts.")
    p.add_argument("target", nargs="?", metavar="ADDRESS|CONNECTION_FILE",
                   help="default: $SHOAL_CONNECTION_FILE, else the newest local broker")
    p.add_argument("--key-file", help="the broker's connection file, when giving an ADDRESS")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="a live view of workers, queues, rates and failures",
                       description="A live terminal view of the cluster, refreshed in place: "
                                   "workers and what they run, queues, task rates, recent "
                                   "failures. Reads the broker only. q or Ctrl-C quits.")
    _target_options(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--iterations", type=int, default=0,
                   help="stop after this many refreshes (default: run until q or Ctrl-C)")
    p.set_defaults(func=lambda a: _monitor("cmd_top", a))

    p = sub.add_parser("events", help="stream task and worker events as JSON lines",
                       description="Print the broker's task and worker events as JSON lines, "
                                   "one per event, until Ctrl-C (see shoal.monitor).")
    _target_options(p)
    p.add_argument("--kinds", help="only these event kinds, comma-separated "
                                   "(e.g. task-failed,worker-lost)")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.add_argument("--idle", type=float, default=None,
                   help="stop after this many seconds without an event")
    p.set_defaults(func=lambda a: _monitor("cmd_events", a))

    p = sub.add_parser("demo", help="estimate pi over a local cluster, with live progress",
                       description="Start a local cluster, estimate pi with a Monte-Carlo map "
                                   "over many tasks, show progress and throughput, then stop.")
    p.add_argument("-n", "--n-workers", type=int, default=None,
                   help="number of workers (default: one per CPU core)")
    p.add_argument("--tasks", type=int, default=20_000, help="number of tasks (default 20000)")
    p.add_argument("--samples", type=int, default=2_000,
                   help="random points per task (default 2000)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keys", help="create, list or revoke keys of a secure broker",
                       description="Manage the allow-list of a Curve-secured broker (one that "
                                   "listens beyond loopback). `create` writes a connection file "
                                   "to give to a remote worker or client.")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("name", nargs="?", help="the key's name (create, revoke)")
    p.add_argument("--address", help="create: the broker's address as the peer reaches it")
    p.add_argument("--home", help="the broker's key directory (default ~/.shoal/broker)")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``shoal`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _DELEGATED[argv[0]][0](argv[1:]) or 0
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
