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
from sklearn.model_selection import TimeSeriesSplit

# The holdout is either the last fraction of the rows or the last stretch of time.
Holdout = float | pd.Timedelta

Fold = tuple[np.ndarray, np.ndarray]


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


@dataclass(frozen=True)
class HoldoutSplit:
    """Training rows [0, train_stop) and holdout rows [holdout_start, n_rows) of the aligned frame."""

    n_rows: int
    train_stop: int
    holdout_start: int
    train_start_time: pd.Timestamp
    train_end_time: pd.Timestamp
    holdout_start_time: pd.Timestamp
    holdout_end_time: pd.Timestamp

    @property
    def train(self) -> np.ndarray:
        return np.arange(self.train_stop)

    @property
    def holdout(self) -> np.ndarray:
        return np.arange(self.holdout_start, self.n_rows)

    @property
    def purged_rows(self) -> int:
        return self.holdout_start - self.train_stop


def _holdout_rows(index: pd.DatetimeIndex, holdout: Holdout) -> int:
    if isinstance(holdout, pd.Timedelta):
        if holdout <= pd.Timedelta(0):
            raise ValueError(f"split.holdout must be a positive duration, got {holdout}")
        # The rows within `holdout` of the last row: "90D" of 1h bars is 90 * 24 rows.
        return int(np.count_nonzero(index > index[-1] - holdout))
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"split.holdout must be a fraction in (0, 1) or a duration, got {holdout}")
    return round(len(index) * holdout)


def holdout_split(index: pd.DatetimeIndex, holdout: Holdout, horizon: int, embargo: int) -> HoldoutSplit:
    """Hold out the most recent rows, purging `horizon + embargo` rows before them from training."""
    _require_chronological(index, "holdout split")
    if embargo < 0:
        raise ValueError(f"split.embargo must be a non-negative number of bars, got {embargo}")
    n_rows = len(index)
    if n_rows == 0:
        raise ValueError("cannot split an empty dataset: no labelled rows")
    n_holdout = _holdout_rows(index, holdout)
    if n_holdout < 1:
        raise ValueError(f"split.holdout={holdout} selects no row of the {n_rows} labelled rows: make it larger")
    if n_holdout >= n_rows:
        raise ValueError(f"split.holdout={holdout} covers all {n_rows} labelled rows, leaving none for training")
    holdout_start = n_rows - n_holdout
    train_stop = holdout_start - horizon - embargo
    if train_stop < 1:
        raise ValueError(
            f"no training rows left: {n_rows} labelled rows minus {n_holdout} holdout rows (split.holdout={holdout}) "
            f"minus a purge gap of label.horizon={horizon} + split.embargo={embargo} rows"
        )
    return HoldoutSplit(
        n_rows=n_rows,
        train_stop=train_stop,
        holdout_start=holdout_start,
        train_start_time=index[0],
        train_end_time=index[train_stop - 1],
        holdout_start_time=index[holdout_start],
        holdout_end_time=index[-1],
    )


def walk_forward_splits(n_rows: int, n_splits: int, horizon: int, embargo: int) -> list[Fold]:
    """Expanding-window folds over rows [0, n_rows): validation blocks in time order, each preceded
    by a purge gap of `horizon + embargo` rows that neither side uses.

    The validation blocks are the last `n_splits` of `n_splits + 1` equal blocks (as in
    scikit-learn's TimeSeriesSplit), so every fold trains only on the past.
    """
    if n_splits < 2:
        raise ValueError(f"cv.n_splits must be at least 2, got {n_splits}")
    gap = horizon + embargo
    fold_size = n_rows // (n_splits + 1)
    first_train_rows = n_rows - n_splits * fold_size - gap
    if fold_size < 1 or first_train_rows < 1:
        raise ValueError(
            f"{n_rows} training rows are too few for cv.n_splits={n_splits} validation folds with a purge gap of "
            f"label.horizon={horizon} + split.embargo={embargo} rows: the first fold would have "
            f"{max(first_train_rows, 0)} training rows and {fold_size} validation rows"
        )
    splitter = TimeSeriesSplit(n_splits=n_splits, gap=gap)
    return list(splitter.split(np.arange(n_rows)))
