"""The task executor: the same results in-process, on a local joblib pool and on a real Dask cluster,
after a worker dies, and the shared data sent once. The task functions are at module level: the
workers import them from `tests.test_executor`.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import LocalCluster

from cryptoml.features.spec import FEATURE_NAMES
from cryptoml.model.executor import (
    SCHEDULER_ENV,
    ExecutorError,
    ExecutorSettings,
    executor_settings,
    map_tasks,
    run_tasks,
)
from tests.webhook import unused_port

SMALL_MODEL = {name: {"n_estimators": 5, "max_depth": 3} for name in ("lightgbm", "xgboost", "random_forest")}
IN_PROCESS = ExecutorSettings(kind="local", workers=1)
LOCAL_POOL = ExecutorSettings(kind="local", workers=2)
WINDOWS = [(start, start + 100) for start in range(0, 300, 50)]

Shared = dict[str, np.ndarray]


def random_rows(rows: int, seed: int = 0) -> Shared:
    """Random features in FEATURE_NAMES order and 0/1 labels that depend on the first feature."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, len(FEATURE_NAMES)))
    labels = (features[:, 0] + rng.normal(size=rows) > 0).astype(np.int64)
    return {"features": features, "labels": labels}


# --- task functions (imported by the workers) ----------------------------------------------------


def seeded_projection(shared: Shared, window: tuple[int, int]) -> bytes:
    """A pure, seeded computation on one window of the rows, as raw bytes so equality is exact."""
    start, stop = window
    weights = np.random.default_rng(start).normal(size=len(FEATURE_NAMES))
    return (shared["features"][start:stop] @ weights).tobytes()


def fit_small_ensemble(shared: Shared, seed: int) -> tuple[bytes, str]:
    """Fit on the first 200 rows, predict the rest; the predictions' bytes and the saved model's hash."""
    # Imported here: the other tasks' workers then start without the model libraries (seconds per process).
    from cryptoml.model.ensemble import ProductionEnsemble

    frame = pd.DataFrame(shared["features"], columns=list(FEATURE_NAMES))
    model = ProductionEnsemble(model_params=SMALL_MODEL, random_state=seed, n_jobs=1)
    model.fit(frame.iloc[:200], shared["labels"][:200])
    with tempfile.TemporaryDirectory() as directory:
        model_hash = model.save(Path(directory))
    return model.predict_proba(frame.iloc[200:])[:, 1].tobytes(), model_hash


def projection_killing_its_worker_once(shared: Shared, task: tuple[tuple[int, int], str | None]) -> bytes:
    """Fault injection: the first run of the task that carries a marker path SIGKILLs its own worker process."""
    window, marker = task
    if marker is not None and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)  # other tasks are running on the other worker when the victim dies
    return seeded_projection(shared, window)


def refuse_odd_numbers(shared: Shared, task: int) -> int:
    if task % 2:
        raise ValueError(f"task {task} is odd")
    return task


def where_shared_lives(shared: Shared, task: int) -> tuple[int, int, str | None]:
    """The worker's pid, the id of the feature array it was given and the file it is mapped from, if any."""
    features = shared["features"]
    return os.getpid(), id(features), getattr(features, "filename", None)


# --- fixtures --------------------------------------------------------------------------------------


@contextmanager
def local_cluster(workers: int) -> Iterator[str]:
    """A real Dask cluster of single-thread worker processes, every port on the loopback interface; the scheduler's address."""
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """Two workers, shared by the module's tests."""
    with local_cluster(2) as address:
        yield address


@pytest.fixture(scope="module")
def dask_settings(scheduler: str) -> ExecutorSettings:
    return ExecutorSettings(kind="dask", scheduler=scheduler)




# --- same results everywhere -----------------------------------------------------------------------


def test_results_are_identical_in_process_on_a_local_pool_and_on_dask(dask_settings: ExecutorSettings) -> None:
    shared = random_rows(300)
    expected = [seeded_projection(shared, window) for window in WINDOWS]
    for settings in (IN_PROCESS, LOCAL_POOL, dask_settings):
        assert map_tasks(seeded_projection, shared, WINDOWS, settings, description="projection") == expected, settings


def test_an_ensemble_fit_gives_the_same_bytes_and_model_hash_locally_and_on_dask(dask_settings: ExecutorSettings) -> None:
    shared = random_rows(300)
    seeds = [1, 2]
    in_process = map_tasks(fit_small_ensemble, shared, seeds, IN_PROCESS, description="fit")
    assert len({model_hash for _, model_hash in in_process}) == len(seeds)  # the seed matters, so equality below means something
    assert map_tasks(fit_small_ensemble, shared, seeds, LOCAL_POOL, description="fit") == in_process
    assert map_tasks(fit_small_ensemble, shared, seeds, dask_settings, description="fit") == in_process


def test_an_empty_task_list_gives_no_results(dask_settings: ExecutorSettings) -> None:
    for settings in (IN_PROCESS, LOCAL_POOL, dask_settings):
        assert map_tasks(seeded_projection, random_rows(10), [], settings, description="nothing") == []


def test_a_failing_task_raises_its_own_error_on_every_executor(dask_settings: ExecutorSettings) -> None:
    for settings in (IN_PROCESS, LOCAL_POOL, dask_settings):
        with pytest.raises(ValueError, match="task 3 is odd"):
            map_tasks(refuse_odd_numbers, random_rows(10), [0, 2, 3, 4], settings, description="odd")


