"""A worker's control thread: heartbeats, live output, interrupts.

A task runs on the worker's main thread (or a slot thread) and may hold it
for hours, so everything that must happen meanwhile has its own thread and
its own socket to the broker:

* a heartbeat every :data:`HEARTBEAT_SECONDS`, so the broker can tell a
  busy worker from a dead one;
* what running tasks print, streamed every :data:`STREAM_SECONDS`;
* cancel requests: a unit not started is withdrawn, a running one is
  interrupted; and per-task timeouts, enforced the same way.

An interrupt raises an exception inside the task: by a signal on the main
thread (which also breaks ``time.sleep`` and other blocking calls), or with
``PyThreadState_SetAsyncExc`` on a slot thread (at its next bytecode).
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Optional

import zmq

from . import protocol
from .protocol import Kind, ProtocolError
from .transport import recv_frames, retry_soon, send_frames

if TYPE_CHECKING:
    from .worker import Worker

logger = logging.getLogger(__name__)

#: How often a worker tells the broker it is alive.
HEARTBEAT_SECONDS = 1.0
#: How often printed output of running tasks is sent on.
STREAM_SECONDS = 0.1
#: How soon a direct task that reaches a busy one-slot worker is bounced to the broker.
BOUNCE_SECONDS = 0.005
INTERRUPT_SIGNAL = signal.SIGUSR2


class Interrupted(BaseException):
    """Raised inside a task that is being stopped; a BaseException, so that
    ``except Exception`` in user code does not swallow it."""


class CancelInterrupt(Interrupted):
    """The task was cancelled by its client."""


class TimeoutInterrupt(Interrupted):
    """The task ran past its ``timeout``."""


class Control(threading.Thread):
    """The control thread of ``worker``."""

    def __init__(self, worker: "Worker") -> None:
        super().__init__(name="shoal-control", daemon=True)
        self.worker = worker
        self.socket_id = b"x" + worker.ident[1:]
        self.sock = worker.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.socket_id)
        self.sock.setsockopt(zmq.LINGER, 500)
        retry_soon(self.sock)
        worker.apply_curve(self.sock)
        self.sock.connect(worker.address)
        self.session = protocol.Session()
        self.guard = protocol.ReplayGuard()
        self.main_thread = threading.main_thread().ident
        self._pending_interrupts: dict[int, tuple] = {}  # thread id -> (bid, exception type)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._last_error = 0.0  # when an unexpected error was last logged
        # Requests tasks make of the broker (locks): sent by this thread, which
        # owns the socket; each task waits on its own event for the answer.
        self._requests: deque = deque()
        self._answers: dict[int, list] = {}  # request id -> [event, answer]
        self._request_ids = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def install(self) -> None:
        """Install the interrupt signal handler; call from the main thread."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(INTERRUPT_SIGNAL, self._on_signal)

    def stop(self) -> None:
        self._halt.set()

    def _send(self, kind: str, fields: dict, frames: list = ()) -> None:
        fields["wid"] = self.worker.ident
        try:
            send_frames(self.sock, protocol.encode(self.worker.key, kind, fields, frames,
                                                   session=self.session), block=False)
        except zmq.Again:
            # No connection to queue it on (or a full queue): a heartbeat or an output
            # line is worth nothing late, and waiting here would stop this thread.
            logger.debug("control message %s not sent: no connection to the broker", kind)

    def run(self) -> None:
        worker = self.worker
        next_beat = 0.0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                # Each step is guarded: this thread must outlive any one bad message or
                # bug, or the worker stops heartbeating and is declared lost while alive.
                try:
                    # While the main thread runs a task, direct tasks that reach it
                    # are bounced from here (see Worker.bounce_direct).
                    watching = worker.inline and worker.direct is not None and worker.running_now
                    ready = dict(poller.poll(int((BOUNCE_SECONDS if watching else
                                                  STREAM_SECONDS) * 1000)))
                    if watching:
                        worker.bounce_direct(self.bounce)
                    if self._wake_r in ready:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    while self._requests:
                        self._send(*self._requests.popleft())
                    if self.sock in ready:
                        self._receive()
                    failure = worker.watch.check()
                    if failure is not None:
                        worker.fail(failure)
                    self._stream()
                    self._enforce_timeouts()
                    now = time.monotonic()
                    if now >= next_beat:
                        next_beat = now + HEARTBEAT_SECONDS
                        self._send(Kind.HEARTBEAT, {"running": list(worker.running_now),
                                                    "rg": worker.hellos})
                        if worker.parent_pid and os.getppid() != worker.parent_pid:
                            logger.info("parent process %d is gone; worker stopping",
                                        worker.parent_pid)
                            worker.stop()
                except Exception:
                    self._log_error("the worker's control thread hit an error; serving on")
        finally:
            failure = worker.watch.check()  # a refusal seen only as the worker stops
            if failure is not None:
                worker.fail(failure)
            self.sock.close(linger=500)
            for entry in list(self._answers.values()):
                entry[0].set()  # a task waiting for an answer stops waiting
            os.close(self._wake_r)
            os.close(self._wake_w)

    def bounce(self, bids: list) -> None:
        """Give direct units back to the broker (see Worker.bounce_direct)."""
        self._send(Kind.RESULTS, {"r": [[bid, "bounce", 0, {}] for bid in bids]})

    def _log_error(self, text: str) -> None:
        """Log an unexpected error with its traceback, at most every 5 s (it may repeat)."""
        now = time.monotonic()
        if now - self._last_error >= 5.0:
            self._last_error = now
            logger.exception(text)

    def _receive(self) -> None:
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                msg = protocol.decode(self.worker.key, recv_frames(self.sock), guard=self.guard)
            except ProtocolError as exc:
                logger.warning("dropped a control message: %s", exc)
                continue
            try:
                if msg.kind == Kind.CANCEL:
                    self._on_cancel(msg.header)
                elif msg.kind == Kind.REPLY:
                    entry = self._answers.get(msg.header.get("rq"))
                    if entry is not None:
                        entry[1] = msg.header
                        entry[0].set()
                elif msg.kind == Kind.WELCOME and msg.header.get("rehello"):
                    if msg.header.get("rg") != self.worker.hellos:
                        # The answer to a heartbeat sent before this worker last registered
                        # (heartbeats queue while the broker is down): clearing would drop
                        # units given it since, which the broker counts as running here.
                        continue
                    self.worker.hellos += 1
                    # The broker restarted and does not know this worker: register again.
                    logger.info("the broker does not know this worker (it restarted?): "
                                "registering")
                    self.worker.waiting.clear()  # units of the old run: their clients were told
                    self._send(Kind.WORKER_HELLO, self.worker.hello_fields())
            except Exception:
                self._log_error(f"a malformed {msg.kind} control message from the broker "
                                "was dropped")

    def lock_request(self, fields: dict, wait: Optional[float]) -> dict:
        """From a task's thread: send a LOCK request and wait for the broker's answer."""
        worker = self.worker
        me = threading.get_ident()
        unit = next((bid for bid, thread in list(worker.running_now.items()) if thread == me), 0)
        rq = next(self._request_ids)
        entry = self._answers[rq] = [threading.Event(), None]
        self._requests.append((Kind.LOCK, dict(fields, rq=rq, b=unit, bs=worker.broker_session)))
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        try:
            if not entry[0].wait(None if wait is None else wait + 10.0) or entry[1] is None:
                raise TimeoutError("the broker did not answer a lock request (is it running?)")
        finally:
            self._answers.pop(rq, None)
        answer = entry[1]
        if "error" in answer:
            from .errors import BrokerError
            raise BrokerError(answer["error"])
        return answer

    def _on_cancel(self, header: dict) -> None:
        """Withdraw units not started; interrupt running ones if asked to.

        A request of the wrong shape is answered as one that named no task, so
        the broker is not left waiting for this worker's answer.
        """
        worker = self.worker
        bids = header.get("b")
        if not isinstance(bids, list) or not all(type(bid) is int for bid in bids):
            logger.warning("a malformed cancel request (task ids %.80r): answered as naming none",
                           bids)
            bids = []
        withdrawn = [bid for bid in bids if worker.waiting.pop(bid, None) is not None]
        if worker.direct is not None:
            for bid in withdrawn:  # (no result will take its route back to its client)
                worker.direct.routes.pop(bid, None)
        interrupted = []
        if header.get("r", True):
            for bid in bids:
                if self.interrupt(bid, CancelInterrupt):
                    interrupted.append(bid)
        self._send(Kind.CANCELLED, {"b": withdrawn, "i": interrupted, "rq": header.get("rq")})

    def _stream(self) -> None:
        for bid, (out, err) in list(self.worker.captures.items()):
            text_out, text_err = out.take_new(), err.take_new()
            if text_out or text_err:
                fields = {"b": bid}
                if text_out:
                    fields["o"] = text_out
                if text_err:
                    fields["e"] = text_err
                self._send(Kind.OUTPUT, fields)

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for bid, deadline in list(self.worker.deadlines.items()):
            if now > deadline:
                self.worker.deadlines.pop(bid, None)
                self.interrupt(bid, TimeoutInterrupt)

    # -- interrupts
    def interrupt(self, bid: int, exc_type: type) -> bool:
        """Raise ``exc_type`` inside the running unit ``bid``; False if it is not running."""
        thread_id = self.worker.running_now.get(bid)
        if thread_id is None:
            return False
        with self._lock:
            self._pending_interrupts[thread_id] = (bid, exc_type)
        if thread_id == self.main_thread and signal.getsignal(INTERRUPT_SIGNAL) == self._on_signal:
            signal.pthread_kill(thread_id, INTERRUPT_SIGNAL)
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                                       ctypes.py_object(exc_type))
        return True

    def _on_signal(self, signum, frame) -> None:
        with self._lock:
            entry = self._pending_interrupts.pop(self.main_thread, None)
        # Raise only in the unit it was meant for, not in one that began since.
        if entry is not None and self.worker.running_now.get(entry[0]) == self.main_thread:
            raise entry[1]()

    def consume(self, thread_id: int) -> None:
        """Forget an interrupt that arrived after its unit finished."""
        with self._lock:
            self._pending_interrupts.pop(thread_id, None)
