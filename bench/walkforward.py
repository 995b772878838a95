"""Walk-forward speed: one step's fit, N steps serial against N steps in parallel, and the whole train stage.

    python bench/walkforward.py [--params params.yaml] [--csv CANDLES.csv] [--every 7D] [--steps N]

The candles are those params.yaml's data section gives (the synthetic default: two years of 1h candles), or a
CSV in the README's format with --csv (its whole span). The fits are the train stage's (training.plan_fits): every
walk-forward step, then the production fit. Each variant runs the same first N fits (all when --steps is not given)
and must return byte-identical predictions and model fingerprints, which is checked before a figure is printed.
Figures are wall-clock seconds on this machine, measured in one run, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.config import load_params
from cryptoml.data import fetch_candles, read_csv_candles
from cryptoml.executor import ExecutorSettings, map_tasks
from cryptoml.features import FeatureManager
from cryptoml.labels import build_dataset
from cryptoml.pipeline import training_settings
from cryptoml.training import FitData, FitResult, FitTask, fit_and_predict, plan_fits, run_training


def timed(data: FitData, tasks: Sequence[FitTask], executor: ExecutorSettings) -> tuple[float, list[FitResult]]:
    start = time.perf_counter()
    results = map_tasks(fit_and_predict, data, tasks, executor, description="benchmark fits")
    return time.perf_counter() - start, results


def same_results(expected: list[FitResult], actual: list[FitResult]) -> bool:
    return all(
        a.fingerprint == b.fingerprint and all(np.array_equal(a.proba[name], b.proba[name]) for name in a.proba)
        for a, b in zip(expected, actual, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--csv", type=Path, help="candles to use instead of params.yaml's data source")
    parser.add_argument("--every", help="retrain.every for this run (default: params.yaml's)")
    parser.add_argument("--steps", type=int, help="time only the first N fit tasks")
    args = parser.parse_args()

    params = load_params(args.params)
    candles = read_csv_candles(args.csv) if args.csv else fetch_candles(params.data)[0]
    settings = training_settings(params)
    if args.every:
        settings = dataclasses.replace(settings, every=pd.Timedelta(args.every))
    features = FeatureManager().generate_features(candles)
    close = candles.set_index("timestamp")["close"]
    _, data, tasks = plan_fits(*build_dataset(features, close, settings.horizon, settings.threshold), settings)
    tasks = tasks[: args.steps] if args.steps else tasks
    cores = os.cpu_count() or 1
    print(
        f"{len(data.y)} labelled rows, {len(tasks)} fits (retrain.every={settings.every}), "
        f"model.n_jobs={settings.fit.n_jobs}, {cores} cores"
    )

    serial_seconds, serial = timed(data, tasks, ExecutorSettings(kind="local", workers=1))
    parallel_seconds, parallel = timed(data, tasks, ExecutorSettings(kind="local", workers=cores))
    if not same_results(serial, parallel):
        raise SystemExit("the parallel run's predictions or models differ from the serial run's")
    per_fit = serial_seconds / len(tasks)
    print(f"one fit (serial mean)                  {per_fit:8.2f} s")
    print(f"{len(tasks)} fits serial                         {serial_seconds:8.1f} s")
    print(f"{len(tasks)} fits, local joblib x{cores}              {parallel_seconds:8.1f} s  ({serial_seconds / parallel_seconds:.2f}x faster)")

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        result = run_training(features, close, settings, ExecutorSettings(kind="local", workers=cores))
        result.ensemble.save(Path(scratch) / "model", parity_rows=features)
        print(f"train stage (walk-forward + production fit + save), local x{cores}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
