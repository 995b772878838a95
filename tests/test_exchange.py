"""fetch_exchange_candles end to end: ccxt's real bitbank client against a local fake bitbank."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pandas as pd
import pytest

from cryptoml.candles.exchange import (
    PAGE_LIMIT,
    ExchangeFetchError,
    candles_to_frame,
    fetch_exchange_candles,
    next_page_since,
)
from cryptoml.candles.store import CANDLE_COLUMNS
from tests.fake_exchange import FakeBitbank, read_candle_csv

HOUR = pd.Timedelta(hours=1)
DAY = pd.Timedelta(days=1)
FIRST_DAY = pd.Timestamp("2024-01-01", tz="UTC")
DAYS = 3
WINDOW_END = FIRST_DAY + DAYS * DAY
LONG_AFTER = WINDOW_END + 30 * DAY  # a `now` at which every candle of the window is closed
FAST = {"max_retries": 3, "backoff_seconds": 0.001, "rate_limit_ms": 1}


def make_candles(first_open: pd.Timestamp, count: int, freq: str = "h", seed: int = 7) -> pd.DataFrame:
    """A random-walk candle frame following the contract (any values do: nothing validates here)."""
    rng = np.random.default_rng(seed)
    close = 6e6 + np.cumsum(rng.normal(0.0, 2e4, count))
    open_ = np.concatenate([[close[0]], close[:-1]])
    spread = np.abs(rng.normal(0.0, 1e4, count))
    return pd.DataFrame(
        {
            "timestamp": pd.date_range(first_open, periods=count, freq=freq, unit="ns"),
            "open": open_,
            "high": np.maximum(open_, close) + spread,
            "low": np.minimum(open_, close) - spread,
            "close": close,
            "volume": rng.gamma(2.0, 0.5, count),
        }
    )


def between(candles: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    inside = (candles["timestamp"] >= start) & (candles["timestamp"] < end)
    return candles[inside].reset_index(drop=True)


@pytest.fixture
def candles() -> pd.DataFrame:
    return make_candles(FIRST_DAY, DAYS * 24)


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeBitbank]]:
    """Starts fake bitbanks serving given frames; all are stopped after the test."""
    started: list[FakeBitbank] = []

    def start(served: pd.DataFrame, candle_type: str = "1hour") -> FakeBitbank:
        started.append(FakeBitbank(served, candle_type=candle_type).start())
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


def fetch(
    fake: FakeBitbank,
    start: pd.Timestamp = FIRST_DAY,
    end: pd.Timestamp = WINDOW_END,
    timeframe: str = "1h",
    **options: object,
) -> pd.DataFrame:
    settings = {"now": LONG_AFTER, "api_url": fake.url, **FAST, **options}
    return fetch_exchange_candles("bitbank", "BTC/JPY", timeframe, start, end, **settings)


def test_pages_through_every_day_of_the_window(serve, candles) -> None:
    fake = serve(candles)

    fetched = fetch(fake)

    pd.testing.assert_frame_equal(fetched, candles, check_exact=True)
    assert tuple(fetched.columns) == CANDLE_COLUMNS
    assert str(fetched["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert isinstance(fetched.index, pd.RangeIndex)
    assert [fake.request_count(fake.candle_path(FIRST_DAY + d * DAY)) for d in range(DAYS)] == [1] * DAYS


def test_a_day_longer_than_a_page_takes_several_pages(serve) -> None:
    """bitbank serves a whole day of minutes; ccxt keeps PAGE_LIMIT of them per call.

    The gap (shorter than a page, then whole pages) must be crossed without ending the fetch.
    """
    minutes = make_candles(FIRST_DAY, 2 * 24 * 60, freq="min")
    gap = (minutes["timestamp"] >= FIRST_DAY + 6 * HOUR) & (minutes["timestamp"] < FIRST_DAY + DAY + 12 * HOUR)
    with_a_gap = minutes[~gap].reset_index(drop=True)
    fake = serve(with_a_gap, candle_type="1min")
    pages: list[int] = []

    fetched = fetch(fake, end=FIRST_DAY + 2 * DAY, timeframe="1m", on_page=pages.append)

    pd.testing.assert_frame_equal(fetched, with_a_gap, check_exact=True)
    assert len(pages) > 2 and max(pages) <= PAGE_LIMIT


@pytest.mark.fault
def test_a_real_exchange_outage_is_crossed(serve, shared_data: Path) -> None:
    """Binance's February 2018 outage: partial days around two days without a single candle."""
    real = read_candle_csv(shared_data / "BTC_USDT_1h_2017-08-17_2020-02-01.csv")
    start, end = pd.Timestamp("2018-02-06", tz="UTC"), pd.Timestamp("2018-02-14", tz="UTC")
    window = between(real, start, end)
    served_days = set(window["timestamp"].dt.floor("D"))
    empty_days = [day for day in pd.date_range(start, end, freq="D", inclusive="left") if day not in served_days]
    fake = serve(window)

    fetched = fetch(fake, start, end)

    pd.testing.assert_frame_equal(fetched, window, check_exact=True)
    assert empty_days and all(fake.request_count(fake.candle_path(day)) == 1 for day in empty_days)


