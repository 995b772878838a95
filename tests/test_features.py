"""FeatureManager: TA-Lib as the oracle, no lookahead, live == batch, flat markets, output contract, spec hash."""

from __future__ import annotations

from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pandas as pd
import pytest
import talib
from hypothesis import given
from hypothesis import strategies as st

from cryptoml.features.manager import FEATURE_NAMES, FEATURE_PARAMS, LIVE_WINDOW, REQUIRED_COLUMNS, FeatureManager

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
REAL_CSV_NAMES = ("BTC_USDT_1h_2017-08-17_2020-02-01.csv", "BTC_USDT_15m_2021-09-02_2021-12-02.csv")

ORACLE_RTOL = 1e-6  # required agreement with TA-Lib
LIVE_RTOL = 1e-9  # required agreement of the live path with batch
# Features that cross zero (macd, returns_1, zscore, bb_position at the lower band) have rows where any relative
# figure is dominated by float rounding of price-sized terms (~1e-16 of the price), in TA-Lib as much as here.
# Relative differences therefore divide by max(|expected|, DENOMINATOR_FLOOR * median |expected| of the column):
# exact rows are judged relatively, the rows near zero absolutely at that scale. No row is skipped.
DENOMINATOR_FLOOR = 1e-3

MANAGER = FeatureManager()


def make_candles(n_rows: int, seed: int, start_price: float = 100.0) -> pd.DataFrame:
    """Candle-contract frame: random walk with Student-t(3) shocks and volatility wandering over 0.1%..10% a bar."""
    rng = np.random.default_rng(seed)
    volatility = np.exp(np.clip(np.log(0.01) + np.cumsum(rng.normal(0.0, 0.05, n_rows)), np.log(1e-3), np.log(0.1)))
    close = start_price * np.exp(np.cumsum(rng.standard_t(3, n_rows) * volatility))
    open_ = np.concatenate(([start_price], close[:-1]))
    wick = np.abs(rng.normal(0.0, 0.5, (2, n_rows))) * volatility
    return pd.DataFrame(
        {
            "timestamp": pd.date_range("2020-01-01", periods=n_rows, freq="h", tz="UTC"),
            "open": open_,
            "high": np.maximum(open_, close) * (1.0 + wick[0]),
            "low": np.minimum(open_, close) * (1.0 - wick[1]),
            "close": close,
            "volume": rng.lognormal(3.0, 1.0, n_rows),
        }
    )


def read_real_candles(name: str) -> pd.DataFrame:
    path = REAL_DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"real candles not present at {path} (shared data directory is optional)")
    return pd.read_csv(path).assign(timestamp=lambda frame: pd.to_datetime(frame["timestamp"], utc=True))


def talib_features(candles: pd.DataFrame) -> pd.DataFrame:
    """The 12 features from TA-Lib calls, NaN where TA-Lib has no value yet."""
    close, high, low, volume = (candles[name].to_numpy() for name in ("close", "high", "low", "volume"))
    macd, macd_signal, _ = talib.MACD(close, 12, 26, 9)
    upper, middle, lower = talib.BBANDS(close, 20, 2.0, 2.0, 0)
    oracle = {
        "close": close,
        "volume": volume,
        "returns_1": talib.ROCR(close, 1) - 1.0,
        "rsi_14": talib.RSI(close, 14),
        "macd": macd,
        "macd_signal": macd_signal,
        "atr_14": talib.ATR(high, low, close, 14),
        "bb_position": (close - lower) / (upper - lower),
        "ema_20": talib.EMA(close, 20),
        "ema_50": talib.EMA(close, 50),
        "zscore": (close - talib.SMA(close, 20)) / talib.STDDEV(close, 20, 1.0),
        "volume_ratio": volume / talib.SMA(volume, 20),
    }
    return pd.DataFrame(oracle, index=pd.DatetimeIndex(candles["timestamp"], name="timestamp"))


