"""The synthetic market: candle contract, determinism, and the stylized facts the module docstring promises."""

from __future__ import annotations

import time

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from scipy.stats import kurtosis, spearmanr
from sklearn.metrics import roc_auc_score

from cryptoml.candles.store import CANDLE_COLUMNS, validate_candles
from cryptoml.candles.synthetic import (
    MEAN_REVERSION_KAPPA,
    MEAN_REVERSION_SPAN_BARS,
    START_PRICE_JPY,
    bar_grid,
    simulate_candles,
)
from cryptoml.candles.timeframe import parse_timeframe
from cryptoml.features.manager import FeatureManager
from cryptoml.model.labels import align, make_labels

START = pd.Timestamp("2023-01-01", tz="UTC")
END = pd.Timestamp("2025-01-01", tz="UTC")
SEEDS = (7, 11, 2024)
TIMEFRAMES = ("15m", "1h", "4h", "1d")
SKILL_AUC_FLOOR = 0.53


@pytest.fixture(scope="module", params=SEEDS)
def two_years(request: pytest.FixtureRequest) -> pd.DataFrame:
    """Two years of hourly candles, the window the model is tuned on."""
    return simulate_candles(START, END, "1h", request.param)


def log_returns(candles: pd.DataFrame) -> pd.Series:
    """Close-to-close log returns, indexed like the bar they end in."""
    return np.log(candles["close"]).diff().dropna()


def autocorrelations(series: pd.Series, lags: range | tuple[int, ...]) -> np.ndarray:
    """Pearson autocorrelation at each lag (numpy: pandas' autocorr is ~100x slower per call)."""
    values = series.to_numpy()
    return np.array([np.corrcoef(values[:-lag], values[lag:])[0, 1] for lag in lags])


# --- contract -----------------------------------------------------------------------------------


def test_frame_follows_the_candle_contract() -> None:
    candles = simulate_candles(START, START + pd.Timedelta(days=3))
    assert tuple(candles.columns) == CANDLE_COLUMNS
    assert isinstance(candles.index, pd.RangeIndex)
    assert candles["timestamp"].dtype == "datetime64[ns, UTC]"
    assert all(candles[column].dtype == np.float64 for column in CANDLE_COLUMNS[1:])
    assert candles["timestamp"].is_unique and candles["timestamp"].is_monotonic_increasing


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
def test_bars_cover_the_window_on_the_epoch_grid(timeframe: str) -> None:
    step = parse_timeframe(timeframe)
    start = pd.Timestamp("2024-03-01 05:07", tz="UTC")  # on no grid, so the first bar must round up
    end = pd.Timestamp("2024-05-10 13:00", tz="UTC")
    stamps = simulate_candles(start, end, timeframe)["timestamp"]

    assert stamps.iloc[0] >= start and stamps.iloc[0] - step < start
    assert stamps.iloc[-1] < end and stamps.iloc[-1] + step >= end
    assert (stamps.diff().dropna() == step).all()
    assert (stamps.astype("int64") % step.value == 0).all()


@pytest.mark.parametrize("timeframe", ["1x", "0h", "h1", "", "1.5h"])
def test_bad_timeframe_is_named_in_the_error(timeframe: str) -> None:
    with pytest.raises(ValueError, match=f"timeframe '{timeframe}'"):
        simulate_candles(START, END, timeframe)


def test_start_after_end_is_rejected() -> None:
    with pytest.raises(ValueError, match="after end"):
        simulate_candles(END, START)


def test_empty_window_still_follows_the_contract() -> None:
    empty = simulate_candles(START, START)
    expected = simulate_candles(START, START + pd.Timedelta(hours=1)).iloc[:0]
    assert empty.empty
    pd.testing.assert_frame_equal(empty, expected)


def test_naive_bounds_are_utc_and_other_zones_are_converted() -> None:
    window = (START, START + pd.Timedelta(days=2))
    reference = bar_grid(*window, "1h")
    assert bar_grid(window[0].tz_localize(None), window[1].tz_localize(None), "1h").equals(reference)
    assert bar_grid(window[0].tz_convert("Asia/Tokyo"), window[1].tz_convert("Asia/Tokyo"), "1h").equals(reference)


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_frames() -> None:
    first, second = (simulate_candles(START, END, "1h", seed=3) for _ in range(2))
    for column in CANDLE_COLUMNS:
        # Timestamps as int64 nanoseconds: their numpy form is an object array of pointers.
        dtype = "int64" if column == "timestamp" else "float64"
        first_values, second_values = (frame[column].astype(dtype) for frame in (first, second))
        assert first_values.to_numpy().tobytes() == second_values.to_numpy().tobytes(), column


def test_different_seeds_give_different_paths() -> None:
    first, second = (simulate_candles(START, END, "1h", seed=seed) for seed in SEEDS[:2])
    assert first["timestamp"].equals(second["timestamp"])
    assert not np.allclose(first["close"], second["close"])
    assert not np.allclose(first["volume"], second["volume"])


def test_longer_window_extends_the_shorter_one_bar_for_bar() -> None:
    """Each bar depends only on earlier draws, so appending a later window never rewrites history."""
    short = simulate_candles(START, START + pd.Timedelta(days=30), "1h")
    long = simulate_candles(START, START + pd.Timedelta(days=60), "1h")
    pd.testing.assert_frame_equal(long.iloc[: len(short)], short, check_exact=True)


def test_two_years_of_hourly_bars_take_well_under_a_second() -> None:
    began = time.perf_counter()
    simulate_candles(START, END, "1h")
    assert time.perf_counter() - began < 1.0