def test_on_page_reports_the_candles_kept_per_page(serve, candles) -> None:
    pages: list[int] = []

    fetched = fetch(serve(candles), on_page=pages.append)

    assert len(pages) == DAYS
    assert sum(pages) == len(fetched)


@pytest.mark.parametrize("status", [429, 500])
@pytest.mark.fault
def test_transient_http_errors_are_retried(serve, candles, status: int) -> None:
    fake = serve(candles)
    second_day = fake.candle_path(FIRST_DAY + DAY)
    failures = 2
    fake.fail(second_day, status, times=failures)

    fetched = fetch(fake)

    pd.testing.assert_frame_equal(fetched, candles, check_exact=True)
    assert fake.request_count(second_day) == failures + 1


def test_an_empty_day_does_not_end_the_fetch(serve, candles) -> None:
    second_day = FIRST_DAY + DAY
    without_second_day = pd.concat(
        [between(candles, FIRST_DAY, second_day), between(candles, second_day + DAY, WINDOW_END)],
        ignore_index=True,
    )
    fake = serve(without_second_day)

    fetched = fetch(fake)

    pd.testing.assert_frame_equal(fetched, without_second_day, check_exact=True)
    assert fake.request_count(fake.candle_path(second_day)) == 1


@pytest.mark.parametrize("minutes_after_forming_open", [0, 30, 59, 60])
def test_the_candle_still_forming_is_excluded(serve, candles, minutes_after_forming_open: int) -> None:
    forming_open = candles["timestamp"].iloc[-1]
    now = forming_open + pd.Timedelta(minutes=minutes_after_forming_open)

    fetched = fetch(serve(candles), now=now)

    closed = candles[candles["timestamp"] + HOUR <= now].reset_index(drop=True)
    pd.testing.assert_frame_equal(fetched, closed, check_exact=True)
    assert (fetched["timestamp"].iloc[-1] == forming_open) == (minutes_after_forming_open == 60)


def test_the_window_is_half_open(serve, candles) -> None:
    start = FIRST_DAY + 5 * HOUR
    end = WINDOW_END - DAY + 7 * HOUR

    fetched = fetch(serve(candles), start, end)

    pd.testing.assert_frame_equal(fetched, between(candles, start, end), check_exact=True)
    assert fetched["timestamp"].iloc[0] == start
    assert fetched["timestamp"].iloc[-1] == end - HOUR


def test_a_window_not_yet_closed_fetches_nothing(serve, candles) -> None:
    fake = serve(candles)

    fetched = fetch(fake, now=FIRST_DAY + HOUR / 2)

    assert fetched.empty
    assert tuple(fetched.columns) == CANDLE_COLUMNS
    assert fake.request_counts() == {}


@pytest.mark.fault
def test_exhausted_retries_raise_a_clear_error(serve, candles) -> None:
    fake = serve(candles)
    second_day = FIRST_DAY + DAY
    fake.fail(fake.candle_path(second_day), 503, times=100)
    max_retries = 2

    with pytest.raises(ExchangeFetchError) as raised:
        fetch(fake, max_retries=max_retries)

    message = str(raised.value)
    for expected in ("bitbank", "BTC/JPY", second_day.isoformat(), f"{max_retries + 1} attempts", "503"):
        assert expected in message
    assert isinstance(raised.value.__cause__, Exception)
    assert fake.request_count(fake.candle_path(second_day)) == max_retries + 1


@pytest.mark.fault
def test_a_non_transient_error_is_not_retried(serve, candles) -> None:
    fake = serve(candles)
    second_day = fake.candle_path(FIRST_DAY + DAY)
    fake.fail(second_day, 404, bitbank_code=10000)

    with pytest.raises(ExchangeFetchError, match="non-transient"):
        fetch(fake)

    assert fake.request_count(second_day) == 1


def test_retry_delays_grow_exponentially(serve, candles) -> None:
    fake = serve(candles)
    failures, backoff = 3, 0.02
    fake.fail(fake.candle_path(FIRST_DAY), 429, times=failures)

    started = time.perf_counter()
    fetch(fake, end=FIRST_DAY + DAY, backoff_seconds=backoff)
    elapsed = time.perf_counter() - started

    exponential_total = backoff * sum(2**attempt for attempt in range(failures))
    assert elapsed >= exponential_total > backoff * failures


