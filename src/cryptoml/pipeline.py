"""The I/O edge of each DVC stage: read inputs and params, call the pure library functions, write outputs.

Outputs are written atomically and only after every check passed, so a failing stage leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from cryptoml import paths
from cryptoml.config import Params
from cryptoml.console import progress
from cryptoml.data import fetch_candles, read_candles, write_parquet
from cryptoml.artifacts import MANIFEST_NAME, ArtifactError
from cryptoml.ensemble import ProductionEnsemble
from cryptoml.evaluation import EvaluationResult, classification_metrics, evaluate_holdout
from cryptoml.features import FeatureManager
from cryptoml.timeframe import parse_timeframe
from cryptoml.io import atomic_path, rounded_json, write_json_atomic
from cryptoml.labels import HoldoutSplit, build_dataset, holdout_split
from cryptoml.promotion import Decision, decide, promote, read_production_metadata
from cryptoml.registry import source_commit
from cryptoml.training import TrainingSettings, build_training_metadata, run_training

log = logging.getLogger(__name__)


def run_fetch(params: Params, now: pd.Timestamp | None = None) -> None:
    """fetch: candles of [data.start, data.end) -> data/raw/ohlcv.parquet and metrics/data.json."""
    data = params.data
    log.info("fetching %s candles (%s) for [%s, %s)", data.timeframe, data.source, data.start, data.end)
    with progress(f"fetch {data.source}") as advance:
        candles, report = fetch_candles(data, now=now, on_page=advance)
    fewest = FeatureManager().warmup_rows + params.label.horizon + 1
    if report.rows < fewest:
        source = data.csv.path if data.source == "csv" else f"data.source {data.source}"
        raise ValueError(
            f"{source}: {report.rows} candle(s) in [data.start, data.end) = [{data.start}, {data.end}); the pipeline needs "
            f"at least {fewest} (the {fewest - params.label.horizon - 1} warm-up candles of the features, one feature row, "
            f"label.horizon={params.label.horizon} candles to label it): supply more candles or widen the window"
        )
    if report.gaps:
        log.warning(
            "%d gap(s) in the %s grid, %d missing candle(s), largest %d: kept as gaps, not filled",
            report.gaps, data.timeframe, report.missing_candles, report.largest_gap_candles,
        )
    write_parquet(candles, paths.RAW_CANDLES)
    write_json_atomic(paths.DATA_METRICS, {"data": {**report.as_metrics(), "source": data.source}})
    log.info("wrote %s: %d candles %s .. %s", paths.RAW_CANDLES, report.rows, report.start, report.end)


def run_features() -> None:
    """features: data/raw/ohlcv.parquet -> data/features.parquet (warm-up rows dropped)."""
    candles = read_candles(paths.RAW_CANDLES)
    features = FeatureManager().generate_features(candles)
    write_parquet(features, paths.FEATURES, index=True)
    log.info("wrote %s: %d rows x %d features", paths.FEATURES, len(features), features.shape[1])


def read_training_inputs() -> tuple[pd.DataFrame, pd.Series]:
    """The feature matrix and the close prices the labels are made from, both indexed by timestamp."""
    candles = read_candles(paths.RAW_CANDLES)
    if not paths.FEATURES.exists():
        raise FileNotFoundError(f"{paths.FEATURES} not found: run `cryptoml features` (or `dvc repro`) first")
    return pd.read_parquet(paths.FEATURES), candles.set_index("timestamp")["close"]


def training_settings(params: Params) -> TrainingSettings:
    return TrainingSettings(
        horizon=params.label.horizon,
        threshold=params.label.threshold,
        holdout=params.split.holdout_value,
        embargo=params.split.embargo,
        n_splits=params.cv.n_splits,
        weights=params.model.weights,
        model_params=params.model.hyperparameters(),
        random_state=params.model.random_state,
        n_jobs=params.model.n_jobs,
    )


def run_train(params: Params) -> None:
    """train: purged walk-forward CV, threshold choice, final fit -> models/training/ and metrics/train.json."""
    features, close = read_training_inputs()
    log.info("training on %d feature rows (CV: %d walk-forward folds)", len(features), params.cv.n_splits)
    result = run_training(features, close, training_settings(params))
    commit = source_commit()
    version_info = {
        "git_commit": commit.sha,
        "data_start": params.data.start.isoformat(),
        "data_end": params.data.end.isoformat(),
    }
    # Every feature row, labelled or not: the ONNX graph must reproduce the native P(up) wherever it may be served.
    model_hash = result.ensemble.save(paths.TRAINING_DIR, version_info=version_info, parity_rows=features)
    metadata = build_training_metadata(
        result,
        created_at=commit.committed_at or "unknown",
        model_file=str(paths.TRAINING_DIR / MANIFEST_NAME),
        model_hash=model_hash,
        git_commit=commit.sha,
        previous_version=None,
        feature_manager_version=FeatureManager.version,
        # The monitor section is read by no stage: tuning it must not change the model's metadata.
        params=params.model_dump(mode="json", exclude={"monitor"}),
        library_versions=result.ensemble.library_versions_,
    )
    write_json_atomic(paths.TRAINING_METADATA, metadata)
    write_json_atomic(paths.TRAIN_METRICS, result.metrics)
    cv = result.cv.mean_scores()
    log.info(
        "CV ensemble ROC AUC %.4f, MCC %.4f at threshold %.4f; model %s",
        cv["roc_auc"], cv["mcc"], result.decision_threshold, model_hash,
    )


def labelled_rows(params: Params) -> tuple[pd.DataFrame, pd.Series, HoldoutSplit, pd.Series]:
    """The labelled feature rows, their labels, the holdout split params define, and the close prices."""
    features, close = read_training_inputs()
    X, y = build_dataset(features, close, params.label.horizon, params.label.threshold)
    split = holdout_split(X.index, params.split.holdout_value, params.label.horizon, params.split.embargo)
    return X, y, split, close


def evaluate_model(model: ProductionEnsemble, params: Params) -> EvaluationResult:
    """Score `model` on the holdout rows defined by params (the same rows for challenger and champion)."""
    X, y, split, close = labelled_rows(params)
    return evaluate_holdout(
        model,
        X.iloc[split.holdout],
        y.iloc[split.holdout],
        close,
        train_positive_rate=float(y.iloc[split.train].mean()),
        fee=params.evaluate.fee,
        timeframe=parse_timeframe(params.data.timeframe),
        horizon=params.label.horizon,
        label_threshold=params.label.threshold,
    )


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def write_plots(plots: dict[str, pd.DataFrame], directory: Path) -> None:
    """One CSV per model for curves (DVC colours one line per file), single files otherwise."""
    for name, table in plots.items():
        if "model" in table.columns:
            for model, rows in table.groupby("model", sort=True):
                _write_csv(rows.drop(columns="model"), directory / name / f"{model}.csv")
        elif name == "equity":
            # DVC's line template needs a numeric x: bars since the start of the holdout.
            _write_csv(table.assign(bar=range(len(table)), timestamp=table["timestamp"].astype(str)), directory / "equity.csv")
        else:
            _write_csv(table, directory / f"{name}.csv")


def run_evaluate(params: Params) -> None:
    """evaluate: holdout metrics of the challenger, its components and the baselines, backtest, plots."""
    result = evaluate_model(ProductionEnsemble.load(paths.TRAINING_DIR), params)
    write_plots(result.plots, paths.PLOTS_DIR)
    write_json_atomic(paths.EVALUATE_METRICS, result.metrics)
    ensemble, prior = result.metrics["ensemble"], result.metrics["baselines"]["class_prior"]
    log.info(
        "holdout: ensemble ROC AUC %.4f (class prior 0.5), log loss %.4f (class prior %.4f), MCC %.4f",
        ensemble["roc_auc"], ensemble["log_loss"], prior["log_loss"], ensemble["mcc"],
    )


KEY_METRICS = ("roc_auc", "pr_auc", "log_loss", "brier", "f1", "mcc", "precision", "recall", "accuracy")


def load_champion(X_holdout: pd.DataFrame, y_holdout: pd.Series) -> tuple[ProductionEnsemble | None, dict[str, float] | None, str | None]:
    """The production model re-scored on this run's holdout rows, or why there is none to compare with."""
    if not (paths.PRODUCTION_DIR / MANIFEST_NAME).exists():
        return None, None, None
    try:
        champion = ProductionEnsemble.load(paths.PRODUCTION_DIR)
    except ArtifactError as exc:
        return None, None, f"the production model cannot be loaded, so it is not re-scored: {exc}"
    p_up = champion.predict_proba(X_holdout)[:, 1]
    # Rounded like metrics/evaluate.json, so challenger and champion are compared at the same precision.
    return champion, rounded_json(classification_metrics(y_holdout.to_numpy(), p_up, champion.decision_threshold)), None


