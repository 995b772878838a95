"""The I/O edge of each DVC stage: read inputs and params, call the pure library functions, write outputs.

Outputs are written atomically and only after every check passed, so a failing stage leaves nothing half-written.

Each stage is a fresh process: the model-side modules (the three model libraries, scikit-learn, onnxruntime,
joblib; 4 s of imports) are imported by the functions that use them, so fetch and features do without them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from cryptoml import paths
from cryptoml.candles.store import fetch_candles, read_candles, write_parquet
from cryptoml.candles.timeframe import parse_timeframe
from cryptoml.config import Params
from cryptoml.console import progress
from cryptoml.features.manager import FeatureManager
from cryptoml.io import atomic_path, write_json_atomic
from cryptoml.model.artifacts import MANIFEST_NAME, OOS_PREDICTIONS, ArtifactError, read_artifacts, read_model, read_oos_predictions
from cryptoml.model.labels import make_labels
from cryptoml.model.rule import TradingRule
from cryptoml.release.registry import source_commit

if TYPE_CHECKING:
    from cryptoml.model.executor import ExecutorSettings
    from cryptoml.model.trading import Costs
    from cryptoml.model.training import TrainingSettings
    from cryptoml.release.promotion import Decision

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
    from cryptoml.model.trading import RuleGrid
    from cryptoml.model.training import FitSettings, RuleSettings, TrainingSettings

    return TrainingSettings(
        horizon=params.label.horizon,
        threshold=params.label.threshold,
        holdout=params.split.holdout_value,
        embargo=params.split.embargo,
        every=params.retrain.every_value,
        warmup_steps=params.retrain.warmup_steps,
        fit=FitSettings(
            weights=params.model.weights,
            model_params=params.model.hyperparameters(),
            random_state=params.model.random_state,
            n_jobs=params.model.n_jobs,
        ),
        rules=RuleSettings(costs=costs(params), grid=RuleGrid(**params.trading.grid.model_dump(), min_hold=tuple(params.trading.min_hold))),
    )


def costs(params: Params) -> Costs:
    from cryptoml.model.trading import Costs

    return Costs(fee=params.costs.fee, slippage=params.costs.slippage)


def executor(params: Params) -> ExecutorSettings:
    """Where the fits run: params' executor section, or the Dask scheduler CRYPTOML_DASK_SCHEDULER names."""
    from cryptoml.model.executor import executor_settings

    return executor_settings(params.executor.kind, params.executor.workers, params.executor.scheduler)


TRAIN_PARAM_SECTIONS = ("data", "label", "split", "retrain", "model", "costs", "trading")


def run_train(params: Params) -> None:
    """train: walk-forward replay of the retrain policy, threshold, production fit on every labelled row -> models/training/."""
    from cryptoml.model.training import build_train_metrics, build_training_metadata, record_to_csv, run_training

    features, close = read_training_inputs()
    log.info("training on %d feature rows (walk-forward steps of %s)", len(features), params.retrain.every)
    result = run_training(features, close, training_settings(params), executor(params))
    log.info("fits: %s", result.transfer.describe())
    commit = source_commit()
    version_info = {
        "git_commit": commit.sha,
        "data_start": params.data.start.isoformat(),
        "data_end": params.data.end.isoformat(),
        "train_end": result.train_index[-1].isoformat(),
    }
    # Every feature row, labelled or not: the ONNX graph must reproduce the native P(up) wherever it may be served.
    model_hash = result.ensemble.save(
        paths.TRAINING_DIR, version_info=version_info, parity_rows=features, oos_predictions=record_to_csv(result.record)
    )
    metadata = build_training_metadata(
        result,
        created_at=commit.committed_at or "unknown",
        model_file=str(paths.TRAINING_DIR / MANIFEST_NAME),
        model_hash=model_hash,
        git_commit=commit.sha,
        previous_version=None,
        feature_manager_version=FeatureManager.version,
        # The sections dvc.yaml's train stage reads, and the data window: a change to another one (the gate, the bot,
        # monitoring) neither re-runs the stage nor may change the model's metadata.
        params=params.model_dump(mode="json", include=set(TRAIN_PARAM_SECTIONS)),
        library_versions=result.ensemble.library_versions_,
    )
    write_json_atomic(paths.TRAINING_METADATA, metadata)
    write_json_atomic(paths.TRAIN_METRICS, build_train_metrics(result))
    log.info(
        "production model %s fitted on %d rows up to %s, threshold %.4f; %d walk-forward steps",
        model_hash, len(result.train_index), result.train_index[-1], result.decision_threshold, len(result.steps),
    )


