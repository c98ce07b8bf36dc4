"""The joblib backend: joblib's and scikit-learn's parallel loops on a shoal cluster."""
from __future__ import annotations

import os

import pytest

joblib = pytest.importorskip("joblib")

import shoal.joblib  # noqa: E402,F401  (registers the backend)
from shoal.joblib import ShoalBackend  # noqa: E402


def pid_and_square(x):
    return os.getpid(), x * x


def fails_on_three(x):
    if x == 3:
        raise KeyError(f"no {x}")
    return x


def nested(n):
    # A parallel loop inside a task runs sequentially on its worker.
    return sum(joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(n)))


@pytest.mark.timeout(60)
def test_parallel_config_runs_joblib_loops_on_the_workers(idle_client):
    with joblib.parallel_config(backend="shoal"):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(pid_and_square)(i) for i in range(40))
    assert [sq for _, sq in out] == [i * i for i in range(40)]
    pids = {pid for pid, _ in out}
    assert os.getpid() not in pids and len(pids) >= 1


@pytest.mark.timeout(60)
def test_errors_propagate_with_their_type(idle_client):
    with joblib.parallel_config(backend="shoal"):
        with pytest.raises(KeyError, match="no 3"):
            joblib.Parallel(n_jobs=2)(joblib.delayed(fails_on_three)(i) for i in range(8))


@pytest.mark.timeout(60)
def test_nested_loops_and_effective_n_jobs(idle_client):
    backend = ShoalBackend(client=idle_client)
    assert backend.effective_n_jobs(-1) == idle_client.slots == 2
    assert backend.effective_n_jobs(1) == 1
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)
    with joblib.parallel_config(backend="shoal", client=idle_client):
        assert joblib.Parallel()(joblib.delayed(nested)(n) for n in (3, 4)) == [3, 6]


@pytest.mark.timeout(120)
def test_scikit_learn_grid_search_runs_on_the_cluster(idle_client):
    pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    X, y = make_classification(n_samples=200, n_features=8, random_state=0)
    grid = {"C": [0.01, 0.1, 1.0, 10.0]}
    local = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3).fit(X, y)
    before = sum(w["done"] for w in idle_client.status()["worker_list"])
    with joblib.parallel_config(backend="shoal"):
        remote = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=-1).fit(X, y)
    after = sum(w["done"] for w in idle_client.status()["worker_list"])
    assert remote.best_params_ == local.best_params_
    assert list(remote.cv_results_["mean_test_score"]) == \
        pytest.approx(list(local.cv_results_["mean_test_score"]))
    assert after > before    # the fits ran as shoal tasks


def test_without_a_client_the_error_says_what_to_do(monkeypatch):
    import shoal.client
    monkeypatch.setattr(shoal.client, "get_client", lambda: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(RuntimeError, match="needs a shoal client"):
        ShoalBackend().effective_n_jobs(-1)
