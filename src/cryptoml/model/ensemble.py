"""ProductionEnsemble: LightGBM + XGBoost + RandomForest soft vote on the 12 FeatureManager features.

A saved model is a directory of native, pickle-free files (LightGBM text, XGBoost UBJSON, a skops
RandomForest with deflated zip entries), the whole ensemble as one gzip-compressed ONNX graph (see
cryptoml.model.onnx_export), and the manifest `ensemble.json`, written last, which holds every file's
sha256. Loading checks the hashes before any file is parsed and refuses a model built for another
feature spec. The same data and parameters give byte-identical files, so the model hash identifies a
model across reruns (with the pinned libraries and the same zlib, which compresses two of the files).

Serving: a loaded model predicts through the ONNX graph in onnxruntime when it has one (a fraction
of a millisecond per row instead of tens of milliseconds for three library calls); `load(path,
backend="native")` or CRYPTOML_BACKEND=native forces the native models. `component_proba`,
`feature_importances` and a refit always use the native models. See cryptoml.live.serving for the parity
bound between the two.

The manifest, its content-addressed file names and the verified read are in cryptoml.model.artifacts.

Model hash (`model_sha256`): sha256 of the canonical JSON of the manifest's `model` section, which
holds the hashes and sizes of the component files and the ONNX graph, the weights, the decision
threshold, the hyperparameters and the feature spec, i.e. everything that decides a prediction. It leaves out
`version_info` (git commit, data window: provenance given by the caller) and `library_versions`.

Weights: all three models are always fitted, saved and evaluated; a weight of 0 only takes a model
out of the vote, so artifacts and `component_proba` have the same shape for every weighting.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import lightgbm
import numpy as np
import onnxruntime
import pandas as pd
import sklearn
import skops
import skops.io
import xgboost
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.utils.validation import NotFittedError, check_is_fitted

from cryptoml.features.spec import FEATURE_NAMES, FEATURE_VERSION, feature_spec_hash
from cryptoml.io import dump_json, write_bytes_atomic
from cryptoml.live.serving import (
    LISTED_ROWS,
    PARITY_TOLERANCE,
    OnnxGraph,
    ParityReport,
    array_rows,
    compare_up_probabilities,
    pack_graph,
    requested_backend,
    require_finite_rows,
    require_parity,
)
from cryptoml.model.artifacts import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MODEL_NAMES,
    ONNX_GRAPH,
    OOS_PREDICTIONS,
    ArtifactError,
    FileEntry,
    Manifest,
    ModelSection,
    prune_components,
    read_model,
    validate_weights,
    validated_int,
    validated_threshold,
)
from cryptoml.model.rule import TradingRule
from cryptoml.paths import PRODUCTION_DIR

DEFAULT_WEIGHTS: dict[str, float] = {"lightgbm": 0.4, "xgboost": 0.4, "random_forest": 0.2}
# The estimator's own defaults, for a ProductionEnsemble() built outside the pipeline; the pipeline passes every key of
# params.yaml's `model:` hyperparameters over them (docs/training.md says why those).
DEFAULT_MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.1, "max_depth": 8, "num_leaves": 31},
    "xgboost": {"n_estimators": 200, "learning_rate": 0.1, "max_depth": 8},
    "random_forest": {"n_estimators": 200, "max_depth": 12},
}


# Keys the ensemble sets itself (seed, threads, determinism) plus their library aliases: letting
# model_params override them would silently break reproducibility.
_RESERVED_PARAMS: dict[str, frozenset[str]] = {
    "lightgbm": frozenset(
        {"random_state", "seed", "n_jobs", "num_threads", "num_thread", "nthread", "nthreads",
         "deterministic", "force_row_wise", "force_col_wise", "verbose", "verbosity"}
    ),
    "xgboost": frozenset({"random_state", "seed", "n_jobs", "nthread", "tree_method", "device"}),
    "random_forest": frozenset({"random_state", "n_jobs"}),
}
# Types a RandomForestClassifier file needs beyond skops' built-in trusted list; anything else is refused.
TRUSTED_SKOPS_TYPES: frozenset[str] = frozenset({"sklearn.tree._tree.Tree"})
# Earliest date a zip entry can carry; used instead of the wall clock so files are byte-reproducible.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Deflate level of the skops entries: the default forest's file goes from ~19 MB to ~4 MB in ~0.5 s;
# level 9 saves 3 % more in ten times the time.
_ZIP_LEVEL = 6
_FITTED_ATTRIBUTES = ("lightgbm_booster_", "xgboost_booster_", "random_forest_", "weights_")


def _enforced_params(name: str, random_state: int, n_jobs: int) -> dict[str, Any]:
    """Seed, thread count and the switches that make each library reproducible run to run."""
    per_model: dict[str, dict[str, Any]] = {
        "lightgbm": {"deterministic": True, "force_row_wise": True, "verbose": -1},
        "xgboost": {"tree_method": "hist"},
        "random_forest": {},
    }
    return {"random_state": random_state, "n_jobs": n_jobs, **per_model[name]}


def _library_params(
    model_params: Mapping[str, Mapping[str, Any]] | None, random_state: Any, n_jobs: Any
) -> dict[str, dict[str, Any]]:
    """Constructor arguments of each library model: defaults, then the caller's, then the enforced ones."""
    seed = validated_int("random_state", random_state, 0, 2**31 - 1)
    threads = validated_int("n_jobs", n_jobs, 1)
    overrides = dict(model_params or {})
    unknown = sorted(str(name) for name in overrides if name not in MODEL_NAMES)
    if unknown:
        raise ValueError(f"unknown model name(s) in model_params: {unknown}; expected some of {list(MODEL_NAMES)}")
    resolved: dict[str, dict[str, Any]] = {}
    for name in MODEL_NAMES:
        given = overrides.get(name) or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"model_params[{name!r}] must be a mapping of hyperparameters, got {type(given).__name__}")
        reserved = sorted(set(given) & _RESERVED_PARAMS[name])
        if reserved:
            raise ValueError(
                f"model_params[{name!r}] sets {reserved}: seeds, threads and determinism are set by the "
                "ensemble (use ProductionEnsemble(random_state=..., n_jobs=...))"
            )
        resolved[name] = {**DEFAULT_MODEL_PARAMS[name], **given, **_enforced_params(name, seed, threads)}
    return resolved


