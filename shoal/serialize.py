"""Serialization of tasks and results: cloudpickle with out-of-band buffers.

Objects are pickled with protocol 5.  Buffers of at least :data:`OOB_MIN`
bytes (NumPy arrays, bytes-likes) leave the pickle stream and travel as their
own frames, uncopied.  Buffers of at least :data:`SHM_MIN` bytes going to a
process on the same host travel through shared memory instead, because a
ZeroMQ relay copies a large frame several times while shared memory copies it
once: the sender writes it into a segment, the receiver maps it.

A buffer's transport is described by a small list in the task's metadata
(``"sb"``: ``[[position, segment, offset, nbytes], ...]``) so the receiver can
rebuild the list of buffers in pickle order.
"""
from __future__ import annotations

import hashlib
import io
import logging
import mmap
import os
import pickle
import secrets
import threading
import types
import weakref
from collections import ChainMap
from typing import Any, Callable, Optional, Sequence

import cloudpickle

logger = logging.getLogger(__name__)

OOB_MIN = 1 << 16
SHM_MIN = 1 << 20
SHM_DIR = "/dev/shm"
SHM_PREFIX = "shoal-"


class SerializationError(TypeError):
    """An object could not be pickled; the message names which one and why."""


def host_id() -> str:
    """Identifies this host's shared-memory namespace (hostname and boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = "noboot"
    return f"{os.uname().nodename}:{boot}"


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


# ---------------------------------------------------------------- segments
class SegmentRegistry:
    """Shared-memory segments this process created or mapped.

    A creator unlinks what it created when the peer is done with it, and on
    exit unlinks whatever is left, so no segment outlives the processes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # segment name -> its mmap, held until the peer is done with it
        self.created: dict[str, mmap.mmap] = {}
        # segment name -> (weak ref to its mmap, base address, size)
        self.mapped: dict[str, tuple] = {}

    def create(self, data, hold: bool = True) -> tuple[str, mmap.mmap]:
        name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        nbytes = memoryview(data).nbytes
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            mm = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        if nbytes:
            mm[:nbytes] = memoryview(data).cast("B")
        with self._lock:
            self.created[name] = mm if hold else None
        self._remember(name, mm)
        return name, mm

    def open(self, name: str) -> mmap.mmap:
        if "/" in name or not name.startswith(SHM_PREFIX):
            raise ValueError(f"refusing shared-memory segment name {name!r}")
        with self._lock:
            known = self.mapped.get(name)
        mm = known[0]() if known else None
        if mm is not None:
            return mm
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self._remember(name, mm)
        return mm

    def _remember(self, name: str, mm: mmap.mmap) -> None:
        try:
            import ctypes
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        except (TypeError, ValueError):
            return
        ref = weakref.ref(mm, lambda _r, n=name: self._forget(n))
        with self._lock:
            self.mapped[name] = (ref, base, len(mm))

    def _forget(self, name: str) -> None:
        with self._lock:
            entry = self.mapped.get(name)
            if entry is not None and entry[0]() is None:
                del self.mapped[name]

    def locate(self, view: memoryview) -> tuple[str, int] | None:
        """The segment and offset holding ``view``'s bytes, if it lies in one."""
        if not self.mapped or not view.contiguous:
            return None
        address = _address_of(view)
        if address is None:
            return None
        with self._lock:
            for name, (ref, base, size) in self.mapped.items():
                if base <= address and address + view.nbytes <= base + size and ref() is not None:
                    return name, address - base
        return None

    def release(self, name: str) -> Optional[mmap.mmap]:
        """Unlink a segment; return its mapping if this process created it.

        The memory lives on while any mapping of it does, so a result that
        refers to it stays valid after the name is gone.
        """
        with self._lock:
            mm = self.created.pop(name, None)
        self.unlink(name)
        return mm

    def unlink(self, name: str) -> None:
        with self._lock:
            self.created.pop(name, None)
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass

    def unlink_all(self) -> None:
        with self._lock:
            names = list(self.created)
        for name in names:
            self.unlink(name)


def _address_of(view: memoryview) -> int | None:
    try:
        import numpy
    except ImportError:
        return None
    try:
        return numpy.frombuffer(view, dtype=numpy.uint8).__array_interface__["data"][0]
    except (TypeError, ValueError):
        return None


segments = SegmentRegistry()


# ---------------------------------------------------------------- pickling
_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]
_DYNAMIC_CODE = "<dynamic-code>"


