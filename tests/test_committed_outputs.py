"""The outputs committed with the code are what `make repro` makes in a fresh clone of it.

A model records the last commit of the pipeline's inputs (src/, params.yaml, dvc.yaml: release.registry.source_commit),
and metrics/promotion.json carries that commit. A commit that changes those inputs without re-running the pipeline
leaves a fresh clone's `make repro` with a modified dvc.lock and metrics/promotion.json. This test names the commit.
"""

from __future__ import annotations

import json

import pytest

from cryptoml import paths
from cryptoml.release.registry import PIPELINE_INPUTS, git_output, source_commit
from tests.repo import REPO_ROOT


def test_the_committed_production_model_records_the_last_commit_of_the_pipelines_inputs() -> None:
    shallow = git_output(["rev-parse", "--is-shallow-repository"], REPO_ROOT)
    if shallow is None:
        pytest.skip(f"{REPO_ROOT} is not a git checkout")
    if shallow == "true":
        pytest.skip("a shallow clone lacks the history that says which commit last changed the pipeline's inputs")
    recorded = json.loads((REPO_ROOT / paths.PROMOTION_METRICS).read_text())["production"]["git_commit"]
    last = source_commit(REPO_ROOT).sha
    assert recorded == last, (
        f"{paths.PROMOTION_METRICS} records a model made at {recorded}, but {last} changed {', '.join(PIPELINE_INPUTS)} "
        "since: run `rm -rf models/production && dvc repro --force` and commit dvc.lock and metrics/"
    )
