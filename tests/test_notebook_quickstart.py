"""The demo notebook runs top to bottom under nbclient, and saves its progress widget's state."""
from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("sklearn")

from test_notebook import WIDGET_VIEW, kernel_env, pids_gone, write_kernel_spec  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def cell_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.timeout(240)
def test_quickstart_notebook_runs_and_saves_widget_state_and_text_fallbacks(tmp_path):
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Before the last cell (%shoal stop): note the cluster's pids, and let the
    # progress display send its final state while nbclient still listens.
    nb.cells.insert(len(nb.cells) - 1, nbformat.v4.new_code_cell(
        "import shoal.progress\n"
        "assert shoal.progress.wait_displays(60)\n"
        "[cluster.broker.pid] + [p.pid for p in cluster.workers]"))
    specs = KernelSpecManager(kernel_dirs=[str(write_kernel_spec(tmp_path))])
    km = KernelManager(kernel_name="shoal-test", kernel_spec_manager=specs)
    client = NotebookClient(nb, km=km, timeout=120, store_widget_state=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=kernel_env(tmp_path, SHOAL_PROGRESS="widget"))

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert errors == []
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.splitlines()[0] if c.source else "": c for c in code}

    assert "started a local cluster: 2 workers" in cell_text(by_source["%shoal start -n 2"])
    remote = next(c for c in code if c.source.startswith("%%remote\n"))
    assert "summing 1000 numbers in process" in cell_text(remote) and "999000" in cell_text(remote)
    assert "total = 499500" in cell_text(next(c for c in code if "total = {total}" in c.source))

    # The map's progress: a widget view plus text fallbacks showing the final state.
    map_cell = next(c for c in code if c.source.rstrip().endswith("\nres"))
    (display,) = [o for o in map_cell.outputs if o["output_type"] == "display_data"]
    assert WIDGET_VIEW in display["data"]
    assert "200/200" in display["data"]["text/plain"] and "1 failed" in display["data"]["text/plain"]
    assert "shoal-progress" in display["data"]["text/html"]
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    bars = [m["state"] for m in state.values() if m["model_name"] == "IntProgressModel"]
    assert any(b["value"] == b["max"] == 200 for b in bars)

    frame_cell = next(c for c in code if 'frame[frame.status == "error"]' in c.source)
    assert "seed 13 is unlucky" in frame_cell.outputs[0]["data"]["text/plain"]
    assert "'C':" in cell_text(next(c for c in code if "best_params_" in c.source))
    pids = eval(cell_text(nb.cells[-2]))
    assert "stopped the local cluster" in cell_text(nb.cells[-1])
    assert pids_gone(pids)
