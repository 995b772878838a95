"""FeatureState: the 12 features of each new closed candle in O(1), in a process without pandas or numba.

FeatureManager.generate_latest recomputes LIVE_WINDOW candles through pandas and numba on every candle. FeatureState
keeps what the indicators carry from one candle to the next (the eight recursions' values, the rolling windows'
buffers) and advances them with the batch's own kernels (cryptoml.features.kernels), interpreted.

Values. From the same first candle, FeatureState and FeatureManager.generate_features do the same float operations
in the same order: their rows are bit-identical. Seeded from the last candles of a longer history, the state
differs from the batch over the whole history in two ways only: its recursions were seeded at its first candle,
and that difference decays below 1e-16 of the price once LIVE_WINDOW candles have been seen (`ready`; see
kernels.LIVE_WINDOW), and its rolling windows are cut into blocks counted from its first candle, which moves the
float rounding of the 20-bar statistics (~1e-14 relative). The tests hold a ready state to 1e-9 of the batch.

Candles. A candle is (timestamp_ms, high, low, close, volume), or a row of ccxt's fetch_ohlcv (timestamp_ms, open,
high, low, close, volume): timestamp_ms is its open time in epoch milliseconds, on the grid of `timeframe_ms`
counted from the Unix epoch (as exchanges and cryptoml.candles.timeframe align it). A candle is closed once its
open time plus the timeframe has passed (`now_ms`, the wall clock unless given); the candle still forming is
never used.

Order. `update` takes the next candle on the grid and nothing else: a gap, a duplicate of the last candle, an
older candle or one off the grid raises CandleSequenceError and leaves the state as it was. The state cannot
repair any of them: it sees one candle, not whether the missing ones exist (the bot missed them) or not (an
exchange outage, which the exchange's history keeps as a gap and the batch, like training, reads as consecutive
rows), nor which of two versions of a candle is right. The bot's loop can: on a gap it re-seeds from the exchange's
history, the candles the batch would see; a duplicate it may skip. `seed` therefore accepts a history with gaps,
as the batch does, and logs them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from cryptoml.features.kernels import FLAT_RTOL, LIVE_WINDOW, MAX_INPUT, RECURSIONS_START, WINDOWS_START, advance_row, write_row
from cryptoml.features.spec import FEATURE_NAMES, band_n_std, recursion_periods, warmup_rows, window_periods

log = logging.getLogger(__name__)

# Fields of a candle: this module's own layout, and ccxt's fetch_ohlcv row (which adds the open, unused here).
CANDLE_FIELDS: tuple[str, ...] = ("timestamp_ms", "high", "low", "close", "volume")
CCXT_FIELDS: tuple[str, ...] = ("timestamp_ms", "open", "high", "low", "close", "volume")
# Kinds of CandleSequenceError.
GAP, DUPLICATE, OLDER, OFF_GRID, NOT_CLOSED = "gap", "duplicate", "older", "off-grid", "not closed"

Candle = tuple[int, float, float, float, float]


class CandleSequenceError(ValueError):
    """A candle that is not the next closed one on the grid; `kind` says how (GAP, DUPLICATE, OLDER, OFF_GRID,
    NOT_CLOSED), so that a bot can re-seed, skip or wait. The state it was given to is unchanged."""

    def __init__(self, kind: str, timestamp_ms: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.timestamp_ms = timestamp_ms


def utc_text(timestamp_ms: int) -> str:
    """An epoch-millisecond time as ISO 8601 UTC, for messages."""
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def parse_candle(row: Sequence[float]) -> Candle:
    """(timestamp_ms, high, low, close, volume) from either layout, checked as the batch checks its columns."""
    if len(row) == len(CANDLE_FIELDS):
        timestamp, high, low, close, volume = row
    elif len(row) == len(CCXT_FIELDS):
        timestamp, _, high, low, close, volume = row
    else:
        raise ValueError(f"a candle has the fields {CANDLE_FIELDS} or ccxt's {CCXT_FIELDS}; got {len(row)}: {row!r}")
    timestamp_ms = int(timestamp)
    if timestamp_ms != timestamp:
        raise ValueError(f"timestamp_ms must be whole epoch milliseconds; got {timestamp!r}")
    candle = (timestamp_ms, float(high), float(low), float(close), float(volume))
    for name, value in zip(CANDLE_FIELDS[1:], candle[1:], strict=True):
        is_price = name != "volume"
        if not ((value > 0.0 if is_price else value >= 0.0) and value <= MAX_INPUT):  # NaN fails both comparisons
            expected = "> 0" if is_price else ">= 0"
            raise ValueError(f"candle {utc_text(timestamp_ms)}: {name!r} must be finite, {expected} and at most {MAX_INPUT:g}; got {value}")
    return candle


def _now_ms(now_ms: int | None) -> int:
    return time.time_ns() // 1_000_000 if now_ms is None else now_ms


class FeatureState:
    """The features of a history of closed candles, advanced one candle at a time (module docstring).

    Make one with FeatureState.seed, then call `update` with each new closed candle. The parameters
    (spec.FEATURE_PARAMS) are read when it is seeded.
    """

    def __init__(self, timeframe_ms: int) -> None:
        """An empty state: use FeatureState.seed, which feeds it a history."""
        if timeframe_ms <= 0:
            raise ValueError(f"timeframe_ms must be > 0; got {timeframe_ms}")
        self.timeframe_ms = timeframe_ms
        self._periods = recursion_periods()
        self._n_std = band_n_std()
        # Lists, not arrays: the interpreter reads and writes them several times faster.
        self._buffers = tuple(([0.0] * period, [0.0] * period, [0.0] * period) for period in window_periods())
        self._recursions, self._windows = RECURSIONS_START, WINDOWS_START
        self._rows = 0  # candles seen
        self._last_timestamp = -1
        self._previous = self._close = self._volume = math.nan  # of the last candle seen
        self._row = np.full((len(FEATURE_NAMES), 1), np.nan)

    @classmethod
    def seed(
        cls, candles: Sequence[Sequence[float]] | np.ndarray, timeframe_ms: int, now_ms: int | None = None
    ) -> FeatureState:
        """A state that has seen `candles` (oldest first, either layout; a 2-D array with 5 or 6 columns too).

        A last candle still forming at now_ms is left out, as ccxt's fetch_ohlcv returns one; every other candle
        must be closed, on the grid and after the one before it. Gaps are allowed and logged, as the batch reads a
        history with gaps. Needs warmup_rows() + 1 closed candles, so that every feature is defined; the state is
        `ready` from LIVE_WINDOW on.
        """
        state = cls(timeframe_ms)
        parsed = [parse_candle(row) for row in candles]
        now = _now_ms(now_ms)
        if parsed and state._closes_after(parsed[-1][0], now):
            parsed.pop()
        needed = warmup_rows() + 1
        if len(parsed) < needed:
            raise ValueError(f"seeding needs {needed} closed candles (every feature defined); got {len(parsed)}")
        missing = 0
        for candle in parsed:
            missing += state._check_order(candle[0], now, allow_gap=True)
            state._advance(candle)
        if missing:
            log.warning("seed history has %d missing candle(s); the features read it as consecutive rows", missing)
        state._write_row()
        return state

    @property
    def last_timestamp(self) -> int:
        """Open time (epoch milliseconds) of the last candle the state has seen."""
        return self._last_timestamp

    @property
    def ready(self) -> bool:
        """Whether the state has seen LIVE_WINDOW candles: its values then equal the batch's over any longer
        history to 1e-9 (before, they depend on where the seed started)."""
        return self._rows >= LIVE_WINDOW

    @property
    def features(self) -> np.ndarray:
        """The features of the last candle seen (FEATURE_NAMES order, float64), as `update` returned them."""
        return self._row[:, 0].copy()

    def update(self, candle: Sequence[float], now_ms: int | None = None) -> np.ndarray:
        """Advances the state by the next closed candle and returns its features (FEATURE_NAMES order, float64).

        Raises CandleSequenceError, the state unchanged, for a candle that is not the next one on the grid or is
        still forming at now_ms; ValueError for invalid values.
        """
        if not self._rows:
            raise ValueError("this FeatureState is empty: make one with FeatureState.seed")
        parsed = parse_candle(candle)
        self._check_order(parsed[0], _now_ms(now_ms), allow_gap=False)
        self._advance(parsed)
        self._write_row()
        return self.features

    def _closes_after(self, timestamp_ms: int, now_ms: int) -> bool:
        return timestamp_ms + self.timeframe_ms > now_ms

    def _check_order(self, timestamp_ms: int, now_ms: int, allow_gap: bool) -> int:
        """Candles missing between the last candle and this one; raises CandleSequenceError if it cannot follow."""
        missing = (timestamp_ms - self._last_timestamp) // self.timeframe_ms - 1 if self._rows else 0
        kind = (
            OFF_GRID
            if timestamp_ms % self.timeframe_ms
            else NOT_CLOSED
            if self._closes_after(timestamp_ms, now_ms)
            else DUPLICATE
            if self._rows and timestamp_ms == self._last_timestamp
            else OLDER
            if self._rows and timestamp_ms < self._last_timestamp
            else GAP
            if missing and not allow_gap
            else None
        )
        if kind is not None:
            raise CandleSequenceError(kind, timestamp_ms, self._refusal(kind, timestamp_ms, now_ms, missing))
        return missing

    def _refusal(self, kind: str, timestamp_ms: int, now_ms: int, missing: int) -> str:
        """Why the candle at timestamp_ms cannot follow, for the error (built only then: formatting times is slow)."""
        when, last = utc_text(timestamp_ms), utc_text(self._last_timestamp)
        closes = utc_text(timestamp_ms + self.timeframe_ms)
        return {
            OFF_GRID: f"candle {when} is off the grid of {self.timeframe_ms} ms candles (counted from the Unix epoch)",
            NOT_CLOSED: f"candle {when} is not closed at {utc_text(now_ms)}: it closes at {closes}",
            DUPLICATE: f"candle {when} is a duplicate of the last candle",
            OLDER: f"candle {when} is older than the last candle, {last}",
            GAP: f"candle {when} leaves a gap of {missing} candle(s) after the last candle, {last}: "
            "re-seed from the exchange's history (FeatureState.seed)",
        }[kind]

    def _advance(self, candle: Candle) -> None:
        """The batch loop's step (kernels.batch_features) for one candle."""
        timestamp_ms, high, low, close, volume = candle
        previous = self._close if self._rows else close
        self._recursions, self._windows = advance_row(
            self._recursions,
            self._windows,
            self._buffers,
            self._periods,
            self._rows,
            high,
            low,
            close,
            previous,
            volume,
        )
        self._rows += 1
        self._last_timestamp = timestamp_ms
        self._previous, self._close, self._volume = previous, close, volume

    def _write_row(self) -> None:
        """The features of the last candle seen into self._row (defined once warmup_rows() + 1 candles were seen)."""
        write_row(
            self._recursions,
            self._windows,
            self._buffers,
            self._close,
            self._previous,
            self._volume,
            self._n_std,
            FLAT_RTOL,
            self._row,
            0,
        )