def max_relative_difference(actual: pd.Series, expected: pd.Series, scale_from: pd.Series | None = None) -> float:
    """max |a - e| / max(|e|, floor); the floor comes from `scale_from` (default: `expected`), see DENOMINATOR_FLOOR."""
    magnitude = np.abs((expected if scale_from is None else scale_from).to_numpy())
    floor = DENOMINATOR_FLOOR * np.median(magnitude)
    denominator = np.maximum(np.abs(expected.to_numpy()), floor)
    return float(np.max(np.abs(actual.to_numpy() - expected.to_numpy()) / denominator))


def assert_matches_talib(candles: pd.DataFrame, feature: str) -> None:
    ours = MANAGER.generate_features(candles)
    oracle = talib_features(candles).loc[ours.index, feature]
    assert not oracle.isna().any(), f"TA-Lib has no {feature} yet on some rows we return"
    difference = max_relative_difference(ours[feature], oracle)
    assert difference <= ORACLE_RTOL, f"{feature}: max relative difference to TA-Lib {difference:.3g}"


@pytest.fixture(scope="module")
def synthetic_candles() -> pd.DataFrame:
    return make_candles(5_000, seed=7)


@pytest.mark.parametrize("feature", FEATURE_NAMES)
def test_matches_talib_on_synthetic_candles(synthetic_candles: pd.DataFrame, feature: str) -> None:
    assert_matches_talib(synthetic_candles, feature)


@pytest.mark.parametrize("feature", FEATURE_NAMES)
@pytest.mark.parametrize("csv_name", REAL_CSV_NAMES)
def test_matches_talib_on_real_candles(csv_name: str, feature: str) -> None:
    # The 1h file holds one flat zero-volume bar (2019-06-07T21:00); it lies inside ordinary windows, so TA-Lib and
    # the flat-market rules agree there and it is compared like any other row.
    assert_matches_talib(read_real_candles(csv_name), feature)


def test_warmup_is_where_talib_defines_every_feature(synthetic_candles: pd.DataFrame) -> None:
    oracle = talib_features(synthetic_candles)
    first_complete_row = int(np.argmax(oracle.notna().all(axis=1).to_numpy()))
    assert MANAGER.warmup_rows == first_complete_row
    result = MANAGER.generate_features(synthetic_candles)
    assert result.index[0] == synthetic_candles["timestamp"].iloc[first_complete_row]
    assert len(result) == len(synthetic_candles) - first_complete_row


def test_macd_seeds_fast_ema_at_the_slow_lookback(synthetic_candles: pd.DataFrame) -> None:
    """TA-Lib's quirk matters: a fast EMA seeded on rows 0..11 instead of 14..25 gives a visibly different MACD."""
    close = synthetic_candles["close"].to_numpy()
    naive_line = talib.EMA(close, 12) - talib.EMA(close, 26)
    ours = MANAGER.generate_features(synthetic_candles)["macd"]
    naive_first_row = pd.Series(naive_line[MANAGER.warmup_rows : MANAGER.warmup_rows + 1])
    assert max_relative_difference(ours.iloc[:1], naive_first_row, scale_from=ours) > ORACLE_RTOL


def test_output_contract(synthetic_candles: pd.DataFrame) -> None:
    result = MANAGER.generate_features(synthetic_candles)
    assert list(result.columns) == list(FEATURE_NAMES) == MANAGER.get_feature_names()
    assert (result.dtypes == np.float64).all()
    assert isinstance(result.index, pd.DatetimeIndex)
    assert result.index.name == "timestamp"
    assert str(result.index.tz) == "UTC"
    assert result.index.equals(pd.DatetimeIndex(synthetic_candles["timestamp"].iloc[MANAGER.warmup_rows :]))


def test_accepts_frame_indexed_by_timestamp(synthetic_candles: pd.DataFrame) -> None:
    indexed = synthetic_candles.set_index("timestamp")
    pd.testing.assert_frame_equal(MANAGER.generate_features(indexed), MANAGER.generate_features(synthetic_candles))


