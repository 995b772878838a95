"""The four GitHub workflows executed end to end by act, offline, against local stand-ins (tests/act.py).

`make test-workflows` runs them (marker `workflows`; `make test` leaves them out). One story, built once, as GitHub
would live it: main holds a reproduced pipeline (tests.repo's FAST_TRAINING and OPEN_GATE, so a `dvc repro` takes
seconds) whose outputs are in the DVC remote, an S3 server on 127.0.0.1; the weekly retrain is started by hand with
`until` one week after data.end and opens a pull request; GitHub makes the pull request's refs and the PR review
comments on it; the pull request is merged with a merge commit, and the push to main runs register. CI runs on a
push to main, and a copy of a workflow with a broken step must fail, naming its workflow and step.

The assertions read outcomes: act's exit code and step results (its JSON log), and what the runs left in `origin`, in
the S3 remote, in the artifacts and in the calls the gh stand-in recorded; never log text. Metric names change with
the model, so a pull-request body is checked for the tables `dvc metrics diff --md` and `dvc params diff --md`
print, not for a metric.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.act import ACT, ACTIONS, STANDINS, ActRun, LocalGitHub, StepResult, workflow_uses
from tests.moto_server import S3_ENV, s3_server
from tests.repo import FAST_TRAINING, REPO_ROOT, commit_all, run, set_params
from tests.webhook import webhook_receiver

BUCKET = "cryptoml-dvc"
UNTIL = "2024-04-08T00:00:00Z"  # one week after FAST_TRAINING's data.end
RETRAIN_BRANCH = "retrain/2024-04-08"
PULL_REQUEST = 1
PRODUCTION = "models/production"
UNREACHABLE_ROC_AUC = 0.99  # no model of these candles ranks that well: the gate rejects
RETRAIN_STEP = "cryptoml retrain (exit 0 promoted, 2 rejected, 1 failed; alerts on 1 and 2)"
# The markdown tables of `dvc metrics diff --md` and `dvc params diff --md`: a header row, then rows.
METRICS_TABLE = re.compile(r"^\|\s*Path\s*\|\s*Metric\s*\|", re.MULTILINE)
PARAMS_TABLE = re.compile(r"^\|\s*Path\s*\|\s*Param\s*\|", re.MULTILINE)
# CI's `make test` runs a small part of the suite inside the run (the whole suite takes minutes, and runs outside
# with `make test`): the real Makefile target, narrowed through pytest's PYTEST_ADDOPTS to the workflow checks and
# the committed-outputs check, which needs the whole git history (it skips itself in a shallow clone).
CI_SELECTION = ("tests/test_workflows.py", "tests/test_workflow_runs.py", "tests/test_committed_outputs.py")


def test_every_action_the_workflows_use_has_a_local_stand_in() -> None:
    assert workflow_uses() == set(ACTIONS)
    for directory in ACTIONS.values():
        assert yaml.safe_load((directory / "action.yml").read_text())["runs"]["using"] == "composite", directory
    assert (STANDINS / "bin" / "gh").stat().st_mode & 0o111


def needs_act() -> None:
    if not ACT.exists():
        pytest.skip(f"act is not installed at {ACT} (it comes with the dev dependencies: make setup)")


def assert_succeeded(result: ActRun) -> None:
    assert result.returncode == 0 and result.failed == [], result.explain()
    assert set(result.jobs.values()) == {"success"}, result.explain()


def gh_calls(github: LocalGitHub, *command: str) -> list[dict[str, Any]]:
    return [call for call in github.gh_calls() if call["args"][: len(command)] == list(command)]


def files(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def pulled_clone(github: LocalGitHub, ref: str, destination: Path) -> Path:
    """A fresh clone of origin at `ref` with every output pulled from the S3 remote its .dvc/config names."""
    run(["git", "clone", "-q", "--branch", ref, str(github.origin), str(destination)], destination.parent)
    run(["dvc", "pull", "-q"], destination, env=S3_ENV)
    return destination


# --- the story ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retrained:
    github: LocalGitHub
    run: ActRun
    main_before: str  # main when the retrain started
    champion: dict[str, bytes]  # models/production on main before the retrain


@dataclass(frozen=True)
class Reviewed:
    retrained: Retrained
    run: ActRun
    refs_before: dict[str, str]  # origin's branches and tags when the review started


@dataclass(frozen=True)
class Registered:
    reviewed: Reviewed
    run: ActRun
    merge: str  # the merge commit pushed to main


@pytest.fixture(scope="module")
def github(reproduced_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGitHub]:
    needs_act()
    with s3_server(BUCKET) as s3:
        yield LocalGitHub.create(tmp_path_factory.mktemp("github"), reproduced_repo, s3)


@pytest.fixture(scope="module")
def retrained(github: LocalGitHub) -> Retrained:
    main = github.sha("main")
    champion = files(github.repo / PRODUCTION)
    event = github.dispatch_event("main", {"until": UNTIL})
    return Retrained(github, github.run("weekly-retrain.yml", "workflow_dispatch", event, main), main, champion)


@pytest.fixture(scope="module")
def reviewed(retrained: Retrained) -> Reviewed:
    github = retrained.github
    assert_succeeded(retrained.run)
    event = github.open_pull_request(PULL_REQUEST, RETRAIN_BRANCH)
    refs_before = github.refs("refs/heads/") | github.refs("refs/tags/")
    result = github.run("pr-review.yml", "pull_request", event, github.sha(f"refs/pull/{PULL_REQUEST}/merge"))
    return Reviewed(retrained, result, refs_before)


@pytest.fixture(scope="module")
def registered(reviewed: Reviewed) -> Registered:
    """The reviewer merges with a merge commit (docs/operations.md); the push to main runs register."""
    github = reviewed.retrained.github
    before = github.sha("main")
    run(["git", "fetch", "-q", "origin"], github.repo)
    run(["git", "merge", "-q", "--no-ff", "-m", f"Merge pull request #{PULL_REQUEST} from {RETRAIN_BRANCH}", f"origin/{RETRAIN_BRANCH}"], github.repo)
    run(["git", "push", "-q", "origin", "main"], github.repo)
    merge = github.sha("main")
    result = github.run("register.yml", "push", github.push_event("main", before), merge)
    return Registered(reviewed, result, merge)


# --- weekly-retrain ---------------------------------------------------------------------------------------


@pytest.mark.workflows
@pytest.mark.e2e
def test_weekly_retrain_pushes_a_branch_with_the_new_data_end_and_outputs(retrained: Retrained, tmp_path: Path) -> None:
    github = retrained.github
    assert_succeeded(retrained.run)
    assert github.refs("refs/heads/").keys() == {"refs/heads/main", f"refs/heads/{RETRAIN_BRANCH}"}
    assert github.sha("main") == retrained.main_before  # main itself is only changed by a merge
    run(["git", "merge-base", "--is-ancestor", retrained.main_before, RETRAIN_BRANCH], github.origin)
    params = yaml.safe_load(github.show(RETRAIN_BRANCH, "params.yaml"))
    assert params["data"]["end"] == UNTIL and params["data"]["start"] == FAST_TRAINING["data.start"]
    assert github.show(RETRAIN_BRANCH, "dvc.lock") != github.show("main", "dvc.lock")
    # The branch's dvc.lock names outputs the remote holds: a fresh clone pulls them all and is up to date.
    clone = pulled_clone(github, RETRAIN_BRANCH, tmp_path / "clone")
    assert "up to date" in run(["dvc", "status"], clone, env=S3_ENV).stdout
    assert files(clone / PRODUCTION) != retrained.champion


@pytest.mark.workflows
@pytest.mark.e2e
def test_weekly_retrain_opens_a_pull_request_with_the_metrics_and_params_diffs(retrained: Retrained) -> None:
    github = retrained.github
    [call] = gh_calls(github, "pr", "create")
    assert call["options"]["--base"] == "main" and call["options"]["--head"] == RETRAIN_BRANCH
    assert RETRAIN_BRANCH in call["options"]["--title"]
    body = call["body"]
    assert METRICS_TABLE.search(body) and PARAMS_TABLE.search(body), body
    assert re.search(rf"^\|.*\bdata\.end\b.*\|.*{FAST_TRAINING['data.end']}.*\|.*{UNTIL}", body, re.MULTILINE), body
    report = retrained.run.artifacts / "retrain-report"
    assert {"metrics", "plots", "dvc_plots"} <= {path.name for path in report.iterdir()}
    assert (report / "dvc_plots" / "index.html").is_file()


@pytest.mark.workflows
@pytest.mark.e2e
def test_a_rejected_weekly_retrain_alerts_pushes_nothing_and_fails_at_the_retrain_step(reproduced_repo: Path, tmp_path: Path) -> None:
    needs_act()
    with s3_server(BUCKET) as s3, webhook_receiver() as webhook:
        github = LocalGitHub.create(tmp_path, reproduced_repo, s3, secrets={"CRYPTOML_ALERT_WEBHOOK": webhook.url})
        set_params(github.repo, {"gate.min_roc_auc": UNREACHABLE_ROC_AUC})
        commit_all(github.repo, "a gate no model passes")
        run(["git", "push", "-q", "origin", "main"], github.repo)
        main, objects = github.sha("main"), set(s3.object_keys())
        result = github.run("weekly-retrain.yml", "workflow_dispatch", github.dispatch_event("main", {"until": UNTIL}), main)
        assert set(s3.object_keys()) == objects  # no dvc push
    assert result.returncode != 0 and result.jobs == {"Weekly retrain/retrain": "failure"}
    assert result.failed == [StepResult("Weekly retrain/retrain", RETRAIN_STEP, "Main", "failure")], result.explain()
    assert "Open the pull request" not in {step.step for step in result.steps}  # skipped
    # The report steps run on a red retrain (if: !cancelled()).
    assert result.result("Plots against main") == result.result("Upload metrics and plots") == "success"
    assert (result.artifacts / "retrain-report" / "metrics").is_dir()
    assert github.refs("refs/heads/") == {"refs/heads/main": main} and github.gh_calls() == []
    [alert] = webhook.posts
    assert "REJECTED" in alert["content"] and UNTIL in alert["content"]


# --- pr-review ------------------------------------------------------------------------------------------


@pytest.mark.workflows
@pytest.mark.e2e
def test_pr_review_comments_the_metrics_params_and_plots_diffs(reviewed: Reviewed) -> None:
    github = reviewed.retrained.github
    assert_succeeded(reviewed.run)
    [call] = gh_calls(github, "pr", "comment")
    assert call["positional"] == [str(PULL_REQUEST)]
    assert call["options"].get("--edit-last") and call["options"].get("--create-if-none")  # one comment, updated
    body = call["body"]
    assert METRICS_TABLE.search(body) and PARAMS_TABLE.search(body), body
    assert re.search(rf"^\|.*\bdata\.end\b.*\|.*{UNTIL}", body, re.MULTILINE), body
    plots = reviewed.run.artifacts / f"plots-diff-pr-{PULL_REQUEST}"
    assert f"]({plots.as_uri()})" in body  # the link is the uploaded artifact's URL
    assert (plots / "dvc_plots" / "index.html").is_file()
    # permissions: contents: read; the review changes nothing in the repository.
    assert github.refs("refs/heads/") | github.refs("refs/tags/") == reviewed.refs_before


@pytest.mark.workflows
@pytest.mark.e2e
@pytest.mark.parametrize("workflow", ["register.yml", "weekly-retrain.yml"])
def test_a_manual_run_on_another_branch_than_main_changes_nothing(reviewed: Reviewed, workflow: str) -> None:
    """Run workflow (workflow_dispatch) lets a person pick any branch: on the unmerged retrain branch, register must
    not version its model and give it `prod` (the bots would pull an unreviewed model), nor retrain from it."""
    github = reviewed.retrained.github
    refs = github.refs("refs/heads/") | github.refs("refs/tags/")
    event = github.dispatch_event(RETRAIN_BRANCH, {"until": UNTIL} if workflow == "weekly-retrain.yml" else {})
    result = github.run(workflow, "workflow_dispatch", event, github.sha(RETRAIN_BRANCH))
    assert result.returncode == 0 and result.steps == [], result.explain()  # the job's if: skips it
    assert github.refs("refs/heads/") | github.refs("refs/tags/") == refs


# --- register -------------------------------------------------------------------------------------------


def semver(tag: str) -> tuple[int, ...]:
    return tuple(int(part) for part in tag.rsplit("@v", 1)[1].split("."))


@pytest.mark.workflows
@pytest.mark.e2e
def test_register_tags_the_merged_model_as_a_version_in_prod(registered: Registered) -> None:
    github = registered.reviewed.retrained.github
    assert_succeeded(registered.run)
    tags = {name.removeprefix("refs/tags/"): sha for name, sha in github.refs("refs/tags/").items()}
    versions = {name: sha for name, sha in tags.items() if name.startswith("signal-model@v")}
    stages = {name: sha for name, sha in tags.items() if name.startswith("signal-model#prod#")}
    assert len(versions) == 2 and stages, tags  # the first model of main and the merged one
    retrain_head = github.sha(RETRAIN_BRANCH)
    newest = max(versions, key=semver)
    assert versions[newest] == retrain_head  # the commit that recorded the merged model
    assert stages[max(stages, key=lambda name: int(name.rsplit("#", 1)[1]))] == retrain_head
    for sha in versions.values():
        run(["git", "merge-base", "--is-ancestor", sha, registered.merge], github.origin)
    assert github.sha("main") == registered.merge  # register pushes tags only


@pytest.mark.workflows
@pytest.mark.e2e
def test_dvc_artifacts_get_of_prod_returns_the_merged_model(registered: Registered, tmp_path: Path) -> None:
    github = registered.reviewed.retrained.github
    out = tmp_path / "prod"
    run(["dvc", "artifacts", "get", str(github.origin), "signal-model", "--stage", "prod", "-o", str(out)], tmp_path, env=S3_ENV)
    merged = pulled_clone(github, "main", tmp_path / "main")
    assert files(out) == files(merged / PRODUCTION)
    assert files(out) != registered.reviewed.retrained.champion


# --- ci -------------------------------------------------------------------------------------------------


@pytest.mark.workflows
@pytest.mark.e2e
def test_ci_runs_make_test_on_a_push_to_main(github: LocalGitHub) -> None:
    junit = github.root / "ci-junit.xml"
    addopts = f"--no-cov -p no:cacheprovider --junitxml={junit} {' '.join(CI_SELECTION)}"
    main = github.sha("main")
    result = github.run("ci.yml", "push", github.push_event("main", main), main, env={"PYTEST_ADDOPTS": addopts})
    assert_succeeded(result)
    assert [(step.step, step.result) for step in result.steps if step.stage == "Main"] == [
        ("actions/checkout@v4", "success"),
        ("actions/setup-python@v5", "success"),
        ("make test (creates .venv from requirements.lock, then the whole suite with coverage)", "success"),
    ]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors")}
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0, counts
    ran = {case.get("classname", "").rsplit(".", 1)[-1] for case in suite.iter("testcase")}
    assert ran == {Path(name).stem for name in CI_SELECTION}
    skipped = [case.get("name") for case in suite.iter("testcase") if case.find("skipped") is not None]
    assert skipped == []  # none: the checkout has the history test_committed_outputs.py needs


# --- a broken step ------------------------------------------------------------------------------------


@pytest.mark.workflows
@pytest.mark.e2e
def test_a_broken_step_fails_the_run_naming_the_workflow_and_the_step(reviewed: Reviewed, tmp_path: Path) -> None:
    """A copy of pr-review.yml whose comment step diffs the metrics against a misspelt base revision."""
    github = reviewed.retrained.github
    text = (REPO_ROOT / ".github" / "workflows" / "pr-review.yml").read_text()
    assert text.count("dvc metrics diff main --md") == 1
    broken = tmp_path / "pr-review.yml"
    broken.write_text(text.replace("dvc metrics diff main --md", "dvc metrics diff mian --md"))
    comments = len(gh_calls(github, "pr", "comment"))
    event = github.pull_requests[PULL_REQUEST]
    result = github.run(broken, "pull_request", event, github.sha(f"refs/pull/{PULL_REQUEST}/merge"))
    assert result.returncode != 0
    assert result.jobs == {"PR review/review": "failure"}
    assert result.failed == [StepResult("PR review/review", "Comment metrics, params and plots against main", "Main", "failure")]
    assert result.result("Pull the outputs dvc.lock names (fails if they were never pushed)") == "success"
    assert len(gh_calls(github, "pr", "comment")) == comments  # nothing posted
