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
from cryptoml.features import FeatureManager
from cryptoml.io import write_json_atomic

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