def _caller_params(hyperparameters: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Inverse of `_library_params`: the part of each model's arguments that model_params controls."""
    return {
        name: {key: value for key, value in hyperparameters[name].items() if key not in _enforced_params(name, 0, 1)}
        for name in MODEL_NAMES
    }


def _library_versions() -> dict[str, str]:
    """What wrote the files; zlib too, since another zlib may compress the same model to other bytes."""
    return {
        "lightgbm": lightgbm.__version__,
        "numpy": np.__version__,
        "onnx": importlib.metadata.version("onnx"),
        "onnxmltools": importlib.metadata.version("onnxmltools"),
        "onnxruntime": onnxruntime.__version__,
        "scikit-learn": sklearn.__version__,
        "skl2onnx": importlib.metadata.version("skl2onnx"),
        "skops": skops.__version__,
        "xgboost": xgboost.__version__,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
    }


# --- input checks -------------------------------------------------------------------------------


def _feature_matrix(X: Any) -> np.ndarray:
    """The features as a C-contiguous float64 matrix in FEATURE_NAMES order; refuses anything ambiguous."""
    if isinstance(X, pd.DataFrame):
        return require_finite_rows(_frame_matrix(X), X.index)
    return require_finite_rows(array_rows(X))


def _frame_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The frame's features as a float64 matrix in FEATURE_NAMES order.

    The common case, FeatureManager's float64 columns in FEATURE_NAMES order, skips the pandas checks:
    with the ONNX graph they would cost more than predicting a row.
    """
    columns = list(frame.columns)
    if columns != list(FEATURE_NAMES):
        _check_feature_columns(columns)
    values = frame.to_numpy()
    # to_numpy() gives float64 only when every column is a non-bool number (bool and object columns make
    # an object array), so the per-column dtype checks, which cost more than the prediction, run only otherwise.
    if values.dtype != np.float64:
        non_numeric = [
            str(name)
            for name, dtype in frame.dtypes.items()
            if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        ]
        if non_numeric:
            raise ValueError(f"feature columns {non_numeric} are not numeric")
        values = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    # Reordered on the NumPy side: pandas column selection costs more than the three models on one row.
    order = [columns.index(name) for name in FEATURE_NAMES]
    return np.ascontiguousarray(values if order == list(range(len(columns))) else values[:, order])


def _check_feature_columns(columns: list[Any]) -> None:
    duplicated = sorted({str(column) for column in columns if columns.count(column) > 1})
    if duplicated:
        raise ValueError(f"feature frame has duplicated columns {duplicated}")
    missing = [name for name in FEATURE_NAMES if name not in columns]
    unexpected = [str(column) for column in columns if column not in FEATURE_NAMES]
    if missing or unexpected:
        raise ValueError(
            f"feature frame columns differ from the {len(FEATURE_NAMES)} FeatureManager features: "
            f"missing {missing}, unexpected {unexpected}"
        )


def _binary_labels(y: Any, X: Any, n_rows: int) -> np.ndarray:
    if isinstance(X, pd.DataFrame) and isinstance(y, pd.Series) and not X.index.equals(y.index):
        raise ValueError("y's index differs from X's: align labels with feature rows before fitting")
    labels = np.asarray(y)
    if labels.shape != (n_rows,):
        raise ValueError(f"y must be 1-D with one label per row of X ({n_rows} rows), got shape {labels.shape}")
    present = pd.unique(labels).tolist()
    invalid = [value for value in present if value not in (0, 1)]
    if invalid:
        raise ValueError(f"labels must be 0 (not up) or 1 (up), got {invalid[:LISTED_ROWS]}")
    if len(present) < 2:
        raise ValueError(f"y contains only class {int(present[0])}: both 0 and 1 are needed to train a classifier")
    return labels.astype(np.int64)


# --- native serialisation -----------------------------------------------------------------------


def _lightgbm_bytes(booster: lightgbm.Booster) -> bytes:
    return booster.model_to_string().encode("utf-8")


def _xgboost_bytes(booster: xgboost.Booster) -> bytes:
    return bytes(booster.save_raw("ubj"))


def _random_forest_bytes(forest: RandomForestClassifier) -> bytes:
    return _canonical_skops(skops.io.dumps(forest))


def _canonical_skops(data: bytes) -> bytes:
    """Rewrite a skops zip so its bytes depend only on the model, with deflated entries.

    skops names each array entry and `__id__` after the in-memory address (`id()`) of the object and
    stamps entries with the wall clock; both are replaced by their order of appearance in the schema
    and a fixed date. A plain JSON value (a float, a string) gets one id per content: whether two
    equal floats are one object depends on how the model reached this process (fitted here, or
    unpickled from a worker), not on the model. The padding bytes of structured arrays (a tree's nodes: 57 bytes of fields in
    64) hold whatever memory was there, so they are zeroed. The values are unchanged, so skops loads
    the result like the original.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        new_ids: dict[Any, int] = {}
        new_files: dict[str, str] = {}
        schema = _renumbered(json.loads(source.read("schema.json")), new_ids, new_files)
        entries = [("schema.json", json.dumps(schema, indent=2).encode())]
        entries += [(new_name, _zeroed_padding(new_name, source.read(old_name))) for old_name, new_name in new_files.items()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for name, payload in entries:
            entry = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            entry.create_system = 3  # Unix, whatever machine writes the file
            entry.external_attr = 0o644 << 16
            target.writestr(entry, payload, compress_type=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL)
    return buffer.getvalue()


def _zeroed_padding(name: str, payload: bytes) -> bytes:
    """An .npy entry of a structured array with padding, rewritten with zeros in the padding; others as they are."""
    if not name.endswith(".npy"):
        return payload
    array = np.load(io.BytesIO(payload), allow_pickle=False)
    fields = array.dtype.fields
    if fields is None or array.dtype.itemsize == sum(dtype.itemsize for dtype, *_ in fields.values()):
        return payload
    zeroed = np.zeros(array.shape, dtype=array.dtype)
    for field in fields:
        zeroed[field] = array[field]
    buffer = io.BytesIO()
    np.save(buffer, zeroed, allow_pickle=False)
    return buffer.getvalue()


def _renumbered(node: Any, new_ids: dict[Any, int], new_files: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_renumbered(item, new_ids, new_files) for item in node]
    if not isinstance(node, dict):
        return node
    renamed: dict[str, Any] = {}
    for key, value in node.items():
        if key == "__id__" and isinstance(value, int):
            identity = ("json", node.get("__class__"), node["content"]) if node.get("is_json") else value
            renamed[key] = new_ids.setdefault(identity, len(new_ids) + 1)  # skops reads id 0 as "no id"
        elif key == "file" and isinstance(value, str):
            renamed[key] = new_files.setdefault(value, f"{len(new_files)}{PurePosixPath(value).suffix}")
        else:
            renamed[key] = _renumbered(value, new_ids, new_files)
    return renamed


def _parse_lightgbm(data: bytes) -> lightgbm.Booster:
    return lightgbm.Booster(model_str=data.decode("utf-8"))


def _parse_xgboost(data: bytes) -> xgboost.Booster:
    booster = xgboost.Booster()
    booster.load_model(bytearray(data))
    return booster


def _parse_random_forest(data: bytes) -> RandomForestClassifier:
    """Unpack with an explicit allowlist: skops refuses any type it was not told to trust."""
    untrusted = set(skops.io.get_untrusted_types(data=data))
    refused = sorted(untrusted - TRUSTED_SKOPS_TYPES)
    if refused:
        raise ValueError(f"contains types outside the allowlist {sorted(TRUSTED_SKOPS_TYPES)}: {refused}")
    forest = skops.io.loads(data, trusted=sorted(TRUSTED_SKOPS_TYPES))
    if not isinstance(forest, RandomForestClassifier) or forest.classes_.tolist() != [0, 1]:
        raise ValueError(f"expected a RandomForestClassifier over classes [0, 1], got {type(forest).__name__}")
    return forest


def _parse_onnx(data: bytes) -> OnnxGraph:
    return OnnxGraph.from_stored(data)


def _forest_up_probability(forest: RandomForestClassifier, matrix: np.ndarray) -> np.ndarray:
    """P(up) of the forest: the sum RandomForestClassifier.predict_proba computes, in this thread.

    Same float32 input, per-tree values (`tree_.predict` is what DecisionTreeClassifier.predict_proba
    returns for one output) and summation order as sklearn with n_jobs=1, without the per-call
    thread-pool start-up and per-tree fitted-checks that cost more than the trees on a single row.
    """
    as_float32 = matrix.astype(np.float32)
    total = np.zeros(len(matrix))
    for tree in forest.estimators_:
        total += tree.tree_.predict(as_float32)[:, 1]
    return total / len(forest.estimators_)


# --- manifest -----------------------------------------------------------------------------------


def _json_ready(value: Any, what: str) -> Any:
    """A plain-JSON copy (numpy scalars unwrapped), so the manifest is exact and stable."""

    def unwrap(item: Any) -> Any:
        if isinstance(item, np.generic):
            return item.item()
        raise TypeError(f"{type(item).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=unwrap, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be plain JSON data (str, finite numbers, bool, None, lists, dicts): {exc}") from exc


# --- the estimator ------------------------------------------------------------------------------


class ProductionEnsemble(ClassifierMixin, BaseEstimator):
    """Weighted soft vote of LightGBM, XGBoost and RandomForest on P(up); labels are 0 and 1.

    `weights`, `model_params`, `random_state` and `n_jobs` take effect at fit (`weights_` holds the
    normalised weights); `decision_threshold` and `n_jobs` (LightGBM and XGBoost threads; the forest
    predicts in the calling thread) are read at every prediction, so both can be changed on a fitted
    or loaded model with set_params. `trading_rule` is the position rule saved with the model (`rule`);
    without one the model trades its decision threshold (TradingRule.threshold). A model loaded with its ONNX graph (`onnx_graph_`) predicts
    through it in one thread whatever n_jobs says; a fitted one predicts natively until saved and loaded.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        model_params: Mapping[str, Mapping[str, Any]] | None = None,
        decision_threshold: float = 0.5,
        random_state: int = 42,
        n_jobs: int = 1,
        trading_rule: TradingRule | None = None,
    ) -> None:
        self.weights = weights
        self.model_params = model_params
        self.decision_threshold = decision_threshold
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.trading_rule = trading_rule

    @property
    def rule(self) -> TradingRule:
        """The trading rule the model is served with: its own, or long exactly while P(up) >= decision_threshold."""
        if self.trading_rule is None:
            return TradingRule.threshold(validated_threshold(self.decision_threshold))
        if not isinstance(self.trading_rule, TradingRule):
            raise ValueError(f"trading_rule must be a TradingRule, got {type(self.trading_rule).__name__}")
        return self.trading_rule

    def fit(self, X: Any, y: Any) -> ProductionEnsemble:
        """Fit the three models on the same rows, each seeded and deterministic, so refits are identical."""
        weights = validate_weights(DEFAULT_WEIGHTS if self.weights is None else self.weights)
        validated_threshold(self.decision_threshold)
        params = _library_params(self.model_params, self.random_state, self.n_jobs)
        matrix = _feature_matrix(X)
        labels = _binary_labels(y, X, len(matrix))
        boosted = lightgbm.LGBMClassifier(**params["lightgbm"]).fit(matrix, labels, feature_name=list(FEATURE_NAMES))
        gradient = xgboost.XGBClassifier(**params["xgboost"]).fit(matrix, labels)
        forest = RandomForestClassifier(**params["random_forest"]).fit(matrix, labels)
        xgboost_booster = gradient.get_booster()
        xgboost_booster.feature_names = list(FEATURE_NAMES)
        self._set_fitted(boosted.booster_, xgboost_booster, forest, weights, onnx_graph=None)
        self.library_versions_ = _library_versions()
        self.model_sha256_ = None
        self.version_info_ = {}
        return self

    def _set_fitted(
        self,
        lightgbm_booster: lightgbm.Booster,
        xgboost_booster: xgboost.Booster,
        forest: RandomForestClassifier,
        weights: dict[str, float],
        onnx_graph: OnnxGraph | None,
    ) -> None:
        self.lightgbm_booster_ = lightgbm_booster
        self.xgboost_booster_ = xgboost_booster
        self.random_forest_ = forest
        self.weights_ = weights
        self.onnx_graph_ = onnx_graph
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = len(FEATURE_NAMES)
        self.feature_names_in_ = np.asarray(FEATURE_NAMES, dtype=object)

    @property
    def serving_backend(self) -> str:
        """Which models predict and predict_proba use: "onnx" (the graph) or "native"."""
        check_is_fitted(self, _FITTED_ATTRIBUTES)
        return "onnx" if self.onnx_graph_ is not None else "native"

    @property
    def is_fitted(self) -> bool:
        try:
            check_is_fitted(self, _FITTED_ATTRIBUTES)
        except NotFittedError:
            return False
        return True

    def component_proba(self, X: Any) -> dict[str, np.ndarray]:
        """P(up) of each component model, in MODEL_NAMES order."""
        check_is_fitted(self, _FITTED_ATTRIBUTES)
        return self._component_proba(_feature_matrix(X))

    def feature_importances(self) -> dict[str, np.ndarray]:
        """Each feature's share (FEATURE_NAMES order, sum 1) of each model's splits, in MODEL_NAMES order.

        LightGBM and XGBoost: total gain of the splits on the feature (XGBoost "total_gain", the same
        quantity as LightGBM "gain"; XGBoost "gain" is a mean per split and inflates rare splits);
        RandomForest: mean decrease in impurity over its trees. A feature never split on gets 0; a
        model without any split gets all zeros.
        """
        check_is_fitted(self, _FITTED_ATTRIBUTES)
        lightgbm_gain = dict(
            zip(self.lightgbm_booster_.feature_name(), self.lightgbm_booster_.feature_importance("gain"), strict=True)
        )
        # XGBoost keys its scores f0, f1, ... (column positions) when a booster carries no feature names.
        xgboost_names = self.xgboost_booster_.feature_names or [f"f{i}" for i in range(len(FEATURE_NAMES))]
        xgboost_gain = self.xgboost_booster_.get_score(importance_type="total_gain")
        raw = {
            "lightgbm": np.array([lightgbm_gain.get(name, 0.0) for name in FEATURE_NAMES]),
            "xgboost": np.array([xgboost_gain.get(key, 0.0) for key in xgboost_names]),
            "random_forest": self.random_forest_.feature_importances_,
        }
        shares = {}
        for name, values in raw.items():
            total = float(np.sum(values))
            shares[name] = np.asarray(values, dtype=np.float64) / total if total > 0 else np.zeros(len(FEATURE_NAMES))
        return shares

    def fingerprint(self) -> str:
        """sha256 of the fitted native models' contents and weights, without the seconds of skops and ONNX export
        that `save` costs: it tells whether two fits (a walk-forward step on two workers, or on altered candles)
        made the same model."""
        check_is_fitted(self, _FITTED_ATTRIBUTES)
        digest = hashlib.sha256(_lightgbm_bytes(self.lightgbm_booster_))
        digest.update(_xgboost_bytes(self.xgboost_booster_))
        for estimator in self.random_forest_.estimators_:
            tree = estimator.tree_
            for array in (tree.children_left, tree.children_right, tree.feature, tree.threshold, tree.value):
                digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(dump_json(self.weights_).encode())
        return f"sha256:{digest.hexdigest()}"

    def _component_proba(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        threads = validated_int("n_jobs", self.n_jobs, 1)
        self.xgboost_booster_.set_param("nthread", threads)
        return {
            "lightgbm": self.lightgbm_booster_.predict(matrix, num_threads=threads),
            "xgboost": self.xgboost_booster_.inplace_predict(matrix).astype(np.float64),
            "random_forest": _forest_up_probability(self.random_forest_, matrix),
        }

    def _native_up_probability(self, matrix: np.ndarray) -> np.ndarray:
        components = self._component_proba(matrix)
        up = np.zeros(len(matrix))
        for name in MODEL_NAMES:
            up += self.weights_[name] * components[name]
        return up

    def _up_probability(self, X: Any) -> np.ndarray:
        check_is_fitted(self, _FITTED_ATTRIBUTES)
        matrix = _feature_matrix(X)
        if self.onnx_graph_ is not None:
            return self.onnx_graph_.up_probability(matrix)
        return self._native_up_probability(matrix)

    def _parity(self, graph: OnnxGraph, X: Any, tolerance: float, what: str) -> ParityReport:
        matrix = _feature_matrix(X)
        native = self._native_up_probability(matrix)
        report = compare_up_probabilities(native, graph.up_probability(matrix), validated_threshold(self.decision_threshold), tolerance)
        return require_parity(report, what)

    def check_serving_parity(self, X: Any, tolerance: float = PARITY_TOLERANCE) -> ParityReport:
        """Compare the loaded ONNX graph's P(up) with the native models' on the rows X.

        Raises ParityError when they differ by more than `tolerance` anywhere (the pipeline runs this on
        the holdout before a promotion), ValueError when the model serves no graph.
        """
        if self.serving_backend != "onnx":
            raise ValueError("this model serves no ONNX graph (fitted in memory, or loaded natively): load it with backend='onnx'")
        return self._parity(self.onnx_graph_, X, tolerance, f"model {self.model_sha256_}")

    def predict_proba(self, X: Any) -> np.ndarray:
        """Columns P(class 0), P(class 1): the weighted average of the components' probabilities."""
        up = self._up_probability(X)
        return np.column_stack([1.0 - up, up])

    def predict(self, X: Any) -> np.ndarray:
        """1 where P(up) >= decision_threshold: the same P(up) as predict_proba, so the two always agree."""
        threshold = validated_threshold(self.decision_threshold)
        is_up = self._up_probability(X) >= threshold
        return self.classes_[is_up.astype(np.int64)]

    def _model_section(self, files: dict[str, FileEntry]) -> ModelSection:
        hyperparameters = _json_ready(_library_params(self.model_params, self.random_state, self.n_jobs), "model_params")
        validated = hyperparameters["random_forest"]  # any model's arguments hold the checked seed and threads
        # Parsed from plain data, exactly as load reads it back, so the model hash is the same on both sides.
        return ModelSection.parse(
            {
                "weights": self.weights_,
                "decision_threshold": validated_threshold(self.decision_threshold),
                "random_state": validated["random_state"],
                "n_jobs": validated["n_jobs"],
                "hyperparameters": hyperparameters,
                "feature_names": list(FEATURE_NAMES),
                "feature_spec_hash": feature_spec_hash(),
                "feature_manager_version": FEATURE_VERSION,
                "files": {name: asdict(entry) for name, entry in files.items()},
                "trading_rule": self.rule.as_json(),
            },
            "model",
        )

    def get_model_info(self) -> dict[str, Any]:
        """What the model is and where it came from; model_sha256 and version_info are those of the last save or load."""
        check_is_fitted(self, _FITTED_ATTRIBUTES)
        return {
            **{key: value for key, value in asdict(self._model_section(files={})).items() if key != "files"},
            "backend": self.serving_backend,
            "model_sha256": self.model_sha256_,
            "version_info": dict(self.version_info_),
            "library_versions": dict(self.library_versions_),
        }

    def save(
        self, path: Path, version_info: Mapping[str, Any] | None = None, parity_rows: Any = None, oos_predictions: bytes | None = None
    ) -> str:
        """Write the model directory and return its model hash ("sha256:<hex>").

        The ONNX graph is exported from the fitted models. With `parity_rows` (feature rows, e.g. every
        row the model will score) its P(up) must match the native models' there within
        PARITY_TOLERANCE, else ParityError before anything is written. `oos_predictions`, the
        out-of-sample record of the retrain policy that made the model, is stored and hashed with it.

        The old manifest is removed first and the new one written last, each file atomically, so an
        interrupted save leaves a directory that load refuses rather than a mix of two models; then
        the files of any older model are removed. For a directory that readers load while it changes
        (models/production), use cryptoml.release.promotion.promote instead.
        """
        check_is_fitted(self, _FITTED_ATTRIBUTES)
        provenance = _json_ready(dict(version_info or {}), "version_info")
        directory = Path(path)
        # Imported here: the converters cost about a second of imports that loading and predicting never need.
        from cryptoml.model.onnx_export import export_onnx

        graph = export_onnx(self.lightgbm_booster_, self.xgboost_booster_, self.random_forest_, self.weights_, list(FEATURE_NAMES))
        if parity_rows is not None:
            self._parity(OnnxGraph(graph), parity_rows, PARITY_TOLERANCE, f"saving to {directory}")
        payloads = {
            "lightgbm": _lightgbm_bytes(self.lightgbm_booster_),
            "xgboost": _xgboost_bytes(self.xgboost_booster_),
            "random_forest": _random_forest_bytes(self.random_forest_),
            ONNX_GRAPH: pack_graph(graph),
            **({OOS_PREDICTIONS: oos_predictions} if oos_predictions is not None else {}),
        }
        entries = {name: FileEntry.of(name, data) for name, data in payloads.items()}
        section = self._model_section(entries)
        library_versions = _library_versions()
        manifest = Manifest(
            format=MANIFEST_FORMAT,
            model_sha256=section.sha256(),
            model=section,
            library_versions=library_versions,
            version_info=provenance,
        )
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        for name, data in payloads.items():
            write_bytes_atomic(directory / entries[name].name, data)
        write_bytes_atomic(directory / MANIFEST_NAME, dump_json(manifest.as_json()).encode())
        prune_components(directory, keep={entry.name for entry in entries.values()})
        self.model_sha256_ = manifest.model_sha256
        self.version_info_ = provenance
        self.library_versions_ = library_versions
        return manifest.model_sha256

    @classmethod
    def load(cls, path: Path | None = None, backend: str | None = None) -> ProductionEnsemble:
        """Load a saved model (default: models/production under the working directory).

        Every file's size and sha256 are checked against the manifest before it is parsed; any
        problem is an ArtifactError naming the file. There is no fallback model.

        `backend`: "onnx" serves predict and predict_proba through the model's ONNX graph (an
        ArtifactError if it has none), "native" through the three native models; None (the default)
        takes the environment variable CRYPTOML_BACKEND if set, else the graph when the model has
        one. get_model_info()["backend"] says which is in use.
        """
        directory = PRODUCTION_DIR if path is None else Path(path)
        chosen = requested_backend(backend)
        _, manifest, payloads = read_model(directory)
        if chosen == "onnx" and ONNX_GRAPH not in payloads:
            raise ArtifactError(
                f"{directory / MANIFEST_NAME}: a {manifest.format} model has no ONNX graph to serve; "
                "load it with backend='native' or retrain it"
            )
        serves_graph = chosen != "native" and ONNX_GRAPH in payloads
        parsers = {
            "lightgbm": _parse_lightgbm,
            "xgboost": _parse_xgboost,
            "random_forest": _parse_random_forest,
            ONNX_GRAPH: _parse_onnx,
        }
        components: dict[str, Any] = {}
        for name in (*MODEL_NAMES, *([ONNX_GRAPH] if serves_graph else [])):
            try:
                components[name] = parsers[name](payloads[name])
            except Exception as exc:  # the libraries raise their own error types; all mean "unusable file"
                file_path = directory / manifest.model.files[name].name
                raise ArtifactError(f"{file_path}: hash verified but the file cannot be loaded: {exc}") from exc
        section = manifest.model
        model = cls(
            weights=section.weights,
            model_params=_caller_params(section.hyperparameters),
            decision_threshold=section.decision_threshold,
            random_state=section.random_state,
            n_jobs=section.n_jobs,
            trading_rule=None if section.trading_rule is None else section.rule,
        )
        model._set_fitted(
            components["lightgbm"],
            components["xgboost"],
            components["random_forest"],
            dict(section.weights),
            onnx_graph=components.get(ONNX_GRAPH),
        )
        model.model_sha256_ = manifest.model_sha256
        model.version_info_ = dict(manifest.version_info)
        model.library_versions_ = dict(manifest.library_versions)
        return model
