"""The notebook layer in real Jupyter kernels: %shoal, %%remote, progress displays, frames.

One kernel (with the extension loaded and a two-worker cluster started) is
shared by the tests of this module; each test runs cells in it through
jupyter_client and asserts on the messages the kernel publishes, as a
frontend would see them.  The kernel harness here is also used by
test_notebook_lifecycle.py.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from shoal.magics import cell_names  # noqa: E402

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


# ----------------------------------------------------------------- kernel harness
@dataclass
class Reply:
    """What one executed cell published, in order, as nbformat-like dicts."""

    status: str = ""
    outputs: list = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def streams(self, name: str) -> str:
        return "".join(o["text"] for o in self.outputs
                       if o["output_type"] == "stream" and o["name"] == name)

    @property
    def stdout(self) -> str:
        return self.streams("stdout")

    @property
    def stderr(self) -> str:
        return self.streams("stderr")

    @property
    def error(self) -> Optional[dict]:
        return next((o for o in self.outputs if o["output_type"] == "error"), None)

    @property
    def result(self) -> Optional[dict]:
        """The execute_result's data (Out[n]), or None."""
        return next((o["data"] for o in self.outputs if o["output_type"] == "execute_result"),
                    None)

    @property
    def value(self) -> Any:
        """The text/plain of Out[n] evaluated as a Python literal."""
        assert self.result is not None, f"no Out[n]; outputs: {self.outputs}"
        return ast.literal_eval(self.result["text/plain"])

    def displays(self) -> list:
        return [o for o in self.outputs if o["output_type"] == "display_data"]


def write_kernel_spec(directory: Path) -> Path:
    """A kernelspec for this interpreter, so tests never pick another Python's kernel."""
    spec = directory / "kernels" / "shoal-test"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "shoal test", "language": "python"}))
    return directory / "kernels"


def kernel_env(tmp: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("CI", None)               # each test says which progress mode it wants
    env.pop("SHOAL_PROGRESS", None)
    env["IPYTHONDIR"] = str(tmp / "ipython")   # no user profile or startup files
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    env.update(extra)
    return env


class Kernel:
    """A real IPython kernel driven over jupyter_client, as a frontend drives it."""

    def __init__(self, tmp: Path, env: Optional[dict] = None) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager
        specs = KernelSpecManager(kernel_dirs=[str(write_kernel_spec(tmp))])
        self.km = KernelManager(kernel_name="shoal-test", kernel_spec_manager=specs)
        self.km.start_kernel(env=env or kernel_env(tmp), cwd=str(tmp))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.comms: dict = {}              # comm id -> latest widget state
        self.comm_updates: dict = {}       # comm id -> times a state update arrived
        self.display_updates: dict = {}    # display id -> data of its latest update
        self.late_streams: dict = {}       # parent msg id -> stream text, whenever it came

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def _note(self, msg: dict) -> None:
        """Record what any message says about widgets or displays, whatever its parent."""
        kind, content = msg["msg_type"], msg["content"]
        if kind in ("comm_open", "comm_msg"):
            state = content.get("data", {}).get("state")
            if state:
                self.comms.setdefault(content["comm_id"], {}).update(state)
                self.comm_updates.setdefault(content["comm_id"], []).append(time.monotonic())
        elif kind == "update_display_data":
            display_id = content.get("transient", {}).get("display_id")
            self.display_updates[display_id] = content["data"]
        elif kind == "stream":
            parent = msg["parent_header"].get("msg_id")
            self.late_streams[parent] = self.late_streams.get(parent, "") + content["text"]

    def start(self, code: str, allow_stdin: bool = True) -> str:
        return self.kc.execute(code, allow_stdin=allow_stdin)

    def collect(self, msg_id: str, timeout: float = 60.0,
                until: Optional[Callable[[Reply], bool]] = None,
                reply: Optional[Reply] = None) -> Reply:
        """Read this cell's messages until it is idle (or ``until(reply)`` holds)."""
        reply = reply or Reply(started=time.monotonic())
        deadline = time.monotonic() + timeout
        while True:
            if until is not None and until(reply):
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"cell did not finish within {timeout:g} s; so far: {reply.outputs}")
            try:
                msg = self.kc.get_iopub_msg(timeout=remaining)
            except Exception:  # queue.Empty: loop to report the timeout
                continue
            self._note(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                reply.ended = time.monotonic()
                shell = self.kc.get_shell_msg(timeout=10)
                while shell["parent_header"].get("msg_id") != msg_id:
                    shell = self.kc.get_shell_msg(timeout=10)
                reply.status = shell["content"]["status"]
                return reply
            if kind == "stream":
                reply.outputs.append({"output_type": "stream", "name": content["name"],
                                      "text": content["text"], "at": time.monotonic()})
            elif kind in ("execute_result", "display_data", "update_display_data"):
                reply.outputs.append({"output_type": kind, "data": content["data"],
                                      "display_id": content.get("transient", {}).get("display_id")})
            elif kind == "error":
                reply.outputs.append({"output_type": "error", "ename": content["ename"],
                                      "evalue": content["evalue"],
                                      "traceback": "\n".join(content["traceback"])})

    def run(self, code: str, timeout: float = 60.0, allow_stdin: bool = True,
            check: bool = True) -> Reply:
        """Execute a cell and return what it published; fail on an error unless ``check=False``."""
        reply = self.collect(self.start(textwrap.dedent(code), allow_stdin), timeout)
        if check and reply.status != "ok":
            pytest.fail(f"cell failed: {reply.error or reply.outputs}\n{code}")
        return reply

    def shutdown(self, now: bool = False) -> None:
        try:
            self.kc.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=now)


