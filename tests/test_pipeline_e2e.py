"""Real `dvc repro` in a throw-away git repository: outputs, no-op reruns, clean status, clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cryptoml.features.manager import FEATURE_NAMES
from tests.repo import commit_all, copy_repo, make_repo, run, set_params

pytestmark = pytest.mark.e2e

# One month: too short for the default monthly walk-forward steps, so they are made 3 days long.
SHORT_WINDOW = {"data.start": "2024-01-01T00:00:00Z", "data.end": "2024-02-01T00:00:00Z", "retrain.every": "3D"}


@pytest.fixture(scope="module")
def repro_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("foundation"), SHORT_WINDOW)
    run(["dvc", "repro", "fetch", "features"], repo)
    return repo


def test_repro_writes_candles_features_and_data_metrics(repro_repo: Path) -> None:
    candles = pd.read_parquet(repro_repo / "data/raw/ohlcv.parquet")
    assert len(candles) == 31 * 24
    assert candles["timestamp"].iloc[0] == pd.Timestamp("2024-01-01T00:00:00Z")
    features = pd.read_parquet(repro_repo / "data/features.parquet")
    assert list(features.columns) == list(FEATURE_NAMES)
    assert features.index.name == "timestamp" and features.index[-1] == candles["timestamp"].iloc[-1]
    metrics = json.loads((repro_repo / "metrics/data.json").read_text())
    assert metrics["data"]["rows"] == len(candles) and metrics["data"]["source"] == "synthetic"


def test_second_repro_runs_nothing_and_tree_stays_clean(repro_repo: Path) -> None:
    commit_all(repro_repo, "pipeline outputs")
    rerun = run(["dvc", "repro", "fetch", "features"], repro_repo)
    assert "Running stage" not in rerun.stdout
    assert run(["dvc", "status", "-q", "fetch", "features"], repro_repo, check=False).returncode == 0
    assert run(["git", "status", "--porcelain"], repro_repo).stdout == ""


@pytest.mark.fault
def test_bad_csv_fails_the_stage_naming_the_line(repro_repo: Path, tmp_path: Path) -> None:
    repro_repo = copy_repo(repro_repo, tmp_path)  # dvc removes the stage's outputs before it runs
    csv = repro_repo / "data/external/candles.csv"
    csv.write_text(
        "timestamp,open,high,low,close,volume\n"
        "2024-01-01T00:00:00Z,100,101,99,100.5,10\n"
        "2024-01-01T01:00:00Z,100,101,99,oops,10\n"
    )
    set_params(repro_repo, {"data.source": "csv"})
    result = run(["dvc", "repro", "fetch"], repro_repo, check=False)
    assert result.returncode != 0
    assert "data/external/candles.csv: column 'close' must be numeric — line 3: 'oops'" in result.stderr + result.stdout
    assert not (repro_repo / "data/raw/ohlcv.parquet").exists()
