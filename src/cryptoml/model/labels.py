"""Labels and leakage-free chronological splits.

A label at bar t looks `horizon` bars into the future, so a training row whose horizon reaches into
the rows it is evaluated on leaks the answer. Every split here therefore leaves a purge gap of
`horizon + embargo` rows between the last training row and the first evaluated row: `horizon` rows
remove the overlapping labels, `embargo` more rows keep slowly decaying features (EMAs, rolling
windows) from carrying information across the boundary.

All gaps are counted in rows of the aligned (features, labels) frame. Labels are computed by
position on the full close series, so rows missing from the aligned frame only widen the real gap:
counting rows is never less strict than counting bars.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# The holdout is either the last fraction of the rows or the last stretch of time.
Holdout = float | pd.Timedelta


def _require_chronological(index: pd.Index, what: str) -> None:
    if not index.is_unique or not index.is_monotonic_increasing:
        raise ValueError(f"{what}: the index must be unique, strictly increasing timestamps")


def make_labels(close: pd.Series, horizon: int = 1, threshold: float = 3.0e-3) -> pd.Series:
    """1 where the simple return over the next `horizon` bars exceeds `threshold` (strictly), else 0.

    The last `horizon` bars have no full future and are dropped rather than labelled 0, which would
    teach the model that the most recent bars never go up.
    """
    if horizon < 1:
        raise ValueError(f"label.horizon must be a positive number of bars, got {horizon}")
    if not np.isfinite(threshold):
        raise ValueError(f"label.threshold must be a finite return, got {threshold}")
    _require_chronological(close.index, "close")
    bad = close.isna() | (close <= 0)
    if bad.any():
        raise ValueError(f"close must be positive and not NaN, got {close[bad].iloc[0]!r} at {close.index[bad][0]}")
    forward_return = close.shift(-horizon) / close - 1.0
    labelled = forward_return.iloc[: len(close) - horizon]
    return (labelled > threshold).astype("int64").rename("label")


def align(features: pd.DataFrame, labels: pd.Series) -> tuple[pd.DataFrame, pd.Series]:
    """Rows that have both features (warm-up already dropped) and a label, in time order."""
    _require_chronological(features.index, "features")
    _require_chronological(labels.index, "labels")
    common = features.index.intersection(labels.index, sort=True)
    if common.empty:
        raise ValueError(
            f"features ({len(features)} rows) and labels ({len(labels)} rows) share no timestamp: "
            "are they built from the same candles?"
        )
    X = features.loc[common]
    missing = X.isna().any(axis=0)
    if missing.any():
        column = str(missing.idxmax())
        raise ValueError(f"features column {column!r} is NaN at {X.index[X[column].isna()][0]}: warm-up rows not dropped?")
    return X, labels.loc[common]


def build_dataset(features: pd.DataFrame, close: pd.Series, horizon: int, threshold: float) -> tuple[pd.DataFrame, pd.Series]:
    """The labelled rows shared by the training and evaluation stages, so both see the same rows."""
    return align(features, make_labels(close, horizon, threshold))


# Step boundaries are multiples of `retrain.every` counted from the Unix epoch, not from the data window: a weekly
# retrain that only moves data.end keeps every earlier step, with the same training rows, so the steps both runs
# share give the same predictions and a champion comparison on them is exact.
STEP_ANCHOR = pd.Timestamp(0, tz="UTC")


@dataclass(frozen=True)
class Step:
    """One retrain of the walk-forward: fit on rows [0, train_stop), predict rows [start, stop).

    `scored` steps make up the evaluation span; the `warm-up` steps before them exist only so that the
    first scored step has earlier out-of-sample predictions to choose its decision threshold from.
    """

    number: int
    train_stop: int
    start: int
    stop: int
    scored: bool


def _holdout_rows(index: pd.DatetimeIndex, holdout: Holdout) -> int:
    if isinstance(holdout, pd.Timedelta):
        if holdout <= pd.Timedelta(0):
            raise ValueError(f"split.holdout must be a positive duration, got {holdout}")
        # The rows within `holdout` of the last row: "90D" of 1h bars is 90 * 24 rows.
        return int(np.count_nonzero(index > index[-1] - holdout))
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"split.holdout must be a fraction in (0, 1) or a duration, got {holdout}")
    return round(len(index) * holdout)


def _next_boundary(time: pd.Timestamp, every: pd.Timedelta) -> pd.Timestamp:
    """The first step boundary at or after `time`."""
    periods = -((STEP_ANCHOR - time) // every)  # ceiling division of (time - anchor) by every
    return STEP_ANCHOR + periods * every


def walk_forward_steps(
    index: pd.DatetimeIndex, holdout: Holdout, every: pd.Timedelta, warmup_steps: int, horizon: int, embargo: int
) -> list[Step]:
    """The retrain policy replayed over the evaluation span: one step per `every`, each fitted only on the past.

    The span is the last `holdout` of the rows (a fraction or a duration), started at the first step
    boundary inside it so that every step but the last is a whole `every`. Each step trains on every
    row before it except a purge gap of `horizon + embargo` rows, so no training label reaches into the
    rows it predicts. `warmup_steps` whole steps precede the span. Steps without rows (a gap in the
    candles) are left out.
    """
    _require_chronological(index, "walk-forward")
    if embargo < 0:
        raise ValueError(f"split.embargo must be a non-negative number of bars, got {embargo}")
    if every <= pd.Timedelta(0):
        raise ValueError(f"retrain.every must be a positive duration, got {every}")
    if warmup_steps < 1:
        raise ValueError(f"retrain.warmup_steps must be at least 1 (the first threshold needs earlier predictions), got {warmup_steps}")
    n_rows = len(index)
    if n_rows == 0:
        raise ValueError("cannot split an empty dataset: no labelled rows")
    n_holdout = _holdout_rows(index, holdout)
    if not 1 <= n_holdout < n_rows:
        raise ValueError(f"split.holdout={holdout} selects {n_holdout} of the {n_rows} labelled rows: it must leave rows on both sides")
    span_start = _next_boundary(index[n_rows - n_holdout], every)
    if span_start > index[-1]:
        raise ValueError(
            f"the evaluation span (split.holdout={holdout}, from {index[n_rows - n_holdout]}) holds no retrain.every={every} "
            f"step boundary before the last row {index[-1]}: make split.holdout longer or retrain.every shorter"
        )
    last_boundary = _next_boundary(index[-1] + pd.Timedelta(1, "ns"), every)
    boundaries = pd.date_range(span_start - warmup_steps * every, last_boundary, freq=every)
    positions = index.searchsorted(boundaries, side="left")
    gap = horizon + embargo
    steps: list[Step] = []
    for begin, (start, stop) in zip(boundaries, zip(positions[:-1], positions[1:], strict=True), strict=False):
        if stop == start:
            continue
        if start - gap < 1:
            raise ValueError(
                f"the walk-forward step from {begin} has {max(start - gap, 0)} training rows: {start} labelled rows precede it, "
                f"minus a purge gap of label.horizon={horizon} + split.embargo={embargo} rows; with split.holdout={holdout}, "
                f"retrain.every={every} and retrain.warmup_steps={warmup_steps} the window needs more data before the span"
            )
        steps.append(Step(number=len(steps) + 1, train_stop=int(start - gap), start=int(start), stop=int(stop), scored=begin >= span_start))
    if not any(not step.scored for step in steps):
        raise ValueError(f"the {warmup_steps} warm-up step(s) before {span_start} hold no rows (a gap in the candles?)")
    return steps
