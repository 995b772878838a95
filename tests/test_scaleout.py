"""The train stage on a real Dask cluster: the same bytes as locally, after a worker dies, and a clear error
without output when the scheduler is unreachable; an interrupted stage started again gives the same outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster
from typer.testing import CliRunner

from cryptoml import paths
from cryptoml.cli import app
from cryptoml.config import load_params
from cryptoml.model.executor import SCHEDULER_ENV
from cryptoml.pipeline import run_evaluate, run_features, run_fetch, run_train
from tests.repo import BIN, COMMAND_TIMEOUT, FAST_TRAINING
from tests.test_cli import write_params
from tests.webhook import unused_port

STAGE_OUTPUTS = (paths.TRAINING_DIR, paths.TRAIN_METRICS, paths.EVALUATE_METRICS, paths.PLOTS_DIR)


def output_bytes() -> dict[str, bytes]:
    """Every file the train and evaluate stages write, by path."""
    found = {}
    for output in STAGE_OUTPUTS:
        for file in sorted(output.rglob("*")) if output.is_dir() else [output]:
            if file.is_file():
                found[file.as_posix()] = file.read_bytes()
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Candles and features of FAST_TRAINING's window; the train stage's outputs are made by each test."""
    root = tmp_path_factory.mktemp("scaleout")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        write_params(root, {**FAST_TRAINING, "executor.workers": 2})
        run_fetch(load_params(paths.PARAMS))
        run_features()
    return root


@pytest.fixture(scope="module")
def local_outputs(workspace: Path) -> dict[str, bytes]:
    """The outputs of train and evaluate with the local executor (two joblib processes)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        patch.delenv(SCHEDULER_ENV, raising=False)
        params = load_params(paths.PARAMS)
        run_train(params)
        run_evaluate(params)
        return output_bytes()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as running:
        yield running


def train_and_evaluate_on(address: str, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv(SCHEDULER_ENV, address)
    params = load_params(paths.PARAMS)
    run_train(params)
    run_evaluate(params)
    return output_bytes()


def test_the_walk_forward_on_dask_gives_the_local_predictions_metrics_and_model_bytes(
    workspace: Path, local_outputs: dict[str, bytes], cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_dask = train_and_evaluate_on(cluster.scheduler_address, workspace, monkeypatch)
    assert sorted(on_dask) == sorted(local_outputs)
    assert any("oos_predictions-" in name for name in on_dask)
    for name, data in local_outputs.items():
        assert on_dask[name] == data, name


def kill_a_busy_worker(address: str, killed: list[int]) -> None:
    """SIGKILL the first worker process seen running a fit."""
    with Client(address, set_as_default=False) as client:
        pids = client.run(os.getpid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = [worker for worker, tasks in client.processing().items() if tasks]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(pids[busy[0]])
                return
            time.sleep(0.02)


@pytest.mark.fault
def test_a_worker_killed_during_the_walk_forward_changes_no_output(
    workspace: Path, local_outputs: dict[str, bytes], cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_busy_worker, args=(cluster.scheduler_address, killed))
    killer.start()
    try:
        on_dask = train_and_evaluate_on(cluster.scheduler_address, workspace, monkeypatch)
    finally:
        killer.join()
    assert killed, "no worker was seen running a fit"
    assert on_dask == local_outputs


@pytest.mark.fault
def test_an_unreachable_scheduler_fails_at_once_naming_it_and_writes_nothing(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    address = f"tcp://127.0.0.1:{unused_port()}"
    monkeypatch.setenv(SCHEDULER_ENV, address)
    before = output_bytes()
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    # At once: after the executor's connect timeout (5 s by default), which the error states.
    assert f"cannot reach the Dask scheduler at {address}" in result.output and "within 5 s" in result.output
    assert output_bytes() == before


@pytest.mark.fault
def test_a_train_stage_killed_half_way_and_started_again_gives_the_same_outputs(
    workspace: Path, local_outputs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    command = [str(BIN / "cryptoml"), "train"]
    stage = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Killed once the fits are under way (their progress lines), before the stage writes its outputs.
    assert stage.stderr is not None
    for line in stage.stderr:
        if "model fits: 1/" in line:
            break
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait()
    subprocess.run(command, check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
    run_evaluate(load_params(paths.PARAMS))
    assert output_bytes() == local_outputs
