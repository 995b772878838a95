"""Threshold rule, cross-validation, the final fit and the metrics/metadata they produce."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import matthews_corrcoef

from cryptoml.features import FEATURE_NAMES
from cryptoml.labels import build_dataset, walk_forward_splits
from cryptoml.training import (
    ENSEMBLE,
    THRESHOLD_QUANTILES,
    TrainingResult,
    TrainingSettings,
    build_training_metadata,
    choose_threshold,
    cross_validate,
    mcc_at_thresholds,
    run_training,
    score,
    train_final,
)

SMALL_MODELS = {name: {"n_estimators": 15} for name in ("lightgbm", "xgboost", "random_forest")}
SEED = 3


def settings(**overrides: Any) -> TrainingSettings:
    values: dict[str, Any] = {
        "horizon": 1,
        "threshold": 0.003,
        "holdout": 0.2,
        "embargo": 5,
        "n_splits": 3,
        "weights": None,
        "model_params": SMALL_MODELS,
        "random_state": SEED,
        "n_jobs": 1,
    }
    return TrainingSettings(**(values | overrides))


def learnable_candles(n_rows: int, seed: int = SEED) -> tuple[pd.DataFrame, pd.Series]:
    """A random-walk close and 12 noise features, one of which is a noisy copy of the *next* return.

    The leaked column makes the label learnable, so the tests can tell a working pipeline (clear
    out-of-sample skill) from a broken one (none); it has no place outside a test.
    """
    rng = np.random.default_rng(seed)
    index = pd.date_range("2024-01-01", periods=n_rows, freq="h", tz="UTC", name="timestamp")
    close = pd.Series(1e7 * np.exp(np.cumsum(rng.normal(0.0, 0.005, n_rows))), index=index, name="close")
    features = pd.DataFrame(rng.normal(size=(n_rows, len(FEATURE_NAMES))), index=index, columns=list(FEATURE_NAMES))
    next_return = close.shift(-1) / close - 1.0
    features["returns_1"] = next_return + rng.normal(0.0, 0.003, n_rows)
    return features.iloc[50:], close  # as if 50 warm-up rows had been dropped


def float_leaves(tree: Any) -> Iterator[float]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from float_leaves(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from float_leaves(value)
    elif isinstance(tree, float):
        yield tree


@pytest.fixture(scope="module")
def trained() -> TrainingResult:
    features, close = learnable_candles(1500)
    return run_training(features, close, settings())


# --- threshold rule and scores ------------------------------------------------------------------


def test_threshold_maximises_mcc_and_breaks_ties_upwards() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    proba = np.array([0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.8, 0.8, 0.9, 0.9])
    # Linear quantiles of the 10 values: 0.17 (lets the 0.2 negatives through), 0.44 and 0.71 (both
    # separate the classes perfectly: a tie) and 0.82 (misses two positives).
    quantiles = np.array([0.3, 0.6, 0.65, 0.8])
    assert choose_threshold(y, proba, quantiles) == pytest.approx(0.71)


def test_threshold_keeps_the_signal_between_the_extreme_quantiles() -> None:
    rng = np.random.default_rng(SEED)
    y = rng.integers(0, 2, 2000)
    proba = np.clip(0.3 + 0.1 * y + rng.normal(0.0, 0.2, 2000), 0.0, 1.0)
    threshold = choose_threshold(y, proba)
    assert threshold == round(threshold, 6)
    signal_rate = np.mean(proba >= threshold)
    tolerance = 1 / len(y)  # rounding a quantile to 6 decimals may move one row across it
    fewest_signals, most_signals = 1.0 - THRESHOLD_QUANTILES[-1], 1.0 - THRESHOLD_QUANTILES[0]
    assert fewest_signals - tolerance <= signal_rate <= most_signals + tolerance


def test_vectorised_mcc_matches_scikit_learn() -> None:
    rng = np.random.default_rng(SEED)
    y = rng.integers(0, 2, 500)
    proba = np.round(rng.random(500), 2)  # rounded so that thresholds hit tied scores
    thresholds = np.array([-0.1, 0.0, 0.25, 0.5, 0.73, 0.99, 1.0, 1.5])
    expected = [matthews_corrcoef(y, proba >= threshold) for threshold in thresholds]
    np.testing.assert_allclose(mcc_at_thresholds(y, proba, thresholds), expected, rtol=1e-12, atol=1e-12)


def test_score_on_a_hand_computed_example() -> None:
    y = np.array([0, 0, 1, 1])
    proba = np.array([0.1, 0.6, 0.4, 0.9])
    scores = score(y, proba, threshold=0.5)  # predicts [0, 1, 0, 1]: one hit, one miss per class
    assert scores == pytest.approx(
        {
            "roc_auc": 3 / 4,  # 3 of the 4 (positive, negative) pairs are ranked correctly
            "log_loss": -(2 * math.log(0.9) + 2 * math.log(0.4)) / 4,
            "brier": (2 * 0.1**2 + 2 * 0.6**2) / 4,
            "f1": 0.5,
            "precision": 0.5,
            "recall": 0.5,
            "accuracy": 0.5,
            "mcc": 0.0,
            "signal_rate": 0.5,
        }
    )


# --- cross_validate / train_final ---------------------------------------------------------------


def test_cross_validate_scores_every_model_per_fold() -> None:
    X, y = build_dataset(*learnable_candles(1200), horizon=1, threshold=0.003)
    folds = walk_forward_splits(len(X), n_splits=3, horizon=1, embargo=5)
    cv = cross_validate(X, y, folds, weights=None, model_params=SMALL_MODELS, random_state=SEED, n_jobs=1)

    assert set(cv.scores) == {"lightgbm", "xgboost", "random_forest", ENSEMBLE}
    assert all(len(values) == len(folds) for per_metric in cv.scores.values() for values in per_metric.values())
    np.testing.assert_array_equal(cv.oof_labels, np.concatenate([y.iloc[val].to_numpy() for _, val in folds]))
    assert cv.decision_threshold == choose_threshold(cv.oof_labels, cv.oof_proba[ENSEMBLE])
    assert cv.mean_scores()["roc_auc"] > 0.7, "the leaked next return should be learnable out of sample"
    assert cv.mean_scores()["mcc"] > 0.2


def test_cross_validate_names_a_fold_with_one_class() -> None:
    features, _ = learnable_candles(400)
    y = pd.Series(0, index=features.index)
    y.iloc[:50] = 1  # only the first fold's training rows see an up-move
    folds = walk_forward_splits(len(features), n_splits=3, horizon=1, embargo=0)
    with pytest.raises(ValueError, match=r"CV fold 1 validation rows .* all have label 0"):
        cross_validate(features, y, folds, weights=None, model_params=SMALL_MODELS, random_state=SEED, n_jobs=1)


def test_cross_validate_needs_folds() -> None:
    X, y = build_dataset(*learnable_candles(200), horizon=1, threshold=0.003)
    with pytest.raises(ValueError, match="at least one"):
        cross_validate(X, y, [], weights=None, model_params=SMALL_MODELS, random_state=SEED, n_jobs=1)


def test_final_model_uses_the_cv_threshold_and_only_training_rows(trained: TrainingResult, tmp_path: Path) -> None:
    cfg = trained.settings
    assert trained.ensemble.decision_threshold == trained.decision_threshold
    X, y = build_dataset(*learnable_candles(1500), cfg.horizon, cfg.threshold)
    refit = train_final(
        X.iloc[trained.split.train],
        y.iloc[trained.split.train],
        decision_threshold=trained.decision_threshold,
        weights=cfg.weights,
        model_params=cfg.model_params,
        random_state=cfg.random_state,
        n_jobs=cfg.n_jobs,
    )
    assert refit.save(tmp_path / "refit") == trained.ensemble.save(tmp_path / "trained")


# --- run_training -------------------------------------------------------------------------------


def test_run_training_reports_consistent_samples(trained: TrainingResult) -> None:
    samples = trained.metrics["samples"]
    cfg = trained.settings
    assert samples["purged"] == cfg.horizon + cfg.embargo
    assert samples["train"] + samples["purged"] + samples["holdout"] == samples["labelled"]
    assert samples["cv_folds"] == cfg.n_splits
    assert trained.metrics["decision_threshold"] == trained.decision_threshold
    assert trained.metrics["cv"][ENSEMBLE]["roc_auc"]["mean"] > 0.7
    assert trained.feature_names == FEATURE_NAMES


def test_run_training_is_deterministic(trained: TrainingResult, tmp_path: Path) -> None:
    features, close = learnable_candles(1500)
    again = run_training(features, close, settings())
    assert json.dumps(again.metrics, sort_keys=True) == json.dumps(trained.metrics, sort_keys=True)
    assert again.ensemble.save(tmp_path / "again") == trained.ensemble.save(tmp_path / "first")
    saved = sorted(path.name for path in (tmp_path / "first").iterdir())
    assert saved == sorted(path.name for path in (tmp_path / "again").iterdir())
    for name in saved:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name


def test_train_metrics_are_json_with_rounded_floats(trained: TrainingResult) -> None:
    text = json.dumps(trained.metrics, allow_nan=False)
    floats = list(float_leaves(json.loads(text)))
    assert floats, "metrics should contain scores"
    assert all(value == round(value, 6) for value in floats)


def test_training_metadata_carries_the_passed_facts(trained: TrainingResult) -> None:
    metadata = build_training_metadata(
        trained,
        created_at="2024-06-01T00:00:00+00:00",
        model_file="models/training/model.skops",
        model_hash="sha256:" + "0" * 64,
        git_commit="abc123",
        previous_version=None,
        feature_manager_version="1.0.0",
        params={"label": {"horizon": 1, "threshold": 0.003}, "model": {"lightgbm": {"extra_trees": True}}},
        library_versions={"lightgbm": "4.7.0"},
    )
    json.dumps(metadata, allow_nan=False)
    assert metadata["status"] == "training"
    assert metadata["model_type"] == "ProductionEnsemble"
    assert metadata["feature_names"] == list(FEATURE_NAMES)
    assert metadata["individual_models"] == ["lightgbm", "xgboost", "random_forest"]
    assert metadata["version_control"] == {
        "git_commit": "abc123",
        "model_hash": "sha256:" + "0" * 64,
        "previous_version": None,
    }
    assert metadata["training_info"]["last_retrain"] == "2024-06-01T00:00:00+00:00"
    assert metadata["training_info"]["samples_count"] == trained.metrics["samples"]["train"]
    assert metadata["training_info"]["data_end"] == trained.split.train_end_time.isoformat()
    assert metadata["performance_metrics"]["roc_auc"] == trained.metrics["cv"][ENSEMBLE]["roc_auc"]["mean"]
    assert sum(metadata["model_weights"].values()) == pytest.approx(1.0)
    assert metadata["params"]["model"]["lightgbm"]["extra_trees"] is True  # a bool is not turned into 1
