"""Chains, groups and chords: workflows as Celery users write them.

Each is a thin description over dependent futures (a future passed as an
argument makes a task wait for it; see :mod:`shoal.deps`).  Nothing runs
until ``.submit()`` (or calling the object, as in Celery); then every task is
sent at once and the broker starts each when its inputs are ready.

==========================================  ==========================================
Celery                                      shoal
==========================================  ==========================================
``add.s(2, 2)``                             ``shoal.s(add, 2, 2)`` or ``add.s(2, 2)``
``chain(add.s(2, 2), add.s(4))()``          ``shoal.chain(shoal.s(add, 2, 2), shoal.s(add, 4)).submit()``
``group(add.s(i, i) for i in r)()``         ``shoal.group(shoal.s(add, i, i) for i in r).submit()``
``chord(header)(tsum.s())``                 ``shoal.chord(header, shoal.s(sum)).submit()``
``add.si(1, 1)`` (ignores the parent)       ``shoal.si(add, 1, 1)``
``add.s(1).set(queue="gpu")``               ``shoal.s(add, 1).set(queue="gpu")``
==========================================  ==========================================
"""
from __future__ import annotations

from typing import Any, Callable, Optional


def _client(client):
    if client is not None:
        return client
    from .client import get_client
    return get_client()


class Signature:
    """A task call not yet submitted: ``fn(*args, **kwargs)`` with task options.

    >>> sig = shoal.s(resize, "a.png", width=200).set(queue="io", retries=2)
    >>> sig.submit()                 # a Future, on the current client
    """

    def __init__(self, fn: Any, args: tuple = (), kwargs: Optional[dict] = None,
                 options: Optional[dict] = None, immutable: bool = False) -> None:
        if not callable(fn) and not isinstance(fn, str):
            raise TypeError(f"a signature needs a function or a task name, not {fn!r}")
        self.fn = fn
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        #: an immutable signature ignores the result of the step before it
        self.immutable = immutable

    def set(self, **options: Any) -> "Signature":
        """A copy with task options (queue, priority, retries, ...; see Client.submit)."""
        return Signature(self.fn, self.args, self.kwargs, {**self.options, **options},
                         self.immutable)

    def submit(self, *first: Any, client: Any = None):
        """Submit it; arguments in ``first`` go before its own (a chain's previous
        result).  Returns a :class:`shoal.Future`."""
        args = self.args if self.immutable else first + self.args
        return _client(client).apply(self.fn, args, self.kwargs, **self.options)

    __call__ = submit

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)

    def __repr__(self) -> str:
        from .serialize import fn_name
        name = self.fn if isinstance(self.fn, str) else fn_name(self.fn)
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{'si' if self.immutable else 's'}({name}, {', '.join(parts)})"


def s(fn: Callable, *args: Any, **kwargs: Any) -> Signature:
    """A signature: ``shoal.s(add, 2)`` is ``add(<previous result>, 2)`` in a chain."""
    return Signature(fn, args, kwargs)


def si(fn: Callable, *args: Any, **kwargs: Any) -> Signature:
    """An immutable signature: in a chain it does not receive the previous result."""
    return Signature(fn, args, kwargs, immutable=True)


def _signature(step: Any) -> Any:
    if isinstance(step, (Signature, group, chain, chord)):
        return step
    if callable(step) and not isinstance(step, type):
        return Signature(step)
    raise TypeError(f"a chain step must be a signature (shoal.s(fn, ...)), a function, a group "
                    f"or a chord, not {step!r}")


class GroupResult(list):
    """The futures of a submitted group, in order; ``result()`` gives their values.

    Passed to a task as an argument, the task receives the list of values.
    """

    def result(self, timeout: Optional[float] = None) -> list:
        """The values in order; raises the first error."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for future in self:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(future.result(remaining))
        return out

    def done(self) -> bool:
        return all(f.done() for f in self)

    def cancel(self) -> int:
        """Cancel every task not yet finished; return how many were."""
        pending = [f for f in self if not f.done()]
        if not pending:
            return 0
        return pending[0]._client.cancel(pending)

    def __repr__(self) -> str:
        done = sum(1 for f in self if f.done())
        return f"<shoal.GroupResult {done}/{len(self)} done>"


class group:
    """Tasks that run in parallel: ``shoal.group(shoal.s(f, i) for i in range(10))``.

    ``.submit()`` returns a :class:`GroupResult`.  In a chain, each task of
    the group receives the previous step's result, and the next step receives
    the list of the group's results (a chord).
    """

    def __init__(self, *tasks: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Signature) and not callable(tasks[0]):
            tasks = tuple(tasks[0])  # group(generator) or group([...])
        self.tasks = [_signature(t) for t in tasks]
        if not self.tasks:
            raise ValueError("a group needs at least one task")

    def submit(self, *first: Any, client: Any = None) -> GroupResult:
        client = _client(client)
        return GroupResult(t.submit(*first, client=client) for t in self.tasks)

    __call__ = submit

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)

    def __repr__(self) -> str:
        return f"group({', '.join(map(repr, self.tasks))})"


class chain:
    """Steps that run one after another, each receiving the previous result as
    its first argument: ``shoal.chain(shoal.s(load, path), shoal.s(clean), shoal.s(save))``.

    ``.submit()`` returns the last step's future (or GroupResult).
    """

    def __init__(self, *steps: Any) -> None:
        if not steps:
            raise ValueError("a chain needs at least one step")
        self.steps = [_signature(s) for s in steps]

    def submit(self, *first: Any, client: Any = None):
        client = _client(client)
        previous: tuple = first
        outcome = None
        for step in self.steps:
            outcome = step.submit(*previous, client=client)
            previous = (outcome,)
        return outcome

    __call__ = submit

    def __or__(self, other: Any) -> "chain":
        return chain(*self.steps, other)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.steps))


class chord:
    """A group, then a callback that receives the list of its results:
    ``shoal.chord(shoal.group(...), shoal.s(combine))``; Celery's
    ``chord(header)(callback)`` works too.  ``.submit()`` returns the callback's future.
    """

    def __init__(self, header: Any, body: Any = None) -> None:
        self.header = header if isinstance(header, group) else group(header)
        self.body = None if body is None else _signature(body)

    def submit(self, *first: Any, client: Any = None):
        if self.body is None:
            raise TypeError("this chord has no callback: shoal.chord(header, callback), "
                            "or chord(header)(callback)")
        client = _client(client)
        results = self.header.submit(*first, client=client)
        return self.body.submit(results, client=client)

    def __call__(self, *args: Any, client: Any = None):
        if self.body is None and len(args) == 1 and not client:
            return chord(self.header, args[0]).submit()  # Celery's chord(header)(callback)
        return self.submit(*args, client=client)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"
