"""Walk-forward speed: one fit, N fits serial, on local joblib processes and on Dask, and the whole train stage.

    python bench/walkforward.py [--params params.yaml] [--csv CANDLES.csv] [--every 7D] [--steps N] [--workers N]

The candles are those params.yaml's data section gives (the synthetic default: two years of 1h candles), or a
CSV in the README's format with --csv (its whole span). The fits are the train stage's (training.plan_fits): every
walk-forward step, then the production fit. Each variant runs the same first N fits (all when --steps is not given)
and must return byte-identical predictions and model fingerprints, which is checked before a figure is printed.
Dask runs on the scheduler CRYPTOML_DASK_SCHEDULER names, else on a LocalCluster of --workers single-thread worker
processes on 127.0.0.1, started (not timed) and closed here. The overhead per fit of a parallel path is the
worker-time it spends beyond the fits themselves: (wall time x workers - serial time) / fits. Figures are
wall-clock seconds on this machine, measured in one run, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.candles.store import fetch_candles, read_csv_candles, validate_candles
from cryptoml.config import load_params
from cryptoml.features.manager import FeatureManager
from cryptoml.model.executor import SCHEDULER_ENV, ExecutorSettings, TaskRun, run_tasks
from cryptoml.model.labels import build_dataset
from cryptoml.model.training import FitData, FitResult, FitTask, duration_text, fit_and_predict, plan_fits, run_training
from cryptoml.pipeline import training_settings


def timed(data: FitData, tasks: Sequence[FitTask], executor: ExecutorSettings) -> tuple[float, TaskRun[FitResult]]:
    start = time.perf_counter()
    run = run_tasks(fit_and_predict, data, tasks, executor, description="benchmark fits")
    return time.perf_counter() - start, run


def warm_up(data: FitData, executor: ExecutorSettings) -> float:
    """Seconds for every worker to import the libraries and fit once on a few rows, so the timed run measures fits."""
    tiny = FitData(X=data.X[:400], y=data.y[:400], settings=data.settings)
    workers = executor.workers or 2
    seconds, _ = timed(tiny, [FitTask(f"warm-up {n}", 300, 300, 400) for n in range(2 * workers)], executor)
    return seconds


@contextmanager
def dask_scheduler(workers: int) -> Iterator[str]:
    """The scheduler CRYPTOML_DASK_SCHEDULER names, else a LocalCluster of single-thread workers on loopback."""
    if os.environ.get(SCHEDULER_ENV):
        yield os.environ[SCHEDULER_ENV]
        return
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster:
        yield cluster.scheduler_address


def same_results(expected: Sequence[FitResult], actual: Sequence[FitResult]) -> bool:
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
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="local processes and Dask workers")
    args = parser.parse_args()

    params = load_params(args.params)
    if args.csv:
        candles, _ = validate_candles(read_csv_candles(args.csv), params.data.timeframe, str(args.csv))
    else:
        candles, _ = fetch_candles(params.data)
    settings = training_settings(params)
    if args.every:
        settings = dataclasses.replace(settings, every=pd.Timedelta(args.every))
    features = FeatureManager().generate_features(candles)
    close = candles.set_index("timestamp")["close"]
    _, data, tasks = plan_fits(*build_dataset(features, close, settings.horizon, settings.threshold), settings)
    tasks = tasks[: args.steps] if args.steps else tasks
    workers = args.workers
    print(
        f"{len(data.y)} labelled rows, {len(tasks)} fits (retrain.every={duration_text(settings.every)}), "
        f"model.n_jobs={settings.fit.n_jobs}, {workers} workers, {os.cpu_count()} cores"
    )
    serial_seconds, serial = timed(data, tasks, ExecutorSettings(kind="local", workers=1))
    local = ExecutorSettings(kind="local", workers=workers)
    start_up = {"local joblib": warm_up(data, local)}
    runs = {f"local joblib x{workers}": timed(data, tasks, local)}
    with dask_scheduler(workers) as address:
        on_dask = ExecutorSettings(kind="dask", scheduler=address)
        start_up["Dask"] = warm_up(data, on_dask)
        runs[f"Dask ({address})"] = timed(data, tasks, on_dask)
    print("worker start-up (imports, first tiny fit per worker; not in the figures below): " + ", ".join(
        f"{name} {seconds:.1f} s" for name, seconds in start_up.items()
    ))
    for name, (_, run) in runs.items():
        if not same_results(serial.results, run.results):
            raise SystemExit(f"{name}: predictions or models differ from the serial run's")
    per_fit = serial_seconds / len(tasks)
    print(f"{'one fit (serial mean)':34s} {per_fit:8.2f} s")
    print(f"{f'{len(tasks)} fits serial':34s} {serial_seconds:8.1f} s")
    for name, (seconds, run) in runs.items():
        overhead = (seconds * workers - serial_seconds) / len(tasks)
        print(
            f"{f'{len(tasks)} fits, {name}':34s} {seconds:8.1f} s  ({serial_seconds / seconds:.2f}x faster; overhead "
            f"{overhead:+.2f} s per fit = {overhead / per_fit:+.0%} of a fit; {run.transfer.describe()})"
        )

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        result = run_training(features, close, settings, ExecutorSettings(kind="local", workers=workers))
        result.ensemble.save(Path(scratch) / "model", parity_rows=features)
        print(f"train stage (walk-forward + production fit + save), local x{workers}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
