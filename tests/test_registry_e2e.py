"""The model registry under real dvc and git: versions, history, rollback, clones, gate, experiments, plots.

One repository tells one story, built once: a first challenger the gate rejects, v1 promoted and committed,
v2 promoted and committed, each pushed to a local DVC remote. The tests read it in any order: a test that changes
the workspace puts it back, and one that commits or checks out another version works on a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.release.registry import RegistryError, production_changes, recorded_production
from tests.repo import FAST_TRAINING, commit_all, copy_repo, make_repo, release, run, set_params

pytestmark = pytest.mark.e2e

PRODUCTION = Path("models/production")
PROMOTION = Path("metrics/promotion.json")
EVALUATION = Path("metrics/evaluate.json")
# What the plain DVC rollback takes from git: `git checkout <rev> -- dvc.lock params.yaml && dvc checkout`.
VERSIONED_FILES = ("dvc.lock", "params.yaml")

# Three months of synthetic candles give a weak model, scored close to the class prior, and a new seed may
# score a little below the champion. So that both versions are promoted, the prior ratios and champion
# tolerances are loosened and the ROC AUC floor is chance: this module tests versioning, not model quality
# (tests/test_promotion.py tests the gate's rules).
VERSIONING_GATE = {
    "gate.min_roc_auc": 0.5,
    "gate.max_brier_ratio": 1.05,
    "gate.max_log_loss_ratio": 1.05,
    "gate.champion_tolerance": 1.0,
    "gate.champion_log_loss_tolerance": 1.0,
}
UNREACHABLE_ROC_AUC = 0.99  # no model of these candles ranks that well, so the gate must reject
EXPERIMENT_LIGHTGBM_WEIGHT = 0.5


@dataclass(frozen=True)
class Version:
    """A production version as committed: what a rollback to `commit` must give back."""

    commit: str  # the commit that recorded it (metrics/promotion.json, dvc.lock)
    files: dict[str, bytes]  # every file in models/production
    versioned: dict[str, bytes]  # dvc.lock and params.yaml
    production: dict[str, Any]  # the production record of metrics/promotion.json

    @property
    def model_hash(self) -> str:
        return self.production["model_hash"]


@dataclass(frozen=True)
class Story:
    repo: Path
    first_promotion: dict[str, Any]  # metrics/promotion.json after the first challenger failed the gate
    first_production: dict[str, bytes]
    v1: Version
    v2: Version


def production_files(repo: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((repo / PRODUCTION).iterdir())}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def git_json(repo: Path, rev: str, path: Path) -> dict[str, Any]:
    return json.loads(run(["git", "show", f"{rev}:{path.as_posix()}"], repo).stdout)


def snapshot(repo: Path, commit: str) -> Version:
    return Version(
        commit=commit,
        files=production_files(repo),
        versioned={name: (repo / name).read_bytes() for name in VERSIONED_FILES},
        production=read_json(repo / PROMOTION)["production"],
    )


def registered(repo: Path, changes: dict[str, Any], name: str) -> Version:
    """The documented release, its version registered."""
    commit = release(repo, changes, name)
    run(["cryptoml", "register"], repo)
    return snapshot(repo, commit)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    root = tmp_path_factory.mktemp("registry")
    repo = make_repo(root, {**FAST_TRAINING, **VERSIONING_GATE, "gate.min_roc_auc": UNREACHABLE_ROC_AUC})
    # In git from the start: dvc push and fetch use each revision's own config (treeverse/dvc#9754).
    run(["dvc", "remote", "add", "-d", "local", str(root / "remote")], repo)
    commit_all(repo, "DVC remote")
    run(["dvc", "repro"], repo)
    first_promotion, first_production = read_json(repo / PROMOTION), production_files(repo)
    v1 = registered(repo, {"gate.min_roc_auc": VERSIONING_GATE["gate.min_roc_auc"]}, "v1")
    seed = yaml.safe_load((repo / "params.yaml").read_text())["model"]["random_state"]
    v2 = registered(repo, {"model.random_state": seed + 1}, "v2")
    return Story(repo, first_promotion, first_production, v1, v2)


def markdown_rows(table: str) -> list[dict[str, str]]:
    """The rows of a markdown table as {header: cell}; the separator line is skipped."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, body = cells[0], [row for row in cells[1:] if not set("".join(row)) <= {"-", ":"}]
    return [dict(zip(header, row, strict=True)) for row in body]


def assert_clean(repo: Path) -> None:
    assert run(["dvc", "status", "-q"], repo, check=False).returncode == 0, run(["dvc", "status"], repo).stdout
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


def test_first_challenger_rejected_leaves_an_empty_production(story: Story) -> None:
    """DVC fails a stage whose output is missing, so the fixture's first `dvc repro` passing is half the test."""
    assert story.first_promotion["decision"] == "rejected"
    assert story.first_promotion["production"] is None
    assert [check["name"] for check in story.first_promotion["checks"] if not check["passed"]] == ["min_roc_auc"]
    assert story.first_production == {}


