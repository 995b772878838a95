"""The serving path: one ONNX graph with the native models' P(up), verified before parsing, checked before promotion."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pytest
from typer.testing import CliRunner

from cryptoml import paths
from cryptoml.candles.store import write_parquet
from cryptoml.candles.synthetic import simulate_candles
from cryptoml.cli import app
from cryptoml.config import load_params
from cryptoml.features.manager import FEATURE_NAMES, LIVE_WINDOW, FeatureManager
from cryptoml.live.predict import run_predict
from cryptoml.live.serving import BACKEND_ENV, PARITY_TOLERANCE, OnnxGraph, ParityError, ServingModel, pack_graph
from cryptoml.model import ensemble as ensemble_module
from cryptoml.model import onnx_export
from cryptoml.model.artifacts import MANIFEST_NAME, MODEL_NAMES, ONNX_GRAPH, ArtifactError
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.labels import build_dataset
from cryptoml.model.onnx_export import export_onnx
from cryptoml.model.rule import LONG, Holding, TradingRule
from cryptoml.pipeline import production_metadata, run_evaluate, run_features, run_promote, run_train
from cryptoml.release.promotion import METADATA_NAME, promote, read_production_metadata
from tests.repo import FAST_TRAINING, OPEN_GATE
from tests.test_cli import write_params
from tests.test_ensemble import make_data, rewrite_model_section

# Enough trees that every feature is split on many times, few enough to export in well under a second.
PARAMS = {name: {"n_estimators": 20} for name in MODEL_NAMES}
runner = CliRunner()


def fit(seed: int = 0) -> ProductionEnsemble:
    return ProductionEnsemble(model_params=PARAMS).fit(*make_data(n_rows=1000, seed=seed))


def components(model: ProductionEnsemble) -> tuple[Any, ...]:
    return model.lightgbm_booster_, model.xgboost_booster_, model.random_forest_, model.weights_, list(FEATURE_NAMES)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    fit().save(directory)
    return directory


@pytest.fixture
def model_copy(saved_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_dir, tmp_path / "model"))


def graph_file(directory: Path) -> Path:
    return directory / json.loads((directory / MANIFEST_NAME).read_text())["model"]["files"][ONNX_GRAPH]["name"]


def split_thresholds(model: ProductionEnsemble) -> list[tuple[int, float]]:
    """(feature position, threshold) of every split of the three models."""
    found: list[tuple[int, float]] = []

    def walk(node: dict[str, Any]) -> None:
        if "split_feature" in node:
            found.append((node["split_feature"], float(node["threshold"])))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in model.lightgbm_booster_.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    splits = model.xgboost_booster_.trees_to_dataframe().query("Feature != 'Leaf'")
    found += [(FEATURE_NAMES.index(name), float(value)) for name, value in zip(splits["Feature"], splits["Split"], strict=True)]
    for tree in model.random_forest_.estimators_:
        is_split = tree.tree_.feature >= 0
        found += list(zip(tree.tree_.feature[is_split].tolist(), tree.tree_.threshold[is_split].tolist(), strict=True))
    return found


def rows_on_the_splits(model: ProductionEnsemble, base: np.ndarray) -> np.ndarray:
    """Rows with one feature on a split threshold, or one float64 or float32 step to either side of it.

    Where float32 rounding would send a row down the other branch than the native model does, this is it.
    """
    rows = []
    for position, (feature, threshold) in enumerate(split_thresholds(model)):
        as_float32 = np.float32(threshold)
        for value in (
            threshold,
            np.nextafter(threshold, -np.inf),
            np.nextafter(threshold, np.inf),
            float(np.nextafter(as_float32, np.float32(-np.inf))),
            float(np.nextafter(as_float32, np.float32(np.inf))),
        ):
            row = base[position % len(base)].copy()
            row[feature] = value
            rows.append(row)
    return np.array(rows)


# --- parity -------------------------------------------------------------------------------------


def test_the_graph_gives_the_native_p_up_within_the_tolerance(saved_dir: Path) -> None:
    served, native = ProductionEnsemble.load(saved_dir), ProductionEnsemble.load(saved_dir, backend="native")
    X = pd.concat([make_data(n_rows=1000)[0], make_data(n_rows=2000, seed=5)[0]])
    difference = np.abs(served.predict_proba(X) - native.predict_proba(X))
    assert 0 < difference.max() <= PARITY_TOLERANCE, "float32 leaves make the graph differ a little, never more"
    report = served.check_serving_parity(X)
    assert report.passed and report.rows == len(X)
    assert report.max_abs_difference == pytest.approx(difference.max())


def test_rows_on_every_split_threshold_take_the_native_branches(saved_dir: Path) -> None:
    """The float32 thresholds onnxmltools writes for LightGBM fail this; the exported float64 ones pass."""
    served = ProductionEnsemble.load(saved_dir)
    probes = rows_on_the_splits(served, make_data(n_rows=50, seed=3)[0].to_numpy())
    native = ProductionEnsemble.load(saved_dir, backend="native").predict_proba(probes)[:, 1]
    assert np.abs(served.predict_proba(probes)[:, 1] - native).max() <= PARITY_TOLERANCE


def test_decisions_agree_on_every_row_away_from_the_threshold(saved_dir: Path) -> None:
    X = make_data(n_rows=2000, seed=6)[0]
    native = ProductionEnsemble.load(saved_dir, backend="native")
    threshold = float(np.median(native.predict_proba(X)[:, 1]))  # half the rows on each side
    served = ProductionEnsemble.load(saved_dir).set_params(decision_threshold=threshold)
    native.set_params(decision_threshold=threshold)
    away = np.abs(native.predict_proba(X)[:, 1] - threshold) > PARITY_TOLERANCE
    np.testing.assert_array_equal(served.predict(X)[away], native.predict(X)[away])
    assert set(served.predict(X)[away].tolist()) == {0, 1}


def test_frames_of_other_numeric_dtypes_or_column_orders_predict_like_float64(saved_dir: Path) -> None:
    """FeatureManager's float64 frames skip the pandas checks; every other frame still goes through them."""
    model = ProductionEnsemble.load(saved_dir)
    X = make_data(n_rows=50, seed=7)[0]
    expected = model.predict_proba(X)
    np.testing.assert_array_equal(model.predict_proba(X[list(reversed(FEATURE_NAMES))]), expected)
    as_float32 = X.astype(np.float32)
    np.testing.assert_array_equal(model.predict_proba(as_float32), model.predict_proba(as_float32.astype(np.float64)))
    rounded = X.round().astype(np.int64)
    np.testing.assert_array_equal(model.predict_proba(rounded), model.predict_proba(rounded.astype(np.float64)))
    with pytest.raises(ValueError, match=r"feature columns \['volume'\] are not numeric"):
        model.predict_proba(X.assign(volume=X["volume"] > 0))


