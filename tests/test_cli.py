"""The CLI in-process: stages write their outputs, and bad input exits 1 with one clear line and no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cryptoml import paths
from cryptoml.cli import app
from tests.repo import FAST_TRAINING, REPO_ROOT

runner = CliRunner()


def write_params(directory: Path, changes: dict[str, object]) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, FAST_TRAINING)
    return tmp_path


def test_fetch_features_train_write_their_outputs(workdir: Path) -> None:
    for command in ("fetch", "features", "train"):
        result = runner.invoke(app, [command])
        assert result.exit_code == 0, result.output
    assert json.loads(paths.DATA_METRICS.read_text())["data"]["rows"] == 91 * 24
    assert paths.FEATURES.exists() and (paths.TRAINING_DIR / "ensemble.json").exists()
    assert json.loads(paths.TRAIN_METRICS.read_text())["samples"]["train"] > 0


@pytest.mark.fault
def test_invalid_params_exit_1_naming_the_key_and_write_nothing(workdir: Path) -> None:
    write_params(workdir, {**FAST_TRAINING, "data.timeframe": "7x"})
    result = runner.invoke(app, ["fetch"])
    assert result.exit_code == 1
    assert "data.timeframe" in result.output
    assert not paths.RAW_CANDLES.exists() and not paths.DATA_METRICS.exists()


@pytest.mark.fault
def test_bad_csv_exits_1_naming_file_and_line(workdir: Path) -> None:
    csv = workdir / "candles.csv"
    csv.write_text("timestamp,open,high,low,close,volume\n2024-01-01T00:00:00Z,1,2,0.5,1,-3\n")
    write_params(workdir, {**FAST_TRAINING, "data.source": "csv", "data.csv.path": str(csv)})
    result = runner.invoke(app, ["fetch"])
    assert result.exit_code == 1
    assert f"{csv}: volume must be >= 0 — line 2" in result.output
    assert not paths.RAW_CANDLES.exists()


@pytest.mark.fault
def test_stage_without_its_input_says_what_to_run(workdir: Path) -> None:
    result = runner.invoke(app, ["features"])
    assert result.exit_code == 1
    assert "run `cryptoml fetch`" in result.output
