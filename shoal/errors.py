"""Exceptions a shoal user may catch.  Each says what happened and what to do next."""
from __future__ import annotations

from concurrent.futures import TimeoutError as _FuturesTimeout

from .serialize import SerializationError  # noqa: F401  (re-exported)

__all__ = ["SerializationError"]  # and the classes below


class ShoalError(Exception):
    """Base class of shoal's own errors."""


class BrokerUnreachable(ShoalError, _FuturesTimeout):
    """No broker answered at the address within the timeout."""


class NoWorkersError(ShoalError, _FuturesTimeout):
    """Tasks waited for a first worker longer than ``worker_timeout``."""


class ClientClosed(ShoalError):
    """The client was closed while the task was pending."""


class BrokerError(ShoalError):
    """The broker refused a request; the message says why."""


class RemoteError(ShoalError):
    """A worker-side exception that could not travel as itself (it did not pickle)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self):
        return type(self), (self.type_name, self.message)


class TaskTimeout(ShoalError, TimeoutError):
    """A task ran past its ``timeout`` and was stopped; its worker goes on serving."""

    def __init__(self, message: str, timeout: float = 0.0) -> None:
        super().__init__(message)
        self.timeout = timeout

    def __reduce__(self):
        return type(self), (str(self), self.timeout)


class WorkerLost(ShoalError):
    """A task was running on workers that died, ``allowed_failures`` times over.

    ``failures`` lists ``(worker, why)`` for each loss; ``why`` gives the exit
    code or signal when a local cluster saw the process end.
    """

    def __init__(self, task, failures) -> None:
        self.task = task
        self.failures = [tuple(f) for f in failures]
        lost = "; ".join(f"{w} ({why})" for w, why in self.failures) or "unknown workers"
        super().__init__(
            f"task {task!r} was running when its worker died, {len(self.failures)} time(s): "
            f"{lost}. shoal stopped retrying it: it probably kills its worker (a crash in C "
            "code, os._exit, running out of memory). Fix the task, or start the broker with "
            "a higher --allowed-failures.")

    def __reduce__(self):
        return type(self), (self.task, self.failures)


class Retry(ShoalError):
    """Raise inside a task to have it run again later, on any worker::

        def fetch(url):
            try:
                return download(url)
            except ConnectionError as exc:
                raise shoal.Retry(delay=30) from exc

    ``delay`` is in seconds (default: the task's ``retry_backoff``, else at
    once); the broker holds the task meanwhile and its worker serves others.
    It counts against the task's ``retries`` (or ``max_retries`` here; 3 if
    neither is given).  Once they are used up the task fails with the
    exception this one was raised from, or with :class:`RetriesExhausted`.
    """

    def __init__(self, delay: "float | None" = None, max_retries: "int | None" = None) -> None:
        if delay is not None and not delay >= 0:
            raise ValueError(f"Retry delay must be a non-negative number of seconds, not {delay!r}")
        super().__init__(f"the task asked to be retried{'' if delay is None else f' in {delay:g} s'}")
        self.delay = delay
        self.max_retries = max_retries

    def __reduce__(self):
        return type(self), (self.delay, self.max_retries)


class TaskNotUnique(BrokerError):
    """A task was submitted with a ``unique`` key that a queued or running task holds.

    ``key`` is the key, ``holder`` the id of the task that holds it.
    """

    def __init__(self, message: str, key: str = "", holder: "str | None" = None) -> None:
        super().__init__(message)
        self.key = key
        self.holder = holder

    def __reduce__(self):
        return type(self), (str(self), self.key, self.holder)


class RetriesExhausted(ShoalError):
    """A task raised :class:`Retry` once more than it was allowed to."""


class DependencyFailed(ShoalError):
    """A task did not run because a future it takes as an argument failed.

    ``task`` and ``dependency`` are task ids; ``reason`` says what happened to
    the dependency; ``__cause__`` is the exception of the task that failed
    when this client has it.  ``root`` is that task, further up a chain.
    """

    def __init__(self, task: "str | None", dependency: "str | None", reason: str,
                 root: "str | None" = None, root_reason: "str | None" = None) -> None:
        self.task = task
        self.dependency = dependency
        self.reason = reason
        self.root = root or dependency
        self.root_reason = root_reason or reason
        super().__init__(
            f"task {task or '(a map item)'} did not run: task {dependency or '(a map item)'}, "
            f"whose result it takes as an argument, {reason}")

    def __reduce__(self):
        return type(self), (self.task, self.dependency, self.reason, self.root, self.root_reason)


class BrokerLost(ShoalError):
    """The broker stopped answering, or restarted, while tasks were in flight."""


class TransferError(ShoalError):
    """A task or its result did not arrive intact: a frame was altered in transit (it does
    not match its signed digest) or the message was malformed.  Nothing of it was run or
    unpickled; the worker goes on serving."""


class ResultTooLarge(ShoalError):
    """A task's result was over its worker's ``--max-result-size``; nothing was sent."""
