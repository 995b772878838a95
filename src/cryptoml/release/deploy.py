"""`cryptoml pull-model`: the bot's host follows the registry's `prod` stage, with no clone of the repository.

`dvc artifacts get <repo> signal-model --stage prod` resolves the GTO tags of the repository and downloads
that version's models/production from its DVC remote into a temporary directory. The model is verified
(every sha256 against its manifest, the feature spec against this code) before the target directory is
touched, and swapped in with promotion's reader-safe swap, so a bot loading the directory at that moment
sees the old model or the new one. When the directory already serves that model nothing is written.
Any failure (repository, remote, credentials, a damaged download) leaves the directory as it was.

A poll is cheap when nothing moved: `git ls-remote` lists the stage's assignment tags (one round trip, no clone),
and when they, the options and the served model are those of the last successful pull (a small state file beside
the directory), nothing is downloaded. Any new assignment (a release or a rollback) changes that listing.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptoml.io import write_json_atomic
from cryptoml.model.artifacts import ArtifactError, read_artifacts
from cryptoml.release.promotion import METADATA_NAME, install_model
from cryptoml.release.registry import RegistryError, dvc, git_output
from cryptoml.release.versions import MODEL_ARTIFACT, PROD_STAGE


class PullError(RegistryError):
    """The model of the stage could not be fetched or verified; the target directory is unchanged."""


@dataclass(frozen=True)
class PullResult:
    model_sha256: str
    previous_sha256: str | None
    changed: bool
    downloaded: bool = True


def served_model(directory: Path) -> str | None:
    """The hash of the model `directory` serves, if it holds a complete, verified one."""
    try:
        return read_artifacts(directory).model_sha256
    except ArtifactError:
        return None


def pull_state_path(to_dir: Path) -> Path:
    """Where the last successful pull into `to_dir` is recorded: beside it, so the model directory holds only the model."""
    return to_dir.parent / f".{to_dir.name}.pull.json"


def assignment_fingerprint(repo_url: str, stage: str, remote: str | None, remote_config: Sequence[str]) -> str | None:
    """sha256 of the stage's assignment tags as `repo_url` lists them, and of the pull's options (hashed: a
    --remote-config value may be a secret); None when the stage has no assignment. Raises PullError when the
    repository cannot be listed."""
    listed = git_output(["ls-remote", "--tags", repo_url, f"refs/tags/{MODEL_ARTIFACT}#{stage}#*"], Path("."))
    if listed is None:
        raise PullError(f"git ls-remote --tags {repo_url} failed: is the repository URL right and reachable?")
    if not listed:
        return None
    options = {"repo": repo_url, "stage": stage, "remote": remote, "remote_config": list(remote_config)}
    text = json.dumps(options, sort_keys=True) + "\n" + "\n".join(sorted(listed.splitlines()))
    return hashlib.sha256(text.encode()).hexdigest()


def _last_pull(to_dir: Path) -> dict[str, str]:
    try:
        return json.loads(pull_state_path(to_dir).read_text())
    except (OSError, ValueError):
        return {}


def pull_model(
    repo_url: str,
    to_dir: Path,
    stage: str = PROD_STAGE,
    remote: str | None = None,
    remote_config: Sequence[str] = (),
) -> PullResult:
    """Make `to_dir` serve the model of `stage` in the registry at `repo_url` (module docstring)."""
    previous = served_model(to_dir)
    unchanged = f"{to_dir} is unchanged (it serves {previous or 'no model'})"
    try:
        fingerprint = assignment_fingerprint(repo_url, stage, remote, remote_config)
    except PullError as exc:
        raise PullError(f"{exc}\n{unchanged}") from None
    last = _last_pull(to_dir)
    if previous and fingerprint and last == {"assignments": fingerprint, "model_sha256": previous}:
        return PullResult(previous, previous, changed=False, downloaded=False)
    with tempfile.TemporaryDirectory(prefix="cryptoml-pull-") as scratch:
        fetched = Path(scratch) / "model"
        command = ["artifacts", "get", repo_url, MODEL_ARTIFACT, "--stage", stage, "--out", str(fetched)]
        command += ["--remote", remote] if remote else []
        command += ["--remote-config", *remote_config] if remote_config else []
        try:
            dvc(command, cwd=Path(scratch))  # not inside any repository, so only repo_url's config applies
        except RegistryError as exc:
            raise PullError(f"{exc}\n{unchanged}") from None
        try:
            artifacts = read_artifacts(fetched)
        except ArtifactError as exc:
            raise PullError(f"the {stage} model of {repo_url} fails verification: {exc}\n{unchanged}") from None
        changed = artifacts.model_sha256 != previous
        if changed:
            metadata = fetched / METADATA_NAME
            install_model(to_dir, artifacts, metadata.read_bytes() if metadata.exists() else None)
    if fingerprint:
        write_json_atomic(pull_state_path(to_dir), {"assignments": fingerprint, "model_sha256": artifacts.model_sha256})
    return PullResult(artifacts.model_sha256, previous, changed=changed)
