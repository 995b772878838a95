"""Feature drift: the training distribution of each feature, stored with the model, and the population stability index.

Apart from cryptoml.live.monitoring because the train stage writes the reference into the model's metadata: this module
is a dependency of that stage (dvc.yaml), the reports built on it are not.

Binning: the edges are the deciles of a feature on the rows the final model was fitted on, rounded to
METRICS_DECIMALS like every stored figure, duplicates dropped (a feature with many equal values, such as an RSI of
exactly 50 in flat markets, gets fewer bins). Bins are right-closed, (-inf, e1], (e1, e2], ..., (ek, inf), so every
value, however far outside the training range, falls into a bin. The stored fractions are counted with the rounded
edges, so they are exactly the reference a recent sample is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cryptoml.io import METRICS_DECIMALS

REFERENCE_QUANTILES: np.ndarray = np.linspace(0.1, 0.9, 9)  # deciles: 10 bins of ~10 % each
# An empty bin counts as this fraction of rows, so the logarithm stays finite: a bin that held 10 % of the training
# rows and is empty now adds (0.1 - 1e-4) * ln(0.1 / 1e-4) ~ 0.69 to the PSI, far above any alert level.
PSI_EPSILON = 1.0e-4


def _finite_values(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D array of values, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{what}: values must be finite; position {bad[0]} is {array[bad[0]]}")
    return array


def bin_fractions(edges: Sequence[float], values: Any, what: str = "values") -> np.ndarray:
    """The fraction of `values` in each right-closed bin of `edges` (len(edges) + 1 bins, summing to 1)."""
    array = _finite_values(values, what)
    bins = np.searchsorted(np.asarray(edges, dtype=np.float64), array, side="left")
    return np.bincount(bins, minlength=len(edges) + 1) / len(array)


def reference_bins(values: Any, what: str = "values") -> tuple[list[float], list[float]]:
    """Decile edges of `values` (rounded, deduplicated) and the fraction of `values` in each bin."""
    array = _finite_values(values, what)
    edges = np.unique(np.round(np.quantile(array, REFERENCE_QUANTILES), METRICS_DECIMALS))
    return edges.tolist(), bin_fractions(edges, array, what).tolist()


def feature_reference(features: pd.DataFrame) -> dict[str, Any]:
    """The training distribution of every feature column, for the model's metadata (`feature_reference`)."""
    if features.empty:
        raise ValueError("feature_reference needs at least one training row, got none")
    bins = {str(name): reference_bins(features[name], f"feature {name!r}") for name in features.columns}
    return {
        "rows": len(features),
        "features": {name: {"edges": edges, "fractions": fractions} for name, (edges, fractions) in bins.items()},
    }


def population_stability_index(reference_edges: Sequence[float], reference_fractions: Sequence[float], values: Any) -> float:
    """PSI = sum over bins of (recent - reference) * ln(recent / reference); both fractions floored at PSI_EPSILON.

    0 for the same distribution; by the usual reading below 0.1 is stable, 0.1-0.25 a moderate shift and above 0.25 a
    major one.
    """
    if len(reference_fractions) != len(reference_edges) + 1:
        raise ValueError(
            f"a reference with {len(reference_edges)} edge(s) needs {len(reference_edges) + 1} fractions, "
            f"got {len(reference_fractions)}"
        )
    expected = np.maximum(np.asarray(reference_fractions, dtype=np.float64), PSI_EPSILON)
    actual = np.maximum(bin_fractions(reference_edges, values), PSI_EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))
