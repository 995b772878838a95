"""The retrain policy replayed walk-forward, the decision threshold and the production fit, as pure functions.

The training stage reads candles, features and params and writes the model and metrics; everything
in between is here, with no file, clock or git access, so a rerun on the same inputs gives the
same model and the same numbers.

The production model is fitted on every labelled row up to data.end: it is what the weekly retrain
delivers. It cannot be scored on rows it saw, so what the stage measures is the *policy* that made
it: over the evaluation span (labels.walk_forward_steps) a model is fitted at every step on the rows
before it and predicts the step's rows. Those pooled predictions, each made by a model that never
saw its row, are the out-of-sample record (`OOS_COLUMNS`) stored with the model. Every fit is an
independent task (`fit_and_predict`) that the executor may run anywhere.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cryptoml.io import METRICS_DECIMALS, rounded_json
from cryptoml.model.drift import feature_reference
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.executor import ExecutorSettings, TransferStats, run_tasks
from cryptoml.model.backtest import next_bar_returns
from cryptoml.model.labels import Holdout, Step, build_dataset, walk_forward_steps
from cryptoml.model.rule import TradingRule
from cryptoml.model.trading import Costs, RuleGrid, choose_rules, rule_positions

ENSEMBLE = "ensemble"

# Candidate thresholds: these quantiles of the out-of-fold P(up), so the signal fires on 5 % to 95 % of bars.
THRESHOLD_QUANTILES: np.ndarray = np.linspace(0.05, 0.95, 91)

ModelParams = Mapping[str, Mapping[str, Any]]


def choose_threshold(y_true: np.ndarray, proba: np.ndarray, quantiles: np.ndarray = THRESHOLD_QUANTILES) -> float:
    """The decision threshold on P(up), chosen on out-of-sample predictions that exist before it is used.

    Rule: the candidates are the 5 %, 6 %, ..., 95 % quantiles of the out-of-sample P(up), rounded to
    6 decimals; "up" is predicted when P(up) >= threshold. The candidate with the highest Matthews
    correlation coefficient (MCC) between prediction and label wins; ties go to the higher
    threshold, i.e. fewer and surer signals.

    Why MCC: the label is imbalanced (a move above the threshold is the rarer class). F1 of the
    positive class rewards a weak model for predicting "up" on every bar (that alone scores
    2p / (1 + p) at base rate p), a useless trading signal; accuracy rewards never signalling. MCC
    scores both 0 and rewards only real separation of up-moves from the rest.
    """
    candidates = np.unique(np.round(np.quantile(proba, quantiles), METRICS_DECIMALS))
    scores = mcc_at_thresholds(y_true, proba, candidates)
    best = np.flatnonzero(scores == scores.max())[-1]  # candidates are sorted: the last is the highest
    return float(candidates[best])


def mcc_at_thresholds(y_true: np.ndarray, proba: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """MCC of "P(up) >= t" for every t at once (0 where undefined, as in scikit-learn).

    One sort instead of a matthews_corrcoef call per candidate, which took seconds per model.
    """
    labels = np.asarray(y_true).astype(bool)
    up_scores, other_scores = np.sort(proba[labels]), np.sort(proba[~labels])
    tp = (len(up_scores) - np.searchsorted(up_scores, thresholds, side="left")).astype(np.float64)
    fp = (len(other_scores) - np.searchsorted(other_scores, thresholds, side="left")).astype(np.float64)
    fn, tn = len(up_scores) - tp, len(other_scores) - fp
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def score(y_true: np.ndarray, proba: np.ndarray, threshold: float) -> dict[str, float]:
    """Out-of-sample scores of P(up): ranking and calibration need no threshold, the rest use it."""
    predicted = (proba >= threshold).astype(np.int64)
    return {
        "roc_auc": float(roc_auc_score(y_true, proba)),
        "log_loss": float(log_loss(y_true, proba, labels=[0, 1])),
        "brier": float(brier_score_loss(y_true, proba)),
        "f1": float(f1_score(y_true, predicted, zero_division=0.0)),
        "precision": float(precision_score(y_true, predicted, zero_division=0.0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0.0)),
        "accuracy": float(accuracy_score(y_true, predicted)),
        "mcc": float(matthews_corrcoef(y_true, predicted)),
        "signal_rate": float(predicted.mean()),
    }


@dataclass(frozen=True)
class FitSettings:
    """How every model of the run is built: the same for each walk-forward step and for production."""

    weights: Mapping[str, float] | None
    model_params: ModelParams | None
    random_state: int
    n_jobs: int


@dataclass(frozen=True, eq=False)
class FitData:
    """The labelled rows as plain arrays: sent to the workers once, shared by every task."""

    X: np.ndarray
    y: np.ndarray
    settings: FitSettings


@dataclass(frozen=True)
class FitTask:
    """Fit on rows [0, train_stop), predict rows [predict_start, predict_stop); keep the model only if asked."""

    name: str
    train_stop: int
    predict_start: int
    predict_stop: int
    keep_model: bool = False


@dataclass(frozen=True, eq=False)
class FitResult:
    proba: dict[str, np.ndarray]  # ENSEMBLE and each component, on the predicted rows
    fingerprint: str  # ProductionEnsemble.fingerprint(): the same task gives the same model anywhere
    model: ProductionEnsemble | None


def _require_both_labels(y: np.ndarray, what: str) -> None:
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"{what} ({len(y)} rows) all have label {y[0] if len(y) else None}: a model cannot be fitted on one class; "
            "use more data, a longer retrain.every or another label.threshold"
        )


def fit_and_predict(data: FitData, task: FitTask) -> FitResult:
    """One independent fit: a pure function of the shared rows and the task, seeded, with a fixed thread count."""
    _require_both_labels(data.y[: task.train_stop], f"the training rows of {task.name}")
    settings = data.settings
    model = ProductionEnsemble(
        weights=settings.weights, model_params=settings.model_params, random_state=settings.random_state, n_jobs=settings.n_jobs
    ).fit(data.X[: task.train_stop], data.y[: task.train_stop])
    rows = data.X[task.predict_start : task.predict_stop]
    proba = model.component_proba(rows) if len(rows) else {}
    proba[ENSEMBLE] = model.predict_proba(rows)[:, 1] if len(rows) else np.empty(0)
    return FitResult(proba=proba, fingerprint=model.fingerprint(), model=model if task.keep_model else None)


# The out-of-sample record: one row per walk-forward prediction. `threshold` is the decision threshold of the
# row's step (chosen from earlier predictions; empty on warm-up rows), `prior` the positive rate of the step's
# training rows (the class_prior baseline), `p_up` the policy's P(up), then each component's, and `frozen_p_up`
# the P(up) of the first scored step's model kept for the whole span (empty before the span).
OOS_COLUMNS: tuple[str, ...] = (
    "timestamp", "step", "scored", "threshold", "prior", "p_up", "lightgbm", "xgboost", "random_forest", "frozen_p_up",
)
# The trading rule of each scored row's step (chosen on earlier rows; empty for a flat rule and on warm-up rows),
# the position the walk-forward rule holds after the row, and the frozen model's with its own walk-forward rule. Records
# stored before trading rules existed lack them: they still load, and are compared on P(up) only.
RULE_COLUMNS: tuple[str, ...] = ("entry", "exit", "min_hold", "position", "frozen_position")


def record_to_csv(record: pd.DataFrame) -> bytes:
    """The record as the CSV stored with the model: ISO timestamps, floats that read back exactly."""
    text = record.assign(timestamp=record["timestamp"].map(pd.Timestamp.isoformat)).to_csv(
        index=False, float_format="%.17g", lineterminator="\n"
    )
    return text.encode()


def record_from_csv(data: bytes, source: str) -> pd.DataFrame:
    """Read a stored record back; `source` names the file in errors."""
    try:
        record = pd.read_csv(io.BytesIO(data))
        missing = [column for column in OOS_COLUMNS if column not in record.columns]
        partial = [column for column in RULE_COLUMNS if column not in record.columns]
        if partial and len(partial) < len(RULE_COLUMNS):
            missing += partial
        if missing:
            raise ValueError(f"missing columns {missing}")
        record["timestamp"] = pd.to_datetime(record["timestamp"], utc=True, format="ISO8601")
    except ValueError as exc:
        raise ValueError(f"{source}: not an out-of-sample record ({', '.join(OOS_COLUMNS)}): {exc}") from None
    return record


def step_threshold(step: Step, first: int, labels: np.ndarray, p_up: np.ndarray, horizon: int) -> float:
    """The threshold a step uses: chosen on earlier out-of-sample rows whose label is known when the step starts.

    `p_up` holds the out-of-sample P(up) of the rows from `first` (the first walk-forward row) on, `labels` every
    row's label. A row's label needs `horizon` more bars, so rows within `horizon` of the step's start are left out.
    """
    known = step.start - horizon  # rows [first, known) have a label by the time the step starts
    if known <= first:
        raise ValueError(f"walk-forward step {step.number} has no earlier out-of-sample prediction with a known label")
    return choose_threshold(labels[first:known], p_up[: known - first])


@dataclass(frozen=True)
class RuleSettings:
    """How the trading rule is chosen: the costs it pays and the P(up) grid of its thresholds."""

    costs: Costs
    grid: RuleGrid


def out_of_sample_record(
    index: pd.DatetimeIndex,
    y: np.ndarray,
    bar_returns: np.ndarray,
    steps: Sequence[Step],
    results: Sequence[FitResult],
    horizon: int,
    rules: RuleSettings,
) -> tuple[pd.DataFrame, list[TradingRule]]:
    """Pool the steps' predictions into the record (OOS_COLUMNS, RULE_COLUMNS), choosing each scored step's
    threshold and trading rule on the way; also return the scored steps' rules.

    `bar_returns` holds each row's next-bar return. A step's rule is chosen on the record's rows before it whose
    return is known when it starts (cryptoml.model.trading), then trades the step's rows; the position carries over
    from one step to the next. The frozen model's rule is chosen the same way on its own record: the warm-up rows,
    then its own P(up) from the span's start, so policy and frozen differ only in retraining the model.
    """
    first, stop = steps[0].start, steps[-1].stop
    n_rows = stop - first
    columns: dict[str, np.ndarray] = {
        "step": np.zeros(n_rows, dtype=np.int64),
        "scored": np.zeros(n_rows, dtype=bool),
        "threshold": np.full(n_rows, np.nan),
        "prior": np.zeros(n_rows),
        "frozen_p_up": np.full(n_rows, np.nan),
        **{name: np.zeros(n_rows) for name in ("p_up", *(name for name in results[0].proba if name != ENSEMBLE))},
        "entry": np.full(n_rows, np.nan),
        "exit": np.full(n_rows, np.nan),
        "min_hold": np.zeros(n_rows, dtype=np.int64),
    }
    frozen_step = next(step for step in steps if step.scored)
    for step, result in zip(steps, results, strict=True):
        rows = slice(step.start - first, step.stop - first)
        size = step.stop - step.start
        columns["step"][rows] = step.number
        columns["scored"][rows] = step.scored
        columns["prior"][rows] = y[: step.train_stop].mean()
        columns["p_up"][rows] = result.proba[ENSEMBLE][:size]
        for name, proba in result.proba.items():
            if name != ENSEMBLE:
                columns[name][rows] = proba[:size]
        if step.scored:
            columns["threshold"][rows] = step_threshold(step, first, y, columns["p_up"], horizon)
        if step is frozen_step:
            columns["frozen_p_up"][step.start - first :] = result.proba[ENSEMBLE]
    scored = [step for step in steps if step.scored]
    returns = bar_returns[first:stop]
    step_rules, columns["position"] = walk_forward_rule(columns["p_up"], returns, scored, first, rules)
    for rule, step in zip(step_rules, scored, strict=True):
        rows = slice(step.start - first, step.stop - first)
        columns["entry"][rows] = np.nan if rule.entry is None else rule.entry
        columns["exit"][rows] = np.nan if rule.exit is None else rule.exit
        columns["min_hold"][rows] = rule.min_hold
    frozen_record = np.where(np.isnan(columns["frozen_p_up"]), columns["p_up"], columns["frozen_p_up"])
    _, columns["frozen_position"] = walk_forward_rule(frozen_record, returns, scored, first, rules)
    record = pd.DataFrame({"timestamp": index[first:stop], **columns})
    return record[[*OOS_COLUMNS, *RULE_COLUMNS]], step_rules


def walk_forward_rule(
    p_up: np.ndarray, bar_returns: np.ndarray, scored: Sequence[Step], first: int, rules: RuleSettings
) -> tuple[list[TradingRule], np.ndarray]:
    """Each scored step's trading rule, chosen on the record's rows whose next-bar return is known when the step
    starts, and the positions the rules hold step after step. `p_up` and `bar_returns` are the record's rows, which
    start at dataset row `first`."""
    known = [step.start - 1 - first for step in scored]
    step_rules = choose_rules(p_up, bar_returns, rules.costs.per_side, rules.grid, known)
    return step_rules, rule_positions(p_up, step_rules, [(step.start - first, step.stop - first) for step in scored])


@dataclass(frozen=True)
class TrainingSettings:
    """What the training stage needs from params.yaml, as plain values."""

    horizon: int
    threshold: float
    holdout: Holdout
    embargo: int
    every: pd.Timedelta
    warmup_steps: int
    fit: FitSettings
    rules: RuleSettings


@dataclass(frozen=True, eq=False)
class TrainingResult:
    """The production model, the policy's out-of-sample record and everything needed to report on them."""

    settings: TrainingSettings
    ensemble: ProductionEnsemble
    steps: list[Step]
    record: pd.DataFrame
    step_rules: list[TradingRule]  # the rule each scored step traded, chosen before it
    step_fingerprints: list[str]
    feature_names: tuple[str, ...]
    train_index: pd.DatetimeIndex
    train_positive_rate: float
    transfer: TransferStats  # what the fits sent to their workers
    # The distribution of each feature on the rows the model was fitted on, which `cryptoml monitor` compares with.
    feature_reference: dict[str, Any]

    @property
    def decision_threshold(self) -> float:
        return float(self.ensemble.decision_threshold)

    def step_summaries(self) -> list[dict[str, Any]]:
        """Each walk-forward step: its rows, its training rows, the fingerprint of its model and its trading rule."""
        index = self.record["timestamp"]
        first = self.steps[0].start
        rules = iter(self.step_rules)
        return [
            {
                "step": step.number,
                "scored": step.scored,
                "start": index.iloc[step.start - first].isoformat(),
                "end": index.iloc[step.stop - 1 - first].isoformat(),
                "rows": step.stop - step.start,
                "train_rows": step.train_stop,
                "train_end": self.train_index[step.train_stop - 1].isoformat(),
                "model_fingerprint": fingerprint,
                "trading_rule": next(rules).as_json() if step.scored else None,
            }
            for step, fingerprint in zip(self.steps, self.step_fingerprints, strict=True)
        ]


