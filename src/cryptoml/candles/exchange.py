"""Closed candles from a ccxt exchange (bitbank BTC/JPY 1h in params.yaml): paged, rate-limited, retried.

The weekly job only moves `end`, so fetching a past window [start, end) twice gives the same frame.
Values are not validated here: `cryptoml.candles.store` checks the OHLC rules on the frame returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import ccxt
import pandas as pd

from cryptoml.candles.store import CANDLE_COLUMNS

# Candles asked for per request: exchanges that page by count need it to bound a page;
# bitbank serves one UTC day per request whatever the limit.
PAGE_LIMIT = 1000
DAY_MS = 86_400_000

# ccxt's NetworkError family: 429 (RateLimitExceeded/DDoSProtection), 5xx (ExchangeNotAvailable),
# timeouts (RequestTimeout) and dropped connections. Anything else will not heal by waiting.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (ccxt.NetworkError,)

Candle = Sequence[float | int | None]


class ExchangeFetchError(RuntimeError):
    """A page of candles could not be fetched (retries exhausted, or a non-transient error)."""


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

    exchange = _connect(exchange_id, api_url, rate_limit_ms)
    try:
        timeframe_ms = _timeframe_ms(exchange, timeframe)
        # A candle is closed once open + timeframe <= now: the window ends at the last closed open time.
        stop_ms = min(end_ms, now_ms - timeframe_ms + 1)
        kept: list[Candle] = []
        since_ms = start_ms
        while since_ms < stop_ms:
            page = _fetch_page(exchange, symbol, timeframe, since_ms, max_retries, backoff_seconds)
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
            f"{_iso(first_ms)} ({first_ms} ms): "
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


def _iso(epoch_ms: int) -> str:
    return pd.Timestamp(epoch_ms, unit="ms", tz="UTC").isoformat()


def _connect(exchange_id: str, api_url: str | None, rate_limit_ms: float | None) -> ccxt.Exchange:
    """A rate-limited ccxt client, optionally pointed at another API base URL (a local fake)."""
    if exchange_id not in ccxt.exchanges:
        raise ValueError(f"unknown ccxt exchange {exchange_id!r} (expected one of ccxt.exchanges)")
    config: dict[str, object] = {"enableRateLimit": True}
    if rate_limit_ms is not None:
        config["rateLimit"] = rate_limit_ms
    exchange: ccxt.Exchange = getattr(ccxt, exchange_id)(config)
    if api_url is not None:
        exchange.urls["api"] = _replace_urls(exchange.urls["api"], api_url.rstrip("/"))
    return exchange


def _replace_urls(urls: str | dict[str, object], api_url: str) -> str | dict[str, object]:
    """Every base URL of the (possibly nested) ccxt `urls['api']` entry replaced by `api_url`."""
    if isinstance(urls, dict):
        return {name: _replace_urls(url, api_url) for name, url in urls.items()}
    return api_url


def _timeframe_ms(exchange: ccxt.Exchange, timeframe: str) -> int:
    if timeframe not in exchange.timeframes:
        raise ValueError(
            f"{exchange.id} has no timeframe {timeframe!r}; supported: {sorted(exchange.timeframes)}"
        )
    return int(exchange.parse_timeframe(timeframe) * 1000)


def _fetch_page(
    exchange: ccxt.Exchange,
    symbol: str,
    timeframe: str,
    since_ms: int,
    max_retries: int,
    backoff_seconds: float,
) -> list[Candle]:
    """One `fetch_ohlcv` call; transient errors retried after backoff_seconds * 2**attempt."""
    where = f"{exchange.id} {symbol} {timeframe} candles since {_iso(since_ms)} ({since_ms} ms)"
    for attempt in range(max_retries + 1):
        try:
            return exchange.fetch_ohlcv(symbol, timeframe, since=since_ms, limit=PAGE_LIMIT)
        except TRANSIENT_ERRORS as error:
            last_error = error
            if attempt < max_retries:
                time.sleep(backoff_seconds * 2**attempt)
        except ccxt.BaseError as error:
            raise ExchangeFetchError(
                f"could not fetch {where}: non-transient {type(error).__name__}: {error}"
            ) from error
    raise ExchangeFetchError(
        f"could not fetch {where} after {max_retries + 1} attempts; "
        f"last error {type(last_error).__name__}: {last_error}"
    ) from last_error


def next_page_since(page_open_ms: Sequence[int], since_ms: int, timeframe_ms: int) -> int:
    """Where the next page starts, so that a gap (an empty page) never ends the fetch early.

    After a candle: the next open time. After an empty page: past the span that page proved
    empty - bitbank pages end at the UTC day boundary, count-paged exchanges after PAGE_LIMIT
    candles - so the nearer of the two is safe for both.
    """
    newer = [open_ms for open_ms in page_open_ms if open_ms >= since_ms]
    if newer:
        return max(newer) + timeframe_ms
    next_utc_day_ms = (since_ms // DAY_MS + 1) * DAY_MS
    return min(next_utc_day_ms, since_ms + PAGE_LIMIT * timeframe_ms)
