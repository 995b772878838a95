"""After-cost economics of a position path: returns, risk, trades, fees, and the uncertainty of the Sharpe ratio.

Conventions, the same for every strategy so their figures compare:

* A position decided at the close of bar t (0 flat, 1 long) earns the next bar's return close[t+1] / close[t] - 1.
* Costs: every change of position pays `cost` (fee + slippage, per side) on the traded value, so equity is
  multiplied by (1 - cost) on entering and again on leaving. A path starts flat, and is marked to market at the
  last close without a closing cost (an open position is not sold to be measured).
* A trade is one round trip: from the bar it enters to the bar it leaves (or the end), both costs included.
* Per-bar net returns give the annualised Sharpe and Sortino ratios (risk-free rate 0), with `bars_per_year` bars
  a year of round-the-clock trading (8,760 for 1h).

The Sharpe ratio of a few months of hourly returns is uncertain, so the rule also gets a block-bootstrap interval
(blocks keep the volatility clustering of consecutive bars) and the probabilistic Sharpe ratio of Bailey and
López de Prado: the probability that the true Sharpe ratio is above 0, given the sample's length, skew and kurtosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

DAYS_PER_YEAR = 365  # crypto trades around the clock, every day of the year
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # the interval is a pure function of the returns
CONFIDENCE = 0.95


def periods_per_year(timeframe: pd.Timedelta) -> float:
    """Bars in a year of round-the-clock trading: 8760 for 1h, 365 for 1d."""
    if not isinstance(timeframe, pd.Timedelta) or timeframe <= pd.Timedelta(0):
        raise ValueError(f"timeframe must be a positive pd.Timedelta (e.g. parse_timeframe('1h')), got {timeframe!r}")
    return pd.Timedelta(days=DAYS_PER_YEAR) / timeframe


def require_cost(cost: float) -> float:
    if not (isinstance(cost, int | float) and math.isfinite(cost) and 0.0 <= cost < 1.0):
        raise ValueError(f"the cost per side (costs.fee + costs.slippage) must be a fraction in [0, 1), e.g. 1.2e-3; got {cost!r}")
    return float(cost)


def close_positions(index: pd.DatetimeIndex, close: pd.Series) -> np.ndarray:
    """Position in `close` of each row of `index`; the rows must be consecutive bars of `close`.

    A row missing in between would make a backtest skip that bar's return silently.
    """
    if not isinstance(close, pd.Series) or not isinstance(close.index, pd.DatetimeIndex):
        raise ValueError("close must be a pandas Series indexed by the candle timestamps")
    if not close.index.is_unique or not close.index.is_monotonic_increasing:
        raise ValueError("close: the index must be unique, strictly increasing timestamps")
    positions = close.index.get_indexer(index)
    missing = np.flatnonzero(positions < 0)
    if missing.size:
        raise ValueError(f"{missing.size} evaluated timestamp(s) are not in close, first {index[missing[0]]}")
    jumps = np.flatnonzero(np.diff(positions) != 1)
    if jumps.size:
        raise ValueError(
            f"evaluated rows must be consecutive bars of close; after {index[jumps[0]]} the next row is "
            f"{index[jumps[0] + 1]}, {positions[jumps[0] + 1] - positions[jumps[0]] - 1} close bar(s) later"
        )
    return positions


def next_bar_returns(index: pd.DatetimeIndex, close: pd.Series) -> np.ndarray:
    """close[t+1] / close[t] - 1 for each row t of `index` (consecutive bars of `close`); NaN where close ends first."""
    positions = close_positions(pd.DatetimeIndex(index), close)
    prices = close.to_numpy(dtype=np.float64)
    returns = np.full(len(positions), np.nan)
    has_next = positions + 1 < len(prices)
    returns[has_next] = prices[positions[has_next] + 1] / prices[positions[has_next]] - 1.0
    return returns


def net_returns(positions: np.ndarray, bar_returns: np.ndarray, cost: float) -> np.ndarray:
    """Each bar's return after costs: (1 - cost) per position change, times 1 + position * the bar's return."""
    changes = np.abs(np.diff(positions, prepend=0))
    return (1.0 - cost) ** changes * (1.0 + positions * bar_returns) - 1.0


def sharpe_ratio(returns: np.ndarray, bars_per_year: float) -> float:
    """Annualised Sharpe ratio (risk-free rate 0, sample std); 0 when undefined (< 2 bars or no variation)."""
    if len(returns) < 2 or np.ptp(returns) == 0.0:  # the std of equal floats can round to 1e-19, not 0
        return 0.0
    return float(np.mean(returns)) / float(np.std(returns, ddof=1)) * math.sqrt(bars_per_year)


def sortino_ratio(returns: np.ndarray, bars_per_year: float) -> float:
    """Annualised mean over the downside deviation (root mean square of the negative returns); 0 with no loss."""
    downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2))) if len(returns) else 0.0
    return float(np.mean(returns)) / downside * math.sqrt(bars_per_year) if downside > 0.0 else 0.0


def drawdown(equity: np.ndarray) -> np.ndarray:
    """The fall from the running peak after each bar, a fraction <= 0."""
    return equity / np.maximum.accumulate(equity) - 1.0


def max_drawdown(equity: np.ndarray) -> float:
    """Deepest fall from a running peak as a fraction <= 0 (-0.25: a quarter of the peak was lost)."""
    return float(np.min(drawdown(equity)))


def probabilistic_sharpe(returns: np.ndarray, benchmark: float = 0.0) -> float:
    """P(true per-bar Sharpe > benchmark) given the sample (Bailey and López de Prado, 2012).

    PSR = Phi((SR - SR*) sqrt(n - 1) / sqrt(1 - skew SR + (kurtosis - 1) / 4 SR^2)), SR the per-bar Sharpe ratio,
    kurtosis Pearson's (3 for a normal). A path without variation (never in the market) has a Sharpe ratio of
    exactly 0, so there is no evidence that it beats the benchmark: 0.
    """
    if len(returns) < 3 or np.ptp(returns) == 0.0:
        return 0.0
    sharpe = float(np.mean(returns)) / float(np.std(returns, ddof=1))
    skew = float(stats.skew(returns))
    kurtosis = float(stats.kurtosis(returns, fisher=False))
    variance = 1.0 - skew * sharpe + (kurtosis - 1.0) / 4.0 * sharpe**2
    return float(stats.norm.cdf((sharpe - benchmark) * math.sqrt(len(returns) - 1) / math.sqrt(max(variance, 1e-12))))


def block_length(n_bars: int) -> int:
    """Bars per bootstrap block: n^(1/3), the order of the optimal length for distribution estimates (Hall,
    Horowitz and Jing, 1995); 15 bars for 3,500 hourly returns."""
    return max(1, round(n_bars ** (1.0 / 3.0)))


def sharpe_interval(returns: np.ndarray, bars_per_year: float, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """The CONFIDENCE interval of the annualised Sharpe ratio from a circular block bootstrap of the bar returns.

    Seeded, so the same returns always give the same interval.
    """
    n_bars = len(returns)
    if n_bars < 2 or np.ptp(returns) == 0.0:
        return 0.0, 0.0
    length = block_length(n_bars)
    blocks = -(-n_bars // length)
    starts = np.random.default_rng(BOOTSTRAP_SEED).integers(0, n_bars, size=(resamples, blocks))
    rows = ((starts[:, :, None] + np.arange(length)) % n_bars).reshape(resamples, -1)[:, :n_bars]
    sample = returns[rows]
    spread = sample.std(axis=1, ddof=1)
    sharpes = np.divide(sample.mean(axis=1), spread, out=np.zeros(resamples), where=spread > 0) * math.sqrt(bars_per_year)
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(sharpes, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True, eq=False)
class PathResult:
    """One strategy's figures, and its equity and net return after each bar."""

    figures: dict[str, Any]
    equity: np.ndarray
    net: np.ndarray


