"""shoal: interactive distributed computing for Python notebooks.

>>> import shoal
>>> with shoal.Cluster(n_workers=4) as cluster:
...     client = cluster.client()
...     client.submit(pow, 2, 10).result()
1024
"""
from .client import Client, Executor, MapResult, Ref, get_client
from .cluster import Cluster, ClusterError
from .errors import (BrokerError, BrokerUnreachable, ClientClosed, NoWorkersError, RemoteError,
                     SerializationError, ShoalError)
from .futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future, as_completed, wait
from .protocol import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "Client", "Cluster", "ClusterError", "Executor", "Future", "MapResult", "Ref", "get_client",
    "as_completed", "wait", "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION",
    "BrokerError", "BrokerUnreachable", "ClientClosed", "NoWorkersError", "RemoteError",
    "SerializationError", "ShoalError", "PROTOCOL_VERSION", "__version__",
]
