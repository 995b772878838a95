"""Threshold rule, the walk-forward replay of the retrain policy, the production fit and their metrics/metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.features.manager import FEATURE_NAMES, FeatureManager
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.executor import ExecutorSettings
from cryptoml.model.labels import Step, build_dataset, walk_forward_steps
from cryptoml.model.training import (
    ENSEMBLE,
    OOS_COLUMNS,
    RULE_COLUMNS,
    THRESHOLD_QUANTILES,
    FitResult,
    FitSettings,
    TrainingResult,
    TrainingSettings,
    build_train_metrics,
    build_training_metadata,
    choose_threshold,
    mcc_at_thresholds,
    RuleSettings,
    out_of_sample_record,
    record_from_csv,
    record_to_csv,
    run_training,
    score,
)
from cryptoml.live.serving import ServingModel
from cryptoml.model.rule import Holding
from cryptoml.model.trading import Costs, RuleGrid, rule_positions
from cryptoml.release.promotion import compare_with_champion

SMALL_MODELS = {name: {"n_estimators": 15} for name in ("lightgbm", "xgboost", "random_forest")}
SEED = 3


LOCAL = ExecutorSettings(kind="local", workers=1)
RULES = RuleSettings(costs=Costs(fee=1.2e-3), grid=RuleGrid(low=0.1, high=0.6, step=0.02, min_hold=(1, 6)))
HOUR = pd.Timedelta(hours=1)


def settings(**overrides: Any) -> TrainingSettings:
    values: dict[str, Any] = {
        "horizon": 1,
        "threshold": 0.003,
        "holdout": 0.35,
        "embargo": 5,
        "every": pd.Timedelta("7D"),
        "warmup_steps": 1,
        "fit": FitSettings(weights=None, model_params=SMALL_MODELS, random_state=SEED, n_jobs=1),
        "rules": RULES,
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
    return run_training(features, close, settings(), LOCAL)


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


# --- the walk-forward replay of the retrain policy ----------------------------------------------


def real_candles() -> pd.DataFrame:
    """Seven weeks of synthetic hourly candles, from which FeatureManager makes the features."""
    return simulate_candles(pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-02-19", tz="UTC"), seed=SEED)


def train_on(candles: pd.DataFrame, **overrides: Any) -> TrainingResult:
    features = FeatureManager().generate_features(candles)
    return run_training(features, candles.set_index("timestamp")["close"], settings(**overrides), LOCAL)


def test_production_is_fitted_on_every_labelled_row(trained: TrainingResult, tmp_path: Path) -> None:
    cfg = trained.settings
    X, y = build_dataset(*learnable_candles(1500), cfg.horizon, cfg.threshold)
    # Only the last `horizon` candles, which have no label yet, are left out.
    assert trained.train_index.equals(X.index)
    assert trained.train_index[-1] == learnable_candles(1500)[1].index[-1 - cfg.horizon]
    refit = ProductionEnsemble(
        model_params=cfg.fit.model_params, random_state=cfg.fit.random_state, n_jobs=cfg.fit.n_jobs,
        decision_threshold=trained.decision_threshold, trading_rule=trained.ensemble.rule,
    ).fit(X, y)
    assert refit.save(tmp_path / "refit") == trained.ensemble.save(tmp_path / "trained")


def test_the_record_holds_every_step_prediction_out_of_sample(trained: TrainingResult) -> None:
    record, steps = trained.record, trained.steps
    assert list(record.columns) == [*OOS_COLUMNS, *RULE_COLUMNS]
    assert len(record) == sum(step.stop - step.start for step in steps)
    assert record["timestamp"].is_monotonic_increasing
    assert record.loc[~record["scored"], "threshold"].isna().all()
    assert record.loc[record["scored"], "threshold"].between(0.0, 1.0).all()
    frozen_step = next(step for step in steps if step.scored)
    in_frozen_step = record["step"] == frozen_step.number
    # The frozen model is the first scored step's: the same P(up) there, then its own on every later row.
    np.testing.assert_array_equal(record.loc[in_frozen_step, "frozen_p_up"], record.loc[in_frozen_step, "p_up"])
    assert record.loc[record["scored"], "frozen_p_up"].notna().all()
    assert record.loc[~record["scored"], "frozen_p_up"].isna().all()
    X, y = build_dataset(*learnable_candles(1500), 1, 0.003)
    scored = record[record["scored"]]
    assert roc_auc_score(y.loc[scored["timestamp"]], scored["p_up"]) > 0.7, "the leaked next return should be learnable"
    for step in steps:
        rows = record[record["step"] == step.number]
        assert rows["timestamp"].iloc[0] == X.index[step.start]
        assert rows["prior"].iloc[0] == pytest.approx(y.iloc[: step.train_stop].mean())


def test_a_record_reads_back_exactly(trained: TrainingResult) -> None:
    back = record_from_csv(record_to_csv(trained.record), "test")
    pd.testing.assert_frame_equal(back, trained.record, check_exact=True)


@pytest.mark.fault
def test_an_unreadable_record_names_its_file() -> None:
    with pytest.raises(ValueError, match=r"models/x.csv: not an out-of-sample record .* missing columns \['step'"):
        record_from_csv(b"timestamp,p_up\n2024-01-01T00:00:00+00:00,0.5\n", "models/x.csv")


def test_altered_candles_from_a_step_on_change_neither_its_model_nor_earlier_predictions() -> None:
    """No lookahead: the model of step k and every prediction before step k see no candle at or after step k's start."""
    candles = real_candles()
    before = train_on(candles)
    step = before.steps[-2]
    start = before.train_index[step.start]
    altered = candles.copy()
    later = altered["timestamp"] >= start
    altered.loc[later, ["open", "high", "low", "close"]] *= 1.07
    altered.loc[later, "volume"] *= 3.0
    after = train_on(altered)
    assert [s.number for s in after.steps] == [s.number for s in before.steps]
    assert after.step_fingerprints[: step.number] == before.step_fingerprints[: step.number]
    earlier = before.record["timestamp"] < start
    pd.testing.assert_frame_equal(after.record[earlier], before.record[earlier], check_exact=True)
    in_step = before.record["step"] == step.number
    assert after.record.loc[in_step, "threshold"].iloc[0] == before.record.loc[in_step, "threshold"].iloc[0]
    # The alteration did reach the later rows: the test can tell.
    assert after.record.loc[in_step, "p_up"].to_numpy().tolist() != before.record.loc[in_step, "p_up"].to_numpy().tolist()
    assert after.step_fingerprints[-1] != before.step_fingerprints[-1]