def test_second_repro_runs_nothing_and_tree_stays_clean(story: Story) -> None:
    rerun = run(["dvc", "repro"], story.repo)
    assert "Running stage" not in rerun.stdout
    assert_clean(story.repo)


def test_history_lists_both_registered_versions_oldest_first(story: Story) -> None:
    changes = production_changes(PROMOTION, cwd=story.repo)
    assert [(v.commit, v.model_hash) for v in changes] == [
        (story.v1.commit, story.v1.model_hash),
        (story.v2.commit, story.v2.model_hash),
    ]
    assert changes[1].metrics == story.v2.production["metrics"]
    listing = run(["cryptoml", "history"], story.repo).stdout.splitlines()[1:]
    assert [line.split()[:2] for line in listing] == [["v1.0.0", story.v1.commit[:10]], ["v1.1.0", "prod"]]
    assert story.v1.model_hash[7:25] in listing[0] and story.v2.commit[:10] in listing[1]


def test_info_shows_v2_and_v1_as_its_previous_version(story: Story) -> None:
    shown = dict(line.strip().split(": ", 1) for line in run(["cryptoml", "info"], story.repo).stdout.splitlines())
    assert shown["model sha256"] == story.v2.model_hash != story.v1.model_hash
    previous = {"git_commit": story.v1.production["git_commit"], "model_hash": story.v1.model_hash}
    assert shown["previous version"] == str(previous)
    # Fresh: the training window ends at the last labelled candle, label.horizon (1) bar before the last candle.
    data_end = pd.Timestamp(yaml.safe_load((story.repo / "params.yaml").read_text())["data"]["end"])
    assert shown["training window"].endswith(f".. {(data_end - pd.Timedelta(hours=2)).isoformat()}")


def test_rollback_target_from_info_names_the_commit_that_recorded_it(story: Story) -> None:
    made_at = story.v1.production["git_commit"]  # what `cryptoml info` shows; it has no dvc.lock of the model
    with pytest.raises(RegistryError, match=f"{made_at} has no production model.* recorded at {story.v1.commit}"):
        recorded_production(made_at, PROMOTION, cwd=story.repo)
    assert recorded_production(story.v1.commit, PROMOTION, cwd=story.repo) == story.v1.production


def test_metrics_and_params_diff_between_versions_are_markdown_tables(story: Story) -> None:
    v1, v2 = story.v1.commit, story.v2.commit
    metrics = markdown_rows(run(["dvc", "metrics", "diff", v1, v2, "--all", "--md"], story.repo).stdout)
    by_metric = {(row["Path"], row["Metric"]): row for row in metrics}
    for section, metric in (("policy", "roc_auc"), ("policy", "log_loss_vs_prior"), ("backtest.rule", "total_return")):
        row = by_metric[(EVALUATION.as_posix(), f"{section}.{metric}")]
        for version in (v1, v2):
            stored = git_json(story.repo, version, EVALUATION)
            for part in section.split("."):
                stored = stored[part]
            assert float(row[version]) == pytest.approx(stored[metric], abs=5e-6)  # dvc shows 5 decimals
    params = markdown_rows(run(["dvc", "params", "diff", v1, v2, "--md"], story.repo).stdout)
    v1_seed = yaml.safe_load(story.v1.versioned["params.yaml"])["model"]["random_state"]
    assert params == [{"Path": "params.yaml", "Param": "model.random_state", v1: str(v1_seed), v2: str(v1_seed + 1)}]


def test_plots_render_to_html_for_the_workspace_and_between_versions(story: Story, tmp_path: Path) -> None:
    titles = [next(iter(plot)) for plot in yaml.safe_load((story.repo / "dvc.yaml").read_text())["plots"]]
    shown = run(["dvc", "plots", "show", "-o", str(tmp_path / "show")], story.repo)
    diffed = run(["dvc", "plots", "diff", story.v1.commit, story.v2.commit, "-o", str(tmp_path / "diff")], story.repo)
    for result, name in ((shown, "show"), (diffed, "diff")):
        assert "failed to load" not in result.stdout + result.stderr
        html = (tmp_path / name / "index.html").read_text()
        assert [title for title in titles if title not in html] == []
    diff_html = (tmp_path / "diff" / "index.html").read_text()
    assert story.v1.commit in diff_html and story.v2.commit in diff_html
    # DVC writes a title unescaped into a JavaScript string: a quote mark would leave that chart blank.
    assert [title for title in titles if "'" in title or '"' in title] == []


def test_the_plots_page_draws_only_the_intended_charts(story: Story) -> None:
    """Each plot file is drawn by its top-level definition only: no DVC fallback chart of a column against "step"."""
    titles = [next(iter(plot)) for plot in yaml.safe_load((story.repo / "dvc.yaml").read_text())["plots"]]
    charts = json.loads(run(["dvc", "plots", "show", "--json"], story.repo).stdout)["data"]
    assert sorted(charts) == sorted(titles)
    assert len(titles) == 10


