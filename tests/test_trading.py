"""The trading rule (cryptoml.model.rule) and its walk-forward choice after costs (cryptoml.model.trading)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cryptoml.model.backtest import path_figures, periods_per_year
from cryptoml.model.rule import FLAT, LONG, Holding, TradingRule
from cryptoml.model.trading import Costs, RuleGrid, candidate_growth, choose_rules, rule_positions

BARS_PER_YEAR = periods_per_year(pd.Timedelta(hours=1))
GRID = RuleGrid(low=0.2, high=0.6, step=0.1, min_hold=(1, 3))


def test_a_long_stays_above_the_exit_and_for_its_minimum_hold() -> None:
    rule = TradingRule(entry=0.6, exit=0.4, min_hold=3)
    p_up = [0.5, 0.6, 0.1, 0.1, 0.45, 0.39, 0.7, 0.5, 0.41, 0.2]
    positions, last = rule.holdings(p_up)
    # flat below entry; enters at 0.6; held 3 bars whatever P(up); stays while >= exit; leaves at 0.39; ...
    assert positions.tolist() == [0, 1, 1, 1, 1, 0, 1, 1, 1, 0]
    assert last == Holding(FLAT, 0)
    assert rule.next_holding(0.9, Holding(LONG, 2)) == Holding(LONG, 3)


def test_the_flat_rule_never_enters_and_leaves_a_position_it_inherits() -> None:
    flat = TradingRule.flat()
    assert not flat.trades and flat.describe() == "flat (never enters)"
    assert flat.holdings([1.0, 0.99])[0].tolist() == [0, 0]
    assert flat.next_holding(1.0, Holding(LONG, 5)) == Holding()


def test_the_threshold_rule_is_long_exactly_while_p_up_reaches_it() -> None:
    p_up = np.array([0.2, 0.31, 0.3, 0.29, 0.5])
    np.testing.assert_array_equal(TradingRule.threshold(0.3).holdings(p_up)[0], (p_up >= 0.3).astype(int))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"entry": 0.5, "exit": None}, "both entry and exit, or neither"),
        ({"entry": 0.4, "exit": 0.5}, r"exit \(0.5\) must be at most its entry \(0.4\)"),
        ({"entry": 1.5, "exit": 0.5}, "entry must be a P\\(up\\) in \\(0, 1\\], got 1.5"),
        ({"entry": 0.5, "exit": 0.4, "min_hold": 0}, "min_hold must be a whole number of bars >= 1, got 0"),
        ({"entry": 0.5, "exit": 0.4, "min_hold": True}, "min_hold must be a whole number"),
    ],
)
def test_a_bad_rule_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TradingRule(**kwargs)


@pytest.mark.parametrize(
    ("holding", "p_up", "message"),
    [((LONG, 0), 0.5, "a long holding has >= 1 bars held"), ((FLAT, 2), 0.5, "a flat holding has 0 bars"), ((2, 1), 0.5, "position must be 0")],
)
def test_a_bad_holding_or_p_up_is_refused(holding: tuple[int, int], p_up: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TradingRule(0.5, 0.4).next_holding(p_up, Holding(*holding))


def test_p_up_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match=r"P\(up\) must be a probability in \[0, 1\], got nan"):
        TradingRule(0.5, 0.4).next_holding(math.nan, Holding())


def test_a_rule_round_trips_through_json_and_a_bad_one_names_its_key() -> None:
    rule = TradingRule(0.5, 0.3, 6)
    assert TradingRule.from_json(rule.as_json(), "model.trading_rule") == rule
    assert TradingRule.from_json(TradingRule.flat().as_json(), "x") == TradingRule.flat()
    with pytest.raises(ValueError, match=r"model.trading_rule: trading rule exit \(0.6\) must be at most"):
        TradingRule.from_json({"entry": 0.5, "exit": 0.6, "min_hold": 1}, "model.trading_rule")
    with pytest.raises(ValueError, match="model.trading_rule must be an object with keys entry, exit and min_hold"):
        TradingRule.from_json({"entry": 0.5}, "model.trading_rule")


def test_the_grid_lists_every_pair_with_exit_at_most_entry_surest_first() -> None:
    entries, exits, holds = GRID.candidates()
    np.testing.assert_allclose(GRID.values(), [0.2, 0.3, 0.4, 0.5, 0.6])
    assert len(entries) == 15 * 2  # 5 + 4 + 3 + 2 + 1 pairs, two minimum holds
    assert (entries[0], exits[0], holds[0]) == (0.6, 0.6, 1)
    assert (exits <= entries).all()
    with pytest.raises(ValueError, match="trading.min_hold must list whole numbers of bars >= 1"):
        RuleGrid(0.2, 0.6, 0.1, min_hold=(0,)).candidates()


def random_market(n_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """P(up) with some information about the next return, and the returns."""
    rng = np.random.default_rng(seed)
    returns = rng.normal(0.0, 0.01, n_rows)
    p_up = np.clip(0.4 + 8.0 * returns + rng.normal(0.0, 0.1, n_rows), 0.0, 1.0)
    return p_up, returns


def test_the_search_scores_each_candidate_as_the_backtest_does() -> None:
    """candidate_growth runs all candidates at once; each one's figure is the backtest's of the same rule."""
    p_up, returns = random_market(400)
    cost = 1.2e-3
    growth = candidate_growth(p_up, returns, cost, GRID, [250, 400])
    for index, (entry, exit, hold) in enumerate(zip(*GRID.candidates(), strict=True)):
        positions = TradingRule(float(entry), float(exit), int(hold)).holdings(p_up)[0]
        for row, stop in enumerate((250, 400)):
            total = path_figures(positions[:stop], returns[:stop], cost, BARS_PER_YEAR).figures["total_return"]
            assert growth[row, index] == pytest.approx(math.log1p(total), abs=1e-12)


def test_the_best_candidate_wins_and_the_rule_stays_flat_when_nothing_made_money() -> None:
    p_up, returns = random_market(400)
    rules = choose_rules(p_up, returns, 1.2e-3, GRID, [0, 400])
    assert rules[0] == TradingRule.flat()  # nothing known yet
    growth = candidate_growth(p_up, returns, 1.2e-3, GRID, [400])[0]
    best = int(np.argmax(growth))
    assert rules[1] == TradingRule(*(column[best].item() for column in GRID.candidates()))
    assert growth[best] > 0.0
    # At a 5 % fee per side nothing pays.
    assert choose_rules(p_up, returns, 0.05, GRID, [400]) == [TradingRule.flat()]


def test_a_step_rule_ignores_every_p_up_and_return_from_its_start() -> None:
    p_up, returns = random_market(1200)
    known = [200, 400, 1200]
    rules = choose_rules(p_up, returns, 1.0e-3, GRID, known)
    altered_p_up, altered_returns = p_up.copy(), returns.copy()
    altered_p_up[400:] = 1.0 - altered_p_up[400:]
    altered_returns[400:] = -altered_returns[400:]
    again = choose_rules(altered_p_up, altered_returns, 1.0e-3, GRID, known)
    assert again[:2] == rules[:2]
    assert again[2] != rules[2], "a rule chosen later sees the change: the test can fail"


def test_the_walk_forward_path_carries_the_holding_across_steps() -> None:
    p_up = np.array([0.7, 0.5, 0.5, 0.5, 0.5])
    rules = [TradingRule(0.6, 0.4), TradingRule(0.9, 0.8, min_hold=1)]
    # Entered at row 0 under the first rule; the second rule's exit (0.8) then closes it at row 2.
    assert rule_positions(p_up, rules, [(0, 2), (2, 5)]).tolist() == [1, 1, 0, 0, 0]
    held = [TradingRule(0.6, 0.4, min_hold=3), TradingRule(0.9, 0.8, min_hold=3)]
    assert rule_positions(p_up, held, [(0, 2), (2, 5)]).tolist() == [1, 1, 1, 0, 0]


def test_checkpoints_must_be_ordered_rows_with_known_returns() -> None:
    p_up, returns = random_market(50)
    with pytest.raises(ValueError, match="non-decreasing row counts within"):
        candidate_growth(p_up, returns, 0.001, GRID, [30, 10])
    returns[5] = np.nan
    with pytest.raises(ValueError, match="row 5 has none"):
        candidate_growth(p_up, returns, 0.001, GRID, [10])


def test_costs_add_slippage_to_the_fee() -> None:
    assert Costs(fee=1.2e-3, slippage=3.0e-4).per_side == pytest.approx(1.5e-3)
    with pytest.raises(ValueError, match="must be a fraction in"):
        Costs(fee=0.9, slippage=0.2).per_side
