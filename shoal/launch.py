"""Starting a local cluster's processes: fresh interpreters, or forks of this one.

A fresh interpreter (``python -m shoal.worker``) pays ~20 ms to start and
~70 ms to import zmq, cloudpickle and shoal; a fork of a process that has them
imported already pays about a millisecond.  Forking is only safe in a process
with one thread: a fork copies the memory of every thread but runs only the
caller, so a lock another thread held (in the allocator, in logging, in
libzmq's IO threads) stays held in the child forever.  A notebook kernel has
threads (its heartbeat, its IO pub), so it gets fresh interpreters; so does
any start after the cluster's own client thread is up (replacements, scale).
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from typing import Callable, Optional, Sequence

#: how a Cluster starts its broker and workers; "auto" forks where that is safe
START_METHODS = ("auto", "fork", "spawn")


def thread_count() -> Optional[int]:
    """Threads of this process, native ones included (None where it cannot be told)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def fork_is_safe() -> bool:
    """Whether this process can fork its cluster: Linux, and one thread in all."""
    return hasattr(os, "fork") and sys.platform.startswith("linux") and thread_count() == 1


def choose(start_method: str) -> str:
    """'fork' or 'spawn' for a Cluster's ``start_method``, checked."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, "
                         f"not {start_method!r}")
    if start_method == "fork":
        if not hasattr(os, "fork"):
            raise ValueError("start_method='fork' needs os.fork, which this platform lacks; "
                             "use 'spawn' (or 'auto')")
        if not fork_is_safe():
            warnings.warn(f"start_method='fork' in a process with {thread_count()} threads: a "
                          "child may hang on a lock another thread held; 'auto' would spawn",
                          RuntimeWarning, stacklevel=3)
        return "fork"
    if start_method == "auto" and fork_is_safe():
        return "fork"
    return "spawn"


class Forked:
    """A forked child, with the parts of :class:`subprocess.Popen` a cluster uses."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.stdout = None  # the caller may set the read end of the child's stdout
        self.returncode: Optional[int] = None
        self._reaping = threading.Lock()  # the cluster's monitor thread polls too

    def poll(self) -> Optional[int]:
        with self._reaping:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler): it is gone
                    self.returncode = 255
                    return self.returncode
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """The exit code; raises :class:`subprocess.TimeoutExpired` after ``timeout``."""
        if self.poll() is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            fd = os.pidfd_open(self.pid)  # readable once the child exits: no polling
        except (AttributeError, OSError):
            fd = None
        try:
            while self.poll() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                if fd is not None:
                    select.select([fd], [], [], left)
                else:
                    time.sleep(min(0.01, left or 0.01))  # polling with a deadline
        finally:
            if fd is not None:
                os.close(fd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<Forked pid {self.pid} returncode {self.returncode}>"


def fork(main: Callable[[list], int], argv: list, *, name: str, stdout_fd: int,
         stderr_fd: int, close_fds: Sequence[int] = ()) -> Forked:
    """Run ``main(argv)`` in a forked child in its own session, its output on the given fds.

    The child starts as a fresh program would: no signal handlers, logging or
    exit hooks of this process, its own stdio on ``stdout_fd``/``stderr_fd``.
    Its process name (``ps -o comm``, ``psutil.Process.name()``) is ``name``,
    since its command line is still this process's.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # or the child writes this process's buffered output again
        except (AttributeError, OSError, ValueError):
            pass
    # What this process has allocated is frozen out of the collector, so the
    # child's collections do not touch (and so copy) every page it shares.
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid:
        gc.unfreeze()
        return Forked(pid, [name, *argv])
    code = 1
    try:
        _become_fresh(name, stdout_fd, stderr_fd, close_fds)
        code = main(argv)
        code = code if isinstance(code, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports and exits, never returns
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _become_fresh(name: str, stdout_fd: int, stderr_fd: int, close_fds: Sequence[int]) -> None:
    """In a forked child: the state a freshly started interpreter would have."""
    os.setsid()  # a Ctrl-C in the terminal reaches only the parent, as with spawn
    _set_process_name(name)
    atexit._clear()  # the parent's exit hooks are the parent's
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, TypeError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    for fd in {stdout_fd, stderr_fd, *close_fds} - {0, 1, 2}:
        try:
            os.close(fd)
        except OSError:
            pass
    # The parent's sys.stdout may be a test runner's or a kernel's capture object.
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)
    # Logging as in a new process: the entry point's basicConfig sets it up.
    manager = logging.root.manager
    for logger in [logging.root, *manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET if logger is not logging.root else logging.WARNING)
            logger.propagate = True
            logger.disabled = False
    logging.disable(logging.NOTSET)


def _set_process_name(name: str) -> None:
    """Name this process in ps and top (Linux's PR_SET_NAME: 15 bytes at most)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass  # a name is for people: without one the child still runs