def test_requests_are_spaced_by_the_rate_limit(serve, candles) -> None:
    rate_limit_ms = 40

    started = time.perf_counter()
    fetch(serve(candles), rate_limit_ms=rate_limit_ms)
    elapsed = time.perf_counter() - started

    # markets, then one request per day: every request after the first waits its turn.
    assert elapsed >= DAYS * rate_limit_ms / 1000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"start": FIRST_DAY.tz_localize(None)}, "start must be timezone-aware"),
        ({"start": WINDOW_END}, "must be before end"),
        ({"exchange_id": "no-such-exchange"}, "unknown ccxt exchange"),
        ({"timeframe": "7h"}, "no timeframe '7h'"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
    ],
)
def test_bad_arguments_are_refused(change: dict[str, object], message: str) -> None:
    arguments = {
        "exchange_id": "bitbank",
        "symbol": "BTC/JPY",
        "timeframe": "1h",
        "start": FIRST_DAY,
        "end": WINDOW_END,
        "now": LONG_AFTER,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        fetch_exchange_candles(**arguments)


def epoch_ms(moment: pd.Timestamp) -> int:
    return int(moment.value // 1_000_000)


def ccxt_rows(candles: pd.DataFrame) -> list[list[float]]:
    """A candle frame as ccxt's OHLCV rows: [open time ms, open, high, low, close, volume]."""
    open_ms = (candles["timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return candles.assign(timestamp=open_ms).values.tolist()


MINUTE_MS, HOUR_MS = 60_000, 3_600_000
SINCE_MS = epoch_ms(FIRST_DAY + 6 * HOUR)
NEXT_DAY_MS = epoch_ms(FIRST_DAY + DAY)


@pytest.mark.parametrize(
    ("page_open_ms", "timeframe_ms", "expected_ms"),
    [
        # after candles: the open time following the newest one at or after `since`
        ([SINCE_MS - HOUR_MS, SINCE_MS, SINCE_MS + HOUR_MS], HOUR_MS, SINCE_MS + 2 * HOUR_MS),
        # empty (or only older candles): bitbank's page ended at the UTC day boundary...
        ([], HOUR_MS, NEXT_DAY_MS),
        ([SINCE_MS - HOUR_MS], HOUR_MS, NEXT_DAY_MS),
        # ...unless a page of PAGE_LIMIT candles ends sooner (count-paged exchanges)
        ([], MINUTE_MS, SINCE_MS + PAGE_LIMIT * MINUTE_MS),
    ],
)
def test_next_page_starts_past_what_the_page_covered(
    page_open_ms: list[int], timeframe_ms: int, expected_ms: int
) -> None:
    assert next_page_since(page_open_ms, SINCE_MS, timeframe_ms) == expected_ms


def test_overlapping_identical_candles_are_kept_once_and_sorted(candles) -> None:
    rows = ccxt_rows(candles)
    overlapping_pages = rows[24:] + rows[:30]

    pd.testing.assert_frame_equal(candles_to_frame(overlapping_pages), candles, check_exact=True)


@pytest.mark.fault
def test_two_different_candles_for_one_open_time_are_an_error(candles) -> None:
    rows = ccxt_rows(candles)
    revised = [*rows[0][:4], rows[0][4] + 1.0, rows[0][5]]

    with pytest.raises(ExchangeFetchError, match=re.escape(FIRST_DAY.isoformat())):
        candles_to_frame([*rows, revised])


def test_no_candles_give_an_empty_frame_with_the_contract_dtypes() -> None:
    empty = candles_to_frame([])

    assert tuple(empty.columns) == CANDLE_COLUMNS
    assert str(empty["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert (empty.dtypes.iloc[1:] == "float64").all()


def test_the_fake_runs_standalone(tmp_path: Path, candles) -> None:
    csv_path, port_file = tmp_path / "candles.csv", tmp_path / "port"
    candles.to_csv(csv_path, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
    first_day = f"/btc_jpy/candlestick/1hour/{FIRST_DAY:%Y%m%d}"
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fake_exchange.py")), "--csv", str(csv_path),
         "--port-file", str(port_file), "--fail", f"{first_day}:500:1"],
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, "fake did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"

        fetched = fetch_exchange_candles(
            "bitbank", "BTC/JPY", "1h", FIRST_DAY, WINDOW_END, now=LONG_AFTER, api_url=url, **FAST
        )
        with urlopen(f"{url}/__fake__/requests") as response:
            counts = json.load(response)
    finally:
        server.terminate()
        server.wait(timeout=10)

    pd.testing.assert_frame_equal(fetched, candles, check_exact=True)
    assert counts[first_day] == 2
    assert server.returncode == 0, "the fake should shut down cleanly on SIGTERM"
