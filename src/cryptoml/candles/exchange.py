"""Closed candles from a ccxt exchange (bitbank BTC/JPY 1h in params.yaml): paged, rate-limited, retried.

The weekly job only moves `end`, so fetching a past window [start, end) twice gives the same frame.
Values are not validated here: `cryptoml.candles.store` checks the OHLC rules on the frame returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from cryptoml.candles.ccxt_client import (
    PAGE_LIMIT,
    Candle,
    ExchangeFetchError,
    connect,
    exchange_timeframe_ms,
    fetch_page,
    iso_ms,
    next_page_since,
)
from cryptoml.candles.store import CANDLE_COLUMNS

__all__ = ["PAGE_LIMIT", "ExchangeFetchError", "candles_to_frame", "fetch_exchange_candles", "next_page_since"]


def fetch_exchange_candles(
    exchange_id: str,
    symbol: str,
    timeframe: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    *,
    now: pd.Timestamp | None = None,
    api_url: str | None = None,
    max_retries: int = 5,
    backoff_seconds: float = 1.0,
    rate_limit_ms: float | None = None,
    on_page: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Closed candles whose open time lies in [start, end), as a candle frame (empty if none).

    `now` (default: the current UTC time) decides which candles are closed, so a test or a
    re-run can pin it; `api_url` replaces the exchange's API base URL(s), e.g. a local fake;
    `rate_limit_ms` overrides the exchange's published spacing between requests;
    `on_page` is called after each page with the number of its candles kept.
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    start_ms = _epoch_ms(start, "start")
    end_ms = _epoch_ms(end, "end")
    now_ms = _epoch_ms(pd.Timestamp.now(tz="UTC") if now is None else now, "now")
    if start_ms >= end_ms:
        raise ValueError(f"start ({start}) must be before end ({end})")

    exchange = connect(exchange_id, api_url, rate_limit_ms)
    try:
        timeframe_ms = exchange_timeframe_ms(exchange, timeframe)
        # A candle is closed once open + timeframe <= now: the window ends at the last closed open time.
        stop_ms = min(end_ms, now_ms - timeframe_ms + 1)
        kept: list[Candle] = []
        since_ms = start_ms
        while since_ms < stop_ms:
            page = fetch_page(exchange, symbol, timeframe, since_ms, max_retries, backoff_seconds)
            in_window = [candle for candle in page if start_ms <= candle[0] < stop_ms]
            kept.extend(in_window)
            if on_page is not None:
                on_page(len(in_window))
            since_ms = next_page_since([int(candle[0]) for candle in page], since_ms, timeframe_ms)
    finally:
        exchange.close()
    return candles_to_frame(kept)


def candles_to_frame(candles: Sequence[Candle]) -> pd.DataFrame:
    """ccxt OHLCV rows -> candle frame: sorted, identical repeats dropped, contract dtypes.

    Pages may overlap; the same candle twice is harmless, but two different values for one
    open time mean the exchange is inconsistent, so that is an error rather than a silent pick.
    """
    frame = pd.DataFrame(list(candles), columns=list(CANDLE_COLUMNS)).drop_duplicates()
    conflicting = frame.loc[frame["timestamp"].duplicated(), "timestamp"]
    if not conflicting.empty:
        first_ms = int(conflicting.iloc[0])
        raise ExchangeFetchError(
            f"the exchange returned different candles for the same open time "
            f"{iso_ms(first_ms)} ({first_ms} ms): "
            f"{frame.loc[frame['timestamp'] == first_ms].to_dict('records')}"
        )
    frame = frame.sort_values("timestamp", ignore_index=True)
    prices = frame[list(CANDLE_COLUMNS[1:])].astype("float64")
    timestamps = pd.to_datetime(frame["timestamp"].astype("int64"), unit="ms", utc=True)
    return pd.concat([timestamps.astype("datetime64[ns, UTC]"), prices], axis=1)


def _epoch_ms(moment: pd.Timestamp, name: str) -> int:
    """UTC epoch milliseconds; a naive timestamp is refused because its zone is a guess."""
    moment = pd.Timestamp(moment)
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {moment}")
    return int(moment.tz_convert("UTC").value // 1_000_000)


