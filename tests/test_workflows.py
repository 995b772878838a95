"""The GitHub Actions workflows: lint-clean (actionlint), valid against GitHub's schema, and wired to what exists.

GitHub only runs them on its servers, so these checks are what catches a typo before a Monday retrain does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from cryptoml.cli import app
from tests.repo import BIN, REPO_ROOT, run

WORKFLOWS_DIR = REPO_ROOT / ".github" / "workflows"
WORKFLOWS = ("ci.yml", "pr-review.yml", "register.yml", "weekly-retrain.yml")
CHECKSUM_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED", "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED"}


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {BIN} (it comes with the dev dependencies: make setup)")
    return path


def load(name: str) -> dict[Any, Any]:
    return yaml.safe_load((WORKFLOWS_DIR / name).read_text())


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    """The `on:` mapping; YAML 1.1 (PyYAML) reads the bare key `on` as True."""
    return workflow.get("on", workflow.get(True))


def scripts(workflow: dict[Any, Any]) -> str:
    return "\n".join(step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step)


def test_every_workflow_is_present() -> None:
    assert sorted(path.name for path in WORKFLOWS_DIR.glob("*.yml")) == sorted(WORKFLOWS)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_actionlint_finds_nothing(name: str) -> None:
    result = run([str(tool("actionlint")), "-no-color", str(WORKFLOWS_DIR / name)], REPO_ROOT, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_valid_against_the_github_workflow_schema(name: str) -> None:
    command = [str(tool("check-jsonschema")), "--builtin-schema", "vendor.github-workflows", str(WORKFLOWS_DIR / name)]
    result = run(command, REPO_ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), flags=re.MULTILINE))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_call_make_targets_and_cryptoml_options_that_exist(name: str) -> None:
    script = scripts(load(name))
    assert set(re.findall(r"\bmake ([\w-]+)", script)) <= makefile_targets()
    retrain_options = {opt for param in get_command(app).commands["retrain"].params for opt in param.opts}
    for line in re.findall(r"cryptoml retrain.*", script):
        assert set(re.findall(r"--[\w-]+", line)) <= retrain_options, line


def test_ci_runs_make_test_on_pushes_and_pull_requests() -> None:
    workflow = load("ci.yml")
    assert {"push", "pull_request"} <= set(triggers(workflow))
    assert "make test" in scripts(workflow)
    [job] = workflow["jobs"].values()
    assert job["steps"][0]["with"]["fetch-depth"] == 0  # tests/test_committed_outputs.py needs the history


def test_pr_review_comments_the_diffs_against_main() -> None:
    workflow = load("pr-review.yml")
    assert set(triggers(workflow)["pull_request"]["paths"]) == {"dvc.lock", "params.yaml", "src/**"}
    [job] = workflow["jobs"].values()
    assert job["steps"][0]["with"]["fetch-depth"] == 0
    script = scripts(workflow)
    for command in ("git fetch --no-tags origin main:main", "make setup", "dvc pull", "dvc metrics diff main --md",
                    "dvc params diff main --md", "dvc plots diff main", "gh pr comment"):
        assert command in script, command
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])
    assert workflow["env"] == CHECKSUM_ENV and workflow["permissions"]["pull-requests"] == "write"


def test_weekly_retrain_is_scheduled_manual_exclusive_and_opens_a_pull_request() -> None:
    workflow = load("weekly-retrain.yml")
    on = triggers(workflow)
    assert on["schedule"][0]["cron"] and "until" in on["workflow_dispatch"]["inputs"]
    assert workflow["concurrency"]["cancel-in-progress"] is False and workflow["concurrency"]["group"]
    assert workflow["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert workflow["env"] == CHECKSUM_ENV
    [job] = workflow["jobs"].values()
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT"} <= set(job["env"])
    [retrain_step] = [step for step in job["steps"] if "cryptoml retrain" in step.get("run", "")]
    assert retrain_step["env"]["CRYPTOML_ALERT_WEBHOOK"] == "${{ secrets.CRYPTOML_ALERT_WEBHOOK }}"
    assert "--push" in retrain_step["run"] and "--pr-body" in retrain_step["run"]
    assert "gh pr create" in scripts(workflow) and "--body-file" in scripts(workflow)
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])


def test_register_runs_on_pushes_to_main_one_at_a_time_and_pushes_the_tags() -> None:
    workflow = load("register.yml")
    assert triggers(workflow)["push"]["branches"] == ["main"]
    assert workflow["concurrency"]["cancel-in-progress"] is False and workflow["concurrency"]["group"]
    assert workflow["permissions"] == {"contents": "write"}
    [job] = workflow["jobs"].values()
    assert job["if"] == "github.ref == 'refs/heads/main'"  # a manual run on another branch must not assign prod
    assert job["steps"][0]["with"]["fetch-depth"] == 0
    [line] = re.findall(r"cryptoml register.*", scripts(workflow))
    register_options = {opt for param in get_command(app).commands["register"].params for opt in param.opts}
    assert line == "cryptoml register --push origin" and "--push" in register_options


@pytest.fixture()
def dvc_repo(tmp_path: Path) -> Path:
    run(["git", "init", "--quiet"], tmp_path)
    run(["dvc", "init", "--quiet"], tmp_path)
    return tmp_path


def make_dvc_remote(repo: Path, env: dict[str, str]) -> str:
    """`make dvc-remote` of this repository's Makefile, run in `repo`."""
    return run(["make", "--no-print-directory", "-f", str(REPO_ROOT / "Makefile"), "dvc-remote"], repo, env=env).stdout


def test_make_dvc_remote_writes_the_remote_from_the_environment_to_the_local_config(dvc_repo: Path) -> None:
    committed = (dvc_repo / ".dvc/config").read_bytes()
    env = {"DVC_REMOTE_URL": "s3://bucket/cryptoml", "DVC_REMOTE_ENDPOINT": "https://example.r2.invalid"}
    make_dvc_remote(dvc_repo, env)
    assert run(["dvc", "remote", "default"], dvc_repo).stdout.strip() == "ci"
    assert run(["dvc", "config", "--local", "remote.ci.url"], dvc_repo).stdout.strip() == env["DVC_REMOTE_URL"]
    assert run(["dvc", "config", "--local", "remote.ci.endpointurl"], dvc_repo).stdout.strip() == env["DVC_REMOTE_ENDPOINT"]
    assert (dvc_repo / ".dvc/config").read_bytes() == committed


def test_make_dvc_remote_without_a_url_keeps_the_committed_config(dvc_repo: Path) -> None:
    assert "DVC_REMOTE_URL is not set" in make_dvc_remote(dvc_repo, {"DVC_REMOTE_URL": ""})
    assert not (dvc_repo / ".dvc/config.local").exists()
