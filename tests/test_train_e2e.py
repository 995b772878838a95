"""The train stage under real dvc: deterministic reruns, provenance in the metadata, tamper refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cryptoml.model.ensemble import ArtifactError, ProductionEnsemble
from tests.repo import FAST_TRAINING, copy_repo, run

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def trained_repo(reproduced_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repo(reproduced_repo, tmp_path_factory.mktemp("train"))


def test_forced_reruns_leave_dvc_lock_unchanged_and_a_second_repro_runs_nothing(trained_repo: Path) -> None:
    """A forced rerun of every stage gives the original run's dvc.lock entries, and promote forced again its own.

    Only the forced run's promote stage differs from the original run's: production now has a champion (the same
    model), which the gate compares with through its stored predictions. Forcing promote once more shows that state
    is stable (the other stages' determinism is already shown against the original run).
    """
    original = (trained_repo / "dvc.lock").read_bytes()
    run(["dvc", "repro", "--force"], trained_repo)
    lock = (trained_repo / "dvc.lock").read_bytes()
    run(["dvc", "repro", "--force", "--single-item", "promote"], trained_repo)
    assert (trained_repo / "dvc.lock").read_bytes() == lock
    stages = {name: yaml.safe_load(text)["stages"] for name, text in (("original", original), ("forced", lock))}
    for stage in ("fetch", "features", "train", "evaluate"):
        assert stages["forced"][stage] == stages["original"][stage], stage
    promotion = json.loads((trained_repo / "metrics/promotion.json").read_text())
    assert promotion["decision"] == "promoted" and promotion["champion_sha256"] == promotion["challenger_sha256"]
    # Promoting the served model again keeps the version it replaced, not itself, as its previous version.
    metadata = json.loads((trained_repo / "models/production/production_model_metadata.json").read_text())
    assert metadata["version_control"]["previous_version"] is None
    assert "Running stage" not in run(["dvc", "repro"], trained_repo).stdout


def test_metadata_ties_the_model_to_its_commit_and_hash(trained_repo: Path) -> None:
    metadata = json.loads((trained_repo / "models/training/training_metadata.json").read_text())
    pipeline_commit = run(["git", "rev-list", "--max-parents=0", "HEAD"], trained_repo).stdout.strip()
    assert metadata["version_control"]["git_commit"] == pipeline_commit
    model = ProductionEnsemble.load(trained_repo / "models/training")
    assert metadata["version_control"]["model_hash"] == model.get_model_info()["model_sha256"]
    train_metrics = json.loads((trained_repo / "metrics/train.json").read_text())
    assert 0.0 < train_metrics["decision_threshold"] == model.decision_threshold < 1.0
    assert train_metrics["samples"]["train"] == metadata["training_info"]["samples_count"]


def test_the_production_model_is_trained_up_to_data_end(trained_repo: Path) -> None:
    """Fresh: its last training row lies within label.horizon bars of data.end (only unlabelled candles are left out)."""
    info = json.loads((trained_repo / "models/training/training_metadata.json").read_text())["training_info"]
    data_end, horizon = pd.Timestamp(FAST_TRAINING["data.end"]), info["label"]["horizon"]
    last_candle = data_end - pd.Timedelta(hours=1)
    assert pd.Timestamp(info["data_end"]) == last_candle - horizon * pd.Timedelta(hours=1)
    assert data_end - pd.Timestamp(info["data_end"]) <= (horizon + 1) * pd.Timedelta(hours=1)
    assert info["evaluation_start"] < info["evaluation_end"] == info["data_end"]


@pytest.mark.fault
def test_tampered_artifact_is_refused_and_dvc_notices(trained_repo: Path) -> None:
    manifest = json.loads((trained_repo / "models/training/ensemble.json").read_text())
    lightgbm_file = next(p for p in (trained_repo / "models/training").iterdir() if p.name.startswith("lightgbm"))
    original = lightgbm_file.read_bytes()
    lightgbm_file.write_bytes(original.replace(b"learning_rate", b"learning_ratf", 1))
    try:
        with pytest.raises(ArtifactError, match=lightgbm_file.name):
            ProductionEnsemble.load(trained_repo / "models/training")
        assert run(["dvc", "status", "-q"], trained_repo, check=False).returncode == 1
    finally:
        lightgbm_file.write_bytes(original)
    assert manifest == json.loads((trained_repo / "models/training/ensemble.json").read_text())
