"""Kernels that come and go: no cluster process outlives its kernel; connect; stop."""
from __future__ import annotations

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from test_notebook import Kernel, cluster_pids, pids_gone  # noqa: E402


@pytest.mark.timeout(120)
def test_remote_without_a_cluster_starts_one_and_kernel_shutdown_stops_it(tmp_path):
    kernel = Kernel(tmp_path)
    try:
        reply = kernel.run("%load_ext shoal\n%remote 6 * 7", timeout=90)
        assert reply.value == 42
        assert "no cluster yet, starting a local one" in reply.stderr
        assert "started a local cluster" in reply.stdout
        pids = cluster_pids(kernel)
        assert len(pids) >= 2
    finally:
        kernel.shutdown()
    assert pids_gone(pids), "cluster processes outlived the kernel"


@pytest.mark.timeout(120)
def test_kernel_restart_and_kernel_kill_leave_no_process_behind(tmp_path):
    kernel = Kernel(tmp_path)
    try:
        kernel.run("%load_ext shoal\n%shoal start -n 1", timeout=90)
        first = cluster_pids(kernel)
        kernel.km.restart_kernel(now=False)      # the frontend's "restart kernel"
        kernel.kc.wait_for_ready(timeout=60)
        assert pids_gone(first), "a kernel restart left the old cluster running"
        kernel.run("%load_ext shoal\n%shoal start -n 1", timeout=90)
        second = cluster_pids(kernel)
    finally:
        kernel.shutdown(now=True)                # killed: no atexit runs in the kernel
    assert pids_gone(second), "a killed kernel's cluster outlived it"


@pytest.mark.timeout(120)
def test_connect_status_and_stop_against_a_running_cluster(tmp_path, cluster):
    kernel = Kernel(tmp_path)
    try:
        kernel.run("%load_ext shoal")
        reply = kernel.run(f"%shoal connect {cluster.connection_file}")
        assert f"connected to {cluster.address}: 2 workers" in reply.stdout
        assert kernel.run("import os\n%remote os.getpid()").value in {p.pid for p in
                                                                      cluster.workers}
        assert "local-1" in kernel.run("%shoal status").result["text/plain"]
        reply = kernel.run("%shoal stop\n'client' in globals()")
        assert f"disconnected from {cluster.address}" in reply.stdout
        assert reply.value is False
        assert cluster.status()["workers"] == 2   # a cluster not started here keeps running
        reply = kernel.run("%shoal stop")
        assert "nothing to stop" in reply.stdout
    finally:
        kernel.shutdown()


@pytest.mark.timeout(120)
def test_stop_ends_the_local_cluster_and_unbinds_its_names(tmp_path):
    kernel = Kernel(tmp_path)
    try:
        kernel.run("%load_ext shoal\n%shoal start -n 1\n%shoal start -n 2", timeout=90)
        pids = cluster_pids(kernel)
        assert len(pids) == 3   # scaled from one worker to two
        reply = kernel.run("%shoal stop\n'client' in globals(), 'cluster' in globals()")
        assert "stopped the local cluster" in reply.stdout
        assert reply.value == (False, False)
        assert pids_gone(pids)
        reply = kernel.run("%shoal status")
        assert "no cluster" in reply.stdout
    finally:
        kernel.shutdown()
