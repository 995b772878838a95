"""`cryptoml doctor`: green on a healthy repository, and each check red on a fixture broken in its own way."""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cryptoml import doctor, paths
from cryptoml.candles.synthetic import simulate_candles
from cryptoml.cli import app
from cryptoml.config import load_params
from cryptoml.doctor import CheckResult, run_check
from cryptoml.features.manager import FeatureManager
from cryptoml.model.artifacts import MANIFEST_NAME, ONNX_GRAPH
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.labels import build_dataset
from cryptoml.release.promotion import METADATA_NAME, promote
from tests.moto_server import S3_ENV, s3_server
from tests.repo import REPO_ROOT, commit_all, run
from tests.test_ensemble import rewrite_model_section
from tests.test_serving import PARAMS as SMALL_MODELS
from tests.webhook import unused_port

pytestmark = pytest.mark.e2e

runner = CliRunner()
TRAINING_WINDOW = (pd.Timestamp("2024-01-01T00:00:00Z"), pd.Timestamp("2024-03-01T00:00:00Z"))
STAGE_INPUT = "in.txt"


def train_and_save(directory: Path, fraction: float = 1.0) -> None:
    """A small model on the first `fraction` of real features of synthetic candles, so probe rows reach many leaves."""
    params = load_params(REPO_ROOT / paths.PARAMS)
    candles = simulate_candles(*TRAINING_WINDOW, "1h", params.data.synthetic.seed)
    features = FeatureManager().generate_features(candles)
    X, y = build_dataset(features, candles.set_index("timestamp")["close"], params.label.horizon, params.label.threshold)
    rows = int(len(X) * fraction)
    ProductionEnsemble(model_params=SMALL_MODELS).fit(X.iloc[:rows], y.iloc[:rows]).save(directory, parity_rows=features)


@pytest.fixture(scope="module")
def healthy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository with one up-to-date stage, the project's pyproject, lock and params, and a promoted model."""
    root = tmp_path_factory.mktemp("doctor") / "repo"
    root.mkdir()
    for name in (doctor.PYPROJECT, doctor.LOCK_FILE, paths.PARAMS):
        shutil.copy2(REPO_ROOT / name, root / name)
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "test@example.invalid"], root)
    run(["git", "config", "user.name", "cryptoml test"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    (root / STAGE_INPUT).write_text("candles\n")
    stage = {"cmd": f"cp {STAGE_INPUT} out.txt", "deps": [STAGE_INPUT], "outs": ["out.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": stage}}))
    run(["dvc", "repro", "-q"], root)
    training_dir = root / paths.TRAINING_DIR
    train_and_save(training_dir)
    promote(training_dir, root / paths.PRODUCTION_DIR, {"source": "doctor test"})
    commit_all(root, "healthy")
    return root


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model (fitted on the first half of the rows): its graph is valid but is not the production model's."""
    directory = tmp_path_factory.mktemp("other")
    train_and_save(directory, fraction=0.5)
    return directory


@pytest.fixture
def root(healthy_root: Path, tmp_path: Path) -> Path:
    """A private copy of the healthy repository for a test to break."""
    return Path(shutil.copytree(healthy_root, tmp_path / "repo"))


def production(root: Path) -> Path:
    return root / paths.PRODUCTION_DIR


def manifest_files(directory: Path) -> dict[str, dict[str, object]]:
    return json.loads((directory / MANIFEST_NAME).read_text())["model"]["files"]


def red(name: str, check: Callable[[], str]) -> CheckResult:
    """The check's result, which must be red."""
    result = run_check(name, check)
    assert not result.ok, result.detail
    return result


# --- a healthy repository and the command -------------------------------------------------------


