"""Serving benchmark: the ONNX serving path beside the naive three-library path, in one run.

    python bench/serve.py [MODEL_DIR] [--calls 2000] [--batch-rows 100000]

Without MODEL_DIR a ProductionEnsemble with the default hyperparameters is trained on the pipeline's
synthetic candles (params.yaml defaults: two years of 1h BTC/JPY-like bars) and saved to a temporary
directory, so the script runs on a fresh clone. The naive path is how the original system served:
the three sklearn-API estimators' predict_proba one after another, RandomForest with n_jobs=-1,
fitted with the same hyperparameters on the same rows (bench/predict.py's naive_predictor).

Printed: single-row p50/p99 latency of both paths and their ratio (one-row DataFrames, the shape
FeatureManager.generate_latest gives a bot); batch throughput on out-of-sample feature rows; wall
time and peak RSS of fresh processes that import, load the model and predict one row (through the
light cryptoml.live.serving.ServingModel, through ProductionEnsemble, onnxruntime alone, and a bot's whole
step with FeatureManager on CSV candles); artifact sizes;
each target with its verdict. The machine may be shared: the load average is printed, and the
figures are indicative.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

# bench/predict.py, beside this script: the naive path and the latency loop are shared with it.
from predict import WARMUP_CALLS, latencies_ms, naive_predictor  # noqa: E402  (a script, not a package)

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.candles.timeframe import parse_timeframe
from cryptoml.config import Params, load_params
from cryptoml.features.manager import LIVE_WINDOW, FeatureManager
from cryptoml.model.artifacts import COMPONENT_SUFFIXES, MANIFEST_NAME, ONNX_GRAPH, read_artifacts
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.labels import build_dataset

TARGET_P50_MS = 0.3
TARGET_SPEEDUP = 100.0
TARGET_LOAD_SECONDS = 1.0
TARGET_PEAK_RSS_MB = 150.0
ROW_POOL = 100  # distinct rows cycled through, so no call repeats its predecessor's input
FEATURE_CALLS = 200
MB = 1e6

# Shared head of the fresh-process scripts. Peak RSS is read from VmHWM: getrusage's ru_maxrss keeps
# the high-water mark of the forked copy of this (large) benchmark process across exec.
_SCRIPT_HEAD = """
import json, sys, time
start = time.perf_counter()

def peak_rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

def report(imported, backend, p_up):
    print(json.dumps({"import_s": imported - start, "load_predict_s": time.perf_counter() - imported,
                      "backend": backend, "peak_rss_mb": peak_rss_mb(), "p_up": float(p_up)}))
"""
# A fresh interpreter: imports cryptoml, loads the model (hashes verified), predicts one row.
FRESH_PROCESS = _SCRIPT_HEAD + """
import numpy as np
from pathlib import Path
from cryptoml.model.ensemble import ProductionEnsemble
imported = time.perf_counter()
model = ProductionEnsemble.load(Path(sys.argv[1]))
report(imported, model.serving_backend, model.predict_proba(np.array([json.loads(sys.argv[2])]))[0, 1])
"""
# The light serving path: cryptoml.live.serving.ServingModel (no scikit-learn, pandas, LightGBM, XGBoost, numba).
SERVING_PROCESS = _SCRIPT_HEAD + """
import numpy as np
from pathlib import Path
from cryptoml.live.serving import ServingModel
imported = time.perf_counter()
model = ServingModel.load(Path(sys.argv[1]))
report(imported, "ServingModel", model.predict_proba(np.array([json.loads(sys.argv[2])]))[0, 1])
"""
# A bot's whole step: the light model plus FeatureManager on the last LIVE_WINDOW candles of a CSV (sys.argv[3]).
BOT_PROCESS = _SCRIPT_HEAD + """
from pathlib import Path
from cryptoml.candles.store import read_csv_candles, validate_candles
from cryptoml.features.manager import FeatureManager
from cryptoml.live.serving import ServingModel
imported = time.perf_counter()
model = ServingModel.load(Path(sys.argv[1]))
candles, _ = validate_candles(read_csv_candles(Path(sys.argv[3])), sys.argv[4], sys.argv[3])
report(imported, "ServingModel", model.predict_proba(FeatureManager().generate_latest(candles))[0, 1])
"""
# The floor: onnxruntime alone on the same (already verified, unpacked) graph, no cryptoml import.
GRAPH_ONLY_PROCESS = _SCRIPT_HEAD + """
import numpy as np, onnxruntime
imported = time.perf_counter()
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 1
session = onnxruntime.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
report(imported, "onnxruntime only", session.run(["p_up"], {"features": np.array([json.loads(sys.argv[2])])})[0][0])
"""


def synthetic_features(params: Params, seed: int, min_rows: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Candles of the params' window (extended until there are min_rows feature rows) and their features."""
    bar = parse_timeframe(params.data.timeframe)
    end = max(params.data.end, params.data.start + bar * (min_rows + FeatureManager().warmup_rows))
    candles = simulate_candles(params.data.start, end, params.data.timeframe, seed)
    return candles, FeatureManager().generate_features(candles)


