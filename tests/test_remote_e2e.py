"""The DVC remote on a real S3 API (moto's server on 127.0.0.1): push, shallow clone, pull, a no-op repro, an older version.

Two model versions are committed and pushed as the weekly job would; a `git clone --depth 1` then gets every output
from the remote alone, `dvc repro --pull` runs no stage, and the previous version comes back sha256-verified.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cryptoml.model.ensemble import ProductionEnsemble
from tests.moto_server import S3_ENV, S3Server, s3_server
from tests.repo import commit_all, copy_repo, run, set_params

pytestmark = pytest.mark.e2e

BUCKET = "cryptoml-dvc"
REMOTE_PREFIX = "cryptoml"
# The second version differs only in the model's seed: train, evaluate and promote re-run, fetch and features do not.
VERSION_CHANGES = ({}, {"model.random_state": 43})


@dataclass(frozen=True)
class Published:
    s3: S3Server
    repo: Path
    clone: Path
    model_hashes: list[str]  # production model of each version, oldest first
    pull_output: str
    repro_output: str


def production_hash(repo: Path) -> str:
    return json.loads((repo / "metrics/promotion.json").read_text())["production"]["model_hash"]


def verified_production_hash(repo: Path) -> str:
    """Load the production model (every file's sha256 checked) and require its metadata to name the same hash."""
    loaded = ProductionEnsemble.load(repo / "models/production").model_sha256_
    metadata = json.loads((repo / "models/production/production_model_metadata.json").read_text())
    assert metadata["model_sha256"] == loaded
    return loaded


@pytest.fixture(scope="module")
def published(reproduced_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    root = tmp_path_factory.mktemp("remote")
    with s3_server(BUCKET) as s3:
        repo = copy_repo(reproduced_repo, root)  # version 1 is the session's reproduced pipeline
        run(["dvc", "remote", "add", "--default", "s3", f"s3://{BUCKET}/{REMOTE_PREFIX}"], repo)
        run(["dvc", "remote", "modify", "s3", "endpointurl", s3.endpoint_url], repo)
        commit_all(repo, "DVC remote (credentials come from the environment)")
        model_hashes = []
        for number, change in enumerate(VERSION_CHANGES, start=1):
            set_params(repo, change)
            run(["dvc", "repro"], repo)
            commit_all(repo, f"model version {number}")
            run(["dvc", "push", "--run-cache"], repo, env=S3_ENV)
            model_hashes.append(production_hash(repo))
        clone = root / "clone"
        run(["git", "clone", "--quiet", "--depth", "1", f"file://{repo}", str(clone)], root)
        pulled = run(["dvc", "pull"], clone, env=S3_ENV)
        reproduced = run(["dvc", "repro", "--pull"], clone, env=S3_ENV)
        yield Published(s3, repo, clone, model_hashes, pulled.stdout, reproduced.stdout)


def cached_outputs(repo: Path) -> dict[str, str]:
    """Path -> md5 of every cached output dvc.yaml lists under `outs:` (metrics and plots are `cache: false`)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values()
    paths = {
        out if isinstance(out, str) else next(iter(out))
        for stage in stages
        for out in stage.get("outs", [])
        if isinstance(out, str) or next(iter(out.values())).get("cache", True)
    }
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values()
    return {out["path"]: out["md5"] for stage in lock for out in stage.get("outs", []) if out["path"] in paths}


def test_push_uploads_every_output_and_the_run_cache(published: Published) -> None:
    keys = set(published.s3.object_keys())
    outputs = cached_outputs(published.repo)
    assert {"data/raw/ohlcv.parquet", "models/production"} <= set(outputs)
    for path, md5 in outputs.items():
        assert f"{REMOTE_PREFIX}/files/md5/{md5[:2]}/{md5[2:]}" in keys, path
    assert any(key.startswith(f"{REMOTE_PREFIX}/runs/") for key in keys), "the run cache was not pushed"
    assert "in sync" in run(["dvc", "status", "--cloud"], published.repo, env=S3_ENV).stdout


def test_shallow_clone_gets_everything_from_the_remote_and_repro_runs_nothing(published: Published) -> None:
    clone = published.clone
    assert run(["git", "rev-parse", "--is-shallow-repository"], clone).stdout.strip() == "true"
    assert "fetched" in published.pull_output
    assert "Running stage" not in published.repro_output
    assert published.repro_output.count("didn't change") == len(yaml.safe_load((clone / "dvc.yaml").read_text())["stages"])
    assert verified_production_hash(clone) == published.model_hashes[-1]
    assert run(["git", "status", "--porcelain"], clone).stdout == ""


def test_older_version_comes_back_from_the_remote_sha256_verified(published: Published, tmp_path: Path) -> None:
    clone = copy_repo(published.clone, tmp_path)  # checked out at the older version
    first, latest = published.model_hashes
    assert first != latest
    run(["git", "fetch", "--quiet", "--deepen", "1"], clone)
    run(["git", "checkout", "--quiet", "HEAD~1"], clone)
    pulled = run(["dvc", "pull"], clone, env=S3_ENV)
    assert "fetched" in pulled.stdout  # the shallow clone's cache never held the first version
    assert verified_production_hash(clone) == first == production_hash(clone)
