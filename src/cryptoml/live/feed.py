"""Where the paper bot's closed candles come from: a CSV replayed as if live, or an exchange polled through ccxt.

A feed gives candles as ccxt's fetch_ohlcv rows, (open time in epoch ms, open, high, low, close, volume), closed
ones only, oldest first. It does not judge their order: the bot skips duplicates and older candles and re-seeds on
gaps, so a feed may pass on whatever the source holds. Three calls:

* `start(count)`: the history to seed from when a journal is new (the last `count` closed candles; for a replay,
  the file's first `count`).
* `poll(after_ms)`: the closed candles after that open time that the source has now.
* `history(until_ms, count)`: the last `count` candles up to and including that open time, as the source holds
  them (strictly increasing, on the grid): what a re-seed and a resumed run's state are rebuilt from.

`wait()` sleeps until the next poll; False ends the run (a replay that has fed its last candle). A source that does
not answer raises FeedError, after bounded retries; the bot logs it and polls again later.

Neither pandas nor ccxt is imported here: ExchangeFeed imports ccxt when it is made, so a replay never loads it.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

Candle = tuple[int, float, float, float, float, float]
CSV_HEADER = ["timestamp", "open", "high", "low", "close", "volume"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


class FeedError(RuntimeError):
    """The source did not answer (retries exhausted) or holds too little history; the bot tries again later."""


def epoch_ms(text: str) -> int:
    """An ISO 8601 time with an explicit offset ('...Z', '+09:00') as epoch milliseconds; naive times are refused."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"time {text!r} has no UTC offset: write it as 2024-01-01T00:00:00Z")
    return (moment - _EPOCH) // _MILLISECOND


