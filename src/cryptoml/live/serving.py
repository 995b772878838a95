"""The serving path: the ensemble's ONNX graph in a single-threaded onnxruntime session, and its parity check.

A trading bot predicts one row per candle: three library predict calls cost far more than the trees
on a single row, one onnxruntime call over one graph does not. The graph (built by
cryptoml.model.onnx_export at save time) is stored gzip-compressed, because its trees are mostly repeated
node-id and mode fields, and it is hashed in the manifest like every other model file;
`OnnxGraph.from_stored` is only ever called on bytes whose sha256 the manifest confirmed.

Parity: the graph's P(up) must stay within PARITY_TOLERANCE of the native models' on the rows it is
checked on (every feature row at save, the holdout before a promotion). Decisions then agree on every
row farther than the tolerance from the decision threshold, since P(up) cannot cross it there.

Backend: ProductionEnsemble.load serves through the graph when the model has one; `backend="native"`,
or the environment variable CRYPTOML_BACKEND=native, forces the three native models instead.

ServingModel is the same graph for a process that only serves: it verifies the model like
ProductionEnsemble.load but imports neither scikit-learn, pandas, LightGBM, XGBoost nor numba, so a
bot's process stays small (bench/serve.py measures its peak RSS).
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from cryptoml.features.spec import FEATURE_NAMES
from cryptoml.model.artifacts import MANIFEST_NAME, ONNX_GRAPH, ArtifactError, read_model
from cryptoml.model.rule import Holding, TradingRule
from cryptoml.paths import PRODUCTION_DIR

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("onnx", "native")
BACKEND_ENV = "CRYPTOML_BACKEND"
PARITY_TOLERANCE = 1e-5
_GZIP_LEVEL = 9
# The graph's input (float64 features, rows x 12) and output (P(up) per row), shared with cryptoml.model.onnx_export.
INPUT_NAME = "features"
OUTPUT_NAME = "p_up"
LISTED_ROWS = 5  # offending rows an error message names


class ParityError(ValueError):
    """The ONNX graph's P(up) differs from the native models' beyond PARITY_TOLERANCE: it must not be served."""


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for: the argument, else CRYPTOML_BACKEND; None means "the graph if the model has one"."""
    chosen = backend if backend is not None else (os.environ.get(BACKEND_ENV) or None)
    if chosen is not None and chosen not in BACKENDS:
        source = "backend" if backend is not None else f"environment variable {BACKEND_ENV}"
        raise ValueError(f"{source} is {chosen!r}; expected one of {list(BACKENDS)}")
    return chosen


def recorded_data_end(version_info: Mapping[str, Any]) -> str | None:
    """The time (ISO 8601) of the last row the model was fitted on, as its manifest records it: `train_end`; models
    made before the production fit took every labelled row record only their window's end (`data_end`)."""
    recorded = version_info.get("train_end", version_info.get("data_end"))
    return None if recorded is None else str(recorded)


def pack_graph(graph: bytes) -> bytes:
    """The stored form: gzip with no timestamp or file name in the header, so the bytes depend only on the graph."""
    return gzip.compress(graph, compresslevel=_GZIP_LEVEL, mtime=0)


class OnnxGraph:
    """An onnxruntime session over the ensemble graph: float64 features in, P(up) out.

    One intra-op and one inter-op thread: a single row gains nothing from a thread pool, and the bot
    shares the machine with other work.
    """

    def __init__(self, graph: bytes) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self._session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self._outputs = [OUTPUT_NAME]

    @classmethod
    def from_stored(cls, stored: bytes) -> OnnxGraph:
        """Session over a stored (gzip) graph; call only with bytes whose sha256 was verified."""
        return cls(gzip.decompress(stored))

    def up_probability(self, matrix: np.ndarray) -> np.ndarray:
        """P(up) per row of a C-contiguous float64 matrix whose columns are in FEATURE_NAMES order."""
        return self._session.run(self._outputs, {INPUT_NAME: matrix})[0].astype(np.float64)


@dataclass(frozen=True)
class ParityReport:
    """How far the served P(up) is from the native P(up) on the rows checked."""

    rows: int
    max_abs_difference: float
    decisions_differing: int  # all within `tolerance` of the threshold when `passed`
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_difference <= self.tolerance


def compare_up_probabilities(native: np.ndarray, served: np.ndarray, threshold: float, tolerance: float) -> ParityReport:
    """Pure comparison of two P(up) vectors of the same rows at the decision threshold."""
    difference = np.abs(np.asarray(served, dtype=np.float64) - np.asarray(native, dtype=np.float64))
    return ParityReport(
        rows=len(difference),
        max_abs_difference=float(difference.max()),
        decisions_differing=int(np.count_nonzero((native >= threshold) != (served >= threshold))),
        tolerance=tolerance,
    )


def require_parity(report: ParityReport, what: str) -> ParityReport:
    """The report, or ParityError saying by how much `what` missed the bound."""
    if not report.passed:
        raise ParityError(
            f"{what}: the ONNX graph's P(up) differs from the native models' by up to {report.max_abs_difference:.3g} "
            f"on {report.rows} rows (allowed {report.tolerance:g}; {report.decisions_differing} decision(s) differ): "
            "the graph does not reproduce the model, so it is not saved or promoted"
        )
    return report