def test_experiment_runs_beside_the_workspace(story: Story) -> None:
    # --temp: a workspace experiment would run the promote stage in place and swap the served model.
    weight = f"model.weights.lightgbm={EXPERIMENT_LIGHTGBM_WEIGHT}"
    run(["dvc", "exp", "run", "--temp", "-n", "lgbm-weight", "-S", weight], story.repo)
    assert production_files(story.repo) == story.v2.files
    assert_clean(story.repo)
    rows = markdown_rows(run(["dvc", "exp", "show", "--md"], story.repo).stdout)
    workspace = next(row for row in rows if row["Experiment"] == "workspace")
    experiment = next(row for row in rows if row["Experiment"].endswith("[lgbm-weight]"))
    experiment_rev = experiment["Experiment"].split()[-2]  # "└── 1a2b3c4 [lgbm-weight]"
    workspace_weight = yaml.safe_load(story.v2.versioned["params.yaml"])["model"]["weights"]["lightgbm"]
    assert experiment["model.weights.lightgbm"] == str(EXPERIMENT_LIGHTGBM_WEIGHT) != str(workspace_weight)
    assert workspace["model.weights.lightgbm"] == str(workspace_weight)
    experiment_auc = git_json(story.repo, experiment_rev, EVALUATION)["policy"]["roc_auc"]
    workspace_auc = read_json(story.repo / EVALUATION)["policy"]["roc_auc"]
    assert float(experiment["policy.roc_auc"]) == pytest.approx(experiment_auc, rel=1e-4)  # shown to 5 digits
    assert float(workspace["policy.roc_auc"]) == pytest.approx(workspace_auc, rel=1e-4)


@pytest.mark.fault
def test_gate_rejection_keeps_production_byte_identical(story: Story) -> None:
    set_params(story.repo, {"gate.min_roc_auc": UNREACHABLE_ROC_AUC})
    try:
        rerun = run(["dvc", "repro"], story.repo)
        assert "Running stage 'promote'" in rerun.stdout and "Running stage 'train'" not in rerun.stdout
        assert production_files(story.repo) == story.v2.files
        promotion = read_json(story.repo / PROMOTION)
        assert promotion["decision"] == "rejected" and promotion["production"] == story.v2.production
        failed = [check for check in promotion["checks"] if not check["passed"]]
        assert [check["name"] for check in failed] == ["min_roc_auc"]
        assert "gate.min_roc_auc" in failed[0]["message"] and f"{UNREACHABLE_ROC_AUC:.4f}" in failed[0]["message"]
        assert promotion["reasons"] == [failed[0]["message"]]
        assert run(["cryptoml", "promote", "--strict"], story.repo, check=False).returncode == 1
        assert run(["cryptoml", "promote"], story.repo, check=False).returncode == 0
        assert production_files(story.repo) == story.v2.files
    finally:
        run(["git", "checkout", "--", "."], story.repo)
    assert_clean(story.repo)


def test_fresh_clone_pulls_the_production_model_and_rolls_back_with_pull(story: Story, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(story.repo), str(clone)], tmp_path)
    cache = Path(run(["dvc", "cache", "dir"], clone).stdout.strip())
    assert cache.resolve() == (clone / ".dvc" / "cache").resolve() and not cache.exists()  # its own, empty
    run(["dvc", "pull"], clone)
    model = ProductionEnsemble.load(clone / PRODUCTION)
    metadata = read_json(clone / PRODUCTION / "production_model_metadata.json")
    assert model.model_sha256_ == metadata["model_sha256"] == story.v2.model_hash
    assert production_files(clone) == story.v2.files
    without_pull = run(["cryptoml", "rollback", story.v1.commit], clone, check=False)
    assert without_pull.returncode == 1 and f"cryptoml rollback {story.v1.commit} --pull" in without_pull.stderr
    run(["cryptoml", "rollback", story.v1.commit, "--pull"], clone)
    assert production_files(clone) == story.v1.files


def test_rollback_restores_v1_byte_for_byte_and_a_clean_pipeline(story: Story, tmp_path: Path) -> None:
    repo = copy_repo(story.repo, tmp_path)  # the rollback is committed
    report = run(["cryptoml", "rollback", story.v1.commit], repo).stdout
    assert f"{story.v2.model_hash} -> {story.v1.model_hash}" in report
    assert production_files(repo) == story.v1.files
    assert {name: (repo / name).read_bytes() for name in VERSIONED_FILES} == story.v1.versioned
    rollback_commit = commit_all(repo, "roll back to v1")
    assert_clean(repo)
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
    assert [(v.commit, v.model_hash) for v in production_changes(PROMOTION, cwd=repo)][1:] == [
        (story.v2.commit, story.v2.model_hash),
        (rollback_commit, story.v1.model_hash),
    ]


def test_plain_git_and_dvc_checkout_restore_the_same_bytes(story: Story, tmp_path: Path) -> None:
    repo = copy_repo(story.repo, tmp_path)
    for version in (story.v2, story.v1):
        run(["git", "checkout", version.commit, "--", *VERSIONED_FILES], repo)
        run(["dvc", "checkout"], repo)
        assert production_files(repo) == version.files
