"""Labels, feature/label alignment and the purged walk-forward steps of the retrain policy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cryptoml.model.labels import STEP_ANCHOR, align, build_dataset, make_labels, walk_forward_steps

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


# --- walk_forward_steps --------------------------------------------------------------------------

WEEK = pd.Timedelta("7D")


def _expected_refusal(index: pd.DatetimeIndex, fraction: float, every: pd.Timedelta, warmup_steps: int, gap: int) -> str | None:
    """What walk_forward_steps must refuse for a gap-free hourly index, worked out by hand; None if nothing."""
    first_holdout = index[len(index) - round(len(index) * fraction)]
    span_start = STEP_ANCHOR + -((STEP_ANCHOR - first_holdout) // every) * every  # first boundary at or after it
    if span_start > index[-1]:
        return "holds no retrain.every=.* step boundary"
    first_row = max(0, -((index[0] - (span_start - warmup_steps * every)) // HOUR))  # first row of the first warm-up step
    if first_row - gap < 1:
        return "training rows"
    return None


@example(n_days=40, fraction=0.1015625, every_days=7, warmup_steps=1, horizon=1, embargo=0)  # issue 18: no boundary
@given(
    n_days=st.integers(40, 120),
    fraction=st.floats(0.1, 0.5),
    every_days=st.integers(1, 10),
    warmup_steps=st.integers(1, 3),
    horizon=st.integers(1, 12),
    embargo=st.integers(0, 30),
)
def test_walk_forward_steps_are_chronological_purged_and_calendar_anchored(
    n_days: int, fraction: float, every_days: int, warmup_steps: int, horizon: int, embargo: int
) -> None:
    """For every input: either the documented refusal (no step boundary in the span, no training row before the first
    warm-up step), or steps that are chronological, purged and anchored on the calendar."""
    index = hourly_index(n_days * 24, start="2024-01-03 05:00")
    every = pd.Timedelta(days=every_days)
    refusal = _expected_refusal(index, fraction, every, warmup_steps, horizon + embargo)
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            walk_forward_steps(index, fraction, every, warmup_steps, horizon, embargo)
        return
    steps = walk_forward_steps(index, fraction, every, warmup_steps, horizon, embargo)
    scored = [step for step in steps if step.scored]
    assert [step.number for step in steps] == list(range(1, len(steps) + 1))
    assert len(steps) - len(scored) == warmup_steps and not any(step.scored for step in steps[:warmup_steps])
    # Consecutive blocks that cover the rows from the first warm-up step to the last row.
    assert all(step.stop == following.start for step, following in zip(steps, steps[1:]))
    assert steps[-1].stop == len(index)
    for step in steps:
        # Each step trains on every earlier row but the purge gap: the last training label ends before the step.
        assert step.start - step.train_stop == horizon + embargo
        assert (step.train_stop - 1) + horizon < step.start
        # Every step but the last starts and ends on a multiple of `every` from the Unix epoch.
        assert (index[step.start] - STEP_ANCHOR) % every == pd.Timedelta(0)
        if step is not steps[-1]:
            assert index[step.stop - 1] + HOUR - index[step.start] == every
    # The span starts at the first step boundary at or after the holdout's first row.
    first_holdout = index[len(index) - round(len(index) * fraction)]
    assert first_holdout <= index[scored[0].start] < first_holdout + every


def test_a_holdout_without_a_step_boundary_is_refused_naming_the_keys() -> None:
    """Issue 18's failing example: the last 98 of 960 hourly rows start on a Thursday 03:00 and end the next Monday,
    so no weekly boundary (Thursdays 00:00 from the epoch) falls inside them."""
    index = hourly_index(40 * 24, start="2024-01-03 05:00")
    with pytest.raises(ValueError, match=r"split.holdout=0.1015625.*holds no retrain.every=7 days.*make split.holdout longer"):
        walk_forward_steps(index, 0.1015625, WEEK, 1, horizon=1, embargo=0)


def test_a_later_data_end_keeps_every_earlier_step() -> None:
    """A weekly retrain that only moves data.end repeats the steps both runs share: same rows, same training rows."""
    index = hourly_index(120 * 24)
    before = walk_forward_steps(index[: -7 * 24], pd.Timedelta("42D"), WEEK, 1, horizon=1, embargo=24)
    after = walk_forward_steps(index, pd.Timedelta("42D"), WEEK, 1, horizon=1, embargo=24)
    # The span moved a week: the steps of `before` from the first step of `after` on, but its cut-short last one.
    shared = {(step.start, step.stop, step.train_stop) for step in before[:-1] if step.start >= after[0].start}
    assert len(shared) == len(before) - 2
    assert shared <= {(step.start, step.stop, step.train_stop) for step in after}


def test_holdout_duration_counts_time_and_steps_skip_a_gap() -> None:
    full = hourly_index(100 * 24)
    # The whole 9th-to-last week is missing: that step has no rows and is left out, the others keep whole weeks.
    index = full[~((full >= "2024-03-11") & (full < "2024-03-18"))]
    steps = walk_forward_steps(index, pd.Timedelta("70D"), WEEK, 1, horizon=1, embargo=0)
    starts = [index[step.start] for step in steps]
    assert pd.Timestamp("2024-03-11", tz="UTC") not in starts
    assert pd.Timestamp("2024-03-18", tz="UTC") in starts
    assert index[steps[-1].stop - 1] == full[-1]


@pytest.mark.parametrize(
    ("holdout", "every", "warmup", "horizon", "embargo", "message"),
    [
        (0.0001, WEEK, 1, 1, 0, r"split.holdout=0.0001 selects 0 of the 2400"),
        (1.0, WEEK, 1, 1, 0, r"split.holdout must be a fraction in \(0, 1\)"),
        (pd.Timedelta("-1D"), WEEK, 1, 1, 0, r"split.holdout must be a positive duration"),
        (pd.Timedelta("2D"), pd.Timedelta("30D"), 1, 1, 0, r"holds no retrain.every=30 days .* step boundary"),
        (0.2, WEEK, 0, 1, 0, r"retrain.warmup_steps must be at least 1"),
        (0.2, pd.Timedelta(0), 1, 1, 0, r"retrain.every must be a positive duration"),
        (0.5, pd.Timedelta("30D"), 3, 1, 24, r"retrain.warmup_steps=3 the window needs more data"),
        (0.5, WEEK, 1, 1, -1, r"split.embargo must be a non-negative"),
    ],
)
@pytest.mark.fault
def test_walk_forward_errors_name_the_parameter(
    holdout: float | pd.Timedelta, every: pd.Timedelta, warmup: int, horizon: int, embargo: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        walk_forward_steps(hourly_index(100 * 24), holdout, every, warmup, horizon, embargo)


@pytest.mark.fault
def test_walk_forward_refuses_an_empty_dataset() -> None:
    with pytest.raises(ValueError, match="no labelled rows"):
        walk_forward_steps(hourly_index(0), 0.2, WEEK, 1, horizon=1, embargo=0)


def test_no_training_label_sees_a_predicted_price() -> None:
    """End to end on timestamps: a step's last training label uses a price earlier than every row it predicts."""
    horizon, embargo, warm_up = 4, 6, 30
    close = random_walk_close(60 * 24)
    features = pd.DataFrame({"close": close}).iloc[warm_up:]
    X, _ = build_dataset(features, close, horizon=horizon, threshold=0.0)
    for step in walk_forward_steps(X.index, 0.3, WEEK, 2, horizon, embargo):
        last_price_used = close.index.get_loc(X.index[step.train_stop - 1]) + horizon
        first_predicted = close.index.get_loc(X.index[step.start])
        assert first_predicted - last_price_used > embargo
