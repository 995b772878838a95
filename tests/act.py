"""The GitHub workflows run offline by act (self-hosted mode: steps run on this machine, no Docker), against stand-ins.

`LocalGitHub` plays GitHub's part: a bare git repository is `origin`, the S3 server of tests/moto_server.py is the DVC
remote (its URL and keys given as secrets), and `LocalGitHub.run()` runs one workflow for one event with act, every
`uses:` replaced by a local composite action of tests/workflows/actions (act --local-repository) and `gh` by
tests/workflows/bin/gh, which records its calls. A run's outcome is read from act's exit code and its JSON log (one
result per step), and from what the run left in `origin`, the S3 bucket, the recorded gh calls and the artifacts.
docs/operations.md lists what the stand-ins replace and what only a run on GitHub shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.moto_server import S3_ENV, S3Server
from tests.repo import BIN, REPO_ROOT, commit_all, run

ACT = BIN / "act"
STANDINS = REPO_ROOT / "tests" / "workflows"
# Each `uses:` of .github/workflows and its stand-in (act --local-repository <uses>=<directory>).
ACTIONS = {
    "actions/checkout@v4": STANDINS / "actions" / "checkout",
    "actions/setup-python@v5": STANDINS / "actions" / "setup-python",
    "actions/upload-artifact@v4": STANDINS / "actions" / "upload-artifact",
}
REPOSITORY = "acme/cryptoml"
GITHUB_TOKEN = "act-local-github-token"  # a stand-in: the gh and checkout stand-ins only check it is set
# What a workflow needs beside the pipeline: `make setup` (Makefile, project metadata, lock), the workflows, and the
# tests that ci.yml's `make test` runs.
WORKFLOW_FILES = ("Makefile", "pyproject.toml", "requirements.lock", "README.md")
WORKFLOW_DIRS = (".github", "tests")
# Seconds for one act run; the slowest, the weekly retrain, takes about a minute on 2 cores.
RUN_TIMEOUT = 900.0


def workflow_uses(workflows: Path = REPO_ROOT / ".github" / "workflows") -> set[str]:
    """Every `uses:` of every step of every workflow."""
    found = set()
    for path in workflows.glob("*.yml"):
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            found |= {step["uses"] for step in job.get("steps", []) if "uses" in step}
    return found


@dataclass(frozen=True)
class StepResult:
    job: str  # "<workflow name>/<job id>", as act names it
    step: str  # the step's name (or its `uses:` or `run:` when it has none)
    stage: str  # Pre, Main or Post ("" for act's Set up job / Complete job)
    result: str  # success, failure or skipped


@dataclass(frozen=True)
class ActRun:
    """One `act` invocation: its exit code, the result of each top-level step, and the job results."""

    returncode: int
    steps: list[StepResult]
    jobs: dict[str, str]  # job -> success or failure
    log: str  # act's JSON log, for the assertion message of a failed run
    artifacts: Path  # the run's uploaded artifacts, one directory each

    @property
    def failed(self) -> list[StepResult]:
        return [step for step in self.steps if step.result == "failure"]

    def result(self, step: str, stage: str = "Main") -> str:
        [found] = [s.result for s in self.steps if s.step == step and s.stage == stage]
        return found

    def explain(self) -> str:
        """The log lines of the failed steps (their output and act's error lines), to read when a test fails."""
        failed = {(s.job, s.step) for s in self.failed} or {(s.job, s.step) for s in self.steps}
        lines = []
        for line in self.log.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                lines.append(line)
                continue
            if (entry.get("job"), entry.get("step")) in failed or entry.get("level") in {"error", "warning"}:
                lines.append(f"[{entry.get('step', '')}] {str(entry.get('msg', '')).rstrip()}")
        return f"act exited {self.returncode}; failed steps: {self.failed}\n" + "\n".join(lines[-200:])


def parse_log(returncode: int, log: str, artifacts: Path) -> ActRun:
    steps, jobs = [], {}
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "jobResult" in entry:
            jobs[entry["job"]] = entry["jobResult"]
        step_id = entry.get("stepID") or entry.get("stepid") or []
        # Top-level steps only: a composite action's own steps have a longer stepID.
        if "stepResult" in entry and len(step_id) == 1:
            steps.append(StepResult(entry["job"], entry["step"], entry.get("stage", ""), entry["stepResult"]))
    return ActRun(returncode, steps, jobs, log, artifacts)


@dataclass
class LocalGitHub:
    """GitHub for one repository, on this machine: `origin`, the DVC remote, the secrets, `gh` and artifacts."""

    root: Path
    repo: Path  # a developer's clone: what the test commits, merges and pushes as people would
    origin: Path  # bare repository: what GitHub holds
    s3: S3Server
    bucket_prefix: str = "dvc"
    pull_requests: dict[int, dict[str, Any]] = field(default_factory=dict)  # number -> its pull_request event
    runs: int = 0  # workflow runs so far: the next one is GITHUB_RUN_ID runs + 1

    @classmethod
    def create(cls, root: Path, reproduced: Path, s3: S3Server, secrets: dict[str, str] | None = None) -> LocalGitHub:
        """A copy of `reproduced` (tests.repo.reproduce_once) with what the workflows need, its outputs in the S3
        remote and its main branch in `origin`. The DVC remote is committed to .dvc/config: `dvc artifacts get`
        reads it from the repository, and the workflows get it again from the secrets (make dvc-remote).
        `secrets`: more Actions secrets, e.g. CRYPTOML_ALERT_WEBHOOK."""
        repo = Path(shutil.copytree(reproduced, root / "repo", symlinks=True))
        for name in WORKFLOW_FILES:
            shutil.copy2(REPO_ROOT / name, repo / name)
        for name in WORKFLOW_DIRS:
            shutil.copytree(REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        github = cls(root, repo, root / "origin.git", s3)
        run(["dvc", "remote", "add", "-d", "storage", github.dvc_remote_url], repo)
        run(["dvc", "remote", "modify", "storage", "endpointurl", s3.endpoint_url], repo)
        commit_all(repo, "the workflows, make setup, and the DVC remote")
        run(["dvc", "push", "-q"], repo, env=S3_ENV)
        run(["git", "init", "-q", "--bare", "-b", "main", str(github.origin)], root)
        run(["git", "remote", "add", "origin", str(github.origin)], repo)
        run(["git", "push", "-q", "origin", "main"], repo)
        run(["git", "clone", "-q", str(github.origin), str(github.workdir)], root)
        for path in (github.home, github.artifacts):
            path.mkdir()
        github.secrets_file.write_text("".join(f"{name}={value}\n" for name, value in {**github.secrets, **(secrets or {})}.items()))
        return github

    # --- what GitHub holds ---------------------------------------------------------------------------

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{self.s3.bucket}/{self.bucket_prefix}"

    @property
    def secrets(self) -> dict[str, str]:
        """The repository's Actions secrets (docs/operations.md) but the optional ones."""
        return {
            "GITHUB_TOKEN": GITHUB_TOKEN,
            "AWS_ACCESS_KEY_ID": S3_ENV["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "DVC_REMOTE_URL": self.dvc_remote_url,
            "DVC_REMOTE_ENDPOINT": self.s3.endpoint_url,
        }

    def sha(self, ref: str) -> str:
        """The commit `ref` names in origin."""
        return run(["git", "rev-parse", ref], self.origin).stdout.strip()

    def refs(self, prefix: str = "refs/") -> dict[str, str]:
        """origin's refs under `prefix` -> the commit each points to (annotated tags peeled)."""
        lines = run(["git", "for-each-ref", "--format=%(refname) %(objectname) %(*objectname)", prefix], self.origin).stdout
        refs = {}
        for line in lines.splitlines():
            name, sha, *peeled = line.split()
            refs[name] = peeled[0] if peeled else sha
        return refs

    def show(self, ref: str, path: str) -> str:
        return run(["git", "show", f"{ref}:{path}"], self.origin).stdout

    def gh_calls(self) -> list[dict[str, Any]]:
        """Every call the gh stand-in recorded: args, options, positional arguments and body."""
        if not self.gh_log.exists():
            return []
        return [json.loads(line) for line in self.gh_log.read_text().splitlines()]

    # --- GitHub's own actions ------------------------------------------------------------------------

    def open_pull_request(self, number: int, head: str) -> dict[str, Any]:
        """What GitHub does when a pull request into main is opened: refs/pull/N/head, and refs/pull/N/merge (the
        test merge of head into main that a pull_request run checks out); returns the event's payload."""
        scratch = self.root / f"pull-{number}"
        if scratch.exists():
            shutil.rmtree(scratch)
        run(["git", "clone", "-q", "--branch", "main", str(self.origin), str(scratch)], self.root)
        run(["git", "fetch", "-q", "origin", f"refs/heads/{head}"], scratch)
        run(["git", "-c", "user.name=GitHub", "-c", "user.email=noreply@github.com", "merge", "-q", "--no-ff",
             "-m", f"Merge {head} into main", "FETCH_HEAD"], scratch)
        run(["git", "push", "-q", "origin", f"FETCH_HEAD:refs/pull/{number}/head", f"HEAD:refs/pull/{number}/merge"], scratch)
        repo = {"full_name": REPOSITORY}
        self.pull_requests[number] = {
            "action": "opened",
            "number": number,
            "pull_request": {
                "number": number,
                "head": {"ref": head, "sha": self.sha(f"refs/pull/{number}/head"), "repo": repo},
                "base": {"ref": "main", "sha": self.sha("main"), "repo": repo},
            },
            "repository": {**repo, "default_branch": "main"},
        }
        return self.pull_requests[number]

    def push_event(self, branch: str, before: str) -> dict[str, Any]:
        return {
            "ref": f"refs/heads/{branch}",
            "before": before,
            "after": self.sha(branch),
            "deleted": False,
            "repository": {"full_name": REPOSITORY, "default_branch": "main"},
        }

    def dispatch_event(self, branch: str, inputs: dict[str, str]) -> dict[str, Any]:
        return {"ref": f"refs/heads/{branch}", "inputs": inputs, "repository": {"full_name": REPOSITORY, "default_branch": "main"}}

    # --- act -----------------------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """act's -C directory: a clone of origin at the event's commit (act reads github.sha from it)."""
        return self.root / "act-workdir"

    @property
    def home(self) -> Path:
        """HOME of the runs: no git identity, no config of this machine's user (as on a fresh runner)."""
        return self.root / "runner-home"

    @property
    def artifacts(self) -> Path:
        """Where the upload-artifact stand-in copies each run's artifacts: artifacts/<run id>/<name>/."""
        return self.root / "artifacts"

    @property
    def gh_log(self) -> Path:
        return self.root / "gh-calls.jsonl"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets"

    def act_command(self, event_name: str, event_path: Path, workflow: Path, env: dict[str, str], run_id: int) -> list[str]:
        command = [
            str(ACT), event_name,
            "--workflows", str(workflow),
            "--directory", str(self.workdir),
            "--eventpath", str(event_path),
            "--platform", "ubuntu-latest=-self-hosted",  # steps run on this machine's shell: no Docker
            "--no-skip-checkout",  # actions/checkout is run (the stand-in), not replaced by a copy of -C
            "--defaultbranch", "main",
            "--secret-file", str(self.secrets_file),
            "--action-cache-path", str(self.root / "act-cache"),
            "--no-cache-server",
            "--json",
        ]
        for uses, directory in ACTIONS.items():
            command += ["--local-repository", f"{uses}={directory}"]
        stand_in_env = {
            "GITHUB_REPOSITORY": REPOSITORY,
            "GITHUB_RUN_ID": str(run_id),
            "STANDIN_ORIGIN": str(self.origin),
            "STANDIN_VENV": str(BIN.parent),
            "STANDIN_ARTIFACTS": str(self.artifacts / str(run_id)),
            "STANDIN_GH_LOG": str(self.gh_log),
            **env,
        }
        for name, value in stand_in_env.items():
            command += ["--env", f"{name}={value}"]
        return command

    def process_environment(self) -> dict[str, str]:
        """A runner's environment: this machine's PATH without the project's venv (a workflow must put .venv/bin on
        PATH itself), the gh stand-in first, an empty HOME; nothing else of this process (no GITHUB_* of an outer CI)."""
        venv_bin = os.path.realpath(BIN)
        path = [entry for entry in os.environ["PATH"].split(os.pathsep) if entry and os.path.realpath(entry) != venv_bin]
        return {
            "PATH": os.pathsep.join([str(STANDINS / "bin"), *path]),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1",
            "ACT_DISABLE_VERSION_CHECK": "1",  # act would ask api.nektosact.com for notices
        }

    def run(
        self, workflow: str | Path, event_name: str, event: dict[str, Any], sha: str, env: dict[str, str] | None = None
    ) -> ActRun:
        """Run `workflow` (a file name of .github/workflows at `sha`, or a path) for `event`, as GitHub would for
        the commit `sha`: act's -C clone is moved to it first."""
        run(["git", "fetch", "-q", "--prune", "origin", "+refs/heads/*:refs/remotes/origin/*", "+refs/pull/*:refs/pull/*"], self.workdir)
        run(["git", "checkout", "-q", "--detach", sha], self.workdir)
        path = workflow if isinstance(workflow, Path) else self.workdir / ".github" / "workflows" / workflow
        self.runs += 1
        event_path = self.root / f"event-{self.runs}-{event_name}.json"
        event_path.write_text(json.dumps(event, indent=2))
        command = self.act_command(event_name, event_path, path, env or {}, self.runs)
        try:
            result = subprocess.run(
                command, cwd=self.root, env=self.process_environment(), capture_output=True, text=True, timeout=RUN_TIMEOUT
            )
        except subprocess.TimeoutExpired as expired:
            raise AssertionError(f"act did not end within {RUN_TIMEOUT:.0f} s: {' '.join(command)}") from expired
        return parse_log(result.returncode, result.stdout + result.stderr, self.artifacts / str(self.runs))
