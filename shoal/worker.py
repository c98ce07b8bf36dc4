"""The worker process: connects out to the broker, runs tasks, sends results.

The main thread owns the socket.  A one-slot worker (the default) runs tasks
on that thread, which keeps the hand-offs off the latency path; with more
slots each slot is a thread fed from a queue.
Function payloads and scattered data arrive once per worker and are kept by
digest.  Each unit's stdout and stderr are captured and sent with its result.
How a unit runs and how its outcome is encoded is :mod:`shoal.execution`.

Run it with ``shoal worker tcp://HOST:PORT`` or ``shoal worker --connection-file FILE``.
"""
from __future__ import annotations

import argparse
import functools
import faulthandler
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Optional

import zmq
from zmq.backend import zmq_poll

from . import protocol, serialize, tasks
from .capture import OutputRouter
from .control import Control, Interrupted
from .direct import DirectInbox, is_direct
from .errors import TransferError
from .execution import MAX_RESULT_SIZE, Backlog, Execution, encode_exception
from .objects import ObjectStore
from .protocol import FrameAltered, Kind, ProtocolError
from .records import DEFAULT_QUEUE
from .routing import parse_resources
from .security import (ConnectionInfo, HandshakeWatch, apply_curve, find_local_broker,
                       is_loopback, read_connection_file, read_key_file,
                       runtime_dir)
from .transport import recv_frames, retry_soon, send_frames

logger = logging.getLogger(__name__)

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


# ----------------------------------------------------------------- objects
store = ObjectStore()  # this process's; Ref pickles resolve through it

#: A namespace that lives as long as the worker process, for code that sets up
#: state once and uses it in later tasks (the notebook's ``%%remote`` cells).
namespace: dict = {"__name__": "__shoal_worker__"}


_current: Optional["Worker"] = None


def current_worker() -> Optional["Worker"]:
    """The worker this process runs, if it is a worker (tasks ask it for locks)."""
    return _current


def resolve_ref(digest: bytes) -> Any:
    """Unpickling hook for :class:`shoal.client.Ref`: the scattered value itself."""
    return store.get(digest)


def _parse_tasks(header: dict, frames: list) -> tuple:
    """``(objects, digests to forget, units)`` of a TASKS message, checked whole.

    Raises KeyError, TypeError or ValueError for a message of the wrong shape
    (a bug in the broker, yet no reason to stop), before anything is kept.
    """
    pos, objects = 0, []
    for digest, n in header.get("ob", ()):
        if type(digest) is not bytes or type(n) is not int or n < 0:
            raise ValueError(f"object entry {[digest, n]!r:.80} is not [digest, frame count]")
        objects.append((digest, frames[pos:pos + n]))
        pos += n
    forget = header.get("fg") or []
    if not isinstance(forget, list) or not all(type(d) is bytes for d in forget):
        raise ValueError(f"'fg' {forget!r:.80} is not a list of digests")
    units = []
    for bid, refs, n, meta in header["u"]:
        if (type(bid) is not int or not isinstance(refs, list)
                or not all(type(r) is bytes for r in refs) or type(n) is not int or n < 0
                or not isinstance(meta, dict)
                or not (refs or isinstance(meta.get("fn"), str))):  # a function, or a task name
            raise ValueError(f"unit entry {[bid, refs, n, meta]!r:.80} is not "
                             "[id, [function digest, ...], frame count, meta]")
        units.append((bid, refs, frames[pos:pos + n], meta))
        pos += n
    if pos != len(frames):
        raise ValueError(f"its entries name {pos} frames, it has {len(frames)}")
    return objects, forget, units


def _unit_ids(header: dict) -> list:
    """The unit ids a TASKS header names, as far as they can be made out."""
    units = header.get("u")
    if not isinstance(units, list):
        return []
    return [u[0] for u in units if isinstance(u, list) and u and type(u[0]) is int]