def usage_error(reply: Reply) -> str:
    """IPython shows a UsageError as a line on stderr, not as an error output."""
    assert reply.error is None or reply.error["ename"] == "UsageError", reply.error
    return reply.stderr if reply.error is None else reply.error["evalue"]


def pids_gone(pids, timeout: float = 15.0) -> bool:
    """Poll (with a deadline) until none of ``pids`` is a live process."""
    import psutil
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling with a deadline


def cluster_pids(kernel: Kernel) -> list:
    """The broker and worker pids of the kernel's local cluster."""
    return kernel.run("[cluster.broker.pid] + [p.pid for p in cluster.workers]").value


# ----------------------------------------------------------------- the shared kernel
@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernel")
    k = Kernel(tmp)
    k.run("""
        %load_ext shoal
        %shoal start -n 2
        import os, shoal
        def square(x):
            if x == 13:
                raise ValueError("thirteen is unlucky")
            return x * x
    """, timeout=90)
    pids = cluster_pids(k)
    yield k
    k.shutdown()
    assert pids_gone(pids), "the kernel's cluster outlived the kernel"


@pytest.fixture
def gate(tmp_path):
    path = tmp_path / "gate"
    yield path
    path.touch()  # never leave a remote cell waiting


# ----------------------------------------------------------------- free-name analysis
@pytest.mark.parametrize("code, free, bound", [
    ("total = sum(data)\ntotal * 2", ["data", "sum"], ["total"]),
    ("x = x + 1", ["x"], ["x"]),
    ("import numpy as np\nnp.zeros(n)", ["n"], ["np"]),
    ("def f(a):\n    return a + offset\ny = f(1)", ["offset"], ["f", "y"]),
    ("ys = [x * k for x in xs]", ["k", "xs"], ["ys"]),
    ("if flag:\n    v = 1\nprint(v)", ["flag", "print", "v"], ["v"]),
    ("for i in range(3):\n    acc += i", ["acc", "range"], ["i", "acc"]),
    ("class A:\n    size = width\n    def m(self):\n        return self.size", ["width"], ["A"]),
    ("def g():\n    global counter\n    counter = 1\ng()", [], ["g", "counter"]),
    ("lam = lambda q: q + z", ["z"], ["lam"]),
    ("with open(p) as fh:\n    text = fh.read()", ["open", "p"], ["fh", "text"]),
    ("try:\n    1/0\nexcept ZeroDivisionError as e:\n    err = e",
     ["ZeroDivisionError"], ["e", "err"]),
])
def test_cell_names_finds_free_and_bound_names(code, free, bound):
    names = cell_names(ast.parse(code))
    assert sorted(names.free) == sorted(free)
    assert names.bound == bound