def test_a_healthy_repository_is_green_on_every_check_and_exits_0(healthy_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(healthy_root)
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert {check["name"] for check in report["checks"]} == set(doctor.FIXES) - {"dvc remote"}
    assert [check["detail"] for check in report["checks"] if not check["ok"]] == []


def test_a_repository_without_a_production_model_is_red_with_reasons_and_exits_1(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.rmtree(production(root))
    monkeypatch.chdir(root)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    failed = ("artifacts", "feature spec", "onnx parity")
    for name in failed:
        line = next(line for line in lines if f" {name} " in line)
        assert line.startswith("✘") and MANIFEST_NAME in line, line
        assert f"fix: {doctor.FIXES[name]}" in lines[lines.index(line) + 1]
    assert sum(line.startswith("✔") for line in lines) == len(doctor.FIXES) - 1 - len(failed)
    assert lines[-1].endswith(f"red: {', '.join(failed)}")


# --- environment --------------------------------------------------------------------------------


def test_python_is_checked_against_requires_python(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\nrequires-python = ">=3.99"\n')
    detail = red("python", lambda: doctor.check_python(pyproject)).detail
    assert detail == f"Python {platform.python_version()} runs cryptoml; {pyproject} requires >=3.99"


def test_the_lock_is_read_by_normalised_name_past_hashes_and_comments() -> None:
    lock = (
        "Scikit_Learn==1.6.1 \\\n    --hash=sha256:00 \\\n    --hash=sha256:11\n    # via cryptoml\n"
        "dvc[s3]==3.50.0 \\\n    --hash=sha256:22\n"
    )
    assert doctor.locked_versions(lock) == {"scikit-learn": "1.6.1", "dvc": "3.50.0"}


def test_a_lock_with_another_version_or_an_uninstalled_package_is_red(tmp_path: Path) -> None:
    installed = doctor.installed_versions()
    real_lock = (REPO_ROOT / doctor.LOCK_FILE).read_text()
    lock = tmp_path / "requirements.lock"
    lock.write_text(real_lock.replace(f"\nnumpy=={installed['numpy']} ", "\nnumpy==0.0.1 ") + "surely-not-installed==1.0\n")
    detail = red("libraries", lambda: doctor.check_libraries(lock, installed)).detail
    pins = len(doctor.locked_versions(lock.read_text()))
    assert detail == (
        f"2 of {pins} pins in {lock} differ: numpy 0.0.1 locked, {installed['numpy']} installed, "
        "surely-not-installed 1.0 locked, not installed"
    )


def test_a_long_list_of_problems_is_cut_to_the_first_few() -> None:
    problems = [f"p{i}" for i in range(doctor.LISTED_PROBLEMS + 2)]
    assert doctor.first_few(problems) == f"{', '.join(problems[: doctor.LISTED_PROBLEMS])} and 2 more"
    assert doctor.first_few(problems[:1]) == "p0"


def test_an_invalid_params_key_is_red_naming_the_key(root: Path) -> None:
    params_file = root / paths.PARAMS
    params = yaml.safe_load(params_file.read_text())
    params["model"]["learning_rat"] = 0.1
    params_file.write_text(yaml.safe_dump(params))
    assert "model.learning_rat: unknown key" in red("params", lambda: doctor.check_params(params_file)).detail


# --- DVC ----------------------------------------------------------------------------------------


def test_a_changed_dependency_makes_dvc_status_red_naming_stage_and_file(root: Path) -> None:
    (root / STAGE_INPUT).write_text("other candles\n")
    detail = red("dvc status", lambda: doctor.check_dvc_status(root)).detail
    assert detail == f"1 stage(s) or .dvc file(s) not up to date: copy: changed deps {STAGE_INPUT} (modified)"


def test_dvc_status_entries_are_described_with_their_files_and_params() -> None:
    entry = [{"changed deps": {"in.txt": "modified", "params.yaml": {"cv.n_splits": "modified"}}}, "always changed"]
    assert doctor.describe_stage("train", entry) == "train: changed deps in.txt (modified), params.yaml (cv.n_splits) + always changed"


def use_s3_remote(root: Path, endpoint_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run(["dvc", "remote", "add", "-d", "s3", "s3://cryptoml-dvc/doctor"], root)
    run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint_url], root)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # one connection attempt, not ten seconds of retries




def test_without_a_remote_the_remote_check_is_red(root: Path) -> None:
    assert "no remote specified" in red("dvc remote", lambda: doctor.check_remote(root)).detail


def test_an_unreachable_remote_is_red_with_dvcs_reason(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{unused_port()}"
    use_s3_remote(root, endpoint, monkeypatch)
    detail = red("dvc remote", lambda: doctor.check_remote(root)).detail
    assert f"Could not connect to the endpoint URL: \"{endpoint}/" in detail
    assert "\n" not in detail  # dvc's support banner is left out


def test_doctor_remote_checks_a_reachable_remote(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server("cryptoml-dvc") as s3:
        use_s3_remote(root, s3.endpoint_url, monkeypatch)
        monkeypatch.chdir(root)
        result = runner.invoke(app, ["doctor", "--remote", "--json"])
    assert result.exit_code == 0, result.output
    remote = json.loads(result.output)["checks"][-1]
    assert (remote["name"], remote["ok"]) == ("dvc remote", True)
    assert remote["detail"] == "reachable; not in sync: 1 new (new: dvc push)"  # out.txt is not pushed yet


# --- the production model -----------------------------------------------------------------------


def tamper(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b"tree", b"TREE", 1))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(tamper, "(modified)"), (truncate, "(truncated or overwritten)"), (Path.unlink, "missing")],
    ids=["tampered", "truncated", "deleted"],
)
def test_a_damaged_model_file_is_red_naming_it(damage: Callable[[Path], None], reason: str, root: Path) -> None:
    model_file = production(root) / str(manifest_files(production(root))["lightgbm"]["name"])
    damage(model_file)
    detail = red("artifacts", lambda: doctor.check_artifacts(production(root))).detail
    assert str(model_file) in detail and reason in detail


def test_metadata_naming_another_model_is_red(root: Path) -> None:
    metadata_file = production(root) / METADATA_NAME
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "model_sha256": "sha256:" + "0" * 64}))
    detail = red("artifacts", lambda: doctor.check_artifacts(production(root))).detail
    served = ProductionEnsemble.load(production(root)).model_sha256_
    assert detail == f"{metadata_file} is missing or names another model than {served}"


