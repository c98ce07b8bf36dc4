"""Named tasks the tests send by name (workers load this with --import named_tasks)."""
import os

import shoal


@shoal.task
def double(x):
    return 2 * x


@shoal.task(name="named.flaky", retries=2)
def flaky(path):
    """Fails twice (counted in ``path``), then returns how many tries it took."""
    tries = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as fh:
        fh.write(str(tries + 1))
    if tries < 2:
        raise OSError(f"try {tries}")
    return tries + 1


@shoal.task
def describe(value):
    return type(value).__name__, repr(value)[:80]


@shoal.task
def pid():
    return os.getpid()