def array_rows(X: Any) -> np.ndarray:
    """Feature rows given as an array (columns in FEATURE_NAMES order) as a C-contiguous float64 matrix."""
    matrix = np.asarray(X, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(FEATURE_NAMES):
        raise ValueError(
            f"expected a 2-D array of shape (n_rows, {len(FEATURE_NAMES)}) with columns in FeatureManager "
            f"order {list(FEATURE_NAMES)}, got shape {matrix.shape}"
        )
    return np.ascontiguousarray(matrix)


def require_finite_rows(matrix: np.ndarray, row_labels: Sequence[Any] | None = None) -> np.ndarray:
    """The matrix, if it has rows and all are finite; else a ValueError naming the first bad rows and their columns."""
    if len(matrix) == 0:
        raise ValueError("X has no rows")
    bad_rows = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if bad_rows.size:
        first = bad_rows[:LISTED_ROWS]
        named = f"index labels {[str(row_labels[i]) for i in first]}" if row_labels is not None else f"positions {first.tolist()}"
        bad_columns = [FEATURE_NAMES[j] for j in np.flatnonzero(~np.isfinite(matrix[bad_rows]).all(axis=0))]
        raise ValueError(
            f"{bad_rows.size} row(s) contain NaN or inf (first {named}; in columns {bad_columns}): "
            "drop or fill them before the model sees them"
        )
    return matrix


class ServingModel:
    """A saved model's ONNX graph, decision threshold and trading rule: P(up), and the position to hold.

    Loading checks every file's size and sha256 against the manifest and the feature spec, exactly as
    ProductionEnsemble.load does, and there is no fallback: a model without a graph is an ArtifactError.
    Rows are arrays in FEATURE_NAMES order, or frames whose columns are exactly FEATURE_NAMES.
    `next_holding(p_up, holding)` applies the model's trading rule (cryptoml.model.rule, the backtest's own code):
    the position to hold for the next bar from this bar's P(up) and what the bot holds now.
    `reload_if_changed()` follows the directory: after a promotion, rollback or `cryptoml pull-model`.
    """

    def __init__(
        self,
        graph: OnnxGraph,
        model_sha256: str,
        decision_threshold: float,
        version_info: dict[str, Any],
        directory: Path | None = None,
        manifest: bytes = b"",
        rule: TradingRule | None = None,
    ) -> None:
        self._graph = graph
        self.model_sha256 = model_sha256
        self.decision_threshold = decision_threshold
        self.rule = TradingRule.threshold(decision_threshold) if rule is None else rule
        self.version_info = version_info
        self.feature_names = list(FEATURE_NAMES)
        self.directory = directory
        self._manifest = manifest

    @classmethod
    def load(cls, path: Path | None = None) -> ServingModel:
        directory = PRODUCTION_DIR if path is None else Path(path)
        text, manifest, payloads = read_model(directory, keep=(ONNX_GRAPH,))
        if ONNX_GRAPH not in payloads:
            raise ArtifactError(
                f"{directory / MANIFEST_NAME}: a {manifest.format} model has no ONNX graph to serve; "
                "use ProductionEnsemble.load(path, backend='native') or retrain it"
            )
        try:
            graph = OnnxGraph.from_stored(payloads[ONNX_GRAPH])
        except Exception as exc:  # onnxruntime and gzip raise their own error types; all mean "unusable file"
            raise ArtifactError(f"{directory / manifest.model.files[ONNX_GRAPH].name}: hash verified but the graph cannot be loaded: {exc}") from exc
        section = manifest.model
        return cls(graph, manifest.model_sha256, section.decision_threshold, dict(manifest.version_info), directory, text, section.rule)

    def reload_if_changed(self) -> bool:
        """Load the directory's model again when its manifest changed; True when another model is now served.

        A swap replaces the manifest last, so a changed manifest means a complete new model. Cheap when nothing
        changed (one small file read), so a bot can call it before every prediction. A reload that fails (a
        damaged file, a swap that outran the read) is logged and the current model stays in service: the bot is
        never left without a model.
        """
        if self.directory is None:
            raise ValueError("this ServingModel was not loaded from a directory (use ServingModel.load) so it cannot reload")
        try:
            if (self.directory / MANIFEST_NAME).read_bytes() == self._manifest:
                return False
            fresh = ServingModel.load(self.directory)
        except (ArtifactError, OSError) as exc:
            log.warning("keeping model %s: reloading %s failed: %s", self.model_sha256, self.directory, exc)
            return False
        changed = fresh.model_sha256 != self.model_sha256
        self._graph, self._manifest = fresh._graph, fresh._manifest
        self.model_sha256, self.decision_threshold, self.version_info = fresh.model_sha256, fresh.decision_threshold, fresh.version_info
        self.rule = fresh.rule
        return changed

    def _rows(self, X: Any) -> np.ndarray:
        columns = getattr(X, "columns", None)
        if columns is not None and list(columns) != self.feature_names:
            raise ValueError(f"feature columns are {[str(c) for c in columns]}; expected exactly {self.feature_names} in this order")
        return require_finite_rows(array_rows(X), getattr(X, "index", None))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Columns P(class 0), P(class 1) per row, as ProductionEnsemble.predict_proba with the graph."""
        up = self._graph.up_probability(self._rows(X))
        return np.column_stack([1.0 - up, up])

    def predict(self, X: Any) -> np.ndarray:
        """1 (up) where P(up) >= decision_threshold, else 0: the same P(up) as predict_proba."""
        return (self.predict_proba(X)[:, 1] >= self.decision_threshold).astype(np.int64)

    def next_holding(self, p_up: float, holding: Holding) -> Holding:
        """What to hold for the next bar: the model's trading rule on this closed bar's P(up) and the holding now."""
        return self.rule.next_holding(p_up, holding)