# ----------------------------------------------------------------- %shoal
@pytest.mark.timeout(60)
def test_start_binds_client_and_cluster_and_status_shows_a_table_of_workers(kernel):
    reply = kernel.run("type(client).__name__, type(cluster).__name__, "
                       "shoal.get_client() is client")
    assert reply.value == ("Client", "Cluster", True)
    status = kernel.run("%shoal status").result
    assert "local-1" in status["text/plain"] and "local-2" in status["text/plain"]
    assert "<table>" in status["text/html"] and "<td>local-2</td>" in status["text/html"]


@pytest.mark.timeout(60)
def test_start_again_reports_the_running_cluster(kernel):
    reply = kernel.run("%shoal start")
    assert "already running: 2 workers" in reply.stdout


@pytest.mark.timeout(60)
def test_shoal_without_a_command_prints_usage_and_unknown_command_is_a_usage_error(kernel):
    assert "%shoal start" in kernel.run("%shoal").stdout
    reply = kernel.run("%shoal frobnicate", check=False)
    assert reply.status == "error" and "unknown command 'frobnicate'" in usage_error(reply)


# ----------------------------------------------------------------- %%remote
@pytest.mark.timeout(60)
def test_remote_ships_free_names_pulls_bound_names_and_shows_the_last_expression(kernel):
    kernel.run("data = [1, 2, 3]; total = None")
    reply = kernel.run("""
        %%remote
        import os
        total = sum(data)
        print("sum is", total)
        pid = os.getpid()
        total * 2
    """)
    assert reply.stdout == "sum is 6\n"
    assert reply.value == 12
    here = kernel.run("total, pid != os.getpid(), pid in [p.pid for p in cluster.workers], _")
    here = here.value
    assert here == (6, True, True, 12)


@pytest.mark.timeout(60)
def test_remote_final_value_uses_rich_display(kernel):
    reply = kernel.run("""
        %%remote
        import pandas as pd
        pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    """)
    assert "<table" in reply.result["text/html"]
    assert kernel.run("type(df := _).__name__, list(df.a)").value == ("DataFrame", [1, 2])


@pytest.mark.timeout(60)
def test_remote_cell_without_a_final_expression_or_ending_in_semicolon_shows_nothing(kernel):
    assert kernel.run("%%remote\nquiet = 5").result is None
    assert kernel.run("%%remote\nquiet + 1;").result is None
    assert kernel.run("quiet").value == 5


@pytest.mark.timeout(60)
def test_remote_exception_shows_the_remote_traceback_at_the_cells_own_lines(kernel):
    reply = kernel.run("""
        %%remote
        def inner(d):
            return 1 / d
        inner(0)
    """, check=False)
    assert reply.status == "error"
    err = reply.error
    assert err["ename"] == "ZeroDivisionError"
    tb = err["traceback"]
    assert "on worker" in tb and "local-" in tb
    # line 1 of the cell is %%remote: inner(0) is line 4, the division line 3
    assert 'line 4, in <module>' in tb and "inner(0)" in tb
    assert 'line 3, in inner' in tb and "return 1 / d" in tb
    assert "shoal/magics.py" not in tb and "worker.py" not in tb


@pytest.mark.timeout(60)
def test_remote_syntax_error_is_reported_without_running(kernel):
    reply = kernel.run("%%remote\nx = (1,\n", check=False)
    assert reply.status == "error" and reply.error["ename"] == "SyntaxError"


@pytest.mark.timeout(60)
def test_no_pull_brings_nothing_back_and_pull_narrows(kernel):
    kernel.run("for name in ('np1', 'np2', 'np3'): globals().pop(name, None)")
    kernel.run("%%remote --no-pull\nnp1 = 1")
    kernel.run("%%remote --pull np3\nnp2 = 2\nnp3 = 3")
    assert kernel.run("[n in globals() for n in ('np1', 'np2', 'np3')], np3").value == \
        ([False, False, True], 3)


@pytest.mark.timeout(60)
def test_unpicklable_names_stay_on_the_worker_with_a_note(kernel):
    reply = kernel.run("%%remote\nimport threading\nlock = threading.Lock()\nkept_ok = 1")
    assert "`lock` cannot be pickled" in reply.stderr
    assert kernel.run("kept_ok").value == 1