# ----------------------------------------------------------------- worker
class Worker(Execution):
    """A worker process connected to the broker at ``address``."""

    def __init__(self, address: str, key: bytes, slots: int = 1, name: Optional[str] = None,
                 parent_pid: Optional[int] = None, max_result_size: int = MAX_RESULT_SIZE,
                 curve: Optional[dict] = None, queues: Optional[list] = None,
                 resources: Optional[dict] = None, imports: Optional[list] = None,
                 registered_only: bool = False) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        #: named tasks this worker has (its --import modules define them)
        self.task_names = tasks.import_modules(imports or [])
        self.broker_session: Optional[str] = None  # the broker run it registered with
        #: times it registered again when the broker asked (its heartbeats carry it)
        self.hellos = 0
        self.registered_only = registered_only
        store.safe = registered_only
        self.store = store  # the process's object store, for the execution mixin
        #: the queues this worker takes tasks from, and the resources it offers
        self.queues = list(queues) if queues else [DEFAULT_QUEUE]
        self.resources = parse_resources(resources or {})
        self.address = address
        self.key = key
        self.slots = slots
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.parent_pid = parent_pid
        self.max_result_size = max_result_size
        self.host = serialize.host_id()
        self.ctx = zmq.Context.instance()
        #: the process's exit status: 1 once the connection failed for good (see fail)
        self.exit_code = 0
        self._failure: Optional[str] = None
        # Named sockets: the control thread's socket tells the broker which
        # worker it speaks for by this identity.
        self.ident = b"w" + secrets.token_bytes(15)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.ident)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        retry_soon(self.sock)
        self.curve = curve
        self.apply_curve(self.sock)
        # Read by the control thread: a broker that refuses this worker's key is
        # said so, and the worker exits, instead of waiting in silence.
        self.watch = HandshakeWatch(self.sock, ConnectionInfo(address, key, curve=curve), "worker")
        self.sock.connect(address)
        self.session = protocol.Session()
        self.guard = protocol.ReplayGuard()
        self.inbox = Backlog()  # for slot threads
        self.outbox: deque = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._woken = False
        self._stopping = False
        self.stdout = OutputRouter(sys.stdout)
        self.stderr = OutputRouter(sys.stderr)
        # One slot runs tasks inline on the socket thread: no thread hand-off on
        # the latency path.  More slots are threads fed through ``inbox``.
        self.inline = slots == 1
        self.pending = Backlog()  # for the inline slot
        # Units received and not started, by id: a cancel removes them here.
        self.waiting: dict[int, tuple] = {}
        # Running units: the thread running each, its output, its deadline.
        self.running_now: dict[int, int] = {}
        self.captures: dict[int, tuple] = {}
        self.deadlines: dict[int, float] = {}
        self.control = Control(self)
        #: where local clients hand lone tasks straight to this worker (shoal.direct)
        self.direct = self._open_direct()
        self.threads = [] if self.inline else [
            threading.Thread(target=self._slot, name=f"shoal-slot-{i}", daemon=True)
            for i in range(slots)]

    def _send(self, kind: str, fields: Optional[dict] = None, frames=()) -> None:
        try:
            send_frames(self.sock, protocol.encode(self.key, kind, fields, frames,
                                                   session=self.session), block=False)
        except zmq.Again:
            # SNDHWM is 0: the socket refuses a message only when libzmq has given
            # its connection up for good, and a blocking send would never return.
            # (Why, the control thread reads from the socket monitor: it owns it.)
            self.fail(f"the connection to the broker at {self.address} was closed for good "
                      "(its handshake failed); check that this worker has the broker's "
                      "connection file")

    def _open_direct(self) -> Optional[DirectInbox]:
        """A direct endpoint, for a worker of the default queue on a loopback broker
        without Curve (across hosts every task goes through the broker)."""
        if (self.curve or self.registered_only or DEFAULT_QUEUE not in self.queues
                or not is_loopback(self.address)):
            return None
        try:
            return DirectInbox(self.key, str(runtime_dir()))
        except OSError as exc:
            logger.info("no direct endpoint (%s); tasks come through the broker only", exc)
            return None

    def run(self) -> None:
        """Serve until the broker says stop, SIGTERM, or the parent process dies."""
        global _current
        _current = self
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.control.install()
        for t in self.threads:
            t.start()
        self._send(Kind.WORKER_HELLO, self.hello_fields())
        self.control.start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        direct = self.direct
        version, direct_fds = -1, set()
        # The wake-up pipe too: stop() (SIGTERM) then ends the wait at once, not after it.
        inline_items = [(self.sock, _POLLIN), (self._wake_r, _POLLIN)]
        if direct is not None and self.inline:
            direct.lock.acquire()  # held by this thread but while it runs a task
        try:
            while not self._stopping:
                if direct is not None and version != direct.version:  # a client came or left
                    version = direct.version
                    fds = set(direct.fds())
                    for fd in direct_fds - fds:
                        poller.unregister(fd)
                    for fd in fds - direct_fds:
                        poller.register(fd, zmq.POLLIN)
                    direct_fds = fds
                    inline_items = [(self.sock, _POLLIN), *((fd, _POLLIN) for fd in fds),
                                    (self._wake_r, _POLLIN)]
                if self.inline:
                    # Only the sockets to watch: the cheapest wait on the latency path.
                    ready = zmq_poll(inline_items, 250)
                    if ready:
                        # Only what is ready (in the order polled): asking the broker's
                        # socket costs ~2-5 us, the direct sockets a poll.
                        if ready[-1][0] == self._wake_r:
                            self._drain_wake()
                        if ready[0][0] is self.sock:
                            self._receive()
                        if direct is not None and any(r[0] not in (self.sock, self._wake_r)
                                                      for r in ready):
                            self._receive_direct()
                        self._run_pending()
                else:
                    ready = poller.poll(250)
                    for sock, _ in ready:
                        if sock is self.sock:
                            self._receive()
                        elif sock in direct_fds:
                            self._receive_direct()
                        else:
                            self._flush_results()
        finally:
            self._close()

    def apply_curve(self, sock) -> None:
        """Set a socket's Curve keys when the broker is Curve-secured."""
        if self.curve:
            apply_curve(sock, ConnectionInfo(self.address, self.key, curve=self.curve))

    def hello_fields(self) -> dict:
        """What this worker tells the broker when it registers."""
        fields = {"name": self.name, "slots": self.slots, "host": self.host,
                  "pid": os.getpid(), "ctl": self.control.socket_id}
        if self.queues != [DEFAULT_QUEUE]:
            fields["qs"] = self.queues
        if self.resources:
            fields["rs"] = self.resources
        if self.task_names:
            fields["tk"] = self.task_names
        if self.registered_only:
            fields["ro"] = 1
        if self.direct is not None:
            fields["dx"] = self.direct.endpoint
        return fields

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")

    def fail(self, why: str) -> None:
        """The broker cannot be reached, for good: say why, stop, exit with status 1."""
        if why != self._failure:  # the main and control threads may both find out
            self._failure = why
            logger.error("%s", why)
        self.exit_code = 1
        self.stop()

    def _close(self) -> None:
        self.control.stop()
        if self._failure is None:
            try:
                self._send(Kind.WORKER_BYE)
            except zmq.ZMQError:
                pass
        self.control.join(2)
        for _ in self.threads:
            self.inbox.put(None)
        self.watch.close()  # on this thread, which owns the socket; the control thread is done
        self.sock.close(linger=500)
        if self.direct is not None:
            self.direct.close()
        serialize.segments.unlink_all()
        sys.stdout, sys.stderr = self.stdout.original, self.stderr.original

    def _receive(self) -> None:
        sock = self.sock
        # Check for waiting messages rather than reading until zmq.Again:
        # raising it costs more than the check, twice per task.
        while sock.get(_EVENTS) & _POLLIN:
            try:
                msg = protocol.decode(self.key, recv_frames(sock), guard=self.guard)
            except FrameAltered as exc:
                logger.error("a message from the broker was altered in transit: %s", exc)
                if exc.message.kind == Kind.TASKS:
                    self._on_altered_tasks(exc.message)
                continue
            except ProtocolError as exc:
                logger.warning("dropped a message from the broker: %s", exc)
                continue
            if msg.kind == Kind.TASKS:
                self._on_tasks(msg)
            elif msg.kind == Kind.SHUTDOWN:
                logger.info("broker asked this worker to stop")
                self._stopping = True
            elif msg.kind == Kind.WELCOME:
                name = msg.header.get("name")
                self.name = name if isinstance(name, str) else self.name
                session = msg.header.get("session")
                self.broker_session = session if isinstance(session, str) else None
                logger.info("registered with the broker as %s", self.name)
            elif msg.kind == Kind.ERROR:
                logger.error("broker refused a message: %s", msg.header.get("msg"))

    def _on_tasks(self, msg: protocol.Message) -> None:
        try:
            objects, forget, units = _parse_tasks(msg.header, msg.frames)
        except (KeyError, TypeError, ValueError) as exc:
            self._fail_units(msg.header, f"worker {self.name} refused the TASKS message that "
                             f"carried this task, as malformed: {exc!r}. This is a bug in the "
                             "broker (or in a peer holding the cluster key)")
            return
        for digest, frames in objects:
            store.add(digest, frames)
        if forget:
            store.forget(forget)
        put = self.pending.put if self.inline else self.inbox.put
        waiting = self.waiting
        for unit in units:
            waiting[unit[0]] = unit
            put(unit[0], unit[3].get("pr", 0))

    def _receive_direct(self) -> None:
        """Take the tasks local clients handed this worker straight; bounce them to
        the broker (which queues them as usual) when this worker is busy."""
        for route, msg in self.direct.receive():
            try:
                objects, forget, units = _parse_tasks(msg.header, msg.frames)
                if forget or not all(is_direct(unit[0]) for unit in units):
                    raise ValueError("a direct task must carry a direct unit id, and no 'fg'")
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("dropped a malformed direct task message: %r", exc)
                self._bounce([bid for bid in _unit_ids(msg.header) if is_direct(bid)])
                continue
            for digest, frames in objects:
                store.add(digest, frames)
            busy = bool(self.waiting) or len(self.running_now) >= self.slots
            if busy or not all(store.has(ref) for unit in units for ref in unit[1]):
                self._bounce([unit[0] for unit in units])
                continue
            put = self.pending.put if self.inline else self.inbox.put
            for unit in units:
                self.direct.routes[unit[0]] = route
                self.waiting[unit[0]] = unit
                put(unit[0], 0)

    def bounce_direct(self, bounce) -> None:
        """On the control thread: while the one slot runs a task, give every direct
        task that arrives back to the broker at once with ``bounce(bids)``, rather
        than leave it waiting behind that task."""
        direct = self.direct
        if not direct.lock.acquire(blocking=False):
            return  # the main thread is between tasks: it takes them itself
        try:
            bids = [bid for _, msg in direct.receive() for bid in _unit_ids(msg.header)
                    if is_direct(bid)]
        finally:
            direct.lock.release()
        if bids:
            bounce(bids)

    def _bounce(self, bids: list) -> None:
        """Give direct units back to the broker, to be queued as if submitted to it."""
        if bids:
            self.outbox.extend((bid, "bounce", [], {}) for bid in bids)
            self._flush_results()

    def _on_altered_tasks(self, msg: protocol.Message) -> None:
        """A TASKS message whose signature held but a large frame did not match its digest.

        Nothing of it runs and nothing altered is unpickled; its tasks fail at once, so
        none holds a slot for ever.  Intact objects are kept (the broker counts them sent).
        """
        why = (f"a frame of the message that carried this task to worker {self.name} was "
               "altered in transit (it does not match its signed digest), so nothing of it "
               "was run or unpickled. Check the network path to the broker; a Curve-secured "
               "broker (the default beyond loopback) rules this out. Submit it again")
        try:
            objects, forget, _ = _parse_tasks(msg.header, msg.frames)
        except (KeyError, TypeError, ValueError):
            objects, forget = [], []
        for digest, frames in objects:
            if any(frame is None for frame in frames):
                store.refuse(digest, f"function or scattered data {digest.hex()} reached worker "
                             f"{self.name} altered in transit (it does not match its signed "
                             "digest); tasks that use it fail here")
            else:
                store.add(digest, frames)
        if forget:
            store.forget(forget)
        self._fail_units(msg.header, why)

    def _fail_units(self, header: dict, why: str) -> None:
        """Fail the units a TASKS message names with TransferError(why), at once."""
        bids = _unit_ids(header)
        logger.error("failing %d task(s): %s", len(bids), why)
        frames = encode_exception(TransferError(why))
        for bid in bids:
            self.outbox.append((bid, "err", frames, {}))
        self._flush_results()

    # -- slots
    def _slot(self) -> None:
        while True:
            try:
                bid = self.inbox.get()
                if bid is None:
                    return
                unit = self.waiting.pop(bid, None)
                if unit is None:
                    continue  # cancelled before it started
                self.outbox.append(self._run_unit(unit))
                if not self._woken:
                    self._woken = True
                    os.write(self._wake_w, b"x")
            except Interrupted:
                continue  # an interrupt that missed its unit must not end the slot

    def _run_pending(self) -> None:
        """Run queued units inline, sending results in batches of ~1 ms of work."""
        pending, outbox = self.pending, self.outbox
        flushed = time.perf_counter()
        waiting = self.waiting
        direct = self.direct
        while pending and not self._stopping:
            unit = waiting.pop(pending.pop(), None)
            if unit is not None:  # else cancelled before it started
                if direct is None:
                    outbox.append(self._run_unit(unit))
                else:
                    direct.lock.release()  # the control thread bounces what comes meanwhile
                    try:
                        outbox.append(self._run_unit(unit))
                    finally:
                        direct.lock.acquire()
            if not pending:
                if direct is not None and direct.routes:
                    # A direct unit's result goes to its client before this looks
                    # for more work.
                    self._flush_results()
                    flushed = time.perf_counter()
                self._receive()  # pick up work that arrived meanwhile
                if direct is not None:
                    self._receive_direct()
            now = time.perf_counter()
            if now - flushed > 0.001 or not pending:
                if direct is not None and pending:
                    self._receive_direct()  # bounced, rather than wait behind a backlog
                self._flush_results()
                flushed = now

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def _flush_results(self) -> None:
        if not self.inline:  # slot threads write a wake-up byte; inline needs none
            # Read the byte before clearing the flag: cleared first, a slot could set
            # it and write between the two, and that byte, read here, would leave the
            # flag set with the pipe empty, so later results would wait for ever.
            self._drain_wake()
            self._woken = False
        entries, frames = [], []
        outbox = self.outbox
        # Direct units' results go straight to their clients, which tell the broker
        # (see shoal.direct); the rest, and those that could not go, to the broker.
        delivered = self.direct.deliver(outbox, self.name) if (
            self.direct is not None and self.direct.routes) else ()
        while outbox:
            bid, status, out_frames, meta = outbox.popleft()
            if delivered and bid in delivered:
                continue
            entries.append([bid, status, len(out_frames), meta])
            frames.extend(out_frames)
        if entries:
            self._send(Kind.RESULTS, {"r": entries}, frames)


