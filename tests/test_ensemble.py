"""ProductionEnsemble: estimator contract, input checks, and safe, hashed, byte-reproducible artifacts."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.preprocessing import FunctionTransformer

from cryptoml.features.manager import FEATURE_NAMES, FEATURE_VERSION, FeatureManager
from cryptoml.features.spec import FEATURE_PARAMS
from cryptoml.live.serving import ServingModel
from cryptoml.model import artifacts as artifacts_module
from cryptoml.model import ensemble as ensemble_module
from cryptoml.model.artifacts import COMPONENT_SUFFIXES, MANIFEST_FORMAT, MANIFEST_NAME, MODEL_NAMES, ArtifactError, validate_weights
from cryptoml.model.ensemble import DEFAULT_WEIGHTS, ProductionEnsemble

# Few, shallow trees: the contract does not depend on model size and the tests stay fast.
SMALL_PARAMS = {name: {"n_estimators": 8} for name in MODEL_NAMES}
N_ROWS = 400


def make_data(n_rows: int = N_ROWS, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """Random features with a learnable signal; a string index so row labels differ from positions."""
    rng = np.random.default_rng(seed)
    index = pd.Index([f"bar-{i}" for i in range(n_rows)])
    X = pd.DataFrame(rng.normal(size=(n_rows, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES), index=index)
    y = ((X["close"] - X["rsi_14"] + rng.normal(scale=0.7, size=n_rows)) > 0).astype(np.int64)
    return X, y


def fit_small(**params: Any) -> ProductionEnsemble:
    X, y = make_data()
    return ProductionEnsemble(model_params=SMALL_PARAMS, **params).fit(X, y)


def fit_on_other_data() -> ProductionEnsemble:
    """A model whose every component file differs from fit_small's (a new seed alone leaves XGBoost's unchanged)."""
    return ProductionEnsemble(model_params=SMALL_PARAMS).fit(*make_data(seed=1))


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.Series]:
    return make_data()


@pytest.fixture(scope="module")
def fitted() -> ProductionEnsemble:
    return fit_small()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    fit_small().save(directory, version_info={"git_commit": "abc123"})
    return directory


@pytest.fixture
def model_copy(saved_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the saved model that a test may damage."""
    return Path(shutil.copytree(saved_dir, tmp_path / "model"))


def component_files(directory: Path) -> dict[str, str]:
    """Model name -> the component file name its manifest lists."""
    files = json.loads((directory / MANIFEST_NAME).read_text())["model"]["files"]
    return {name: entry["name"] for name, entry in files.items()}


def rewrite_model_section(directory: Path, edit: Any) -> None:
    """Apply `edit` to the manifest's model section and re-hash it, as a forger who knows the format would."""
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest["model"])
    canonical = json.dumps(manifest["model"], sort_keys=True, separators=(",", ":"))
    manifest["model_sha256"] = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(manifest))


# --- estimator contract -------------------------------------------------------------------------


def test_fit_sets_the_sklearn_fitted_attributes(fitted: ProductionEnsemble) -> None:
    assert fitted.is_fitted
    assert fitted.classes_.tolist() == [0, 1]
    assert fitted.n_features_in_ == len(FEATURE_NAMES)
    assert fitted.feature_names_in_.tolist() == list(FEATURE_NAMES)
    assert fitted.weights_ == validate_weights(DEFAULT_WEIGHTS)


def test_get_params_survive_clone_and_set_params(fitted: ProductionEnsemble) -> None:
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert not copy.is_fitted
    assert copy.set_params(decision_threshold=0.7).get_params()["decision_threshold"] == 0.7


@pytest.mark.parametrize("method", ["predict", "predict_proba", "component_proba"])
def test_unfitted_model_refuses_to_predict(method: str, data: tuple[pd.DataFrame, pd.Series]) -> None:
    model = ProductionEnsemble()
    assert not model.is_fitted
    with pytest.raises(NotFittedError):
        getattr(model, method)(data[0])


def test_unfitted_model_has_no_info_and_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        ProductionEnsemble().get_model_info()
    with pytest.raises(NotFittedError):
        ProductionEnsemble().save(tmp_path)
    assert not (tmp_path / MANIFEST_NAME).exists()


