"""Choosing the trading rule after costs, walk-forward, from out-of-sample predictions and prices only.

The candidates are every (entry, exit) pair of a grid of P(up) values with exit <= entry, with each minimum
holding time of the grid. Each is simulated from flat over the earlier out-of-sample rows through
`rule.transition`, the rule's one implementation, on all candidates at once. The winner has the highest after-cost log growth, log(final equity):

* log growth is what compounding capital maximises (the Kelly criterion's objective); it charges every fee,
  and a losing stretch costs more than an equal winning one gains, as it does to the account;
* a risk-adjusted score (Sharpe) ranks a rule that trades twice and wins both times above one that earns
  steadily all year: on a few hundred rows it rewards luck;
* when no candidate ends above its starting capital, the rule stays flat: not trading was the best choice.

Ties go to the first candidate in grid order (higher entry, then higher exit, then shorter minimum hold: fewer,
surer trades).

No lookahead: at a step that starts at row s, the rule is chosen on rows [first, s - 1). A position decided at
the close of row t earns the return to the close of row t + 1, so the last return known when the step starts
(at the close of row s - 1) is that of row s - 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cryptoml.model.backtest import require_cost
from cryptoml.model.rule import Holding, TradingRule, transition

# Decimals of the grid's P(up) values: 0.2 stays 0.2 in the manifest, whatever the float steps add.
_GRID_DECIMALS = 6


@dataclass(frozen=True)
class Costs:
    """What one side of a trade costs, as fractions of the traded value; charged on every change of position."""

    fee: float
    slippage: float = 0.0

    @property
    def per_side(self) -> float:
        return require_cost(self.fee + self.slippage)


@dataclass(frozen=True)
class RuleGrid:
    """The P(up) values entry and exit are chosen from (low, low + step, ..., up to high), and the minimum holds."""

    low: float
    high: float
    step: float
    min_hold: tuple[int, ...] = (1,)

    def values(self) -> np.ndarray:
        if not (0.0 < self.low <= self.high <= 1.0 and self.step > 0.0):
            raise ValueError(f"trading.grid needs 0 < low <= high <= 1 and step > 0, got low={self.low}, high={self.high}, step={self.step}")
        count = int(np.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return np.round(self.low + self.step * np.arange(count), _GRID_DECIMALS)

    def candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entries, exits, min_holds) of every pair with exit <= entry and every minimum hold, by entry then exit
        (both descending), then minimum hold (ascending)."""
        if not self.min_hold or any(isinstance(bars, bool) or not isinstance(bars, int) or bars < 1 for bars in self.min_hold):
            raise ValueError(f"trading.min_hold must list whole numbers of bars >= 1, got {list(self.min_hold)}")
        values = self.values()[::-1]
        holds = sorted(set(self.min_hold))
        rows = [(entry, exit, bars) for i, entry in enumerate(values) for exit in values[i:] for bars in holds]
        entries, exits, min_holds = (np.array(column) for column in zip(*rows, strict=True))
        return entries, exits, min_holds.astype(np.int64)


def candidate_growth(p_up: np.ndarray, bar_returns: np.ndarray, cost: float, grid: RuleGrid, checkpoints: Sequence[int]) -> np.ndarray:
    """The after-cost log growth of every candidate (grid.candidates() order) over rows [0, c) for each checkpoint
    c (non-decreasing), shape (len(checkpoints), candidates). Each candidate's path starts flat at row 0. One pass
    over the rows, whatever the number of checkpoints.
    """
    if list(checkpoints) != sorted(checkpoints) or (len(checkpoints) and not 0 <= checkpoints[0] <= checkpoints[-1] <= len(p_up)):
        raise ValueError(f"checkpoints must be non-decreasing row counts within [0, {len(p_up)}], got {list(checkpoints)}")
    last = checkpoints[-1] if len(checkpoints) else 0
    if not np.isfinite(bar_returns[:last]).all():
        raise ValueError(f"the rule is chosen on rows whose next-bar return is known; row {int(np.argmin(np.isfinite(bar_returns[:last])))} has none")
    entries, exits, min_holds = grid.candidates()
    cost_log = np.log1p(-cost)
    position = held = np.zeros(len(entries), dtype=np.int64)
    growth = np.zeros(len(entries))
    snapshots = np.empty((len(checkpoints), len(entries)))
    done = 0
    for row in range(last + 1):
        while done < len(checkpoints) and checkpoints[done] == row:
            snapshots[done] = growth
            done += 1
        if row == last:
            break
        long, held = transition(position, held, p_up[row], entries, exits, min_holds)
        growth += np.abs(long - position) * cost_log + long * np.log1p(bar_returns[row])
        position = long
    return snapshots


def best_rule(grid: RuleGrid, growth: np.ndarray) -> TradingRule:
    """The candidate with the highest log growth, or the flat rule when none ended above its starting capital."""
    best = int(np.argmax(growth))
    if not growth[best] > 0.0:
        return TradingRule.flat()
    entries, exits, min_holds = grid.candidates()
    return TradingRule(entry=float(entries[best]), exit=float(exits[best]), min_hold=int(min_holds[best]))


def choose_rules(p_up: np.ndarray, bar_returns: np.ndarray, cost: float, grid: RuleGrid, known_rows: Sequence[int]) -> list[TradingRule]:
    """For each count k of known rows, the best rule on rows [0, k) (the flat rule when k is 0)."""
    growth = candidate_growth(np.asarray(p_up, dtype=np.float64), np.asarray(bar_returns, dtype=np.float64), cost, grid, known_rows)
    return [best_rule(grid, row) for row in growth]


def rule_positions(p_up: np.ndarray, rules: Sequence[TradingRule], bounds: Sequence[tuple[int, int]]) -> np.ndarray:
    """The walk-forward path: rows [start, stop) of each bound traded by its rule, the holding carried across.

    Starts flat at the first bound; rows outside every bound stay flat and do not carry a position.
    """
    positions = np.zeros(len(p_up), dtype=np.int64)
    holding = Holding()
    for rule, (start, stop) in zip(rules, bounds, strict=True):
        positions[start:stop], holding = rule.holdings(p_up[start:stop], holding)
    return positions
