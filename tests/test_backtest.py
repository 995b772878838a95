"""After-cost economics of a position path (cryptoml.model.backtest): costs, trades, risk and the Sharpe's uncertainty."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cryptoml.model.backtest import (
    close_positions,
    max_drawdown,
    next_bar_returns,
    path_figures,
    periods_per_year,
    probabilistic_sharpe,
    require_cost,
    sharpe_interval,
    sharpe_ratio,
    trade_returns,
)

HOUR = pd.Timedelta(hours=1)
DAY = pd.Timedelta(days=1)
BARS_PER_YEAR = periods_per_year(HOUR)


def hourly_series(values: list[float] | np.ndarray, start: str = "2024-01-01") -> pd.Series:
    index = pd.date_range(start, periods=len(values), freq="h", tz="UTC", name="timestamp")
    return pd.Series(np.asarray(values, dtype=np.float64), index=index, name="close")


def test_every_change_of_position_pays_the_cost_and_a_trade_is_a_round_trip() -> None:
    close = np.array([100.0, 110.0, 99.0, 99.0, 108.9, 120.0])
    returns = close[1:] / close[:-1] - 1.0
    cost = 0.01
    result = path_figures(np.array([1, 1, 0, 1, 1]), returns, cost, BARS_PER_YEAR)
    keep = 1.0 - cost
    # Bars: enter and +10 %, hold -10 %, leave (flat), enter and +10 %, hold +120/108.9 (marked, not sold).
    factors = [keep * 1.1, 0.9, keep, keep * 1.1, 120.0 / 108.9]
    figures = result.figures
    assert figures["total_return"] == pytest.approx(np.prod(factors) - 1.0)
    np.testing.assert_allclose(result.equity, np.cumprod(factors))
    assert figures["trades"] == 2
    first, second = keep * 1.1 * 0.9 * keep, keep * 1.1 * 120.0 / 108.9
    np.testing.assert_allclose(trade_returns(np.array([1, 1, 0, 1, 1]), result.net), [first - 1.0, second - 1.0])
    assert figures["hit_rate"] == 0.5  # the first round trip lost 2 % after its two costs
    assert figures["mean_trade_return"] == pytest.approx((first + second) / 2 - 1.0)
    assert figures["exposure"] == 4 / 5
    # Fees as a fraction of the starting capital: 1 % of the equity at each of the three changes.
    assert figures["fees_paid"] == pytest.approx(cost * (1.0 + keep * 1.1 * 0.9 + keep * 1.1 * 0.9 * keep))
    assert figures["max_drawdown"] == pytest.approx(max_drawdown(np.concatenate(([1.0], result.equity))))
    assert figures["trades_per_week"] == pytest.approx(2 / (5 / 24 / 7))


def test_a_path_that_is_always_long_pays_one_entry() -> None:
    returns = np.array([0.01, -0.02, 0.03])
    figures = path_figures(np.ones(3, dtype=np.int64), returns, 0.001, BARS_PER_YEAR).figures
    assert figures["total_return"] == pytest.approx(0.999 * np.prod(1.0 + returns) - 1.0)
    assert (figures["trades"], figures["exposure"], figures["fees_paid"]) == (1, 1.0, pytest.approx(0.001))


def test_a_flat_path_has_defined_figures() -> None:
    figures = path_figures(np.zeros(4, dtype=np.int64), np.array([0.01, -0.01, 0.02, 0.0]), 0.001, BARS_PER_YEAR).figures
    assert figures == {
        "total_return": 0.0, "annual_return": 0.0, "sharpe": 0.0, "sortino": 0.0, "max_drawdown": 0.0, "calmar": 0.0,
        "trades": 0, "trades_per_week": 0.0, "exposure": 0.0, "fees_paid": 0.0, "hit_rate": 0.0, "mean_trade_return": 0.0,
    }


bar_returns = arrays(np.float64, st.integers(1, 60), elements=st.floats(-0.2, 0.2, allow_nan=False))


@given(data=st.data(), returns=bar_returns)
def test_a_path_that_never_trades_pays_nothing_and_gains_nothing(data: st.DataObject, returns: np.ndarray) -> None:
    cost = data.draw(st.floats(0.0, 0.05))
    figures = path_figures(np.zeros(len(returns), dtype=np.int64), returns, cost, BARS_PER_YEAR).figures
    assert (figures["total_return"], figures["fees_paid"], figures["trades"]) == (0.0, 0.0, 0)


@given(data=st.data(), returns=bar_returns)
def test_on_a_fixed_path_a_higher_cost_never_gives_a_higher_return(data: st.DataObject, returns: np.ndarray) -> None:
    positions = np.array(data.draw(st.lists(st.integers(0, 1), min_size=len(returns), max_size=len(returns))))
    low = data.draw(st.floats(0.0, 0.05))
    high = data.draw(st.floats(low, 0.05))
    cheap, dear = (path_figures(positions, returns, cost, BARS_PER_YEAR).figures for cost in (low, high))
    assert dear["total_return"] <= cheap["total_return"]


def test_next_bar_returns_end_with_nan_where_close_ends() -> None:
    close = hourly_series([100.0, 101.0, 99.99])
    np.testing.assert_allclose(next_bar_returns(close.index, close), [0.01, -0.01, np.nan])


def test_rows_that_skip_a_bar_of_close_are_refused() -> None:
    close = hourly_series([100.0, 101.0, 102.0, 103.0])
    with pytest.raises(ValueError, match=r"consecutive bars of close; after 2024-01-01 00:00:00\+00:00 the next row is .* 1 close bar\(s\) later"):
        close_positions(close.index[[0, 2]], close)


@pytest.mark.parametrize("cost", [-0.001, 1.0, math.nan, "0.001"])
def test_a_cost_outside_0_1_is_refused_naming_the_params(cost: object) -> None:
    with pytest.raises(ValueError, match=r"costs.fee \+ costs.slippage\) must be a fraction in \[0, 1\)"):
        require_cost(cost)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("positions", "returns", "message"),
    [
        (np.array([1, 2]), np.array([0.0, 0.0]), "0 \\(flat\\) or 1 \\(long\\)"),
        (np.array([1]), np.array([0.0, 0.0]), "one position per bar return, got 1 positions for 2"),
        (np.array([1, 1]), np.array([0.0, np.nan]), "row 1 is not"),
    ],
)
def test_bad_paths_are_refused(positions: np.ndarray, returns: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        path_figures(positions, returns, 0.001, BARS_PER_YEAR)


def test_max_drawdown_of_a_known_path() -> None:
    assert max_drawdown(np.array([1.0, 1.2, 0.9, 1.5, 1.0])) == pytest.approx(1.0 / 1.5 - 1.0)
    assert max_drawdown(np.array([1.0, 1.1, 1.2])) == 0.0


def test_sharpe_is_annualised_by_bars_per_year() -> None:
    assert periods_per_year(HOUR) == 365 * 24
    assert periods_per_year(DAY) == 365
    returns = np.random.default_rng(0).normal(0.001, 0.01, 100)
    hourly, daily = sharpe_ratio(returns, periods_per_year(HOUR)), sharpe_ratio(returns, periods_per_year(DAY))
    assert hourly / daily == pytest.approx(math.sqrt(24))
    assert daily == pytest.approx(returns.mean() / returns.std(ddof=1) * math.sqrt(365))
    assert sharpe_ratio(np.full(10, 0.001), BARS_PER_YEAR) == 0.0


def test_timeframe_must_be_a_positive_timedelta() -> None:
    with pytest.raises(ValueError, match="timeframe must be a positive pd.Timedelta"):
        periods_per_year("1h")  # type: ignore[arg-type]


def test_the_probabilistic_sharpe_is_a_probability_that_grows_with_evidence() -> None:
    returns = np.random.default_rng(1).standard_t(4, 500) * 0.01 + 0.001
    psr = probabilistic_sharpe(returns)
    assert 0.5 < psr < 1.0
    # Skew and Sharpe both change sign with the returns: the statistic is antisymmetric.
    assert probabilistic_sharpe(-returns) == pytest.approx(1.0 - psr)
    # The same per-bar distribution observed four times as long is stronger evidence.
    assert probabilistic_sharpe(np.tile(returns, 4)) > psr
    assert probabilistic_sharpe(np.zeros(100)) == 0.0


def test_the_sharpe_interval_is_seeded_brackets_the_estimate_and_narrows_with_length() -> None:
    rng = np.random.default_rng(2)
    returns = rng.normal(0.0005, 0.01, 2000)
    low, high = sharpe_interval(returns, BARS_PER_YEAR)
    assert (low, high) == sharpe_interval(returns, BARS_PER_YEAR)
    assert low < sharpe_ratio(returns, BARS_PER_YEAR) < high
    short_low, short_high = sharpe_interval(returns[:200], BARS_PER_YEAR)
    assert short_high - short_low > high - low
    assert sharpe_interval(np.zeros(50), BARS_PER_YEAR) == (0.0, 0.0)
