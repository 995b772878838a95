"""Single-row predict_proba latency: ProductionEnsemble against the original system's naive path.

    python bench/predict.py [MODEL_DIR] [--calls N]

The ensemble is loaded with its native backend (bench/serve.py measures the ONNX serving path) from
MODEL_DIR (or trained with the default hyperparameters on seeded random
data and saved to a temporary directory) and predicts with n_jobs=1. The naive path is how the
original worked: the three sklearn-API estimators' predict_proba one after another, RandomForest
with n_jobs=-1, fitted with the same hyperparameters on the seeded random data. Both get the same
one-row DataFrames, the shape of a live prediction. The train stage is timed as `cryptoml train` runs it
(CV, threshold choice, final fit, save) on the candles params.yaml's data section gives (the synthetic
default: two years of 1h candles). Figures are indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import pandas as pd
import xgboost
from sklearn.ensemble import RandomForestClassifier

from cryptoml.features.manager import FEATURE_NAMES
from cryptoml.model.ensemble import ProductionEnsemble

TRAIN_ROWS = 5_000
ROW_POOL = 100  # distinct rows cycled through, so no call repeats its predecessor's input
WARMUP_CALLS = 20
SEED = 7


def random_training_data(n_rows: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    """Seeded features with some signal, so trees grow to a realistic size."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n_rows, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
    y = ((X["close"] - 0.5 * X["rsi_14"] + rng.normal(size=n_rows)) > 0).astype(np.int64)
    return X, y


def naive_predictor(
    hyperparameters: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float], X: pd.DataFrame, y: pd.Series
) -> Callable[[pd.DataFrame], np.ndarray]:
    """The original: three sklearn-API models, each called in turn, RandomForest on all cores."""
    models = {
        "lightgbm": lightgbm.LGBMClassifier(**hyperparameters["lightgbm"]).fit(X, y),
        "xgboost": xgboost.XGBClassifier(**hyperparameters["xgboost"]).fit(X, y),
        "random_forest": RandomForestClassifier(**{**hyperparameters["random_forest"], "n_jobs": -1}).fit(X, y),
    }

    def predict_proba(row: pd.DataFrame) -> np.ndarray:
        return sum(weights[name] * model.predict_proba(row) for name, model in models.items())

    return predict_proba


def latencies_ms(predict_proba: Callable[[pd.DataFrame], np.ndarray], rows: list[pd.DataFrame], calls: int) -> np.ndarray:
    for row in rows[:WARMUP_CALLS]:
        predict_proba(row)
    timings = np.empty(calls)
    for call in range(calls):
        row = rows[call % len(rows)]
        start = time.perf_counter()
        predict_proba(row)
        timings[call] = time.perf_counter() - start
    return timings * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, help="saved ProductionEnsemble (default: train one)")
    parser.add_argument("--calls", type=int, default=2_000, help="timed single-row calls per implementation")
    args = parser.parse_args()

    X, y = random_training_data(TRAIN_ROWS, SEED)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(scratch) / "model"
            start = time.perf_counter()
            ProductionEnsemble(n_jobs=1, random_state=SEED).fit(X, y).save(model_dir)
            print(f"trained and saved a default ProductionEnsemble on {TRAIN_ROWS} random rows in {time.perf_counter() - start:.1f} s")
        ensemble = ProductionEnsemble.load(model_dir, backend="native").set_params(n_jobs=1)
    info = ensemble.get_model_info()
    naive = naive_predictor(info["hyperparameters"], info["weights"], X, y)
    rows = [X.iloc[[i]] for i in range(ROW_POOL)]

    print(f"model {info['model_sha256']}; {args.calls} single-row predict_proba calls each after {WARMUP_CALLS} warm-up calls")
    results = {
        "ProductionEnsemble (native backend, n_jobs=1)": latencies_ms(ensemble.predict_proba, rows, args.calls),
        "naive sklearn-API, RandomForest n_jobs=-1": latencies_ms(naive, rows, args.calls),
    }
    print(f"{'implementation':45s} {'p50 ms':>9s} {'p99 ms':>9s} {'mean ms':>9s}")
    for name, timings in results.items():
        print(f"{name:45s} {np.percentile(timings, 50):9.3f} {np.percentile(timings, 99):9.3f} {timings.mean():9.3f}")
    ours, original = results.values()
    for label, percentile in (("p50", 50), ("p99", 99)):
        print(f"naive / ProductionEnsemble {label}: {np.percentile(original, percentile) / np.percentile(ours, percentile):.1f}x")


if __name__ == "__main__":
    main()