def test_result_is_writable_and_independent_of_the_input(synthetic_candles: pd.DataFrame) -> None:
    candles = synthetic_candles.copy()
    result = MANAGER.generate_features(candles)
    result.iloc[0, result.columns.get_loc("close")] = -1.0
    assert (candles["close"] > 0).all()


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
@pytest.mark.fault
def test_missing_column_is_named(synthetic_candles: pd.DataFrame, column: str) -> None:
    with pytest.raises(ValueError, match=rf"missing column\(s\) \['{column}'\]"):
        MANAGER.generate_features(synthetic_candles.drop(columns=column))


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        ("close", 60, np.nan, r"'close' must be finite, > 0 and at most 1e\+100; row 60"),
        ("low", 7, 0.0, r"'low' must be finite, > 0 and at most 1e\+100; row 7"),
        ("volume", 99, -1.0, r"'volume' must be finite, >= 0 and at most 1e\+100; row 99"),
        ("high", 3, np.inf, r"'high' must be finite, > 0 and at most 1e\+100; row 3"),
        # Found by the thorough Hypothesis profile: a square of 1e300 overflows the 20-bar variance into NaN features.
        ("close", 30, 1e300, r"'close' must be finite, > 0 and at most 1e\+100; row 30 is 1e\+300"),
    ],
)
@pytest.mark.fault
def test_invalid_value_is_located(
    synthetic_candles: pd.DataFrame, column: str, row: int, value: float, message: str
) -> None:
    candles = synthetic_candles.copy()
    candles.loc[row, column] = value
    with pytest.raises(ValueError, match=message):
        MANAGER.generate_features(candles)


@pytest.mark.fault
def test_unordered_and_naive_timestamps_are_rejected(synthetic_candles: pd.DataFrame) -> None:
    swapped = synthetic_candles.copy()
    swapped.loc[[10, 11], "timestamp"] = swapped.loc[[11, 10], "timestamp"].to_numpy()
    with pytest.raises(ValueError, match="strictly increasing; row 11"):
        MANAGER.generate_features(swapped)
    naive = synthetic_candles.assign(timestamp=synthetic_candles["timestamp"].dt.tz_localize(None))
    with pytest.raises(ValueError, match="tz-aware"):
        MANAGER.generate_features(naive)


@pytest.mark.fault
def test_too_few_candles_for_one_row(synthetic_candles: pd.DataFrame) -> None:
    warmup = MANAGER.warmup_rows
    assert len(MANAGER.generate_features(synthetic_candles.iloc[: warmup + 1])) == 1
    with pytest.raises(ValueError, match=f"at least {warmup + 1} candles.*got {warmup}"):
        MANAGER.generate_features(synthetic_candles.iloc[:warmup])