@pytest.mark.timeout(60)
def test_worker_flag_runs_on_the_named_worker_and_unknown_names_fail_clearly(kernel):
    pids = kernel.run("%remote --all os.getpid()").value
    assert set(pids) == {"local-1", "local-2"} and len(set(pids.values())) == 2
    for name in ("local-1", "local-2"):
        assert kernel.run(f"%remote --worker {name} os.getpid()").value == pids[name]
    reply = kernel.run("%%remote --worker nosuch\n1", check=False)
    assert reply.status == "error"
    assert "nosuch" in reply.error["traceback"] and "local-1" in reply.error["traceback"]


@pytest.mark.timeout(60)
def test_all_runs_on_every_worker_labels_output_and_worker_namespaces_persist(kernel):
    reply = kernel.run("""
        %%remote --all
        import os
        setup_pid = os.getpid()
        print("ready")
    """)
    assert sorted(reply.stdout.splitlines()) == ["[local-1] ready", "[local-2] ready"]
    assert kernel.run("'setup_pid' in globals()").value is False  # set-up state stays remote
    values = kernel.run("%remote --all setup_pid == os.getpid()").value
    assert values == {"local-1": True, "local-2": True}
    pulled = kernel.run("%%remote --all --pull setup_pid\nsetup_pid += 0").stdout
    assert pulled == ""
    assert kernel.run("sorted(setup_pid)").value == ["local-1", "local-2"]


@pytest.mark.timeout(60)
def test_async_returns_a_future_bound_to_underscore_or_to_a_name(kernel):
    reply = kernel.run("%%remote --async\nasync_value = 40 + 2\nasync_value")
    assert "shoal.Future" in reply.result["text/plain"]
    assert kernel.run("_.result(30)").value == 42
    kernel.run("%%remote --async --to fut\nprint('from async')\nlater = 7\nlater * 6")
    assert kernel.run("fut.result(30), fut.stdout").value == (42, "from async\n")
    assert kernel.run("fut.result(30); later").value == 7  # pulled when it finished


@pytest.mark.timeout(60)
def test_async_output_lands_in_the_cell_that_started_it(kernel, gate):
    started = kernel.start("%%remote --async --to bg\n" + gate_loop(gate, "begun") +
                           "print('finished')")
    kernel.collect(started)
    gate.touch()
    reply = kernel.run("print('other cell'); bg.result(30)")
    kernel.run("pass")   # output written just before bg finished has surely arrived by now
    assert reply.stdout == "other cell\n"
    assert kernel.late_streams[started] == "begun\nfinished\n"


@pytest.mark.timeout(60)
def test_async_errors_are_raised_by_the_future(kernel):
    kernel.run("%%remote --async --to bad\nraise KeyError('gone')")
    reply = kernel.run("bad.result(30)", check=False)
    assert reply.error["ename"] == "KeyError"
    assert "raise KeyError('gone')" in reply.error["traceback"]


@pytest.mark.timeout(60)
def test_timeout_gives_up_with_a_clear_error(kernel, gate):
    reply = kernel.run(f"""
        %%remote --timeout 0.5
        import os, time
        deadline = time.monotonic() + 30
        while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
    """, check=False)
    assert reply.status == "error"
    assert reply.error["ename"] == "RemoteCellTimeout", reply.error["traceback"]
    assert "did not finish within 0.5 s" in reply.error["evalue"]


@pytest.mark.timeout(60)
def test_line_form_runs_an_expression_or_a_statement(kernel):
    assert kernel.run("%remote 6 * 7").value == 42
    kernel.run("%remote line_bound = 'yes'")
    assert kernel.run("line_bound").value == "yes"
    reply = kernel.run("%remote", check=False)
    assert reply.status == "error" and "needs code" in usage_error(reply)


@pytest.mark.timeout(60)
def test_remote_help_and_bad_flags(kernel):
    assert "--worker NAME" in kernel.run("%%remote --help\n1").stdout + \
        kernel.run("%%remote --help\n1").stderr
    reply = kernel.run("%%remote --all --worker local-1\n1", check=False)
    assert reply.status == "error" and "not both" in usage_error(reply)


# ----------------------------------------------------------------- progress
def widget_models(kernel: Kernel, model_ids=None) -> dict:
    return {cid: s for cid, s in kernel.comms.items() if model_ids is None or cid in model_ids}