def iso_utc(timestamp_ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC with a Z, as the journal writes times."""
    return (_EPOCH + timestamp_ms * _MILLISECOND).strftime("%Y-%m-%dT%H:%M:%SZ")


class Feed(Protocol):
    name: str
    timeframe_ms: int
    rebuild_limit: int | None  # the most candles a resumed run may re-read to rebuild its state (None: no limit)

    def start(self, count: int) -> list[Candle]: ...
    def poll(self, after_ms: int) -> list[Candle]: ...
    def history(self, until_ms: int, count: int) -> list[Candle]: ...
    def wait(self) -> bool: ...


def increasing(candles: Iterator[Candle], timeframe_ms: int) -> Iterator[Candle]:
    """The candles that a bot accepts, in order: on the grid and each after the one before (the others it skips)."""
    last = None
    for candle in candles:
        if candle[0] % timeframe_ms == 0 and (last is None or candle[0] > last):
            last = candle[0]
            yield candle


class ReplayFeed:
    """A candle CSV (timestamp,open,high,low,close,volume; ISO UTC times) fed one candle per poll, as if each had
    just closed. Read lazily, so a long file costs no memory; a resumed replay skips the rows up to the journal's
    last candle, and after that passes every row on, out-of-order ones included, as a live source would."""

    rebuild_limit = None  # the file is local: a resumed replay always rebuilds its state exactly

    def __init__(self, path: Path, timeframe_ms: int) -> None:
        self.path = Path(path)
        self.name = f"replay:{self.path.name}"
        self.timeframe_ms = timeframe_ms
        self._rows: Iterator[Candle] | None = None
        self._pending: Candle | None = None
        self._exhausted = False

    def _read(self) -> Iterator[Candle]:
        with open(self.path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header != CSV_HEADER:
                raise ValueError(f"{self.path}: expected the header {','.join(CSV_HEADER)}, got {header}")
            for line, row in enumerate(reader, start=2):
                try:
                    timestamp, *values = row
                    open_, high, low, close, volume = (float(value) for value in values)
                    yield (epoch_ms(timestamp), open_, high, low, close, volume)
                except ValueError as exc:
                    raise ValueError(f"{self.path}:{line}: not a candle ({exc}): {row}") from None

    def start(self, count: int) -> list[Candle]:
        rows = self._rows = self._read()
        seed = []
        for candle in increasing(rows, self.timeframe_ms):
            seed.append(candle)
            if len(seed) == count:
                return seed
        raise ValueError(f"{self.path}: {len(seed)} candle(s), fewer than the {count} (bot.seed_candles) to seed from")

    def poll(self, after_ms: int) -> list[Candle]:
        if self._rows is None:  # a resumed replay: fast-forward past the journal's last candle
            self._rows = self._read()
            self._pending = next((candle for candle in self._rows if candle[0] > after_ms), None)
        if self._pending is not None:
            candle, self._pending = self._pending, None
            return [candle]
        candle = next(self._rows, None)
        self._exhausted = candle is None
        return [] if candle is None else [candle]

    def history(self, until_ms: int, count: int) -> list[Candle]:
        window: deque[Candle] = deque(maxlen=count)
        for candle in increasing(self._read(), self.timeframe_ms):
            if candle[0] > until_ms:
                break
            window.append(candle)
        return list(window)

    def wait(self) -> bool:
        return not self._exhausted


class ExchangeFeed:
    """Closed candles of one market from a ccxt exchange, polled every `poll_seconds`.

    Each request is bounded by `timeout_seconds` and retried `max_retries` times with exponential backoff
    (candles.ccxt_client.fetch_page); a poll that still fails raises FeedError and the bot polls again later, from
    its last journalled candle, so no candle is lost to an outage. The clock and the sleep are injectable for tests.
    """

    def __init__(
        self,
        exchange_id: str,
        symbol: str,
        timeframe: str,
        *,
        api_url: str | None = None,
        poll_seconds: float = 60.0,
        timeout_seconds: float = 10.0,
        max_retries: int = 5,
        backoff_seconds: float = 1.0,
        rebuild_limit: int | None = None,
        rate_limit_ms: float | None = None,
        clock_ms: Callable[[], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import cryptoml.candles.ccxt_client as ccxt_client  # ccxt: tens of MB, only for a bot that polls an exchange

        self._ccxt = ccxt_client
        self.exchange = ccxt_client.connect(exchange_id, api_url, rate_limit_ms, timeout_ms=round(timeout_seconds * 1000))
        self.name = exchange_id
        self.symbol, self.timeframe = symbol, timeframe
        self.timeframe_ms = ccxt_client.exchange_timeframe_ms(self.exchange, timeframe)
        self.rebuild_limit = rebuild_limit
        self._poll_seconds, self._max_retries, self._backoff = poll_seconds, max_retries, backoff_seconds
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._sleep = sleep

    def _closed(self, since_ms: int, until_ms: int) -> list[Candle]:
        """The closed candles with open times in [since_ms, until_ms], page by page, sorted, one per open time."""
        last_closed = self._clock_ms() - self.timeframe_ms
        until_ms = min(until_ms, last_closed)
        found: dict[int, Candle] = {}
        try:
            while since_ms <= until_ms:
                page = self._ccxt.fetch_page(
                    self.exchange, self.symbol, self.timeframe, since_ms, self._max_retries, self._backoff, self._sleep
                )
                for row in page:
                    if since_ms <= row[0] <= until_ms:
                        found[int(row[0])] = _candle(row)
                since_ms = self._ccxt.next_page_since([int(row[0]) for row in page], since_ms, self.timeframe_ms)
        except self._ccxt.ExchangeFetchError as exc:
            raise FeedError(str(exc)) from None
        return [found[key] for key in sorted(found)]

    def start(self, count: int) -> list[Candle]:
        return self.history(self._clock_ms(), count)

    def poll(self, after_ms: int) -> list[Candle]:
        return self._closed(after_ms + 1, self._clock_ms())

    def history(self, until_ms: int, count: int) -> list[Candle]:
        """Reaches back further while gaps leave fewer than `count` candles, up to three times the span."""
        found: list[Candle] = []
        for span in (count, 2 * count, 3 * count):
            found = self._closed(until_ms - (span - 1) * self.timeframe_ms, until_ms)
            if len(found) >= count:
                return found[-count:]
        raise FeedError(f"{self.name} {self.symbol}: {len(found)} closed candle(s) up to {iso_utc(until_ms)}, fewer than {count} to seed from")

    def wait(self) -> bool:
        self._sleep(self._poll_seconds)
        return True


def _candle(row: Any) -> Candle:
    timestamp, open_, high, low, close, volume = row
    return (int(timestamp), float(open_), float(high), float(low), float(close), float(volume))
