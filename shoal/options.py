"""Per-task options: checked in the caller's thread, carried in a unit's metadata.

Each option has a short metadata field (the broker and workers read them,
never a pickle).  A bad value raises at ``submit`` with a message that names
the option and what it accepts, before anything is sent.
"""
from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any, Optional

from .routing import MAX_PRIORITY, MAX_QUEUE_NAME, parse_resources

#: A task's own retry back-off (``retry_backoff``) never waits longer than this by default.
RETRY_BACKOFF_MAX = 600.0

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*(?:\.\d+)?)\s*(s|sec|m|min|h|hour|d|day)?\s*$")
_PERIODS = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
            "hour": 3600.0, "d": 86400.0, "day": 86400.0}


def parse_rate(rate: Any) -> tuple[float, float]:
    """``"10/m"`` -> ``(10.0, 60.0)``: that many runs per that many seconds."""
    if not isinstance(rate, str):
        raise TypeError(f"rate_limit must be a string such as '10/m' or '2/s', not {rate!r}")
    match = _RATE.match(rate)
    if match is None:
        raise ValueError(f"rate_limit {rate!r} is not a rate: write COUNT/PERIOD, e.g. '10/m', "
                         "'2/s', '100/h' or '5/10s'")
    count, multiple, unit = float(match[1]), match[2], match[3]
    period = _PERIODS[unit] * (float(multiple) if multiple else 1.0)
    if not count > 0 or not period > 0:
        raise ValueError(f"rate_limit {rate!r} must allow a positive count per positive period")
    return count, period


def epoch(at: Any) -> float:
    """Seconds since the epoch of ``at``: an aware datetime, a naive one (local
    time, as ``datetime.timestamp`` reads it), or a number of seconds."""
    if isinstance(at, _dt.datetime):
        return at.timestamp()
    if isinstance(at, _dt.date):
        raise TypeError(f"at= needs a datetime, not the date {at!r} (which time of day?)")
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        return float(at)
    raise TypeError(f"at= must be a datetime or seconds since the epoch, not {at!r}")


def exception_names(retry_on: Any) -> list:
    """``"module.QualName"`` of each exception class in ``retry_on``."""
    classes = retry_on if isinstance(retry_on, (tuple, list, set, frozenset)) else (retry_on,)
    names = []
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"retry_on takes exception classes, such as (IOError, TimeoutError); "
                            f"{cls!r} is not one")
        names.append(f"{cls.__module__}.{cls.__qualname__}")
    return names


def task_options(retries: int = 0, timeout: Optional[float] = None, *,
                 retry_backoff: Optional[float] = None,
                 retry_backoff_max: Optional[float] = None,
                 retry_jitter: bool = True, retry_on: Any = None,
                 queue: Optional[str] = None, priority: int = 0,
                 resources: Any = None, delay: Optional[float] = None, at: Any = None,
                 unique: Optional[str] = None, rate_limit: Optional[str] = None) -> dict:
    """The metadata fields of a task's options (see :meth:`shoal.Client.submit`)."""
    options: dict = {}
    if retries:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, not {retries!r}")
        options["rty"] = retries
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        options["tmo"] = float(timeout)
    if retry_backoff is not None:
        if not isinstance(retry_backoff, (int, float)) or not retry_backoff >= 0:
            raise ValueError(f"retry_backoff must be a non-negative number of seconds, "
                             f"not {retry_backoff!r}")
        if not retries:
            raise ValueError("retry_backoff needs retries=N: how many times to try again")
        options["rb"] = float(retry_backoff)
        if retry_backoff_max is not None:
            if not isinstance(retry_backoff_max, (int, float)) or not retry_backoff_max > 0:
                raise ValueError(f"retry_backoff_max must be a positive number of seconds, "
                                 f"not {retry_backoff_max!r}")
            options["rbm"] = float(retry_backoff_max)
        if not retry_jitter:
            options["rj"] = 0
    elif retry_backoff_max is not None:
        raise ValueError("retry_backoff_max needs retry_backoff (the first delay, in seconds)")
    if retry_on is not None:
        if not retries:
            raise ValueError("retry_on needs retries=N: how many times to try again")
        options["ron"] = exception_names(retry_on)
    if queue is not None:
        if not isinstance(queue, str) or not queue or len(queue) > MAX_QUEUE_NAME:
            raise ValueError(f"queue must be a non-empty name, not {queue!r}")
        options["q"] = queue
    if priority:
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not -MAX_PRIORITY < priority < MAX_PRIORITY:
            raise ValueError(f"priority must be an integer (higher runs first), not {priority!r}")
        options["pr"] = priority
    if resources is not None:
        parsed = parse_resources(resources)
        if parsed:
            options["rs"] = parsed
    if delay is not None and at is not None:
        raise ValueError("give delay= (seconds from now) or at= (a time), not both")
    if delay is not None:
        if isinstance(delay, _dt.timedelta):
            delay = delay.total_seconds()
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
            raise ValueError(f"delay must be a non-negative number of seconds or a timedelta, "
                             f"not {delay!r}")
        if delay:
            options["dl"] = float(delay)  # counted from when the broker receives it
    if at is not None:
        options["at"] = epoch(at)
    if unique is not None:
        if not isinstance(unique, str) or not unique:
            raise ValueError(f"unique must be a non-empty string key, not {unique!r}")
        options["uq"] = unique
    if rate_limit is not None:
        options["rl"] = list(parse_rate(rate_limit))
    return options


def due_at(meta: dict, now: Optional[float] = None) -> Optional[float]:
    """When (epoch seconds) a unit may first run, if it was given a time."""
    if "at" in meta:
        return float(meta["at"])
    if "dl" in meta:
        return (time.time() if now is None else now) + float(meta["dl"])
    return None
