"""``%shoal start|connect|status|stop``, and the notebook's current cluster and client."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any, Optional

__all__ = ["shoal_magic", "ClusterStatus", "current_client", "ensure_client"]


# ----------------------------------------------------------------- notebook side: state
class _State:
    """The extension's cluster and client; ``cluster`` only when started here."""

    def __init__(self) -> None:
        self.cluster: Any = None
        self.client: Any = None
        self.lock = threading.RLock()

    def live_client(self) -> Any:
        client = self.client
        if client is not None and not client._closed:
            return client
        return None


_state = _State()


def _shell() -> Any:
    from IPython import get_ipython
    ip = get_ipython()
    if ip is None:
        raise RuntimeError("shoal's magics need IPython")
    return ip


def _usage_error(message: str) -> Exception:
    from IPython.core.error import UsageError
    return UsageError(message)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as IPython UsageErrors instead of exiting."""

    def error(self, message: str):
        raise _usage_error(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: Optional[str] = None):
        if message:
            print(message, file=sys.stderr)
        raise _HelpShown()


class _HelpShown(Exception):
    """--help was printed; the magic does nothing more."""


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _bind(ip: Any, **names: Any) -> None:
    ip.push(names)


def _unbind(ip: Any, **names: Any) -> None:
    """Remove names from the notebook if they still hold these objects."""
    for name, value in names.items():
        if value is not None and ip.user_ns.get(name) is value:
            del ip.user_ns[name]


# ----------------------------------------------------------------- %shoal
_SHOAL_USAGE = """\
%shoal start [-n N] [--slots S]    start a local cluster (binds `client` and `cluster`)
%shoal connect ADDRESS|FILE [--key-file FILE]
                                   connect to a running broker (binds `client`)