def stored_record(directory: Path) -> pd.DataFrame | None:
    """The verified out-of-sample record stored with the model in `directory`; None for a model without one."""
    from cryptoml.model.training import record_from_csv

    data = read_oos_predictions(directory)
    return None if data is None else record_from_csv(data, f"{directory}/{MANIFEST_NAME} {OOS_PREDICTIONS}")


def current_labels(params: Params, close: pd.Series) -> pd.Series:
    return make_labels(close, params.label.horizon, params.label.threshold)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def write_plots(plots: dict[str, pd.DataFrame], directory: Path) -> None:
    """One CSV per model for curves (DVC colours one line per file), single files otherwise."""
    for name, table in plots.items():
        if "model" in table.columns:
            for model, rows in table.groupby("model", sort=True):
                _write_csv(rows.drop(columns="model"), directory / name / f"{model}.csv")
        elif "timestamp" in table.columns:
            _write_csv(table.assign(timestamp=table["timestamp"].map(pd.Timestamp.isoformat)), directory / f"{name}.csv")
        else:
            _write_csv(table, directory / f"{name}.csv")


def run_evaluate(params: Params) -> None:
    """evaluate: the policy's out-of-sample record against the frozen model and the baselines; backtest; plots."""
    from cryptoml.model.ensemble import ProductionEnsemble
    from cryptoml.model.evaluation import evaluate_walk_forward

    model = ProductionEnsemble.load(paths.TRAINING_DIR, backend="native")
    record = stored_record(paths.TRAINING_DIR)
    if record is None:
        raise ArtifactError(f"{paths.TRAINING_DIR}: the model stores no out-of-sample record; run `cryptoml train`")
    close = read_candles(paths.RAW_CANDLES).set_index("timestamp")["close"]
    result = evaluate_walk_forward(
        record,
        current_labels(params, close),
        close,
        model.feature_importances(),
        cost=params.costs.per_side,
        timeframe=parse_timeframe(params.data.timeframe),
        horizon=params.label.horizon,
        label_threshold=params.label.threshold,
    )
    write_plots(result.plots, paths.PLOTS_DIR)
    write_json_atomic(paths.EVALUATION_REPORT, result.report)
    write_json_atomic(paths.EVALUATE_METRICS, result.metrics)
    report = result.report
    policy, frozen, prior = report["policy"], report["frozen"], report["baselines"]["class_prior"]
    log.info(
        "out of sample, %d rows: policy ROC AUC %.4f (frozen %.4f), log loss %.4f (class prior %.4f), MCC %.4f",
        report["span"]["rows"], policy["roc_auc"], frozen["roc_auc"], policy["log_loss"], prior["log_loss"], policy["mcc"],
    )
    rule, holding = report["backtest"]["rule"], report["backtest"]["buy_and_hold"]
    log.info(
        "after costs of %g per side: walk-forward rule %+.2f%% (Sharpe %.2f, 95%% interval %.2f .. %.2f, PSR %.2f, %d trades), "
        "naive %+.2f%%, frozen %+.2f%%, buy-and-hold %+.2f%%",
        params.costs.per_side, 100 * rule["total_return"], rule["sharpe"], rule["sharpe_ci_low"], rule["sharpe_ci_high"], rule["psr"],
        rule["trades"], 100 * report["backtest"]["naive"]["total_return"], 100 * report["backtest"]["frozen"]["total_return"],
        100 * holding["total_return"],
    )


