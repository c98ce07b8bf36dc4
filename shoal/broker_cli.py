"""The ``shoal broker`` command: options, security defaults, the store, signals."""
from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import zmq

from .broker import MAX_FRAMES, MAX_MESSAGE_BYTES, Broker
from .liveness import Liveness
from .security import (default_home, is_loopback, read_connection_file, read_key_file,
                       runtime_dir)

logger = logging.getLogger("shoal.broker")


#: ``gc.set_threshold`` in the broker process (Python's default is 700, 10, 10).
BROKER_GC_THRESHOLDS = (5000, 10, 10)


@functools.lru_cache(maxsize=None)
def options_parser() -> argparse.ArgumentParser:
    """The ``shoal broker`` options (built once: a forked broker reuses its parent's)."""
    parser = argparse.ArgumentParser(prog="shoal broker", description="Run a shoal broker.")
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="address to bind (default 127.0.0.1 and a free port)")
    parser.add_argument("--connection-file", help="where to write the connection file "
                        "(default: in the runtime directory)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help="sign with the key in this file (hex, or a connection "
                        "file); by default a restart on the same address reuses the key in "
                        "--connection-file, so workers rejoin")
    parser.add_argument("--ipc-path", help=argparse.SUPPRESS)  # ... and IPC endpoint
    # A launcher waiting for its workers: "SHOAL-WORKER NAME" on stdout as each of
    # the first N registers.
    parser.add_argument("--announce-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback address without encryption (dangerous)")
    parser.add_argument("--home", help="where a secure broker keeps its keys and allow-list "
                        "(default ~/.shoal/broker; see `shoal keys`)")
    parser.add_argument("--curve", action="store_true",
                        help="encrypt and authenticate even on loopback")
    parser.add_argument("--allowed-failures", type=int, default=Liveness.allowed_failures,
                        help="fail a task with WorkerLost once this many workers died running "
                             "it (default %(default)s)")
    parser.add_argument("--max-frames", type=int, default=MAX_FRAMES,
                        help="most frames one message may have (default %(default)s)")
    parser.add_argument("--max-message-size", type=int, default=MAX_MESSAGE_BYTES,
                        help="most bytes one message may have (default 4 GiB)")
    parser.add_argument("--store", metavar="PATH",
                        help="keep queued tasks, results, schedules and locks in this SQLite "
                             "file, so a restart (even after SIGKILL) loses none of them")
    parser.add_argument("--store-sync", choices=["normal", "full"], default="normal",
                        help="'normal' survives the broker being killed; 'full' also a power "
                             "cut, at some cost in speed (default %(default)s)")
    parser.add_argument("--result-ttl", type=float, default=None, metavar="SECONDS",
                        help="keep each task's result this long after it finishes (default "
                             "86400, a day)")
    parser.add_argument("--result-memory", type=int, default=None, metavar="BYTES",
                        help="results kept in memory at most (default 128 MiB, oldest dropped "
                             "first); with --store all stay on disk until the TTL")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = options_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s broker %(levelname)s %(message)s", stream=sys.stderr)
    if args.allowed_failures < 1:
        parser.error("--allowed-failures must be at least 1")
    listen = args.listen if "://" in args.listen else f"tcp://{args.listen}"
    home = None
    if args.insecure and not is_loopback(listen):
        logger.warning("!!! LISTENING ON %s WITHOUT ENCRYPTION OR AUTHENTICATION (--insecure): "
                       "anyone who reaches this port and learns the key can run code on the "
                       "workers, and every message is readable on the network !!!", args.listen)
    elif args.curve or not is_loopback(listen):
        if not zmq.has("curve"):
            print("shoal broker: this pyzmq/libzmq has no CurveZMQ support, which listening "
                  "beyond loopback needs; install pyzmq from PyPI or listen on 127.0.0.1",
                  file=sys.stderr)
            return 2
        home = Path(args.home).expanduser() if args.home else default_home()
    path = args.connection_file or str(runtime_dir() / f"broker-{os.getpid()}.json")
    key = None
    if home is None:
        if args.key_file:
            key = read_key_file(args.key_file)
        elif args.connection_file and os.path.exists(args.connection_file):
            try:
                previous = read_connection_file(args.connection_file)
            except (OSError, ValueError) as exc:
                print(f"shoal broker: {exc}", file=sys.stderr)
                return 2
            if previous.address == listen:
                key = previous.key  # a restart on the same address keeps its key
    if args.result_ttl is not None and not args.result_ttl > 0:
        parser.error("--result-ttl must be a positive number of seconds")
    if args.result_memory is not None and args.result_memory < 1 << 20:
        parser.error("--result-memory must be at least 1 MiB (1048576)")
    store = None
    if args.store:
        from .durable import SQLiteStore, StoreError
        try:
            store = SQLiteStore(args.store, sync=args.store_sync)
        except (StoreError, OSError) as exc:
            print(f"shoal broker: {exc}", file=sys.stderr)
            return 2
    broker = Broker(listen, key=key, connection_file=path, parent_pid=args.parent_pid, home=home,
                    max_frames=args.max_frames, max_message_bytes=args.max_message_size,
                    ipc_path=args.ipc_path, store=store, result_ttl=args.result_ttl,
                    result_memory=args.result_memory)
    if home is not None:
        logger.info("Curve-secured; keys in %s. Allow a remote worker with: shoal keys create "
                    "NAME --address tcp://THIS_HOST:PORT", home)
    broker.allowed_failures = args.allowed_failures
    broker.announce_workers = max(0, args.announce_workers)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    print(f"SHOAL-BROKER {broker.address} {broker.connection_file}", flush=True)
    logger.info("listening on %s; connection file %s", broker.address, broker.connection_file)
    # The broker holds many small objects (queued units, their headers) and makes
    # few reference cycles: the collector's default pace (a pass every 700
    # allocations, rescanning everything alive) cost it ~15% of its time under a
    # burst of submits.  What was loaded at start-up is never scanned again.
    gc.freeze()
    gc.set_threshold(*BROKER_GC_THRESHOLDS)
    broker.run()
    return 0
