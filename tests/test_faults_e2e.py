"""The fault suite with real processes: two pipelines at once, an S3 outage in the middle of `dvc push`, secrets.

One throw-away repository is reproduced by two `dvc repro` started together; its outputs are then pushed to S3
(moto on 127.0.0.1, behind a proxy that goes down half-way through the upload), pushed again once the server is
back, and pulled into a fresh clone. Every command runs with S3 credentials and a webhook URL made of marker
strings, and no output or file may contain them.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cryptoml.live.alerts import WEBHOOK_ENV
from cryptoml.model.artifacts import MANIFEST_NAME
from tests.faults import manifest_digest, record_production_check, served_model_digest
from tests.moto_server import S3_ENV, s3_server
from tests.repo import FAST_TRAINING, OPEN_GATE, commit_all, make_repo, run
from tests.tcp_proxy import cutting_proxy
from tests.test_remote_e2e import BUCKET, cached_outputs
from tests.webhook import SECRET_PATH, unreachable_url

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

# moto accepts any credentials: these are markers that must never be shown.
ACCESS_KEY_MARKER = "AKIAFAULTSUITEMARKER"
SECRET_KEY_MARKER = "fault-suite-secret-access-key-marker"
SECRET_ENV = {
    **S3_ENV,
    "AWS_ACCESS_KEY_ID": ACCESS_KEY_MARKER,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY_MARKER,
    "AWS_MAX_ATTEMPTS": "2",  # fail over an outage in seconds, not after botocore's default backoff
}
SECRETS = (ACCESS_KEY_MARKER, SECRET_KEY_MARKER, SECRET_PATH)
# DVC's repository lock, or the read/write lock on the outputs of the stage the other run holds.
DVC_LOCK_BUSY = re.compile(r"Unable to acquire lock|is busy, it is being blocked by:\n\s+\(PID \d+\): .*dvc repro")


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


# --- two pipelines at once --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConcurrentRepros:
    repo: Path
    results: list[subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def concurrent_repros(tmp_path_factory: pytest.TempPathFactory) -> ConcurrentRepros:
    """Two `dvc repro` of the whole pipeline started at the same moment in one repository."""
    repo = make_repo(tmp_path_factory.mktemp("concurrent"), {**FAST_TRAINING, **OPEN_GATE})
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: run(["dvc", "repro"], repo, check=False), range(2)))
    return ConcurrentRepros(repo, results)


def test_two_pipelines_at_once_one_fails_on_the_lock_and_the_outputs_are_whole(concurrent_repros: ConcurrentRepros) -> None:
    repo = concurrent_repros.repo
    winner, loser = sorted(concurrent_repros.results, key=lambda result: result.returncode)
    assert winner.returncode == 0, output(winner)
    assert loser.returncode != 0 and DVC_LOCK_BUSY.search(output(loser)), output(loser)
    assert "Running stage" not in output(loser)
    training_model = manifest_digest((repo / "models/training" / MANIFEST_NAME).read_bytes())
    record_production_check(repo / "models/production", before=None, new=[training_model])
    assert run(["dvc", "status", "-q"], repo, check=False).returncode == 0, run(["dvc", "status"], repo).stdout


# --- the S3 server goes down in the middle of `dvc push` ----------------------------------------------------------


@dataclass(frozen=True)
class Outage:
    repo: Path
    clone: Path
    production: str  # digest of the production model pushed
    stored_at_cut: int  # objects the remote held when the server went down
    stored_after_retry: int
    cut_push: subprocess.CompletedProcess[str]
    local_status_after_cut: subprocess.CompletedProcess[str]
    production_after_cut: str
    retried_push: subprocess.CompletedProcess[str]
    cloud_status: subprocess.CompletedProcess[str]
    commands: list[subprocess.CompletedProcess[str]]  # every command run with the secrets, for the secrets check


OUTAGE_RUNS = itertools.count()


@pytest.fixture(scope="module", params=["back-with-its-data", "restarted-empty"])
def outage(request: pytest.FixtureRequest, concurrent_repros: ConcurrentRepros, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """Push the reproduced outputs through a proxy that goes down after half of the bytes, then retry once it is back.

    "back-with-its-data": the endpoint was unreachable, S3 kept what it had stored (as a real S3 would).
    "restarted-empty": the server lost every object and the bucket, as a restart of moto does (emulated with moto's
    reset API, since its state outlives a server in the same process), and an operator recreated the bucket.
    """
    repo = concurrent_repros.repo
    commands: list[subprocess.CompletedProcess[str]] = []

    def secret_run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = run(cmd, cwd, check=check, env=SECRET_ENV)
        commands.append(result)
        return result

    # About half of what the push uploads: the outputs' cache files, request headers aside.
    cache_bytes = sum(path.stat().st_size for path in (repo / ".dvc/cache/files").rglob("*") if path.is_file())
    with s3_server(BUCKET) as s3, cutting_proxy(urlsplit(s3.endpoint_url).port, cut_after=cache_bytes // 2) as proxy:
        # moto keeps objects in process-wide memory across servers: a prefix of its own makes each remote start empty
        # (pytest builds this fixture again when a shuffled order interleaves the two params).
        prefix = f"faults-{request.param}-{next(OUTAGE_RUNS)}/"
        run(["dvc", "remote", "add", "--force", "--default", "s3", f"s3://{BUCKET}/{prefix}"], repo)
        run(["dvc", "remote", "modify", "s3", "endpointurl", f"http://127.0.0.1:{proxy.port}"], repo)
        commit_all(repo, f"outputs, and a DVC remote ({request.param})")
        production = served_model_digest(repo / "models/production")
        cut_push = secret_run(["dvc", "push"], repo, check=False)
        assert proxy.cut.is_set(), f"the push ended before the proxy cut it: {output(cut_push)}"
        stored_at_cut = sum(key.startswith(prefix) for key in s3.object_keys())
        local_status = run(["dvc", "status"], repo, check=False)
        production_after_cut = record_production_check(repo / "models/production", before=production)
        if request.param == "restarted-empty":
            s3.restart_empty()
        proxy.resume()
        retried_push = secret_run(["dvc", "push", "--verbose"], repo)
        cloud_status = secret_run(["dvc", "status", "--cloud"], repo)
        stored_after_retry = sum(key.startswith(prefix) for key in s3.object_keys())
        clone = tmp_path_factory.mktemp("clone") / "clone"
        run(["git", "clone", "--quiet", f"file://{repo}", str(clone)], repo)
        secret_run(["dvc", "pull"], clone)
        yield Outage(
            repo, clone, production, stored_at_cut, stored_after_retry, cut_push, local_status, production_after_cut,
            retried_push, cloud_status, commands,
        )


def test_a_push_cut_half_way_fails_clearly_and_loses_nothing_locally(outage: Outage) -> None:
    assert outage.cut_push.returncode != 0
    assert "failed to transfer" in output(outage.cut_push), output(outage.cut_push)
    assert "Could not connect to the endpoint URL" in output(outage.cut_push), output(outage.cut_push)
    assert 0 < outage.stored_at_cut < outage.stored_after_retry, "the server should go down between two uploads"
    assert outage.production_after_cut == "old"
    assert outage.local_status_after_cut.returncode == 0 and "up to date" in outage.local_status_after_cut.stdout


def test_after_the_outage_a_retried_push_completes_and_a_fresh_clone_pulls_the_same_model(outage: Outage) -> None:
    assert "in sync" in outage.cloud_status.stdout, outage.cloud_status.stdout
    assert record_production_check(outage.clone / "models/production", before=outage.production) == "old"
    for path in cached_outputs(outage.repo):
        source, pulled = outage.repo / path, outage.clone / path
        files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file()) if source.is_dir() else [Path()]
        assert files and all((source / name).read_bytes() == (pulled / name).read_bytes() for name in files), path


# --- secrets ------------------------------------------------------------------------------------------------------


def test_no_credential_or_webhook_url_appears_in_any_output_or_file(outage: Outage) -> None:
    """Outputs of the pushes (one verbose), the pull, a failing retrain whose alert cannot be sent, and the
    promote stage; then every file of both repositories but git's own (compressed) objects."""
    env = {**SECRET_ENV, WEBHOOK_ENV: unreachable_url()}
    retrain = run(["cryptoml", "retrain", "--until", FAST_TRAINING["data.start"]], outage.clone, check=False, env=env)
    assert retrain.returncode == 1 and "the alert could not be sent" in output(retrain), output(retrain)
    promote = run(["cryptoml", "promote"], outage.clone, env=env)
    texts = [output(result) for result in [*outage.commands, retrain, promote]]
    files = [path for repo in (outage.repo, outage.clone) for path in repo.rglob("*") if path.is_file() and ".git" not in path.parts]
    for secret in SECRETS:
        assert not [text for text in texts if secret in text], secret
        assert not [path for path in files if secret.encode() in path.read_bytes()], secret
