"""`cryptoml pull-model`: the bot's host follows the registry's `prod` stage, with no clone of the repository.

`dvc artifacts get <repo> signal-model --stage prod` resolves the GTO tags of the repository and downloads
that version's models/production from its DVC remote into a temporary directory. The model is verified
(every sha256 against its manifest, the feature spec against this code) before the target directory is
touched, and swapped in with promotion's reader-safe swap, so a bot loading the directory at that moment
sees the old model or the new one. When the directory already serves that model nothing is written.
Any failure (repository, remote, credentials, a damaged download) leaves the directory as it was.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptoml.model.artifacts import ArtifactError, read_artifacts
from cryptoml.release.promotion import METADATA_NAME, install_model
from cryptoml.release.registry import RegistryError, dvc
from cryptoml.release.versions import MODEL_ARTIFACT, PROD_STAGE


class PullError(RegistryError):
    """The model of the stage could not be fetched or verified; the target directory is unchanged."""


@dataclass(frozen=True)
class PullResult:
    model_sha256: str
    previous_sha256: str | None
    changed: bool


def served_model(directory: Path) -> str | None:
    """The hash of the model `directory` serves, if it holds a complete, verified one."""
    try:
        return read_artifacts(directory).model_sha256
    except ArtifactError:
        return None


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
        if artifacts.model_sha256 == previous:
            return PullResult(artifacts.model_sha256, previous, changed=False)
        metadata = fetched / METADATA_NAME
        install_model(to_dir, artifacts, metadata.read_bytes() if metadata.exists() else None)
    return PullResult(artifacts.model_sha256, previous, changed=True)
