"""The docs' examples run: every ```python block of docs/celery.md, in order, in
one namespace (as cells of a notebook), against a real local cluster.

A block whose first line is ``# file: NAME.py`` is written as that module (on the
path of this process and of the workers it starts) instead of being run.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO_DIR

pytestmark = pytest.mark.timeout(120)

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: str) -> list:
    return BLOCK.findall((Path(REPO_DIR) / "docs" / page).read_text())


def test_the_celery_page_has_an_example_for_each_concept():
    code = "\n".join(blocks("celery.md"))
    for name in ("shoal.chain", "shoal.group", "shoal.chord", "client.every", "retry_backoff",
                 "shoal.Retry", "queue=", "priority=", "rate_limit=", "client.lock", "unique=",
                 ".result(task_id", "@shoal.task", ".cancel()"):
        assert name in code, f"docs/celery.md shows no example of {name}"


def test_every_example_of_the_celery_page_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path),
                                                      os.environ.get("PYTHONPATH", "")]))
    namespace: dict = {"__name__": "__main__"}
    ran = 0
    try:
        for number, code in enumerate(blocks("celery.md"), 1):
            first = code.splitlines()[0] if code.strip() else ""
            match = re.match(r"#\s*file:\s*(\S+\.py)", first)
            if match:
                (tmp_path / match[1]).write_text(code)
                continue
            try:
                exec(compile(code, f"docs/celery.md block {number}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"docs/celery.md block {number} failed: {exc!r}\n{code}")
            ran += 1
    finally:
        cluster = namespace.get("cluster")
        if cluster is not None:
            cluster.close()
        sys.modules.pop("tasks", None)
    assert ran >= 10
