"""Exceptions a shoal user may catch.  Each says what happened and what to do next."""
from __future__ import annotations

from concurrent.futures import TimeoutError as _FuturesTimeout

from .serialize import SerializationError  # noqa: F401  (re-exported)


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
