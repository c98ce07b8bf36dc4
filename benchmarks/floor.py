"""The floor: what raw pyzmq costs with nothing else, the least any broker can cost.

    python benchmarks/floor.py                  # every figure, about half a minute
    python benchmarks/floor.py --quick          # fewer repetitions
    python benchmarks/floor.py --json out.json  # also write the figures as JSON

Two paths, each over TCP (loopback) and IPC:

- ``direct``: a DEALER in this process, a ROUTER echo in another process;
- ``relay``: the same DEALER, a relay process with one ROUTER that both the
  client and the echo (a DEALER) connect to, as in shoal's one-port design.
  The relay forwards frames without decoding them: it reads the routing
  identity and nothing else.

On each: the round-trip latency of small messages (three frames shaped like a
shoal message: 32-byte signature, 64-byte header, 48-byte payload), one at a
time, median and p99; pipelined throughput of the same messages (up to
``WINDOW`` in flight); and the round trip of one 100 MiB frame, sent and echoed
without copies (``copy=False``).  And, for scale, an in-memory copy of 100 MiB.

Small messages go with ``copy=True`` (pyzmq's faster path for small frames);
the big frame with ``copy=False``, in fresh processes.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import zmq

MESSAGE = [b"s" * 32, b"h" * 64, b"p" * 48]
READY = b"READY"
WINDOW = 500        # messages in flight when pipelining (under the default HWM of 1000)
BIG = 100 * 2**20   # bytes in the big frame
TIMEOUT_MS = 60_000  # no single receive waits longer than this


# ----------------------------------------------------------------- child processes
def die_with_parent() -> None:
    """Linux: have the kernel kill this child when its parent dies, however it dies."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the parent's clean-up (and the runner's sweep) stops it


def run_echo(addr: str, bind: bool, zero_copy: bool) -> None:
    """Echo every message back: a ROUTER that binds (direct), or a DEALER behind a relay."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER if bind else zmq.DEALER)
    sock.linger = 0
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
        sock.send(READY)
    print("READY", flush=True)
    copy = not zero_copy
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        send(recv(copy=copy), copy=copy)


def run_relay(addr: str, zero_copy: bool) -> None:
    """One ROUTER; messages from the echo go to the client named in them, the rest to the echo."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(addr)
    print("READY", flush=True)
    copy = not zero_copy
    recv, send = sock.recv_multipart, sock.send_multipart
    worker: Optional[bytes] = None
    while True:
        msg = recv(copy=copy)
        sender = msg[0] if copy else msg[0].bytes
        if sender == worker:
            send(msg[1:], copy=copy)            # [client, *frames] -> the client
        elif worker is not None:
            send([worker] + msg, copy=copy)     # [client, *frames] -> the echo
        elif len(msg) == 2 and (msg[1] if copy else msg[1].bytes) == READY:
            worker = sender
        # before the echo has announced itself, messages are dropped (the client retries)


