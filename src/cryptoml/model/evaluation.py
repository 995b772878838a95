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

Backtest: at each row t the position for the next bar is 1 (long) if the model predicts up at t,
else 0 (flat), decided afresh every bar whatever the label horizon. The next bar's return is
close[t+1] / close[t] - 1, with t+1 the next bar of the close series; the last row has one when the
close series goes on past it (it does in the pipeline, whose last `horizon` bars have no label),
otherwise that row is left out of the backtest only. See `backtest` for fees and figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, f1_score, log_loss, precision_recall_curve, roc_auc_score, roc_curve

from cryptoml.features.manager import FEATURE_NAMES
from cryptoml.io import rounded_json
from cryptoml.model.labels import make_labels
from cryptoml.model.training import score

PROBABILITY_CLIP = 1e-15
MAX_CURVE_POINTS = 200
CALIBRATION_BINS = 10
DAYS_PER_YEAR = 365  # crypto trades around the clock, every day of the year

BASELINE_NAMES: tuple[str, ...] = ("class_prior", "always_up", "persistence")
PLOT_NAMES: tuple[str, ...] = ("roc", "precision_recall", "calibration", "confusion", "feature_importance", "equity", "walk_forward")


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


def _require_close(close: pd.Series) -> None:
    if not isinstance(close, pd.Series) or not isinstance(close.index, pd.DatetimeIndex):
        raise ValueError("close must be a pandas Series indexed by the candle timestamps")
    if not close.index.is_unique or not close.index.is_monotonic_increasing:
        raise ValueError("close: the index must be unique, strictly increasing timestamps")


def _close_positions(index: pd.DatetimeIndex, close: pd.Series) -> np.ndarray:
    """Position in `close` of each row of `index`; the rows must be consecutive bars of `close`.

    A row missing in between would make the backtest skip that bar's return silently.
    """
    _require_close(close)
    positions = close.index.get_indexer(index)
    missing = np.flatnonzero(positions < 0)
    if missing.size:
        raise ValueError(f"{missing.size} holdout timestamp(s) are not in close, first {index[missing[0]]}")
    jumps = np.flatnonzero(np.diff(positions) != 1)
    if jumps.size:
        raise ValueError(
            f"holdout rows must be consecutive bars of close; after {index[jumps[0]]} the next holdout row is "
            f"{index[jumps[0] + 1]}, {positions[jumps[0] + 1] - positions[jumps[0]] - 1} close bar(s) later"
        )
    return positions


def persistence_labels(y_holdout: pd.Series, close: pd.Series, *, horizon: int, label_threshold: float) -> np.ndarray:
    """The label of bar t - horizon for each holdout row t: the most recent label known at t.

    Labels are recomputed from `close` with the label parameters and must reproduce `y_holdout`,
    so a mismatch of label params between stages is an error rather than a silently wrong baseline.
    """
    positions = _close_positions(pd.DatetimeIndex(y_holdout.index), close)
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


# --- backtest -----------------------------------------------------------------------------------


def periods_per_year(timeframe: pd.Timedelta) -> float:
    """Bars in a year of round-the-clock trading: 8760 for 1h, 365 for 1d."""
    if not isinstance(timeframe, pd.Timedelta) or timeframe <= pd.Timedelta(0):
        raise ValueError(f"timeframe must be a positive pd.Timedelta (e.g. parse_timeframe('1h')), got {timeframe!r}")
    return pd.Timedelta(days=DAYS_PER_YEAR) / timeframe


def sharpe_ratio(bar_returns: np.ndarray, bars_per_year: float) -> float:
    """Annualised Sharpe ratio (risk-free rate 0, sample std); 0 when undefined (< 2 bars or no variation)."""
    if len(bar_returns) < 2 or np.ptp(bar_returns) == 0.0:  # the std of equal floats can round to 1e-19, not 0
        return 0.0
    return float(np.mean(bar_returns)) / float(np.std(bar_returns, ddof=1)) * math.sqrt(bars_per_year)


def max_drawdown(equity: np.ndarray) -> float:
    """Deepest fall from a running peak as a fraction <= 0 (-0.25: a quarter of the peak was lost)."""
    return float(np.min(equity / np.maximum.accumulate(equity)) - 1.0)


def _trading_figures(positions: np.ndarray, bar_returns: np.ndarray, fee: float, bars_per_year: float) -> tuple[dict[str, float], np.ndarray]:
    """Figures of one position series and its equity after each bar (starting from 1)."""
    changes = np.abs(np.diff(positions, prepend=0))  # flat before the first bar
    net_returns = (1.0 - fee) ** changes * (1.0 + positions * bar_returns) - 1.0
    equity = np.cumprod(1.0 + net_returns)
    in_market = positions == 1
    figures = {
        "total_return": float(equity[-1] - 1.0),
        "sharpe": sharpe_ratio(net_returns, bars_per_year),
        "max_drawdown": max_drawdown(np.concatenate(([1.0], equity))),
        "trades": int(changes.sum()),
        "hit_rate": float(np.mean(net_returns[in_market] > 0.0)) if in_market.any() else 0.0,
        "exposure": float(in_market.mean()),
    }
    return figures, equity


@dataclass(frozen=True, eq=False)
class Backtest:
    """`metrics`: bars, fee, periods_per_year and the figures of "strategy" and "buy_and_hold";
    `equity`: timestamp, strategy, buy_and_hold (equity from 1.0 at the first decision)."""

    metrics: dict[str, Any]
    equity: pd.DataFrame


