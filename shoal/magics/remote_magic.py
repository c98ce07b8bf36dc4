"""``%%remote`` and ``%remote``: run a cell on a worker, from the notebook's side.

The cell's free names are shipped, it runs as :func:`~shoal.magics.cells.run_cell`
on a worker, its output streams into the cell, names it binds come back and
the last expression is returned for IPython to display.
"""
from __future__ import annotations

import argparse
import ast
import functools
import logging
import queue
import shlex
import sys
import threading
import time
from typing import Any, Optional

from .cells import CellOutcome, cell_names, run_cell
from .cluster_magic import _HelpShown, _Parser, _usage_error, current_client, ensure_client
from .cluster_magic import _shell

logger = logging.getLogger(__name__)

__all__ = ["remote_magic", "RemoteCellTimeout"]

_RED, _BOLD, _RESET = "\x1b[0;31m", "\x1b[1m", "\x1b[0m"


# ----------------------------------------------------------------- %%remote
_VALUE_FLAGS = {"--worker", "-w", "--to", "--timeout", "-t", "--pull", "--push"}
_BARE_FLAGS = {"--all", "--async", "--no-pull", "-h", "--help"}


def _remote_parser() -> _Parser:
    p = _Parser(prog="%%remote", add_help=True,
                description="Run the cell on a shoal worker: free names are shipped there, "
                            "names the cell binds come back, the last expression is shown.")
    p.add_argument("--all", action="store_true",
                   help="run on every worker; values come back as {worker: value}")
    p.add_argument("-w", "--worker", metavar="NAME", help="run on the worker named NAME")
    p.add_argument("--async", dest="is_async", action="store_true",
                   help="return a future at once (bound to _ or to --to NAME)")
    p.add_argument("--to", metavar="NAME", help="bind the future to NAME (implies --async)")
    p.add_argument("-t", "--timeout", type=float, metavar="S",
                   help="give up (and cancel) after S seconds")
    p.add_argument("--no-pull", action="store_true", help="bring no names back")
    p.add_argument("--pull", metavar="A,B", help="bring back only these names")
    p.add_argument("--push", metavar="A,B", help="also ship these names")
    return p


def _split_line(line: str) -> tuple:
    """``%remote [options] CODE``: the option words, and the code after them."""
    words: list = []
    rest = line.strip()
    while rest.startswith("-"):
        word, _, after = rest.partition(" ")
        flag = word.split("=", 1)[0]
        if flag in _VALUE_FLAGS and "=" not in word:
            value, _, after = after.lstrip().partition(" ")
            words += [word, value]
        elif flag in _VALUE_FLAGS or flag in _BARE_FLAGS:
            words.append(word)
        else:
            break  # code that starts with "-", like -x + 1
        rest = after.lstrip()
    return words, rest


def _names_option(text: Optional[str]) -> list:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def remote_magic(line: str, cell: Optional[str] = None) -> Any:
    """Run code on a shoal worker.

    ::

        %%remote [--all | --worker NAME] [--async [--to NAME]] [--timeout S]
                 [--no-pull | --pull A,B] [--push A,B]
        <cell>

        %remote [options] EXPRESSION_OR_STATEMENT

    Names the cell reads are shipped from the notebook; names it binds come
    back (``--no-pull``; ``--pull a,b`` to narrow); the value of a last
    expression is displayed.  ``--all`` runs on every worker (worker
    namespaces persist, so this is for set-up code; by default nothing comes
    back but the values, as ``{worker: value}``).  With no cluster yet, a
    local one is started.
    """
    ip = _shell()
    if cell is None:
        words, code = _split_line(line)
        if not code.strip() and not ({"-h", "--help"} & set(words)):
            raise _usage_error("%remote needs code to run, for example: %remote os.getpid()")
        header = ""
        first_line = 1
    else:
        words, code = shlex.split(line), cell
        header = f"%%remote {line}".rstrip() + "\n"
        first_line = 2  # the cell's own line numbers: line 1 is the %%remote line
    try:
        opts = _remote_parser().parse_args(words)
    except _HelpShown:
        return None
    if opts.all and opts.worker:
        raise _usage_error("%%remote: give --all or --worker, not both")
    if opts.no_pull and opts.pull:
        raise _usage_error("%%remote: give --no-pull or --pull, not both")
    if opts.to:
        opts.is_async = True
        if not opts.to.isidentifier():
            raise _usage_error(f"%%remote --to needs a variable name, not {opts.to!r}")
    return _RemoteRun(ip, code, opts, header, first_line).run()


