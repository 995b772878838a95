"""Per-candle features: FeatureState.update beside FeatureManager.generate_latest (today's bot path), in one run.

    python bench/state.py [--calls 2000] [--process-candles 200]

Candles: the pipeline's synthetic source (1h BTC/JPY-like, seed 7). On each of --calls consecutive candles after
LIVE_WINDOW of history, the paths are timed in turns on the same candle, so that a busy neighbour hurts them
alike: FeatureState.update on a state seeded with the LIVE_WINDOW candles before the first, and generate_latest on
the last LIVE_WINDOW candles given as a DataFrame (as bench/serve.py times it) and as ccxt's fetch_ohlcv rows (what a
bot has). Their rows are compared with the tolerance of tests/test_state.py.

Then fresh processes import only what one path needs, seed it with LIVE_WINDOW candles (or read them) and compute
--process-candles candles' features, beside one that imports numpy only (the floor). Peak RSS is read from VmHWM in
/proc/self/status: getrusage's ru_maxrss, in a child of this process, keeps this process's (larger) high-water mark
across exec. The machine may be shared: the load average is printed, and the figures are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.features.manager import CCXT_OHLCV_COLUMNS, FEATURE_NAMES, LIVE_WINDOW, FeatureManager
from cryptoml.features.state import FeatureState

HOUR_MS = 3_600_000
WARMUP_CALLS = 20
PRICE_VALUED = ("close", "macd", "macd_signal", "atr_14", "ema_20", "ema_50")  # as in tests/test_state.py

# Fresh processes: argv = a JSON file of ccxt rows, the timeframe in ms, LIVE_WINDOW. Each prints one JSON line.
_HEAD = """
import json, sys, time
start = time.perf_counter()
import numpy as np
"""
_TAIL = """
print(json.dumps({"wall_s": time.perf_counter() - start, "features": float(np.sum(row)),
                  "peak_rss_mb": next(int(line.split()[1]) for line in open("/proc/self/status")
                                      if line.startswith("VmHWM")) / 1024}))
"""
PROCESSES = {
    "numpy only (the floor)": _HEAD + "row = np.array(json.load(open(sys.argv[1]))[-1])" + _TAIL,
    "FeatureState (cryptoml.features.state)": _HEAD
    + """
from cryptoml.features.state import FeatureState
rows, window = json.load(open(sys.argv[1])), int(sys.argv[3])
state = FeatureState.seed(rows[:window], int(sys.argv[2]))
for candle in rows[window:]:
    row = state.update(candle)
"""
    + _TAIL,
    "FeatureManager.generate_latest (pandas, numba)": _HEAD
    + """
from cryptoml.features.manager import FeatureManager
rows, window, manager = json.load(open(sys.argv[1])), int(sys.argv[3]), FeatureManager()
for end in range(window + 1, len(rows) + 1):
    row = manager.generate_latest(rows[end - window : end]).to_numpy()[0]
"""
    + _TAIL,
}


def ccxt_rows(candles: pd.DataFrame) -> list[list[float]]:
    """The candles as ccxt's fetch_ohlcv gives them: [epoch ms (an int), open, high, low, close, volume]."""
    epoch_ms = ((candles["timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")).tolist()
    prices = candles[list(CCXT_OHLCV_COLUMNS[1:])].to_numpy().tolist()
    return [[timestamp, *values] for timestamp, values in zip(epoch_ms, prices, strict=True)]


def timed(call: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    row = call()
    return time.perf_counter() - start, row


def per_candle(candles: pd.DataFrame, calls: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Milliseconds per candle of each path, in turns, and the largest difference of the state's rows from
    generate_latest's, per feature, scaled as tests/test_state.py scales it."""
    rows, manager = ccxt_rows(candles), FeatureManager()
    first = len(candles) - calls
    state = FeatureState.seed(rows[:first], HOUR_MS)
    manager.generate_latest(candles.iloc[:LIVE_WINDOW])  # numba's compile or cache load, not timed
    paths: dict[str, Callable[[int], np.ndarray]] = {
        "FeatureState.update": lambda end: state.update(rows[end - 1]),
        "generate_latest (DataFrame)": lambda end: manager.generate_latest(candles.iloc[end - LIVE_WINDOW : end]).to_numpy()[0],
        "generate_latest (ccxt rows)": lambda end: manager.generate_latest(rows[end - LIVE_WINDOW : end]).to_numpy()[0],
    }
    seconds = {name: np.empty(calls) for name in paths}
    worst = dict.fromkeys(FEATURE_NAMES, 0.0)
    for call, end in enumerate(range(first + 1, len(candles) + 1)):
        results = {}
        for name, path in paths.items():
            seconds[name][call], results[name] = timed(lambda: path(end))
        close, volume = rows[end - 1][4], rows[end - 1][5]
        difference = np.abs(results["FeatureState.update"] - results["generate_latest (DataFrame)"])
        for feature, value in zip(FEATURE_NAMES, difference, strict=True):
            scale = close if feature in PRICE_VALUED else volume if feature == "volume" else 1.0
            worst[feature] = max(worst[feature], value / scale if value else 0.0)
    return {name: values[WARMUP_CALLS:] * 1e3 for name, values in seconds.items()}, worst


def fresh_processes(candles: pd.DataFrame, process_candles: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "candles.json"
        path.write_text(json.dumps(ccxt_rows(candles.iloc[-(LIVE_WINDOW + process_candles) :])))
        arguments = [str(path), str(HOUR_MS), str(LIVE_WINDOW)]
        results = {}
        for name, script in PROCESSES.items():
            output = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, check=True)
            results[name] = json.loads(output.stdout.splitlines()[-1])
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2_000, help="candles timed per path")
    parser.add_argument("--process-candles", type=int, default=200, help="candles computed by each fresh process")
    args = parser.parse_args()
    if args.calls <= WARMUP_CALLS:
        parser.error(f"--calls must be more than the {WARMUP_CALLS} warm-up calls")

    start = pd.Timestamp("2022-01-01", tz="UTC")
    candles = simulate_candles(start, start + pd.Timedelta(hours=LIVE_WINDOW + args.calls), "1h", seed=7)
    print(f"load average {os.getloadavg()[0]:.2f} (2 cores: figures are indicative on a busy machine)")
    latency, worst = per_candle(candles, args.calls)
    print(f"\nfeatures of one new closed candle, {args.calls - WARMUP_CALLS} candles, in turns (after {WARMUP_CALLS} warm-up)")
    for name, milliseconds in latency.items():
        p50, p99 = np.percentile(milliseconds, [50, 99])
        print(f"  {name:30s} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")
    state_p50, state_p99 = np.percentile(latency["FeatureState.update"], [50, 99])
    for name in list(latency)[1:]:
        p50, p99 = np.percentile(latency[name], [50, 99])
        print(f"  {name} / FeatureState.update: p50 {p50 / state_p50:.0f}x, p99 {p99 / state_p99:.0f}x")
    print("  largest difference of the state from generate_latest (scaled as in tests/test_state.py): "
          + ", ".join(f"{feature} {value:.1e}" for feature, value in worst.items() if value))

    print(f"\nfresh process: imports, {LIVE_WINDOW} candles of history, features of {args.process_candles} more")
    for name, figures in fresh_processes(candles, args.process_candles).items():
        print(f"  {name:48s} wall {figures['wall_s']:5.2f} s   peak RSS {figures['peak_rss_mb']:5.0f} MB")


if __name__ == "__main__":
    main()
