"""Candles: fetch them from the configured source, validate them, store them.

Every source (synthetic, csv, exchange) goes through `validate_candles` before anything is written, so the
rest of the pipeline can rely on: UTC timestamps on the timeframe grid, strictly increasing and unique;
finite positive prices with low <= min(open, close) <= max(open, close) <= high; finite volume >= 0.

Gaps (missing candles in the time grid) are counted and reported, not filled: a filled candle would invent
prices and volume. Indicators treat consecutive rows as consecutive bars, so a value right after a gap
spans more wall time than usual; `metrics/data.json` records how many gaps there are so a reviewer sees it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.candles.timeframe import parse_timeframe
from cryptoml.config import DataParams
from cryptoml.features.kernels import MAX_INPUT
from cryptoml.io import atomic_path

log = logging.getLogger(__name__)

CANDLE_COLUMNS: tuple[str, ...] = ("timestamp", "open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
NUMERIC_COLUMNS: tuple[str, ...] = (*PRICE_COLUMNS, "volume")
_UTC_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]00:?00)$")
_MAX_LISTED = 5


class CandleValidationError(ValueError):
    """Candles break a rule; the message names the source, the rule and the offending rows."""


@dataclass(frozen=True)
class CandleReport:
    """What validation found, for the log and metrics/data.json."""

    rows: int
    start: pd.Timestamp
    end: pd.Timestamp
    timeframe: str
    gaps: int
    missing_candles: int
    largest_gap_candles: int
    duplicates_dropped: int

    def as_metrics(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "first_candle": self.start.isoformat(),
            "last_candle": self.end.isoformat(),
            "timeframe": self.timeframe,
            "gaps": self.gaps,
            "missing_candles": self.missing_candles,
            "largest_gap_candles": self.largest_gap_candles,
            "duplicates_dropped": self.duplicates_dropped,
        }


class _Locator:
    """Names rows the way the user sees them: file lines for a CSV (header = line 1), row numbers otherwise."""

    def __init__(self, source: str, first_line: int | None) -> None:
        self.source = source
        self.first_line = first_line

    def row(self, position: int) -> str:
        if self.first_line is None:
            return f"row {position}"
        return f"line {position + self.first_line}"

    def fail(self, rule: str, positions: np.ndarray | list[int], detail: Callable[[int], str]) -> None:
        positions = list(positions)
        listed = "; ".join(f"{self.row(p)}: {detail(p)}" for p in positions[:_MAX_LISTED])
        more = f" (and {len(positions) - _MAX_LISTED} more)" if len(positions) > _MAX_LISTED else ""
        raise CandleValidationError(f"{self.source}: {rule} — {listed}{more}")


def _parse_timestamps(column: pd.Series, where: _Locator) -> pd.Series:
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        if str(column.dt.tz) != "UTC":
            raise CandleValidationError(f"{where.source}: timestamps must be UTC, got time zone {column.dt.tz}")
        return column.astype("datetime64[ns, UTC]")
    if pd.api.types.is_datetime64_dtype(column):
        raise CandleValidationError(f"{where.source}: timestamps have no time zone; expected UTC")
    text = column.astype(str).str.strip()
    bad = np.flatnonzero(~text.str.match(_UTC_ISO))
    if bad.size:
        where.fail(
            "timestamp must be ISO-8601 UTC such as 2024-01-01T00:00:00Z", bad, lambda p: repr(column.iloc[p])
        )
    return pd.to_datetime(text, format="ISO8601", utc=True).astype("datetime64[ns, UTC]")


def _parse_numbers(frame: pd.DataFrame, where: _Locator) -> pd.DataFrame:
    out = pd.DataFrame(index=frame.index)
    for name in NUMERIC_COLUMNS:
        raw = frame[name]
        values = pd.to_numeric(raw, errors="coerce").astype("float64")
        if not pd.api.types.is_numeric_dtype(raw):
            text = raw.astype(str).str.strip().str.lower()
            not_numbers = np.flatnonzero(values.isna() & ~text.isin(["", "nan", "none", "null"]))
            if not_numbers.size:
                where.fail(f"column {name!r} must be numeric", not_numbers, lambda p, raw=raw: repr(raw.iloc[p]))
        missing = np.flatnonzero(values.isna())
        if missing.size:
            where.fail(f"column {name!r} has a missing value (NaN or empty)", missing, lambda p: "no value")
        infinite = np.flatnonzero(~np.isfinite(values))
        if infinite.size:
            where.fail(f"column {name!r} must be finite", infinite, lambda p, v=values: repr(float(v.iloc[p])))
        huge = np.flatnonzero(values > MAX_INPUT)
        if huge.size:
            where.fail(f"column {name!r} must be at most {MAX_INPUT:g} (the features square it)", huge, lambda p, v=values: repr(float(v.iloc[p])))
        out[name] = values
    return out


def _ohlc(frame: pd.DataFrame, position: int) -> str:
    return " ".join(f"{name}={float(value):g}" for name, value in frame.iloc[position].items())


def _check_values(frame: pd.DataFrame, where: _Locator) -> None:
    stamp = frame["timestamp"]
    for name in PRICE_COLUMNS:
        bad = np.flatnonzero(frame[name] <= 0)
        if bad.size:
            where.fail(f"{name} must be > 0", bad, lambda p, n=name: f"{stamp.iloc[p]} {n}={float(frame[n].iloc[p])!r}")
    negative = np.flatnonzero(frame["volume"] < 0)
    if negative.size:
        where.fail("volume must be >= 0", negative, lambda p: f"{stamp.iloc[p]} volume={float(frame['volume'].iloc[p])!r}")
    body_top = frame[["open", "close"]].max(axis=1)
    body_bottom = frame[["open", "close"]].min(axis=1)
    high_low = frame[["open", "high", "low", "close"]]
    bad_high = np.flatnonzero(frame["high"] < body_top)
    if bad_high.size:
        where.fail("high must be >= max(open, close)", bad_high, lambda p: f"{stamp.iloc[p]} {_ohlc(high_low, p)}")
    bad_low = np.flatnonzero(frame["low"] > body_bottom)
    if bad_low.size:
        where.fail("low must be <= min(open, close)", bad_low, lambda p: f"{stamp.iloc[p]} {_ohlc(high_low, p)}")


def _drop_duplicates(frame: pd.DataFrame, where: _Locator) -> tuple[pd.DataFrame, int]:
    """Identical repeated candles are harmless (overlapping downloads); different ones are ambiguous."""
    repeated = frame.duplicated(subset=list(CANDLE_COLUMNS), keep="first")
    frame = frame.loc[~repeated]
    conflicting = np.flatnonzero(frame.duplicated(subset=["timestamp"], keep=False))
    if conflicting.size:
        where.fail(
            "duplicate timestamps with different values",
            frame.index[conflicting].tolist(),
            lambda p: f"{frame.loc[p, 'timestamp']} {_ohlc(frame.loc[:, list(NUMERIC_COLUMNS)], frame.index.get_loc(p))}",
        )
    dropped = int(repeated.sum())
    if dropped:
        log.warning("%s: dropped %d identical duplicate candle(s)", where.source, dropped)
    return frame, dropped


def validate_candles(
    raw: pd.DataFrame, timeframe: str, source: str, first_line: int | None = None
) -> tuple[pd.DataFrame, CandleReport]:
    """Check every rule and return the clean candle frame and its report, or raise CandleValidationError.

    `source` names the input in messages; `first_line` is the file line of the first data row (2 for a CSV
    with a header), so errors point at lines a user can open.
    """
    where = _Locator(source, first_line)
    missing = [c for c in CANDLE_COLUMNS if c not in raw.columns]
    if missing:
        raise CandleValidationError(
            f"{source}: missing column(s) {missing}; expected {list(CANDLE_COLUMNS)}, found {list(raw.columns)}"
        )
    if raw.empty:
        raise CandleValidationError(f"{source}: no candles (expected rows of {','.join(CANDLE_COLUMNS)})")
    frame = _parse_numbers(raw.reset_index(drop=True), where)
    frame.insert(0, "timestamp", _parse_timestamps(raw["timestamp"].reset_index(drop=True), where))
    _check_values(frame, where)
    frame, dropped = _drop_duplicates(frame, where)
    positions = frame.index.to_numpy()
    stamps = frame["timestamp"]
    backwards = np.flatnonzero(stamps.diff().iloc[1:] <= pd.Timedelta(0)) + 1
    if backwards.size:
        where.fail(
            "timestamps must be strictly increasing (sort the file)",
            positions[backwards],
            lambda p: f"{frame.loc[p, 'timestamp']} comes after {stamps.shift(1).loc[p]}",
        )
    step = parse_timeframe(timeframe)
    off_grid = np.flatnonzero(stamps != stamps.dt.floor(step))
    if off_grid.size:
        where.fail(
            f"timestamp is not on the {timeframe} candle grid (data.timeframe)",
            positions[off_grid],
            lambda p: str(frame.loc[p, "timestamp"]),
        )
    frame = frame.reset_index(drop=True)
    return frame, summarize_candles(frame, timeframe, duplicates_dropped=dropped)


def summarize_candles(candles: pd.DataFrame, timeframe: str, duplicates_dropped: int = 0) -> CandleReport:
    """Count rows and gaps in the time grid of validated candles."""
    step = parse_timeframe(timeframe)
    missing_per_gap = (candles["timestamp"].diff().iloc[1:] // step - 1).astype("int64")
    gaps = missing_per_gap[missing_per_gap > 0]
    return CandleReport(
        rows=len(candles),
        start=candles["timestamp"].iloc[0],
        end=candles["timestamp"].iloc[-1],
        timeframe=timeframe,
        gaps=len(gaps),
        missing_candles=int(gaps.sum()),
        largest_gap_candles=int(gaps.max()) if len(gaps) else 0,
        duplicates_dropped=duplicates_dropped,
    )


def read_csv_candles(path: Path) -> pd.DataFrame:
    """Read a CSV as text (timestamp,open,high,low,close,volume) so validation can quote bad cells."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CandleValidationError(f"{path}: file not found (data.csv.path)") from None
    except pd.errors.EmptyDataError:
        raise CandleValidationError(f"{path}: empty file; expected a header {','.join(CANDLE_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CandleValidationError(f"{path}: not a readable CSV file: {exc}") from None


def select_window(candles: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, source: str) -> pd.DataFrame:
    """Candles whose open time lies in [start, end); an empty window is an error, not an empty dataset."""
    inside = candles[(candles["timestamp"] >= start) & (candles["timestamp"] < end)].reset_index(drop=True)
    if inside.empty:
        span = f"{candles['timestamp'].iloc[0]} .. {candles['timestamp'].iloc[-1]}" if len(candles) else "nothing"
        raise CandleValidationError(
            f"{source}: no candles in the window [{start}, {end}) (data.start, data.end); the source has {span}"
        )
    return inside


def fetch_candles(
    params: DataParams, now: pd.Timestamp | None = None, on_page: Callable[[int], None] | None = None
) -> tuple[pd.DataFrame, CandleReport]:
    """Load the configured source for the window [data.start, data.end) and validate it."""
    first_line: int | None = None
    if params.source == "synthetic":
        from cryptoml.candles.synthetic import simulate_candles

        source = f"synthetic(seed={params.synthetic.seed})"
        raw = simulate_candles(params.start, params.end, params.timeframe, params.synthetic.seed)
    elif params.source == "csv":
        source = params.csv.path
        raw = read_csv_candles(Path(params.csv.path))
        first_line = 2
    else:
        from cryptoml.candles.exchange import fetch_exchange_candles

        cfg = params.exchange
        source = f"{cfg.id} {cfg.symbol} {params.timeframe}"
        raw = fetch_exchange_candles(
            cfg.id,
            cfg.symbol,
            params.timeframe,
            params.start,
            params.end,
            now=now,
            api_url=cfg.api_url,
            max_retries=cfg.max_retries,
            backoff_seconds=cfg.backoff_seconds,
            on_page=on_page,
        )
    candles, report = validate_candles(raw, params.timeframe, source, first_line)
    window = select_window(candles, params.start, params.end, source)
    return window, summarize_candles(window, params.timeframe, report.duplicates_dropped)


def write_parquet(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    """Parquet keeps dtypes and UTC time zones exactly and is compact; written atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=index, engine="pyarrow", compression="zstd")


def read_candles(path: Path) -> pd.DataFrame:
    """Read the fetch stage's output; anything else in its place is refused."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `cryptoml fetch` (or `dvc repro`) first")
    frame = pd.read_parquet(path)
    if tuple(frame.columns) != CANDLE_COLUMNS:
        raise CandleValidationError(f"{path}: expected columns {list(CANDLE_COLUMNS)}, found {list(frame.columns)}")
    return frame
