"""A throw-away copy of this repository, with its own git and DVC, for end-to-end tests of real `dvc` runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO_ROOT / ".venv")) / "bin"
# What a fresh clone holds that the pipeline needs (src is needed for dvc.yaml's code dependencies).
PIPELINE_FILES = ("dvc.yaml", "params.yaml", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
PIPELINE_DIRS = ("src", "data/external", ".dvc/plots")
# Seconds for one command of a test: the slowest, a pipeline on the real candles, takes about 3 minutes.
COMMAND_TIMEOUT = 1200.0

# Small but real: three months of hourly candles, weekly walk-forward steps over the last 20% (18 days) and small
# forests keep each pipeline run to seconds. Fits this small run faster in-process than on a pool of processes that
# first imports the libraries (tests/test_scaleout.py runs them on two processes and on Dask).
FAST_TRAINING = {
    "data.start": "2024-01-01T00:00:00Z",
    "data.end": "2024-04-01T00:00:00Z",
    "retrain.every": "7D",
    "executor.workers": 1,
    "model.lightgbm.n_estimators": 20,
    "model.xgboost.n_estimators": 20,
    "model.random_forest.n_estimators": 20,
}
# Every challenger is promoted: for tests about storage, versions and deployment (the gate has tests of its own).
OPEN_GATE = {
    "gate.min_roc_auc": 0.0,
    "gate.max_brier_ratio": None,
    "gate.max_log_loss_ratio": None,
    "gate.champion_tolerance": 1.0,
    "gate.champion_log_loss_tolerance": 1.0e3,
    "gate.min_rule_return": None,
    "gate.min_rule_psr": None,
    "gate.champion_return_tolerance": 1.0e3,
}


def venv_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the project's venv first on PATH, plus `env`."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a command with the project's venv first on PATH; on failure show its output in the assertion.

    A `cryptoml` command runs in this process, through the same typer app as the console script (no interpreter
    start-up, and coverage sees it); pass `BIN / "cryptoml"` for a separate process (to kill it, or run two at once).
    The stages that dvc runs are always separate processes. A process still running after `timeout` seconds is
    killed and fails the test, naming the command: a hang must cost one test, not the whole CI run.
    """
    if cmd[0] == "cryptoml":
        result = run_cli(cmd, cwd, env)
    else:
        try:
            result = subprocess.run(
                cmd, cwd=cwd, env=venv_environment(env), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as expired:
            raise AssertionError(f"{' '.join(cmd)} did not end within {timeout:.0f} s in {cwd}") from expired
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def run_cli(cmd: list[str], cwd: Path, env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    """`cryptoml ...` in this process, in `cwd`, with `env` added to the environment while it runs."""
    from typer.testing import CliRunner

    from cryptoml.cli import app

    with contextlib.chdir(cwd):
        result = CliRunner().invoke(app, cmd[1:], env=venv_environment(env))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(cmd, result.exit_code, result.stdout, result.stderr)


def set_params(repo: Path, changes: dict[str, Any]) -> None:
    """Set dotted keys in the copy's params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(root: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the pipeline into `root/repo`, apply param changes, and commit it as a fresh git repository."""
    repo = root / "repo"
    repo.mkdir()
    for name in PIPELINE_FILES:
        if (REPO_ROOT / name).exists():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, repo / name)
    for name in PIPELINE_DIRS:
        shutil.copytree(REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    if params:
        set_params(repo, params)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.email", "test@example.invalid"], repo)
    run(["git", "config", "user.name", "cryptoml test"], repo)
    remove_remotes(repo)
    commit_all(repo, "pipeline")
    return repo


def remove_remotes(repo: Path) -> None:
    """Keep tests hermetic: a remote the user committed to .dvc/config (as the README says to) is not the tests' to use."""
    if "remote" not in (repo / ".dvc/config").read_text():
        return
    for line in run(["dvc", "remote", "list", "--project"], repo).stdout.splitlines():
        run(["dvc", "remote", "remove", "--project", line.split()[0]], repo)


def reproduce_once(root: Path) -> Path:
    """FAST_TRAINING with OPEN_GATE, reproduced and committed: the session's one shared pipeline run (copy_repo it)."""
    repo = make_repo(root, {**FAST_TRAINING, **OPEN_GATE})
    run(["dvc", "repro"], repo)
    commit_all(repo, "pipeline outputs")
    return repo


def copy_repo(repo: Path, root: Path) -> Path:
    """A copy of `repo` (git history, DVC cache and outputs) as `root/repo`, to change without touching the original."""
    return Path(shutil.copytree(repo, root / "repo", symlinks=True))


def release(repo: Path, changes: dict[str, Any], name: str) -> str:
    """The documented retrain: commit the params, reproduce, commit what dvc wrote, push the outputs; that commit."""
    set_params(repo, changes)
    commit_all(repo, f"{name}: params")
    run(["dvc", "repro"], repo)
    commit = commit_all(repo, f"{name}: outputs")
    run(["dvc", "push"], repo)
    return commit


def commit_all(repo: Path, message: str) -> str:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "--allow-empty", "-m", message], repo)
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