def build_train_metrics(result: TrainingResult) -> dict[str, Any]:
    """metrics/train.json: the production fit's rows and threshold, and the shape of the walk-forward behind it."""
    record, settings = result.record, result.settings
    scored = record[record["scored"]]
    return rounded_json(
        {
            "decision_threshold": result.decision_threshold,
            "trading_rule": result.ensemble.rule.as_json(),
            "samples": {
                "labelled": len(result.train_index),
                "train": len(result.train_index),
                "train_positive_rate": result.train_positive_rate,
                "out_of_sample": len(record),
                "evaluation_span": len(scored),
            },
            "walk_forward": {
                "every": duration_text(settings.every),
                "steps": int(record["step"].nunique()),
                "warmup_steps": int(record.loc[~record["scored"], "step"].nunique()),
                "span_start": scored["timestamp"].iloc[0].isoformat(),
                "span_end": scored["timestamp"].iloc[-1].isoformat(),
            },
        }
    )


def plan_fits(X: pd.DataFrame, y: pd.Series, cfg: TrainingSettings) -> tuple[list[Step], FitData, list[FitTask]]:
    """The walk-forward steps and every fit the stage runs: one per step, then the production fit.

    The first scored step's fit predicts through the last row: its model is also the frozen one.
    """
    steps = walk_forward_steps(X.index, cfg.holdout, cfg.every, cfg.warmup_steps, cfg.horizon, cfg.embargo)
    frozen_step = next(step for step in steps if step.scored)
    tasks = [
        FitTask(f"walk-forward step {step.number}", step.train_stop, step.start, len(X) if step is frozen_step else step.stop)
        for step in steps
    ]
    tasks.append(FitTask("the production model", len(X), len(X), len(X), keep_model=True))
    data = FitData(X=X.to_numpy(dtype=np.float64), y=y.to_numpy(dtype=np.int64), settings=cfg.fit)
    return steps, data, tasks


