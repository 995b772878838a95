"""What the RandomForest costs the bot: its share of the serving graph's memory, and a smaller forest's out-of-sample
skill, measured walk-forward.

    python bench/forest.py [--params params.yaml] [--forest TREES:DEPTH ...]

Data: the pipeline's inputs (data/features.parquet and data/raw/ohlcv.parquet: run `make repro` first). For
params.yaml's random_forest and each --forest variant (default 50:8 and 100:6, min_samples_leaf as in params), the
train stage's own run_training replays the retrain policy walk-forward (every step fitted only on rows before it)
and fits the production model; the pooled out-of-sample record is scored as `evaluate` scores it: ROC AUC and
log loss of P(up) on the scored rows, and the after-cost total return of the walk-forward trading rule's positions.
Then each production model's ONNX graph is exported, and a fresh process that loads it in onnxruntime and predicts
one row reports its peak RSS (VmHWM), beside the same graph with the forest replaced by a one-split stump: the
difference is what the forest costs. Both boosters are those of params.yaml in every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from cryptoml.config import load_params
from cryptoml.features.spec import FEATURE_NAMES
from cryptoml.model.backtest import net_returns, next_bar_returns
from cryptoml.model.evaluation import classification_metrics
from cryptoml.model.labels import build_dataset, make_labels
from cryptoml.model.onnx_export import export_onnx
from cryptoml.model.training import run_training
from cryptoml.pipeline import executor, read_training_inputs, training_settings

GRAPH_PROCESS = """
import json, sys
import numpy as np, onnxruntime
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 1
session = onnxruntime.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(["p_up"], {"features": np.zeros((1, 12))})
print(json.dumps({"peak_rss_mb": next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024}))
"""


def graph_rss_mb(graph: bytes, scratch: Path) -> float:
    path = scratch / f"graph-{time.monotonic_ns()}.onnx"
    path.write_bytes(graph)
    result = subprocess.run([sys.executable, "-c", GRAPH_PROCESS, str(path)], capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout)["peak_rss_mb"])


def forest_nodes(forest: RandomForestClassifier) -> int:
    return sum(tree.tree_.node_count for tree in forest.estimators_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--forest", action="append", metavar="TREES:DEPTH", help="a smaller forest to compare (repeatable)")
    args = parser.parse_args()
    params = load_params(args.params)
    features, close = read_training_inputs()
    base = params.model.random_forest
    variants = {f"params.yaml ({base.get('n_estimators')} trees, depth {base.get('max_depth')})": base}
    for spec in args.forest or ["50:8", "100:6"]:
        trees, depth = (int(part) for part in spec.split(":"))
        variants[f"{trees} trees, depth {depth}"] = {**base, "n_estimators": trees, "max_depth": depth}
    settings = training_settings(params)
    cost = settings.rules.costs.per_side
    labels = make_labels(close, params.label.horizon, params.label.threshold)
    print(f"{len(features)} feature rows; walk-forward steps of {params.retrain.every}; cost {cost:g} per side")
    print(f"{'forest':32s} {'nodes':>7s} {'graph MB':>9s} {'peak RSS':>9s} {'ROC AUC':>8s} {'log loss':>9s} {'rule return':>12s} {'fit s':>6s}")
    with tempfile.TemporaryDirectory() as scratch:
        stump_rss = None
        for name, forest_params in variants.items():
            hyperparameters = {**settings.fit.model_params, "random_forest": forest_params}
            cfg = dataclasses.replace(settings, fit=dataclasses.replace(settings.fit, model_params=hyperparameters))
            start = time.perf_counter()
            result = run_training(features, close, cfg, executor(params))
            seconds = time.perf_counter() - start
            scored = result.record[result.record["scored"]]
            timestamps = scored["timestamp"]
            y = labels.reindex(timestamps).to_numpy()
            metrics = classification_metrics(y, scored["p_up"].to_numpy(), 0.5)
            rule_return = float(np.prod(1.0 + net_returns(scored["position"].to_numpy(), next_bar_returns(timestamps, close), cost)[:-1]) - 1.0)
            model = result.ensemble
            parts = (model.lightgbm_booster_, model.xgboost_booster_)
            graph = export_onnx(*parts, model.random_forest_, model.weights_, list(FEATURE_NAMES))
            if stump_rss is None:
                X, y_train = build_dataset(features, close, params.label.horizon, params.label.threshold)
                stump = RandomForestClassifier(n_estimators=1, max_depth=1, random_state=0).fit(X, y_train)
                stump_graph = export_onnx(*parts, stump, model.weights_, list(FEATURE_NAMES))
                stump_rss = graph_rss_mb(stump_graph, Path(scratch))
                print(f"{'(a one-split stump: no forest)':32s} {forest_nodes(stump):7d} {len(stump_graph) / 1e6:9.2f} {stump_rss:6.0f} MB")
            rss = graph_rss_mb(graph, Path(scratch))
            print(
                f"{name:32s} {forest_nodes(model.random_forest_):7d} {len(graph) / 1e6:9.2f} {rss:6.0f} MB {metrics['roc_auc']:8.4f} "
                f"{metrics['log_loss']:9.4f} {rule_return:+12.2%} {seconds:6.0f}   (forest: +{rss - stump_rss:.0f} MB)"
            )


if __name__ == "__main__":
    main()