def random_results(steps: list[Step], seed: int = SEED) -> list[FitResult]:
    """What the fits of `steps` return, with random P(up); the first scored step predicts through the last row (frozen)."""
    rng = np.random.default_rng(seed)
    frozen = next(step for step in steps if step.scored)
    return [
        FitResult(
            proba={
                name: rng.random((steps[-1].stop if step is frozen else step.stop) - step.start)
                for name in (ENSEMBLE, "lightgbm", "xgboost", "random_forest")
            },
            fingerprint="",
            model=None,
        )
        for step in steps
    ]


def test_a_step_threshold_ignores_the_step_labels_and_those_not_yet_known() -> None:
    index = pd.date_range("2024-01-01", periods=60 * 24, freq="h", tz="UTC")
    steps = walk_forward_steps(index, 0.4, pd.Timedelta("7D"), 2, horizon=3, embargo=0)
    results = random_results(steps)
    y = np.random.default_rng(1).integers(0, 2, len(index))
    returns = np.random.default_rng(2).normal(0.0, 0.01, len(index))
    threshold = out_of_sample_record(index, y, returns, steps, results, 3, RULES)[0].groupby("step")["threshold"].first()
    step = steps[-2]
    changed = y.copy()
    # The step's own labels and the 3 before it (their horizon reaches into the step): unknown when it starts.
    changed[step.start - 3 : step.stop] = 1 - changed[step.start - 3 : step.stop]
    again = out_of_sample_record(index, changed, returns, steps, results, 3, RULES)[0].groupby("step")["threshold"].first()
    assert again[step.number] == threshold[step.number]
    assert again[steps[-1].number] != threshold[steps[-1].number], "a later step sees those labels: the test can tell"