class RemoteCellTimeout(TimeoutError):
    """A remote cell did not finish within ``--timeout``."""

    def _render_traceback_(self) -> list:
        return [f"{_RED}RemoteCellTimeout{_RESET}: {self}"]


class _RemoteRun:
    """One execution of a remote cell, from shipping names to showing the result."""

    def __init__(self, ip: Any, code: str, opts: argparse.Namespace, header: str,
                 first_line: int) -> None:
        self.ip = ip
        self.code = code
        self.opts = opts
        self.header = header
        self.first_line = first_line
        count = getattr(ip, "execution_count", 0)
        self.filename = f"<remote In[{count}]>"

    # -- preparing
    def _analyse(self) -> tuple:
        try:
            tree = ast.parse(self.code, self.filename)
        except SyntaxError as exc:
            if exc.lineno is not None:
                exc.lineno += self.first_line - 1
            raise
        names = cell_names(tree)
        stripped = self.code.rstrip()
        want_value = bool(tree.body) and isinstance(tree.body[-1], ast.Expr) and \
            not stripped.endswith(";")
        return names, want_value

    def _shipped(self, free: list) -> dict:
        ns = self.ip.user_ns
        hidden = getattr(self.ip, "user_ns_hidden", {})
        names = list(free) + [n for n in _names_option(self.opts.push) if n not in free]
        pushed = set(_names_option(self.opts.push))
        shipped = {}
        for name in names:
            if name not in ns:
                if name in pushed:
                    raise _usage_error(f"%%remote --push: {name!r} is not defined here")
                continue
            value = ns[name]
            if name in hidden and hidden[name] is value and name not in pushed:
                continue  # IPython's own names (In, Out, get_ipython, exit, ...)
            if _is_handle(value):
                continue  # a client or cluster cannot work on a worker
            shipped[name] = value
        return shipped

    def _pull_list(self, bound: list) -> list:
        if self.opts.no_pull:
            return []
        if self.opts.pull:
            return _names_option(self.opts.pull)
        if self.opts.all:
            return []  # set-up code: its state stays in the worker namespaces
        return list(bound)

    # -- running
    def run(self) -> Any:
        names, want_value = self._analyse()
        shipped = self._shipped(names.free)
        pull = self._pull_list(names.bound)
        client = ensure_client(self.ip)
        args = (run_cell, self.code, self.filename, shipped, pull, want_value, self.first_line,
                self.header)
        try:
            if self.opts.all:
                futures = client.run(*args)
                if not futures:
                    raise _usage_error("%%remote --all: the cluster has no workers")
            elif self.opts.worker:
                futures = {self.opts.worker: client.submit_to(self.opts.worker, *args)}
            else:
                futures = {None: client.submit(*args)}
        except Exception as exc:
            from ..errors import SerializationError
            if isinstance(exc, SerializationError):
                raise _explain_unshippable(shipped, exc) from None
            raise
        if self.opts.is_async:
            return self._run_async(futures)
        outcomes = _wait_and_stream(futures, self.opts.timeout, labelled=self.opts.all)
        return self._finish(outcomes)

    def _finish(self, outcomes: dict) -> Any:
        errors = {label: exc for label, (_, exc) in outcomes.items() if exc is not None}
        if errors:
            raise _remote_failure(errors, self.opts.worker)
        results = {label: outcome for label, (outcome, _) in outcomes.items()}
        if self.opts.all:
            values = {}
            pulled: dict = {}
            for worker, outcome in results.items():
                if outcome.has_value:
                    values[worker] = _load_value(outcome)
                for name, value in _load_names(outcome, worker).items():
                    pulled.setdefault(name, {})[worker] = value
            self.ip.push(pulled)
            return values or None
        (outcome,) = results.values()
        self.ip.push(_load_names(outcome, None))
        return _load_value(outcome) if outcome.has_value else None

    def _run_async(self, futures: dict) -> Any:
        from ..futures import Future
        ip = self.ip
        target = self.opts.to
        results = {}
        for label, inner in futures.items():
            outer = Future(("remote", getattr(inner, "key", None)))
            _chain_async(inner, outer, ip, label if self.opts.all else None)
            results[label] = outer
        value = results if self.opts.all else results[None]
        if target:
            ip.push({target: value})
            return None
        return value


