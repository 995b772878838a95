"""Cross-validation, the decision threshold and the final fit, as pure functions.

The training stage reads candles, features and params and writes the model and metrics; everything
in between is here, with no file, clock or git access, so a rerun on the same inputs gives the
same model and the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
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

from cryptoml.drift import feature_reference
from cryptoml.ensemble import ProductionEnsemble
from cryptoml.io import METRICS_DECIMALS, rounded_json
from cryptoml.labels import Fold, Holdout, HoldoutSplit, build_dataset, holdout_split, walk_forward_splits

ENSEMBLE = "ensemble"

# Candidate thresholds: these quantiles of the out-of-fold P(up), so the signal fires on 5 % to 95 % of bars.
THRESHOLD_QUANTILES: np.ndarray = np.linspace(0.05, 0.95, 91)

ModelParams = Mapping[str, Mapping[str, Any]]


def choose_threshold(y_true: np.ndarray, proba: np.ndarray, quantiles: np.ndarray = THRESHOLD_QUANTILES) -> float:
    """The decision threshold on P(up), chosen on out-of-fold predictions only (never the holdout).

    Rule: the candidates are the 5 %, 6 %, ..., 95 % quantiles of the out-of-fold P(up), rounded to
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


@dataclass(frozen=True, eq=False)
class CVResult:
    """Walk-forward results of each component model and the ensemble ("ensemble").

    `oof_proba[name]` holds P(up) on the validation rows of all folds in fold order, aligned with
    `oof_labels`; `thresholds[name]` is `choose_threshold` applied to it (so a component is scored at
    its own best threshold, not the ensemble's); `scores[name][metric]` has one value per fold.
    """

    folds: list[Fold]
    oof_labels: np.ndarray
    oof_proba: dict[str, np.ndarray]
    thresholds: dict[str, float]
    scores: dict[str, dict[str, list[float]]]

    @property
    def decision_threshold(self) -> float:
        return self.thresholds[ENSEMBLE]

    def mean_scores(self, name: str = ENSEMBLE) -> dict[str, float]:
        return {metric: float(np.mean(values)) for metric, values in self.scores[name].items()}


def _require_both_labels(y: pd.Series, what: str) -> None:
    if y.nunique() < 2:
        raise ValueError(
            f"{what} ({y.index[0]} .. {y.index[-1]}, {len(y)} rows) all have label {y.iloc[0]}: "
            "a model cannot be fitted or scored on one class; use fewer cv.n_splits, more data or another label.threshold"
        )


def cross_validate(
    X: pd.DataFrame,
    y: pd.Series,
    splits: Sequence[Fold],
    *,
    weights: Mapping[str, float] | None,
    model_params: ModelParams | None,
    random_state: int,
    n_jobs: int,
) -> CVResult:
    """Fit a fresh ensemble per fold and score it on the fold's validation rows.

    Thresholded scores need the threshold, and the threshold needs all out-of-fold probabilities:
    so every fold is predicted first, then the thresholds are chosen on the pooled predictions,
    then each fold is scored.
    """
    if not splits:
        raise ValueError("cross_validate needs at least one (train, validation) fold, got none")
    fold_proba: list[dict[str, np.ndarray]] = []
    for number, (train, val) in enumerate(splits, start=1):
        _require_both_labels(y.iloc[train], f"CV fold {number} training rows")
        _require_both_labels(y.iloc[val], f"CV fold {number} validation rows")
        model = ProductionEnsemble(weights=weights, model_params=model_params, random_state=random_state, n_jobs=n_jobs)
        model.fit(X.iloc[train], y.iloc[train])
        proba = model.component_proba(X.iloc[val])
        proba[ENSEMBLE] = model.predict_proba(X.iloc[val])[:, 1]
        fold_proba.append(proba)

    fold_labels = [y.iloc[val].to_numpy() for _, val in splits]
    oof_labels = np.concatenate(fold_labels)
    names = list(fold_proba[0])
    oof_proba = {name: np.concatenate([proba[name] for proba in fold_proba]) for name in names}
    thresholds = {name: choose_threshold(oof_labels, oof_proba[name]) for name in names}
    scores: dict[str, dict[str, list[float]]] = {}
    for name in names:
        per_fold = [score(labels, proba[name], thresholds[name]) for labels, proba in zip(fold_labels, fold_proba, strict=True)]
        scores[name] = {metric: [fold[metric] for fold in per_fold] for metric in per_fold[0]}
    return CVResult(folds=list(splits), oof_labels=oof_labels, oof_proba=oof_proba, thresholds=thresholds, scores=scores)


def train_final(
    X_train: pd.DataFrame,
    y_train: pd.Series,
    *,
    decision_threshold: float,
    weights: Mapping[str, float] | None,
    model_params: ModelParams | None,
    random_state: int,
    n_jobs: int,
) -> ProductionEnsemble:
    """The production model: all training rows (never the holdout) and the CV-chosen threshold."""
    model = ProductionEnsemble(
        weights=weights,
        model_params=model_params,
        decision_threshold=decision_threshold,
        random_state=random_state,
        n_jobs=n_jobs,
    )
    return model.fit(X_train, y_train)