@pytest.mark.parametrize("how", ["removed", "altered"])
def test_no_lookahead(synthetic_candles: pd.DataFrame, how: str) -> None:
    candles = synthetic_candles.iloc[:600]
    full = MANAGER.generate_features(candles)
    rng = np.random.default_rng(11)
    for cutoff in (MANAGER.warmup_rows, MANAGER.warmup_rows + 1, 137, 300, len(candles) - 2):
        if how == "removed":
            changed = candles.iloc[: cutoff + 1]
        else:
            price_factors, volume_factors = np.ones((2, len(candles)))
            future_rows = len(candles) - cutoff - 1
            price_factors[cutoff + 1 :], volume_factors[cutoff + 1 :] = rng.uniform(0.5, 2.0, (2, future_rows))
            changed = candles.assign(
                **{name: candles[name] * price_factors for name in ("open", "high", "low", "close")},
                volume=candles["volume"] * volume_factors,
            )
        past = MANAGER.generate_features(changed).loc[: candles["timestamp"].iloc[cutoff]]
        expected = full.loc[: candles["timestamp"].iloc[cutoff]]
        # Rolling sums are grouped in blocks counted from the first row, so dropping the future can move the last
        # rows' float rounding by ~1e-16; anything that reads the future would differ by orders of magnitude more.
        pd.testing.assert_frame_equal(past, expected, check_exact=False, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_rows", [1, 3])
def test_live_path_equals_batch(n_rows: int) -> None:
    """Adversarial start: prices fall 5x just inside the live window, so its seeds are far from the batch state."""
    candles = make_candles(LIVE_WINDOW + 700, seed=5)
    window_start = len(candles) - (LIVE_WINDOW + n_rows - 1)
    candles.loc[: window_start + 2, ["open", "high", "low", "close"]] *= 5.0
    batch = MANAGER.generate_features(candles)
    live = MANAGER.generate_latest(candles, n_rows=n_rows)
    assert live.index.equals(batch.index[-n_rows:])
    for feature in FEATURE_NAMES:
        difference = max_relative_difference(live[feature], batch[feature].iloc[-n_rows:], scale_from=batch[feature])
        assert difference <= LIVE_RTOL, f"{feature}: live differs from batch by {difference:.3g}"


@pytest.mark.parametrize("n_rows", [1, 5])
@pytest.mark.fault
def test_live_path_refuses_short_history(synthetic_candles: pd.DataFrame, n_rows: int) -> None:
    needed = LIVE_WINDOW + n_rows - 1
    with pytest.raises(ValueError, match=rf"needs the last {needed} candles.*got {needed - 1}"):
        MANAGER.generate_latest(synthetic_candles.iloc[: needed - 1], n_rows=n_rows)
    with pytest.raises(ValueError, match="n_rows must be >= 1"):
        MANAGER.generate_latest(synthetic_candles, n_rows=0)


def flat_candles(n_rows: int, price: float) -> pd.DataFrame:
    """A market that never trades: every price equal, no volume."""
    return pd.DataFrame(
        {
            "timestamp": pd.date_range("2021-01-01", periods=n_rows, freq="15min", tz="UTC"),
            **{name: np.full(n_rows, price) for name in ("open", "high", "low", "close")},
            "volume": np.zeros(n_rows),
        }
    )


def assert_flat_market_values(rows: pd.DataFrame) -> None:
    assert np.isfinite(rows.to_numpy()).all()
    assert (rows["rsi_14"] == 50.0).all()
    assert (rows["bb_position"] == 0.5).all()
    assert (rows["zscore"] == 0.0).all()
    assert (rows["volume_ratio"] == 1.0).all()
    assert (rows["returns_1"] == 0.0).all()


@pytest.mark.parametrize("price", [0.1 + 0.2, 123.456789, 1.2e7])
def test_flat_market_gives_documented_values(price: float) -> None:
    result = MANAGER.generate_features(flat_candles(300, price))
    assert_flat_market_values(result)
    assert (result["atr_14"] == 0.0).all()
    np.testing.assert_allclose(result[["ema_20", "ema_50"]], price, rtol=1e-15)
    np.testing.assert_allclose(result[["macd", "macd_signal"]], 0.0, atol=1e-15 * price)


def test_flat_stretch_after_a_moving_market(synthetic_candles: pd.DataFrame) -> None:
    """Zero-variance windows inside real history: the documented values once the stretch fills every window."""
    moving = synthetic_candles.iloc[:500]
    stretch = flat_candles(400, float(moving["close"].iloc[-1]))
    stretch["timestamp"] = moving["timestamp"].iloc[-1] + pd.to_timedelta(np.arange(1, 401), unit="h")
    result = MANAGER.generate_features(pd.concat([moving, stretch], ignore_index=True))
    assert np.isfinite(result.to_numpy()).all()
    assert_flat_market_values(result.iloc[-50:])


def test_numerically_flat_window_counts_as_flat() -> None:
    """Prices one float step apart: a std of ~1e-16 of the price is rounding noise, not a market move."""
    candles = flat_candles(300, 1.2e7)
    jitter = np.nextafter(1.2e7, np.inf)
    for name in ("open", "high", "low", "close"):
        candles.loc[1::2, name] = jitter
    result = MANAGER.generate_features(candles)
    assert (result["bb_position"] == 0.5).all()
    assert (result["zscore"] == 0.0).all()


def test_zscore_is_exact_at_high_price_levels() -> None:
    """At BTC/JPY levels (~1e7) with moves of a few yen, E[x^2] - E[x]^2 loses digits (TA-Lib: ~3e-7 off); not here."""
    close = 1.2e7 + np.cumsum(np.random.default_rng(3).normal(0.0, 3.0, 2_000))
    candles = flat_candles(len(close), 1.0).assign(**{name: close for name in ("open", "high", "low", "close")})
    # The reference is shift-invariant, so compute it on close - 1.2e7 (exact: Sterbenz) to keep all its digits.
    windows = np.lib.stride_tricks.sliding_window_view(close - 1.2e7, 20)
    exact = (windows[:, -1] - windows.mean(axis=1)) / windows.std(axis=1)
    ours = MANAGER.generate_features(candles)["zscore"]
    expected = pd.Series(exact[MANAGER.warmup_rows - 19 :])
    assert max_relative_difference(ours.reset_index(drop=True), expected) <= LIVE_RTOL


@st.composite
def candle_frames(draw: st.DrawFn) -> pd.DataFrame:
    """Valid candles with long flat stretches and idle bars: most moves, wicks and volumes are drawn as 0."""
    n_rows = draw(st.integers(MANAGER.warmup_rows + 1, 250))
    log_moves = draw(hnp.arrays(np.float64, n_rows, elements=st.floats(-0.5, 0.5), fill=st.just(0.0)))
    wicks = draw(hnp.arrays(np.float64, (2, n_rows), elements=st.floats(0.0, 0.9), fill=st.just(0.0)))
    volume = draw(hnp.arrays(np.float64, n_rows, elements=st.floats(0.0, 1e9), fill=st.just(0.0)))
    start_price = draw(st.floats(1e-6, 1e9))
    close = start_price * np.exp(np.cumsum(log_moves))
    open_ = np.concatenate(([start_price], close[:-1]))
    return pd.DataFrame(
        {
            "timestamp": pd.date_range("2022-01-01", periods=n_rows, freq="min", tz="UTC"),
            "open": open_,
            "high": np.maximum(open_, close) * (1.0 + wicks[0]),
            "low": np.minimum(open_, close) * (1.0 - wicks[1]),
            "close": close,
            "volume": volume,
        }
    )


@given(candles=candle_frames())
def test_features_are_finite_and_in_range(candles: pd.DataFrame) -> None:
    result = MANAGER.generate_features(candles)
    assert np.isfinite(result.to_numpy()).all()
    assert result["rsi_14"].between(0.0, 100.0).all()
    assert (result[["atr_14", "volume_ratio"]] >= 0.0).all().all()


def test_spec_hash_is_stable() -> None:
    first = FeatureManager().spec_hash()
    assert first == FeatureManager().spec_hash() == MANAGER.spec_hash()
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64


@pytest.mark.parametrize(("feature", "name"), [("rsi_14", "period"), ("ema_50", "period"), ("bb_position", "n_std")])
def test_spec_hash_and_features_follow_parameters(
    monkeypatch: pytest.MonkeyPatch, synthetic_candles: pd.DataFrame, feature: str, name: str
) -> None:
    before_hash, before = MANAGER.spec_hash(), MANAGER.generate_features(synthetic_candles)
    monkeypatch.setitem(FEATURE_PARAMS[feature], name, FEATURE_PARAMS[feature][name] + 1)
    after = MANAGER.generate_features(synthetic_candles)
    assert MANAGER.spec_hash() != before_hash
    common = after.index.intersection(before.index)
    assert not np.allclose(after.loc[common, feature], before.loc[common, feature])