def test_a_model_of_another_feature_spec_is_red_naming_both_hashes(root: Path) -> None:
    recorded = "sha256:" + "0" * 64
    rewrite_model_section(production(root), lambda model: model.update(feature_spec_hash=recorded))
    current = FeatureManager().spec_hash()
    detail = red("feature spec", lambda: doctor.check_feature_spec(production(root), current)).detail
    assert recorded in detail and detail.endswith(f"the current FeatureManager has {current}")


def test_an_onnx_graph_of_another_model_is_red_with_the_difference(root: Path, other_model: Path) -> None:
    """The graph swapped in with a valid hash: every file verifies, but the graph does not reproduce the native models."""
    other_graph = manifest_files(other_model)[ONNX_GRAPH]
    shutil.copy2(other_model / str(other_graph["name"]), production(root))
    rewrite_model_section(production(root), lambda model: model["files"].update({ONNX_GRAPH: other_graph}))
    probe = doctor.probe_features()
    detail = red("onnx parity", lambda: doctor.check_onnx_parity(production(root), probe)).detail
    assert detail.startswith("the ONNX graph disagrees with the native models: max |P(up) difference| ")
    assert f"on {len(probe)} probe rows (tolerance {doctor.PARITY_TOLERANCE:g};" in detail


def test_the_probe_is_the_same_rows_on_every_run() -> None:
    first, second = doctor.probe_features(), doctor.probe_features()
    assert len(first) == doctor.PROBE_ROWS
    pd.testing.assert_frame_equal(first, second)


def test_a_check_that_crashes_is_red_with_the_error_not_a_traceback() -> None:
    def broken() -> str:
        raise KeyError("project")

    assert red("python", broken).detail == "KeyError: 'project'"


def test_a_lock_without_pins_is_red(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("# nothing pinned\n")
    assert red("libraries", lambda: doctor.check_libraries(lock, doctor.installed_versions())).detail == f"{lock} pins no `name==version` line"
