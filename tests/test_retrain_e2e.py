"""`cryptoml retrain`: the window arithmetic and texts as pure functions, then the weekly job end to end.

End to end, in a temporary git repository with a local bare git remote, a local DVC remote (a directory),
candles from the local fake bitbank server and a webhook receiver on 127.0.0.1: a promotion (branch pushed,
pull-request body), a rejection (alert, exit 2, production byte-identical), a failure (exchange down: alert,
exit 1) and a failure whose alert cannot be sent (webhook down: still exit 1, the failure in the log).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cryptoml.candles.synthetic import simulate_candles
from cryptoml.cli import app
from cryptoml.config import load_params
from cryptoml.live.alerts import MAX_CONTENT_CHARS, WEBHOOK_ENV, alert_payload, send_alert
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.release.retrain import (
    MAX_BODY_CHARS,
    Outcome,
    RetrainError,
    branch_name,
    headline_table,
    new_window_end,
    parse_until,
    pull_request_body,
    run_url,
    set_data_end,
    utc_iso,
)
from tests.fake_exchange import FakeBitbank
from tests.repo import BIN, FAST_TRAINING, OPEN_GATE, REPO_ROOT, commit_all, make_repo, run, set_params
from tests.webhook import SECRET_PATH, Receiver, unreachable_url, unused_port, webhook_receiver

NOW = pd.Timestamp("2024-03-01T00:00:00Z")
PARAMS = load_params(REPO_ROOT / "params.yaml")


# --- pure functions ---------------------------------------------------------------------------------


def test_set_data_end_changes_only_that_value_and_keeps_comments() -> None:
    text = (REPO_ROOT / "params.yaml").read_text()
    end = PARAMS.data.end + pd.Timedelta(days=7)
    updated = set_data_end(text, end)
    changed = [(old, new) for old, new in zip(text.splitlines(), updated.splitlines(), strict=True) if old != new]
    assert changed == [(f'  end: "{utc_iso(PARAMS.data.end)}"', f'  end: "{utc_iso(end)}"')]
    assert yaml.safe_load(updated)["data"]["end"] == utc_iso(end)


@pytest.mark.parametrize(
    ("text", "message"),
    [("label: {horizon: 1}\n", "missing key 'data'"), ("data: {start: x}\n", "data: missing key 'end'")],
)
def test_set_data_end_names_the_missing_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        set_data_end(text, NOW)


def test_new_window_end_is_the_last_boundary_and_must_move_forward() -> None:
    data = PARAMS.data
    until = data.end + pd.Timedelta(days=7, minutes=59, seconds=59)
    assert new_window_end(data, until) == data.end + pd.Timedelta(days=7)
    assert new_window_end(data, data.end + pd.Timedelta(hours=1)) == data.end + pd.Timedelta(hours=1)
    with pytest.raises(RetrainError, match="nothing new to train on"):
        new_window_end(data, data.end + pd.Timedelta(minutes=59))


def test_parse_until_reads_utc_and_refuses_the_future_and_garbage() -> None:
    assert parse_until(None, NOW) == NOW
    assert parse_until("2024-02-01", NOW) == pd.Timestamp("2024-02-01T00:00:00Z")
    assert parse_until("2024-02-01T09:00:00+09:00", NOW) == pd.Timestamp("2024-02-01T00:00:00Z")
    with pytest.raises(ValueError, match="in the future"):
        parse_until("2024-03-01T00:00:01Z", NOW)
    with pytest.raises(ValueError, match="--until: expected an ISO-8601"):
        parse_until("next monday", NOW)


def test_headline_table_compares_the_base_model_with_this_one() -> None:
    base = {"policy": {"roc_auc": 0.55}, "backtest": {"rule": {"sharpe": 1.0}}}
    table = headline_table(base, {"policy": {"roc_auc": 0.5625}, "backtest": {"rule": {"sharpe": 0.5}}}, "main")
    assert table.splitlines()[0] == "| out-of-sample metric | `main` | this branch | change |"
    assert "| policy.roc_auc | 0.5500 | 0.5625 | +0.0125 |" in table
    assert "| backtest.rule.sharpe | 1.0000 | 0.5000 | -0.5000 |" in table
    assert "| policy.brier_vs_prior | - | - | - |" in table


def test_pull_request_body_fits_github_by_dropping_the_full_metric_table() -> None:
    decision = {"challenger_sha256": "sha256:abc", "champion_sha256": None, "reasons": ["passed"]}
    common = {"data": PARAMS.data, "data_metrics": {}, "decision": decision, "headline": "HEADLINE", "params_diff": "", "base": "main"}
    short = pull_request_body(**common, metrics_diff="| every | metric |", run=None)
    assert "| every | metric |" in short and "dvc pull && dvc plots diff main" in short
    huge = pull_request_body(**common, metrics_diff="x" * MAX_BODY_CHARS, run="https://ci/runs/1")
    assert len(huge) <= MAX_BODY_CHARS and "too long for a pull-request body" in huge
    assert "HEADLINE" in huge and "[the run](https://ci/runs/1)" in huge


def test_run_url_needs_every_github_variable() -> None:
    environ = {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "o/r", "GITHUB_RUN_ID": "9"}
    assert run_url(environ) == "https://github.com/o/r/actions/runs/9"
    assert run_url({**environ, "GITHUB_RUN_ID": ""}) is None


def test_alert_payload_is_discord_json_within_its_limit() -> None:
    assert json.loads(alert_payload("short")) == {"content": "short"}
    long = json.loads(alert_payload("x" * (MAX_CONTENT_CHARS * 2)))["content"]
    assert len(long) == MAX_CONTENT_CHARS and long.startswith("x")


@pytest.mark.fault
def test_send_alert_posts_and_never_logs_the_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    with webhook_receiver() as receiver:
        assert send_alert("it broke", {WEBHOOK_ENV: receiver.url})
    assert receiver.posts == [{"content": "it broke"}]
    assert not send_alert("it broke", {WEBHOOK_ENV: unreachable_url()})
    assert not send_alert("it broke", {WEBHOOK_ENV: f"file:///etc{SECRET_PATH}"})
    assert not send_alert("it broke", {})
    assert "could not be sent" in caplog.text and "not set" in caplog.text
    assert SECRET_PATH not in caplog.text


# --- end to end -----------------------------------------------------------------------------------

WINDOW = {"data.start": "2024-01-01T00:00:00Z", "data.end": "2024-02-01T00:00:00Z"}
PROMOTION_UNTIL = "2024-02-15T05:30:00Z"  # mid-candle: data.end becomes 2024-02-15T05:00:00Z
REJECTION_UNTIL = "2024-02-22T00:00:00Z"
# The gate is open (OPEN_GATE): the rejection test tightens its ROC AUC floor; the first model only has to exist.


def exchange_params(api_url: str) -> dict[str, object]:
    """FAST_TRAINING on the window above, with candles from the exchange at `api_url`, failing fast."""
    return {
        **FAST_TRAINING,
        **WINDOW,
        "data.source": "exchange",
        "data.exchange.api_url": api_url,
        "data.exchange.max_retries": 1,
        "data.exchange.backoff_seconds": 0.01,
    }


@dataclass(frozen=True)
class RetrainRun:
    exit_code: int
    output: str  # stdout, stderr and the log, interleaved


def cryptoml_retrain(repo: Path, webhook_url: str, *args: str) -> RetrainRun:
    """`cryptoml retrain ARGS` in `repo`, in-process (so coverage sees it), as the weekly workflow runs it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(repo)
        patch.setenv(WEBHOOK_ENV, webhook_url)
        patch.setenv("PATH", str(BIN), prepend=os.pathsep)  # the stages dvc runs call `cryptoml`
        result = CliRunner().invoke(app, ["retrain", *args])
    return RetrainRun(result.exit_code, result.output)


