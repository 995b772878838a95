"""The model registry in DVC's convention: GTO git tags name the versions of the production model and its stage.

The production model is the artifact `signal-model` declared in dvc.yaml (`artifacts:`). A commit whose
metrics/promotion.json (committed with its dvc.lock) records a production model that no version has yet gets
the annotated tag `signal-model@v<semver>`; the stage `prod` is assigned (`signal-model#prod#N`) to the version
of the model main records at HEAD. A model whose hash already has a version gets no new one: the commit that
puts it back (a rollback) only re-assigns `prod`. `dvc artifacts get`, `gto show`/`gto history` and DVC
Studio read these tags.

Numbering: the first version is v1.0.0; a new model is a minor bump (a scheduled retrain, new params or code),
and a major bump when the feature specification changed (the dvc.lock hash of src/cryptoml/features/spec.py):
a bot must then compute other features, so the change is not a drop-in replacement.

`register` is idempotent: what already exists is left alone, so running it twice changes nothing. Tags are
created with git's atomic ref creation, so two concurrent runs cannot both create the same tag; the loser of
a race re-reads the tags and finds nothing left to do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cryptoml import paths
from cryptoml.release.registry import ProductionVersion, RegistryError, git_output, production_at, production_changes

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "signal-model"
PROD_STAGE = "prod"
FEATURE_SPEC_SOURCE = "src/cryptoml/features/spec.py"
DVC_YAML = "dvc.yaml"
_ATTEMPTS = 3  # rounds of "read the tags, create what is missing" before a concurrent writer is an error


@dataclass(frozen=True)
class ModelVersion:
    """A registered version, with the production record of the commit its tag points to."""

    version: str
    tag: str
    commit: str
    registered_at: str
    record: ProductionVersion | None
    stages: tuple[str, ...] = ()

    @property
    def model_hash(self) -> str | None:
        return self.record.model_hash if self.record else None


@dataclass
class Registration:
    """What one `register` run did: the tags it created (empty when everything was already registered)."""

    created: list[str] = field(default_factory=list)
    prod: str | None = None  # the version `prod` is assigned to afterwards


def _gto() -> Any:
    import gto.api  # imported on use: gto and its git libraries are not needed to train or serve

    return gto.api


def declares_artifact(rev: str, cwd: Path) -> bool:
    """Whether dvc.yaml at `rev` declares the production model (only such commits can be fetched by name)."""
    text = git_output(["show", f"{rev}:{DVC_YAML}"], cwd)
    artifacts = (yaml.safe_load(text) or {}).get("artifacts") if text else None
    declared = (artifacts or {}).get(MODEL_ARTIFACT) or {}
    return declared.get("path") == paths.PRODUCTION_DIR.as_posix()


def _feature_spec_md5(rev: str, cwd: Path) -> str | None:
    """The hash dvc.lock at `rev` records for the feature specification's source (any stage that depends on it)."""
    text = git_output(["show", f"{rev}:dvc.lock"], cwd)
    stages = (yaml.safe_load(text) or {}).get("stages", {}) if text else {}
    for stage in stages.values():
        for dep in stage.get("deps", []):
            if dep.get("path") == FEATURE_SPEC_SOURCE:
                return dep.get("md5")
    return None


def registered_versions(cwd: Path = Path(".")) -> list[ModelVersion]:
    """Every registered version of the production model, oldest first, with the stages active on it."""
    from gto.exceptions import ArtifactNotFound, GTOException

    try:
        shown = _gto().show(str(cwd), MODEL_ARTIFACT)
    except ArtifactNotFound:  # no version tag yet
        return []
    except GTOException as exc:
        raise RegistryError(f"gto show {MODEL_ARTIFACT} in {cwd.resolve()} failed: {exc}") from exc
    versions = []
    for row in shown:
        if not row.get("registrations"):
            continue
        versions.append(
            ModelVersion(
                version=row["version"],
                tag=row["registrations"][-1]["tag"],
                commit=row["commit_hexsha"],
                registered_at=row["created_at"].isoformat(),
                record=production_at(row["commit_hexsha"], paths.PROMOTION_METRICS, cwd),
                stages=tuple(stage["stage"] for stage in row.get("stages", [])),
            )
        )
    return sorted(versions, key=lambda v: tuple(int(part) for part in v.version.removeprefix("v").split(".")))


def resolve_version(version: str, cwd: Path = Path(".")) -> ModelVersion | None:
    """The registered version named `v1.2.0` or `signal-model@v1.2.0`; None when no such tag exists."""
    wanted = version.removeprefix(f"{MODEL_ARTIFACT}@")
    return next((v for v in registered_versions(cwd) if v.version == wanted), None)


