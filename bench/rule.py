"""The trading rule's walk-forward parameter search against one model fit, measured in the same run.

    python bench/rule.py [--params params.yaml] [--repeats 5]

Reads what `make repro` left in the workspace: the out-of-sample record stored with models/training, the candles and
the features. It times, each the median of --repeats runs:

* one fit: the last walk-forward step's fit (the largest training set of the replay), as the train stage runs it;
* the search of one step: every candidate of params.yaml's `trading:` grid simulated over the record's rows known
  before the last step starts (the largest search of the replay);
* the search of every step at once, as the train stage runs it (one pass, one checkpoint per step), and the
  production rule's search over the whole record.

The search must be a small fraction of a fit; the last line prints the ratios. Before it, since the search is cheap,
the walk-forward rule is replayed on the same record with and without minimum holding times (params' `trading.min_hold`
against [1]): its after-cost figures say whether a minimum hold pays.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import dataclasses

import numpy as np
import pandas as pd

from cryptoml import paths
from cryptoml.config import load_params
from cryptoml.model.backtest import next_bar_returns, path_figures, periods_per_year, uncertainty
from cryptoml.model.labels import build_dataset
from cryptoml.model.trading import choose_rules
from cryptoml.model.training import RuleSettings, fit_and_predict, plan_fits, walk_forward_rule
from cryptoml.pipeline import read_training_inputs, stored_record, training_settings


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=paths.PARAMS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = training_settings(params)
    record = stored_record(paths.TRAINING_DIR)
    if record is None:
        raise SystemExit(f"{paths.TRAINING_DIR} stores no out-of-sample record: run `make repro` first")
    features, close = read_training_inputs()
    X, y = build_dataset(features, close, cfg.horizon, cfg.threshold)
    steps, data, tasks = plan_fits(X, y, cfg)
    last_step = len(steps) - 1  # tasks: one per step, then production

    index = X.index[steps[0].start : steps[-1].stop]
    if not (len(index) == len(record) and (index == pd.DatetimeIndex(record["timestamp"])).all()):
        raise SystemExit(f"the record in {paths.TRAINING_DIR} is not of this params' steps: run `make repro` first")
    p_up = record["p_up"].to_numpy()
    returns = next_bar_returns(index, close)
    cost, grid = cfg.rules.costs.per_side, cfg.rules.grid
    first = steps[0].start
    scored = [step for step in steps if step.scored]
    known = [step.start - 1 - first for step in scored]
    every_row = [int(np.isfinite(returns).sum())]

    fit = median_seconds(lambda: fit_and_predict(data, tasks[last_step]), args.repeats)
    one_step = median_seconds(lambda: choose_rules(p_up, returns, cost, grid, known[-1:]), args.repeats)
    all_steps = median_seconds(lambda: choose_rules(p_up, returns, cost, grid, known), args.repeats)
    production = median_seconds(lambda: choose_rules(p_up, returns, cost, grid, every_row), args.repeats)

    bars_per_year = periods_per_year(pd.Timedelta(params.data.timeframe))
    rows = record["scored"].to_numpy() & np.isfinite(returns)
    for min_hold in sorted({(1,), grid.min_hold}):
        rules = RuleSettings(cfg.rules.costs, dataclasses.replace(grid, min_hold=min_hold))
        _, positions = walk_forward_rule(p_up, returns, scored, first, rules)
        path = path_figures(positions[rows], returns[rows], cost, bars_per_year)
        figures = {**path.figures, **uncertainty(path.net, bars_per_year)}
        print(
            f"walk-forward rule with min_hold {list(min_hold)}: {figures['total_return']:+.2%} after costs, Sharpe {figures['sharpe']:.2f} "
            f"(95% {figures['sharpe_ci_low']:.2f} .. {figures['sharpe_ci_high']:.2f}), PSR {figures['psr']:.2f}, {figures['trades']} trades"
        )

    candidates = len(grid.candidates()[0])
    print(f"record: {len(record)} rows, {len(scored)} scored steps; grid: {candidates} candidate rules; cost {cost:g} per side")
    print(f"one fit (walk-forward step {steps[last_step].number}, {tasks[last_step].train_stop} training rows): {fit * 1e3:.1f} ms")
    print(f"rule search of that step ({known[-1]} known rows): {one_step * 1e3:.2f} ms")
    print(f"rule search of all {len(scored)} steps in one pass: {all_steps * 1e3:.2f} ms; production rule (every row): {production * 1e3:.2f} ms")
    print(
        f"rule search per step / one fit: {one_step / fit:.4f}; all steps' searches / one fit: {all_steps / fit:.4f} "
        f"(the replay runs {len(tasks)} fits)"
    )


if __name__ == "__main__":
    main()
