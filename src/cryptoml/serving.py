"""The serving path: the ensemble's ONNX graph in a single-threaded onnxruntime session, and its parity check.

A trading bot predicts one row per candle: three library predict calls cost far more than the trees
on a single row, one onnxruntime call over one graph does not. The graph (built by
cryptoml.onnx_export at save time) is stored gzip-compressed, because its trees are mostly repeated
node-id and mode fields, and it is hashed in the manifest like every other model file;
`OnnxGraph.from_stored` is only ever called on bytes whose sha256 the manifest confirmed.

Parity: the graph's P(up) must stay within PARITY_TOLERANCE of the native models' on the rows it is
checked on (every feature row at save, the holdout before a promotion). Decisions then agree on every
row farther than the tolerance from the decision threshold, since P(up) cannot cross it there.

Backend: ProductionEnsemble.load serves through the graph when the model has one; `backend="native"`,
or the environment variable CRYPTOML_BACKEND=native, forces the three native models instead.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime

BACKENDS: tuple[str, ...] = ("onnx", "native")
BACKEND_ENV = "CRYPTOML_BACKEND"
PARITY_TOLERANCE = 1e-5
_GZIP_LEVEL = 9
# The graph's input (float64 features, rows x 12) and output (P(up) per row), shared with cryptoml.onnx_export.
INPUT_NAME = "features"
OUTPUT_NAME = "p_up"


class ParityError(ValueError):
    """The ONNX graph's P(up) differs from the native models' beyond PARITY_TOLERANCE: it must not be served."""


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for: the argument, else CRYPTOML_BACKEND; None means "the graph if the model has one"."""
    chosen = backend if backend is not None else (os.environ.get(BACKEND_ENV) or None)
    if chosen is not None and chosen not in BACKENDS:
        source = "backend" if backend is not None else f"environment variable {BACKEND_ENV}"
        raise ValueError(f"{source} is {chosen!r}; expected one of {list(BACKENDS)}")
    return chosen


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