# --- run_training -------------------------------------------------------------------------------


def test_run_training_reports_consistent_samples(trained: TrainingResult) -> None:
    metrics = build_train_metrics(trained)
    samples, walk = metrics["samples"], metrics["walk_forward"]
    assert samples["train"] == samples["labelled"] == len(trained.train_index)
    assert samples["out_of_sample"] == len(trained.record)
    assert samples["evaluation_span"] == int(trained.record["scored"].sum())
    assert walk["steps"] == len(trained.steps)
    assert walk["every"] == "7D"
    assert walk["warmup_steps"] == trained.settings.warmup_steps
    assert metrics["decision_threshold"] == trained.decision_threshold
    positions = trained.train_index.get_indexer(trained.record["timestamp"])
    _, y = build_dataset(*learnable_candles(1500), 1, 0.003)
    assert trained.decision_threshold == choose_threshold(y.to_numpy()[positions], trained.record["p_up"].to_numpy())
    assert trained.feature_names == FEATURE_NAMES


def test_run_training_is_deterministic_and_the_same_on_two_local_workers(trained: TrainingResult, tmp_path: Path) -> None:
    features, close = learnable_candles(1500)
    again = run_training(features, close, settings(), ExecutorSettings(kind="local", workers=2))
    assert json.dumps(build_train_metrics(again), sort_keys=True) == json.dumps(build_train_metrics(trained), sort_keys=True)
    assert again.step_fingerprints == trained.step_fingerprints
    pd.testing.assert_frame_equal(again.record, trained.record, check_exact=True)
    assert again.ensemble.save(tmp_path / "again") == trained.ensemble.save(tmp_path / "first")
    saved = sorted(path.name for path in (tmp_path / "first").iterdir())
    assert saved == sorted(path.name for path in (tmp_path / "again").iterdir())
    for name in saved:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name


@pytest.mark.fault
def test_a_step_whose_training_rows_have_one_class_is_named() -> None:
    features, close = learnable_candles(1500)
    flat = pd.Series(1e7, index=close.index)  # never moves: every label is 0
    with pytest.raises(ValueError, match=r"the training rows of walk-forward step 1 \(\d+ rows\) all have label 0"):
        run_training(features, flat, settings(), LOCAL)


def test_train_metrics_are_json_with_rounded_floats(trained: TrainingResult) -> None:
    text = json.dumps(build_train_metrics(trained), allow_nan=False)
    floats = list(float_leaves(json.loads(text)))
    assert floats, "metrics should contain figures"
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
    info = metadata["training_info"]
    assert info["last_retrain"] == "2024-06-01T00:00:00+00:00"
    assert info["samples_count"] == len(trained.train_index)
    assert info["data_end"] == trained.train_index[-1].isoformat()
    scored = trained.record[trained.record["scored"]]
    assert (info["evaluation_start"], info["evaluation_end"]) == (scored["timestamp"].iloc[0].isoformat(), info["data_end"])
    steps = metadata["walk_forward"]["steps"]
    assert [step["model_fingerprint"] for step in steps] == trained.step_fingerprints
    assert all(step["train_end"] < step["start"] for step in steps)
    assert sum(metadata["model_weights"].values()) == pytest.approx(1.0)
    assert metadata["params"]["model"]["lightgbm"]["extra_trees"] is True  # a bool is not turned into 1