def production_record(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """What git keeps about the served model (metrics/promotion.json), so `cryptoml history` needs no DVC cache."""
    if metadata is None:
        return None
    info = metadata["training_info"]
    return {
        "model_hash": metadata["version_control"]["model_hash"],
        "git_commit": metadata["version_control"]["git_commit"],
        "data_start": info["data_start"],
        "data_end": info["holdout_end"],
        "metrics": {key: metadata["performance_metrics"][key] for key in KEY_METRICS},
    }


def production_metadata(challenger: ProductionEnsemble, champion: ProductionEnsemble | None, holdout: dict[str, float]) -> dict[str, Any]:
    """The training metadata, restated for production: holdout metrics and the model it replaces."""
    metadata = json.loads(paths.TRAINING_METADATA.read_text())
    previous = None
    if champion is not None:
        previous = {"git_commit": champion.version_info_.get("git_commit"), "model_hash": champion.model_sha256_}
    return {
        **metadata,
        "status": "production",
        "model_file": str(paths.PRODUCTION_DIR / MANIFEST_NAME),
        "performance_metrics": holdout,
        "cv_metrics": metadata["performance_metrics"],
        "version_control": {**metadata["version_control"], "previous_version": previous},
    }


def run_promote(params: Params) -> Decision:
    """promote: gate the challenger against the baselines and the re-scored champion; swap production on a pass.

    First the challenger's ONNX graph, which production will serve, must reproduce the native P(up) on
    every holdout row (within serving.PARITY_TOLERANCE): otherwise ParityError ends the stage before
    the gate, and production and metrics/promotion.json are left as they were.
    """
    challenger = ProductionEnsemble.load(paths.TRAINING_DIR, backend="onnx")
    X, y, split, _ = labelled_rows(params)
    X_holdout, y_holdout = X.iloc[split.holdout], y.iloc[split.holdout]
    parity = challenger.check_serving_parity(X_holdout)
    log.info("ONNX graph vs native models on %d holdout rows: max |P(up) difference| %.2g", parity.rows, parity.max_abs_difference)
    evaluation = json.loads(paths.EVALUATE_METRICS.read_text())
    champion, champion_metrics, note = load_champion(X_holdout, y_holdout)
    decision = decide(
        evaluation["ensemble"],
        evaluation["baselines"],
        champion_metrics,
        params.gate,
        challenger_sha256=challenger.model_sha256_,
        champion_sha256=champion.model_sha256_ if champion is not None else None,
        champion_note=note,
    )
    if decision.promote:
        promote(paths.TRAINING_DIR, paths.PRODUCTION_DIR, production_metadata(challenger, champion, evaluation["ensemble"]))
    else:
        # DVC fails a stage whose output is missing: a first challenger that fails the gate leaves an empty
        # production directory (nothing to serve) rather than a failed `dvc repro`.
        paths.PRODUCTION_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        **decision.as_json(),
        "serving_parity": asdict(parity),
        "production": production_record(read_production_metadata(paths.PRODUCTION_DIR)),
    }
    write_json_atomic(paths.PROMOTION_METRICS, record)
    verdict = "PROMOTED" if decision.promote else "REJECTED"
    log.info("%s %s", verdict, challenger.model_sha256_)
    for reason in decision.reasons:
        log.info("  %s", reason)
    return decision

