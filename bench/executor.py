"""Independent seeded ensemble fits through cryptoml.executor: wall time and bytes moved per executor.

    python bench/executor.py [--fits N] [--rows N] [--workers N]

Each fit is one task on the same shared data (seeded random features, --rows rows): in-process, on a
local joblib pool of --workers processes, and on Dask: the scheduler CRYPTOML_DASK_SCHEDULER names,
else a LocalCluster of --workers single-thread processes on 127.0.0.1 started and closed here. Prints,
per executor, the wall time (worker start-up included) and what was sent: the shared data's size
and copies against the bytes per task; and checks that every executor returned the same model hashes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from distributed import LocalCluster

from cryptoml.ensemble import ProductionEnsemble
from cryptoml.executor import SCHEDULER_ENV, ExecutorSettings, TaskRun, run_tasks
from cryptoml.feature_spec import FEATURE_NAMES

SMALL_MODEL = {name: {"n_estimators": 20, "max_depth": 4} for name in ("lightgbm", "xgboost", "random_forest")}


def fit_on_shared_rows(shared: dict[str, np.ndarray], seed: int) -> str:
    """One walk-forward-like step: a seeded single-thread fit on the shared rows; its model hash."""
    frame = pd.DataFrame(shared["features"], columns=list(FEATURE_NAMES))
    model = ProductionEnsemble(model_params=SMALL_MODEL, random_state=seed, n_jobs=1).fit(frame, shared["labels"])
    with tempfile.TemporaryDirectory() as directory:
        return model.save(Path(directory))


def timed(settings: ExecutorSettings, shared: dict[str, np.ndarray], seeds: list[int]) -> tuple[TaskRun[str], float]:
    started = time.perf_counter()
    run = run_tasks(fit_on_shared_rows, shared, seeds, settings, description="fits")
    return run, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=8)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    features = rng.normal(size=(args.rows, len(FEATURE_NAMES)))
    shared = {"features": features, "labels": (features[:, 0] + rng.normal(size=args.rows) > 0).astype(np.int64)}
    seeds = list(range(args.fits))
    runs = {
        "in-process": timed(ExecutorSettings(kind="local", workers=1), shared, seeds),
        "local pool": timed(ExecutorSettings(kind="local", workers=args.workers), shared, seeds),
    }
    scheduler = os.environ.get(SCHEDULER_ENV)
    if scheduler:
        runs["dask"] = timed(ExecutorSettings(kind="dask", scheduler=scheduler), shared, seeds)
    else:
        with LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster:
            runs["dask"] = timed(ExecutorSettings(kind="dask", scheduler=cluster.scheduler_address), shared, seeds)
    for name, (run, seconds) in runs.items():
        print(f"{name:>10}: {seconds:6.1f} s  {run.transfer.describe()}")
    hashes = {name: run.results for name, (run, _) in runs.items()}
    same = all(results == hashes["in-process"] for results in hashes.values())
    print(f"model hashes identical across executors: {same}")
    if not same:
        raise SystemExit(f"executors disagree: {hashes}")


if __name__ == "__main__":
    main()
