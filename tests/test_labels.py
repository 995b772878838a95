"""Labels, feature/label alignment and purged chronological splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryptoml.labels import align, build_dataset, holdout_split, make_labels, walk_forward_splits

HOUR = pd.Timedelta(hours=1)


def hourly_index(n_rows: int, start: str = "2024-01-01") -> pd.DatetimeIndex:
    return pd.date_range(start, periods=n_rows, freq="h", tz="UTC", name="timestamp")


def random_walk_close(n_rows: int, seed: int = 0) -> pd.Series:
    log_returns = np.random.default_rng(seed).normal(0.0, 0.005, n_rows)
    return pd.Series(1e7 * np.exp(np.cumsum(log_returns)), index=hourly_index(n_rows), name="close")


# --- make_labels -------------------------------------------------------------------------------


def test_label_needs_a_return_strictly_above_the_threshold() -> None:
    # Powers of two keep the returns exact: 4 -> 5 is exactly +25 %, 4 -> 6 is +50 %.
    close = pd.Series([4.0, 5.0, 4.0, 6.0, 4.0], index=hourly_index(5))
    labels = make_labels(close, horizon=1, threshold=0.25)
    assert labels.tolist() == [0, 0, 1, 0]


def test_label_looks_horizon_bars_ahead() -> None:
    close = pd.Series([1.0, 2.0, 4.0, 1.0, 8.0], index=hourly_index(5))
    labels = make_labels(close, horizon=2, threshold=0.0)
    # 1 -> 4 up, 2 -> 1 down, 4 -> 8 up; the last two bars have no price two bars ahead.
    assert labels.tolist() == [1, 0, 1]
    assert labels.index.equals(close.index[:3])


@pytest.mark.parametrize("horizon", [1, 3, 12])
def test_labels_drop_the_tail_and_match_the_forward_return(horizon: int) -> None:
    close = random_walk_close(500)
    threshold = 0.003
    labels = make_labels(close, horizon, threshold)
    prices = close.to_numpy()
    expected = (prices[horizon:] / prices[:-horizon] - 1.0 > threshold).astype(int)
    assert labels.index.equals(close.index[:-horizon])
    assert labels.dtype == np.int64
    assert not labels.isna().any()
    np.testing.assert_array_equal(labels.to_numpy(), expected)
    assert 0 < labels.sum() < len(labels), "a random walk should give both labels"


@pytest.mark.parametrize(
    ("close", "horizon", "message"),
    [
        (pd.Series([1.0, 2.0], index=hourly_index(2)), 0, "label.horizon"),
        (pd.Series([1.0, np.nan, 2.0], index=hourly_index(3)), 1, "NaN"),
        (pd.Series([1.0, 0.0, 2.0], index=hourly_index(3)), 1, "positive"),
        (pd.Series([1.0, 2.0], index=hourly_index(2)[::-1]), 1, "increasing"),
    ],
)
@pytest.mark.fault
def test_make_labels_rejects_bad_input(close: pd.Series, horizon: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_labels(close, horizon)


@pytest.mark.fault
def test_make_labels_rejects_a_nan_threshold() -> None:
    with pytest.raises(ValueError, match="label.threshold must be a finite return"):
        make_labels(random_walk_close(10), threshold=float("nan"))


# --- align / build_dataset --------------------------------------------------------------------


def test_dataset_keeps_rows_with_both_features_and_a_label() -> None:
    close = random_walk_close(100)
    warm_up, horizon = 10, 3
    features = pd.DataFrame({"close": close, "double": 2 * close}).iloc[warm_up:]
    X, y = build_dataset(features, close, horizon=horizon, threshold=0.0)
    assert X.index.equals(close.index[warm_up:-horizon])
    assert y.index.equals(X.index)
    assert list(X.columns) == ["close", "double"]


def test_align_names_the_nan_feature_column() -> None:
    index = hourly_index(5)
    features = pd.DataFrame({"rsi_14": [np.nan, 1.0, 2.0, 3.0, 4.0], "ema_20": 1.0}, index=index)
    labels = pd.Series(0, index=index)
    with pytest.raises(ValueError, match=r"'rsi_14' is NaN at 2024-01-01 00:00:00\+00:00"):
        align(features, labels)


@pytest.mark.fault
def test_align_refuses_frames_without_common_timestamps() -> None:
    features = pd.DataFrame({"close": 1.0}, index=hourly_index(5))
    labels = pd.Series(0, index=hourly_index(5, start="2025-01-01"))
    with pytest.raises(ValueError, match="share no timestamp"):
        align(features, labels)


# --- holdout_split ----------------------------------------------------------------------------


@given(
    n_rows=st.integers(20, 400),
    fraction=st.floats(0.05, 0.6),
    horizon=st.integers(1, 12),
    embargo=st.integers(0, 30),
)
def test_holdout_split_purges_horizon_plus_embargo_rows(n_rows: int, fraction: float, horizon: int, embargo: int) -> None:
    index = hourly_index(n_rows)
    n_holdout = round(n_rows * fraction)
    if n_holdout < 1 or n_rows - n_holdout - horizon - embargo < 1:
        with pytest.raises(ValueError, match="split.holdout"):
            holdout_split(index, fraction, horizon, embargo)
        return
    split = holdout_split(index, fraction, horizon, embargo)
    np.testing.assert_array_equal(split.holdout, np.arange(n_rows - n_holdout, n_rows))
    np.testing.assert_array_equal(split.train, np.arange(split.train_stop))
    # The label of the last training row ends `horizon` rows later; `embargo` more rows follow it.
    last_label_end = split.train[-1] + horizon
    assert split.holdout[0] - last_label_end - 1 == embargo
    assert split.purged_rows == horizon + embargo
    assert (split.train_end_time, split.holdout_start_time) == (index[split.train[-1]], index[split.holdout[0]])


def test_holdout_duration_counts_time_not_rows() -> None:
    full = hourly_index(1000)
    # Ten missing candles inside the last ten days: a duration still means ten days, not 240 rows.
    index = full.delete(range(900, 910))
    split = holdout_split(index, pd.Timedelta("10D"), horizon=1, embargo=24)
    assert split.holdout_end_time == full[-1]
    assert split.holdout_start_time == full[-1] - pd.Timedelta("10D") + HOUR
    assert len(split.holdout) == 240 - 10
    assert split.train_end_time == index[split.holdout[0] - 1 - 24 - 1]


def test_holdout_fraction_rounds_to_whole_rows() -> None:
    split = holdout_split(hourly_index(1000), 0.2, horizon=1, embargo=0)
    assert len(split.holdout) == 200
    assert len(split.train) == 1000 - 200 - 1


@pytest.mark.parametrize(
    ("holdout", "horizon", "embargo", "message"),
    [
        (0.001, 1, 0, r"split.holdout=0.001 selects no row of the 100"),
        (1.0, 1, 0, r"split.holdout must be a fraction in \(0, 1\)"),
        (0.0, 1, 0, r"split.holdout must be a fraction in \(0, 1\)"),
        (pd.Timedelta("30D"), 1, 0, r"covers all 100 labelled rows"),
        (pd.Timedelta("-1D"), 1, 0, r"split.holdout must be a positive duration"),
        (0.5, 20, 30, r"label.horizon=20 \+ split.embargo=30"),
        (0.5, 1, -1, r"split.embargo must be a non-negative"),
    ],
)
@pytest.mark.fault
def test_holdout_split_errors_name_the_parameter(
    holdout: float | pd.Timedelta, horizon: int, embargo: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        holdout_split(hourly_index(100), holdout, horizon, embargo)


@pytest.mark.fault
def test_holdout_split_refuses_an_empty_dataset() -> None:
    with pytest.raises(ValueError, match="no labelled rows"):
        holdout_split(hourly_index(0), 0.2, horizon=1, embargo=0)


# --- walk_forward_splits ----------------------------------------------------------------------


@given(
    n_rows=st.integers(30, 600),
    n_splits=st.integers(2, 8),
    horizon=st.integers(1, 6),
    embargo=st.integers(0, 24),
)
def test_walk_forward_folds_are_chronological_and_purged(n_rows: int, n_splits: int, horizon: int, embargo: int) -> None:
    fold_size = n_rows // (n_splits + 1)
    if fold_size < 1 or n_rows - n_splits * fold_size - horizon - embargo < 1:
        with pytest.raises(ValueError, match="cv.n_splits"):
            walk_forward_splits(n_rows, n_splits, horizon, embargo)
        return
    folds = walk_forward_splits(n_rows, n_splits, horizon, embargo)
    assert len(folds) == n_splits
    previous_val_end = -1
    for train, val in folds:
        np.testing.assert_array_equal(train, np.arange(len(train)))  # expanding window from the start
        np.testing.assert_array_equal(val, np.arange(val[0], val[0] + len(val)))  # one contiguous block
        assert len(val) == fold_size
        assert val[0] > previous_val_end  # validation blocks move forward in time without overlap
        # No training label reaches into validation, and `embargo` rows separate them.
        assert val[0] - (train[-1] + horizon) - 1 == embargo
        previous_val_end = val[-1]
    assert previous_val_end == n_rows - 1


def test_no_training_label_sees_a_validation_price() -> None:
    """End to end on timestamps: a label's last price is earlier than every validation row."""
    horizon, embargo, warm_up = 4, 6, 30
    close = random_walk_close(400)
    features = pd.DataFrame({"close": close}).iloc[warm_up:]
    X, _ = build_dataset(features, close, horizon=horizon, threshold=0.0)
    split = holdout_split(X.index, 0.25, horizon, embargo)
    evaluations = [(split.train, split.holdout)]
    evaluations += walk_forward_splits(len(split.train), 3, horizon, embargo)
    for train, val in evaluations:
        last_price_used = close.index.get_loc(X.index[train[-1]]) + horizon
        first_evaluated = close.index.get_loc(X.index[val[0]])
        assert first_evaluated - last_price_used > embargo


@pytest.mark.fault
def test_walk_forward_rejects_too_few_rows() -> None:
    with pytest.raises(ValueError, match=r"cv.n_splits=5 .* label.horizon=1 \+ split.embargo=24"):
        walk_forward_splits(40, n_splits=5, horizon=1, embargo=24)


def test_walk_forward_needs_two_folds() -> None:
    with pytest.raises(ValueError, match="cv.n_splits must be at least 2"):
        walk_forward_splits(100, n_splits=1, horizon=1, embargo=0)
