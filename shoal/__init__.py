"""shoal: interactive distributed computing for Python notebooks.

>>> import shoal
>>> with shoal.Cluster(n_workers=4) as cluster:
...     client = cluster.client()
...     client.submit(pow, 2, 10).result()
1024

Names are imported on first use, so ``shoal worker`` and ``shoal broker``
start without loading the client, asyncio or anything else they don't need.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "client", "Executor": "executor", "MapResult": "mapping", "Ref": "refs",
    "get_client": "client",
    "Cluster": "cluster", "ClusterError": "cluster",
    "Future": "futures", "as_completed": "futures", "wait": "futures",
    "ALL_COMPLETED": "futures", "FIRST_COMPLETED": "futures", "FIRST_EXCEPTION": "futures",
    "RemoteTraceback": "futures",
    "BrokerError": "errors", "BrokerUnreachable": "errors", "ClientClosed": "errors",
    "NoWorkersError": "errors", "RemoteError": "errors", "SerializationError": "errors",
    "ShoalError": "errors", "WorkerLost": "errors", "TaskTimeout": "errors",
    "BrokerLost": "errors", "ResultTooLarge": "errors", "Retry": "errors",
    "RetriesExhausted": "errors", "DependencyFailed": "errors", "TransferError": "errors",
    "s": "canvas", "si": "canvas", "chain": "canvas", "group": "canvas", "chord": "canvas",
    "Signature": "canvas", "GroupResult": "canvas",
    "task": "tasks", "Task": "tasks",
    "lock": "locks", "Lock": "locks", "LockTimeout": "locks", "TaskNotUnique": "errors",
    "PROTOCOL_VERSION": "protocol",
    "to_frame": "frames",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return __all__


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext shoal``: register the ``%shoal`` and ``%%remote`` magics."""
    from .magics import load_ipython_extension as load
    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload_ipython_extension as unload
    unload(ipython)


if TYPE_CHECKING:  # for type checkers and IDEs
    from .client import Client, get_client  # noqa: F401
    from .executor import Executor  # noqa: F401
    from .mapping import MapResult  # noqa: F401
    from .refs import Ref  # noqa: F401
    from .canvas import GroupResult, Signature, chain, chord, group, s, si  # noqa: F401
    from .cluster import Cluster, ClusterError  # noqa: F401
    from .tasks import Task, task  # noqa: F401
    from .locks import Lock, LockTimeout, lock  # noqa: F401
    from .errors import (BrokerError, BrokerLost, BrokerUnreachable, ClientClosed,  # noqa: F401
                         DependencyFailed, NoWorkersError, RemoteError, ResultTooLarge, RetriesExhausted,
                         Retry, SerializationError, ShoalError, TaskNotUnique, TaskTimeout,
                         WorkerLost)
    from .futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION,  # noqa: F401
                          Future, RemoteTraceback, as_completed, wait)
    from .protocol import PROTOCOL_VERSION  # noqa: F401
