"""A saved model's files on disk: the manifest `ensemble.json`, its format, and the verified read.

Kept apart from cryptoml.model.ensemble so that a process that only serves (cryptoml.live.serving.ServingModel)
verifies a model without importing scikit-learn, pandas, LightGBM or XGBoost; it needs only the
standard library and the feature spec (a pydantic schema would cost a serving process 16 MB).

Component files are content-addressed (`<model>-<first 16 hex of sha256><suffix>`): other bytes
always get another name, so a new model's files can be put beside an old model's without touching a
file the old manifest lists, and only the atomic swap of the manifest switches a directory from one
model to the other (see cryptoml.release.promotion). The manifest may name only these exact names, so it
cannot point outside its directory. Every file's size and sha256 are checked before it is parsed.

Formats: "cryptoml-ensemble/5" (written) lists the three model files, the ONNX graph and, for a model
made by the pipeline, the out-of-sample record of the retrain policy that made it (CSV: the
predictions and positions the promotion gate compares with the next challenger's, so they are hashed
with the model); its model section holds the trading rule (cryptoml.model.rule), so the rule is part of
the model hash. "cryptoml-ensemble/4" has no trading rule (it trades as it was served: long while
P(up) >= its decision threshold), "cryptoml-ensemble/3" no record either, and "cryptoml-ensemble/2" no
graph (it loads natively). All still load, so older production models can be rolled back to.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from cryptoml.features.spec import FEATURE_NAMES, FEATURE_VERSION, feature_spec_hash
from cryptoml.model.rule import TradingRule

MODEL_NAMES: tuple[str, ...] = ("lightgbm", "xgboost", "random_forest")

MANIFEST_NAME = "ensemble.json"
MANIFEST_FORMAT = "cryptoml-ensemble/5"
ONNX_GRAPH = "onnx"  # the manifest's key for the graph file, beside the model names
OOS_PREDICTIONS = "oos_predictions"  # the key of the out-of-sample record
# The files each readable format lists, by key: exactly the required ones, plus any of the optional ones.
_FORMAT_FILES: dict[str, tuple[str, ...]] = {
    "cryptoml-ensemble/2": MODEL_NAMES,
    "cryptoml-ensemble/3": (*MODEL_NAMES, ONNX_GRAPH),
    "cryptoml-ensemble/4": (*MODEL_NAMES, ONNX_GRAPH),
    MANIFEST_FORMAT: (*MODEL_NAMES, ONNX_GRAPH),
}
_OPTIONAL_FILES: dict[str, tuple[str, ...]] = {"cryptoml-ensemble/4": (OOS_PREDICTIONS,), MANIFEST_FORMAT: (OOS_PREDICTIONS,)}
# The formats whose model section holds a trading rule.
_RULE_FORMATS = frozenset({MANIFEST_FORMAT})
COMPONENT_SUFFIXES: dict[str, str] = {
    "lightgbm": ".txt", "xgboost": ".ubj", "random_forest": ".skops", ONNX_GRAPH: ".onnx.gz", OOS_PREDICTIONS: ".csv",
}
# Hex digits of a file's sha256 in its name: 64 bits make two different files of one model sharing a
# name practically impossible, and load would still refuse such a file, since it checks the full sha256.
_NAME_DIGEST_LENGTH = 16
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_COMPONENT_FILE_NAME = re.compile(
    "|".join(rf"{name}-[0-9a-f]{{{_NAME_DIGEST_LENGTH}}}{re.escape(suffix)}" for name, suffix in COMPONENT_SUFFIXES.items())
)
# The temporary files of io.atomic_path (".<name>.<random>.tmp") that a killed writer leaves behind.
_ATOMIC_LEFTOVER = re.compile(r"\..+\.tmp")


class ArtifactError(Exception):
    """A saved model is missing, truncated, modified, malformed or built for other features."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _component_file_name(model_name: str, sha256: str) -> str:
    return f"{model_name}-{sha256.removeprefix('sha256:')[:_NAME_DIGEST_LENGTH]}{COMPONENT_SUFFIXES[model_name]}"


# --- the model section's values -------------------------------------------------------------------


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights normalised to sum 1; all three models must be named, so a typo cannot drop one."""
    unknown = sorted(str(name) for name in weights if name not in MODEL_NAMES)
    if unknown:
        raise ValueError(f"unknown model name(s) in weights: {unknown}; expected exactly {list(MODEL_NAMES)}")
    missing = [name for name in MODEL_NAMES if name not in weights]
    if missing:
        raise ValueError(f"weights lack model(s) {missing}: give all of {list(MODEL_NAMES)} (0 takes a model out of the vote)")
    values: dict[str, float] = {}
    for name in MODEL_NAMES:
        values[name] = _as_float(weights[name])
        if not (math.isfinite(values[name]) and values[name] >= 0):
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weights[name]!r}")
    total = sum(values.values())
    if total == 0:
        raise ValueError(f"all weights are 0: at least one of {list(MODEL_NAMES)} must vote")
    return {name: value / total for name, value in values.items()}


def _as_float(value: Any) -> float:
    """The value as a float, NaN for anything that is not a number, so callers give one clear error."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def validated_threshold(threshold: Any) -> float:
    value = _as_float(threshold)
    if not 0.0 < value < 1.0:
        raise ValueError(f"decision_threshold must be in (0, 1): 'up' is predicted when P(up) >= it; got {threshold!r}")
    return value