def backtest(signal: pd.Series, close: pd.Series, *, fee: float, timeframe: pd.Timedelta) -> Backtest:
    """Long for the next bar where `signal` (0/1, indexed by decision time) is 1, flat where 0.

    Fees: `fee` is the cost of one trade side as a fraction of the traded value; every position
    change (entering or leaving) multiplies equity by 1 - fee. The strategy starts flat; both it and
    buy-and-hold (one entry fee at the first bar) are marked to market at the last close with no
    closing fee, so buy-and-hold returns (1 - fee) * last / first - 1.

    Figures: total_return; sharpe (annualised from per-bar net returns with `periods_per_year`);
    max_drawdown (a fraction <= 0); trades (position changes); hit_rate (fraction of bars in the
    market whose net return, fee included, is positive; 0 if never in the market); exposure
    (fraction of bars in the market). The equity table starts at 1.0 at the first decision time,
    then one row per bar stamped with the timestamp of the bar whose close realises its return.
    """
    if not (math.isfinite(fee) and 0.0 <= fee < 1.0):
        raise ValueError(f"fee must be a fraction per trade side in [0, 1), e.g. 1.0e-3; got {fee!r}")
    bars_per_year = periods_per_year(timeframe)
    positions = np.asarray(signal, dtype=np.int64)
    if not np.isin(positions, (0, 1)).all():
        raise ValueError("signal must be 0 (flat) or 1 (long) on every row")
    start = _close_positions(pd.DatetimeIndex(signal.index), close)
    kept = start + 1 < len(close)  # only the last row can lack a next bar
    start, positions = start[kept], positions[kept]
    if len(start) == 0:
        raise ValueError(f"no holdout row has a next bar in close (it ends at {close.index[-1]}): nothing to backtest")
    prices = close.to_numpy(dtype=np.float64)
    bar_returns = prices[start + 1] / prices[start] - 1.0
    strategy, strategy_equity = _trading_figures(positions, bar_returns, fee, bars_per_year)
    holding, holding_equity = _trading_figures(np.ones_like(positions), bar_returns, fee, bars_per_year)
    equity = pd.DataFrame(
        {
            "timestamp": close.index[np.concatenate(([start[0]], start + 1))],
            "strategy": np.concatenate(([1.0], strategy_equity)),
            "buy_and_hold": np.concatenate(([1.0], holding_equity)),
        }
    )
    metrics = {
        "bars": len(start),
        "fee": fee,
        "periods_per_year": bars_per_year,
        "strategy": strategy,
        "buy_and_hold": holding,
    }
    return Backtest(metrics=metrics, equity=equity)


# --- plot tables --------------------------------------------------------------------------------


def _thinned(frame: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """At most `max_points` rows evenly spread along the curve, keeping both ends."""
    if len(frame) <= max_points:
        return frame
    keep = np.unique(np.linspace(0, len(frame) - 1, max_points).round().astype(np.int64))
    return frame.iloc[keep]


def _long_table(parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([part.assign(model=name) for name, part in parts.items()], ignore_index=True)


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
    """`metrics`: the content of metrics/evaluate.json (rounded, finite, JSON-ready);
    `plots`: one table per PLOT_NAMES entry, for the plot CSVs."""

    metrics: dict[str, Any]
    plots: dict[str, pd.DataFrame]


POLICY, FROZEN = "policy", "frozen"


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


def evaluate_walk_forward(
    record: pd.DataFrame,
    labels: pd.Series,
    close: pd.Series,
    importances: Mapping[str, np.ndarray],
    *,
    fee: float,
    timeframe: pd.Timedelta,
    horizon: int,
    label_threshold: float,
) -> EvaluationResult:
    """Score the retrain policy, the frozen model, the components and the baselines on the evaluation span.

    `record` is the out-of-sample record of training.run_training (training.OOS_COLUMNS); only its
    scored rows count. Every figure is computed on the same rows: the policy at each step's own
    threshold (chosen before the step), the frozen model and the baselines likewise at the first
    step's, the components at the policy's. `labels` are the current labels, `close` the candles'
    close prices, `importances` the production model's feature importances.
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
    signals = {name: (proba >= thresholds[name]).astype(np.int64) for name, proba in models.items()}
    trading = {name: backtest(pd.Series(signal, index=index), close, fee=fee, timeframe=timeframe) for name, signal in signals.items()}
    steps = _per_step(scored, y)
    metrics = {
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
        "backtest": {
            **{key: trading[POLICY].metrics[key] for key in ("bars", "fee", "periods_per_year")},
            **{name: result.metrics["strategy"] for name, result in trading.items()},
            "buy_and_hold": trading[POLICY].metrics["buy_and_hold"],
        },
        "steps": {
            "policy_roc_auc": _spread(steps[f"{POLICY}_roc_auc"]),
            "policy_log_loss_ratio": _spread(steps[f"{POLICY}_log_loss_ratio"]),
            "policy_beats_frozen": int((steps[f"{POLICY}_roc_auc"] > steps[f"{FROZEN}_roc_auc"]).sum()),
        },
    }
    curves = {**models, **components}
    equity = trading[POLICY].equity.rename(columns={"strategy": POLICY})
    equity.insert(2, FROZEN, trading[FROZEN].equity["strategy"].to_numpy())
    plots = {
        "roc": roc_table(y, curves),
        "precision_recall": precision_recall_table(y, curves),
        "calibration": calibration_table(y, curves),
        "confusion": pd.DataFrame({"actual": y, "predicted": signals[POLICY]}),
        "feature_importance": importance_table(importances),
        "equity": equity,
        "walk_forward": steps,
    }
    return EvaluationResult(metrics=rounded_json(metrics), plots=plots)