@functools.lru_cache(maxsize=None)
def options_parser() -> argparse.ArgumentParser:
    """The ``shoal worker`` options (built once: a forked worker reuses its parent's)."""
    parser = argparse.ArgumentParser(prog="shoal worker", description="Run a shoal worker.")
    parser.add_argument("address", nargs="?", help="broker address, tcp://HOST:PORT")
    parser.add_argument("--connection-file", help="connection file written by the broker")
    parser.add_argument("--key-file", help="file holding the cluster key (with ADDRESS)")
    parser.add_argument("--slots", type=int, default=1, help="tasks run at once (default 1)")
    parser.add_argument("--pool", choices=["thread", "process"], default="thread",
                        help="how slots run: threads of this process (default), or one process "
                             "each (pure-Python tasks in parallel; a crash takes one slot)")
    parser.add_argument("--name", help="worker name shown in status (default HOST-PID)")
    parser.add_argument("--queues", default=DEFAULT_QUEUE,
                        help="comma-separated queues to take tasks from (default: %(default)s); "
                             "list 'default' too to serve tasks submitted without a queue")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import this module (its @shoal.task functions "
                        "can then be sent by name); repeat it or separate modules by commas")
    parser.add_argument("--registered-only", action="store_true",
                        help="run only named tasks of the --import modules, refuse pickled code "
                             "and take only plain data as arguments (for shared workers)")
    parser.add_argument("--resources", default="",
                        help="abstract resources this worker offers, e.g. gpu=1,mem=64; a task "
                             "submitted with resources={'gpu': 1} holds them while it runs")
    parser.add_argument("--max-result-size", type=int, default=MAX_RESULT_SIZE,
                        help="largest result in bytes a task may return (default 1 GiB)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = options_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s worker %(levelname)s %(message)s", stream=sys.stderr)
    if args.address and "://" not in args.address:
        args.address = f"tcp://{args.address}"
    if args.slots < 1:
        parser.error(f"--slots must be at least 1, not {args.slots}")
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    try:
        resources = parse_resources(args.resources)
    except ValueError as exc:
        parser.error(f"--resources: {exc}")
    if not queues:
        parser.error("--queues needs at least one queue name")
    imports = [m.strip() for arg in args.imports for m in arg.split(",") if m.strip()]
    if args.registered_only and not imports:
        parser.error("--registered-only runs named tasks only: give the modules that define "
                     "them with --import MODULE")
    curve = None
    try:
        if args.connection_file:
            info = read_connection_file(args.connection_file)
            address, key, curve = args.address or info.local_address(), info.key, info.curve
        elif args.address and (args.key_file or os.environ.get("SHOAL_KEY")):
            address = args.address
            key = (read_key_file(args.key_file) if args.key_file
                   else bytes.fromhex(os.environ["SHOAL_KEY"]))
        elif args.address:
            info = find_local_broker(args.address)  # a broker on this host
            address, key, curve = info.local_address(), info.key, info.curve
        else:
            parser.error("give the broker's ADDRESS, or --connection-file FILE")
    except (LookupError, OSError, ValueError) as exc:  # PermissionError included
        print(f"shoal worker: {exc}", file=sys.stderr)
        return 2
    if "://" not in address:
        address = f"tcp://{address}"
    if args.pool == "process" and args.slots > 1:
        from .pool import run_process_pool
        target = args.connection_file or address
        return run_process_pool(list(sys.argv[1:] if argv is None else argv), args.slots,
                                args.name or f"{socket.gethostname()}-{os.getpid()}",
                                client_args=(target, None if args.connection_file else key))
    try:
        worker = Worker(address, key, slots=args.slots, name=args.name,
                        parent_pid=args.parent_pid, max_result_size=args.max_result_size,
                        curve=curve, queues=queues, resources=resources, imports=imports,
                        registered_only=args.registered_only)
    except ImportError as exc:
        print(f"shoal worker: --import: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    # `kill -USR1 <pid>` writes every thread's stack to the log: what is it doing?
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logger.info("worker %s connecting to %s with %d slot(s)", worker.name, address, args.slots)
    worker.run()
    # Stopped, and exiting: a SIGTERM now (a cluster closing as this worker gave up
    # on its broker) must not kill the interpreter's teardown and lose the exit code.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return worker.exit_code


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: pickles refer to
    # shoal.worker's globals (the object store), which must be the ones in use.
    from shoal import worker as _module
    sys.exit(_module.main())