def _next_version(latest: ModelVersion | None, commit: str, cwd: Path) -> str:
    if latest is None:
        return "v1.0.0"
    major, minor, _ = (int(part) for part in latest.version.removeprefix("v").split("."))
    if _feature_spec_md5(commit, cwd) != _feature_spec_md5(latest.commit, cwd):
        return f"v{major + 1}.0.0"
    return f"v{major}.{minor + 1}.0"


def _wait_for_a_new_second(cwd: Path) -> None:
    """GTO orders stage assignments by their tag time, in whole seconds: never create two in the same second."""
    latest = _latest_assignment_time(cwd)
    if latest is not None and int(time.time()) <= latest:
        time.sleep(latest + 1 - time.time())


def _latest_assignment_time(cwd: Path) -> int | None:
    lines = git_output(["for-each-ref", "--format=%(taggerdate:unix)", f"refs/tags/{MODEL_ARTIFACT}#{PROD_STAGE}#*"], cwd)
    stamps = [int(line) for line in (lines or "").split() if line.isdigit()]
    return max(stamps) if stamps else None


def _register_round(cwd: Path, result: Registration) -> None:
    """Create the missing version tags (oldest model first), then move `prod` to HEAD's model if needed."""
    gto = _gto()
    versions = registered_versions(cwd)
    by_hash = {v.model_hash: v for v in versions if v.model_hash}
    for change in production_changes(paths.PROMOTION_METRICS, cwd):
        if change.model_hash in by_hash or not declares_artifact(change.commit, cwd):
            continue
        version = _next_version(versions[-1] if versions else None, change.commit, cwd)
        message = f"{MODEL_ARTIFACT} {version}: production model {change.model_hash} (trained from {change.source_commit})"
        gto.register(str(cwd), MODEL_ARTIFACT, change.commit, version=version, message=message)
        result.created.append(f"{MODEL_ARTIFACT}@{version}")
        versions = registered_versions(cwd)
        by_hash = {v.model_hash: v for v in versions if v.model_hash}
    head = production_at("HEAD", paths.PROMOTION_METRICS, cwd)
    target = by_hash.get(head.model_hash) if head else None
    if target is None:
        return
    if PROD_STAGE not in target.stages:
        _wait_for_a_new_second(cwd)
        message = f"{PROD_STAGE}: {MODEL_ARTIFACT} {target.version}, the model main records at {head.commit}"
        # force: a version that was in prod before (the target of a rollback) is assigned again.
        gto.assign(str(cwd), MODEL_ARTIFACT, PROD_STAGE, version=target.version, message=message, force=True)
        result.created.append(f"{MODEL_ARTIFACT}#{PROD_STAGE}#{target.version}")
    result.prod = target.version


def _sync_tags(remote: str, cwd: Path) -> None:
    """The remote's registry tags win over local ones of the same name (another run may have pushed first)."""
    if git_output(["fetch", "--quiet", "--force", remote, f"+refs/tags/{MODEL_ARTIFACT}*:refs/tags/{MODEL_ARTIFACT}*"], cwd) is None:
        raise RegistryError(f"git fetch of the {MODEL_ARTIFACT} tags from remote {remote!r} in {cwd.resolve()} failed")


def _unpushed_tags(remote: str, cwd: Path) -> list[str]:
    local = (git_output(["tag", "--list", f"{MODEL_ARTIFACT}*"], cwd) or "").split()
    listed = git_output(["ls-remote", "--tags", remote, f"refs/tags/{MODEL_ARTIFACT}*"], cwd)
    if listed is None:
        raise RegistryError(f"git ls-remote --tags {remote} failed in {cwd.resolve()}: is the remote reachable?")
    pushed = {line.split("refs/tags/", 1)[1].removesuffix("^{}") for line in listed.splitlines()}
    return [tag for tag in local if tag not in pushed]


def register(cwd: Path = Path("."), push_to: str | None = None) -> Registration:
    """Give every new production model of HEAD's history a version and assign `prod` to HEAD's model.

    With `push_to` (a git remote), the remote's registry tags are fetched first and the new tags pushed
    atomically; a push that loses a race to another run drops the local tags, re-reads and tries again.
    """
    from gto.exceptions import GTOException

    for _ in range(_ATTEMPTS):
        result = Registration()
        if push_to:
            _sync_tags(push_to, cwd)
        try:
            _register_round(cwd, result)
        except GTOException as exc:  # another run created a tag first: read the tags again
            log.warning("registry changed while registering (%s): reading it again", exc)
            continue
        if not push_to:
            return result
        tags = _unpushed_tags(push_to, cwd)
        if not tags or git_output(["push", "--quiet", "--atomic", push_to, *(f"refs/tags/{tag}" for tag in tags)], cwd) is not None:
            return result
        log.warning("pushing %s to %s was rejected (another run pushed first): reading the registry again", tags, push_to)
        git_output(["tag", "--delete", *tags], cwd)
    raise RegistryError(f"the {MODEL_ARTIFACT} tags kept changing during {_ATTEMPTS} attempts to register in {cwd.resolve()}")