# --- data moves once -------------------------------------------------------------------------------


def test_dask_tasks_share_one_copy_of_the_data_per_worker(dask_settings: ExecutorSettings) -> None:
    shared = random_rows(50_000)  # 4.8 MB of features
    run = run_tasks(where_shared_lives, shared, list(range(20)), dask_settings, description="probe")
    arrays_per_worker: dict[int, set[int]] = {}
    for pid, array_id, _ in run.results:
        arrays_per_worker.setdefault(pid, set()).add(array_id)
    assert all(len(ids) == 1 for ids in arrays_per_worker.values()), arrays_per_worker
    assert run.transfer.shared_copies == 2 and run.transfer.shared_bytes > 5_000_000
    assert run.transfer.bytes_per_task < run.transfer.shared_bytes / 1000, run.transfer.describe()


def test_local_workers_map_the_data_from_one_file(caplog: pytest.LogCaptureFixture) -> None:
    shared = random_rows(50_000)
    with caplog.at_level(logging.INFO, logger="cryptoml"):
        run = run_tasks(where_shared_lives, shared, list(range(20)), LOCAL_POOL, description="probe")
    files = {filename for _, _, filename in run.results}
    assert len(files) == 1 and None not in files, files
    assert run.transfer.shared_copies == 1
    assert run.transfer.bytes_per_task < run.transfer.shared_bytes / 1000, run.transfer.describe()
    assert f"probe: 20 tasks on local, 2 processes; shared data {run.transfer.shared_bytes} bytes sent 1 time(s)" in caplog.text


def test_progress_is_logged_per_task_when_not_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cryptoml"):
        map_tasks(seeded_projection, random_rows(300), WINDOWS[:3], IN_PROCESS, description="projection")
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(",")[0] for line in lines[:3]] == [f"projection: {done}/3 done" for done in (1, 2, 3)]
    assert "ETA" in lines[0] and "elapsed" in lines[0]


# --- faults ------------------------------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("where", ["local pool", "dask"])
def test_a_task_whose_worker_is_killed_runs_again_with_the_same_results(
    where: str, dask_settings: ExecutorSettings, tmp_path: Path
) -> None:
    settings = LOCAL_POOL if where == "local pool" else dask_settings
    assert_same_results_when_a_worker_is_killed(settings, tmp_path / "killed")


@pytest.mark.fault
def test_tasks_are_resubmitted_when_the_only_worker_holding_the_data_is_killed(tmp_path: Path) -> None:
    with local_cluster(1) as address:
        assert_same_results_when_a_worker_is_killed(ExecutorSettings(kind="dask", scheduler=address), tmp_path / "killed")


def assert_same_results_when_a_worker_is_killed(settings: ExecutorSettings, marker: Path) -> None:
    shared = random_rows(300)
    expected = [seeded_projection(shared, window) for window in WINDOWS]
    tasks = [(window, str(marker) if number == 2 else None) for number, window in enumerate(WINDOWS)]
    assert map_tasks(projection_killing_its_worker_once, shared, tasks, settings, description="kill") == expected
    assert marker.exists()  # the victim did kill its worker


@pytest.mark.fault
def test_an_unreachable_scheduler_fails_at_once_naming_the_address() -> None:
    address = f"tcp://127.0.0.1:{unused_port()}"
    settings = ExecutorSettings(kind="dask", scheduler=address, connect_timeout=2.0)  # the default is 5 s
    # "At once": the connection gives up after settings.connect_timeout, which the error states (no wall clock here,
    # so a busy machine cannot fail the test).
    with pytest.raises(ExecutorError, match=rf"cannot reach the Dask scheduler at {address} .*{SCHEDULER_ENV}.* within 2 s"):
        map_tasks(seeded_projection, random_rows(10), WINDOWS, settings, description="never runs")


# --- settings ----------------------------------------------------------------------------------------


def test_the_environment_selects_dask_over_the_params(scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SCHEDULER_ENV, scheduler)
    settings = executor_settings("local", 2, None)
    assert settings == ExecutorSettings(kind="dask", workers=2, scheduler=scheduler)
    shared = random_rows(300)
    assert map_tasks(seeded_projection, shared, WINDOWS, settings, description="env") == [
        seeded_projection(shared, window) for window in WINDOWS
    ]


def test_without_the_environment_variable_the_params_decide() -> None:
    assert executor_settings("local", 3, None, environ={SCHEDULER_ENV: " "}) == ExecutorSettings(kind="local", workers=3)
    assert executor_settings("dask", None, "tcp://h:8786", environ={}).scheduler == "tcp://h:8786"


@pytest.mark.parametrize(
    ("kind", "workers", "scheduler", "message"),
    [
        ("threads", None, None, "executor.kind must be one of"),
        ("local", 0, None, "executor.workers must be a whole number >= 1"),
        ("dask", None, None, f"no scheduler address is given: set executor.scheduler or {SCHEDULER_ENV}"),
    ],
)
def test_invalid_settings_name_the_param(kind: str, workers: int | None, scheduler: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        executor_settings(kind, workers, scheduler, environ={})