def run_training(features: pd.DataFrame, close: pd.Series, cfg: TrainingSettings, executor: ExecutorSettings) -> TrainingResult:
    """Replay the retrain policy walk-forward, choose the threshold on its predictions, fit production on every row.

    The production fit is one more independent task beside the steps, so all of them run in parallel.
    """
    X, y = build_dataset(features, close, cfg.horizon, cfg.threshold)
    steps, data, tasks = plan_fits(X, y, cfg)
    run = run_tasks(fit_and_predict, data, tasks, executor, description="model fits")
    results = run.results
    bar_returns = next_bar_returns(X.index, close)
    record, step_rules = out_of_sample_record(X.index, data.y, bar_returns, steps, results[:-1], cfg.horizon, cfg.rules)
    production = results[-1].model
    assert production is not None  # keep_model=True
    # Every out-of-sample label and next-bar return is known at data.end: production's threshold and trading rule
    # are chosen on them all, as a next step's would be.
    positions = X.index.get_indexer(record["timestamp"])
    p_up = record["p_up"].to_numpy()
    (rule,) = choose_rules(p_up, bar_returns[positions], cfg.rules.costs.per_side, cfg.rules.grid, [len(record)])
    production.set_params(decision_threshold=choose_threshold(data.y[positions], p_up), trading_rule=rule)
    return TrainingResult(
        settings=cfg,
        ensemble=production,
        steps=steps,
        record=record,
        step_rules=step_rules,
        step_fingerprints=[fit.fingerprint for fit in results[:-1]],
        feature_names=tuple(X.columns),
        train_index=X.index,
        train_positive_rate=float(y.mean()),
        transfer=run.transfer,
        feature_reference=feature_reference(X),
    )


