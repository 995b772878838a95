"""The I/O edge of each DVC stage: read inputs and params, call the pure library functions, write outputs.

Outputs are written atomically and only after every check passed, so a failing stage leaves nothing half-written.
"""

from __future__ import annotations

import logging

import pandas as pd

from cryptoml import paths
from cryptoml.config import Params
from cryptoml.console import progress
from cryptoml.data import fetch_candles, read_candles, write_parquet
from cryptoml.ensemble import MANIFEST_NAME
from cryptoml.features import FeatureManager
from cryptoml.io import write_json_atomic
from cryptoml.registry import source_commit
from cryptoml.training import TrainingSettings, build_training_metadata, run_training

log = logging.getLogger(__name__)


def run_fetch(params: Params, now: pd.Timestamp | None = None) -> None:
    """fetch: candles of [data.start, data.end) -> data/raw/ohlcv.parquet and metrics/data.json."""
    data = params.data
    log.info("fetching %s candles (%s) for [%s, %s)", data.timeframe, data.source, data.start, data.end)
    with progress(f"fetch {data.source}") as advance:
        candles, report = fetch_candles(data, now=now, on_page=advance)
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
    model_hash = result.ensemble.save(paths.TRAINING_DIR, version_info=version_info)
    metadata = build_training_metadata(
        result,
        created_at=commit.committed_at or "unknown",
        model_file=str(paths.TRAINING_DIR / MANIFEST_NAME),
        model_hash=model_hash,
        git_commit=commit.sha,
        previous_version=None,
        feature_manager_version=FeatureManager.version,
        params=params.model_dump(mode="json"),
        library_versions=result.ensemble.library_versions_,
    )
    write_json_atomic(paths.TRAINING_METADATA, metadata)
    write_json_atomic(paths.TRAIN_METRICS, result.metrics)
    cv = result.cv.mean_scores()
    log.info(
        "CV ensemble ROC AUC %.4f, MCC %.4f at threshold %.4f; model %s",
        cv["roc_auc"], cv["mcc"], result.decision_threshold, model_hash,
    )