# --- prices and volumes ----------------------------------------------------------------------------


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
def test_ohlc_is_consistent_and_positive(timeframe: str) -> None:
    candles = simulate_candles(START, END, timeframe)
    open_, high, low, close = (candles[name] for name in ("open", "high", "low", "close"))
    assert (high >= np.maximum(open_, close)).all()
    assert (low <= np.minimum(open_, close)).all()
    assert (low > 0).all() and (candles["volume"] > 0).all()
    assert (open_.iloc[1:].to_numpy() == close.iloc[:-1].to_numpy()).all()
    assert open_.iloc[0] == START_PRICE_JPY


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
def test_pipeline_validation_accepts_the_frame_unchanged_and_gapless(timeframe: str) -> None:
    candles = simulate_candles(START, START + pd.Timedelta(days=90), timeframe)
    validated, report = validate_candles(candles, timeframe, source="synthetic")
    pd.testing.assert_frame_equal(validated, candles, check_exact=True)
    assert report.gaps == 0 and report.duplicates_dropped == 0


def test_levels_look_like_btc_jpy(two_years: pd.DataFrame) -> None:
    """Price in the millions of yen, hourly volume in tens to hundreds of BTC."""
    assert 1e6 < two_years["close"].min() and two_years["close"].max() < 1e8
    hourly_volume = two_years["volume"].quantile([0.1, 0.9])
    assert 10 < hourly_volume.iloc[0] and hourly_volume.iloc[1] < 500


# --- stylized facts ---------------------------------------------------------------------------------


def test_returns_are_fat_tailed(two_years: pd.DataFrame) -> None:
    assert kurtosis(log_returns(two_years)) > 3.0  # excess kurtosis; a Gaussian gives 0


def test_volatility_clusters_while_returns_stay_nearly_uncorrelated(two_years: pd.DataFrame) -> None:
    """Measured on returns divided by their hour-of-day std, so the intraday pattern cannot pass for clustering."""
    returns = log_returns(two_years)
    hours = two_years["timestamp"].dt.hour.loc[returns.index]
    deseasonalized = returns / returns.groupby(hours).transform("std")
    short_lags = (1, 5, 10, 20)
    for lag, value in zip(short_lags, autocorrelations(deseasonalized.abs(), short_lags), strict=True):
        assert value > 0.04, f"|r| autocorrelation at lag {lag} is {value:.3f}"
    lags = range(1, 51)
    abs_return_acf = autocorrelations(deseasonalized.abs(), lags).mean()
    return_acf = np.abs(autocorrelations(deseasonalized, lags))
    assert abs_return_acf > 0.05
    assert return_acf.max() < 0.12  # lag 1 is about -0.06 by design (the mean reversion)
    assert abs_return_acf > 3 * return_acf.mean()


def test_volume_rises_with_volatility(two_years: pd.DataFrame) -> None:
    returns = log_returns(two_years)
    correlation = spearmanr(two_years["volume"].loc[returns.index], returns.abs()).statistic
    assert correlation > 0.4


def test_volatility_and_volume_depend_on_the_utc_hour(two_years: pd.DataFrame) -> None:
    returns = log_returns(two_years)
    hours = two_years["timestamp"].dt.hour
    volatility_by_hour = returns.groupby(hours.loc[returns.index]).std()
    volume_by_hour = two_years["volume"].groupby(hours).mean()
    assert volatility_by_hour.max() / volatility_by_hour.min() > 1.5
    assert volume_by_hour.max() / volume_by_hour.min() > 1.5


# --- the engineered predictable component ----------------------------------------------------------


def test_next_return_is_pulled_back_towards_the_moving_average(two_years: pd.DataFrame) -> None:
    """The documented mechanism: E[r_next] = -KAPPA * (log close - EMA(log close)); the slope recovers KAPPA."""
    log_close = np.log(two_years["close"])
    gap = log_close - log_close.ewm(span=MEAN_REVERSION_SPAN_BARS, adjust=False).mean()
    next_return = log_close.diff().shift(-1)
    known = next_return.notna()
    slope = np.polyfit(gap[known], next_return[known], 1)[0]
    assert -1.5 * MEAN_REVERSION_KAPPA < slope < -0.5 * MEAN_REVERSION_KAPPA


def test_label_positive_rate_is_sensible(two_years: pd.DataFrame) -> None:
    assert 0.15 < make_labels(two_years["close"]).mean() < 0.40  # next-bar return > 0.3 %


def test_a_small_model_has_modest_skill_that_shuffled_labels_do_not(two_years: pd.DataFrame) -> None:
    """Chronological split with a gap: train on the first 75 %, score the last 20 %."""
    label = make_labels(two_years.set_index("timestamp")["close"])  # the pipeline's label: next-bar return > 0.3 %
    features, label = align(FeatureManager().generate_features(two_years), label)
    features, label = features.to_numpy(), label.to_numpy()
    train_end, test_start = int(len(label) * 0.75), int(len(label) * 0.80)
    shuffled = np.random.default_rng(0).permutation(label[:train_end])

    def holdout_auc(train_labels: np.ndarray) -> float:
        model = lgb.LGBMClassifier(n_estimators=100, random_state=42, n_jobs=1, verbose=-1)
        model.fit(features[:train_end], train_labels)
        return roc_auc_score(label[test_start:], model.predict_proba(features[test_start:])[:, 1])

    assert holdout_auc(label[:train_end]) > SKILL_AUC_FLOOR
    assert holdout_auc(shuffled) < SKILL_AUC_FLOOR