def test_a_data_only_weekly_retrain_repeats_the_champions_predictions_on_every_shared_row() -> None:
    """Calendar-anchored steps: one more week of data refits the shared steps on the same rows, so the champion
    comparison of a data-only retrain sees the same P(up) on every row both records hold."""
    features, close = learnable_candles(1500)
    week = 7 * 24
    champion = run_training(features.iloc[:-week], close.iloc[:-week], settings(), LOCAL).record
    challenger = run_training(features, close, settings(), LOCAL).record
    shared = champion.merge(challenger, on="timestamp", suffixes=("_champion", "_challenger"))
    assert len(shared) > week
    np.testing.assert_array_equal(shared["p_up_champion"], shared["p_up_challenger"])
    labels = build_dataset(features, close, 1, 0.003)[1]
    comparison, note = compare_with_champion(challenger, champion, labels, min_shared_rows=100, close=close, cost=1.2e-3, timeframe=HOUR)
    assert note is None and comparison is not None
    # The model's scores repeat exactly. The stored positions need not: the evaluation span is a fraction of the
    # rows, so a week more moves its first step, and each step's rule is chosen on the record's rows before it.
    scores = [{key: value for key, value in side.items() if key != "after_cost_return"} for side in (comparison.challenger, comparison.champion)]
    assert scores[0] == scores[1]
    assert comparison.economic_rows == comparison.rows  # every shared row has its next bar in the challenger's close


def test_no_step_rule_or_earlier_position_sees_a_price_or_label_from_the_step_start(trained: TrainingResult) -> None:
    """Every close, feature and label from a scored step's first row on is replaced: that step's rule and every
    position before it stay as they were."""
    features, close = learnable_candles(1500)
    scored = [step for step in trained.steps if step.scored]
    step = scored[len(scored) // 2]
    start = features.index[step.start]
    rng = np.random.default_rng(99)
    later_close = close.index >= start
    altered_close = close.copy()
    altered_close[later_close] = close[later_close].iloc[0] * np.exp(np.cumsum(rng.normal(0.0, 0.02, later_close.sum())))
    altered_features = features.copy()
    altered_features.loc[features.index >= start] = rng.normal(size=(int((features.index >= start).sum()), len(FEATURE_NAMES)))
    again = run_training(altered_features, altered_close, settings(), LOCAL).record
    before, in_step = trained.record["timestamp"] < start, trained.record["step"] == step.number
    rule_columns = ["entry", "exit", "min_hold"]
    pd.testing.assert_frame_equal(again.loc[in_step, rule_columns], trained.record.loc[in_step, rule_columns])
    pd.testing.assert_frame_equal(again.loc[before], trained.record.loc[before])
    assert trained.record.loc[in_step, "entry"].notna().all(), "the step's rule trades: the check is not trivially flat"
    later = trained.record["step"] > step.number
    assert not again.loc[later, rule_columns].equals(trained.record.loc[later, rule_columns]), "later steps see the change"


def test_serving_row_by_row_gives_the_backtest_positions_of_the_production_rule(trained: TrainingResult, tmp_path: Path) -> None:
    """One code path: the bot's ServingModel, fed the out-of-sample P(up) one row at a time with the holding it
    returned, holds exactly what the backtest of the production rule holds."""
    trained.ensemble.save(tmp_path / "model")
    serving = ServingModel.load(tmp_path / "model")
    rule = trained.ensemble.rule
    assert rule is not None and rule.trades and serving.rule == rule
    p_up = trained.record["p_up"].to_numpy()
    expected = rule_positions(p_up, [rule], [(0, len(p_up))])
    holding, served = Holding(), []
    for probability in p_up:
        holding = serving.next_holding(float(probability), holding)
        served.append(holding.position)
    np.testing.assert_array_equal(served, expected)
    assert 0 < expected.sum() < len(expected)
