"""FeatureManager: the 12 features, built by the same code for training and for live prediction.

The indicators are defined once, in cryptoml.features.kernels (TA-Lib's definitions, listed there); this module
compiles those kernels with numba and runs them over every row, after checking the candles at its pandas edge.
cryptoml.features.state runs the same kernels one candle at a time, without numba or pandas.

Rows are dropped until every indicator is defined (``FeatureManager.warmup_rows``, 49 with the default parameters):
no value is ever filled in. Each row uses only candles at or before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import FunctionType, ModuleType, SimpleNamespace

import numba
import numpy as np
import pandas as pd

from cryptoml.features import kernels
from cryptoml.features.kernels import FLAT_RTOL, LIVE_WINDOW, MAX_INPUT
from cryptoml.features.spec import (
    FEATURE_NAMES,
    FEATURE_PARAMS,  # noqa: F401  (not used here; importable from this module, as it was, with LIVE_WINDOW)
    FEATURE_VERSION,
    band_n_std,
    feature_spec,
    feature_spec_hash,
    recursion_periods,
    warmup_rows,
    window_periods,
)

PRICE_COLUMNS: tuple[str, ...] = ("high", "low", "close")
REQUIRED_COLUMNS: tuple[str, ...] = ("timestamp", *PRICE_COLUMNS, "volume")
# The row layout of ccxt's fetch_ohlcv: [epoch milliseconds, open, high, low, close, volume].
CCXT_OHLCV_COLUMNS: tuple[str, ...] = ("timestamp", "open", "high", "low", "close", "volume")
# An ISO 8601 time with an explicit UTC offset ("...Z", "...+00:00", "...+0900"): the instant is unambiguous.
_EXPLICIT_OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"


def compile_module(module: ModuleType) -> SimpleNamespace:
    """Every function of `module`, compiled by numba (cached on disk, with the module's COMPILE_OPTIONS), calling
    one another compiled.

    Numba resolves the functions a kernel calls from its globals when it compiles it, and compiled code cannot call
    a plain Python function: each kernel is therefore re-created over one namespace in which its fellow kernels are
    their compiled versions. The module itself stays plain Python, as FeatureState runs it.
    """
    namespace = dict(vars(module))
    for name, value in vars(module).items():
        if isinstance(value, FunctionType) and value.__module__ == module.__name__:
            kernel = FunctionType(value.__code__, namespace, name, value.__defaults__, value.__closure__)
            kernel.__qualname__, kernel.__doc__ = value.__qualname__, value.__doc__
            namespace[name] = numba.njit(cache=True, **module.COMPILE_OPTIONS)(kernel)
    return SimpleNamespace(**namespace)


COMPILED_KERNELS = compile_module(kernels)


def _utc_timestamps(timestamps: pd.Series) -> pd.Series:
    """Timestamps as a bot has them, as tz-aware UTC: datetimes with a time zone, ccxt's integer epoch
    milliseconds, or ISO 8601 strings with an explicit offset (parsed ones in nanoseconds, like the pipeline's
    candles). Naive times are refused: their instant is a guess."""
    if isinstance(timestamps.dtype, pd.DatetimeTZDtype):
        return timestamps
    if pd.api.types.is_integer_dtype(timestamps.dtype):
        return pd.to_datetime(timestamps, unit="ms", utc=True).dt.as_unit("ns")
    is_text = pd.api.types.is_string_dtype(timestamps.dtype) or pd.api.types.is_object_dtype(timestamps.dtype)
    if is_text and timestamps.map(lambda value: isinstance(value, str)).all():
        naive = ~timestamps.str.contains(_EXPLICIT_OFFSET, regex=True)
        if not naive.any():
            return pd.to_datetime(timestamps, utc=True, format="ISO8601").dt.as_unit("ns")
        row = int(np.argmax(naive.to_numpy()))
        raise ValueError(
            f"timestamp must be tz-aware UTC datetimes, got dtype {timestamps.dtype}: row {row} ({timestamps.iloc[row]!r}) "
            "has no UTC offset (write it as '2024-01-01T00:00:00Z' or '+00:00'), or give ccxt's epoch milliseconds"
        )
    raise ValueError(
        f"timestamp must be tz-aware UTC datetimes, got dtype {timestamps.dtype} "
        "(also accepted: ccxt's integer epoch milliseconds, ISO 8601 strings with an explicit offset)"
    )


def candle_frame(candles: pd.DataFrame | Sequence[Sequence[float]]) -> pd.DataFrame:
    """A frame of candles from ccxt's fetch_ohlcv rows ([ms, open, high, low, close, volume], oldest first);
    a frame is returned as it is."""
    if isinstance(candles, pd.DataFrame):
        return candles
    return pd.DataFrame(list(candles), columns=list(CCXT_OHLCV_COLUMNS))


def _columns(ohlcv: pd.DataFrame) -> tuple[pd.DatetimeIndex, dict[str, np.ndarray]]:
    """The timestamps and float64 input columns, checked: the I/O edge of this module."""
    has_time_index = isinstance(ohlcv.index, pd.DatetimeIndex) and ohlcv.index.name == "timestamp"
    present = set(ohlcv.columns) | ({"timestamp"} if has_time_index else set())
    missing = [name for name in REQUIRED_COLUMNS if name not in present]
    if missing:
        raise ValueError(
            f"candles are missing column(s) {missing}; need {list(REQUIRED_COLUMNS)} "
            "(timestamp as a column or as a DatetimeIndex named 'timestamp')"
        )
    timestamps = _utc_timestamps(ohlcv["timestamp"] if "timestamp" in ohlcv.columns else ohlcv.index.to_series())
    index = pd.DatetimeIndex(timestamps, name="timestamp").tz_convert("UTC")
    nanoseconds = index.asi8
    not_after_previous = nanoseconds[1:] <= nanoseconds[:-1]
    if not_after_previous.any():
        row = int(np.argmax(not_after_previous)) + 1
        raise ValueError(f"timestamp must be strictly increasing; row {row} ({index[row]}) is not after row {row - 1}")
    columns = {name: ohlcv[name].to_numpy(dtype=np.float64) for name in (*PRICE_COLUMNS, "volume")}
    for name, values in columns.items():
        lowest_allowed, expected = (np.nextafter(0.0, 1.0), "> 0") if name in PRICE_COLUMNS else (0.0, ">= 0")
        # min/max cover NaN and +-inf without building masks; the mask is built only to name the bad row.
        if not (values.min() >= lowest_allowed and values.max() <= MAX_INPUT):
            row = int(np.argmin((values >= lowest_allowed) & (values <= MAX_INPUT)))
            raise ValueError(f"column {name!r} must be finite, {expected} and at most {MAX_INPUT:g}; row {row} is {values[row]}")
    return index, columns


class FeatureManager:
    """Builds the feature matrix from candles, identically for training (batch) and live prediction.

    Flat markets give defined values, never inf or NaN: rsi_14 = 50 when the smoothed gain + loss is at most
    FLAT_RTOL of the close (no movement, or earlier moves have decayed away); bb_position = 0.5 and zscore = 0 when
    the 20-bar std is at most FLAT_RTOL of the 20-bar mean; volume_ratio = 1.0 when the 20-bar volume is 0.
    Candles must satisfy the candle contract (in particular high >= low).
    """

    version: str = FEATURE_VERSION

    def get_feature_names(self) -> list[str]:
        return list(FEATURE_NAMES)

    def spec(self) -> dict[str, object]:
        return feature_spec()

    def spec_hash(self) -> str:
        return feature_spec_hash()

    @property
    def warmup_rows(self) -> int:
        """Rows dropped at the start: the first output row is input row `warmup_rows`."""
        return warmup_rows()

    def generate_features(self, ohlcv: pd.DataFrame | Sequence[Sequence[float]]) -> pd.DataFrame:
        """The FEATURE_NAMES columns (float64) for input rows warmup_rows.., indexed by UTC timestamp.

        Accepts the candle frame (timestamp column) or a frame indexed by a DatetimeIndex named timestamp; its
        timestamps may also be ccxt's epoch milliseconds or ISO strings with an explicit UTC offset. ccxt's
        fetch_ohlcv rows are accepted as they are. Raises ValueError naming missing columns, invalid values,
        naive times, or too few rows.
        """
        index, columns = _columns(candle_frame(ohlcv))
        warmup = self.warmup_rows
        if len(index) <= warmup:
            raise ValueError(f"need at least {warmup + 1} candles to get one feature row; got {len(index)}")
        # One (feature, row) block that the kernels write into: the frame takes it without a copy, and one large
        # allocation costs far fewer page faults than twelve.
        block = np.empty((len(FEATURE_NAMES), len(index) - warmup))
        COMPILED_KERNELS.batch_features(
            columns["high"],
            columns["low"],
            columns["close"],
            columns["volume"],
            recursion_periods(),
            window_periods(),
            band_n_std(),
            FLAT_RTOL,
            warmup,
            block,
        )
        return pd.DataFrame(block.T, index=index[warmup:], columns=list(FEATURE_NAMES), copy=False)

    def generate_latest(self, ohlcv: pd.DataFrame | Sequence[Sequence[float]], n_rows: int = 1) -> pd.DataFrame:
        """Features of the last n_rows candles, from only the last LIVE_WINDOW + n_rows - 1 of them.

        Equal to generate_features on the full history for those rows (to ~1e-9 relative; see LIVE_WINDOW). Pass
        closed candles only. Refuses shorter input rather than return values that depend on the window's start.
        """
        if n_rows < 1:
            raise ValueError(f"n_rows must be >= 1, got {n_rows}")
        needed = LIVE_WINDOW + n_rows - 1
        if len(ohlcv) < needed:
            raise ValueError(
                f"generate_latest needs the last {needed} candles (LIVE_WINDOW={LIVE_WINDOW} + n_rows={n_rows} - 1) "
                f"to match batch features; got {len(ohlcv)}"
            )
        return self.generate_features(candle_frame(ohlcv).iloc[-needed:]).iloc[-n_rows:]