def production_files(repo: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((repo / "models/production").iterdir())}


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout.strip()


@dataclass(frozen=True)
class Workspace:
    repo: Path
    origin: Path  # the bare git remote
    pr_body: Path
    webhook: Receiver


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A repository whose main holds the pipeline (exchange source, a DVC remote), pushed to a bare origin."""
    root = tmp_path_factory.mktemp("retrain")
    candles = simulate_candles(pd.Timestamp(WINDOW["data.start"]), NOW, "1h", seed=PARAMS.data.synthetic.seed)
    with FakeBitbank(candles) as exchange, webhook_receiver() as webhook:
        repo = make_repo(root, {**exchange_params(exchange.url), **OPEN_GATE})
        run(["dvc", "remote", "add", "--default", "storage", str(root / "dvc-storage")], repo)
        commit_all(repo, "DVC remote")
        run(["git", "init", "--quiet", "--bare", str(root / "origin.git")], root)
        run(["git", "remote", "add", "origin", str(root / "origin.git")], repo)
        run(["git", "push", "--quiet", "origin", "main"], repo)
        yield Workspace(repo, root / "origin.git", root / "pr-body.md", webhook)


@dataclass(frozen=True)
class Promotion:
    run: RetrainRun
    main: str  # main's commit the retrain started from
    alerts: list[object]


@pytest.fixture(scope="module")
def promotion(workspace: Workspace) -> Promotion:
    main = git(workspace.repo, "rev-parse", "main")
    retrained = cryptoml_retrain(
        workspace.repo, workspace.webhook.url, "--until", PROMOTION_UNTIL, "--push", "--pr-body", str(workspace.pr_body)
    )
    return Promotion(retrained, main, list(workspace.webhook.posts))


PROMOTION_END = "2024-02-15T05:00:00Z"
PROMOTION_BRANCH = "retrain/2024-02-15"


@pytest.mark.e2e
def test_promotion_pushes_a_branch_with_the_params_commit_then_the_outputs(workspace: Workspace, promotion: Promotion) -> None:
    assert promotion.run.exit_code == Outcome.PROMOTED, promotion.run.output
    assert branch_name(pd.Timestamp(PROMOTION_END)) == PROMOTION_BRANCH
    repo = workspace.repo
    assert git(repo, "branch", "--show-current") == PROMOTION_BRANCH
    assert git(workspace.origin, "rev-parse", PROMOTION_BRANCH) == git(repo, "rev-parse", "HEAD")
    params_commit, outputs_commit = git(repo, "rev-list", "--reverse", f"{promotion.main}..HEAD").split()
    assert git(repo, "diff", "--name-only", promotion.main, params_commit) == "params.yaml"
    assert f'+  end: "{PROMOTION_END}"' in git(repo, "diff", promotion.main, params_commit)
    assert {"dvc.lock", "metrics/promotion.json"} <= set(git(repo, "diff", "--name-only", params_commit, outputs_commit).split())
    assert git(repo, "status", "--porcelain") == ""
    assert promotion.alerts == []


@pytest.mark.e2e
def test_promoted_model_records_the_params_commit_and_its_outputs_are_in_the_remote(workspace: Workspace, promotion: Promotion) -> None:
    repo = workspace.repo
    params_commit = git(repo, "rev-parse", f"{PROMOTION_BRANCH}~1")
    metadata = json.loads((repo / "models/production/production_model_metadata.json").read_text())
    assert metadata["version_control"]["git_commit"] == params_commit
    assert metadata["model_sha256"] == ProductionEnsemble.load(repo / "models/production").model_sha256_
    assert "in sync" in run(["dvc", "status", "--cloud"], repo).stdout


@pytest.mark.e2e
def test_pull_request_body_shows_window_gate_and_diffs_against_main(workspace: Workspace, promotion: Promotion) -> None:
    body = workspace.pr_body.read_text()
    decision = json.loads((workspace.repo / "metrics/promotion.json").read_text())
    assert body.startswith(f"## Retrain on data until {PROMOTION_END}")
    assert f"[{WINDOW['data.start']}, {PROMOTION_END}) UTC, 1h candles from bitbank BTC/JPY" in body
    assert decision["decision"] == "promoted" and decision["challenger_sha256"] in body
    assert all(f"- {reason}" in body for reason in decision["reasons"])
    evaluation = json.loads((workspace.repo / "metrics/evaluate.json").read_text())
    headline = body.split("### Walk-forward metrics against `main`")[1].split("<details>")[0]
    assert f"| policy.roc_auc | - | {evaluation['policy']['roc_auc']:.4f} | - |" in headline  # main had no model
    every_metric = body.split("<details>")[1].split("</details>")[0]
    assert "| metrics/evaluate.json" in every_metric and "| metrics/train.json" in every_metric
    params_section = body.split("### Params against `main`")[1].split("###")[0]
    assert "data.end" in params_section and PROMOTION_END in params_section
    assert "dvc plots diff main" in body
    assert SECRET_PATH not in body + promotion.run.output


@dataclass(frozen=True)
class Rejection:
    workspace: Workspace  # the copy it ran in
    run: RetrainRun
    production_before: dict[str, bytes]
    new_alerts: list[object]


@pytest.fixture(scope="module")
def rejection(workspace: Workspace, promotion: Promotion, tmp_path_factory: pytest.TempPathFactory) -> Rejection:
    """The promotion's pull request merged into main, then a week later a retrain under an unreachable ROC AUC floor.

    On a copy of the workspace and its origin (the DVC remote, which a rejection only reads, is shared), so that the
    promotion's tests find the promotion, whatever the order.
    """
    root = Path(shutil.copytree(workspace.repo.parent, tmp_path_factory.mktemp("rejection") / "root", symlinks=True))
    workspace = replace(workspace, repo=root / workspace.repo.name, origin=root / workspace.origin.name, pr_body=root / workspace.pr_body.name)
    repo = workspace.repo
    run(["git", "remote", "set-url", "origin", str(workspace.origin)], repo)
    run(["git", "switch", "--quiet", "main"], repo)
    run(["git", "merge", "--quiet", "--ff-only", PROMOTION_BRANCH], repo)
    run(["git", "branch", "--quiet", "--delete", PROMOTION_BRANCH], repo)
    set_params(repo, {"gate.min_roc_auc": 0.99})
    commit_all(repo, "gate: demand ROC AUC 0.99")
    run(["git", "push", "--quiet", "origin", "main"], repo)
    before = production_files(repo)
    alerts_before = len(workspace.webhook.posts)
    workspace.pr_body.unlink(missing_ok=True)
    retrained = cryptoml_retrain(
        workspace.repo, workspace.webhook.url, "--until", REJECTION_UNTIL, "--push", "--pr-body", str(workspace.pr_body)
    )
    return Rejection(workspace, retrained, before, workspace.webhook.posts[alerts_before:])


@pytest.mark.e2e
@pytest.mark.fault
def test_rejection_alerts_exits_2_and_leaves_production_byte_identical(rejection: Rejection) -> None:
    workspace = rejection.workspace
    assert rejection.run.exit_code == Outcome.REJECTED, rejection.run.output
    assert production_files(workspace.repo) == rejection.production_before
    decision = json.loads((workspace.repo / "metrics/promotion.json").read_text())
    assert decision["decision"] == "rejected"
    [alert] = rejection.new_alerts
    assert "REJECTED" in alert["content"] and "gate.min_roc_auc" in alert["content"]
    assert decision["challenger_sha256"] in alert["content"]
    assert "retrain/2024-02-22" not in git(workspace.origin, "branch", "--list")
    assert not workspace.pr_body.exists()
    assert SECRET_PATH not in rejection.run.output


@pytest.fixture()
def unreachable_exchange_repo(tmp_path: Path) -> Path:
    """A repository whose exchange URL has nothing listening: the fetch stage fails after its one retry."""
    return make_repo(tmp_path, exchange_params(f"http://127.0.0.1:{unused_port()}"))


@pytest.mark.e2e
@pytest.mark.fault
def test_exchange_down_alerts_and_exits_1(unreachable_exchange_repo: Path) -> None:
    with webhook_receiver() as webhook:
        failed = cryptoml_retrain(unreachable_exchange_repo, webhook.url, "--until", PROMOTION_UNTIL)
    assert failed.exit_code == Outcome.FAILED, failed.output
    [alert] = webhook.posts
    assert "FAILED while reproducing the pipeline" in alert["content"]
    assert "could not fetch bitbank BTC/JPY 1h candles" in alert["content"]
    assert SECRET_PATH not in failed.output


@pytest.mark.e2e
@pytest.mark.fault
def test_webhook_down_still_exits_1_with_the_failure_in_the_log(unreachable_exchange_repo: Path) -> None:
    failed = cryptoml_retrain(unreachable_exchange_repo, unreachable_url(), "--until", PROMOTION_UNTIL)
    assert failed.exit_code == Outcome.FAILED
    assert "FAILED while reproducing the pipeline" in failed.output
    assert "the alert could not be sent" in failed.output
    assert SECRET_PATH not in failed.output


@pytest.mark.fault
def test_uncommitted_params_stop_the_retrain_before_any_branch_or_training(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, FAST_TRAINING)
    set_params(repo, {"model.random_state": 1})  # would train a model its recorded commit does not describe
    with webhook_receiver() as webhook:
        failed = cryptoml_retrain(repo, webhook.url, "--until", "2024-05-01")
    assert failed.exit_code == Outcome.FAILED
    [alert] = webhook.posts
    assert "uncommitted changes to tracked files" in alert["content"] and "params.yaml" in alert["content"]
    assert git(repo, "branch", "--show-current") == "main" and not (repo / "dvc.lock").exists()
