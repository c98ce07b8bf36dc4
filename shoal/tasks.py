"""Named tasks, as Celery users write them.

>>> # pkg/tasks.py
>>> import shoal
>>> @shoal.task(queue="io", retries=3)
... def resize(path, width=200): ...

>>> resize.submit("a.png")                 # a Future, on the current client
>>> resize.map(paths)                      # a MapResult
>>> client.submit("pkg.tasks.resize", "a.png")   # by name: no code is pickled

Workers load such modules with ``shoal worker --import pkg.tasks``; a task
sent by name travels as its name only.  ``shoal worker --registered-only``
runs named tasks and nothing else: it refuses pickled code, and it unpickles
arguments with :func:`safe_loads`, which builds plain data only.  That is
the mode for workers shared between people who do not trust each other's code.
"""
from __future__ import annotations

import importlib
import io
import pickle
import sys
from types import FunctionType
from typing import Any, Callable, Optional

#: Every task defined in this process, by name.
registry: dict[str, "Task"] = {}


class Task:
    """A function with a name and default task options (see :func:`task`)."""

    def __init__(self, fn: Callable, name: Optional[str] = None, **options: Any) -> None:
        if not callable(fn):
            raise TypeError(f"@shoal.task decorates a function, not {fn!r}")
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"a task name must be non-empty, without spaces: {self.name!r}")
        from .options import task_options
        task_options(**options)  # check them now, at definition
        self.options = options
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", self.name)
        self.__qualname__ = getattr(fn, "__qualname__", self.name)
        self.__module__ = getattr(fn, "__module__", None)
        self.__wrapped__ = fn
        registry[self.name] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run it here, in this process (as calling a Celery task does)."""
        return self.fn(*args, **kwargs)

    @property
    def by_name(self) -> bool:
        """Whether workers can load it by name: it lives in an importable module,
        not in ``__main__`` or a notebook (such a task travels pickled)."""
        module = self.__module__
        return bool(module) and module != "__main__" and not module.startswith("__") and \
            getattr(sys.modules.get(module), "__file__", None) is not None

    def submit(self, *args: Any, **kwargs: Any):
        """Submit it with its default options on the current client; a Future."""
        return self.apply_async(args, kwargs)

    delay = submit  # Celery's name

    def apply_async(self, args: tuple = (), kwargs: Optional[dict] = None, client: Any = None,
                    **options: Any):
        """Submit with options beside its defaults (Celery's ``apply_async``)."""
        from .canvas import _client
        return _client(client).apply(self, args, kwargs, **{**self.options, **options})

    def map(self, *iterables: Any, client: Any = None, **options: Any):
        """``client.map`` of this task over ``iterables``; a MapResult."""
        from .canvas import _client
        defaults = {k: v for k, v in self.options.items() if k in _MAP_OPTIONS}
        return _client(client).map(self, *iterables, **{**defaults, **options})

    def s(self, *args: Any, **kwargs: Any):
        """A signature of this task (for chain, group, chord)."""
        from .canvas import Signature
        return Signature(self, args, kwargs)

    def si(self, *args: Any, **kwargs: Any):
        """An immutable signature (it ignores a chain's previous result)."""
        from .canvas import Signature
        return Signature(self, args, kwargs, immutable=True)

    def __reduce__(self):
        # Inside a pickle, a task is its name; the receiving process must have
        # registered it (or be able to import its module).
        return lookup, (self.name,)

    def __repr__(self) -> str:
        return f"<shoal.task {self.name}>"


_MAP_OPTIONS = frozenset({"retries", "queue", "priority", "resources"})


def task(fn: Optional[Callable] = None, *, name: Optional[str] = None, **options: Any):
    """Make ``fn`` a named task: ``@shoal.task`` or ``@shoal.task(name=..., queue=..., ...)``.

    ``options`` are defaults for every submit: ``retries``, ``timeout``,
    ``retry_backoff``, ``retry_on``, ``queue``, ``priority``, ``resources``,
    ``rate_limit`` (see :meth:`shoal.Client.submit`).
    """
    if fn is None:
        return lambda f: Task(f, name, **options)
    return Task(fn, name, **options)


class UnknownTask(LookupError):
    """A worker has no task by that name."""


def lookup(name: str, allow_import: bool = True) -> Task:
    """The task ``name``: registered here, or found by importing its module."""
    found = registry.get(name)
    if found is not None:
        return found
    if allow_import:
        module, _, attr = name.rpartition(".")
        while module:
            try:
                importlib.import_module(module)
            except ImportError:
                module, _, rest = module.rpartition(".")
                attr = f"{rest}.{attr}"
                continue
            found = registry.get(name)
            if found is not None:
                return found
            target: Any = sys.modules[module]
            try:
                for part in attr.split("."):
                    target = getattr(target, part)
            except AttributeError:
                break
            if callable(target):
                return target if isinstance(target, Task) else Task(target, name)
            break
    hint = name.rpartition(".")[0] or "the module that defines it"
    raise UnknownTask(f"no task named {name!r} on this worker; start workers with "
                      f"`shoal worker --import {hint}` (known here: "
                      f"{', '.join(sorted(registry)) or 'none'})")


def import_modules(modules: list) -> list:
    """Import the modules of ``shoal worker --import``; return the task names they define."""
    for module in modules:
        importlib.import_module(module)
    return sorted(registry)


# ----------------------------------------------------------------- safe arguments
#: What :func:`safe_loads` may build besides plain containers and scalars.
SAFE_GLOBALS = {
    "builtins": {"complex", "set", "frozenset", "bytearray", "slice", "range", "bytes",
                 "str", "int", "float", "bool", "list", "tuple", "dict"},
    "collections": {"OrderedDict", "defaultdict", "deque", "Counter"},
    "datetime": {"date", "datetime", "time", "timedelta", "timezone"},
    "decimal": {"Decimal"},
    "fractions": {"Fraction"},
    "uuid": {"UUID"},
    "zoneinfo": {"ZoneInfo"},
    "zoneinfo._zoneinfo": {"ZoneInfo"},
    "pathlib": {"PurePath", "PurePosixPath", "PureWindowsPath", "Path", "PosixPath",
                "WindowsPath"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},
    "shoal.worker": {"resolve_ref"},
    "shoal.deps": {"resolve_item", "resolve_parts"},
}


class RefusedPickle(pickle.UnpicklingError):
    """Arguments that would build something beyond plain data, on a --registered-only worker."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module.startswith("numpy") and name.startswith(("dtype", "Float", "Int", "UInt",
                                                           "Complex", "Bool", "Str", "Bytes")):
            return super().find_class(module, name)  # numpy's dtype classes (numpy.dtypes)
        raise RefusedPickle(
            f"this worker runs registered tasks only (--registered-only) and takes plain data "
            f"as arguments; it refused to build {module}.{name}. Send lists, dicts, numbers, "
            "strings, dates or NumPy arrays, or run the task on a worker without "
            "--registered-only")


def safe_loads(payload, buffers=()) -> Any:
    """Unpickle ``payload`` building only plain data (see :data:`SAFE_GLOBALS`)."""
    return _SafeUnpickler(io.BytesIO(payload), buffers=buffers).load()


_dumps_function: Optional[Callable] = None


def _load_dumps_function() -> Callable:
    """serialize.dumps_function, imported on first use: importing this module
    (a worker's ``--import`` modules do) loads no cloudpickle."""
    global _dumps_function
    from .serialize import dumps_function
    _dumps_function = dumps_function
    return dumps_function


def encode_function(fn: Any) -> tuple:
    """How a task's function travels: ``(payload, digest, None)`` pickled, or
    ``(None, None, name)`` by name (a task name, or a Task from an importable module)."""
    if type(fn) is FunctionType:  # the common case first: it is on every submit's path
        payload, digest = (_dumps_function or _load_dumps_function())(fn)
        return payload, digest, None
    from . import serialize
    if isinstance(fn, str):
        if not fn or any(c.isspace() for c in fn):
            raise ValueError(f"a task name must be non-empty, without spaces: {fn!r}")
        return None, None, fn
    if isinstance(fn, Task):
        if fn.by_name:
            return None, None, fn.name
        fn = fn.fn  # defined in __main__ or a notebook: it travels by value
    if not callable(fn):
        raise TypeError(f"submit() needs a callable or a task name first, not "
                        f"{type(fn).__name__}")
    payload, digest = serialize.dumps_function(fn)
    return payload, digest, None
