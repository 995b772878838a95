"""Candle validation: every rule names the file, line and rule; bad input never becomes a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptoml.candles.store import (
    CANDLE_COLUMNS,
    CandleValidationError,
    read_candles,
    read_csv_candles,
    select_window,
    validate_candles,
    write_parquet,
)

HEADER = "timestamp,open,high,low,close,volume\n"


def candle_rows(n: int = 6, start: str = "2024-01-01T00:00:00Z") -> list[str]:
    stamps = pd.date_range(start, periods=n, freq="1h")
    return [f"{t.strftime('%Y-%m-%dT%H:%M:%SZ')},100,101,99,100.5,{10 + i}" for i, t in enumerate(stamps)]


def write_csv(tmp_path: Path, lines: list[str], header: str = HEADER) -> Path:
    path = tmp_path / "candles.csv"
    path.write_text(header + "".join(f"{line}\n" for line in lines))
    return path


def validate_file(path: Path, timeframe: str = "1h") -> tuple[pd.DataFrame, object]:
    return validate_candles(read_csv_candles(path), timeframe, str(path), first_line=2)


def test_valid_csv_gives_typed_utc_frame(tmp_path: Path) -> None:
    frame, report = validate_file(write_csv(tmp_path, candle_rows(6)))
    assert tuple(frame.columns) == CANDLE_COLUMNS
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert all(frame[c].dtype == np.float64 for c in CANDLE_COLUMNS[1:])
    assert report.rows == 6 and report.gaps == 0 and report.duplicates_dropped == 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: [rows[0].replace(",100.5,", ",abc,")] + rows[1:], "column 'close' must be numeric — line 2: 'abc'"),
        (lambda rows: rows[:2] + [rows[2].replace(",100.5,", ",,")] + rows[3:], "'close' has a missing value"),
        (lambda rows: rows[:3] + [rows[3].replace(",100.5,", ",nan,")] + rows[4:], "line 5: no value"),
        (lambda rows: rows[:1] + [rows[1].rsplit(",", 1)[0] + ",-1"] + rows[2:], "volume must be >= 0 — line 3"),
        (lambda rows: [rows[0].replace(",101,", ",100.2,")] + rows[1:], "high must be >= max(open, close) — line 2"),
        (lambda rows: [rows[0].replace(",99,", ",100.2,")] + rows[1:], "low must be <= min(open, close) — line 2"),
        (lambda rows: [rows[0].replace(",100,101,99,", ",0,101,0,")] + rows[1:], "open must be > 0"),
        (lambda rows: [rows[0].replace(",101,", ",inf,")] + rows[1:], "'high' must be finite"),
        (lambda rows: [rows[0].replace(",101,", ",1e300,")] + rows[1:], "'high' must be at most 1e+100 (the features square it) — line 2: 1e+300"),
        (lambda rows: [rows[1], rows[0]] + rows[2:], "strictly increasing (sort the file) — line 3"),
        (lambda rows: [rows[0].replace("Z,", ",")] + rows[1:], "ISO-8601 UTC"),
        (lambda rows: [rows[0].replace("Z,", "+09:00,")] + rows[1:], "ISO-8601 UTC"),
        (lambda rows: [rows[0].replace("00:00:00Z", "00:30:00Z")] + rows[1:], "not on the 1h candle grid"),
        (lambda rows: rows[:2] + [rows[1].replace(",100.5,", ",100.7,")] + rows[2:], "duplicate timestamps with different values"),
    ],
)
@pytest.mark.fault
def test_each_rule_names_line_and_rule(tmp_path: Path, mutate, message: str) -> None:
    path = write_csv(tmp_path, mutate(candle_rows(6)))
    with pytest.raises(CandleValidationError) as info:
        validate_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.fault
def test_missing_and_misnamed_columns_are_listed(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [r.rsplit(",", 1)[0] for r in candle_rows(3)], header="timestamp,open,high,low,close\n")
    with pytest.raises(CandleValidationError, match=r"missing column\(s\) \['volume'\]"):
        validate_file(path)


@pytest.mark.parametrize(("content", "message"), [("", "empty file"), (HEADER, "no candles")])
@pytest.mark.fault
def test_empty_file_and_header_only(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "candles.csv"
    path.write_text(content)
    with pytest.raises(CandleValidationError, match=message):
        validate_file(path)


@pytest.mark.fault
def test_missing_file_names_the_params_key(tmp_path: Path) -> None:
    with pytest.raises(CandleValidationError, match=r"file not found \(data.csv.path\)"):
        read_csv_candles(tmp_path / "nope.csv")


@pytest.mark.fault
def test_identical_duplicates_dropped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = candle_rows(4)
    frame, report = validate_file(write_csv(tmp_path, rows[:2] + [rows[1]] + rows[2:]))
    assert len(frame) == 4 and report.duplicates_dropped == 1
    assert "dropped 1 identical duplicate" in caplog.text


@pytest.mark.fault
def test_gaps_are_counted_not_filled(tmp_path: Path) -> None:
    rows = candle_rows(10)
    frame, report = validate_file(write_csv(tmp_path, rows[:3] + rows[5:6] + rows[9:]))
    assert len(frame) == 5
    assert (report.gaps, report.missing_candles, report.largest_gap_candles) == (2, 5, 3)


@pytest.mark.fault
def test_in_memory_frames_must_be_utc(tmp_path: Path) -> None:
    frame, _ = validate_file(write_csv(tmp_path, candle_rows(3)))
    naive = frame.assign(timestamp=frame["timestamp"].dt.tz_localize(None))
    with pytest.raises(CandleValidationError, match="no time zone"):
        validate_candles(naive, "1h", "memory")
    tokyo = frame.assign(timestamp=frame["timestamp"].dt.tz_convert("Asia/Tokyo"))
    with pytest.raises(CandleValidationError, match="must be UTC"):
        validate_candles(tokyo, "1h", "memory")


@pytest.mark.fault
def test_many_bad_rows_are_summarised(tmp_path: Path) -> None:
    rows = [r.replace(",100.5,", ",x,") for r in candle_rows(8)]
    with pytest.raises(CandleValidationError, match=r"\(and 3 more\)"):
        validate_file(write_csv(tmp_path, rows))


@pytest.mark.fault
def test_window_is_half_open_and_empty_window_is_an_error(tmp_path: Path) -> None:
    frame, _ = validate_file(write_csv(tmp_path, candle_rows(6)))
    start, end = frame["timestamp"].iloc[1], frame["timestamp"].iloc[4]
    inside = select_window(frame, start, end, "memory")
    assert inside["timestamp"].tolist() == frame["timestamp"].iloc[1:4].tolist()
    with pytest.raises(CandleValidationError, match=r"no candles in the window .*data.start, data.end"):
        select_window(frame, end + pd.Timedelta("10D"), end + pd.Timedelta("11D"), "memory")


def test_parquet_round_trip_is_exact_and_byte_stable(tmp_path: Path) -> None:
    frame, _ = validate_file(write_csv(tmp_path, candle_rows(50)))
    first, second = tmp_path / "a" / "ohlcv.parquet", tmp_path / "b" / "ohlcv.parquet"
    write_parquet(frame, first)
    write_parquet(frame, second)
    assert first.read_bytes() == second.read_bytes()
    pd.testing.assert_frame_equal(read_candles(first), frame)
    assert not list(first.parent.glob("*.tmp"))


@pytest.mark.fault
def test_read_candles_refuses_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cryptoml fetch"):
        read_candles(tmp_path / "missing.parquet")
    other = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1.0]}).to_parquet(other)
    with pytest.raises(CandleValidationError, match="expected columns"):
        read_candles(other)


def test_real_binance_file_validates_with_its_documented_gaps(shared_data: Path) -> None:
    frame, report = validate_file(shared_data / "BTC_USDT_1h_2017-08-17_2020-02-01.csv")
    assert (report.rows, report.gaps, report.missing_candles, report.largest_gap_candles) == (21410, 13, 139, 75)
    assert frame["timestamp"].is_monotonic_increasing