# ----------------------------------------------------------------- the measuring side
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Setup:
    """The child processes of one path over one transport, and the client's socket."""

    def __init__(self, transport: str, path: str, zero_copy: bool, tmpdir: str) -> None:
        if transport == "tcp":
            addr = f"tcp://127.0.0.1:{free_port()}"
        else:
            addr = f"ipc://{tmpdir}/{path}-{int(zero_copy)}.ipc"
        me = [sys.executable, os.path.abspath(__file__)] + (["--zero-copy"] if zero_copy else [])
        self.procs: list = []
        try:
            if path == "direct":
                self._spawn(me + ["--role", "echo-bind", "--addr", addr])
            else:
                self._spawn(me + ["--role", "relay", "--addr", addr])
                self._spawn(me + ["--role", "echo-connect", "--addr", addr])
            self.ctx = zmq.Context()
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.linger = 0
            self.sock.rcvtimeo = TIMEOUT_MS  # every receive is bounded, at no cost per call
            self.sock.connect(addr)
            self._until_answered()
        except BaseException:
            self.close()
            raise

    def _spawn(self, cmd: list) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready or proc.stdout.readline().strip() != b"READY":
            raise RuntimeError(f"{cmd[-3:]} did not start (exit code {proc.poll()})")

    def _until_answered(self) -> None:
        """Ping until a reply comes (a relay drops messages until its echo has joined)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.sock.send_multipart(MESSAGE)
            if self.sock.poll(200):
                self.sock.recv_multipart()
                while self.sock.poll(200):  # replies to earlier pings that came late
                    self.sock.recv_multipart()
                return
        raise TimeoutError("no reply from the echo within 30 s")

    def recv(self, copy: bool = True) -> list:
        """The next reply; zmq.Again after ``TIMEOUT_MS`` without one."""
        return self.sock.recv_multipart(copy=copy)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)
            proc.stdout.close()
        if hasattr(self, "sock"):
            self.sock.close(0)
            self.ctx.term()


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def measure_small(s: Setup, n: int, pipelined: int, rounds: int) -> dict:
    """Latency as the median of ``rounds`` rounds' medians (as peers.py), p99 over all."""
    send, recv = s.sock.send_multipart, s.sock.recv_multipart
    for _ in range(200):  # warm-up
        send(MESSAGE)
        recv()
    samples, medians = [], []
    for _ in range(rounds):
        mine = []
        for _ in range(n // rounds):
            start = time.perf_counter()
            send(MESSAGE)
            recv()
            mine.append(time.perf_counter() - start)
        medians.append(statistics.median(mine))
        samples += mine
    sent = received = 0
    start = time.perf_counter()
    while received < pipelined:
        while sent < pipelined and sent - received < WINDOW:
            send(MESSAGE)
            sent += 1
        recv()
        received += 1
    elapsed = time.perf_counter() - start
    return {"latency_median_us": statistics.median(medians) * 1e6,
            "latency_p99_us": percentile(samples, 99) * 1e6, "latency_n": len(samples),
            "pipelined_per_s": pipelined / elapsed, "pipelined_n": pipelined}


def measure_big(s: Setup, repeats: int) -> dict:
    payload = bytearray(BIG)
    payload[::4096] = b"x" * len(payload[::4096])  # touch every page before timing
    samples = []
    for _ in range(repeats + 1):  # the first one warms the buffers up
        start = time.perf_counter()
        s.sock.send_multipart([payload], copy=False)
        reply = s.recv(copy=False)
        samples.append(time.perf_counter() - start)
        assert len(reply[0].buffer) == BIG
        del reply
    samples = samples[1:]
    return {"big_median_s": statistics.median(samples), "big_best_s": min(samples),
            "big_samples": samples, "big_bytes": BIG}


def measure_copy(repeats: int) -> dict:
    """Copy 100 MiB in memory: into a fresh buffer (as a serializer would) and into a reused one."""
    try:
        import numpy as np
        src = np.ones(BIG, dtype=np.uint8)
        fresh = src.copy
        dst = np.empty_like(src)

        def reuse() -> None:
            np.copyto(dst, src)
    except ImportError:
        src = bytearray(b"\1") * BIG
        fresh = src.copy
        dst = bytearray(BIG)

        def reuse() -> None:
            dst[:] = src
    fresh_s, reuse_s = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = fresh()
        fresh_s.append(time.perf_counter() - start)
        del out
        start = time.perf_counter()
        reuse()
        reuse_s.append(time.perf_counter() - start)
    return {"copy_fresh_median_s": statistics.median(fresh_s[1:]),
            "copy_reuse_median_s": statistics.median(reuse_s[1:]), "copy_bytes": BIG}


def run_all(quick: bool, transports: tuple = ("tcp", "ipc"), log=print) -> dict:
    n, pipelined, repeats = (300, 10_000, 2) if quick else (2_000, 100_000, 5)
    rounds = 1 if quick else 3  # as peers.py's round trips
    results: dict = {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "message_bytes":
                     sum(map(len, MESSAGE)), "window": WINDOW}
    with tempfile.TemporaryDirectory(prefix="shoal-floor-") as tmpdir:
        for transport in transports:
            for path in ("direct", "relay"):
                figures: dict = {}
                s = Setup(transport, path, False, tmpdir)
                try:
                    figures.update(measure_small(s, n, pipelined, rounds))
                finally:
                    s.close()
                s = Setup(transport, path, True, tmpdir)
                try:
                    figures.update(measure_big(s, repeats))
                finally:
                    s.close()
                results[f"{transport}_{path}"] = figures
                log(f"floor {transport} {path}: {figures['latency_median_us']:.0f} us, "
                    f"{figures['pipelined_per_s']:,.0f} msg/s, 100 MiB {figures['big_median_s']:.3f} s")
    results.update(measure_copy(repeats))
    log(f"floor copy 100 MiB: {results['copy_fresh_median_s'] * 1e3:.1f} ms fresh, "
        f"{results['copy_reuse_median_s'] * 1e3:.1f} ms into a reused buffer")
    return results


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--role", choices=["echo-bind", "echo-connect", "relay"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    parser.add_argument("--zero-copy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        die_with_parent()
    if args.role == "relay":
        run_relay(args.addr, args.zero_copy)
    elif args.role:
        run_echo(args.addr, args.role == "echo-bind", args.zero_copy)
    results = run_all(args.quick, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
