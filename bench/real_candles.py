"""The whole pipeline on a CSV of real candles, and the figures README.md and docs/evaluation.md quote.

    python bench/real_candles.py [--csv ../shared/data/BTC_USDT_1h_2017-08-17_2020-02-01.csv] [--start 2017-09-01]
                                 [--timeframe 1h] [--set key=value ...]

Runs fetch, features, train, evaluate and promote, as `dvc repro` would, in a temporary directory with this
checkout's params.yaml and `data.source: csv` on the given file (every other param as committed, unless --set
changes it), then prints the out-of-sample figures: the policy's scores beside the baselines', and the after-cost
backtest of the walk-forward rule, the naive signal, the frozen model's rule and buy-and-hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from cryptoml import paths
from cryptoml.config import load_params
from cryptoml.pipeline import run_evaluate, run_features, run_fetch, run_promote, run_train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "BTC_USDT_1h_2017-08-17_2020-02-01.csv"


def with_setting(params: dict, dotted: str, value: object) -> None:
    *parents, key = dotted.split(".")
    for part in parents:
        params = params[part]
    params[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--start", default="2017-09-01", help="data.start (UTC date); data.end is the file's last candle + 1 bar")
    parser.add_argument("--timeframe", default="1h")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another param, e.g. costs.fee=1.0e-3")
    args = parser.parse_args()

    candles = pd.read_csv(args.csv, usecols=["timestamp"])
    end = pd.Timestamp(candles["timestamp"].iloc[-1]) + pd.Timedelta(args.timeframe)
    params = yaml.safe_load((REPO / paths.PARAMS).read_text())
    settings = {
        "data.source": "csv",
        "data.timeframe": args.timeframe,
        "data.csv.path": str(args.csv.resolve()),
        "data.start": pd.Timestamp(args.start, tz="UTC").isoformat().replace("+00:00", "Z"),
        "data.end": end.isoformat().replace("+00:00", "Z"),
        **{key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)},
    }
    for key, value in settings.items():
        with_setting(params, key, value)
    with tempfile.TemporaryDirectory() as directory, contextlib.chdir(directory):
        Path(paths.PARAMS).write_text(yaml.safe_dump(params, sort_keys=False))
        loaded = load_params(Path(paths.PARAMS))
        start = time.perf_counter()
        run_fetch(loaded)
        run_features()
        run_train(loaded)
        run_evaluate(loaded)
        decision = run_promote(loaded)
        seconds = time.perf_counter() - start
        report = json.loads(paths.EVALUATION_REPORT.read_text())

    span, backtest = report["span"], report["backtest"]
    print(f"{args.csv.name}: evaluation span {span['start']} .. {span['end']}, {span['rows']} rows in {span['steps']} steps "
          f"({span['positive_rate']:.1%} up); cost {backtest['cost_per_side']:g} per side; pipeline {seconds:.0f} s")
    for name in ("policy", "frozen"):
        figures = report[name]
        print(f"  {name:<8} ROC AUC {figures['roc_auc']:.3f}, log loss / prior's {figures['log_loss_vs_prior']:.3f}, "
              f"Brier / prior's {figures['brier_vs_prior']:.3f}")
    best = max(report["baselines"].values(), key=lambda figures: figures["roc_auc"])
    print(f"  best naive baseline ROC AUC {best['roc_auc']:.3f}; policy beats frozen in {report['steps']['policy_beats_frozen']} "
          f"of {span['steps']} steps; per-step ROC AUC {report['steps']['policy_roc_auc']['min']:.2f} .. "
          f"{report['steps']['policy_roc_auc']['max']:.2f}")
    print("  after costs   | return   | annualised | Sharpe | max drawdown | trades | per week | exposure | fees paid")
    for name in ("rule", "naive", "frozen", "buy_and_hold"):
        f = backtest[name]
        print(f"  {name:<13} | {f['total_return']:+8.1%} | {f['annual_return']:+10.1%} | {f['sharpe']:6.2f} | {f['max_drawdown']:12.1%} "
              f"| {f['trades']:6d} | {f['trades_per_week']:8.1f} | {f['exposure']:8.1%} | {f['fees_paid']:9.1%}")
    rule = backtest["rule"]
    print(f"  rule: Sharpe 95% interval {rule['sharpe_ci_low']:.2f} .. {rule['sharpe_ci_high']:.2f}, probabilistic Sharpe ratio "
          f"{rule['psr']:.2f}; made money in {report['steps']['rule_positive_steps']} of {span['steps']} steps")
    verdict = "rejected" if not decision.promote else "promoted with the flat rule" if decision.flat_rule else "promoted"
    print(f"  gate: {verdict}")


if __name__ == "__main__":
    main()
