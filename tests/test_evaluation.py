"""Walk-forward scores, baselines, the strategies' after-cost economics, plot tables and the evaluation report."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.features.manager import FEATURE_NAMES, FeatureManager
from cryptoml.io import METRICS_DECIMALS
from cryptoml.model.artifacts import MODEL_NAMES
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.evaluation import (
    BASELINE_NAMES,
    MAX_CURVE_POINTS,
    PLOT_NAMES,
    PROBABILITY_CLIP,
    HEADLINE,
    REFERENCE,
    STRATEGIES,
    EvaluationResult,
    baseline_probabilities,
    calibration_table,
    classification_metrics,
    evaluate_walk_forward,
    persistence_labels,
    precision_recall_table,
    roc_table,
)
from cryptoml.model.backtest import next_bar_returns, path_figures, periods_per_year
from cryptoml.model.executor import ExecutorSettings
from cryptoml.model.labels import make_labels
from cryptoml.model.training import FitSettings, RuleSettings, TrainingResult, TrainingSettings, run_training
from cryptoml.model.trading import Costs, RuleGrid

SMALL_MODELS = {name: {"n_estimators": 15} for name in MODEL_NAMES}
HOUR = pd.Timedelta(hours=1)
COST = 1.2e-3


def hourly_series(values: list[float] | np.ndarray, start: str = "2024-01-01") -> pd.Series:
    index = pd.date_range(start, periods=len(values), freq="h", tz="UTC", name="timestamp")
    return pd.Series(np.asarray(values, dtype=np.float64), index=index, name="close")


def noisy_scores(n_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a 30 % base rate and P(up) that separates them only partly."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_rows) < 0.3).astype(np.int64)
    proba = np.clip(0.3 + 0.2 * (labels - 0.3) + rng.normal(0.0, 0.15, n_rows), 0.0, 1.0)
    return labels, proba


# --- classification_metrics ---------------------------------------------------------------------


def test_classification_metrics_match_sklearn() -> None:
    labels, proba = noisy_scores(500)
    threshold = 0.35
    predicted = (proba >= threshold).astype(np.int64)
    expected = {
        "roc_auc": roc_auc_score(labels, proba),
        "pr_auc": average_precision_score(labels, proba),
        "log_loss": log_loss(labels, proba),
        "brier": brier_score_loss(labels, proba),
        "f1": f1_score(labels, predicted),
        "f1_macro": f1_score(labels, predicted, average="macro"),
        "precision": precision_score(labels, predicted),
        "recall": recall_score(labels, predicted),
        "accuracy": accuracy_score(labels, predicted),
        "mcc": matthews_corrcoef(labels, predicted),
        "signal_rate": predicted.mean(),
        "positive_rate": labels.mean(),
    }
    metrics = classification_metrics(labels, proba, threshold)
    assert metrics == pytest.approx(expected, rel=1e-12)


def test_a_perfect_predictor_scores_perfectly_with_finite_log_loss() -> None:
    labels, _ = noisy_scores(200)
    metrics = classification_metrics(labels, labels.astype(np.float64), threshold=0.5)
    for name in ("roc_auc", "pr_auc", "f1", "f1_macro", "precision", "recall", "accuracy", "mcc"):
        assert metrics[name] == 1.0, name
    assert metrics["log_loss"] == pytest.approx(-math.log1p(-PROBABILITY_CLIP))
    assert metrics["signal_rate"] == metrics["positive_rate"]


def test_an_uninformative_predictor_has_no_skill() -> None:
    labels, _ = noisy_scores(200)
    constant = np.full(len(labels), 0.4)
    metrics = classification_metrics(labels, constant, threshold=0.5)
    assert metrics["roc_auc"] == 0.5
    assert metrics["pr_auc"] == pytest.approx(labels.mean())
    assert metrics["mcc"] == 0.0
    assert metrics["signal_rate"] == 0.0


def test_a_single_class_span_is_refused() -> None:
    with pytest.raises(ValueError, match="all 4 evaluated labels are 0: ROC AUC and PR AUC are undefined"):
        classification_metrics(np.zeros(4, dtype=np.int64), np.full(4, 0.2), threshold=0.5)


@pytest.mark.parametrize("bad", [np.nan, 1.5, -0.1])
def test_probabilities_outside_0_1_are_refused(bad: float) -> None:
    proba = np.array([0.1, 0.9, bad, 0.4])
    with pytest.raises(ValueError, match=r"P\(up\) must lie in \[0, 1\]; position 2"):
        classification_metrics(np.array([0, 1, 0, 1]), proba, threshold=0.5)


def test_labels_other_than_0_and_1_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels must be 0 \(not up\) or 1 \(up\), got \[2\]"):
        classification_metrics(np.array([0, 1, 2]), np.full(3, 0.5), threshold=0.5)


# --- baselines ----------------------------------------------------------------------------------


def labelled_path(horizon: int, threshold: float, n_rows: int = 60, seed: int = 1) -> tuple[pd.Series, pd.Series]:
    """A random-walk close and its labels (by the definition, not via make_labels)."""
    close = hourly_series(100.0 * np.exp(np.cumsum(np.random.default_rng(seed).normal(0.0, 0.01, n_rows))))
    prices = close.to_numpy()
    labels = (prices[horizon:] / prices[:-horizon] - 1.0 > threshold).astype(np.int64)
    return close, pd.Series(labels, index=close.index[:-horizon], name="label")


@pytest.mark.parametrize("horizon", [1, 2])
def test_persistence_predicts_the_label_of_bar_t_minus_horizon(horizon: int) -> None:
    threshold = 0.002
    close, labels = labelled_path(horizon, threshold)
    holdout = labels.iloc[30:]
    prices = close.to_numpy()
    positions = np.arange(30, 30 + len(holdout))
    # The label of bar t - h compares close[t - h] with close[t], both known at t.
    expected = (prices[positions] / prices[positions - horizon] - 1.0 > threshold).astype(np.int64)
    assert persistence_labels(holdout, close, horizon=horizon, label_threshold=threshold).tolist() == expected.tolist()


def test_persistence_refuses_labels_built_with_other_params() -> None:
    close, labels = labelled_path(horizon=1, threshold=0.002)
    with pytest.raises(ValueError, match=r"label\.horizon=2, label\.threshold=0\.002: pass the label params"):
        persistence_labels(labels.iloc[30:], close, horizon=2, label_threshold=0.002)


def test_persistence_needs_close_before_the_holdout() -> None:
    close, labels = labelled_path(horizon=2, threshold=0.002)
    holdout = labels.iloc[30:]
    with pytest.raises(ValueError, match="close must start at least 2 bar\\(s\\) before the first holdout row"):
        persistence_labels(holdout, close.iloc[29:], horizon=2, label_threshold=0.002)


def test_baselines_class_prior_always_up_and_persistence() -> None:
    close, labels = labelled_path(horizon=1, threshold=0.0, n_rows=400)
    holdout = labels.iloc[100:]
    train_rate = float(labels.iloc[:90].mean())
    baselines = baseline_probabilities(holdout, close, prior=train_rate, horizon=1, label_threshold=0.0)
    assert tuple(baselines) == BASELINE_NAMES
    scores = {name: classification_metrics(holdout, proba, threshold=0.5) for name, proba in baselines.items()}

    assert scores["class_prior"]["roc_auc"] == 0.5
    assert scores["class_prior"]["brier"] == pytest.approx(np.mean((holdout.to_numpy() - train_rate) ** 2))
    assert scores["always_up"]["recall"] == 1.0
    assert scores["always_up"]["signal_rate"] == 1.0
    # Every label-0 row costs -log(1 - clipped P(up)), about -log(PROBABILITY_CLIP): large but finite.
    expected_loss = (1.0 - holdout.mean()) * -math.log(1.0 - (1.0 - PROBABILITY_CLIP))
    assert scores["always_up"]["log_loss"] == pytest.approx(expected_loss, rel=1e-9)
    assert scores["persistence"]["signal_rate"] == pytest.approx(labels.iloc[99:-1].mean())


def test_class_prior_needs_a_training_rate_strictly_between_0_and_1() -> None:
    close, labels = labelled_path(horizon=1, threshold=0.0)
    with pytest.raises(ValueError, match="the class prior must be in \\(0, 1\\)"):
        baseline_probabilities(labels.iloc[30:], close, prior=1.0, horizon=1, label_threshold=0.0)
    per_step = np.full(len(labels) - 30, 0.3)
    per_step[-1] = 0.0
    with pytest.raises(ValueError, match="the class prior must be in \\(0, 1\\)"):
        baseline_probabilities(labels.iloc[30:], close, prior=per_step, horizon=1, label_threshold=0.0)


def test_class_prior_takes_one_rate_per_row() -> None:
    close, labels = labelled_path(horizon=1, threshold=0.0)
    rates = np.linspace(0.2, 0.4, len(labels) - 30)
    baselines = baseline_probabilities(labels.iloc[30:], close, prior=rates, horizon=1, label_threshold=0.0)
    np.testing.assert_array_equal(baselines["class_prior"], rates)


# --- plot tables and evaluate.json --------------------------------------------------------------


def test_curve_tables_are_long_format_and_thinned() -> None:
    labels, proba = noisy_scores(3000)
    probabilities = {"a": proba, "b": proba[::-1].copy()}
    roc = roc_table(labels, probabilities)
    assert list(roc.columns) == ["fpr", "tpr", "model"]
    for _, part in roc.groupby("model"):
        assert 2 <= len(part) <= MAX_CURVE_POINTS
        assert (part["fpr"].iloc[0], part["tpr"].iloc[0]) == (0.0, 0.0)
        assert (part["fpr"].iloc[-1], part["tpr"].iloc[-1]) == (1.0, 1.0)
        assert part["fpr"].is_monotonic_increasing
    pr = precision_recall_table(labels, probabilities)
    assert list(pr.columns) == ["recall", "precision", "model"]
    assert pr.groupby("model").size().max() <= MAX_CURVE_POINTS


def test_calibration_bins_have_equal_counts_that_cover_every_row() -> None:
    labels, proba = noisy_scores(1003)
    table = calibration_table(labels, {"a": proba}, n_bins=10)
    assert list(table.columns) == ["bin", "mean_predicted", "fraction_positive", "count", "model"]
    assert table["count"].sum() == len(labels)
    assert table["count"].max() - table["count"].min() <= 1
    assert table["mean_predicted"].is_monotonic_increasing
    assert np.average(table["fraction_positive"], weights=table["count"]) == pytest.approx(labels.mean())


# --- feature importance -------------------------------------------------------------------------


def sparse_training_set(n_rows: int = 400, seed: int = 2) -> tuple[pd.DataFrame, pd.Series]:
    """Only rsi_14 and zscore vary; the other ten columns are constant, so no model can split on them."""
    rng = np.random.default_rng(seed)
    features = pd.DataFrame(np.ones((n_rows, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
    features["rsi_14"] = rng.normal(size=n_rows)
    features["zscore"] = rng.normal(size=n_rows)
    labels = (features["rsi_14"] + 0.5 * features["zscore"] + rng.normal(0.0, 0.5, n_rows) > 0).astype(np.int64)
    return features, labels


def test_feature_importances_are_shares_of_the_features_each_model_used(tmp_path: Path) -> None:
    features, labels = sparse_training_set()
    model = ProductionEnsemble(model_params=SMALL_MODELS).fit(features, labels)
    importances = model.feature_importances()
    assert tuple(importances) == MODEL_NAMES
    used = np.isin(FEATURE_NAMES, ["rsi_14", "zscore"])
    for name, shares in importances.items():
        assert shares.shape == (len(FEATURE_NAMES),), name
        assert shares.sum() == pytest.approx(1.0), name
        assert (shares[~used] == 0.0).all(), name
        assert shares[FEATURE_NAMES.index("rsi_14")] > shares[FEATURE_NAMES.index("zscore")], name

    model.save(tmp_path)
    loaded = ProductionEnsemble.load(tmp_path)
    loaded.xgboost_booster_.feature_names = None  # XGBoost then keys its scores f0..f11
    for name, shares in loaded.feature_importances().items():
        np.testing.assert_allclose(shares, importances[name], err_msg=name)


# --- end to end ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Evaluated:
    training: TrainingResult
    close: pd.Series
    scored: pd.DataFrame  # the scored rows of the record
    labels: pd.Series  # their labels
    result: EvaluationResult


@pytest.fixture(scope="module")
def evaluated() -> Evaluated:
    candles = simulate_candles(pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-04-01", tz="UTC"), "1h", seed=7)
    close = candles.set_index("timestamp")["close"]
    horizon, label_threshold = 1, 3.0e-3
    settings = TrainingSettings(
        horizon=horizon,
        threshold=label_threshold,
        holdout=0.25,
        embargo=24,
        every=pd.Timedelta("7D"),
        warmup_steps=1,
        fit=FitSettings(weights=None, model_params=SMALL_MODELS, random_state=3, n_jobs=1),
        rules=RuleSettings(costs=Costs(fee=COST), grid=RuleGrid(low=0.1, high=0.6, step=0.02, min_hold=(1, 6))),
    )
    training = run_training(FeatureManager().generate_features(candles), close, settings, ExecutorSettings(workers=1))
    labels = make_labels(close, horizon, label_threshold)
    result = evaluate_walk_forward(
        training.record,
        labels,
        close,
        training.ensemble.feature_importances(),
        cost=COST,
        timeframe=HOUR,
        horizon=horizon,
        label_threshold=label_threshold,
    )
    scored = training.record[training.record["scored"]].reset_index(drop=True)
    return Evaluated(training=training, close=close, scored=scored, labels=labels.loc[scored["timestamp"]], result=result)


def float_values(tree: object) -> list[float]:
    if isinstance(tree, dict):
        return [value for item in tree.values() for value in float_values(item)]
    return [tree] if isinstance(tree, float) else []


def test_the_report_is_finite_rounded_and_serialisable_and_the_metrics_are_its_headline(evaluated: Evaluated) -> None:
    report = evaluated.result.report
    assert set(report) == {"span", "policy", "frozen", "components", "baselines", "backtest", "steps"}
    assert set(report["components"]) == set(MODEL_NAMES)
    assert set(report["baselines"]) == set(BASELINE_NAMES)
    assert set(report["backtest"]) == {"bars", "cost_per_side", "periods_per_year", *STRATEGIES}
    json.loads(json.dumps(report, allow_nan=False))
    values = float_values(report)
    assert values and all(math.isfinite(value) and round(value, METRICS_DECIMALS) == value for value in values)
    span = report["span"]
    assert span["rows"] == len(evaluated.scored) == len(evaluated.labels)
    assert span["start"] == evaluated.scored["timestamp"].iloc[0].isoformat()
    assert span["steps"] == evaluated.scored["step"].nunique() >= 2
    assert span["positive_rate"] == round(evaluated.labels.mean(), METRICS_DECIMALS)
    metrics = evaluated.result.metrics
    assert sum(len(keys) for keys in HEADLINE.values()) <= 30, "dvc metrics diff --md stays one screen long"
    for dotted, keys in HEADLINE.items():
        source, shown = report, metrics
        for part in dotted.split("."):
            source, shown = source[part], shown[part]
        assert shown == {key: source[key] for key in keys}, dotted


def test_only_scored_rows_count_and_every_row_was_predicted_by_a_model_that_never_saw_it(evaluated: Evaluated) -> None:
    record, training = evaluated.training.record, evaluated.training
    assert (~record["scored"]).sum() > 0 and len(evaluated.scored) < len(record)
    for step in training.steps:
        train_end = training.train_index[step.train_stop - 1]
        predicted = record.loc[record["step"] == step.number, "timestamp"]
        assert train_end < predicted.iloc[0], step


def test_the_policy_is_scored_at_each_step_threshold_and_frozen_at_the_first(evaluated: Evaluated) -> None:
    scored, y, metrics = evaluated.scored, evaluated.labels.to_numpy(), evaluated.result.report
    thresholds = scored["threshold"].to_numpy()
    assert len(np.unique(thresholds)) > 1, "each step chooses its own threshold"
    assert metrics["policy"]["roc_auc"] == round(roc_auc_score(y, scored["p_up"]), METRICS_DECIMALS)
    assert metrics["policy"]["signal_rate"] == round(np.mean(scored["p_up"] >= thresholds), METRICS_DECIMALS)
    assert metrics["frozen"]["roc_auc"] == round(roc_auc_score(y, scored["frozen_p_up"]), METRICS_DECIMALS)
    assert metrics["frozen"]["signal_rate"] == round(np.mean(scored["frozen_p_up"] >= thresholds[0]), METRICS_DECIMALS)
    for name in MODEL_NAMES:
        assert metrics["components"][name]["recall"] == round(recall_score(y, scored[name] >= thresholds), METRICS_DECIMALS), name
    prior = metrics["baselines"]["class_prior"]
    assert prior["brier"] == round(np.mean((y - scored["prior"]) ** 2), METRICS_DECIMALS)
    assert metrics["policy"]["log_loss_vs_prior"] == pytest.approx(metrics["policy"]["log_loss"] / prior["log_loss"], abs=1e-5)


def test_every_strategy_is_backtested_after_costs_on_the_scored_rows(evaluated: Evaluated) -> None:
    scored, close = evaluated.scored, evaluated.close
    returns = next_bar_returns(pd.DatetimeIndex(scored["timestamp"]), close)
    assert np.isfinite(returns).all()  # the close series goes on past the last labelled row
    positions = {
        "rule": scored["position"].to_numpy(),
        "naive": (scored["p_up"] >= scored["threshold"]).astype(int).to_numpy(),
        "frozen": scored["frozen_position"].to_numpy(),
        "buy_and_hold": np.ones(len(scored), dtype=int),
    }
    backtest = evaluated.result.report["backtest"]
    assert (backtest["bars"], backtest["cost_per_side"]) == (len(scored), COST)
    for name, path in positions.items():
        expected = path_figures(path, returns, COST, periods_per_year(HOUR)).figures
        assert backtest[name]["total_return"] == round(expected["total_return"], METRICS_DECIMALS), name
        assert backtest[name]["trades"] == expected["trades"], name
    rule = backtest["rule"]
    assert rule["sharpe_ci_low"] <= rule["sharpe"] <= rule["sharpe_ci_high"] and 0.0 <= rule["psr"] <= 1.0
    assert backtest["naive"]["trades"] > backtest["rule"]["trades"] > 0, "the rule trades less than the naive signal"
    equity = evaluated.result.plots["equity"]
    assert list(equity.columns) == ["timestamp", *STRATEGIES]
    assert len(equity) == len(scored) + 1
    assert equity["timestamp"].iloc[0] == scored["timestamp"].iloc[0]
    assert equity["rule"].iloc[-1] == pytest.approx(1.0 + rule["total_return"], abs=1e-6)
    drawdown = evaluated.result.plots["drawdown"]
    assert (drawdown[list(STRATEGIES)] <= 0.0).all().all()
    assert drawdown["rule"].min() == pytest.approx(rule["max_drawdown"], abs=1e-6)


def test_each_step_reports_its_rule_and_after_cost_returns(evaluated: Evaluated) -> None:
    steps, scored = evaluated.result.plots["walk_forward"], evaluated.scored
    first_rows = scored.groupby("step").first()
    np.testing.assert_array_equal(steps["entry"].to_numpy(), first_rows["entry"].to_numpy())
    np.testing.assert_array_equal(steps["min_hold"].to_numpy(), first_rows["min_hold"].to_numpy())
    compounded = np.prod(1.0 + steps["rule_return"].to_numpy()) - 1.0
    assert compounded == pytest.approx(evaluated.result.report["backtest"]["rule"]["total_return"], abs=1e-5)
    assert evaluated.result.report["steps"]["rule_positive_steps"] == int((steps["rule_return"] > 0).sum())
    assert (steps[f"{REFERENCE}_roc_auc"] == 0.5).all() and (steps[f"{REFERENCE}_log_loss_ratio"] == 1.0).all()


def test_per_step_skill_table(evaluated: Evaluated) -> None:
    steps, scored, y = evaluated.result.plots["walk_forward"], evaluated.scored, evaluated.labels.to_numpy()
    assert steps["step"].tolist() == sorted(scored["step"].unique())
    assert steps["rows"].sum() == len(scored)
    for _, row in steps.iterrows():
        rows = (scored["step"] == row["step"]).to_numpy()
        assert row["start"] == scored.loc[rows, "timestamp"].iloc[0].isoformat()
        assert row["policy_roc_auc"] == pytest.approx(roc_auc_score(y[rows], scored.loc[rows, "p_up"]))
        prior_loss = log_loss(y[rows], scored.loc[rows, "prior"], labels=[0, 1])
        assert row["policy_log_loss_ratio"] == pytest.approx(log_loss(y[rows], scored.loc[rows, "p_up"], labels=[0, 1]) / prior_loss)
    spread = evaluated.result.report["steps"]["policy_roc_auc"]
    assert spread["min"] == round(steps["policy_roc_auc"].min(), METRICS_DECIMALS)
    assert spread["max"] == round(steps["policy_roc_auc"].max(), METRICS_DECIMALS)


def test_evaluate_plot_tables(evaluated: Evaluated) -> None:
    plots = evaluated.result.plots
    assert tuple(plots) == PLOT_NAMES
    curve_models = {"policy", "frozen", *MODEL_NAMES, REFERENCE}
    for name in ("roc", "precision_recall", "calibration"):
        assert set(plots[name]["model"]) == curve_models, name
        assert plots[name].groupby("model").size().max() <= MAX_CURVE_POINTS, name
    reference = {name: plots[name][plots[name]["model"] == REFERENCE] for name in ("roc", "precision_recall", "calibration")}
    assert reference["roc"][["fpr", "tpr"]].to_numpy().tolist() == [[0.0, 0.0], [1.0, 1.0]]  # chance
    assert (reference["precision_recall"]["precision"] == evaluated.labels.mean()).all()  # the base rate
    assert reference["calibration"][["mean_predicted", "fraction_positive"]].to_numpy().tolist() == [[0.0, 0.0], [1.0, 1.0]]
    confusion = plots["confusion"]
    assert list(confusion.columns) == ["actual", "predicted"]
    assert confusion["actual"].tolist() == evaluated.labels.tolist()
    assert confusion["predicted"].tolist() == (evaluated.scored["p_up"] >= evaluated.scored["threshold"]).astype(int).tolist()
    importance = plots["feature_importance"]
    assert list(importance.columns) == ["feature", "importance", "model"]
    for name, part in importance.groupby("model"):
        assert part["feature"].tolist() == list(FEATURE_NAMES), name
        assert part["importance"].sum() == pytest.approx(1.0), name


@pytest.mark.fault
def test_evaluate_refuses_a_record_of_other_candles(evaluated: Evaluated) -> None:
    record = evaluated.training.record.copy()
    record["timestamp"] = record["timestamp"] + pd.Timedelta(days=400)
    with pytest.raises(ValueError, match=r"predicts 2025-.* which has no label in the current data: .* run the train stage again"):
        evaluate_walk_forward(
            record, evaluated.labels, pd.Series(dtype=np.float64), {}, cost=COST, timeframe=HOUR, horizon=1, label_threshold=3.0e-3
        )
