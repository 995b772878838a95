"""Candle timeframes ("15m", "1h", "1d") as durations."""

from __future__ import annotations

import re

import pandas as pd

_TIMEFRAME = re.compile(r"^([1-9][0-9]*)([mhd])$")
_UNITS = {"m": "min", "h": "h", "d": "D"}


def parse_timeframe(timeframe: str) -> pd.Timedelta:
    """Return the candle duration of a ccxt-style timeframe.

    Only minutes, hours and days: weeks and months are not aligned to the epoch grid the same way on
    every exchange, so they are refused rather than silently misaligned.
    """
    match = _TIMEFRAME.match(str(timeframe))
    if match is None:
        raise ValueError(f"unknown timeframe {timeframe!r}: expected a number and m, h or d, e.g. '15m', '1h', '1d'")
    count, unit = match.groups()
    return pd.Timedelta(int(count), unit=_UNITS[unit])


def floor_to_grid(ts: pd.Timestamp, timeframe: str) -> pd.Timestamp:
    """The open time of the candle containing `ts` (candles are aligned to the Unix epoch)."""
    return ts.floor(parse_timeframe(timeframe))