def duration_text(duration: pd.Timedelta) -> str:
    """A step length as params.yaml writes it ("30D", "12h")."""
    days, remainder = divmod(duration, pd.Timedelta(days=1))
    return f"{days}D" if remainder == pd.Timedelta(0) else to_offset(duration).freqstr


def _describe_validation(cfg: TrainingSettings, steps: Sequence[Step]) -> str:
    scored = sum(step.scored for step in steps)
    return (
        f"walk-forward replay of the retrain policy: {scored} steps of retrain.every={duration_text(cfg.every)} over the evaluation span "
        f"(split.holdout={cfg.holdout}) after {len(steps) - scored} warm-up step(s); each step fitted on every earlier row "
        f"but a purge gap of {cfg.horizon + cfg.embargo} rows (label horizon {cfg.horizon} + embargo {cfg.embargo}), "
        "with a decision threshold and a trading rule chosen on earlier out-of-sample predictions (the rule on their "
        f"after-cost log growth at {cfg.rules.costs.per_side:g} per side); production fitted on every labelled row"
    )


def build_training_metadata(
    result: TrainingResult,
    *,
    created_at: str,
    model_file: str,
    model_hash: str,
    git_commit: str | None,
    previous_version: str | None,
    feature_manager_version: str,
    params: Mapping[str, Any],
    library_versions: Mapping[str, str],
) -> dict[str, Any]:
    """models/training/training_metadata.json; every outside fact (time, git, hash) is passed in."""
    scored = result.record[result.record["scored"]]
    return rounded_json(
        {
            "created_at": created_at,
            "model_type": type(result.ensemble).__name__,
            "model_file": model_file,
            "status": "training",
            "feature_manager_version": feature_manager_version,
            "feature_names": list(result.feature_names),
            "individual_models": [name for name in result.ensemble.weights_],
            "model_weights": dict(result.ensemble.weights_),
            "decision_threshold": result.decision_threshold,
            "trading_rule": {
                **result.ensemble.rule.as_json(),
                "description": result.ensemble.rule.describe(),
                "chosen_on": "the whole out-of-sample record: highest after-cost log growth over the grid, flat if none grew",
                "costs": {"fee": result.settings.rules.costs.fee, "slippage": result.settings.rules.costs.slippage},
            },
            "training_info": {
                "samples_count": len(result.train_index),
                "positive_rate": result.train_positive_rate,
                "label": {"horizon": result.settings.horizon, "threshold": result.settings.threshold},
                "validation_method": _describe_validation(result.settings, result.steps),
                "data_start": result.train_index[0].isoformat(),
                "data_end": result.train_index[-1].isoformat(),
                "evaluation_start": scored["timestamp"].iloc[0].isoformat(),
                "evaluation_end": scored["timestamp"].iloc[-1].isoformat(),
                "last_retrain": created_at,
            },
            "walk_forward": {"every": duration_text(result.settings.every), "steps": result.step_summaries()},
            "version_control": {
                "git_commit": git_commit,
                "model_hash": model_hash,
                "previous_version": previous_version,
            },
            "params": dict(params),
            "library_versions": dict(library_versions),
            "feature_reference": result.feature_reference,
        }
    )