@pytest.mark.parametrize("threshold", [0.5, 0.35, 0.62])
def test_predict_is_predict_proba_at_the_threshold(threshold: float, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    model = fit_small(decision_threshold=threshold)
    up = model.predict_proba(X)[:, 1]
    predicted = model.predict(X)
    np.testing.assert_array_equal(predicted, (up >= threshold).astype(np.int64))
    assert set(predicted.tolist()) == {0, 1}, "the data should give both classes at these thresholds"


def test_decision_threshold_can_be_changed_after_fit(data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    model = fit_small()
    at_default = model.predict(X)
    model.set_params(decision_threshold=0.7)
    at_high = model.predict(X)
    np.testing.assert_array_equal(at_high, (model.predict_proba(X)[:, 1] >= 0.7).astype(np.int64))
    assert at_high.sum() < at_default.sum()


def test_predict_proba_is_the_weighted_average_of_the_components(data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    raw_weights = {"lightgbm": 1.0, "xgboost": 2.0, "random_forest": 3.0}
    model = fit_small(weights=raw_weights)
    proba = model.predict_proba(X)
    components = model.component_proba(X)
    assert list(components) == list(MODEL_NAMES)
    expected = sum(raw_weights[name] / 6.0 * components[name] for name in MODEL_NAMES)
    np.testing.assert_allclose(proba[:, 1], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert proba.shape == (len(X), 2)
    assert ((proba >= 0) & (proba <= 1)).all()


def test_a_zero_weight_takes_a_model_out_of_the_vote(data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    model = fit_small(weights={"lightgbm": 1.0, "xgboost": 0.0, "random_forest": 0.0})
    np.testing.assert_array_equal(model.predict_proba(X)[:, 1], model.component_proba(X)["lightgbm"])


def test_forest_component_equals_sklearn_predict_proba(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    sklearn_up = fitted.random_forest_.predict_proba(X.to_numpy())[:, 1]
    np.testing.assert_array_equal(fitted.component_proba(X)["random_forest"], sklearn_up)


def test_fit_is_deterministic(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    np.testing.assert_array_equal(fit_small().predict_proba(X), fitted.predict_proba(X))


# --- weights and parameters ---------------------------------------------------------------------


def test_validate_weights_normalises_to_one() -> None:
    assert validate_weights({"lightgbm": 2, "xgboost": 2, "random_forest": 1}) == pytest.approx(DEFAULT_WEIGHTS)
    assert sum(validate_weights({"lightgbm": 3, "xgboost": 5, "random_forest": 0}).values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"lightgbm": -0.1, "xgboost": 0.5, "random_forest": 0.6}, "weight of 'lightgbm' must be a finite number >= 0"),
        ({"lightgbm": float("nan"), "xgboost": 0.5, "random_forest": 0.5}, "weight of 'lightgbm'"),
        ({"lightgbm": 0.5, "xgboost": float("inf"), "random_forest": 0.5}, "weight of 'xgboost'"),
        ({"lightgbm": 0.5, "xgboost": "heavy", "random_forest": 0.5}, "weight of 'xgboost'"),
        ({"lightgbm": 0, "xgboost": 0, "random_forest": 0}, "all weights are 0"),
        ({"lightgbm": 0.4, "xgboost": 0.4, "random_forest": 0.2, "catboost": 0.1}, r"unknown model name\(s\) in weights: \['catboost'\]"),
        ({"lightgbm": 0.5, "xgboost": 0.5}, r"lack model\(s\) \['random_forest'\]"),
    ],
)
def test_validate_weights_refuses(weights: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_weights(weights)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"weights": {"lightgbm": 1.0}}, "lack model"),
        ({"model_params": {"catboost": {}}}, r"unknown model name\(s\) in model_params: \['catboost'\]"),
        ({"model_params": {"lightgbm": {"seed": 1}}}, r"model_params\['lightgbm'\] sets \['seed'\]"),
        ({"model_params": {"xgboost": {"n_jobs": 4}}}, r"model_params\['xgboost'\] sets \['n_jobs'\]"),
        ({"decision_threshold": 1.0}, "decision_threshold must be in"),
        ({"decision_threshold": float("nan")}, "decision_threshold must be in"),
        ({"n_jobs": 0}, "n_jobs must be an integer"),
        ({"random_state": -1}, "random_state must be an integer"),
    ],
)
def test_fit_refuses_bad_parameters(params: dict[str, Any], message: str, data: tuple[pd.DataFrame, pd.Series]) -> None:
    with pytest.raises(ValueError, match=message):
        ProductionEnsemble(**params).fit(*data)


# --- input checks -------------------------------------------------------------------------------


def test_dataframe_columns_are_matched_by_name(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    shuffled = X[list(reversed(FEATURE_NAMES))]
    np.testing.assert_array_equal(fitted.predict_proba(shuffled), fitted.predict_proba(X))
    np.testing.assert_array_equal(fitted.predict_proba(X.to_numpy()), fitted.predict_proba(X))


def test_missing_and_unexpected_columns_are_listed(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    renamed = X.drop(columns=["macd"]).assign(sentiment=0.0)
    with pytest.raises(ValueError, match=r"missing \['macd'\], unexpected \['sentiment'\]"):
        fitted.predict_proba(renamed)


def test_duplicated_columns_are_refused(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    with pytest.raises(ValueError, match=r"duplicated columns \['close'\]"):
        fitted.predict(pd.concat([X, X[["close"]]], axis=1))


def test_non_numeric_column_is_named(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, _ = data
    with pytest.raises(ValueError, match=r"\['volume'\] are not numeric"):
        fitted.predict(X.assign(volume="many"))


@pytest.mark.parametrize("shape", [(5, 11), (5, 13), (12,)])
def test_array_must_have_twelve_columns(shape: tuple[int, ...], fitted: ProductionEnsemble) -> None:
    with pytest.raises(ValueError, match=rf"shape \(n_rows, 12\).*got shape {re.escape(str(shape))}"):
        fitted.predict_proba(np.zeros(shape))


def test_empty_input_is_refused(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    with pytest.raises(ValueError, match="no rows"):
        fitted.predict(data[0].iloc[:0])


def test_non_finite_rows_are_named_by_index_label(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X = data[0].copy()
    X.loc["bar-3", "ema_20"] = np.nan
    X.loc["bar-7", "zscore"] = np.inf
    with pytest.raises(ValueError, match=r"2 row\(s\) contain NaN or inf \(first index labels \['bar-3', 'bar-7'\]; in columns \['ema_20', 'zscore'\]\)"):
        fitted.predict_proba(X)


def test_non_finite_rows_are_named_by_position_and_counted(fitted: ProductionEnsemble, data: tuple[pd.DataFrame, pd.Series]) -> None:
    matrix = data[0].to_numpy().copy()
    bad_positions = [1, 4, 9, 16, 25, 36, 49]
    matrix[bad_positions, 0] = -np.inf
    with pytest.raises(ValueError, match=r"7 row\(s\) contain NaN or inf \(first positions \[1, 4, 9, 16, 25\]; in columns \['close'\]\)"):
        fitted.component_proba(matrix)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (lambda y: y * 0 + 1, "only class 1"),
        (lambda y: y * 2, r"must be 0 \(not up\) or 1 \(up\), got \[2\]"),
        (lambda y: y.to_numpy()[:-1], "one label per row"),
        (lambda y: y.reset_index(drop=True), "index differs"),
    ],
)
def test_fit_refuses_bad_labels(labels: Any, message: str, data: tuple[pd.DataFrame, pd.Series]) -> None:
    X, y = data
    with pytest.raises(ValueError, match=message):
        ProductionEnsemble(model_params=SMALL_PARAMS).fit(X, labels(y))


# --- artifacts ----------------------------------------------------------------------------------


def test_save_load_round_trip_predicts_identically(data: tuple[pd.DataFrame, pd.Series], tmp_path: Path) -> None:
    """The native files round-trip bit for bit (the ONNX graph's parity is tested in test_serving)."""
    X, _ = data
    model = fit_small(decision_threshold=0.45)
    model_sha256 = model.save(tmp_path, version_info={"git_commit": "abc123"})
    loaded = ProductionEnsemble.load(tmp_path, backend="native")
    assert isinstance(loaded.lightgbm_booster_, lightgbm.Booster)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    for name, proba in model.component_proba(X).items():
        np.testing.assert_array_equal(loaded.component_proba(X)[name], proba)
    assert loaded.get_model_info() == model.get_model_info()
    assert loaded.get_model_info()["model_sha256"] == model_sha256
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["model_sha256"] == model_sha256


def test_a_loaded_model_refits_to_the_same_bytes(saved_dir: Path, tmp_path: Path) -> None:
    """get_params of a loaded model are complete: clone + fit reproduces the saved model."""
    refit = clone(ProductionEnsemble.load(saved_dir)).fit(*make_data())
    assert refit.save(tmp_path, version_info={"git_commit": "abc123"}) == ProductionEnsemble.load(saved_dir).model_sha256_


def test_saves_are_byte_identical_across_fits_and_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fits saved a year apart give the same files (skops zips carry no clock or memory address)."""
    first = fit_small().save(tmp_path / "a", version_info={"git_commit": "abc123"})
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 365 * 86400)
    second = fit_small().save(tmp_path / "b", version_info={"git_commit": "abc123"})
    assert first == second
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == sorted([MANIFEST_NAME, *component_files(tmp_path / "a").values()])
    assert names == sorted(path.name for path in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow
def test_saves_are_byte_identical_across_processes(tmp_path: Path) -> None:
    """The real rerun: separate interpreters (other memory addresses, hash seeds), default model size."""
    script = (
        "import sys; from pathlib import Path; from tests.test_ensemble import make_data;"
        "from cryptoml.model.ensemble import ProductionEnsemble;"
        "print(ProductionEnsemble(n_jobs=2).fit(*make_data(2000)).save(Path(sys.argv[1])))"
    )
    root = Path(__file__).resolve().parents[1]
    hashes = [
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run)], cwd=root, check=True, capture_output=True, text=True).stdout
        for run in ("a", "b")
    ]
    assert hashes[0] == hashes[1]
    for name in [MANIFEST_NAME, *component_files(tmp_path / "a").values()]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_model_hash_covers_the_threshold_but_not_version_info(tmp_path: Path) -> None:
    model = fit_small()
    base = model.save(tmp_path / "a", version_info={"git_commit": "abc123"})
    assert model.save(tmp_path / "b", version_info={"git_commit": "def456", "data_end": "2025-01-01"}) == base
    assert model.set_params(decision_threshold=0.6).save(tmp_path / "c") != base


def test_component_files_are_named_after_their_content(saved_dir: Path) -> None:
    for model_name, file_name in component_files(saved_dir).items():
        digest = hashlib.sha256((saved_dir / file_name).read_bytes()).hexdigest()
        assert file_name == f"{model_name}-{digest[:16]}{COMPONENT_SUFFIXES[model_name]}"


def test_save_replaces_an_older_model_and_removes_its_files(saved_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(saved_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "notes.txt").write_text("not a model file")
    newer_sha256 = fit_on_other_data().save(tmp_path)
    assert ProductionEnsemble.load(tmp_path).model_sha256_ == newer_sha256 != ProductionEnsemble.load(saved_dir).model_sha256_
    assert set(component_files(saved_dir).values()).isdisjoint(component_files(tmp_path).values()), "all files should change"
    expected = {MANIFEST_NAME, "notes.txt", *component_files(tmp_path).values()}
    assert {path.name for path in tmp_path.iterdir()} == expected


def test_version_info_must_be_plain_json(fitted: ProductionEnsemble, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version_info must be plain JSON"):
        fitted.save(tmp_path, version_info={"created_at": pd.Timestamp("2025-01-01")})


def test_get_model_info_describes_the_model(tmp_path: Path) -> None:
    model = fit_small(weights={"lightgbm": 2, "xgboost": 1, "random_forest": 1}, decision_threshold=0.55, random_state=7)
    info = model.get_model_info()
    assert info["model_sha256"] is None, "not saved yet"
    assert info["weights"] == {"lightgbm": 0.5, "xgboost": 0.25, "random_forest": 0.25}
    assert info["decision_threshold"] == 0.55
    assert info["feature_names"] == list(FEATURE_NAMES)
    assert info["feature_spec_hash"] == FeatureManager().spec_hash()
    assert info["feature_manager_version"] == FEATURE_VERSION
    assert info["library_versions"]["lightgbm"] == lightgbm.__version__
    assert info["hyperparameters"]["lightgbm"]["n_estimators"] == SMALL_PARAMS["lightgbm"]["n_estimators"]
    assert info["hyperparameters"]["lightgbm"]["deterministic"] is True
    assert info["hyperparameters"]["random_forest"]["random_state"] == 7
    version_info = {"git_commit": "abc123", "data_end": "2025-01-01T00:00:00Z", "n_rows": np.int64(N_ROWS)}
    model_sha256 = model.save(tmp_path, version_info=version_info)
    saved_info = model.get_model_info()
    assert saved_info["model_sha256"] == model_sha256
    assert saved_info["version_info"] == version_info
    assert type(saved_info["version_info"]["n_rows"]) is int, "numpy scalars are stored as plain JSON numbers"


@pytest.mark.fault
def test_load_defaults_to_models_production(saved_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match=r"models/production/ensemble.json: manifest missing"):
        ProductionEnsemble.load()
    shutil.copytree(saved_dir, tmp_path / "models" / "production")
    assert ProductionEnsemble.load().model_sha256_ == ProductionEnsemble.load(saved_dir).model_sha256_


@pytest.fixture
def parsers_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if load parses any file (it must refuse before parsing)."""

    def refuse(data: bytes) -> None:
        raise AssertionError("a file was parsed before the artifacts were verified")

    for parser in ("_parse_lightgbm", "_parse_xgboost", "_parse_random_forest"):
        monkeypatch.setattr(ensemble_module, parser, refuse)


@pytest.mark.usefixtures("parsers_must_not_run")
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.fault
def test_a_modified_file_is_refused_before_parsing(model_name: str, model_copy: Path) -> None:
    file_name = component_files(model_copy)[model_name]
    path = model_copy / file_name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{re.escape(file_name)}: sha256 .* differs from the manifest's .* \(modified\)"):
        ProductionEnsemble.load(model_copy)


@pytest.mark.usefixtures("parsers_must_not_run")
@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.fault
def test_a_truncated_file_is_refused(model_name: str, model_copy: Path) -> None:
    file_name = component_files(model_copy)[model_name]
    path = model_copy / file_name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=rf"{re.escape(file_name)}: 100 bytes, the manifest says \d+ \(truncated"):
        ProductionEnsemble.load(model_copy)


@pytest.mark.usefixtures("parsers_must_not_run")
@pytest.mark.fault
def test_a_missing_file_is_refused(model_copy: Path) -> None:
    file_name = component_files(model_copy)["xgboost"]
    (model_copy / file_name).unlink()
    with pytest.raises(ArtifactError, match=rf"{re.escape(file_name)}: missing \(listed in {MANIFEST_NAME}\)"):
        ProductionEnsemble.load(model_copy)


@pytest.mark.usefixtures("parsers_must_not_run")
@pytest.mark.parametrize(
    "forged_name",
    [
        lambda directory, name: "../escaped.txt",
        lambda directory, name: str(directory.parent / "absolute.txt"),
        lambda directory, name: f"sub/{name}",
        lambda directory, name: name.replace("lightgbm", "xgboost").replace(".txt", ".ubj"),
        lambda directory, name: name.replace(".txt", ".ubj"),
        lambda directory, name: f"lightgbm-{'0' * 16}.txt",
    ],
    ids=["parent", "absolute", "subfolder", "another-models-name", "another-suffix", "digest-not-of-its-bytes"],
)
@pytest.mark.fault
def test_a_manifest_can_name_only_its_own_content_addressed_files(forged_name: Any, model_copy: Path) -> None:
    """Even with the right bytes waiting at the forged place, the name alone is refused."""
    real_name = component_files(model_copy)["lightgbm"]
    name = forged_name(model_copy, real_name)
    target = model_copy / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_copy / real_name, target)
    rewrite_model_section(model_copy, lambda model: model["files"]["lightgbm"].update(name=name))
    with pytest.raises(ArtifactError, match=rf"the lightgbm file is named '{re.escape(name)}'; only '{re.escape(real_name)}' is accepted"):
        ProductionEnsemble.load(model_copy)


def test_a_re_hashed_but_unchanged_manifest_still_loads(model_copy: Path) -> None:
    """The forger's helper above re-hashes the way the loader checks, so the refusals come from the names."""
    before = ProductionEnsemble.load(model_copy).model_sha256_
    rewrite_model_section(model_copy, lambda model: None)
    assert ProductionEnsemble.load(model_copy).model_sha256_ == before


@pytest.mark.parametrize(("swaps", "loads"), [(1, True), (None, False)], ids=["one-swap", "endless-swaps"])
@pytest.mark.fault
def test_a_load_that_races_replacements_restarts_from_the_new_manifest(
    swaps: int | None, loads: bool, model_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory is replaced (old files removed) between reading the manifest and the files.

    One replacement: the load restarts from the new manifest and returns the new model. Replacements
    at every read: it gives up with an error instead of looping forever.
    """
    first = ProductionEnsemble.load(model_copy)
    second = fit_on_other_data()
    second.save(model_copy.parent / "second")
    replacements = itertools.islice(itertools.cycle([second, first]), swaps)
    read_verified = artifacts_module._read_verified

    def replace_then_read(path: Path, expected: Any) -> bytes:
        if path.name.startswith("lightgbm"):
            replacement = next(replacements, None)
            if replacement is not None:
                replacement.save(model_copy)
        return read_verified(path, expected)

    monkeypatch.setattr(artifacts_module, "_read_verified", replace_then_read)
    if loads:
        assert ProductionEnsemble.load(model_copy).model_sha256_ == second.model_sha256_
    else:
        with pytest.raises(ArtifactError, match=r"ensemble.json: replaced 3 times while its files were being read"):
            ProductionEnsemble.load(model_copy)


@pytest.mark.fault
def test_a_missing_manifest_is_refused(model_copy: Path) -> None:
    (model_copy / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError, match="ensemble.json: manifest missing"):
        ProductionEnsemble.load(model_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[: len(text) // 2], f"not a valid {MANIFEST_FORMAT} manifest"),
        (lambda text: text.replace(f'"format": "{MANIFEST_FORMAT}"', '"format": "other/9"'), "format 'other/9'"),
        (lambda text: text.replace('"decision_threshold": 0.5', '"decision_threshold": 0.1'), "the manifest was edited"),
        (lambda text: text.replace('"decision_threshold": 0.5', '"decision_threshold": "0.5"'), r"model.decision_threshold must be float, got '0.5'"),
        (lambda text: text.replace('"n_jobs": ', '"n_jobs": true, "was_n_jobs": '), r"model: missing keys \[\], unexpected keys \['was_n_jobs'\]"),
        (lambda text: text.replace('"random_state": ', '"seed": '), r"model: missing keys \['random_state'\], unexpected keys \['seed'\]"),
        (lambda text: text.replace('"sha256": "sha256:', '"sha256": "md5:', 1), r"model.files.\w+.sha256 must be 'sha256:' and 64 lowercase hex digits"),
        (lambda text: text.replace('"feature_names": [', '"feature_names": [7, ', 1), r"model.feature_names\[0\] must be str, got 7"),
        (lambda text: "[]", r"the manifest must be an object, got list"),
    ],
)
@pytest.mark.fault
def test_a_malformed_or_edited_manifest_is_refused(edit: Any, message: str, model_copy: Path) -> None:
    path = model_copy / MANIFEST_NAME
    path.write_text(edit(path.read_text()))
    with pytest.raises(ArtifactError, match=message):
        ProductionEnsemble.load(model_copy)


@pytest.mark.fault
def test_a_model_for_another_feature_spec_is_refused(saved_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A feature parameter changed since the model was trained (here the RSI period): both loaders refuse it."""
    monkeypatch.setitem(FEATURE_PARAMS["rsi_14"], "period", FEATURE_PARAMS["rsi_14"]["period"] + 1)
    for load in (ProductionEnsemble.load, ServingModel.load):
        with pytest.raises(ArtifactError, match="trained on feature spec sha256:.* but the current FeatureManager"):
            load(saved_dir)


@pytest.mark.fault
def test_skops_types_outside_the_allowlist_are_refused(fitted: ProductionEnsemble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A correctly hashed file that would call a function on load is still refused."""
    hostile = skops.io.dumps(FunctionTransformer(func=os.getcwd))
    with monkeypatch.context() as patch:
        patch.setattr(ensemble_module, "_random_forest_bytes", lambda forest: hostile)
        fitted.save(tmp_path)
    with pytest.raises(ArtifactError, match=r"random_forest-[0-9a-f]{16}\.skops: .*outside the allowlist .*\['posix.getcwd'\]"):
        ProductionEnsemble.load(tmp_path)
