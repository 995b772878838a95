"""`cryptoml rollback`: put a registered version (or the model of any commit) back into production, safely.

Nothing in the workspace changes until every byte of the target is at hand and verified: the outputs of the
target's dvc.lock are checked out in a temporary git worktree that shares this repository's DVC cache (with
`pull`, fetched from the DVC remote into that cache first); each models/production file is checked against the manifest's sha256
(files no manifest lists, against their content-addressed names) and the model hash against the one git
recorded. Only then are dvc.lock, params.yaml, metrics/ and plots/ restored from the target's commit and the
model swapped in with promotion's reader-safe swap; `dvc checkout` then brings the other outputs (data,
models/training) from the cache. When anything fails before the swap, the workspace is
byte-identical and the error says what was missing and where it was looked for.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cryptoml import paths
from cryptoml.model.artifacts import MANIFEST_NAME, ArtifactError, ModelArtifacts, is_component_file, read_artifacts, read_unlisted_component
from cryptoml.release.promotion import METADATA_NAME, install_model
from cryptoml.release.registry import RegistryError, dvc, git_output, production_record, recorded_production, restore_files
from cryptoml.release.versions import MODEL_ARTIFACT, resolve_version

# What git keeps of a version: the lock, its params, and the uncached (cache: false) metrics and plots.
ROLLBACK_FILES = (Path("dvc.lock"), paths.PARAMS, paths.METRICS_DIR, paths.PLOTS_DIR)
_VERSION = re.compile(rf"(?:{re.escape(MODEL_ARTIFACT)}@)?v\d+\.\d+\.\d+")


@dataclass(frozen=True)
class RollbackTarget:
    label: str  # what was asked for: a version or a git revision
    commit: str
    production: dict[str, Any]  # its record in metrics/promotion.json


def resolve_target(target: str, cwd: Path = Path(".")) -> RollbackTarget:
    """A version (`v1.2.0`, `signal-model@v1.2.0`) through its GTO tag, otherwise a git revision."""
    if _VERSION.fullmatch(target):
        version = resolve_version(target, cwd)
        if version is None:
            raise RegistryError(f"{target}: no such version of {MODEL_ARTIFACT} is registered (git tag {MODEL_ARTIFACT}@...); `cryptoml history` lists them")
        commit = version.commit
    else:
        commit = git_output(["rev-parse", "--verify", "--quiet", f"{target}^{{commit}}"], cwd) or target
    return RollbackTarget(target, commit, recorded_production(commit, paths.PROMOTION_METRICS, cwd))


def _locked_hash(commit: str, cwd: Path) -> str:
    """The hash dvc.lock at `commit` records for models/production (the DVC cache object looked for)."""
    lock = yaml.safe_load(git_output(["show", f"{commit}:dvc.lock"], cwd) or "") or {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == paths.PRODUCTION_DIR.as_posix():
                return str(out.get("md5"))
    raise RegistryError(f"dvc.lock at {commit} records no {paths.PRODUCTION_DIR} output")


def _default_remote(repo: Path) -> str:
    try:
        name = dvc(["remote", "default"], repo).strip()
        return f"DVC remote {name!r} ({dvc(['config', f'remote.{name}.url'], repo).strip()})"
    except RegistryError:
        return "no default DVC remote (none is configured)"


@contextmanager
def _worktree(commit: str, cwd: Path) -> Iterator[Path]:
    """A temporary checkout of `commit` that uses this repository's DVC cache and local DVC config."""
    cache = dvc(["cache", "dir"], cwd).strip()
    with tempfile.TemporaryDirectory(prefix="cryptoml-rollback-") as scratch:
        tree = Path(scratch) / "tree"
        if git_output(["worktree", "add", "--detach", "--quiet", str(tree), commit], cwd) is None:
            raise RegistryError(f"git worktree add of {commit} failed in {cwd.resolve()}")
        try:
            local_config = cwd / ".dvc" / "config.local"
            if local_config.exists():
                shutil.copy2(local_config, tree / ".dvc" / "config.local")
            dvc(["cache", "dir", "--local", cache], tree)
            yield tree
        finally:
            git_output(["worktree", "remove", "--force", str(tree)], cwd)