def training_rows(params: Params, candles: pd.DataFrame, features: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The rows the train stage fits the production model on: every labelled row."""
    return build_dataset(features, candles.set_index("timestamp")["close"], params.label.horizon, params.label.threshold)


def throughput(predict_proba: Callable[[pd.DataFrame], np.ndarray], rows: pd.DataFrame) -> float:
    """Rows per second of one predict_proba call on all rows (after a small warm-up call)."""
    predict_proba(rows.iloc[:100])
    start = time.perf_counter()
    predict_proba(rows)
    return len(rows) / (time.perf_counter() - start)


def fresh_process(script: str, target: Path, row: list[float], *extra: Path | str) -> dict[str, float]:
    start = time.perf_counter()
    command = [sys.executable, "-c", script, str(target), json.dumps(row), *map(str, extra)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return {**json.loads(result.stdout.splitlines()[-1]), "wall_s": time.perf_counter() - start}


def artifact_sizes(model_dir: Path) -> list[tuple[str, int, int]]:
    """(file, stored bytes, bytes once decompressed) of the model's files."""
    sizes = []
    for name, data in sorted(read_artifacts(model_dir).files.items()):
        if name.endswith(".gz"):
            unpacked = len(gzip.decompress(data))
        elif name.endswith(".skops"):
            with zipfile.ZipFile(model_dir / name) as archive:
                unpacked = sum(entry.file_size for entry in archive.infolist())
        else:
            unpacked = len(data)
        sizes.append((name, len(data), unpacked))
    manifest = (model_dir / MANIFEST_NAME).stat().st_size
    return [*sizes, (MANIFEST_NAME, manifest, manifest)]


def verdict(passed: bool) -> str:
    return "meets" if passed else "MISSES"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, help="saved ProductionEnsemble (default: train one)")
    parser.add_argument("--calls", type=int, default=2_000, help="timed single-row calls per path")
    parser.add_argument("--batch-rows", type=int, default=100_000, help="rows of the batch throughput test")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params for the synthetic data")
    args = parser.parse_args()

    params = load_params(args.params)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (a shared machine slows every figure)")
    candles, features = synthetic_features(params, params.data.synthetic.seed)
    X, y = training_rows(params, candles, features)
    _, batch = synthetic_features(params, params.data.synthetic.seed + 1, min_rows=args.batch_rows)
    batch = batch.iloc[: args.batch_rows]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(scratch) / "model"
            start = time.perf_counter()
            ProductionEnsemble(n_jobs=params.model.n_jobs).fit(X, y).save(model_dir, parity_rows=features)
            print(f"trained a default ProductionEnsemble on {len(X)} synthetic rows and saved it in {time.perf_counter() - start:.1f} s")
        served = ProductionEnsemble.load(model_dir)
        info = served.get_model_info()
        naive = naive_predictor(info["hyperparameters"], info["weights"], X, y)
        print(f"model {info['model_sha256']} (backend {info['backend']})")

        rows = [features.iloc[[i]] for i in range(-ROW_POOL, 0)]
        print(f"\nsingle row: {args.calls} predict_proba calls per path on one-row DataFrames, after {WARMUP_CALLS} warm-up calls")
        latency = {"serving (ONNX graph)": latencies_ms(served.predict_proba, rows, args.calls),
                   "naive (3 sklearn-API calls, RF n_jobs=-1)": latencies_ms(naive, rows, args.calls)}
        for name, timings in latency.items():
            print(f"  {name:44s} p50 {np.percentile(timings, 50):8.3f} ms   p99 {np.percentile(timings, 99):8.3f} ms")
        serving_p50, naive_p50 = (np.percentile(timings, 50) for timings in latency.values())
        serving_p99, naive_p99 = (np.percentile(timings, 99) for timings in latency.values())
        print(f"  naive / serving: p50 {naive_p50 / serving_p50:.0f}x, p99 {naive_p99 / serving_p99:.0f}x")
        history = candles.tail(LIVE_WINDOW)
        feature_ms = latencies_ms(lambda frame: FeatureManager().generate_latest(frame), [history], FEATURE_CALLS)
        feature_p50 = np.percentile(feature_ms, 50)
        print(f"  for scale, the bot's features per candle (generate_latest on {LIVE_WINDOW} candles): p50 {feature_p50:.3f} ms")

        print(f"\nbatch: one predict_proba call on {len(batch)} out-of-sample rows")
        serving_rate, naive_rate = throughput(served.predict_proba, batch), throughput(naive, batch)
        print(f"  serving (ONNX graph, 1 thread)  {serving_rate:12,.0f} rows/s")
        print(f"  naive (RF n_jobs=-1)            {naive_rate:12,.0f} rows/s")

        row = features.iloc[-1].tolist()
        graph_path = Path(scratch) / "graph.onnx"
        stored = read_artifacts(model_dir).files
        graph = next(data for name, data in stored.items() if name.endswith(COMPONENT_SUFFIXES[ONNX_GRAPH]))
        graph_path.write_bytes(gzip.decompress(graph))
        recent_csv = Path(scratch) / "recent.csv"
        history.to_csv(recent_csv, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
        print("\nfresh process: import, load, predict one row")
        processes = {"ServingModel.load (cryptoml.live.serving)": fresh_process(SERVING_PROCESS, model_dir, row),
                     "ProductionEnsemble.load (cryptoml)": fresh_process(FRESH_PROCESS, model_dir, row),
                     "onnxruntime alone on the graph (floor)": fresh_process(GRAPH_ONLY_PROCESS, graph_path, row)}
        bot = fresh_process(BOT_PROCESS, model_dir, row, recent_csv, params.data.timeframe)
        for name, figures in {**processes, f"a bot: ServingModel + features of {LIVE_WINDOW} CSV candles": bot}.items():
            print(
                f"  {name:40s} wall {figures['wall_s']:5.2f} s (imports {figures['import_s']:4.2f} s, "
                f"load + first prediction {figures['load_predict_s']:4.2f} s), peak RSS {figures['peak_rss_mb']:4.0f} MB"
            )

        print("\nartifacts (stored, and once decompressed)")
        sizes = artifact_sizes(model_dir)
        for name, stored, unpacked in sizes:
            print(f"  {name:45s} {stored / MB:6.2f} MB   {unpacked / MB:6.2f} MB")
        total = sum(stored for _, stored, _ in sizes)
        print(f"  {'total':45s} {total / MB:6.2f} MB   {sum(unpacked for *_, unpacked in sizes) / MB:6.2f} MB")

    print("\ntargets")
    print(f"  single-row p50 <= {TARGET_P50_MS} ms: {serving_p50:.3f} ms, {verdict(serving_p50 <= TARGET_P50_MS)}")
    speedup = naive_p50 / serving_p50
    print(f"  >= {TARGET_SPEEDUP:.0f}x faster than naive (p50): {speedup:.0f}x, {verdict(speedup >= TARGET_SPEEDUP)}")
    for name, figures in list(processes.items())[:2]:
        load_s, rss = figures["load_predict_s"], figures["peak_rss_mb"]
        print(f"  {name}: load + first prediction < {TARGET_LOAD_SECONDS} s: {load_s:.2f} s, {verdict(load_s < TARGET_LOAD_SECONDS)}; "
              f"peak RSS < {TARGET_PEAK_RSS_MB:.0f} MB: {rss:.0f} MB, {verdict(rss < TARGET_PEAK_RSS_MB)}")
    print(f"  production directory <= 10 MB: {total / MB:.2f} MB, {verdict(total <= 10 * MB)}")
    same_prediction = ", ".join(f"{figures['p_up']:.6f}" for figures in processes.values())
    print(f"  (the fresh processes predicted P(up) {same_prediction})")


if __name__ == "__main__":
    main()
