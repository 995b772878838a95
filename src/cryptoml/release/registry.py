"""Provenance from git: which commit made a model, and which commits recorded a production model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
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


def git_output(args: list[str], cwd: Path) -> str | None:
    """The stdout of `git args` in `cwd`, or None when git fails or is missing (callers say what that means)."""
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
    line = git_output(["log", "-1", "--format=%H %cI", "--", *PIPELINE_INPUTS], cwd)
    if not line:
        log.warning("not in a git repository with commits: the model records no git commit")
        return SourceCommit(None, None)
    sha, committed_at = line.split(" ", 1)
    if git_output(["status", "--porcelain", "--", *PIPELINE_INPUTS], cwd):
        log.warning("uncommitted changes in %s: the model records their last commit %s", ", ".join(PIPELINE_INPUTS), sha[:12])
    return SourceCommit(sha, committed_at)


class RegistryError(ValueError):
    """A revision has no production model, or a restored model does not match its record."""


@dataclass(frozen=True)
class ProductionVersion:
    """One production model as recorded in git by the promote stage (metrics/promotion.json)."""

    commit: str  # the commit that recorded it in production
    date: str
    model_hash: str
    source_commit: str | None  # the commit whose code and params made it (its metadata's git_commit)
    metrics: dict[str, float]
    data_start: str | None
    data_end: str | None


def production_record(record: dict) -> dict | None:
    """The production part of a metrics/promotion.json, or None when that revision had no production model."""
    production = record.get("production") if isinstance(record, dict) else None
    return production if isinstance(production, dict) and production.get("model_hash") else None


def _read_at(rev: str, path: Path, cwd: Path) -> dict | None:
    text = git_output(["show", f"{rev}:{path.as_posix()}"], cwd)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _production_version(sha: str, date: str, production: dict) -> ProductionVersion:
    return ProductionVersion(
        commit=sha,
        date=date,
        model_hash=production["model_hash"],
        source_commit=production.get("git_commit"),
        metrics=dict(production.get("metrics", {})),
        data_start=production.get("data_start"),
        data_end=production.get("data_end"),
    )


def production_changes(promotion_file: Path, cwd: Path = Path(".")) -> list[ProductionVersion]:
    """The commits where the recorded production model changed, oldest first (a scan of git, not the registry)."""
    log_lines = git_output(["log", "--reverse", "--format=%H %cI", "--", promotion_file.as_posix()], cwd) or ""
    versions: list[ProductionVersion] = []
    for line in log_lines.splitlines():
        sha, date = line.split(" ", 1)
        production = production_record(_read_at(sha, promotion_file, cwd) or {})
        if production is None or (versions and versions[-1].model_hash == production["model_hash"]):
            continue
        versions.append(_production_version(sha, date, production))
    return versions


def production_at(rev: str, promotion_file: Path, cwd: Path = Path(".")) -> ProductionVersion | None:
    """The production model `rev` records, or None when it records none."""
    line = git_output(["log", "-1", "--format=%H %cI", rev], cwd)
    production = production_record(_read_at(rev, promotion_file, cwd) or {}) if line else None
    if line is None or production is None:
        return None
    sha, date = line.split(" ", 1)
    return _production_version(sha, date, production)


def recorded_production(rev: str, promotion_file: Path, cwd: Path = Path(".")) -> dict:
    """The production record of `rev`; a clear error when the revision is unknown or has none."""
    if git_output(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd) is None:
        raise RegistryError(f"{rev!r} is not a git revision in this repository")
    production = production_record(_read_at(rev, promotion_file, cwd) or {})
    if production is None:
        hint = _rollback_hint(rev, promotion_file, cwd)
        raise RegistryError(f"revision {rev} has no production model recorded in {promotion_file}{hint}")
    return production


def _rollback_hint(rev: str, promotion_file: Path, cwd: Path) -> str:
    """Point from a model's own git_commit (what `cryptoml info` shows) to the commit that recorded it.

    A model is made before the commit that records it, so the two differ and only the latter has its dvc.lock.
    """
    sha = git_output(["rev-parse", f"{rev}^{{commit}}"], cwd)
    recorded_at = [version.commit for version in production_changes(promotion_file, cwd) if version.source_commit == sha]
    if recorded_at:
        return f"; it is the git_commit of the model recorded at {recorded_at[-1]}: roll back to that commit"
    return "; `cryptoml history` lists the registered versions and the commits that recorded them"


def restore_files(rev: str, files: tuple[Path, ...], cwd: Path = Path(".")) -> None:
    """Put `files` back as they were at `rev` (working tree and index), so dvc.lock and params agree."""
    existing = [f.as_posix() for f in files if git_output(["cat-file", "-e", f"{rev}:{f.as_posix()}"], cwd) is not None]
    result = subprocess.run(["git", "checkout", rev, "--", *existing], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RegistryError(f"git checkout {rev} -- {' '.join(existing)} failed: {result.stderr.strip()}")


def dvc(args: list[str], cwd: Path = Path(".")) -> str:
    """Run the dvc of this environment and return its stdout (`--json` answers); its own message is the error."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RegistryError(f"dvc {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout
