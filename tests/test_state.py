"""FeatureState: the batch's values one candle at a time (bit-identical from the same first candle, 1e-9 once ready),
TA-Lib as the oracle, the order policy, closed candles only, and a process without pandas or numba."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.features.manager import FEATURE_NAMES, FEATURE_PARAMS, LIVE_WINDOW, FeatureManager
from cryptoml.features.state import DUPLICATE, GAP, NOT_CLOSED, OFF_GRID, OLDER, Candle, CandleSequenceError, FeatureState
from tests.test_features import (
    ORACLE_RTOL,
    candle_frames,
    flat_candles,
    make_candles,
    max_relative_difference,
    talib_features,
)

MANAGER = FeatureManager()
WARMUP = MANAGER.warmup_rows
HOUR_MS = 3_600_000
REAL_1H = "BTC_USDT_1h_2017-08-17_2020-02-01.csv"
REAL_15M = "BTC_USDT_15m_2021-09-02_2021-12-02.csv"

# A ready state against the batch over the whole history: |state - batch| <= STATE_TOLERANCE * scale, where scale is
# the candle's close for the price-valued features (their float rounding and the decayed seeds are fractions of the
# price level, and macd / atr are small differences of price-sized terms: one float step of a 1e7 price is 2e-9,
# so an absolute 1e-9 would be below float resolution), the candle's volume for volume, and 1 for the dimensionless
# features (returns_1, rsi_14 in 0..100, bb_position, zscore, volume_ratio), which are judged absolutely.
STATE_TOLERANCE = 1e-9
PRICE_VALUED = ("close", "macd", "macd_signal", "atr_14", "ema_20", "ema_50")


def epoch_ms(timestamps: pd.Series) -> np.ndarray:
    return ((timestamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")).to_numpy()


def candle_rows(candles: pd.DataFrame) -> list[Candle]:
    """The candles as FeatureState takes them: (timestamp_ms, high, low, close, volume) tuples."""
    columns = [candles[name].to_numpy().tolist() for name in ("high", "low", "close", "volume")]
    return list(zip(epoch_ms(candles["timestamp"]).tolist(), *columns, strict=True))


def timeframe_ms(candles: pd.DataFrame) -> int:
    return int(epoch_ms(candles["timestamp"].iloc[:2])[1] - epoch_ms(candles["timestamp"].iloc[:1])[0])


def state_rows(candles: pd.DataFrame, seed_rows: int) -> np.ndarray:
    """The features of rows seed_rows - 1.. : the state seeded with the first seed_rows candles, then updated."""
    rows = candle_rows(candles)
    state = FeatureState.seed(rows[:seed_rows], timeframe_ms(candles))
    return np.array([state.features, *(state.update(row) for row in rows[seed_rows:])])


def scales(candles: pd.DataFrame) -> np.ndarray:
    """Per row and feature, what a difference from the batch is measured against (STATE_TOLERANCE)."""
    close, volume = candles["close"].to_numpy(), candles["volume"].to_numpy()
    columns = {name: close if name in PRICE_VALUED else np.ones(len(candles)) for name in FEATURE_NAMES}
    return np.column_stack([volume if name == "volume" else columns[name] for name in FEATURE_NAMES])


def assert_within_tolerance(rows: np.ndarray, batch: pd.DataFrame, candles: pd.DataFrame) -> None:
    """rows are the state's features of the last len(rows) candles; batch is generate_features of all of them."""
    difference = np.abs(rows - batch.to_numpy()[-len(rows) :])
    outside = ~(difference <= STATE_TOLERANCE * scales(candles.iloc[-len(rows) :]))
    assert not outside.any(), {FEATURE_NAMES[feature]: (row, difference[row, feature]) for row, feature in np.argwhere(outside)[:5]}


def flat_after_moving(moving: pd.DataFrame) -> pd.DataFrame:
    stretch = flat_candles(400, float(moving["close"].iloc[-1]))
    stretch["timestamp"] = moving["timestamp"].iloc[-1] + pd.to_timedelta(np.arange(1, 401), unit="h")
    return pd.concat([moving, stretch], ignore_index=True)


def synthetic(hours: int, seed: int = 7) -> pd.DataFrame:
    """The pipeline's synthetic source: 1h BTC/JPY-like candles around 1e7, prices in whole yen."""
    start = pd.Timestamp("2022-01-01", tz="UTC")
    return simulate_candles(start, start + pd.Timedelta(hours=hours), "1h", seed)


CANDLE_SETS = {
    "random walk": lambda: make_candles(3_000, seed=7),
    "synthetic source": lambda: synthetic(3_000),
    "flat market": lambda: flat_candles(300, 1.2e7),
    "flat stretch after a moving market": lambda: flat_after_moving(make_candles(500, seed=7)),
}


@pytest.mark.parametrize("name", CANDLE_SETS)
def test_rows_are_bit_identical_to_the_batch_from_the_same_first_candle(name: str) -> None:
    """Same kernels, same operations in the same order: the state is the batch, interpreted."""
    candles = CANDLE_SETS[name]()
    rows = state_rows(candles, WARMUP + 1)
    batch = MANAGER.generate_features(candles).to_numpy()
    assert rows.shape == batch.shape
    assert np.array_equal(rows, batch), f"rows differ from the batch: first at {np.argwhere(rows != batch)[0]}"


@given(candles=candle_frames())
def test_any_valid_candles_give_the_batch_rows(candles: pd.DataFrame) -> None:
    """Long flat stretches and idle bars included (the strategy of the batch's own property test)."""
    assert np.array_equal(state_rows(candles, WARMUP + 1), MANAGER.generate_features(candles).to_numpy())


@pytest.mark.parametrize(
    ("feature", "name", "value"),
    [("bb_position", "period", 21), ("bb_position", "n_std", 3.0), ("rsi_14", "period", 9), ("macd", "slow", 30)],
)
def test_the_state_follows_the_parameters_as_the_batch_does(
    monkeypatch: pytest.MonkeyPatch, feature: str, name: str, value: float
) -> None:
    """bb_position on 21 bars keeps its own window apart from zscore's 20; parameters are read at seeding."""
    candles = make_candles(600, seed=3)
    monkeypatch.setitem(FEATURE_PARAMS[feature], name, value)
    warmup = MANAGER.warmup_rows
    changed = state_rows(candles, warmup + 1)
    assert np.array_equal(changed, MANAGER.generate_features(candles).to_numpy())
    monkeypatch.undo()
    assert not np.array_equal(changed[-100:], state_rows(candles, WARMUP + 1)[-100:])


def test_a_state_seeded_with_live_window_candles_gives_generate_latests_row() -> None:
    candles = synthetic(LIVE_WINDOW + 200)
    window = candles.iloc[-LIVE_WINDOW:]
    state = FeatureState.seed(candle_rows(window), HOUR_MS)
    assert state.ready
    assert np.array_equal(state.features, MANAGER.generate_latest(candles).to_numpy()[0])


def test_ten_thousand_updates_after_a_late_seed_equal_the_batch_over_the_whole_history() -> None:
    """Adversarial start, as for generate_latest: prices fall 5x at the seed, so its seeds are far from the batch's;
    and the seed is not a whole number of 20-bar blocks into the history, so the rolling sums are grouped apart."""
    history, updates = 707, 10_000
    candles = synthetic(history + LIVE_WINDOW + updates)
    candles.loc[: history + 2, ["open", "high", "low", "close"]] *= 5.0
    batch = MANAGER.generate_features(candles)
    seeded_from = candles.iloc[history:]
    rows = state_rows(seeded_from, LIVE_WINDOW)
    assert len(rows) == updates + 1
    assert_within_tolerance(rows, batch, candles)


def bot_walk(candles: pd.DataFrame, timeframe: int) -> Iterator[tuple[np.ndarray, bool]]:
    """A bot's loop over a history: seed from its first LIVE_WINDOW candles, update with each next one, and on a gap
    re-seed from the last LIVE_WINDOW candles up to the new one, as it would from the exchange's history.
    Yields the features of every candle after the first LIVE_WINDOW - 1, and whether it came from a re-seed."""
    rows = candle_rows(candles)
    state = FeatureState.seed(rows[:LIVE_WINDOW], timeframe)
    yield state.features, False
    for end, row in enumerate(rows[LIVE_WINDOW:], start=LIVE_WINDOW + 1):
        try:
            yield state.update(row), False
        except CandleSequenceError as refused:
            assert refused.kind == GAP, refused
            state = FeatureState.seed(rows[end - LIVE_WINDOW : end], timeframe)
            yield state.features, True
        assert state.ready


@pytest.fixture(scope="module", params=[(REAL_1H, HOUR_MS), (REAL_15M, HOUR_MS // 4)], ids=["1h", "15m"])
def real_walk(request: pytest.FixtureRequest, shared_data: Path) -> tuple[pd.DataFrame, np.ndarray, int]:
    """Real candles (with gaps), the bot's feature rows over them, and how many gaps made it re-seed."""
    name, timeframe = request.param
    candles = pd.read_csv(shared_data / name).assign(timestamp=lambda frame: pd.to_datetime(frame["timestamp"], utc=True))
    walked = list(bot_walk(candles, timeframe))
    return candles, np.array([row for row, _ in walked]), sum(reseeded for _, reseeded in walked)


def test_a_bots_walk_over_real_candles_equals_the_batch(real_walk: tuple[pd.DataFrame, np.ndarray, int]) -> None:
    """Every update of the real files (20,410 on the 1h one), gaps handled by re-seeding; the batch reads the whole
    file, gaps as consecutive rows, as the exchange's history does."""
    candles, rows, reseeds = real_walk
    steps = np.diff(epoch_ms(candles["timestamp"]))
    assert reseeds == np.count_nonzero(steps[LIVE_WINDOW - 1 :] > steps.min())
    assert len(rows) == len(candles) - LIVE_WINDOW + 1
    assert_within_tolerance(rows, MANAGER.generate_features(candles), candles)


def assert_matches_talib(candles: pd.DataFrame, rows: np.ndarray, feature: str) -> None:
    """The rule of tests/test_features.py: the state's rows (the last len(rows) candles) against TA-Lib's."""
    oracle = talib_features(candles)[feature].iloc[-len(rows) :]
    ours = pd.Series(rows[:, FEATURE_NAMES.index(feature)], index=oracle.index)
    difference = max_relative_difference(ours, oracle)
    assert difference <= ORACLE_RTOL, f"{feature}: max relative difference to TA-Lib {difference:.3g}"


@pytest.mark.parametrize("feature", FEATURE_NAMES)
def test_the_states_features_match_talib_on_synthetic_candles(feature: str) -> None:
    candles = make_candles(5_000, seed=7)
    assert_matches_talib(candles, state_rows(candles, WARMUP + 1), feature)


@pytest.mark.parametrize("feature", FEATURE_NAMES)
def test_the_states_features_match_talib_on_real_candles(real_walk: tuple[pd.DataFrame, np.ndarray, int], feature: str) -> None:
    candles, rows, _ = real_walk
    assert_matches_talib(candles, rows, feature)


# --- the order policy, closed candles, input ----------------------------------------------------------------------


@pytest.fixture
def history() -> list[Candle]:
    return candle_rows(make_candles(400, seed=11))


@pytest.mark.parametrize(
    ("kind", "offset_ms", "message"),
    [
        (DUPLICATE, 0, "is a duplicate of the last candle"),
        (OLDER, -HOUR_MS, "is older than the last candle"),
        (GAP, 2 * HOUR_MS, r"leaves a gap of 1 candle\(s\) after the last candle, .*: re-seed"),
        (GAP, 25 * HOUR_MS, r"leaves a gap of 24 candle\(s\)"),
        (OFF_GRID, HOUR_MS + 1, "is off the grid of 3600000 ms candles"),
    ],
)
@pytest.mark.fault
def test_a_candle_that_is_not_the_next_one_is_refused_and_changes_nothing(
    history: list[Candle], kind: str, offset_ms: int, message: str
) -> None:
    state = FeatureState.seed(history[:300], HOUR_MS)
    before = state.features
    last = state.last_timestamp
    wrong = (last + offset_ms, *history[300][1:])
    with pytest.raises(CandleSequenceError, match=message) as refused:
        state.update(wrong)
    assert (refused.value.kind, refused.value.timestamp_ms) == (kind, last + offset_ms)
    assert state.last_timestamp == last and np.array_equal(state.features, before)
    fresh = FeatureState.seed(history[:300], HOUR_MS)
    assert np.array_equal(state.update(history[300]), fresh.update(history[300]))


@pytest.mark.fault
def test_a_candle_still_forming_is_refused_until_it_closes(history: list[Candle]) -> None:
    state = FeatureState.seed(history[:300], HOUR_MS)
    opens = history[300][0]
    with pytest.raises(CandleSequenceError, match="is not closed at .*: it closes at") as refused:
        state.update(history[300], now_ms=opens + HOUR_MS - 1)
    assert refused.value.kind == NOT_CLOSED and state.last_timestamp == history[299][0]
    state.update(history[300], now_ms=opens + HOUR_MS)
    assert state.last_timestamp == opens


def test_seeding_leaves_out_the_candle_still_forming(history: list[Candle]) -> None:
    """ccxt's fetch_ohlcv ends with the candle still forming: the seed uses the closed ones."""
    forming = FeatureState.seed(history[:301], HOUR_MS, now_ms=history[300][0] + 1)
    closed = FeatureState.seed(history[:300], HOUR_MS)
    assert forming.last_timestamp == closed.last_timestamp == history[299][0]
    assert np.array_equal(forming.features, closed.features)


@pytest.mark.fault
def test_seeding_refuses_candles_from_the_future_disorder_and_short_histories(
    history: list[Candle],
) -> None:
    with pytest.raises(CandleSequenceError, match="is not closed") as refused:
        FeatureState.seed(history[:300], HOUR_MS, now_ms=history[298][0] + 1)
    assert refused.value.kind == NOT_CLOSED
    with pytest.raises(CandleSequenceError, match="is older than the last candle"):
        FeatureState.seed([*history[:100], history[50], *history[100:200]], HOUR_MS)
    with pytest.raises(CandleSequenceError, match="is a duplicate"):
        FeatureState.seed([*history[:100], *history[99:200]], HOUR_MS)
    with pytest.raises(ValueError, match=f"seeding needs {WARMUP + 1} closed candles .*; got {WARMUP}"):
        FeatureState.seed(history[:WARMUP], HOUR_MS)
    with pytest.raises(ValueError, match=f"got {WARMUP}"):
        FeatureState.seed(history[: WARMUP + 1], HOUR_MS, now_ms=history[WARMUP][0] + 1)


def test_seeding_reads_a_history_with_gaps_as_the_batch_does(
    history: list[Candle], caplog: pytest.LogCaptureFixture
) -> None:
    with_gap = history[:150] + history[153:]
    state = FeatureState.seed(with_gap, HOUR_MS)
    assert "seed history has 3 missing candle(s)" in caplog.text
    candles = pd.DataFrame(with_gap, columns=["timestamp", "high", "low", "close", "volume"])
    assert np.array_equal(state.features, MANAGER.generate_features(candles).to_numpy()[-1])


def test_ready_once_live_window_candles_were_seen() -> None:
    candles = candle_rows(make_candles(LIVE_WINDOW + 1, seed=11))
    state = FeatureState.seed(candles[: WARMUP + 1], HOUR_MS)
    for row in candles[WARMUP + 1 : LIVE_WINDOW]:
        assert not state.ready
        state.update(row)
    assert state.ready


def test_ccxt_rows_and_arrays_are_taken_as_they_are(history: list[Candle]) -> None:
    """ccxt's [ms, open, high, low, close, volume] (the open is not used), and 2-D arrays of either layout."""
    ccxt = [[timestamp, 1.0, high, low, close, volume] for timestamp, high, low, close, volume in history]
    expected = FeatureState.seed(history[:300], HOUR_MS).update(history[300])
    for rows in (ccxt, np.array(history, dtype=np.float64), np.array(ccxt, dtype=np.float64)):
        state = FeatureState.seed(rows[:300], HOUR_MS)
        assert np.array_equal(state.update(rows[300]), expected)


@pytest.mark.parametrize(
    ("candle", "message"),
    [
        ((3_600_000, 2.0, 1.0, float("nan"), 1.0), r"'close' must be finite, > 0 and at most 1e\+100; got nan"),
        ((3_600_000, 2.0, 0.0, 1.5, 1.0), r"'low' must be finite, > 0 and at most 1e\+100; got 0.0"),
        ((3_600_000, float("inf"), 1.0, 1.5, 1.0), r"'high' must be finite, > 0 and at most 1e\+100; got inf"),
        ((3_600_000, 2.0, 1.0, 1.5, -1.0), r"'volume' must be finite, >= 0 and at most 1e\+100; got -1.0"),
        ((3_600_000, 2.0, 1.0, 1e300, 1.0), r"'close' must be finite, > 0 and at most 1e\+100; got 1e\+300"),
        ((3_600_000.5, 2.0, 1.0, 1.5, 1.0), "timestamp_ms must be whole epoch milliseconds"),
        ((3_600_000, 2.0, 1.0, 1.5), r"a candle has the fields .*; got 4"),
    ],
)
@pytest.mark.fault
def test_invalid_candles_are_refused_naming_the_field(candle: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureState.seed([candle] * (WARMUP + 1), HOUR_MS)


def test_the_returned_row_is_a_copy(history: list[Candle]) -> None:
    state = FeatureState.seed(history[:300], HOUR_MS)
    row = state.update(history[300])
    row[:] = -1.0
    assert row.dtype == np.float64 and row.shape == (len(FEATURE_NAMES),)
    assert (state.features != -1.0).all()


def test_an_empty_state_refuses_updates(history: list[Candle]) -> None:
    with pytest.raises(ValueError, match="empty: make one with FeatureState.seed"):
        FeatureState(HOUR_MS).update(history[0])


def test_the_state_imports_neither_pandas_nor_numba_nor_a_training_library() -> None:
    """What keeps a bot's process small (bench/state.py measures its peak RSS), checked in a fresh interpreter."""
    script = "import cryptoml.features.state, sys; print(sorted(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    imported = {name.split(".")[0] for name in ast.literal_eval(modules)}
    assert imported & {"pandas", "numba", "llvmlite", "sklearn", "lightgbm", "xgboost", "scipy"} == set()
    assert "cryptoml.features.manager" not in modules
