"""Candle timeframes ("15m", "1h", "1d") as durations.

pandas is imported only by the functions that return pandas types, so that the bot's process (which must not
load pandas) can read a timeframe in milliseconds.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

_TIMEFRAME = re.compile(r"^([1-9][0-9]*)([mhd])$")
_UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}


def timeframe_ms(timeframe: str) -> int:
    """The candle duration of a ccxt-style timeframe in milliseconds.

    Only minutes, hours and days: weeks and months are not aligned to the epoch grid the same way on
    every exchange, so they are refused rather than silently misaligned.
    """
    match = _TIMEFRAME.match(str(timeframe))
    if match is None:
        raise ValueError(f"unknown timeframe {timeframe!r}: expected a number and m, h or d, e.g. '15m', '1h', '1d'")
    count, unit = match.groups()
    return int(count) * _UNIT_MS[unit]


def parse_timeframe(timeframe: str) -> pd.Timedelta:
    """The candle duration of a ccxt-style timeframe (timeframe_ms's rules) as a pandas Timedelta."""
    import pandas as pd

    return pd.Timedelta(timeframe_ms(timeframe), unit="ms")


def floor_to_grid(ts: pd.Timestamp, timeframe: str) -> pd.Timestamp:
    """The open time of the candle containing `ts` (candles are aligned to the Unix epoch)."""
    return ts.floor(parse_timeframe(timeframe))
