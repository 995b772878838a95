"""The arithmetic of the 12 features, one candle at a time: the one definition of every indicator.

FeatureManager compiles these functions with numba and runs `batch_features` over a whole history; FeatureState calls
them as they are, one closed candle at a time. So this module imports neither numba nor pandas (a bot that imports
the state stays small), and it is written in the subset of Python that numba compiles: floats, ints, tuples and
1-D buffers indexed by position (numpy arrays when compiled; lists when interpreted, which Python indexes faster).
Numba compiles without fastmath, so nothing is fused or reordered: compiled and interpreted, the kernels do the same
IEEE 754 operations in the same order, and from the same first candle their values are bit-identical.

The batch loop `batch_features` lives here too, not in the manager: numba's on-disk cache is invalidated by changes to
the cached function's own file only, so a compiled loop in another file would keep running stale kernels.

Every indicator is defined exactly as TA-Lib computes it (unstable period 0), so values can be checked against it:

* ``rsi_14``, ``atr_14``: Wilder smoothing (alpha = 1/14) seeded with the simple mean of the first 14 price changes
  / true ranges; first value at row 14.
* ``macd``, ``macd_signal``: EMA12 - EMA26 and its EMA9. As in TA-Lib both EMAs start at the slow lookback: the slow
  one is seeded with the mean of rows 0..25, the fast one with the mean of rows 14..25 (not rows 0..11); the signal is
  seeded with the mean of the first 9 MACD values, so the first row is 33.
* ``ema_20``, ``ema_50``: EMA (alpha = 2/(n+1)) seeded with the mean of the first n closes.
* ``bb_position`` = (close - lower) / (upper - lower) with bands mean +- 2 population std over 20 closes, which is
  0.5 + zscore / (2 * 2); ``zscore`` = (close - 20-bar mean) / 20-bar population std.
* ``volume_ratio`` = volume / 20-bar mean volume; ``returns_1`` = close_t / close_{t-1} - 1.

What a candle leaves for the next one is plain values: a Smoother per recursion and a Window per rolling statistic
(with its three buffers), so the state can hold them and the compiled loop keep them in registers.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from cryptoml.features.spec import FEATURE_NAMES

# Candles the live paths need: FeatureManager.generate_latest recomputes from the last LIVE_WINDOW, FeatureState is
# `ready` after seeing LIVE_WINDOW. Seeds taken at the window's start differ from the batch state by at most about
# the price and decay by the filter's factor per row up to window row LIVE_WINDOW - 1: EMA50 (49/51)**950 ~ 3e-17,
# below the float resolution of the price (~570 rows would reach 1e-9); MACD's EMA26 (25/27)**974 ~ 3e-33 of the
# price, under 1e-9 of the MACD unless |macd| < 3e-24 * price; Wilder (13/14)**985 ~ 2e-32. In practice the live
# and batch recursions end bit-identical; only the rolling statistics differ, by float rounding (~1e-14 relative).
LIVE_WINDOW = 1000

# A 20-bar std at most this fraction of the mean price counts as flat (bb_position = 0.5, zscore = 0), and so does
# an RSI whose smoothed gain + loss is at most this fraction of the close (rsi = 50). One price tick of a real
# market is >= ~1e-8 of the price; float error of the std computed here is ~1e-16 of the price.
FLAT_RTOL = 1e-10

# The largest price or volume the features take: the 20-bar variance sums squares, and a square of more than ~1e154
# overflows float64, so a value far beyond any market's (1e100) is refused rather than turned into NaN features.
MAX_INPUT = 1e100

# numba.njit options FeatureManager compiles these kernels with (besides its on-disk cache), never fastmath, which
# would reorder the arithmetic. Inlining keeps the buffers' reference counts out of the loop (~7x faster). They are
# set here because numba's cache key holds the kernels' code but not these options: changing this file is what
# invalidates the cache.
COMPILE_OPTIONS: dict[str, str] = {"inline": "always"}

# (value, seed_total) of one recursion; see `advance`.
Smoother = tuple[float, float]
# gain, loss (RSI), true range (ATR), slow, fast and signal EMA (MACD), short and long EMA.
Recursions = tuple[Smoother, Smoother, Smoother, Smoother, Smoother, Smoother, Smoother, Smoother]
# (next position in the block, centre, prefix sum, prefix sum of squares) of one rolling window; see `roll`.
Window = tuple[int, float, float, float]
# One window each for zscore, bb_position and volume_ratio (spec.window_periods order).
Windows = tuple[Window, Window, Window]


class Buffer(Protocol):
    """A fixed-length float buffer: a numpy array (compiled) or a list (interpreted)."""

    def __len__(self) -> int: ...
    def __getitem__(self, position: int) -> float: ...
    def __setitem__(self, position: int, value: float) -> None: ...


# block, suffix sums, suffix sums of squares of one window: each as long as its period.
WindowBuffers = tuple[Buffer, Buffer, Buffer]
AllWindowBuffers = tuple[WindowBuffers, WindowBuffers, WindowBuffers]

RECURSIONS_START: Recursions = ((0.0, 0.0),) * 8
WINDOW_START: Window = (0, 0.0, 0.0, 0.0)
WINDOWS_START: Windows = (WINDOW_START,) * 3

# Each feature's row in a block of FEATURE_NAMES order (numba needs them as integer constants).
_SLOTS = "close volume returns_1 rsi_14 macd macd_signal atr_14 bb_position ema_20 ema_50 zscore volume_ratio"
CLOSE, VOLUME, RETURNS_1, RSI, MACD, MACD_SIGNAL, ATR, BB_POSITION, EMA_SHORT, EMA_LONG, ZSCORE, VOLUME_RATIO = (
    FEATURE_NAMES.index(name) for name in _SLOTS.split()
)


def advance(smoother: Smoother, value: float, row: int, seed_row: int, seed_len: int, alpha: float) -> Smoother:
    """One row of y = y_prev + alpha * (x - y_prev) (TA-Lib's form), seeded at seed_row with the mean of the seed_len
    values ending there; rows before the seed window are ignored. Returns the new (state, seed_total)."""
    state, seed_total = smoother
    if row > seed_row:
        return state + alpha * (value - state), seed_total
    if row > seed_row - seed_len:
        seed_total += value
        if row == seed_row:
            return seed_total / seed_len, seed_total
    return state, seed_total


def advance_recursions(
    recursions: Recursions,
    periods: tuple[int, int, int, int, int, int, int],
    row: int,
    high: float,
    low: float,
    price: float,
    previous: float,
) -> Recursions:
    """The eight recursions after row `row` (from 0); `periods` is spec.recursion_periods(), `previous` the previous
    close (the row's own at row 0).

    Price changes and true ranges exist from row 1, so the Wilder averages are seeded at row `period`; both MACD EMAs
    start at the slow lookback (module docstring). Running all eight in one loop lets the CPU overlap their serial
    float latencies, which is what makes the batch ~9x faster than one scipy lfilter pass per indicator.
    """
    rsi_period, atr_period, fast, slow, signal, short, long = periods
    gain, loss, true_range, slow_ema, fast_ema, signal_ema, short_ema, long_ema = recursions
    change = price - previous
    up = max(change, 0.0)
    gain = advance(gain, up, row, rsi_period, rsi_period, 1.0 / rsi_period)
    loss = advance(loss, up - change, row, rsi_period, rsi_period, 1.0 / rsi_period)
    range_with_gap = max(high, previous) - min(low, previous)
    true_range = advance(true_range, range_with_gap, row, atr_period, atr_period, 1.0 / atr_period)
    slow_ema = advance(slow_ema, price, row, slow - 1, slow, 2.0 / (slow + 1))
    fast_ema = advance(fast_ema, price, row, slow - 1, fast, 2.0 / (fast + 1))
    line = fast_ema[0] - slow_ema[0]
    signal_ema = advance(signal_ema, line, row, slow - 1 + signal - 1, signal, 2.0 / (signal + 1))
    short_ema = advance(short_ema, price, row, short - 1, short, 2.0 / (short + 1))
    long_ema = advance(long_ema, price, row, long - 1, long, 2.0 / (long + 1))
    return gain, loss, true_range, slow_ema, fast_ema, signal_ema, short_ema, long_ema


def roll(window: Window, buffers: WindowBuffers, value: float) -> Window:
    """The window after its newest value, over the last len(block) values once that many were rolled in.

    Why centred: sums of x and x**2 lose (level/std)**2 of precision in E[x^2] - E[x]^2; centring on a value inside
    the window bounds the loss by (range/std)**2 <= ~4*period whatever the price level, and a flat window sums to
    exactly 0. The values are cut into blocks of `period` rows counted from the first one; a window starting in a
    block lies in it and the next block, and is centred on the block's last value. Its sums (`moments`) are the
    block's suffix sums from the window's start, computed once when the block completes, plus the running prefix
    sums of the next block: O(1) per value, amortised.
    """
    position, centre, total, squares = window
    block, suffix_sums, suffix_squares = buffers
    block[position] = value
    if position < len(block) - 1:
        deviation = value - centre
        return position + 1, centre, total + deviation, squares + deviation * deviation
    total = squares = 0.0
    for offset in range(position, -1, -1):
        deviation = block[offset] - value
        total += deviation
        squares += deviation * deviation
        suffix_sums[offset], suffix_squares[offset] = total, squares
    return 0, value, 0.0, 0.0


def moments(window: Window, buffers: WindowBuffers) -> tuple[float, float]:
    """Sums of (x - centre) and (x - centre)**2 over the window (`roll`)."""
    position, _, total, squares = window
    _, suffix_sums, suffix_squares = buffers
    return suffix_sums[position] + total, suffix_squares[position] + squares


def zscore(value: float, window: Window, buffers: WindowBuffers, flat_rtol: float) -> float:
    """(value - mean) / population std over the window; 0 if the std is at most flat_rtol of the mean."""
    period = len(buffers[0])
    centre = window[1]
    total, squares = moments(window, buffers)
    mean_from_centre = total / period
    std = math.sqrt(max(squares / period - mean_from_centre * mean_from_centre, 0.0))
    flat = std <= flat_rtol * (centre + mean_from_centre)
    return 0.0 if flat else (value - centre - mean_from_centre) / std


def mean_ratio(value: float, window: Window, buffers: WindowBuffers) -> float:
    """value / mean over the window; 1.0 if the window sums to 0 (no volume)."""
    total, _ = moments(window, buffers)
    mean = window[1] + total / len(buffers[0])
    return value / mean if mean > 0.0 else 1.0


def advance_row(
    recursions: Recursions,
    windows: Windows,
    buffers: AllWindowBuffers,
    periods: tuple[int, int, int, int, int, int, int],
    row: int,
    high: float,
    low: float,
    price: float,
    previous: float,
    volume: float,
) -> tuple[Recursions, Windows]:
    """Everything the features carry to the next candle, after candle `row` (from 0) of the history."""
    # Indexed, not unpacked: unpacking a tuple of tuples of arrays costs reference counts per row when compiled.
    zscore_window = roll(windows[0], buffers[0], price)
    band_window = roll(windows[1], buffers[1], price)
    volume_window = roll(windows[2], buffers[2], volume)
    recursions = advance_recursions(recursions, periods, row, high, low, price, previous)
    return recursions, (zscore_window, band_window, volume_window)


def write_row(
    recursions: Recursions,
    windows: Windows,
    buffers: AllWindowBuffers,
    price: float,
    previous: float,
    volume: float,
    n_std: float,
    flat_rtol: float,
    out: np.ndarray,
    column: int,
) -> None:
    """Writes the 12 features of the candle just advanced (`advance_row`) into out[:, column], FEATURE_NAMES order.

    Defined from row warmup_rows() on only: before, windows and seeds are incomplete. Flat markets give defined
    values: rsi 50 when the smoothed gain + loss is at most flat_rtol of the close (no movement, or earlier moves have
    decayed away), bb_position 0.5 and zscore 0 when the std is at most flat_rtol of the mean, volume_ratio 1.0
    without volume. gain / (gain + loss) is computed first, as TA-Lib does: it cannot round above 1.
    """
    gain, loss, true_range, slow_ema, fast_ema, signal_ema, short_ema, long_ema = recursions
    movement = gain[0] + loss[0]
    out[CLOSE, column] = price
    out[VOLUME, column] = volume
    out[RETURNS_1, column] = price / previous - 1.0
    out[RSI, column] = 100.0 * (gain[0] / movement if movement > flat_rtol * price else 0.5)
    out[MACD, column] = fast_ema[0] - slow_ema[0]
    out[MACD_SIGNAL, column] = signal_ema[0]
    out[ATR, column] = true_range[0]
    out[BB_POSITION, column] = zscore(price, windows[1], buffers[1], flat_rtol) / (2.0 * n_std) + 0.5
    out[EMA_SHORT, column] = short_ema[0]
    out[EMA_LONG, column] = long_ema[0]
    out[ZSCORE, column] = zscore(price, windows[0], buffers[0], flat_rtol)
    out[VOLUME_RATIO, column] = mean_ratio(volume, windows[2], buffers[2])


def window_buffers(period: int) -> WindowBuffers:
    """Fresh buffers of one window, for the compiled loop (FeatureState keeps lists)."""
    return np.empty(period), np.empty(period), np.empty(period)


def batch_features(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    volume: np.ndarray,
    periods: tuple[int, int, int, int, int, int, int],
    rolling_periods: tuple[int, int, int],
    n_std: float,
    flat_rtol: float,
    first_row: int,
    out: np.ndarray,
) -> None:
    """Writes the features of rows first_row.. (>= warmup_rows()) into out (FEATURE_NAMES x rows): the batch loop."""
    zscore_period, band_period, volume_period = rolling_periods
    buffers = (window_buffers(zscore_period), window_buffers(band_period), window_buffers(volume_period))
    recursions, windows = RECURSIONS_START, WINDOWS_START
    for row in range(len(close)):
        previous = close[row - 1] if row > 0 else close[row]
        recursions, windows = advance_row(
            recursions, windows, buffers, periods, row, high[row], low[row], close[row], previous, volume[row]
        )
        if row >= first_row:
            write_row(
                recursions, windows, buffers, close[row], previous, volume[row], n_std, flat_rtol, out, row - first_row
            )
