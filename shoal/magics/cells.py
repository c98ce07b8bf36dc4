"""Remote cells, the part that runs anywhere: finding a cell's names, running it on a worker.

:func:`cell_names` reads a cell and finds the names it needs from outside
and the names it binds; :func:`run_cell` runs it in a worker's lasting
namespace.  Workers import this module, so it imports nothing from IPython
(nor from the rest of the notebook layer).
"""
from __future__ import annotations

import ast
import linecache
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["cell_names", "CellNames", "run_cell", "CellOutcome"]


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
    from ..serialize import cloudpickle_dumps

    try:
        from ..worker import namespace
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
                    outcome.value = cloudpickle_dumps(value)
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
            outcome.names[name] = cloudpickle_dumps(namespace[name])
        except Exception as exc:
            outcome.kept[name] = f"cannot be pickled: {type(exc).__name__}: {exc}"
    return outcome


def _safe_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<{type(value).__qualname__} object; repr failed: {exc}>"
    return text if len(text) <= limit else text[:limit] + "..."