KEY_METRICS = ("roc_auc", "log_loss", "brier", "mcc")
# The walk-forward rule's after-cost figures kept beside them (production metadata "trading_metrics"); a model
# promoted before trading rules has none.
KEY_TRADING_METRICS = ("total_return", "sharpe", "psr")


@dataclass(frozen=True, eq=False)
class Champion:
    """The production model as the gate sees it: its identity and its stored out-of-sample record."""

    sha256: str
    version_info: dict[str, Any]
    record: pd.DataFrame | None


def read_champion() -> tuple[Champion | None, str | None]:
    """The production model's identity and record, read and verified without loading any model; or why not."""
    from cryptoml.model.training import record_from_csv

    if not (paths.PRODUCTION_DIR / MANIFEST_NAME).exists():
        return None, None
    try:
        _, manifest, payloads = read_model(paths.PRODUCTION_DIR, keep={OOS_PREDICTIONS})
    except ArtifactError as exc:
        return None, f"the production model cannot be read, so it is not compared: {exc}"
    data = payloads.get(OOS_PREDICTIONS)
    record = None if data is None else record_from_csv(data, f"{paths.PRODUCTION_DIR}/{MANIFEST_NAME} {OOS_PREDICTIONS}")
    return Champion(manifest.model_sha256, dict(manifest.version_info), record), None


