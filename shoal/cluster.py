"""A local cluster: a broker and workers as child processes of this one.

Children are started in their own session (a Ctrl-C in the terminal reaches
only this process, which then stops them in order) and watch this process:
if it dies, even by SIGKILL, they exit within about a second.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Optional

from . import launch
from .client import Client
from .security import is_loopback, new_key, read_connection_file, runtime_dir, write_private

logger = logging.getLogger(__name__)

_live: "weakref.WeakSet[Cluster]" = weakref.WeakSet()


def _python_command(module: str, *args: str) -> list:
    return [sys.executable, "-m", module, *args]


class ClusterError(RuntimeError):
    """A local cluster could not start; the message says which process and where its log is."""


class Cluster:
    """A broker and ``n_workers`` local worker processes, ready on return.

    >>> with shoal.Cluster(n_workers=4) as cluster:
    ...     client = cluster.client()
    ...     client.submit(pow, 2, 10).result()
    1024

    ``n_workers`` defaults to one per CPU core.  ``cluster.address`` and
    ``cluster.connection_file`` tell remote workers where to join.
    ``store=PATH`` keeps the broker's queued tasks, results, schedules and
    locks in that SQLite file (``shoal broker --store``).
    ``queues``, ``resources``, ``imports`` and ``registered_only`` apply to
    every worker (as ``shoal worker --queues``, ``--resources``, ``--import``,
    ``--registered-only``); :meth:`add_workers` starts differently equipped
    ones beside them.

    ``start_method`` is how the broker and the first workers start: ``"fork"``
    copies this process (a few milliseconds; the children share what it has
    imported), ``"spawn"`` starts fresh interpreters (~0.1-0.2 s).  The default,
    ``"auto"``, forks where that is safe: on Linux, from a process with one
    thread (a script; not a notebook kernel, whose threads a fork would leave
    holding their locks; nor a script that imported NumPy first, whose OpenBLAS
    starts a thread pool, unless ``OPENBLAS_NUM_THREADS=1``).  Workers started
    later (replacements, :meth:`scale`, :meth:`add_workers`) are always spawned,
    since the cluster's client thread runs by then.
    """

    def __init__(self, n_workers: Optional[int] = None, slots: int = 1,
                 listen: str = "127.0.0.1:0", timeout: float = 30.0,
                 log_level: str = "INFO", restart: bool = True,
                 allowed_failures: int = 3, max_result_size: Optional[int] = None,
                 queues: Optional[list] = None, resources: Any = None,
                 imports: Optional[list] = None, registered_only: bool = False,
                 store: Optional[str] = None, start_method: str = "auto") -> None:
        #: "fork" or "spawn": how the broker and first workers were started
        self.start_method = launch.choose(start_method)
        if n_workers is None:
            n_workers = os.cpu_count() or 1
        if n_workers < 0:
            raise ValueError(f"n_workers must be 0 or more, not {n_workers}")
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.slots = slots
        self.timeout = timeout
        self.log_level = log_level
        self.allowed_failures = allowed_failures
        #: the broker's durable store (``shoal broker --store``), if any
        self.store = str(store) if store is not None else None
        self.max_result_size = max_result_size
        self._default_options = _worker_options(queues=queues, resources=resources,
                                                imports=imports, registered_only=registered_only)
        self._options: dict[int, list] = {}  # worker pid -> its own options (kept on restart)
        self.log_dir = runtime_dir() / f"cluster-{os.getpid()}-{id(self):x}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._workers: list = []  # subprocess.Popen or launch.Forked
        self._names: dict[int, str] = {}  # worker pid -> name
        #: replace a local worker that dies (and tell the broker at once)
        self.restart = restart
        self._monitor_stop = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self._clients: list[Client] = []
        self._closed = False
        self._lock = threading.RLock()
        self._worker_seq = 0
        self.broker: Any = None  # subprocess.Popen or launch.Forked
        self._broker_lines = b""  # read from the broker's stdout, not yet split off
        self._own_client: Optional[Client] = None  # the cluster's own (see _client)
        self._first_client: Optional[Client] = None  # for the first client() (see there)
        _live.add(self)
        try:
            self._key_file = self.log_dir / "cluster.key"
            write_private(self._key_file, new_key().hex())
            self._ipc_path = self.log_dir / "broker.sock"
            self._start_broker(listen, n_workers)
            # Connected while the workers start (which leaves a core idle now and
            # then), rather than after: the first client() call gets it.
            self._first_client = Client(self.connection_file, timeout=timeout)
            self._await_announced(n_workers)
            if n_workers:
                # The broker told it of the workers as they joined; a round trip makes
                # sure it has read that (where they run decides shared memory and the
                # direct path for its first tasks).
                self._first_client.status(timeout=timeout)
            self._monitor = threading.Thread(target=self._watch, name="shoal-cluster-monitor",
                                             daemon=True)
            self._monitor.start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ processes
    def _log(self, name: str):
        return open(self.log_dir / f"{name}.log", "ab")

    def _start_broker(self, listen: str, n_workers: int) -> None:
        path = self.log_dir / "connection.json"
        local = [] if not is_loopback(listen if "://" in listen else f"tcp://{listen}") else [
            # Choose the key and IPC endpoint here, so the workers can start while
            # the broker does (they retry the connection until it binds).
            "--key-file", str(self._key_file), "--ipc-path", str(self._ipc_path)]
        argv = ["--listen", listen, "--connection-file", str(path), "--parent-pid",
                str(os.getpid()), "--log-level", self.log_level, "--allowed-failures",
                str(self.allowed_failures), "--announce-workers", str(n_workers), *local]
        if self.store:
            argv += ["--store", self.store]
        forking = self.start_method == "fork"
        with self._log("broker") as log:
            if forking:
                from .broker_cli import main, options_parser
                options_parser()  # built here once, not in every child
                readable, writable = os.pipe()
                try:
                    self.broker = launch.fork(main, argv, name="shoal-broker", stdout_fd=writable,
                                              stderr_fd=log.fileno(), close_fds=[readable])
                finally:
                    os.close(writable)
                self.broker.stdout = os.fdopen(readable, "rb")
            else:
                self.broker = subprocess.Popen(
                    _python_command("shoal.broker", *argv), stdout=subprocess.PIPE, stderr=log,
                    stdin=subprocess.DEVNULL, start_new_session=True)
        if local:  # the workers start while the broker does, and connect once it binds
            self._worker_target = [f"ipc://{self._ipc_path}", "--key-file", str(self._key_file)]
            self._workers.extend(self._start_worker(fork=forking) for _ in range(n_workers))
        line = self._broker_line(time.monotonic() + self.timeout)
        if not line.startswith("SHOAL-BROKER "):
            raise ClusterError(f"the broker did not start (exit code {self.broker.poll()}); "
                               f"see {self.log_dir / 'broker.log'}")
        _, self.address, self.connection_file = line.split()
        self.info = read_connection_file(self.connection_file)
        if not local:  # (they need the broker's public key from its connection file)
            self._worker_target = ["--connection-file", self.connection_file]
            self._workers.extend(self._start_worker(fork=forking) for _ in range(n_workers))

    def _broker_line(self, deadline: float) -> str:
        """The broker's next stdout line; '' if it closes its stdout or stays silent
        past ``deadline`` (read unbuffered: select must see what is not read yet)."""
        import select
        fd = self.broker.stdout.fileno()
        while b"\n" not in self._broker_lines:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            self._broker_lines += chunk
        line, self._broker_lines = self._broker_lines.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def _await_announced(self, n: int) -> None:
        """Wait for the first ``n`` workers to register: the broker says so on its
        stdout (--announce-workers), so starting needs no client of this cluster's."""
        deadline = time.monotonic() + self.timeout
        joined = 0
        while joined < n:
            # Woken at least every 50 ms, to tell a worker that died from a slow one.
            line = self._broker_line(min(deadline, time.monotonic() + 0.05))
            if line.startswith("SHOAL-WORKER "):
                joined += 1
                continue
            self._check_starting(joined, n, deadline)

    def _check_starting(self, joined: int, n: int, deadline: float) -> None:
        """Raise ClusterError if a process exited while the workers start, or
        ``deadline`` passed with ``joined`` of ``n`` registered."""
        dead = [p for p in self._workers + [self.broker] if p.poll() is not None]
        if dead:
            what = "the broker" if dead[0] is self.broker else "a local worker"
            raise ClusterError(f"{what} exited with code {dead[0].returncode} while "
                               f"starting; see the logs in {self.log_dir}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{joined} of {n} workers registered within "
                               f"{self.timeout:g} s; see the logs in {self.log_dir}")

    @property
    def _client(self) -> Client:
        """The cluster's own client (status, scaling, reporting lost workers), made
        when first needed: a start waits for its workers without one."""
        with self._lock:
            if self._own_client is None:
                self._check_open()
                self._own_client, self._first_client = self._first_client, None
                if self._own_client is None:
                    self._own_client = Client(self.connection_file, timeout=self.timeout)
            return self._own_client

    def _start_worker(self, options: Optional[list] = None, name: Optional[str] = None,
                      fork: bool = False) -> Any:
        if name is None:
            self._worker_seq += 1
            name = f"local-{self._worker_seq}"
        if options is None:
            options = self._default_options
        extra = [] if self.max_result_size is None else ["--max-result-size",
                                                         str(self.max_result_size)]
        if "--slots" not in options:
            extra += ["--slots", str(self.slots)]
        argv = [*self._worker_target, "--name", name, "--parent-pid", str(os.getpid()),
                "--log-level", self.log_level, *extra, *options]
        with self._log(name) as log:
            if fork:
                from .worker import main, options_parser
                options_parser()
                proc = launch.fork(main, argv, name="shoal-worker", stdout_fd=log.fileno(),
                                   stderr_fd=log.fileno(), close_fds=[self.broker.stdout.fileno()])
            else:
                proc = subprocess.Popen(_python_command("shoal.worker", *argv), stdout=log,
                                        stderr=log, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        self._names[proc.pid] = name
        self._options[proc.pid] = options
        return proc

    def add_workers(self, n: int = 1, *, queues: Optional[list] = None, resources: Any = None,
                    slots: Optional[int] = None, imports: Optional[list] = None,
                    registered_only: bool = False) -> list:
        """Start ``n`` more local workers with their own queues, resources or slots;
        return their names once the broker sees them.

        >>> cluster.add_workers(1, queues=["gpu"], resources={"gpu": 1})
        ['local-3']
        """
        if n < 1:
            raise ValueError(f"add_workers needs n of at least 1, not {n}")
        options = _worker_options(queues=queues, resources=resources, slots=slots,
                                  imports=imports, registered_only=registered_only)
        with self._lock:
            self._check_open()
            self._workers = [p for p in self._workers if p.poll() is None]
            new = [self._start_worker(options) for _ in range(n)]
            self._workers.extend(new)
            self._wait_for(len(self._workers))
        return [self._names[p.pid] for p in new]

    def _watch(self) -> None:
        """Notice local workers that die: tell the broker now, and start replacements."""
        quick_deaths = 0
        while not self._monitor_stop.wait(0.2):
            with self._lock:
                if self._closed:
                    return
                dead = [p for p in self._workers if p.poll() is not None]
                for proc in dead:
                    self._workers.remove(proc)
                    name = self._names.pop(proc.pid, f"pid {proc.pid}")
                    options = self._options.pop(proc.pid, None)
                    why = describe_exit(proc.returncode)
                    self._client._report_lost(name, why)
                    if not self.restart:
                        logger.warning("local worker %s %s", name, why)
                        continue
                    # A worker that dies before it ever registered would die again:
                    # back off. (One killed by a task it ran has registered.)
                    quick = not self._registered(name)
                    quick_deaths = quick_deaths + 1 if quick else 0
                    if quick_deaths > 5:
                        logger.error("local worker %s %s right after starting, five times in a "
                                     "row; not starting another (see %s)", name, why, self.log_dir)
                        continue
                    replacement = self._start_worker(options)
                    self._workers.append(replacement)
                    logger.warning("local worker %s %s; started %s in its place", name, why,
                                   self._names[replacement.pid])

    def _registered(self, name: str) -> bool:
        """Whether the worker ``name`` got as far as registering (its log says so)."""
        if self.log_level.upper() not in ("DEBUG", "INFO"):
            return True  # the line is not logged: never back off
        try:
            with open(self.log_dir / f"{name}.log", "rb") as fh:
                return b"registered with the broker" in fh.read()
        except OSError:
            return False

    def scale(self, n: int) -> None:
        """Grow or shrink to ``n`` local workers; returns once the broker sees them."""
        if n < 0:
            raise ValueError(f"cannot scale to {n} workers")
        with self._lock:
            self._check_open()
            self._workers = [p for p in self._workers if p.poll() is None]
            while len(self._workers) < n:  # spawned: this process has threads now
                self._workers.append(self._start_worker())
            surplus = self._workers[n:]
            self._workers = self._workers[:n]
            for proc in surplus:
                self._names.pop(proc.pid, None)
                self._options.pop(proc.pid, None)
                proc.terminate()
            _reap(surplus, 5.0)
            self._wait_for(n)

    def _wait_for(self, n: int) -> None:
        deadline = time.monotonic() + self.timeout
        pause = 0.001  # forked workers register within milliseconds; spawned ones take ~0.1 s
        while True:
            state = self._client.status(timeout=max(0.1, deadline - time.monotonic()))
            if state["workers"] == n:
                return
            self._check_starting(state["workers"], n, deadline)
            time.sleep(pause)  # polling the broker with a deadline
            pause = min(pause * 2, 0.01)

    # ------------------------------------------------------------ public
    def client(self, **kwargs) -> Client:
        """A new :class:`Client` connected to this cluster (closed with it).

        The first one (without options) was connected while the workers started.
        """
        with self._lock:
            self._check_open()
            client = None
            if not kwargs:
                client, self._first_client = self._first_client, None
        if client is None:
            client = Client(self.connection_file, **kwargs)
        self._clients.append(client)
        return client

    @property
    def workers(self) -> list:
        """The running local worker processes."""
        return [p for p in self._workers if p.poll() is None]

    def status(self) -> dict:
        return self._client.status()

    def close(self) -> None:
        """Stop the workers and the broker; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._monitor_stop.set()
        for client in self._clients + [self._own_client, self._first_client]:
            if client is not None:
                client.close()
        procs = list(self._workers) + ([self.broker] if self.broker else [])
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        _reap(procs, 5.0)
        if self.broker is not None and self.broker.stdout:
            self.broker.stdout.close()
        _live.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this cluster is closed")

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.workers)} workers"
        return f"<shoal.Cluster {getattr(self, 'address', '?')} {state}>"

    def _repr_html_(self) -> str:
        return (f"<b>shoal.Cluster</b> at <code>{getattr(self, 'address', '?')}</code>: "
                f"{len(self.workers)} workers, {self.slots} slot(s) each")


def _worker_options(queues: Optional[list] = None, resources: Any = None,
                    slots: Optional[int] = None, imports: Optional[list] = None,
                    registered_only: bool = False) -> list:
    """``shoal worker`` options for these settings, checked here rather than in the child."""
    from .routing import parse_resources
    options = []
    if queues:
        if isinstance(queues, str):
            queues = [queues]
        for queue in queues:
            if not isinstance(queue, str) or not queue or "," in queue:
                raise ValueError(f"queue names must be non-empty strings without commas, "
                                 f"not {queue!r}")
        options += ["--queues", ",".join(queues)]
    if resources:
        parsed = parse_resources(resources)
        options += ["--resources", ",".join(f"{k}={v:g}" for k, v in sorted(parsed.items()))]
    if slots is not None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        options += ["--slots", str(slots)]
    for module in imports or ():
        options += ["--import", module]
    if registered_only:
        options.append("--registered-only")
    return options


def describe_exit(returncode: int) -> str:
    """'exited with code 1' or 'was killed by signal 9 (SIGKILL)'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


def _reap(procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@atexit.register
def _close_all() -> None:
    for cluster in list(_live):
        cluster.close()
