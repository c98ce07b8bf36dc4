"""IPython extension: the ``%shoal`` and ``%%remote`` magics.

::

    %load_ext shoal
    %shoal start -n 4          # a local cluster; binds `client` and `cluster` here
    %shoal status              # a table of workers
    %%remote                   # run this cell on a worker: free names go there,
    total = sum(data)          # bound names come back, the last expression is shown
    total * 2

Workers import this module to run remote cells (:func:`run_cell`), so it
imports nothing from IPython at module level: the notebook side imports
IPython inside the functions that need it.
"""
from __future__ import annotations

import argparse
import ast
import functools
import linecache
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["load_ipython_extension", "unload_ipython_extension", "run_cell", "cell_names",
           "CellNames", "CellOutcome"]

_RED, _BOLD, _RESET = "\x1b[0;31m", "\x1b[1m", "\x1b[0m"


# ----------------------------------------------------------------- static analysis
@dataclass
class CellNames:
    """What a cell reads from outside (``free``) and binds at module level (``bound``)."""

    free: list = field(default_factory=list)
    bound: list = field(default_factory=list)


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_TRY = (ast.Try,) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())


class _Scope(ast.NodeVisitor):
    """Reads and bindings of one scope; nested scopes are resolved recursively."""

    def __init__(self) -> None:
        self.reads: set = set()
        self.stores: list = []
        self.declared_global: set = set()
        self.declared_nonlocal: set = set()
        self.nested_free: set = set()
        self.nested_global_stores: list = []

    # -- bindings and reads of this scope
    def _store(self, name: str) -> None:
        if name not in self.stores:
            self.stores.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.reads.add(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._store(node.id)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):  # x += 1 reads x first
            self.reads.add(node.target.id)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.declared_global.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.declared_nonlocal.update(node.names)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._store(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._store(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._store(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node) -> None:  # Python 3.10+
        if node.name:
            self._store(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node) -> None:
        if node.name:
            self._store(node.name)

    def visit_MatchMapping(self, node) -> None:
        if node.rest:
            self._store(node.rest)
        self.generic_visit(node)

    # -- nested scopes: what they evaluate here, and what they read from outside
    def _nested(self, node: ast.AST, params: list, body: list, evaluated_here: list) -> None:
        for child in evaluated_here:
            if child is not None:
                self.visit(child)
        inner = _Scope()
        for child in body:
            inner.visit(child)
        free, global_stores = inner.resolve(params)
        self.nested_free |= free
        self.nested_global_stores.extend(global_stores)

    def _function(self, node) -> None:
        args = node.args
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        outside = list(args.defaults) + [d for d in args.kw_defaults if d is not None]
        if not isinstance(node, ast.Lambda):
            outside += list(node.decorator_list)
            outside += [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs]
            outside += [node.returns]
            self._store(node.name)
            body = node.body
        else:
            body = [node.body]
        self._nested(node, params, body, outside)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._store(node.name)
        self._nested(node, [], node.body,
                     list(node.decorator_list) + list(node.bases) + [k.value for k in node.keywords])

    def _comprehension(self, node) -> None:
        gens = node.generators
        # The first iterable is evaluated in the enclosing scope.
        body = [g.target for g in gens] + [g.iter for g in gens[1:]]
        body += [cond for g in gens for cond in g.ifs]
        body += [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        self._nested(node, [], body, [gens[0].iter])

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def visit_NamedExpr(self, node) -> None:
        self.visit(node.value)
        self._store(node.target.id)

    def resolve(self, params: list) -> tuple:
        """``(free reads, module-level stores)`` of this scope as a nested one."""
        local = (set(params) | set(self.stores)) - self.declared_global - self.declared_nonlocal
        free = (self.reads | self.nested_free) - local
        global_stores = [n for n in self.stores if n in self.declared_global]
        global_stores += self.nested_global_stores
        return free, global_stores


def cell_names(tree: ast.Module) -> CellNames:
    """Free names a cell reads before binding them, and the names it binds.

    Statements are walked in order: a name read where the cell has not yet
    surely bound it is free (it is shipped from the notebook, when the
    notebook has it); every name bound at module level is a candidate to
    pull back.  A binding inside ``if``/``for``/``while``/``try`` counts
    only within that block.  Names read inside functions count as read
    where the function is defined, which can only ship a name too many.
    """
    names = CellNames()
    _walk_block(tree.body, set(), names)
    return names


def _note_reads(nodes: list, definite: set, names: CellNames) -> None:
    scope = _Scope()
    for node in nodes:
        if node is not None:
            scope.visit(node)
    for name in sorted(scope.reads | scope.nested_free):
        if name not in definite and name not in names.free:
            names.free.append(name)
    _note_stores(scope.stores + scope.nested_global_stores, names)
    definite.update(scope.stores)


def _note_stores(stores: list, names: CellNames) -> None:
    for name in stores:
        if name not in names.bound:
            names.bound.append(name)


def _walk_block(stmts: list, definite: set, names: CellNames) -> None:
    """Walk statements in order; ``definite`` holds the names surely bound so far."""
    for stmt in stmts:
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            _note_reads([stmt.iter], definite, names)
            inner = set(definite)
            _note_reads([stmt.target], inner, names)
            _walk_block(stmt.body, inner, names)
            _walk_block(stmt.orelse, set(definite), names)
        elif isinstance(stmt, (ast.While, ast.If)):
            _note_reads([stmt.test], definite, names)
            _walk_block(stmt.body, set(definite), names)
            _walk_block(stmt.orelse, set(definite), names)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                _note_reads([item.context_expr, item.optional_vars], definite, names)
            _walk_block(stmt.body, definite, names)
        elif isinstance(stmt, _TRY):
            _walk_block(stmt.body, set(definite), names)
            for handler in stmt.handlers:
                inner = set(definite)
                _note_reads([handler.type], inner, names)
                if handler.name:
                    _note_stores([handler.name], names)
                    inner.add(handler.name)
                _walk_block(handler.body, inner, names)
            _walk_block(stmt.orelse, set(definite), names)
            _walk_block(stmt.finalbody, set(definite), names)
        elif hasattr(ast, "Match") and isinstance(stmt, ast.Match):
            _note_reads([stmt.subject], definite, names)
            for case in stmt.cases:
                inner = set(definite)
                _note_reads([case.pattern, case.guard], inner, names)
                _walk_block(case.body, inner, names)
        else:
            _note_reads([stmt], definite, names)


# ----------------------------------------------------------------- worker side
@dataclass
class CellOutcome:
    """What a remote cell sends back: its final value and the names it bound.

    Values travel as separate pickles, so one that cannot be unpickled in the
    notebook (a module missing there) loses only itself.
    """

    has_value: bool = False
    value: Optional[bytes] = None
    value_type: str = ""
    value_repr: Optional[str] = None
    names: dict = field(default_factory=dict)   # name -> pickle
    kept: dict = field(default_factory=dict)    # name -> why it stayed on the worker


def _cell_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's own first frame on (drops shoal's frames)."""
    import traceback
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if tb is None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def run_cell(source: str, filename: str, shipped: dict, pull: list, want_value: bool,
             first_line: int = 1, header: str = "") -> CellOutcome:
    """Run a notebook cell on this worker, in the worker's lasting namespace.

    ``shipped`` names are set first; the cell runs; the value of a final
    expression (when ``want_value``) and the names in ``pull`` are pickled
    one by one into a :class:`CellOutcome`.  An exception is re-raised with
    the traceback of the cell's own lines attached as ``_shoal_cell_tb``.
    """
    import cloudpickle

    try:
        from .worker import namespace
    except ImportError:  # pragma: no cover - the worker module always imports
        namespace = {}
    namespace.update(shipped)
    # The cell's text in linecache, so tracebacks show its lines.
    lines = (header.splitlines(True) if header else []) + source.splitlines(True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[filename] = (len("".join(lines)), None, lines, filename)
    outcome = CellOutcome()
    try:
        tree = ast.parse(source, filename)
        if first_line != 1:
            ast.increment_lineno(tree, first_line - 1)
        last = None
        if want_value and tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, filename, "eval"), namespace)
            if value is not None:
                outcome.has_value = True
                outcome.value_type = f"{type(value).__module__}.{type(value).__qualname__}"
                try:
                    outcome.value = cloudpickle.dumps(value, protocol=5)
                except Exception as exc:
                    outcome.value_repr = f"{_safe_repr(value)}\n(not pickleable: {exc})"
    except BaseException as exc:
        try:
            exc._shoal_cell_tb = _cell_traceback(exc, filename)  # type: ignore[attr-defined]
        except Exception:
            pass
        raise
    for name in pull:
        if name not in namespace:
            continue  # bound only on a path that did not run
        try:
            outcome.names[name] = cloudpickle.dumps(namespace[name], protocol=5)
        except Exception as exc:
            outcome.kept[name] = f"cannot be pickled: {type(exc).__name__}: {exc}"
    return outcome


def _safe_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<{type(value).__qualname__} object; repr failed: {exc}>"
    return text if len(text) <= limit else text[:limit] + "..."


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
                print(f"shoal: scaled the local cluster to {args.n_workers} workers")
            else:
                print(f"shoal: the local cluster is already running: {len(cluster.workers)} "
                      f"workers at {cluster.address}")
            if _state.live_client() is None or _state.client not in cluster._clients:
                _state.client = cluster.client()
        else:
            _start_cluster(args.n_workers, args.slots)
        _bind(ip, client=_state.client, cluster=_state.cluster)


def _start_cluster(n_workers: Optional[int], slots: int = 1) -> None:
    from .cluster import Cluster
    t0 = time.monotonic()
    cluster = Cluster(n_workers=n_workers, slots=slots)
    old = _state.client
    _state.cluster = cluster
    _state.client = cluster.client()
    if old is not None and old is not _state.client:
        old.close()
    print(f"shoal: started a local cluster: {len(cluster.workers)} workers x {slots} slot(s) "
          f"at {cluster.address} in {time.monotonic() - t0:.1f} s; `client` and `cluster` "
          "are bound here (`%shoal stop` stops it)")


def _cmd_connect(ip: Any, argv: list) -> None:
    from .client import Client
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
    print(f"shoal: connected to {client.address}: {client.workers} workers, "
          f"{client.slots} slots; `client` is bound here")
    _bind(ip, client=client)


def _cmd_status(ip: Any, argv: list) -> Any:
    if argv:
        raise _usage_error("%shoal status takes no arguments")
    client = _current_client()
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


def _current_client() -> Any:
    client = _state.live_client()
    if client is not None:
        return client
    from .client import get_client
    try:
        return get_client()
    except ValueError:
        return None


class ClusterStatus:
    """What ``%shoal status`` shows: the broker's state, as a table of workers."""

    _COLUMNS = (("name", "name"), ("host", "host"), ("pid", "pid"), ("slots", "slots"),
                ("running", "running"), ("done", "done"), ("mean task ms", "mean_task_ms"))

    def __init__(self, state: dict) -> None:
        self.state = state

    @property
    def workers(self) -> list:
        return list(self.state.get("worker_list", []))

    def __repr__(self) -> str:
        from .cli import format_status
        return format_status(self.state)

    def _repr_html_(self) -> str:
        from html import escape
        from .progress import format_duration
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
                cells.append(f"<td>{escape(str('-' if value is None else value))}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        header = "".join(f"<th>{label}</th>" for label, _ in self._COLUMNS)
        return (f"<div>{head}</div><table><thead><tr>{header}</tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")


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
    import shlex
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
    return _RemoteRun(ip, code, opts, header, first_line, line_form=cell is None).run()


class RemoteCellTimeout(TimeoutError):
    """A remote cell did not finish within ``--timeout``."""

    def _render_traceback_(self) -> list:
        return [f"{_RED}RemoteCellTimeout{_RESET}: {self}"]


class _RemoteRun:
    """One execution of a remote cell, from shipping names to showing the result."""

    def __init__(self, ip: Any, code: str, opts: argparse.Namespace, header: str,
                 first_line: int, line_form: bool) -> None:
        self.ip = ip
        self.code = code
        self.opts = opts
        self.header = header
        self.first_line = first_line
        self.line_form = line_form
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
        client = _ensure_client(self.ip)
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
            from .errors import SerializationError
            if isinstance(exc, SerializationError):
                raise _explain_unshippable(shipped, exc) from None
            raise
        if self.opts.is_async:
            return self._run_async(futures, pull)
        outcomes = _wait_and_stream(futures, self.opts.timeout, labelled=self.opts.all)
        return self._finish(outcomes, pull)

    def _finish(self, outcomes: dict, pull: list) -> Any:
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

    def _run_async(self, futures: dict, pull: list) -> Any:
        from .futures import Future
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
        if future.cancel():
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
    import cloudpickle
    for name, value in shipped.items():
        try:
            cloudpickle.dumps(value)
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
    from .errors import ShoalError
    from .futures import RemoteTraceback
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
    from .errors import BrokerError
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
    client = _current_client()
    try:
        return client.worker_names() if client is not None else []
    except Exception:
        return []


def _ensure_client(ip: Any) -> Any:
    """The client to use: this extension's, the latest one made, or a new local cluster."""
    with _state.lock:
        client = _current_client()
        if client is None:
            print("shoal: no cluster yet, starting a local one", file=sys.stderr)
            _start_cluster(None)
            _bind(ip, client=_state.client, cluster=_state.cluster)
            client = _state.client
        return client


# ----------------------------------------------------------------- display of future lists
def _is_future_list(obj: Any) -> bool:
    from .futures import Future
    return bool(obj) and isinstance(obj[0], Future) and all(isinstance(f, Future) for f in obj)


def _futures_list_bundle(obj: Any) -> Any:
    """Mime-bundle formatter for lists: a list of shoal futures shows live progress."""
    if not _is_future_list(obj):
        previous = _previous_printers.get("bundle")
        return previous(obj) if previous is not None else None
    from .progress import display_progress
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
        from . import joblib as _backend  # registers itself
        _backend.register()
    except Exception as exc:  # a broken joblib must not break the extension
        logger.warning("could not register the shoal joblib backend: %s", exc)