def children_of(kernel: Kernel, model_id: str) -> list:
    """All widget states under a container model, depth first."""
    out = []
    state = kernel.comms.get(model_id, {})
    out.append(state)
    for child in state.get("children", []):
        out.extend(children_of(kernel, child.replace("IPY_MODEL_", "")))
    return out


@pytest.mark.timeout(90)
def test_map_displays_a_live_widget_that_reaches_100_percent_with_a_text_fallback(kernel):
    kernel.run("os.environ['SHOAL_PROGRESS'] = 'widget'")
    try:
        reply = kernel.run("res = client.map(square, range(40), batch_size=3)\nres")
        (display,) = reply.displays()
        data = display["data"]
        assert WIDGET_VIEW in data and "text/plain" in data and "text/html" in data
        model_id = data[WIDGET_VIEW]["model_id"]
        assert kernel.run("shoal.progress.wait_displays(30)").value is True
    finally:
        kernel.run("os.environ.pop('SHOAL_PROGRESS', None)")
    states = children_of(kernel, model_id)
    (bar,) = [s for s in states if s.get("_model_name") == "IntProgressModel"]
    assert bar["max"] == 40 and bar["value"] == 40
    assert bar["bar_style"] == "danger"  # item 13 failed
    html = " ".join(s.get("value", "") for s in states if s.get("_model_name") == "HTMLModel")
    assert "39 done" in html and "1 failed" in html
    assert "thirteen is unlucky" in html and "<details>" in html   # traceback on click
    assert "local-1" in html or "local-2" in html                  # per-worker breakdown
    final = kernel.display_updates[display["display_id"]]
    assert "40/40" in final["text/plain"] and "1 failed" in final["text/plain"]
    assert "shoal-progress" in final["text/html"] and WIDGET_VIEW in final


@pytest.mark.timeout(60)
def test_widget_updates_at_most_about_ten_times_a_second_while_other_cells_run(kernel):
    kernel.run("os.environ['SHOAL_PROGRESS'] = 'widget'")
    try:
        reply = kernel.run("""
            import time
            def nap(x):
                time.sleep(0.004)
                return x
            slow = client.map(nap, range(300), batch_size=1)
            slow
        """)
        model_id = reply.displays()[0]["data"][WIDGET_VIEW]["model_id"]
        # The kernel is busy in this cell while the display keeps updating.
        kernel.run("slow.wait(60); assert shoal.progress.wait_displays(30)")
    finally:
        kernel.run("os.environ.pop('SHOAL_PROGRESS', None)")
    (bar_id,) = [cid for cid, s in kernel.comms.items()
                 if s.get("_model_name") == "IntProgressModel"
                 and "IPY_MODEL_" + cid in str(children_of(kernel, model_id))]
    assert kernel.comms[bar_id]["value"] == 300
    times = kernel.comm_updates[bar_id]
    span = times[-1] - times[0]
    assert len(times) >= 3                       # it moved while the map ran
    assert len(times) <= 12 * span + 3           # throttled: about ten a second


@pytest.mark.timeout(60)
def test_progress_false_displays_only_the_repr(kernel):
    reply = kernel.run("quiet_res = client.map(square, range(5), progress=False)\n"
                       "quiet_res.wait(30)\nquiet_res")
    assert not reply.displays() or WIDGET_VIEW not in reply.displays()[0]["data"]
    text = reply.displays()[0]["data"]["text/plain"] if reply.displays() else reply.stdout
    assert "shoal.MapResult" in text


@pytest.mark.timeout(60)
def test_where_no_one_watches_a_map_prints_one_summary_line(kernel):
    # nbconvert and papermill run cells without stdin; SHOAL_PROGRESS=0 asks the same
    reply = kernel.run("summary_res = client.map(square, range(20))\nsummary_res",
                       allow_stdin=False)
    assert reply.displays() == [] and reply.result is None
    assert reply.stdout.count("\n") == 1
    assert reply.stdout.startswith("square: 19/20 done, 1 failed in ")
    kernel.run("os.environ['SHOAL_PROGRESS'] = '0'")
    try:
        reply = kernel.run("client.map(square, range(5))")
    finally:
        kernel.run("os.environ.pop('SHOAL_PROGRESS', None)")
    assert reply.stdout.startswith("square: 5/5 done in ") and reply.displays() == []