def _chain_async(inner: Any, outer: Any, ip: Any, label: Optional[str]) -> None:
    """Resolve ``outer`` with the cell's value when ``inner`` finishes; pull names then.

    What the run prints goes to the cell that started it, live, even while
    other cells run.
    """
    writer = _CellWriter(_output_parent(), label)
    live = hasattr(inner, "add_output_callback")
    if live:
        inner.add_output_callback(writer)

    def done(f: Any) -> None:
        outer.worker = f.worker
        outer.stdout, outer.stderr = f.stdout, f.stderr
        if not live:
            writer("stdout", f.stdout)
            writer("stderr", f.stderr)
        if f.cancelled():
            outer.cancel()
            return
        try:
            outcome = f.result()
        except BaseException as exc:
            outer.set_exception(_attach_rendering(exc, f.worker or label))
            return
        try:
            names = _load_names(outcome, label, writer)
            if label is None:
                ip.push(names)
            else:
                ip.push({name: {**(ip.user_ns.get(name) if isinstance(ip.user_ns.get(name), dict)
                                   else {}), label: value} for name, value in names.items()})
            outer.set_result(_load_value(outcome) if outcome.has_value else None)
        except BaseException as exc:  # never leave the future pending
            outer.set_exception(exc)

    inner.add_done_callback(done)


def _output_parent() -> Any:
    """The current cell's message header, so late output lands in this cell."""
    header = getattr(sys.stdout, "parent_header", None)
    return header if isinstance(header, dict) and header else None


class _CellWriter:
    """Writes a background run's output into the cell that started it.

    ipykernel sends a stream message with the parent header of the thread
    that writes; this sets the starting cell's header for each write, so the
    frontend shows the text under that cell, not under whichever cell runs now.
    """

    def __init__(self, parent: Optional[dict], label: Optional[str]) -> None:
        self.parent = parent
        self.labellers = {s: _Labeller(label) for s in ("stdout", "stderr")}
        self.lock = threading.Lock()

    def __call__(self, stream_name: str, text: str) -> None:
        if not text:
            return
        stream = getattr(sys, stream_name)
        with self.lock:
            setter = getattr(stream, "set_thread_parent", None)
            token = setter(self.parent) if (setter is not None and self.parent) else None
            try:
                stream.write(self.labellers[stream_name](text))
                stream.flush()
            finally:
                if token is not None:
                    stream.reset_thread_parent(token)


class _Labeller:
    """Prefixes each line of a stream's text with ``[worker] ``, across chunks."""

    def __init__(self, label: Optional[str]) -> None:
        self.label = label
        self.at_line_start = True

    def __call__(self, text: str) -> str:
        if not self.label or not text:
            return text
        out = []
        for piece in text.splitlines(True):
            if self.at_line_start:
                out.append(f"[{self.label}] ")
            out.append(piece)
            self.at_line_start = piece.endswith("\n")
        return "".join(out)


