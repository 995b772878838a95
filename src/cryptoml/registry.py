"""Provenance from git: which commit made a model, and (later) the history of production versions."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# What a model is made from, besides the data (which DVC pins): the code, the params and the pipeline.
PIPELINE_INPUTS: tuple[str, ...] = ("src", "params.yaml", "dvc.yaml")


@dataclass(frozen=True)
class SourceCommit:
    """The latest commit of the pipeline's inputs, and its commit time (a deterministic 'created_at')."""

    sha: str | None
    committed_at: str | None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_commit(cwd: Path = Path(".")) -> SourceCommit:
    """The last commit that changed the code, params or pipeline definition.

    Not HEAD: the commit that records a model's dvc.lock comes after the run that made the model, so HEAD
    differs between that run and a later re-run from a clone. The last commit of the inputs is the same in
    both, so re-running the pipeline from any clone gives byte-identical artifacts. Commit code and params
    before training (the retrain command does); uncommitted input changes are logged, not recorded.
    """
    line = _git(["log", "-1", "--format=%H %cI", "--", *PIPELINE_INPUTS], cwd)
    if not line:
        log.warning("not in a git repository with commits: the model records no git commit")
        return SourceCommit(None, None)
    sha, committed_at = line.split(" ", 1)
    if _git(["status", "--porcelain", "--", *PIPELINE_INPUTS], cwd):
        log.warning("uncommitted changes in %s: the model records their last commit %s", ", ".join(PIPELINE_INPUTS), sha[:12])
    return SourceCommit(sha, committed_at)