@pytest.mark.timeout(60)
def test_a_list_of_futures_displays_progress_too(kernel):
    kernel.run("os.environ['SHOAL_PROGRESS'] = 'html'")
    try:
        reply = kernel.run("futs = [client.submit(square, i) for i in range(6)]\nfuts")
        assert kernel.run("shoal.progress.wait_displays(30)").value is True
    finally:
        kernel.run("os.environ.pop('SHOAL_PROGRESS', None)")
    (display,) = reply.displays()
    assert "shoal-progress" in display["data"]["text/html"]
    assert "shoal futures" in reply.result["text/plain"]
    final = kernel.display_updates[display["display_id"]]
    assert "6/6" in final["text/plain"]
    assert kernel.run("[1, 2]").value == [1, 2]    # other lists display as before


# ----------------------------------------------------------------- frames
@pytest.mark.timeout(60)
def test_to_frame_and_sweep_render_as_tables(kernel):
    reply = kernel.run("""
        res2 = client.map(square, range(15), progress=False)
        res2.wait(30)
        frame = res2.to_frame()
        (list(frame.columns), int((frame.status == 'error').sum()), frame.loc[13, 'error'])
    """)
    assert reply.value == (["input", "result", "status", "error", "worker", "started",
                            "duration"], 1, "ValueError: thirteen is unlucky")
    reply = kernel.run("""
        def simulate(alpha, seed):
            return {"score": alpha * seed, "seed_sq": seed * seed}
        os.environ['SHOAL_PROGRESS'] = '0'
        try:
            df = client.sweep(simulate, alpha=[0.1, 0.5], seed=range(3))
        finally:
            os.environ.pop('SHOAL_PROGRESS')
        df
    """)
    assert reply.stdout.startswith("simulate: 6/6 done")
    assert "<table" in reply.result["text/html"] and "score" in reply.result["text/html"]
    assert kernel.run("list(df.columns[:4]), len(df)").value == (
        ["alpha", "seed", "score", "seed_sq"], 6)


# ----------------------------------------------------------------- streaming and Ctrl-C
def gate_loop(gate: Path, before: str = "") -> str:
    """Remote cell code that prints ``before`` then waits (at most 30 s) for the gate file."""
    return textwrap.dedent(f"""\
        import os, time
        print({before!r}, flush=True)
        limit = time.monotonic() + 30
        while not os.path.exists({str(gate)!r}) and time.monotonic() < limit:
            time.sleep(0.01)
    """)


@pytest.mark.timeout(60)
def test_remote_output_streams_into_the_cell_while_it_runs(kernel, gate):
    msg_id = kernel.start("%%remote\n" + gate_loop(gate, "first") + "print('second')\n'end'")
    reply = kernel.collect(msg_id, until=lambda r: "first" in r.stdout)
    assert reply.ended == 0.0, "the cell ended before its first line arrived"
    gate.touch()
    reply = kernel.collect(msg_id, reply=reply)
    assert reply.status == "ok"
    assert reply.stdout == "first\nsecond\n" and reply.value == "end"


@pytest.mark.timeout(60)
def test_all_streams_output_labelled_by_worker(kernel, gate):
    msg_id = kernel.start("%%remote --all\n" + gate_loop(gate, "up"))
    reply = kernel.collect(msg_id, until=lambda r: r.stdout.count("up") == 2)
    assert sorted(reply.stdout.splitlines()) == ["[local-1] up", "[local-2] up"]
    gate.touch()
    assert kernel.collect(msg_id, reply=reply).status == "ok"


@pytest.mark.timeout(60)
def test_interrupting_the_kernel_cancels_the_remote_run(kernel, gate):
    msg_id = kernel.start("%%remote --worker local-1\n" + gate_loop(gate, "waiting"))
    reply = kernel.collect(msg_id, until=lambda r: "waiting" in r.stdout)
    kernel.km.interrupt_kernel()
    reply = kernel.collect(msg_id, reply=reply, timeout=20)
    assert reply.status == "error" and reply.error["ename"] == "KeyboardInterrupt"
    assert "cancelled the remote run on local-1" in reply.stderr
    # The gate never opened, yet local-1 is free at once: its run was stopped.
    started = time.monotonic()
    assert kernel.run("%remote --worker local-1 1 + 1", timeout=20).value == 2
    assert time.monotonic() - started < 10
