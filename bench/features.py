"""Throughput of FeatureManager.generate_features beside TA-Lib computing the same indicators, in the same run.

Usage: python bench/features.py [--rows 1000000] [--repeats 5]

Both sides are timed alternately and the best of the repeats is kept, so a busy neighbour on a shared machine
hurts both alike; the figures are still indicative only. The timed calls are warm: the first call, which compiles
the numba kernels (or loads them from __pycache__), is made beforehand on a small frame and reported on its own.
Set NUMBA_CACHE_DIR to an empty directory to see the full compile time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import talib

from cryptoml.features.manager import COMPILED_KERNELS, FEATURE_PARAMS, FeatureManager


def random_candles(n_rows: int, seed: int = 0) -> pd.DataFrame:
    """Candle-contract frame: fat-tailed random walk around 5e6 (BTC/JPY-like level), one-minute bars."""
    rng = np.random.default_rng(seed)
    close = 5e6 * np.exp(np.cumsum(rng.standard_t(3, n_rows) * 1e-3))
    open_ = np.concatenate(([close[0]], close[:-1]))
    wick = np.abs(rng.normal(0.0, 5e-4, (2, n_rows)))
    return pd.DataFrame(
        {
            "timestamp": pd.date_range("2015-01-01", periods=n_rows, freq="min", tz="UTC"),
            "open": open_,
            "high": np.maximum(open_, close) * (1.0 + wick[0]),
            "low": np.minimum(open_, close) * (1.0 - wick[1]),
            "close": close,
            "volume": rng.lognormal(0.0, 1.0, n_rows),
        }
    )


def talib_indicators(candles: pd.DataFrame) -> Callable[[], None]:
    """The TA-Lib calls that produce the same indicators (inputs extracted once, outside the timing)."""
    close, high, low, volume = (candles[name].to_numpy() for name in ("close", "high", "low", "volume"))
    macd = FEATURE_PARAMS["macd"]
    bands = FEATURE_PARAMS["bb_position"]

    def run() -> None:
        talib.RSI(close, FEATURE_PARAMS["rsi_14"]["period"])
        talib.MACD(close, macd["fast"], macd["slow"], macd["signal"])
        talib.ATR(high, low, close, FEATURE_PARAMS["atr_14"]["period"])
        talib.BBANDS(close, bands["period"], bands["n_std"], bands["n_std"], 0)
        talib.EMA(close, FEATURE_PARAMS["ema_20"]["period"])
        talib.EMA(close, FEATURE_PARAMS["ema_50"]["period"])
        talib.SMA(close, FEATURE_PARAMS["zscore"]["period"])
        talib.STDDEV(close, FEATURE_PARAMS["zscore"]["period"], 1.0)
        talib.SMA(volume, FEATURE_PARAMS["volume_ratio"]["period"])

    return run


def first_call(manager: FeatureManager, candles: pd.DataFrame) -> str:
    """Time of the first generate_features call in this process, and whether its compiled loop (the kernels, inlined
    into kernels.batch_features) was compiled or loaded from numba's cache."""
    start = time.perf_counter()
    manager.generate_features(candles)
    elapsed = time.perf_counter() - start
    compiled = bool(COMPILED_KERNELS.batch_features.stats.cache_misses)
    return f"{elapsed:.2f} s (numba kernels {'compiled' if compiled else 'loaded from cache'})"


def best_seconds(timed: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each callable, taking turns so that load changes hit all of them."""
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(repeats):
        for name, call in timed.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    candles = random_candles(args.rows)
    manager = FeatureManager()
    print(f"cold first call: {first_call(manager, candles.iloc[: 2 * manager.warmup_rows])}")
    contenders = {
        "FeatureManager.generate_features": lambda: manager.generate_features(candles),
        "TA-Lib": talib_indicators(candles),
    }
    seconds = best_seconds(contenders, args.repeats)
    print(f"{args.rows:,} rows, best of {args.repeats} warm calls (indicative: shared machine)")
    for name, elapsed in seconds.items():
        print(f"  {name:<34} {elapsed * 1e3:8.1f} ms  {args.rows / elapsed:14,.0f} rows/s")
    ratio = seconds["FeatureManager.generate_features"] / seconds["TA-Lib"]
    print(f"  time ratio FeatureManager / TA-Lib: {ratio:.2f}x")


if __name__ == "__main__":
    main()