def _code_reduce(code: types.CodeType):
    # cloudpickle 3.1.3 renames every code object it pickles by value to
    # "<dynamic-code>" (deterministic payloads); a remote traceback then shows
    # no file and no source line.  Keep the real file name: a worker on the same
    # host reads the lines from it, and a client fills in the ones it knows
    # (notebook cells) when it shows the traceback.
    rebuild, args = _cloudpickle_code_reduce(code)
    if _DYNAMIC_CODE not in args:
        return rebuild, args
    return _code_with_filename, (rebuild, args, code.co_filename)


def _code_with_filename(rebuild, args: tuple, filename: str) -> types.CodeType:
    """Unpickling hook: the code object cloudpickle rebuilds, under its own file name."""
    return rebuild(*args).replace(co_filename=filename)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


def cloudpickle_dumps(obj: Any, buffer_callback=None) -> bytes:
    """``cloudpickle.dumps(obj, protocol=5)``, keeping the file names of code pickled by value."""
    with io.BytesIO() as file:
        _Pickler(file, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def _dumps(obj, buffer_callback) -> bytes:
    return cloudpickle_dumps(obj, buffer_callback)


_SCALARS = frozenset({int, float, complex, bool, str, bytes, type(None)})


def plain(values: tuple) -> bool:
    """Whether ``values`` are all numbers, strings, bytes or None (they pickle
    alike with the stdlib's pickler, and hold no objects of their own)."""
    return all(type(x) in _SCALARS for x in values)


def dumps_plain(obj: Any) -> tuple[list, dict]:
    """:func:`dumps` of a value :func:`plain` says is plain (or a plain scalar):
    the stdlib's pickler, about 5x cheaper than cloudpickle, gives the same bytes."""
    return [pickle.dumps(obj, protocol=5)], {}


def dumps(obj: Any, shm: bool = False, hold: bool = True) -> tuple[list, dict]:
    """Pickle ``obj``: return ``(frames, meta)`` where ``frames[0]`` is the pickle.

    ``meta`` is empty unless buffers went to shared memory (``shm=True``).
    With ``hold=False`` this process keeps no mapping of the segments it
    creates (a worker's results: the client maps and unlinks them).
    """
    if type(obj) in _SCALARS or (type(obj) is tuple and plain(obj)):
        return dumps_plain(obj)
    buffers: list = []

    def keep(buf: pickle.PickleBuffer):
        view = buf.raw()
        if view.nbytes < OOB_MIN:
            return True  # small: stays in the pickle stream
        buffers.append(view)
        return False

    payload = _dumps(obj, keep)
    if not buffers:
        return [payload], {}
    frames: list = [payload]
    placed = []
    for pos, view in enumerate(buffers):
        if shm and view.nbytes >= SHM_MIN:
            where = segments.locate(view)
            if where is not None:  # already in a segment the peer can map
                placed.append([pos, where[0], where[1], view.nbytes])
                continue
            name, _mm = segments.create(view, hold)
            placed.append([pos, name, 0, view.nbytes])
        else:
            frames.append(view)
    return frames, ({"sb": placed} if placed else {})


def loads(frames: Sequence, meta: dict | None = None, safe: bool = False) -> Any:
    """Inverse of :func:`dumps`; ``safe`` builds plain data only (see shoal.tasks.safe_loads)."""
    placed = meta.get("sb") if meta else None
    inline = [memoryview(f) for f in frames[1:]]
    if placed:
        buffers: list = []
        it = iter(inline)
        by_pos = {p[0]: p for p in placed}
        for pos in range(len(inline) + len(placed)):
            if pos in by_pos:
                _, name, offset, nbytes = by_pos[pos]
                mm = segments.open(name)
                buffers.append(memoryview(mm)[offset:offset + nbytes])
            else:
                buffers.append(next(it))
    else:
        buffers = inline
    if safe:
        from .tasks import safe_loads
        return safe_loads(frames[0], buffers)
    return pickle.loads(frames[0], buffers=buffers)


def segment_names(meta: dict | None) -> list[str]:
    return [p[1] for p in meta.get("sb", ())] if meta else []


def nbytes(frames: Sequence) -> int:
    total = 0
    for f in frames:
        total += len(f) if type(f) is bytes else memoryview(f).nbytes
    return total


def payload_size(frames: Sequence, meta: dict) -> int:
    """Bytes of a payload: its frames and the shared-memory segments ``meta`` names."""
    return nbytes(frames) + sum(p[3] for p in meta.get("sb", ()))


def digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:16]


