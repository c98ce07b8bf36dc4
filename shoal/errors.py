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


class BrokerLost(ShoalError):
    """The broker stopped answering, or restarted, while tasks were in flight."""


class TransferError(ShoalError):
    """A task or its result did not arrive intact: a frame was altered in transit (it does
    not match its signed digest) or the message was malformed.  Nothing of it was run or
    unpickled; the worker goes on serving."""


class ResultTooLarge(ShoalError):
    """A task's result was over its worker's ``--max-result-size``; nothing was sent."""