def _wait_and_stream(futures: dict, timeout: Optional[float], labelled: bool) -> dict:
    """Wait for remote cells, writing their output into this cell as it arrives.

    Returns ``{label: (outcome, exception)}``.  Ctrl-C and ``timeout`` cancel
    the runs.  Output is written from this (the kernel's main) thread, so it
    lands in the running cell.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    written: dict = {}
    labellers: dict = {}
    for label, future in futures.items():
        written[label] = {"stdout": 0, "stderr": 0}
        labellers[label] = {s: _Labeller(label if labelled else None) for s in ("stdout", "stderr")}
        add_output = getattr(future, "add_output_callback", None)
        if add_output is not None:
            add_output(lambda stream, text, label=label: events.put((label, stream, text)))
        future.add_done_callback(lambda f, label=label: events.put((label, None, None)))

    def emit(label: Any, stream: str, text: str) -> None:
        if not text:
            return
        written[label][stream] += len(text)
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.write(labellers[label][stream](text))
        target.flush()

    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(futures)
    try:
        while pending:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise _timeout(futures, pending, timeout)
            try:
                # A bounded wait keeps Ctrl-C prompt on every platform.
                label, stream, text = events.get(timeout=0.2 if wait is None else min(wait, 0.2))
            except queue.Empty:
                continue
            if stream is None:
                pending.discard(label)
            else:
                emit(label, stream, text)
    except KeyboardInterrupt:
        stopped = _cancel(futures, pending)
        print(f"shoal: interrupted; {stopped}", file=sys.stderr)
        raise
    # Whatever the live stream did not deliver (all of it, without live output).
    while True:
        try:
            label, stream, text = events.get_nowait()
        except queue.Empty:
            break
        if stream is not None:
            emit(label, stream, text)
    outcomes = {}
    for label, future in futures.items():
        for stream in ("stdout", "stderr"):
            full = getattr(future, stream, "") or ""
            emit(label, stream, full[written[label][stream]:])
        if future.cancelled():
            from concurrent.futures import CancelledError
            outcomes[label] = (None, CancelledError("the remote cell was cancelled"))
            continue
        exc = future.exception()
        outcomes[label] = (None, exc) if exc is not None else (future.result(), None)
    return outcomes


def _cancel(futures: dict, pending: set) -> str:
    """Cancel the runs still pending; say what happened to each."""
    import concurrent.futures as cf
    stopped, unsure = [], {}
    for label in pending:
        future = futures[label]
        name = label or future.worker or "its worker"
        try:
            cancelled = future.cancel()
        except Exception:  # Ctrl-C must never fail here; the state below tells
            logger.exception("cancelling %r failed", future)
            cancelled = future.cancelled()
        if cancelled:
            stopped.append(name)
        else:
            unsure[future] = name
    # An interrupted run may report back as finished (cancelled) rather than in
    # the cancel reply: give it a moment to do so.
    deadline = time.monotonic() + 2.0
    for future in list(unsure):
        try:
            future.exception(max(0.0, deadline - time.monotonic()))
        except cf.CancelledError:
            pass
        except cf.TimeoutError:
            continue
        stopped.append(unsure.pop(future))
    running = list(unsure.values())
    parts = []
    if stopped:
        parts.append("cancelled the remote run" + (f" on {', '.join(map(str, stopped))}"
                                                   if any(stopped) else ""))
    if running:
        parts.append(f"could not stop it on {', '.join(map(str, running))}: it keeps running "
                     "there until it finishes")
    return "; ".join(parts) or "nothing was left running"


def _timeout(futures: dict, pending: set, timeout: float) -> RemoteCellTimeout:
    what = _cancel(futures, pending)
    return RemoteCellTimeout(f"the remote cell did not finish within {timeout:g} s; {what}")


def _is_handle(value: Any) -> bool:
    module = type(value).__module__ or ""
    return module.startswith("shoal.") and type(value).__name__ in ("Client", "Cluster")


def _explain_unshippable(shipped: dict, exc: BaseException) -> BaseException:
    from ..serialize import cloudpickle_dumps
    for name, value in shipped.items():
        try:
            cloudpickle_dumps(value)
        except Exception as err:
            return _usage_error(
                f"%%remote: cannot ship `{name}` ({type(value).__qualname__}) to the worker: "
                f"{err}. Create it on the worker instead (in a %%remote cell), or leave it out "
                "of this cell.")
    return exc


def _load_value(outcome: CellOutcome) -> Any:
    if outcome.value is None:
        return _ReprOnly(outcome.value_repr or f"<{outcome.value_type}>")
    import cloudpickle
    try:
        return cloudpickle.loads(outcome.value)
    except Exception as exc:
        return _ReprOnly(f"<{outcome.value_type} value that cannot be unpickled here: "
                         f"{type(exc).__name__}: {exc}>")


def _load_names(outcome: CellOutcome, worker: Optional[str], write: Any = None) -> dict:
    import cloudpickle
    names = {}
    kept = dict(outcome.kept)
    for name, blob in outcome.names.items():
        try:
            names[name] = cloudpickle.loads(blob)
        except Exception as exc:
            kept[name] = f"cannot be unpickled here: {type(exc).__name__}: {exc}"
    if kept:
        where = f" on {worker}" if worker else " on the worker"
        detail = "; ".join(f"`{n}` {why}" for n, why in kept.items())
        note = f"shoal: kept{where}, not brought back: {detail}\n"
        if write is not None:
            write("stderr", note)
        else:
            sys.stderr.write(note)
    return names


class _ReprOnly:
    """A remote value that could not come back: shown by its text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _traceback_lines(exc: BaseException) -> list:
    text = getattr(exc, "_shoal_cell_tb", None)
    cause = exc.__cause__
    if text is None and cause is not None and hasattr(cause, "tb"):
        text = cause.tb
    if text is None:
        return [f"{type(exc).__name__}: {exc}"]
    return text.rstrip("\n").splitlines()