def validated_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    in_range = isinstance(value, numbers.Integral) and low <= value and (high is None or value <= high)
    if isinstance(value, bool) or not in_range:
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return int(value)


class _Invalid(ValueError):
    """A manifest value of the wrong shape; the message names its key."""


def _object(data: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """`data` if it is a JSON object with exactly `keys` (an edited or foreign manifest has others)."""
    if not isinstance(data, dict):
        raise _Invalid(f"{where} must be an object, got {type(data).__name__}")
    missing, unexpected = [k for k in keys if k not in data], sorted(set(data) - set(keys))
    if missing or unexpected:
        raise _Invalid(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
    return data


def _typed(value: Any, kind: type, where: str) -> Any:
    """`value` if it is a `kind` (str, int or float; an int is a float too, a bool is neither), floats as float."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is float and is_number:
        return float(value)
    if (kind is int and is_number and isinstance(value, int)) or (kind is str and isinstance(value, str)):
        return value
    raise _Invalid(f"{where} must be {kind.__name__}, got {value!r}")


def _mapping(data: Any, where: str, value: Any) -> dict[str, Any]:
    """A JSON object with string keys, each value passed through `value(item, where_of_item)`."""
    if not isinstance(data, dict):
        raise _Invalid(f"{where} must be an object, got {type(data).__name__}")
    return {key: value(item, f"{where}.{key}") for key, item in data.items()}


@dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    size: int

    @classmethod
    def of(cls, model_name: str, data: bytes) -> FileEntry:
        sha256 = sha256_digest(data)
        return cls(name=_component_file_name(model_name, sha256), sha256=sha256, size=len(data))

    @classmethod
    def parse(cls, data: Any, where: str) -> FileEntry:
        fields = _object(data, ("name", "sha256", "size"), where)
        sha256 = _typed(fields["sha256"], str, f"{where}.sha256")
        if not _SHA256.fullmatch(sha256):
            raise _Invalid(f"{where}.sha256 must be 'sha256:' and 64 lowercase hex digits, got {sha256!r}")
        return cls(name=_typed(fields["name"], str, f"{where}.name"), sha256=sha256, size=_typed(fields["size"], int, f"{where}.size"))


@dataclass(frozen=True)
class ModelSection:
    """Everything that decides a prediction; its hash is the model hash."""

    weights: dict[str, float]
    decision_threshold: float
    random_state: int
    n_jobs: int
    hyperparameters: dict[str, dict[str, Any]]
    feature_names: list[str]
    feature_spec_hash: str
    feature_manager_version: str
    files: dict[str, FileEntry]  # by model name
    trading_rule: dict[str, float | None] | None = None  # TradingRule.as_json(); None in formats before 5

    def as_json(self) -> dict[str, Any]:
        """The section as stored: without a trading_rule key in the formats that have none, so their hash holds."""
        data = asdict(self)
        if self.trading_rule is None:
            del data["trading_rule"]
        return data

    def sha256(self) -> str:
        canonical = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return sha256_digest(canonical.encode())

    @property
    def rule(self) -> TradingRule:
        """The rule the model trades; a model saved before rules existed trades as it was served then."""
        if self.trading_rule is None:
            return TradingRule.threshold(self.decision_threshold)
        return TradingRule.from_json(self.trading_rule, "model.trading_rule")

    @classmethod
    def parse(cls, data: Any, where: str) -> ModelSection:
        keys = tuple(field.name for field in dataclass_fields(cls))
        fields = _object(data, keys if isinstance(data, dict) and "trading_rule" in data else keys[:-1], where)
        rule = fields.get("trading_rule")
        names = fields["feature_names"]
        if not isinstance(names, list):
            raise _Invalid(f"{where}.feature_names must be a list, got {type(names).__name__}")
        return cls(
            weights=_mapping(fields["weights"], f"{where}.weights", lambda value, at: _typed(value, float, at)),
            decision_threshold=_typed(fields["decision_threshold"], float, f"{where}.decision_threshold"),
            random_state=_typed(fields["random_state"], int, f"{where}.random_state"),
            n_jobs=_typed(fields["n_jobs"], int, f"{where}.n_jobs"),
            hyperparameters=_mapping(fields["hyperparameters"], f"{where}.hyperparameters", lambda value, at: _mapping(value, at, lambda item, _: item)),
            feature_names=[_typed(name, str, f"{where}.feature_names[{i}]") for i, name in enumerate(names)],
            feature_spec_hash=_typed(fields["feature_spec_hash"], str, f"{where}.feature_spec_hash"),
            feature_manager_version=_typed(fields["feature_manager_version"], str, f"{where}.feature_manager_version"),
            files=_mapping(fields["files"], f"{where}.files", FileEntry.parse),
            trading_rule=None if rule is None else _mapping(rule, f"{where}.trading_rule", lambda value, _: value),
        )


@dataclass(frozen=True)
class Manifest:
    format: str
    model_sha256: str
    model: ModelSection
    library_versions: dict[str, str]
    version_info: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "model": self.model.as_json()}

    @classmethod
    def parse(cls, text: bytes) -> Manifest:
        """The manifest in `text`; _Invalid names the first key of the wrong shape."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Invalid(f"not JSON: {exc}") from None
        fields = _object(data, tuple(field.name for field in dataclass_fields(cls)), "the manifest")
        return cls(
            format=_typed(fields["format"], str, "format"),
            model_sha256=_typed(fields["model_sha256"], str, "model_sha256"),
            model=ModelSection.parse(fields["model"], "model"),
            library_versions=_mapping(fields["library_versions"], "library_versions", lambda value, at: _typed(value, str, at)),
            version_info=_mapping(fields["version_info"], "version_info", lambda item, _: item),
        )


def _read_manifest_bytes(directory: Path) -> bytes:
    path = directory / MANIFEST_NAME
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: manifest missing, so there is no complete model in {directory}") from None


def _parse_manifest(text: bytes, path: Path) -> Manifest:
    """The manifest, if it is a readable format, unedited, and names exactly the content-addressed files of its format."""
    try:
        manifest = Manifest.parse(text)
    except _Invalid as exc:
        raise ArtifactError(f"{path}: not a valid {MANIFEST_FORMAT} manifest: {exc}") from None
    if manifest.format not in _FORMAT_FILES:
        raise ArtifactError(f"{path}: format {manifest.format!r}, this code reads {sorted(_FORMAT_FILES)}")
    if (manifest.model.trading_rule is not None) != (manifest.format in _RULE_FORMATS):
        has = "has" if manifest.model.trading_rule is not None else "lacks"
        raise ArtifactError(f"{path}: a {manifest.format} manifest {has} model.trading_rule (formats with one: {sorted(_RULE_FORMATS)})")
    if manifest.model.sha256() != manifest.model_sha256:
        raise ArtifactError(
            f"{path}: model_sha256 {manifest.model_sha256} does not match the hash of its model section "
            f"({manifest.model.sha256()}): the manifest was edited"
        )
    try:  # a checksum, not a signature: a forger can re-hash impossible values
        _check_model_values(manifest.model)
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    expected_files = _FORMAT_FILES[manifest.format]
    optional = _OPTIONAL_FILES.get(manifest.format, ())
    if not set(expected_files) <= set(manifest.model.files) <= {*expected_files, *optional}:
        raise ArtifactError(
            f"{path}: lists files of {sorted(manifest.model.files)}, expected exactly {list(expected_files)}"
            f"{f' and optionally {list(optional)}' if optional else ''} ({manifest.format})"
        )
    for model_name, entry in manifest.model.files.items():
        expected = _component_file_name(model_name, entry.sha256)
        if entry.name != expected:
            raise ArtifactError(
                f"{path}: the {model_name} file is named {entry.name!r}; only {expected!r} is accepted "
                f"({model_name}-<first {_NAME_DIGEST_LENGTH} hex of its sha256>{COMPONENT_SUFFIXES[model_name]}, "
                "a plain name inside the model directory)"
            )
    return manifest


def _check_model_values(model: ModelSection) -> None:
    """The values save() validated, checked again: load must not serve a model that save would have refused."""
    if model.feature_names != list(FEATURE_NAMES):
        raise ValueError(f"model.feature_names {model.feature_names} are not the FeatureManager's {list(FEATURE_NAMES)} in order")
    validate_weights(model.weights)
    validated_threshold(model.decision_threshold)
    _ = model.rule  # a trading rule that TradingRule refuses (exit above entry, outside (0, 1]) raises ValueError
    validated_int("model.n_jobs", model.n_jobs, 1)
    validated_int("model.random_state", model.random_state, 0, 2**31 - 1)


def _require_current_features(manifest: Manifest, path: Path) -> None:
    if manifest.model.feature_spec_hash != feature_spec_hash():
        raise ArtifactError(
            f"{path}: the model was trained on feature spec {manifest.model.feature_spec_hash} "
            f"(FeatureManager {manifest.model.feature_manager_version}) but the current FeatureManager "
            f"{FEATURE_VERSION} has spec {feature_spec_hash()}: retrain the model"
        )


def _read_verified(path: Path, expected: FileEntry) -> bytes:
    """The file's bytes, only if their size and sha256 match the manifest (FileNotFoundError if it is gone)."""
    data = path.read_bytes()
    if len(data) != expected.size:
        raise ArtifactError(f"{path}: {len(data)} bytes, the manifest says {expected.size} (truncated or overwritten)")
    actual = sha256_digest(data)
    if actual != expected.sha256:
        raise ArtifactError(f"{path}: sha256 {actual} differs from the manifest's {expected.sha256} (modified)")
    return data


# Manifests one load may read when promotions swap the manifest and remove files while it reads.
_MANIFEST_READS = 3


def read_model(directory: Path, keep: Collection[str] | None = None) -> tuple[bytes, Manifest, dict[str, bytes]]:
    """The manifest (bytes and parsed) and the verified file bytes of the models named in `keep` (default all).

    Every listed file is verified, kept or not (a serving process keeps only the graph, to save memory).

    A promotion keeps the files of one previous manifest, so a reader slower than two promotions can
    find a listed file gone; when the manifest has changed meanwhile, the read starts over from the new
    one instead of failing. A file missing under an unchanged manifest is an error.
    """
    path = directory / MANIFEST_NAME
    text = _read_manifest_bytes(directory)
    for _ in range(_MANIFEST_READS):
        manifest = _parse_manifest(text, path)
        _require_current_features(manifest, path)
        payloads = {}
        try:
            for name, entry in manifest.model.files.items():
                data = _read_verified(directory / entry.name, entry)
                if keep is None or name in keep:
                    payloads[name] = data
        except FileNotFoundError as exc:
            latest = _read_manifest_bytes(directory)
            if latest == text:
                raise ArtifactError(f"{exc.filename}: missing (listed in {MANIFEST_NAME})") from None
            text = latest
        else:
            return text, manifest, payloads
    raise ArtifactError(f"{path}: replaced {_MANIFEST_READS} times while its files were being read; retry the load")


@dataclass(frozen=True)
class ModelArtifacts:
    """A saved model's exact bytes, each file verified against the manifest: what a promotion copies."""

    manifest: bytes
    model_sha256: str
    files: Mapping[str, bytes]  # component file name -> its bytes


def read_artifacts(directory: Path) -> ModelArtifacts:
    """The verified bytes of the model in `directory` (ArtifactError, like load, if anything is wrong)."""
    text, manifest, payloads = read_model(Path(directory))
    files = {entry.name: payloads[key] for key, entry in manifest.model.files.items()}
    return ModelArtifacts(manifest=text, model_sha256=manifest.model_sha256, files=files)


def read_oos_predictions(directory: Path) -> bytes | None:
    """The verified out-of-sample record stored with the model in `directory`; None for a model saved without one."""
    _, _, payloads = read_model(Path(directory), keep={OOS_PREDICTIONS})
    return payloads.get(OOS_PREDICTIONS)


def read_unlisted_component(path: Path) -> bytes:
    """The bytes of a component file no manifest lists (a previous model's, which a promotion keeps for readers),
    only if they match its content-addressed name: such a file has no manifest entry to check it against."""
    data = path.read_bytes()
    digest = sha256_digest(data)
    if not any(_component_file_name(model_name, digest) == path.name for model_name in COMPONENT_SUFFIXES):
        raise ArtifactError(f"{path}: its sha256 {digest} does not match its content-addressed name (modified, or not a model file)")
    return data


def is_component_file(name: str) -> bool:
    return _COMPONENT_FILE_NAME.fullmatch(name) is not None


def listed_component_files(directory: Path) -> frozenset[str]:
    """The component files the directory's manifest lists; none when it has no valid manifest to load."""
    path = Path(directory) / MANIFEST_NAME
    try:
        return frozenset(entry.name for entry in _parse_manifest(path.read_bytes(), path).model.files.values())
    except (FileNotFoundError, ArtifactError):
        return frozenset()


def prune_components(directory: Path, keep: Collection[str]) -> list[str]:
    """Remove component files not named in `keep` and temporaries a killed atomic write left behind.

    Returns the removed names. Other files in the directory (manifest, metadata) are never touched.
    """
    removed = []
    for path in sorted(Path(directory).iterdir()):
        is_stale_component = _COMPONENT_FILE_NAME.fullmatch(path.name) is not None and path.name not in keep
        if is_stale_component or _ATOMIC_LEFTOVER.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
