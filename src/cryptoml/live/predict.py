"""`cryptoml predict`: the production model's signal for the latest closed candle(s) of a candle CSV.

The candles pass the fetch stage's validation (data.timeframe grid, prices, order); a last candle
that is still open at `now` is left out, since its close, high, low and volume are not final. The
features come from FeatureManager.generate_latest, which reads the last LIVE_WINDOW candles, so the
file must hold at least that many closed ones. The model is loaded with every hash verified and
serves through its ONNX graph unless CRYPTOML_BACKEND=native. With monitor.refuse_stale_predictions, a model
whose data ends more than monitor.max_model_age_days before `now` gives no signal at all.

Each row also gets the position to hold for the next bar: the model's trading rule (cryptoml.model.rule), applied
from the holding the bot has before the first row (flat unless told otherwise), row after row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cryptoml.candles.store import read_csv_candles, summarize_candles, validate_candles
from cryptoml.candles.timeframe import parse_timeframe
from cryptoml.features.manager import LIVE_WINDOW, FeatureManager
from cryptoml.live.serving import recorded_data_end
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.rule import Holding, TradingRule

log = logging.getLogger(__name__)

SIGNALS = {0: "flat", 1: "up"}
_CSV_FIRST_LINE = 2  # after the header


@dataclass(frozen=True)
class Signal:
    """The model's call on one closed candle."""

    timestamp: pd.Timestamp  # the candle's open time, as in the file
    p_up: float
    signal: str  # "up" or "flat"
    position: int  # what the trading rule holds for the next bar: 1 long, 0 flat


@dataclass(frozen=True)
class Prediction:
    """Signals of the latest closed candles and the model that made them."""

    signals: list[Signal]
    model_sha256: str
    backend: str
    decision_threshold: float
    trading_rule: TradingRule
    open_candles_skipped: int

    def as_json(self) -> dict[str, Any]:
        return {
            "model_sha256": self.model_sha256,
            "backend": self.backend,
            "decision_threshold": self.decision_threshold,
            "trading_rule": self.trading_rule.as_json(),
            "open_candles_skipped": self.open_candles_skipped,
            "predictions": [
                {"timestamp": iso_utc(signal.timestamp), "signal": signal.signal, "p_up": signal.p_up, "position": signal.position}
                for signal in self.signals
            ],
        }


class StaleModelError(ValueError):
    """The model's data is older than the configured limit, and stale predictions are refused."""


def iso_utc(timestamp: pd.Timestamp) -> str:
    return timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def model_data_end(model: ProductionEnsemble) -> pd.Timestamp:
    """The time of the last row the model was fitted on, recorded in its verified manifest (`train_end`).

    Models made before the production fit took every labelled row record only their window's end
    (params data.end, `data_end`): their training rows ended months earlier, and for them that is all
    there is to go by.
    """
    recorded = recorded_data_end(model.version_info_)
    if recorded is None:
        raise ValueError(
            f"model {model.model_sha256_} records neither train_end nor data_end in its version_info: its age is unknown; "
            "retrain it with `cryptoml train` (or `dvc repro`)"
        )
    return pd.Timestamp(recorded).tz_convert("UTC")


def model_age_days(data_end: pd.Timestamp, now: pd.Timestamp) -> float:
    """Days from the end of the model's data to `now`: how much market the model has never seen."""
    return (now - data_end) / pd.Timedelta(days=1)


def require_fresh_model(model: ProductionEnsemble, now: pd.Timestamp, max_age_days: float) -> None:
    """Raise StaleModelError when the model's data ends more than `max_age_days` before `now`."""
    data_end = model_data_end(model)
    age = model_age_days(data_end, now)
    if age > max_age_days:
        raise StaleModelError(
            f"model {model.model_sha256_} is stale: its data ends {iso_utc(data_end)}, {age:.1f} days before "
            f"{iso_utc(now)}, over monitor.max_model_age_days={max_age_days:g}; no prediction is made because "
            "monitor.refuse_stale_predictions is true: retrain (`cryptoml retrain`)"
        )


def read_closed_candles(csv_path: Path, timeframe: str, now: pd.Timestamp) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The validated candles of a CSV and those of them closed at `now`; refuses a file with no closed candle."""
    candles, _ = validate_candles(read_csv_candles(csv_path), timeframe, str(csv_path), first_line=_CSV_FIRST_LINE)
    closed = closed_candles(candles, timeframe, now)
    if closed.empty:
        raise ValueError(f"{csv_path}: no closed {timeframe} candle (the last one opens at {iso_utc(candles['timestamp'].iloc[-1])})")
    return candles, closed


def closed_candles(candles: pd.DataFrame, timeframe: str, now: pd.Timestamp) -> pd.DataFrame:
    """The candles whose close time (open time + timeframe) is at or before `now`."""
    closes = candles["timestamp"] + parse_timeframe(timeframe)
    return candles[closes <= now].reset_index(drop=True)


def signals(features: pd.DataFrame, model: ProductionEnsemble, holding: Holding) -> list[Signal]:
    """The model's signal and trading-rule position for each feature row (indexed by candle open time), the rule
    starting from `holding`."""
    p_up = model.predict_proba(features)[:, 1]
    labels = model.predict(features)
    positions, _ = model.rule.holdings(p_up, holding)
    return [
        Signal(timestamp=timestamp, p_up=float(probability), signal=SIGNALS[int(label)], position=int(position))
        for timestamp, probability, label, position in zip(features.index, p_up, labels, positions, strict=True)
    ]


def run_predict(
    csv_path: Path,
    timeframe: str,
    model_dir: Path,
    n_rows: int = 1,
    now: pd.Timestamp | None = None,
    max_model_age_days: float | None = None,
    holding: Holding = Holding(),
) -> Prediction:
    """Read and validate the CSV, load the model, and predict the last n_rows closed candles; `holding` is what the
    bot holds before the first of them.

    With `max_model_age_days`, a model whose data ends longer ago than that is refused (StaleModelError).
    """
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    candles, closed = read_closed_candles(csv_path, timeframe, now)
    try:
        features = FeatureManager().generate_latest(closed, n_rows=n_rows)
    except ValueError as exc:
        raise ValueError(f"{csv_path}: {len(closed)} closed candle(s): {exc}") from None
    # generate_latest reads the last LIVE_WINDOW + n_rows - 1 candles.
    used = summarize_candles(closed.iloc[-(LIVE_WINDOW + n_rows - 1) :], timeframe)
    if used.gaps:
        log.warning(
            "%s: %d gap(s) (%d missing candle(s)) in the candles the features were computed from: the indicators "
            "treat the candles around a gap as consecutive",
            csv_path, used.gaps, used.missing_candles,
        )
    model = ProductionEnsemble.load(model_dir)
    if max_model_age_days is not None:
        require_fresh_model(model, now, max_model_age_days)
    return Prediction(
        signals=signals(features, model, holding),
        model_sha256=str(model.model_sha256_),
        backend=model.serving_backend,
        decision_threshold=float(model.decision_threshold),
        trading_rule=model.rule,
        open_candles_skipped=len(candles) - len(closed),
    )