@dataclass(frozen=True)
class VersionFiles:
    """A version's models/production, verified: the model, its metadata and the kept files of its predecessor."""

    artifacts: ModelArtifacts
    metadata: bytes | None
    companions: dict[str, bytes]


def _verified_files(directory: Path, target: RollbackTarget) -> VersionFiles:
    artifacts = read_artifacts(directory)
    if artifacts.model_sha256 != target.production["model_hash"]:
        raise RegistryError(
            f"{directory}: model {artifacts.model_sha256}, but {target.label} ({target.commit}) recorded {target.production['model_hash']}"
        )
    companions, metadata = {}, None
    for path in sorted(directory.iterdir()):
        if path.name == METADATA_NAME:
            metadata = path.read_bytes()
            if json.loads(metadata).get("model_sha256") != artifacts.model_sha256:
                raise RegistryError(f"{path}: does not describe model {artifacts.model_sha256}")
        elif path.name != MANIFEST_NAME and path.name not in artifacts.files:
            if not is_component_file(path.name):
                raise RegistryError(f"{path}: not a file of a model directory ({target.label} holds an unexpected file)")
            companions[path.name] = read_unlisted_component(path)
    return VersionFiles(artifacts, metadata, companions)


def fetch_version(target: RollbackTarget, pull: bool, cwd: Path = Path(".")) -> VersionFiles:
    """Every byte of the target's models/production, from the DVC cache (or the remote with `pull`), verified."""
    with _worktree(target.commit, cwd) as tree:
        try:  # every output of the target's dvc.lock, so the pipeline is up to date after the rollback
            dvc(["pull" if pull else "checkout"], tree)
        except RegistryError as exc:
            cache = dvc(["cache", "dir"], cwd).strip()
            where = f"nor in the {_default_remote(tree)}" if pull else (
                f"(not fetched: retry with `cryptoml rollback {target.label} --pull` to fetch it from the {_default_remote(tree)})"
            )
            raise RegistryError(
                f"the outputs of {target.label} (commit {target.commit}; {paths.PRODUCTION_DIR}: dvc.lock md5 "
                f"{_locked_hash(target.commit, cwd)}) are not all in the DVC cache {cache} {where}. Nothing was changed.\n{exc}"
            ) from None
        try:
            return _verified_files(tree / paths.PRODUCTION_DIR, target)
        except (ArtifactError, ValueError) as exc:
            raise RegistryError(f"{target.label}: its model fails verification, nothing was changed: {exc}") from None


def _snapshot(files: tuple[Path, ...], cwd: Path) -> dict[Path, bytes]:
    found = {}
    for entry in files:
        path = cwd / entry
        for file in sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []:
            if file.is_file():
                found[file] = file.read_bytes()
    return found


def _put_back(snapshot: dict[Path, bytes], files: tuple[Path, ...], cwd: Path) -> None:
    """Undo a partial restore: the snapshot's bytes back, files it did not have removed."""
    for path in set(_snapshot(files, cwd)) - set(snapshot):
        path.unlink()
    for path, data in snapshot.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    git_output(["reset", "--quiet", "--", *(entry.as_posix() for entry in files)], cwd)


def current_production(cwd: Path = Path(".")) -> dict[str, Any] | None:
    """The production record of the working tree's metrics/promotion.json."""
    path = cwd / paths.PROMOTION_METRICS
    return production_record(json.loads(path.read_text())) if path.exists() else None


def run_rollback(target_name: str, pull: bool = False, cwd: Path = Path(".")) -> tuple[dict[str, Any] | None, RollbackTarget]:
    """Put the target's production model and ROLLBACK_FILES in place; return (the record before, the target).

    Verified first, changed second: see the module docstring.
    """
    target = resolve_target(target_name, cwd)
    files = fetch_version(target, pull, cwd)
    before = current_production(cwd)
    snapshot = _snapshot(ROLLBACK_FILES, cwd)
    try:
        restore_files(target.commit, ROLLBACK_FILES, cwd)
        install_model(cwd / paths.PRODUCTION_DIR, files.artifacts, files.metadata, companions=files.companions, keep_replaced=False)
    except BaseException:
        _put_back(snapshot, ROLLBACK_FILES, cwd)
        raise
    # The other outputs (data, models/training) from the cache the check above filled: `dvc status` is then clean.
    dvc(["checkout"], cwd)
    return before, target