# ---------------------------------------------------------------- diagnostics
def _describe(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def _unpicklable(obj: Any) -> Exception | None:
    try:
        cloudpickle_dumps(obj)
    except Exception as exc:  # pickling can raise nearly anything
        return exc
    return None


def explain_function(fn: Callable) -> str:
    """Why ``fn`` cannot be pickled: which captured variable is to blame."""
    import inspect
    try:
        captured = inspect.getclosurevars(fn)
    except TypeError:
        return ""
    for kind, names in (("captures variable", captured.nonlocals),
                        ("uses global", captured.globals)):
        for name, value in names.items():
            if callable(value) and getattr(value, "__module__", None) not in (None, "__main__"):
                continue
            err = _unpicklable(value)
            if err is not None:
                return f"; it {kind} {name!r} of type {_describe(value)}, which cannot be pickled ({err})"
    return ""


def explain_call(fn: Callable, args: Sequence, kwargs: dict) -> str:
    """Name the argument of a call that cannot be pickled."""
    for i, value in enumerate(args):
        err = _unpicklable(value)
        if err is not None:
            return f"argument {i} of type {_describe(value)} cannot be pickled ({err})"
    for name, value in kwargs.items():
        err = _unpicklable(value)
        if err is not None:
            return f"keyword argument {name!r} of type {_describe(value)} cannot be pickled ({err})"
    return ""


def task_name(fn: Any) -> str:
    """``module.qualname`` of a function: the name rate limits and events use."""
    module = getattr(fn, "__module__", None)
    name = fn_name(fn)
    return f"{module}.{name}" if module and module != "builtins" else name


def fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class FunctionCache:
    """Pickled functions, reused while nothing they capture has been rebound.

    Pickling a notebook function by value costs ~12 us, a large share of a
    round trip.  An entry is reused only while the function's code, defaults,
    closure cells and the globals it names are the same objects as when it
    was pickled, so rebinding ``factor = 3`` in a notebook re-sends it.
    Objects mutated in place (``data.append(x)``) are not detected: pass such
    data as arguments, as with every pickling executor.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def _fingerprint(fn) -> tuple:
        code = fn.__code__
        glob = fn.__globals__
        cells = fn.__closure__
        return (code, fn.__defaults__, fn.__kwdefaults__,
                tuple([id(c.cell_contents) for c in cells]) if cells else (),
                tuple(map(id, map(glob.get, code.co_names))))

    def dumps(self, fn: Callable) -> tuple[bytes, bytes]:
        """``(payload, digest)`` of ``fn``."""
        if type(fn) is not types.FunctionType:
            payload = _dumps_function(fn)
            return payload, digest(payload)
        try:
            fingerprint = self._fingerprint(fn)
        except ValueError:  # an empty closure cell
            payload = _dumps_function(fn)
            return payload, digest(payload)
        entry = self._entries.get(id(fn))
        if entry is not None and entry[0] is fn and entry[1] == fingerprint:
            return entry[2], entry[3]
        payload = _dumps_function(fn)
        result = (fn, fingerprint, payload, digest(payload))
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[id(fn)] = result
        return payload, result[3]


def _dumps_function(fn: Callable) -> bytes:
    try:
        return cloudpickle_dumps(fn)
    except Exception as exc:
        raise SerializationError(
            f"function {fn_name(fn)!r} cannot be pickled{explain_function(fn)}: {exc}. "
            "Create such objects inside the function, or on each worker with "
            "a set-up task, instead of capturing them.") from exc


def dumps_call(fn: Callable, args: Sequence, kwargs: dict, shm: bool = False) -> tuple[list, dict]:
    """Pickle the arguments of one call, naming the culprit on failure."""
    try:
        return dumps((args, kwargs) if kwargs else args, shm=shm)
    except Exception as exc:
        detail = explain_call(fn, args, kwargs) or str(exc)
        raise SerializationError(
            f"cannot send call to {fn_name(fn)!r}: {detail}. Pass something picklable, "
            "or create the object inside the function.") from exc


functions = FunctionCache()


def dumps_function(fn: Callable) -> tuple[bytes, bytes]:
    """``(payload, digest)`` of a function, pickled by value for ``__main__`` and notebook code."""
    return functions.dumps(fn)