def production_record(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """What git keeps about the served model (metrics/promotion.json), so `cryptoml history` needs no DVC cache."""
    if metadata is None:
        return None
    info = metadata["training_info"]
    return {
        "model_hash": metadata["version_control"]["model_hash"],
        "git_commit": metadata["version_control"]["git_commit"],
        "data_start": info["data_start"],
        "data_end": info["data_end"],
        "metrics": {
            **{key: metadata["performance_metrics"][key] for key in KEY_METRICS},
            **{f"rule_{key}": value for key, value in _trading_figures(metadata).items()},
        },
    }


def _trading_figures(metadata: dict[str, Any]) -> dict[str, float]:
    rule = metadata.get("trading_metrics", {}).get("rule")
    return {} if rule is None else {key: rule[key] for key in KEY_TRADING_METRICS}


def production_metadata(champion: Champion | None, report: dict[str, Any], flat_rule: FlatRule | None = None) -> dict[str, Any]:
    """The training metadata, restated for production: the policy's out-of-sample metrics, the after-cost figures of
    its walk-forward trading rule beside buy-and-hold's, and the model it replaces. With `flat_rule`, the model is
    promoted with the flat rule: its rule and hash are those of the rewritten manifest, and the metadata says why.

    Promoting the served model again (a forced rerun) replaces nothing: it keeps the previous version it had.
    """
    from cryptoml.release.promotion import read_production_metadata

    metadata = json.loads(paths.TRAINING_METADATA.read_text())
    version_control = metadata["version_control"]
    trading_rule = metadata["trading_rule"]
    if flat_rule is not None:
        version_control = {**version_control, "model_hash": flat_rule.model_hash, "trained_model_hash": version_control["model_hash"]}
        trading_rule = {**flat_rule.rule.as_json(), "description": flat_rule.rule.describe(), "chosen_on": flat_rule.reason, "trained": trading_rule}
    previous = None
    if champion is not None and champion.sha256 == version_control["model_hash"]:
        served = read_production_metadata(paths.PRODUCTION_DIR) or {}
        previous = served.get("version_control", {}).get("previous_version")
    elif champion is not None:
        previous = {"git_commit": champion.version_info.get("git_commit"), "model_hash": champion.sha256}
    return {
        **metadata,
        "status": "production",
        "model_file": str(paths.PRODUCTION_DIR / MANIFEST_NAME),
        "trading_rule": trading_rule,
        "performance_metrics": report["policy"],
        "trading_metrics": {
            "cost_per_side": report["backtest"]["cost_per_side"],
            "rule": report["backtest"]["rule"],
            "buy_and_hold": report["backtest"]["buy_and_hold"],
        },
        "version_control": {**version_control, "previous_version": previous},
    }


@dataclass(frozen=True)
class FlatRule:
    """A challenger promoted with the flat rule: the rule, the hash of its rewritten manifest, and why."""

    rule: TradingRule
    model_hash: str
    reason: str


def run_promote(params: Params) -> Decision:
    """promote: gate the challenger's policy record against the baselines and the champion's; swap production on a pass.

    First the challenger's ONNX graph, which production will serve, must reproduce the native P(up) on
    every row of the evaluation span (within serving.PARITY_TOLERANCE): otherwise ParityError ends the
    stage before the gate, and production and metrics/promotion.json are left as they were.
    """
    from cryptoml.model.ensemble import ProductionEnsemble
    from cryptoml.release.promotion import RuleRecord, compare_with_champion, decide, promote, read_production_metadata, with_trading_rule

    challenger = ProductionEnsemble.load(paths.TRAINING_DIR, backend="onnx")
    record = stored_record(paths.TRAINING_DIR)
    if record is None:
        raise ArtifactError(f"{paths.TRAINING_DIR}: the model stores no out-of-sample record; run `cryptoml train`")
    features, close = read_training_inputs()
    parity = challenger.check_serving_parity(features.loc[pd.DatetimeIndex(record.loc[record["scored"], "timestamp"])])
    log.info("ONNX graph vs native models on %d evaluation rows: max |P(up) difference| %.2g", parity.rows, parity.max_abs_difference)
    evaluation = json.loads(paths.EVALUATION_REPORT.read_text())
    champion, note = read_champion()
    comparison = None
    if champion is not None and champion.record is None:
        note = f"the production model {champion.sha256} stores no out-of-sample predictions (saved before they were kept)"
    elif champion is not None:
        comparison, note = compare_with_champion(
            record,
            champion.record,
            current_labels(params, close),
            params.gate.champion_min_shared_rows,
            close=close,
            cost=params.costs.per_side,
            timeframe=parse_timeframe(params.data.timeframe),
        )
    walk_forward_rule = evaluation["backtest"]["rule"]
    decision = decide(
        evaluation["policy"],
        evaluation["baselines"],
        comparison,
        params.gate,
        challenger_sha256=challenger.model_sha256_,
        champion_sha256=champion.sha256 if champion is not None else None,
        champion_note=note,
        rule=RuleRecord(
            total_return=walk_forward_rule["total_return"], psr=walk_forward_rule["psr"], production_rule_trades=challenger.rule.trades
        ),
    )
    if decision.promote:
        flat = None
        if decision.flat_rule:
            rule = TradingRule.flat()
            flat = FlatRule(rule, with_trading_rule(read_artifacts(paths.TRAINING_DIR), rule).model_sha256, "; ".join(decision.reasons))
        promote(paths.TRAINING_DIR, paths.PRODUCTION_DIR, production_metadata(champion, evaluation, flat), None if flat is None else flat.rule)
    else:
        # DVC fails a stage whose output is missing: a first challenger that fails the gate leaves an empty
        # production directory (nothing to serve) rather than a failed `dvc repro`.
        paths.PRODUCTION_DIR.mkdir(parents=True, exist_ok=True)
    record_json = {
        **decision.as_json(),
        "serving_parity": asdict(parity),
        "production": production_record(read_production_metadata(paths.PRODUCTION_DIR)),
    }
    write_json_atomic(paths.PROMOTION_METRICS, record_json)
    verdict = "REJECTED" if not decision.promote else "PROMOTED with the flat rule" if decision.flat_rule else "PROMOTED"
    log.info("%s %s", verdict, challenger.model_sha256_)
    for reason in decision.reasons:
        log.info("  %s", reason)
    return decision

