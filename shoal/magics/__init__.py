"""IPython extension: the ``%shoal`` and ``%%remote`` magics.

::

    %load_ext shoal
    %shoal start -n 4          # a local cluster; binds `client` and `cluster` here
    %shoal status              # a table of workers
    %%remote                   # run this cell on a worker: free names go there,
    total = sum(data)          # bound names come back, the last expression is shown
    total * 2

- :mod:`.cells`: a cell's names, and running a cell on a worker (workers import it);
- :mod:`.cluster_magic`: ``%shoal``, and the notebook's cluster and client;
- :mod:`.remote_magic`: ``%%remote`` and ``%remote``, the notebook's side.

Workers import this package to run remote cells, so nothing here imports
IPython at module level: the notebook side imports it where it is used.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from .cells import CellNames, CellOutcome, cell_names, run_cell

logger = logging.getLogger(__name__)

__all__ = ["load_ipython_extension", "unload_ipython_extension", "run_cell", "cell_names",
           "CellNames", "CellOutcome"]


# ----------------------------------------------------------------- display of future lists
def _is_future_list(obj: Any) -> bool:
    from ..futures import Future
    return bool(obj) and isinstance(obj[0], Future) and all(isinstance(f, Future) for f in obj)


def _futures_list_bundle(obj: Any) -> Any:
    """Mime-bundle formatter for lists: a list of shoal futures shows live progress."""
    if not _is_future_list(obj):
        previous = _previous_printers.get("bundle")
        return previous(obj) if previous is not None else None
    from ..progress import display_progress
    display_progress(obj)
    return None  # the text/plain printer below writes the Out[n] line


def _futures_list_text(obj: Any, p: Any, cycle: bool) -> None:
    """Pretty-printer for lists: a one-line summary for a list of shoal futures."""
    if not _is_future_list(obj):
        _previous_printers["text"](obj, p, cycle)
        return
    done = sum(1 for f in obj if f.done())
    p.text(f"[{len(obj)} shoal futures, {done} done when shown]")


_previous_printers: dict = {}
_PRINTERS = (("bundle", "mimebundle", _futures_list_bundle), ("text", "text/plain",
                                                              _futures_list_text))


def _formatter(ip: Any, which: str) -> Any:
    if which == "mimebundle":
        return ip.display_formatter.mimebundle_formatter
    return ip.display_formatter.formatters[which]


# ----------------------------------------------------------------- extension
def load_ipython_extension(ip: Any) -> None:
    """``%load_ext shoal``: register ``%shoal``, ``%%remote`` / ``%remote`` and the displays."""
    from .cluster_magic import shoal_magic
    from .remote_magic import remote_magic
    ip.register_magic_function(shoal_magic, magic_kind="line", magic_name="shoal")
    ip.register_magic_function(remote_magic, magic_kind="line_cell", magic_name="remote")
    for key, which, printer in _PRINTERS:
        formatter = _formatter(ip, which)
        if formatter.type_printers.get(list) is not printer:
            _previous_printers[key] = formatter.type_printers.get(list)
            formatter.for_type(list, printer)
    if _previous_printers.get("text") is None:  # IPython always has one; be safe
        from IPython.lib.pretty import _seq_pprinter_factory
        _previous_printers["text"] = _seq_pprinter_factory("[", "]")
    _register_joblib()


def unload_ipython_extension(ip: Any) -> None:
    """``%unload_ext shoal``: remove the magics and displays (the cluster keeps running)."""
    magics = ip.magics_manager.magics
    for kind, name in (("line", "shoal"), ("line", "remote"), ("cell", "remote")):
        magics[kind].pop(name, None)
    for key, which, printer in _PRINTERS:
        formatter = _formatter(ip, which)
        if formatter.type_printers.get(list) is printer:
            formatter.type_printers.pop(list)
            if _previous_printers.get(key) is not None:
                formatter.for_type(list, _previous_printers[key])
    _previous_printers.clear()


def _register_joblib() -> None:
    """Make ``parallel_config(backend="shoal")`` work, when joblib is installed."""
    import importlib.util
    if "joblib" not in sys.modules and importlib.util.find_spec("joblib") is None:
        return
    try:
        from .. import joblib as _backend  # registers itself
        _backend.register()
    except Exception as exc:  # a broken joblib must not break the extension
        logger.warning("could not register the shoal joblib backend: %s", exc)