def _attach_rendering(exc: BaseException, worker: Optional[str]) -> BaseException:
    """Make IPython show ``exc`` as its remote traceback, not shoal's local frames."""
    from ..errors import ShoalError
    from ..futures import RemoteTraceback
    if isinstance(exc.__cause__, RemoteTraceback) or hasattr(exc, "_shoal_cell_tb"):
        where = worker or getattr(exc.__cause__, "worker", "") or "?"
        lines = [f"{_RED}{type(exc).__name__}{_RESET} in a remote cell on worker "
                 f"{_BOLD}{where}{_RESET}:"] + _traceback_lines(exc)
    elif isinstance(exc, ShoalError):
        lines = [f"{_RED}{type(exc).__name__}{_RESET}: {exc}"]
    else:
        return exc
    try:
        # A partial of list over plain strings: the exception stays pickleable.
        exc._render_traceback_ = functools.partial(list, lines)  # type: ignore[attr-defined]
    except Exception:
        pass
    return exc


def _remote_failure(errors: dict, worker: Optional[str]) -> BaseException:
    """The exception to raise for failed remote cells (the first, showing all)."""
    from ..errors import BrokerError
    items = list(errors.items())
    if len(items) == 1:
        label, exc = items[0]
        if isinstance(exc, BrokerError) and worker:
            exc = BrokerError(f"{exc} (the workers are: {', '.join(_worker_names())})")
        return _attach_rendering(exc, label or getattr(exc.__cause__, "worker", None))
    first = _attach_rendering(items[0][1], items[0][0])
    lines: list = []
    for label, exc in items:
        _attach_rendering(exc, label)
        render = getattr(exc, "_render_traceback_", None)
        lines += (render() if render else [f"[{label}] {type(exc).__name__}: {exc}"]) + [""]
    try:
        first._render_traceback_ = functools.partial(list, lines[:-1])  # type: ignore[attr-defined]
    except Exception:
        pass
    return first


def _worker_names() -> list:
    client = current_client()
    try:
        return client.worker_names() if client is not None else []
    except Exception:
        return []