@dataclass(frozen=True)
class TrainingSettings:
    """What the training stage needs from params.yaml, as plain values."""

    horizon: int
    threshold: float
    holdout: Holdout
    embargo: int
    n_splits: int
    weights: Mapping[str, float] | None
    model_params: ModelParams | None
    random_state: int
    n_jobs: int


@dataclass(frozen=True, eq=False)
class TrainingResult:
    """The fitted model and everything needed to report on it."""

    settings: TrainingSettings
    ensemble: ProductionEnsemble
    cv: CVResult
    split: HoldoutSplit
    feature_names: tuple[str, ...]
    train_positive_rate: float
    metrics: dict[str, Any]
    # The distribution of each feature on the rows the model was fitted on, which `cryptoml monitor` compares with.
    feature_reference: dict[str, Any]

    @property
    def decision_threshold(self) -> float:
        return self.cv.decision_threshold


def build_train_metrics(cv: CVResult, split: HoldoutSplit, train_positive_rate: float) -> dict[str, Any]:
    """metrics/train.json: out-of-sample CV scores per model and the sample counts behind them."""
    return rounded_json(
        {
            "decision_threshold": cv.decision_threshold,
            "cv": {
                name: {
                    "threshold": cv.thresholds[name],
                    **{metric: {"mean": float(np.mean(values)), "folds": values} for metric, values in per_metric.items()},
                }
                for name, per_metric in cv.scores.items()
            },
            "samples": {
                "labelled": split.n_rows,
                "train": len(split.train),
                "purged": split.purged_rows,
                "holdout": len(split.holdout),
                "cv_folds": len(cv.folds),
                "train_positive_rate": train_positive_rate,
            },
        }
    )


def run_training(features: pd.DataFrame, close: pd.Series, cfg: TrainingSettings) -> TrainingResult:
    """Label, split, cross-validate, choose the threshold and fit the production model."""
    X, y = build_dataset(features, close, cfg.horizon, cfg.threshold)
    split = holdout_split(X.index, cfg.holdout, cfg.horizon, cfg.embargo)
    X_train, y_train = X.iloc[split.train], y.iloc[split.train]
    folds = walk_forward_splits(len(X_train), cfg.n_splits, cfg.horizon, cfg.embargo)
    cv = cross_validate(
        X_train,
        y_train,
        folds,
        weights=cfg.weights,
        model_params=cfg.model_params,
        random_state=cfg.random_state,
        n_jobs=cfg.n_jobs,
    )
    ensemble = train_final(
        X_train,
        y_train,
        decision_threshold=cv.decision_threshold,
        weights=cfg.weights,
        model_params=cfg.model_params,
        random_state=cfg.random_state,
        n_jobs=cfg.n_jobs,
    )
    positive_rate = float(y_train.mean())
    return TrainingResult(
        settings=cfg,
        ensemble=ensemble,
        cv=cv,
        split=split,
        feature_names=tuple(X.columns),
        train_positive_rate=positive_rate,
        metrics=build_train_metrics(cv, split, positive_rate),
        feature_reference=feature_reference(X_train),
    )


def _describe_validation(result: TrainingResult) -> str:
    cfg, split = result.settings, result.split
    return (
        f"purged walk-forward CV: {len(result.cv.folds)} expanding-window folds on the training rows, "
        f"each validation fold preceded by a gap of {cfg.horizon + cfg.embargo} rows "
        f"(label horizon {cfg.horizon} + embargo {cfg.embargo}); the last {len(split.holdout)} rows "
        f"(split.holdout={cfg.holdout}) are held out, after the same gap, for the evaluate stage"
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
    split = result.split
    return rounded_json(
        {
            "created_at": created_at,
            "model_type": type(result.ensemble).__name__,
            "model_file": model_file,
            "status": "training",
            "feature_manager_version": feature_manager_version,
            "feature_names": list(result.feature_names),
            "individual_models": [name for name in result.cv.scores if name != ENSEMBLE],
            "model_weights": dict(result.ensemble.weights_),
            "decision_threshold": result.decision_threshold,
            "performance_metrics": result.cv.mean_scores(ENSEMBLE),
            "training_info": {
                "samples_count": len(split.train),
                "holdout_samples": len(split.holdout),
                "purged_samples": split.purged_rows,
                "positive_rate": result.train_positive_rate,
                "label": {"horizon": result.settings.horizon, "threshold": result.settings.threshold},
                "validation_method": _describe_validation(result),
                "data_start": split.train_start_time.isoformat(),
                "data_end": split.train_end_time.isoformat(),
                "holdout_start": split.holdout_start_time.isoformat(),
                "holdout_end": split.holdout_end_time.isoformat(),
                "last_retrain": created_at,
            },
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