def trade_returns(positions: np.ndarray, net: np.ndarray) -> np.ndarray:
    """The net return of each round trip: the bars it holds and the bar it leaves on, both costs included."""
    previous = np.concatenate(([0], positions[:-1]))
    entries = (positions == 1) & (previous == 0)
    in_trade = (positions == 1) | (previous == 1)  # held, or the bar whose change to flat pays the exit cost
    trade_id = np.cumsum(entries) - 1
    growth = np.bincount(trade_id[in_trade], weights=np.log1p(net[in_trade]), minlength=int(entries.sum()))
    return np.expm1(growth)


def path_figures(positions: np.ndarray, bar_returns: np.ndarray, cost: float, bars_per_year: float) -> PathResult:
    """Every after-cost figure of one position path (see the module docstring for the conventions).

    total_return and annual_return (compounded to a year of bars); sharpe and sortino (annualised); max_drawdown
    (<= 0) and calmar (annual return over |max drawdown|, 0 without a drawdown); trades (round trips) and
    trades_per_week; exposure (fraction of bars long); fees_paid (costs as a fraction of the starting capital);
    hit_rate and mean_trade_return over the trades (0 without one).
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0 or len(positions) != len(bar_returns):
        raise ValueError(f"a backtest needs one position per bar return, got {len(positions)} positions for {len(bar_returns)} returns")
    if not np.isin(positions, (0, 1)).all():
        raise ValueError("positions must be 0 (flat) or 1 (long) on every row")
    if not np.isfinite(bar_returns).all():
        raise ValueError(f"bar returns must be finite; row {int(np.argmin(np.isfinite(bar_returns)))} is not")
    net = net_returns(positions, bar_returns, require_cost(cost))
    equity = np.cumprod(1.0 + net)
    before = np.concatenate(([1.0], equity[:-1]))
    fees = before * (1.0 - (1.0 - cost) ** np.abs(np.diff(positions, prepend=0)))
    trades = trade_returns(positions, net)
    years = len(net) / bars_per_year
    annual = float(equity[-1] ** (1.0 / years) - 1.0)
    deepest = max_drawdown(np.concatenate(([1.0], equity)))
    figures = {
        "total_return": float(equity[-1] - 1.0),
        "annual_return": annual,
        "sharpe": sharpe_ratio(net, bars_per_year),
        "sortino": sortino_ratio(net, bars_per_year),
        "max_drawdown": deepest,
        "calmar": annual / -deepest if deepest < 0.0 else 0.0,
        "trades": len(trades),
        "trades_per_week": len(trades) / (years * DAYS_PER_YEAR / 7.0),
        "exposure": float(np.mean(positions)),
        "fees_paid": float(fees.sum()),
        "hit_rate": float(np.mean(trades > 0.0)) if len(trades) else 0.0,
        "mean_trade_return": float(np.mean(trades)) if len(trades) else 0.0,
    }
    return PathResult(figures=figures, equity=equity, net=net)


def uncertainty(net: np.ndarray, bars_per_year: float) -> dict[str, float]:
    """The Sharpe ratio's bootstrap interval and its probabilistic Sharpe ratio (against 0)."""
    low, high = sharpe_interval(net, bars_per_year)
    return {"sharpe_ci_low": low, "sharpe_ci_high": high, "psr": probabilistic_sharpe(net)}
