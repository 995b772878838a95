"""Walk-forward evaluation: scores, baselines, an after-fee backtest and the plot tables, as pure functions.

The evaluate stage reads the out-of-sample record the train stage stored with the model, the candles
and params, and writes metrics/evaluate.json and the plot CSVs; everything in between is here, with
no file, clock or git access. No model is run here: every P(up) was made during the walk-forward by
a model that had not seen its row.

What is compared, on the same rows (the scored rows of the evaluation span):

* policy: the retrain policy, a new model every walk-forward step (what production does);
* frozen: the first step's model kept for the whole span (a model that is never retrained);
* components: LightGBM, XGBoost and RandomForest of each step, as the policy's ensemble saw them;
* baselines, below.

Conventions, the same for every model and baseline, so their numbers compare:

* Threshold: "up" is predicted when P(up) >= the step's decision threshold, chosen before the step
  on earlier out-of-sample predictions; the frozen model keeps the first step's threshold. The
  components and baselines use the policy's (they answer "is this cut-off a good one for them too?").
* Probabilities are clipped to [PROBABILITY_CLIP, 1 - PROBABILITY_CLIP] before any metric, so the
  hard 0/1 predictions of always_up and persistence get a large but finite log loss.
* A span with a single class is refused (ValueError): ROC AUC and PR AUC are undefined on it. A
  single step with one class only has no ROC AUC of its own in the per-step table.

Baselines:

* class_prior: the positive rate of each step's *training* labels as a constant P(up); at the
  decision threshold it predicts up on every row or on none.
* always_up: P(up) = 1 on every row, i.e. predicts up everywhere.
* persistence: P(up) = the last label known at bar t, that of bar t - horizon (its forward window
  ends at t). It is recomputed from the close series, so the first `horizon` rows of the span use
  the labels of the bars before it (known by then) and no row is dropped.

Backtest (cryptoml.model.backtest for the conventions and figures, all after costs), on the same rows:

* rule: the trading rule walk-forward, each step trading with the parameters chosen before it (the positions
  stored in the record by the train stage, made by cryptoml.model.rule);
* naive: long for the next bar whenever P(up) >= the step's decision threshold, the signal as it was served
  before trading rules (kept as a reference);
* frozen: the frozen model with its own walk-forward rule;
* buy_and_hold: long from the first row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, f1_score, log_loss, precision_recall_curve, roc_auc_score, roc_curve

from cryptoml.features.manager import FEATURE_NAMES
from cryptoml.io import rounded_json
from cryptoml.model.backtest import close_positions, drawdown, next_bar_returns, path_figures, periods_per_year, uncertainty
from cryptoml.model.labels import make_labels
from cryptoml.model.training import score

PROBABILITY_CLIP = 1e-15
MAX_CURVE_POINTS = 200
CALIBRATION_BINS = 10

BASELINE_NAMES: tuple[str, ...] = ("class_prior", "always_up", "persistence")
# The series each chart is read against: chance, the base rate, perfect calibration, 0.5 ROC AUC, the class prior.
REFERENCE = "reference"
PLOT_NAMES: tuple[str, ...] = (
    "roc", "precision_recall", "calibration", "confusion", "feature_importance", "equity", "drawdown", "walk_forward",
)
STRATEGIES: tuple[str, ...] = ("rule", "naive", "frozen", "buy_and_hold")
# What metrics/evaluate.json holds, so that `dvc metrics diff --md` stays one screen long; every figure of every
# strategy and model is in the full report (metrics/evaluation_report.json), which the gate reads.
HEADLINE: dict[str, tuple[str, ...]] = {
    "span": ("rows", "steps"),
    "policy": ("roc_auc", "log_loss_vs_prior", "brier_vs_prior"),
    "frozen": ("roc_auc", "log_loss_vs_prior"),
    "backtest.rule": ("total_return", "annual_return", "sharpe", "sharpe_ci_low", "sharpe_ci_high", "psr", "max_drawdown", "trades_per_week"),
    "backtest.naive": ("total_return", "sharpe", "trades_per_week"),
    "backtest.frozen": ("total_return", "sharpe", "trades_per_week"),
    "backtest.buy_and_hold": ("total_return", "sharpe", "max_drawdown"),
}


def _checked_labels(y_true: Any) -> np.ndarray:
    labels = np.asarray(y_true)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    invalid = sorted({value for value in pd.unique(labels).tolist() if value not in (0, 1)})
    if invalid:
        raise ValueError(f"labels must be 0 (not up) or 1 (up), got {invalid[:5]}")
    if len(np.unique(labels)) < 2:
        raise ValueError(
            f"all {len(labels)} evaluated labels are {int(labels[0])}: ROC AUC and PR AUC are undefined on one class; "
            "use a longer evaluation span (split.holdout) or another label.threshold"
        )
    return labels.astype(np.int64)


def _checked_probability(p_up: Any, n_rows: int) -> np.ndarray:
    proba = np.asarray(p_up, dtype=np.float64)
    if proba.shape != (n_rows,):
        raise ValueError(f"P(up) must be 1-D with one value per label ({n_rows}), got shape {proba.shape}")
    outside = np.flatnonzero(~((proba >= 0.0) & (proba <= 1.0)))  # also catches NaN
    if outside.size:
        raise ValueError(f"P(up) must lie in [0, 1]; position {outside[0]} is {proba[outside[0]]}")
    return proba


def classification_metrics(y_true: Any, p_up: Any, threshold: float | np.ndarray) -> dict[str, float]:
    """Scores of P(up) against 0/1 labels; independent of any model, so a champion can be re-scored.

    roc_auc, pr_auc (average precision), log_loss and brier judge the probabilities; f1 (class up),
    f1_macro, precision, recall, accuracy and mcc judge "P(up) >= threshold"; signal_rate is the
    fraction predicted up and positive_rate the fraction labelled up. P(up) is clipped to
    [PROBABILITY_CLIP, 1 - PROBABILITY_CLIP] first. Raises ValueError on a single-class `y_true`.
    """
    labels = _checked_labels(y_true)
    proba = np.clip(_checked_probability(p_up, len(labels)), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    predicted = (proba >= threshold).astype(np.int64)
    return {
        **score(labels, proba, threshold),
        "pr_auc": float(average_precision_score(labels, proba)),
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0.0)),
        "positive_rate": float(labels.mean()),
    }


# --- baselines ----------------------------------------------------------------------------------


def persistence_labels(y_holdout: pd.Series, close: pd.Series, *, horizon: int, label_threshold: float) -> np.ndarray:
    """The label of bar t - horizon for each holdout row t: the most recent label known at t.

    Labels are recomputed from `close` with the label parameters and must reproduce `y_holdout`,
    so a mismatch of label params between stages is an error rather than a silently wrong baseline.
    """
    positions = close_positions(pd.DatetimeIndex(y_holdout.index), close)
    if positions[0] < horizon:
        raise ValueError(
            f"persistence needs the label of bar t - {horizon}: close must start at least {horizon} bar(s) before "
            f"the first holdout row {y_holdout.index[0]}, it starts {positions[0]} bar(s) before"
        )
    labels = make_labels(close, horizon, label_threshold)
    recomputed = labels.reindex(y_holdout.index)
    differs = np.flatnonzero(recomputed.to_numpy() != y_holdout.to_numpy())  # NaN (unlabelled) differs too
    if differs.size:
        at = y_holdout.index[differs[0]]
        raise ValueError(
            f"y_holdout at {at} is {y_holdout.iloc[differs[0]]} but close gives label {recomputed.iloc[differs[0]]} "
            f"with label.horizon={horizon}, label.threshold={label_threshold}: pass the label params used to build it"
        )
    return labels.to_numpy()[positions - horizon]


def baseline_probabilities(
    y_holdout: pd.Series, close: pd.Series, *, prior: float | np.ndarray, horizon: int, label_threshold: float
) -> dict[str, np.ndarray]:
    """P(up) of each baseline on the evaluated rows, in BASELINE_NAMES order.

    `prior` is the positive rate of the training labels: one value, or one per row (each walk-forward
    step has its own training rows).
    """
    n_rows = len(y_holdout)
    priors = np.broadcast_to(np.asarray(prior, dtype=np.float64), (n_rows,))
    if not ((priors > 0.0) & (priors < 1.0)).all():
        raise ValueError(f"the class prior must be in (0, 1): a training set has both labels; got {priors.min()} .. {priors.max()}")
    return {
        "class_prior": priors.copy(),
        "always_up": np.ones(n_rows),
        "persistence": persistence_labels(y_holdout, close, horizon=horizon, label_threshold=label_threshold).astype(np.float64),
    }


# --- plot tables --------------------------------------------------------------------------------


def _thinned(frame: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """At most `max_points` rows evenly spread along the curve, keeping both ends."""
    if len(frame) <= max_points:
        return frame
    keep = np.unique(np.linspace(0, len(frame) - 1, max_points).round().astype(np.int64))
    return frame.iloc[keep]


def _long_table(parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([part.assign(model=name) for name, part in parts.items()], ignore_index=True)


def _with_reference(table: pd.DataFrame, **line: list[float]) -> pd.DataFrame:
    """The curves plus the line they are read against, as the series REFERENCE: chance on ROC (the diagonal), the
    base rate on precision-recall (a random ranking), perfect calibration."""
    return pd.concat([table, pd.DataFrame(line).assign(model=REFERENCE)], ignore_index=True)


def roc_table(y_true: np.ndarray, probabilities: Mapping[str, np.ndarray], max_points: int = MAX_CURVE_POINTS) -> pd.DataFrame:
    """ROC points (fpr, tpr) per model, long format with a `model` column."""
    parts = {}
    for name, proba in probabilities.items():
        fpr, tpr, _ = roc_curve(y_true, proba)
        parts[name] = _thinned(pd.DataFrame({"fpr": fpr, "tpr": tpr}), max_points)
    return _long_table(parts)


def precision_recall_table(
    y_true: np.ndarray, probabilities: Mapping[str, np.ndarray], max_points: int = MAX_CURVE_POINTS
) -> pd.DataFrame:
    """Precision-recall points per model, long format with a `model` column."""
    parts = {}
    for name, proba in probabilities.items():
        precision, recall, _ = precision_recall_curve(y_true, proba)
        parts[name] = _thinned(pd.DataFrame({"recall": recall, "precision": precision}), max_points)
    return _long_table(parts)


def calibration_table(y_true: np.ndarray, probabilities: Mapping[str, np.ndarray], n_bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Reliability curve per model: equal-count bins of P(up) (quantile bins, since P(up) crowds
    around the base rate), each with its mean P(up), fraction labelled up and row count."""
    parts = {}
    for name, proba in probabilities.items():
        bins = np.array_split(np.argsort(proba, kind="stable"), min(n_bins, len(proba)))
        parts[name] = pd.DataFrame(
            {
                "bin": np.arange(1, len(bins) + 1),
                "mean_predicted": [float(proba[rows].mean()) for rows in bins],
                "fraction_positive": [float(y_true[rows].mean()) for rows in bins],
                "count": [len(rows) for rows in bins],
            }
        )
    return _long_table(parts)