%shoal status                      the workers and task counts
%shoal stop                        stop the cluster started here, or disconnect"""


def shoal_magic(line: str) -> Any:
    """Manage the cluster this notebook uses.

    ::

        %shoal start [-n N] [--slots S]    a local cluster; binds `client` and `cluster`
        %shoal connect ADDRESS|FILE        a running broker; binds `client`
        %shoal status                      a table of workers
        %shoal stop                        stop the local cluster / disconnect
    """
    import shlex
    ip = _shell()
    words = shlex.split(line)
    if not words or words[0] in ("-h", "--help", "help"):
        print(_SHOAL_USAGE)
        return None
    command, args = words[0], words[1:]
    handlers = {"start": _cmd_start, "connect": _cmd_connect, "status": _cmd_status,
                "stop": _cmd_stop}
    handler = handlers.get(command)
    if handler is None:
        raise _usage_error(f"%shoal: unknown command {command!r}\n{_SHOAL_USAGE}")
    try:
        return handler(ip, args)
    except _HelpShown:
        return None


def _cmd_start(ip: Any, argv: list) -> None:
    parser = _Parser(prog="%shoal start", description="Start a local cluster.")
    parser.add_argument("-n", "--n-workers", type=int, default=None,
                        help="number of workers (default: one per CPU core)")
    parser.add_argument("--slots", type=int, default=1, help="tasks each worker runs at once")
    args = parser.parse_args(argv)
    with _state.lock:
        cluster = _state.cluster
        if cluster is not None and not cluster._closed:
            if args.n_workers is not None and args.n_workers != len(cluster.workers):
                cluster.scale(args.n_workers)
                print(f"shoal: scaled the local cluster to {_workers(args.n_workers)}")
            else:
                print(f"shoal: the local cluster is already running: "
                      f"{_workers(len(cluster.workers))} at {cluster.address}")
            if _state.live_client() is None or _state.client not in cluster._clients:
                _state.client = cluster.client()
        else:
            _start_cluster(args.n_workers, args.slots)
        _bind(ip, client=_state.client, cluster=_state.cluster)


def _start_cluster(n_workers: Optional[int], slots: int = 1) -> None:
    from ..cluster import Cluster
    t0 = time.monotonic()
    cluster = Cluster(n_workers=n_workers, slots=slots)
    old = _state.client
    _state.cluster = cluster
    _state.client = cluster.client()
    if old is not None and old is not _state.client:
        old.close()
    print(f"shoal: started a local cluster: {_workers(len(cluster.workers))} x {slots} slot(s) "
          f"at {cluster.address} in {time.monotonic() - t0:.1f} s; `client` and `cluster` "
          "are bound here (`%shoal stop` stops it)")


def _cmd_connect(ip: Any, argv: list) -> None:
    from ..client import Client
    parser = _Parser(prog="%shoal connect", description="Connect to a running broker.")
    parser.add_argument("target", nargs="?", metavar="ADDRESS|FILE",
                        help="tcp://HOST:PORT or a connection file (default: "
                             "$SHOAL_CONNECTION_FILE, else the newest broker on this host)")
    parser.add_argument("--key-file", help="the broker's connection file, with an ADDRESS")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the broker")
    args = parser.parse_args(argv)
    client = Client(args.target, key_file=args.key_file, timeout=args.timeout)
    with _state.lock:
        old = _state.client
        _state.client = client
        if old is not None and (_state.cluster is None or old not in _state.cluster._clients):
            old.close()
    print(f"shoal: connected to {client.address}: {_workers(client.workers)}, "
          f"{client.slots} slots; `client` is bound here")
    _bind(ip, client=client)


def _cmd_status(ip: Any, argv: list) -> Any:
    if argv:
        raise _usage_error("%shoal status takes no arguments")
    client = current_client()
    if client is None:
        print("shoal: no cluster; start one with `%shoal start` or connect with "
              "`%shoal connect ADDRESS`")
        return None
    return ClusterStatus(client.status())


def _cmd_stop(ip: Any, argv: list) -> None:
    if argv:
        raise _usage_error("%shoal stop takes no arguments")
    with _state.lock:
        cluster, client = _state.cluster, _state.client
        _state.cluster = _state.client = None
    if client is not None:
        client.close()
    if cluster is not None and not cluster._closed:
        cluster.close()
        print(f"shoal: stopped the local cluster at {cluster.address}")
    elif client is not None:
        print(f"shoal: disconnected from {client.address}")
    else:
        print("shoal: nothing to stop")
    _unbind(ip, client=client, cluster=cluster)


def current_client() -> Any:
    client = _state.live_client()
    if client is not None:
        return client
    from ..client import get_client
    try:
        return get_client()
    except ValueError:
        return None


class ClusterStatus:
    """What ``%shoal status`` shows: the broker's state, as a table of workers."""

    _COLUMNS = (("name", "name"), ("host", "host"), ("pid", "pid"), ("slots", "slots"),
                ("running", "running"), ("done", "done"), ("mean task ms", "mean_task_ms"),
                ("queues", "queues"))
    #: Lines of ``shoal status`` shown below the table when they apply.
    _NOTES = ("held", "periodic", "lock", "store", "WAITING", "queues")

    def __init__(self, state: dict) -> None:
        self.state = state

    @property
    def workers(self) -> list:
        return list(self.state.get("worker_list", []))

    def __repr__(self) -> str:
        from ..cli import format_status
        return format_status(self.state)

    def _repr_html_(self) -> str:
        from html import escape
        from ..progress import format_duration
        s = self.state
        counts = s.get("counts", {})
        head = (f"<b>shoal</b> broker <code>{escape(str(s.get('address', '?')))}</code>, "
                f"up {format_duration(s.get('uptime'))}: {s.get('workers', 0)} workers, "
                f"{s.get('slots', 0)} slots, {s.get('clients', 0)} clients; units "
                f"{s.get('queued', 0)} queued, {s.get('running', 0)} running, "
                f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed")
        rows = []
        for w in self.workers:
            cells = []
            for _, key in self._COLUMNS:
                value = w.get(key)
                if key == "mean_task_ms" and value is not None:
                    value = f"{value:.3f}"
                elif key == "queues":
                    value = ", ".join(value or ["default"]) + "".join(
                        f" {k}={v:g}" for k, v in sorted((w.get("resources") or {}).items()))
                cells.append(f"<td>{escape(str('-' if value is None else value))}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        header = "".join(f"<th>{label}</th>" for label, _ in self._COLUMNS)
        from ..cli import format_status
        notes = [line for line in format_status(s).splitlines()
                 if line.split(" ", 1)[0] in self._NOTES]
        extra = f"<pre>{escape(chr(10).join(notes))}</pre>" if notes else ""
        return (f"<div>{head}</div><table><thead><tr>{header}</tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>{extra}")


def ensure_client(ip: Any) -> Any:
    """The client to use: this extension's, the latest one made, or a new local cluster."""
    with _state.lock:
        client = current_client()
        if client is None:
            print("shoal: no cluster yet, starting a local one", file=sys.stderr)
            _start_cluster(None)
            _bind(ip, client=_state.client, cluster=_state.cluster)
            client = _state.client
        return client