def test_the_export_is_byte_identical_for_the_same_model(saved_dir: Path) -> None:
    first, refit = fit(), fit()
    graph = export_onnx(*components(first))
    assert export_onnx(*components(first)) == graph
    assert export_onnx(*components(refit)) == graph, "a refit with the same seed is the same model"
    assert graph_file(saved_dir).read_bytes() == pack_graph(graph)
    assert export_onnx(*components(fit(seed=1))) != graph


def test_a_loaded_model_saves_to_the_bytes_it_was_loaded_from(saved_dir: Path, tmp_path: Path) -> None:
    """Same model, same files: a tree's node records carry padding bytes, zeroed so no stray memory gets in."""
    ProductionEnsemble.load(saved_dir).save(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == {path.name: path.read_bytes() for path in saved_dir.iterdir()}


def test_the_stored_graph_is_gzip_of_an_onnx_model_with_the_ensemble_weights(saved_dir: Path) -> None:
    model = onnx.load_from_string(gzip.decompress(graph_file(saved_dir).read_bytes()))
    assert [value.name for value in model.graph.input] == ["features"]
    assert [value.name for value in model.graph.output] == ["p_up"]
    weights = onnx.numpy_helper.to_array(next(tensor for tensor in model.graph.initializer if tensor.name == "vote_weights"))
    assert weights.tolist() == pytest.approx([ProductionEnsemble.load(saved_dir).weights_[name] for name in MODEL_NAMES])
    trees = [(node.name, node.domain) for node in model.graph.node if node.op_type == "TreeEnsemble"]
    assert trees == [(name, "ai.onnx.ml") for name in MODEL_NAMES]
    assert {opset.domain: opset.version for opset in model.opset_import}["ai.onnx.ml"] == 5


def test_trees_that_are_a_single_leaf_export_with_parity() -> None:
    """Boosters that find no split worth making grow one-leaf trees; TreeEnsemble needs a branch at each root."""
    no_splits = {"lightgbm": {"n_estimators": 3, "min_child_samples": 10**6}, "xgboost": {"n_estimators": 3, "min_child_weight": 1.0e9}}
    X, y = make_data(n_rows=300)
    model = ProductionEnsemble(model_params={**PARAMS, **no_splits}).fit(X, y)
    assert model.lightgbm_booster_.dump_model()["tree_info"][0]["num_leaves"] == 1
    assert set(model.xgboost_booster_.trees_to_dataframe()["Feature"]) == {"Leaf"}
    graph = export_onnx(*components(model))
    native = model.component_proba(X)
    served = OnnxGraph(graph).up_probability(np.ascontiguousarray(X.to_numpy()))
    expected = sum(model.weights_[name] * native[name] for name in MODEL_NAMES)
    np.testing.assert_allclose(served, expected, atol=PARITY_TOLERANCE)


# --- a graph that does not reproduce the model --------------------------------------------------


def only_lightgbm_votes(real_export: Any) -> Any:
    """An exporter whose graph ignores the ensemble weights: a wrong graph with valid bytes."""
    lightgbm_only = {"lightgbm": 1.0, "xgboost": 0.0, "random_forest": 0.0}
    return lambda lgb, xgb, forest, weights, names: real_export(lgb, xgb, forest, lightgbm_only, names)


def test_a_graph_off_by_more_than_the_tolerance_is_not_saved(model_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {path.name: path.read_bytes() for path in model_copy.iterdir()}
    monkeypatch.setattr(onnx_export, "export_onnx", only_lightgbm_votes(export_onnx))
    with pytest.raises(ParityError, match=r"saving to .*model: the ONNX graph's P\(up\) differs from the native models' by up to"):
        fit(seed=2).save(model_copy, parity_rows=make_data(n_rows=200)[0])
    assert {path.name: path.read_bytes() for path in model_copy.iterdir()} == before


def test_check_serving_parity_needs_a_graph_and_obeys_the_tolerance(saved_dir: Path) -> None:
    X = make_data(n_rows=200)[0]
    with pytest.raises(ValueError, match="serves no ONNX graph"):
        ProductionEnsemble.load(saved_dir, backend="native").check_serving_parity(X)
    with pytest.raises(ParityError, match=r"allowed 0; \d+ decision\(s\) differ"):
        ProductionEnsemble.load(saved_dir).check_serving_parity(X, tolerance=0.0)


# --- backend switch -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "environment", "expected"),
    [(None, None, "onnx"), ("native", None, "native"), (None, "native", "native"), ("onnx", "native", "onnx"), (None, "", "onnx")],
)
def test_the_backend_comes_from_the_argument_then_the_environment(
    argument: str | None, environment: str | None, expected: str, saved_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if environment is not None:
        monkeypatch.setenv(BACKEND_ENV, environment)
    model = ProductionEnsemble.load(saved_dir, backend=argument)
    assert model.get_model_info()["backend"] == model.serving_backend == expected
    assert (model.onnx_graph_ is not None) == (expected == "onnx")


def test_the_native_backend_predicts_with_the_native_models(saved_dir: Path) -> None:
    X = make_data(n_rows=300, seed=4)[0]
    native = ProductionEnsemble.load(saved_dir, backend="native")
    np.testing.assert_array_equal(native.predict_proba(X)[:, 1], sum(native.weights_[n] * p for n, p in native.component_proba(X).items()))


def test_an_unknown_backend_is_refused_naming_its_source(saved_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"backend is 'gpu'; expected one of \['onnx', 'native'\]"):
        ProductionEnsemble.load(saved_dir, backend="gpu")
    monkeypatch.setenv(BACKEND_ENV, "ONNX")
    with pytest.raises(ValueError, match=rf"environment variable {BACKEND_ENV} is 'ONNX'"):
        ProductionEnsemble.load(saved_dir)


def test_a_model_saved_before_the_graph_loads_natively(model_copy: Path) -> None:
    """cryptoml-ensemble/2 manifests (no graph) stay loadable, so older production models can be rolled back to."""
    graph_file(model_copy).unlink()

    def as_format_2(model: dict[str, Any]) -> None:
        del model["files"][ONNX_GRAPH]
        del model["trading_rule"]  # rules came with format 5

    rewrite_model_section(model_copy, as_format_2)
    manifest = json.loads((model_copy / MANIFEST_NAME).read_text())
    (model_copy / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": "cryptoml-ensemble/2"}))
    assert ProductionEnsemble.load(model_copy).serving_backend == "native"
    for load_graph in (partial(ProductionEnsemble.load, backend="onnx"), ServingModel.load):
        with pytest.raises(ArtifactError, match=r"a cryptoml-ensemble/2 model has no ONNX graph to serve"):
            load_graph(model_copy)
    # The same files under format 4, which needs a graph (and, like format 2, has no trading rule).
    (model_copy / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": "cryptoml-ensemble/4"}))
    with pytest.raises(ArtifactError, match=r"expected exactly \['lightgbm', 'xgboost', 'random_forest', 'onnx'\]"):
        ProductionEnsemble.load(model_copy)


# --- verified before parsing --------------------------------------------------------------------


@pytest.fixture
def graph_parser_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes) -> None:
        raise AssertionError("the graph was parsed before it was verified")

    monkeypatch.setattr(ensemble_module, "_parse_onnx", refuse)


@pytest.mark.usefixtures("graph_parser_must_not_run")
@pytest.mark.parametrize("backend", ["onnx", "native"])
@pytest.mark.fault
def test_a_modified_graph_is_refused_before_parsing(backend: str, model_copy: Path) -> None:
    path = graph_file(model_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{re.escape(path.name)}: sha256 .* differs from the manifest's .* \(modified\)"):
        ProductionEnsemble.load(model_copy, backend=backend)


@pytest.mark.fault
def test_a_correctly_hashed_file_that_is_no_graph_is_refused(model_copy: Path) -> None:
    """A forger who re-hashes the manifest gets an ArtifactError from onnxruntime's refusal, not a crash."""
    data = pack_graph(b"not an onnx model")
    sha256 = "sha256:" + hashlib.sha256(data).hexdigest()
    name = f"onnx-{sha256[7:23]}.onnx.gz"
    (model_copy / name).write_bytes(data)
    rewrite_model_section(model_copy, lambda model: model["files"][ONNX_GRAPH].update(name=name, sha256=sha256, size=len(data)))
    with pytest.raises(ArtifactError, match=rf"{re.escape(name)}: hash verified but the file cannot be loaded"):
        ProductionEnsemble.load(model_copy)
    with pytest.raises(ArtifactError, match=rf"{re.escape(name)}: hash verified but the graph cannot be loaded"):
        ServingModel.load(model_copy)


# --- the light serving model --------------------------------------------------------------------


def test_the_serving_model_gives_the_ensembles_graph_predictions(saved_dir: Path) -> None:
    served, ensemble = ServingModel.load(saved_dir), ProductionEnsemble.load(saved_dir, backend="onnx")
    X = make_data(n_rows=300, seed=5)[0]
    np.testing.assert_array_equal(served.predict_proba(X), ensemble.predict_proba(X))
    np.testing.assert_array_equal(served.predict_proba(X.to_numpy()), ensemble.predict_proba(X))
    np.testing.assert_array_equal(served.predict(X), ensemble.predict(X))
    assert (served.model_sha256, served.decision_threshold, served.version_info) == (
        ensemble.model_sha256_, ensemble.decision_threshold, ensemble.version_info_
    )


def test_the_serving_model_refuses_reordered_columns_and_rows_with_nan(saved_dir: Path) -> None:
    """It has no pandas to reorder columns with, so a frame must come in FEATURE_NAMES order."""
    served, X = ServingModel.load(saved_dir), make_data(n_rows=20)[0]
    with pytest.raises(ValueError, match=r"feature columns are \['volume', 'close', .*expected exactly \['close', 'volume'"):
        served.predict_proba(X[["volume", "close", *FEATURE_NAMES[2:]]])
    with pytest.raises(ValueError, match=r"1 row\(s\) contain NaN or inf \(first index labels \['.*'\]; in columns \['rsi_14'\]\)"):
        served.predict_proba(X.assign(rsi_14=np.where(np.arange(len(X)) == 3, np.nan, X["rsi_14"])))
    with pytest.raises(ValueError, match=r"expected a 2-D array of shape \(n_rows, 12\)"):
        served.predict(np.zeros(12))


def test_serving_imports_no_training_library(saved_dir: Path) -> None:
    """What keeps a serving process small (bench/serve.py measures its peak RSS): none of these is imported."""
    script = (
        "import sys, numpy as np; from cryptoml.live.serving import ServingModel; "
        f"ServingModel.load({str(saved_dir)!r}).predict(np.zeros((1, 12))); "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'sklearn', 'pandas', 'lightgbm', 'xgboost', 'numba', 'scipy', 'pydantic'}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the pipeline and `cryptoml predict` --------------------------------------------------------


def write_candles_csv(candles: pd.DataFrame, path: Path) -> Path:
    candles.assign(timestamp=candles["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository-like directory: params, candles and features, a trained challenger, a promoted production model."""
    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        write_params(root, FAST_TRAINING)
        params = load_params(paths.PARAMS)
        data = params.data
        write_parquet(simulate_candles(data.start, data.end, data.timeframe, data.synthetic.seed), paths.RAW_CANDLES)
        run_features()
        run_train(params)
        promote(paths.TRAINING_DIR, paths.PRODUCTION_DIR, {"source": "test"})
    return root


@pytest.fixture
def in_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workspace)
    return workspace


def candles_csv(directory: Path, n_candles: int) -> Path:
    candles = pd.read_parquet(paths.RAW_CANDLES).tail(n_candles)
    return write_candles_csv(candles, directory / f"candles-{n_candles}.csv")


def expected_p_up(csv: Path, n_rows: int) -> np.ndarray:
    candles = pd.read_parquet(paths.RAW_CANDLES)
    candles = candles[candles["timestamp"] <= pd.read_csv(csv)["timestamp"].iloc[-1]]
    return ProductionEnsemble.load(paths.PRODUCTION_DIR).predict_proba(FeatureManager().generate_latest(candles, n_rows))[:, 1]


def test_predict_prints_the_signal_of_the_latest_closed_candle(in_workspace: Path) -> None:
    csv = candles_csv(in_workspace, LIVE_WINDOW + 10)
    result = runner.invoke(app, ["predict", "--input", str(csv)])
    assert result.exit_code == 0, result.output
    model = ProductionEnsemble.load(paths.PRODUCTION_DIR)
    p_up = expected_p_up(csv, 1)[0]
    last = pd.read_csv(csv)["timestamp"].iloc[-1]
    signal = "up" if p_up >= model.decision_threshold else "flat"
    hold = "long" if model.rule.next_holding(p_up, Holding()).position == LONG else "flat"
    assert result.output.splitlines() == [
        f"{last}  {signal:<4}  P(up) {p_up:.4f}  (up when >= {model.decision_threshold:.4f})  hold: {hold}",
        f"model {model.model_sha256_} (onnx); trading rule: {model.rule.describe()}",
    ]


@pytest.mark.parametrize("backend", ["onnx", "native"])
def test_predict_json_gives_every_requested_candle(backend: str, in_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, backend)
    csv = candles_csv(in_workspace, LIVE_WINDOW + 10)
    result = runner.invoke(app, ["predict", "--input", str(csv), "--json", "--rows", "3"])
    assert result.exit_code == 0, result.output
    output = json.loads(result.output)
    model = ProductionEnsemble.load(paths.PRODUCTION_DIR)
    assert set(output) == {"model_sha256", "backend", "decision_threshold", "trading_rule", "open_candles_skipped", "predictions"}
    assert (output["model_sha256"], output["backend"], output["open_candles_skipped"]) == (model.model_sha256_, backend, 0)
    assert (output["decision_threshold"], output["trading_rule"]) == (model.decision_threshold, model.rule.as_json())
    assert [row["timestamp"] for row in output["predictions"]] == pd.read_csv(csv)["timestamp"].iloc[-3:].tolist()
    p_up = [row["p_up"] for row in output["predictions"]]
    np.testing.assert_allclose(p_up, expected_p_up(csv, 3), rtol=0, atol=PARITY_TOLERANCE)
    assert [row["signal"] for row in output["predictions"]] == ["up" if p >= model.decision_threshold else "flat" for p in p_up]
    # The rule's positions from flat, through the rule's one implementation.
    assert [row["position"] for row in output["predictions"]] == model.rule.holdings(p_up)[0].tolist()


def test_predict_leaves_out_a_candle_that_is_still_open(in_workspace: Path) -> None:
    csv = candles_csv(in_workspace, LIVE_WINDOW + 10)
    last_open = pd.Timestamp(pd.read_csv(csv)["timestamp"].iloc[-1])
    prediction = run_predict(csv, "1h", paths.PRODUCTION_DIR, now=last_open + pd.Timedelta(minutes=59))
    assert prediction.open_candles_skipped == 1
    assert [signal.timestamp for signal in prediction.signals] == [last_open - pd.Timedelta(hours=1)]


@pytest.mark.fault
def test_predict_with_too_few_candles_says_how_many_it_needs(in_workspace: Path) -> None:
    csv = candles_csv(in_workspace, LIVE_WINDOW - 1)
    result = runner.invoke(app, ["predict", "--input", str(csv)])
    assert result.exit_code == 1
    assert f"{csv}: {LIVE_WINDOW - 1} closed candle(s): generate_latest needs the last {LIVE_WINDOW} candles" in result.output


@pytest.mark.fault
def test_a_parity_failure_at_promotion_leaves_production_untouched(in_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The promote stage checks the challenger's graph on the evaluation span first: a wrong graph ends it with one clear error."""
    before = {path.name: path.read_bytes() for path in paths.PRODUCTION_DIR.iterdir()}
    assert METADATA_NAME in before
    real = OnnxGraph.up_probability
    monkeypatch.setattr(OnnxGraph, "up_probability", lambda self, matrix: real(self, matrix) + 2 * PARITY_TOLERANCE)
    result = runner.invoke(app, ["promote"])
    assert result.exit_code == 1
    message = r"model sha256:[0-9a-f]{64}: the ONNX graph's P\(up\) differs from the native models' by up to 2(\.\d+)?e-05 on \d+ rows"
    assert re.search(message, result.output)
    assert {path.name: path.read_bytes() for path in paths.PRODUCTION_DIR.iterdir()} == before
    assert not paths.PROMOTION_METRICS.exists()


def test_a_sound_model_whose_rule_did_not_pay_is_served_with_the_flat_rule(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The promote stage end to end: every statistical check open, an unreachable probabilistic-Sharpe floor."""
    copy = Path(shutil.copytree(workspace, tmp_path / "workspace"))
    monkeypatch.chdir(copy)
    shutil.rmtree(paths.PRODUCTION_DIR)  # a first promotion: no champion to compare with
    write_params(copy, {**FAST_TRAINING, **OPEN_GATE, "gate.min_rule_psr": 1.0})
    params = load_params(paths.PARAMS)
    run_evaluate(params)
    challenger = ProductionEnsemble.load(paths.TRAINING_DIR)
    assert challenger.rule.trades, "the challenger's own rule trades, so the floor applies"
    decision = run_promote(params)
    assert decision.promote and decision.flat_rule
    served = ServingModel.load(paths.PRODUCTION_DIR)
    assert served.rule == TradingRule.flat() and served.model_sha256 != challenger.model_sha256_
    metadata = read_production_metadata(paths.PRODUCTION_DIR)
    assert metadata is not None and metadata["model_sha256"] == metadata["version_control"]["model_hash"] == served.model_sha256
    assert metadata["version_control"]["trained_model_hash"] == challenger.model_sha256_
    assert metadata["trading_rule"]["entry"] is None and metadata["trading_rule"]["trained"]["entry"] == challenger.rule.entry
    record = json.loads(paths.PROMOTION_METRICS.read_text())
    assert (record["decision"], record["trading"], record["production"]["model_hash"]) == ("promoted", "flat", served.model_sha256)


def test_promote_judges_the_champion_by_its_stored_predictions_without_loading_it(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The champion was fitted on most rows of the challenger's span: it is never asked to predict them."""
    copy = Path(shutil.copytree(workspace, tmp_path / "workspace"))
    monkeypatch.chdir(copy)
    write_params(copy, {**FAST_TRAINING, "gate.champion_min_shared_rows": 100})  # its span is 18 days
    params = load_params(paths.PARAMS)
    run_evaluate(params)
    promote(paths.TRAINING_DIR, paths.PRODUCTION_DIR, production_metadata(None, json.loads(paths.EVALUATION_REPORT.read_text())))
    loaded: list[Path] = []
    real_load = ProductionEnsemble.load.__func__

    def recording_load(cls: type[ProductionEnsemble], path: Path | None = None, backend: str | None = None) -> ProductionEnsemble:
        loaded.append(Path(path))
        return real_load(cls, path, backend)

    monkeypatch.setattr(ProductionEnsemble, "load", classmethod(recording_load))
    decision = run_promote(params)
    assert set(loaded) == {paths.TRAINING_DIR}  # the challenger only (loaded again to be promoted)
    assert decision.champion_comparison is not None, decision.champion_note
    comparison = decision.champion_comparison
    # The champion is the same model: its stored record is the challenger's, row for row.
    evaluated_rows = json.loads(paths.EVALUATE_METRICS.read_text())["span"]["rows"]
    assert comparison is not None and comparison.rows > evaluated_rows
    assert comparison.challenger == comparison.champion