def importance_table(importances: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """feature, importance, model: one row per feature and model."""
    return _long_table({name: pd.DataFrame({"feature": list(FEATURE_NAMES), "importance": values}) for name, values in importances.items()})


# --- the whole evaluation -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """`report`: every figure (metrics/evaluation_report.json; rounded, finite, JSON-ready); `metrics`: its HEADLINE
    (metrics/evaluate.json); `plots`: one table per PLOT_NAMES entry, for the plot CSVs."""

    report: dict[str, Any]
    metrics: dict[str, Any]
    plots: dict[str, pd.DataFrame]


POLICY, FROZEN = "policy", "frozen"


def headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """The HEADLINE figures of a report, nested as in the report."""
    metrics: dict[str, Any] = {}
    for dotted, keys in HEADLINE.items():
        source, target = report, metrics
        for part in dotted.split("."):
            source, target = source[part], target.setdefault(part, {})
        target.update({key: source[key] for key in keys})
    return metrics


def _per_step(record: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """Skill of each scored step: rows, ROC AUC and log loss over the class prior's, for the policy and frozen.

    A step whose rows all have one label has no ROC AUC (left empty); the pooled figures still count its rows.
    """
    rows = []
    for step, part in record.assign(label=labels).groupby("step", sort=True):
        y = part["label"].to_numpy()
        prior = np.clip(part["prior"].to_numpy(), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
        prior_loss = float(log_loss(y, prior, labels=[0, 1]))
        entry: dict[str, Any] = {
            "step": int(step),
            "start": part["timestamp"].iloc[0].isoformat(),
            "rows": len(part),
            "positive_rate": float(y.mean()),
            "threshold": float(part["threshold"].iloc[0]),
        }
        for name, column in ((POLICY, "p_up"), (FROZEN, "frozen_p_up")):
            proba = np.clip(part[column].to_numpy(), PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
            entry[f"{name}_roc_auc"] = float(roc_auc_score(y, proba)) if 0 < y.sum() < len(y) else np.nan
            entry[f"{name}_log_loss_ratio"] = float(log_loss(y, proba, labels=[0, 1])) / prior_loss
        rows.append(entry)
    return pd.DataFrame(rows)


def _spread(values: pd.Series) -> dict[str, float]:
    defined = values.dropna()
    return {"min": float(defined.min()), "median": float(defined.median()), "max": float(defined.max())}


@dataclass(frozen=True, eq=False)
class Economics:
    """The backtest's figures per strategy, the equity and drawdown tables, and each step's after-cost returns."""

    figures: dict[str, Any]
    equity: pd.DataFrame
    drawdown: pd.DataFrame
    steps: pd.DataFrame


def strategy_positions(scored: pd.DataFrame) -> dict[str, np.ndarray]:
    """The position after each scored row of every strategy in STRATEGIES."""
    missing = [column for column in ("position", "frozen_position") if column not in scored.columns]
    if missing:
        raise ValueError(f"the out-of-sample record lacks {missing}: it was stored before trading rules; run the train stage again")
    return {
        "rule": scored["position"].to_numpy(dtype=np.int64),
        "naive": (scored["p_up"].to_numpy() >= scored["threshold"].to_numpy()).astype(np.int64),
        "frozen": scored["frozen_position"].to_numpy(dtype=np.int64),
        "buy_and_hold": np.ones(len(scored), dtype=np.int64),
    }


def economics(scored: pd.DataFrame, close: pd.Series, *, cost: float, timeframe: pd.Timedelta) -> Economics:
    """After-cost figures of every strategy on the scored rows that have a next bar in `close` (all but possibly the
    last one), with the rule's Sharpe interval and probabilistic Sharpe ratio; see cryptoml.model.backtest."""
    bars_per_year = periods_per_year(timeframe)
    index = pd.DatetimeIndex(scored["timestamp"])
    returns = next_bar_returns(index, close)
    kept = np.isfinite(returns)
    if not kept.any():
        raise ValueError(f"no evaluated row has a next bar in close (it ends at {close.index[-1]}): nothing to backtest")
    paths = {name: path_figures(positions[kept], returns[kept], cost, bars_per_year) for name, positions in strategy_positions(scored).items()}
    figures: dict[str, Any] = {
        "bars": int(kept.sum()),
        "cost_per_side": cost,
        "periods_per_year": bars_per_year,
        **{name: dict(path.figures) for name, path in paths.items()},
    }
    figures["rule"].update(uncertainty(paths["rule"].net, bars_per_year))
    # Equity from 1.0 at the first decision, then one row per bar, stamped with the close time that realises it.
    positions_in_close = close_positions(index[kept], close)
    stamps = close.index[np.concatenate(([positions_in_close[0]], positions_in_close + 1))]
    equity = pd.DataFrame({"timestamp": stamps, **{name: np.concatenate(([1.0], path.equity)) for name, path in paths.items()}})
    drawdowns = equity.assign(**{name: drawdown(equity[name].to_numpy()) for name in STRATEGIES})
    step_of_row = scored["step"].to_numpy()[kept]
    per_step = pd.DataFrame({"step": step_of_row, **{f"{name}_return": np.log1p(path.net) for name, path in paths.items()}})
    step_returns = np.expm1(per_step.groupby("step", sort=True).sum())
    rule_columns = scored.groupby("step", sort=True)[["entry", "exit", "min_hold"]].first()
    return Economics(figures=figures, equity=equity, drawdown=drawdowns, steps=rule_columns.join(step_returns).reset_index())


def evaluate_walk_forward(
    record: pd.DataFrame,
    labels: pd.Series,
    close: pd.Series,
    importances: Mapping[str, np.ndarray],
    *,
    cost: float,
    timeframe: pd.Timedelta,
    horizon: int,
    label_threshold: float,
) -> EvaluationResult:
    """Score the retrain policy, the frozen model, the components and the baselines on the evaluation span, and
    backtest the strategies after costs.

    `record` is the out-of-sample record of training.run_training (training.OOS_COLUMNS and RULE_COLUMNS); only
    its scored rows count. Every figure is computed on the same rows: the policy at each step's own threshold
    (chosen before the step), the frozen model and the baselines likewise at the first step's, the components at
    the policy's. `labels` are the current labels, `close` the candles' close prices, `importances` the production
    model's feature importances, `cost` the cost of one trade side.
    """
    scored = record[record["scored"].astype(bool)].reset_index(drop=True)
    if scored.empty:
        raise ValueError("the out-of-sample record has no scored row: no walk-forward step lies in the evaluation span")
    index = pd.DatetimeIndex(scored["timestamp"])
    y_span = labels.reindex(index)
    if y_span.isna().any():
        raise ValueError(
            f"the out-of-sample record predicts {index[y_span.isna()][0]}, which has no label in the current data: "
            "the model was trained on other candles; run the train stage again"
        )
    y_span = y_span.astype(np.int64)
    y = _checked_labels(y_span)
    step_thresholds = scored["threshold"].to_numpy()
    frozen_threshold = float(step_thresholds[0])
    models = {POLICY: scored["p_up"].to_numpy(), FROZEN: scored["frozen_p_up"].to_numpy()}
    components = {name: scored[name].to_numpy() for name in ("lightgbm", "xgboost", "random_forest")}
    baselines = baseline_probabilities(y_span, close, prior=scored["prior"].to_numpy(), horizon=horizon, label_threshold=label_threshold)
    thresholds = {POLICY: step_thresholds, FROZEN: frozen_threshold}
    metrics_by_model = {name: classification_metrics(y, proba, thresholds[name]) for name, proba in models.items()}
    baseline_metrics = {name: classification_metrics(y, proba, step_thresholds) for name, proba in baselines.items()}
    for name, figures in metrics_by_model.items():
        figures["log_loss_vs_prior"] = figures["log_loss"] / baseline_metrics["class_prior"]["log_loss"]
        figures["brier_vs_prior"] = figures["brier"] / baseline_metrics["class_prior"]["brier"]
    trading = economics(scored, close, cost=cost, timeframe=timeframe)
    steps = _per_step(scored, y).merge(trading.steps, on="step", how="left")
    report = {
        "span": {
            "rows": len(y),
            "start": index[0].isoformat(),
            "end": index[-1].isoformat(),
            "steps": len(steps),
            "positive_rate": float(y.mean()),
            "first_threshold": frozen_threshold,
            "last_threshold": float(step_thresholds[-1]),
        },
        **metrics_by_model,
        "components": {name: classification_metrics(y, proba, step_thresholds) for name, proba in components.items()},
        "baselines": baseline_metrics,
        "backtest": trading.figures,
        "steps": {
            "policy_roc_auc": _spread(steps[f"{POLICY}_roc_auc"]),
            "policy_log_loss_ratio": _spread(steps[f"{POLICY}_log_loss_ratio"]),
            "policy_beats_frozen": int((steps[f"{POLICY}_roc_auc"] > steps[f"{FROZEN}_roc_auc"]).sum()),
            "rule_positive_steps": int((steps["rule_return"] > 0.0).sum()),
        },
    }
    curves = {**models, **components}
    base_rate = float(y.mean())
    plots = {
        "roc": _with_reference(roc_table(y, curves), fpr=[0.0, 1.0], tpr=[0.0, 1.0]),
        "precision_recall": _with_reference(precision_recall_table(y, curves), recall=[0.0, 1.0], precision=[base_rate, base_rate]),
        "calibration": _with_reference(calibration_table(y, curves), mean_predicted=[0.0, 1.0], fraction_positive=[0.0, 1.0]),
        "confusion": pd.DataFrame({"actual": y, "predicted": (models[POLICY] >= step_thresholds).astype(np.int64)}),
        "feature_importance": importance_table(importances),
        "equity": trading.equity,
        "drawdown": trading.drawdown,
        "walk_forward": steps.assign(**{f"{REFERENCE}_roc_auc": 0.5, f"{REFERENCE}_log_loss_ratio": 1.0}),
    }
    rounded = rounded_json(report)
    return EvaluationResult(report=rounded, metrics=headline(rounded), plots=plots)
