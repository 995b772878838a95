"""A ccxt client and one page of candles with bounded retries: shared by the fetch stage and the bot.

No pandas here, so that the bot's process can poll an exchange without it (ccxt itself is heavy: docs/serving.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import ccxt

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


def iso_ms(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat()


def connect(exchange_id: str, api_url: str | None, rate_limit_ms: float | None, timeout_ms: int | None = None) -> ccxt.Exchange:
    """A rate-limited ccxt client, optionally pointed at another API base URL (a local fake); `timeout_ms` bounds
    each request (ccxt's default is 10 s), so a slow exchange fails over to a retry instead of hanging."""
    if exchange_id not in ccxt.exchanges:
        raise ValueError(f"unknown ccxt exchange {exchange_id!r} (expected one of ccxt.exchanges)")
    config: dict[str, object] = {"enableRateLimit": True}
    if rate_limit_ms is not None:
        config["rateLimit"] = rate_limit_ms
    if timeout_ms is not None:
        config["timeout"] = timeout_ms
    exchange: ccxt.Exchange = getattr(ccxt, exchange_id)(config)
    if api_url is not None:
        exchange.urls["api"] = _replace_urls(exchange.urls["api"], api_url.rstrip("/"))
    return exchange


def _replace_urls(urls: str | dict[str, object], api_url: str) -> str | dict[str, object]:
    """Every base URL of the (possibly nested) ccxt `urls['api']` entry replaced by `api_url`."""
    if isinstance(urls, dict):
        return {name: _replace_urls(url, api_url) for name, url in urls.items()}
    return api_url


def exchange_timeframe_ms(exchange: ccxt.Exchange, timeframe: str) -> int:
    if timeframe not in exchange.timeframes:
        raise ValueError(f"{exchange.id} has no timeframe {timeframe!r}; supported: {sorted(exchange.timeframes)}")
    return int(exchange.parse_timeframe(timeframe) * 1000)


def fetch_page(
    exchange: ccxt.Exchange,
    symbol: str,
    timeframe: str,
    since_ms: int,
    max_retries: int,
    backoff_seconds: float,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Candle]:
    """One `fetch_ohlcv` call; transient errors retried after backoff_seconds * 2**attempt, at most max_retries times."""
    where = f"{exchange.id} {symbol} {timeframe} candles since {iso_ms(since_ms)} ({since_ms} ms)"
    for attempt in range(max_retries + 1):
        try:
            return exchange.fetch_ohlcv(symbol, timeframe, since=since_ms, limit=PAGE_LIMIT)
        except TRANSIENT_ERRORS as error:
            last_error = error
            if attempt < max_retries:
                sleep(backoff_seconds * 2**attempt)
        except ccxt.BaseError as error:
            raise ExchangeFetchError(f"could not fetch {where}: non-transient {type(error).__name__}: {error}") from error
    raise ExchangeFetchError(
        f"could not fetch {where} after {max_retries + 1} attempts; last error {type(last_error).__name__}: {last_error}"
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
