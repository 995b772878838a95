"""From the registry to the bot host, under real git, dvc and gto: versions, `prod`, rollback and pull-model.

One story, built once: a repository with a local bare "origin" and a local-directory DVC remote; v1 and v2
are promoted, committed, pushed and registered. The tests read it in any order: the one that rolls back and
pushes works on a copy of the repository and its origin (copy_story). Every failed rollback or pull is checked
byte for byte against the files before it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from cryptoml.model.artifacts import MANIFEST_NAME
from cryptoml.release.deploy import pull_state_path
from tests.faults import manifest_digest, record_production_check
from tests.moto_server import S3_ENV, s3_server
from tests.repo import BIN, FAST_TRAINING, OPEN_GATE, commit_all, make_repo, release, run

pytestmark = pytest.mark.e2e

NAME = "signal-model"
PRODUCTION = Path("models/production")
# What a rollback may change, and must leave byte-identical when it fails.
WORKSPACE_FILES = ("models/production", "dvc.lock", "params.yaml", "metrics", "plots")


@dataclass(frozen=True)
class Version:
    commit: str
    files: dict[str, bytes]  # models/production

    @property
    def digest(self) -> str:
        return manifest_digest(self.files[MANIFEST_NAME])


@dataclass(frozen=True)
class Story:
    root: Path
    repo: Path
    origin: Path
    dvc_remote: Path  # the local-directory DVC remote committed in the repository's .dvc/config
    v1: Version
    v2: Version


def directory_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def tree_bytes(root: Path, entries: tuple[str, ...] = WORKSPACE_FILES) -> dict[str, bytes]:
    """Every file under `entries` of `root`, by relative path."""
    found = {}
    for entry in entries:
        path = root / entry
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


def publish(repo: Path, changes: dict[str, object], name: str) -> Version:
    """The documented release, then the commits pushed to origin and the versions registered with --push."""
    commit = release(repo, changes, name)
    run(["git", "push", "-q", "origin", "main"], repo)
    run(["cryptoml", "register", "--push", "origin"], repo)
    return Version(commit, directory_files(repo / PRODUCTION))


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Story:
    root = tmp_path_factory.mktemp("deploy")
    origin = root / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    # Not a copy of the session's reproduced pipeline: `dvc artifacts get` reads each version's own .dvc/config, so
    # the remote must be committed before the first version.
    repo = make_repo(root, {**FAST_TRAINING, **OPEN_GATE})
    dvc_remote = root / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "local", str(dvc_remote)], repo)
    commit_all(repo, "DVC remote")
    run(["git", "remote", "add", "origin", str(origin)], repo)
    v1 = publish(repo, {}, "v1")
    v2 = publish(repo, {"model.random_state": 43}, "v2")
    assert v1.digest != v2.digest
    return Story(root, repo, origin, dvc_remote, v1, v2)


def origin_tags(story: Story) -> dict[str, str]:
    """Tag name -> the commit it points to, as the origin has them."""
    lines = run(["git", "ls-remote", "--tags", str(story.origin)], story.root).stdout.splitlines()
    peeled = {line.split()[1].removeprefix("refs/tags/").removesuffix("^{}"): line.split()[0] for line in lines if line.endswith("^{}")}
    return peeled


def gto_show(repo: Path) -> dict[str, object]:
    return json.loads(run(["gto", "show", "--json"], repo).stdout)[NAME]


def copy_story(story: Story, root: Path) -> Story:
    """The story's repository and origin copied under `root`, the copy pushing to the copied origin; the DVC remote,
    which the versions' .dvc/config name, is shared (a rollback only reads it)."""
    shutil.copytree(story.root, root, symlinks=True, ignore=lambda directory, names: [story.dvc_remote.name] if Path(directory) == story.root else [])
    copy = replace(story, root=root, repo=root / story.repo.name, origin=root / story.origin.name)
    run(["git", "remote", "set-url", "origin", str(copy.origin)], copy.repo)
    return copy


def pull_model(story: Story, to: Path, *extra: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["cryptoml", "pull-model", "--repo", str(story.origin), "--to", str(to), *extra], story.root, check=check, env=env)


def test_register_tags_both_versions_in_gto_format_with_prod_on_v2(story: Story) -> None:
    tags = origin_tags(story)
    assert tags == {
        f"{NAME}@v1.0.0": story.v1.commit,
        f"{NAME}#prod#1": story.v1.commit,
        f"{NAME}@v1.1.0": story.v2.commit,
        f"{NAME}#prod#2": story.v2.commit,
    }
    assert {run(["git", "cat-file", "-t", tag], story.repo).stdout.strip() for tag in tags} == {"tag"}  # annotated
    assert gto_show(story.repo) == {"version": "v1.1.0", "stage": {"prod": "v1.1.0"}, "registered": True, "active": True}
    listing = run(["cryptoml", "history"], story.repo).stdout.splitlines()
    assert [line.split()[:2] for line in listing[1:]] == [["v1.0.0", story.v1.commit[:10]], ["v1.1.0", "prod"]]


def test_register_again_and_twice_at_once_creates_nothing(story: Story) -> None:
    before = origin_tags(story)
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Separate processes: two registrations at the same moment, each with its own working directory.
        command = [str(BIN / "cryptoml"), "register", "--push", "origin"]
        results = list(pool.map(lambda _: run(command, story.repo, check=False), range(2)))
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    assert all("nothing to do" in result.stdout for result in results)
    assert origin_tags(story) == before


def test_dvc_artifacts_get_of_prod_gives_the_bytes_of_v2(story: Story, tmp_path: Path) -> None:
    run(["dvc", "artifacts", "get", str(story.origin), NAME, "--stage", "prod", "-o", str(tmp_path / "prod")], tmp_path)
    assert directory_files(tmp_path / "prod") == story.v2.files


@pytest.mark.fault
def test_a_rollback_to_a_version_missing_from_cache_and_remote_changes_nothing(story: Story, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(story.origin), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)  # v2 only: v1 is in neither this cache ...
    empty_remote = tmp_path / "empty-remote"
    empty_remote.mkdir()
    run(["dvc", "remote", "add", "--local", "--default", "empty", str(empty_remote)], clone)  # ... nor this remote
    before = tree_bytes(clone)
    cache = run(["dvc", "cache", "dir"], clone).stdout.strip()
    for pull, where in (([], "--pull"), (["--pull"], str(empty_remote))):
        result = run(["cryptoml", "rollback", "v1.0.0", *pull], clone, check=False)
        assert result.returncode == 1
        assert "are not all in the DVC cache" in result.stderr and cache in result.stderr and where in result.stderr, result.stderr
        assert story.v1.commit in result.stderr and "Nothing was changed" in result.stderr
        assert tree_bytes(clone) == before
        record_production_check(clone / PRODUCTION, before=story.v2.digest)
    assert run(["git", "status", "--porcelain"], clone).stdout == ""
    assert run(["git", "worktree", "list"], clone).stdout.count("\n") == 1  # the temporary checkout is gone


@pytest.mark.fault
def test_a_pull_from_a_wrong_repo_or_remote_or_without_credentials_leaves_the_directory_intact(story: Story, tmp_path: Path) -> None:
    bot = tmp_path / "bot"
    pull_model(story, bot)
    before = directory_files(bot)
    assert before == {name: story.v2.files[name] for name in before} and MANIFEST_NAME in before
    no_credentials = {
        **{key: "" for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")},
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
    }
    with s3_server("cryptoml-bot") as s3:
        failures = {
            "wrong repo": run(["cryptoml", "pull-model", "--repo", str(tmp_path / "no-such-repo"), "--to", str(bot)], tmp_path, check=False),
            "wrong remote": pull_model(story, bot, "--remote-config", f"url={tmp_path / 'no-such-remote'}", check=False),
            "no credentials": pull_model(
                story, bot, "--remote-config", "url=s3://cryptoml-bot/dvc", "--remote-config", f"endpointurl={s3.endpoint_url}",
                env={**S3_ENV, **no_credentials}, check=False,
            ),
        }
    for case, result in failures.items():
        assert result.returncode == 1, (case, result.stdout, result.stderr)
        assert f"{bot} is unchanged (it serves sha256:" in result.stderr, (case, result.stderr)
        assert directory_files(bot) == before, case
        record_production_check(bot, before=story.v2.digest)


def test_a_poll_downloads_nothing_until_the_stage_is_reassigned_or_the_directory_changes(story: Story, tmp_path: Path) -> None:
    """The DVC remote is moved away for the second poll: it can only succeed without a download."""
    bot = tmp_path / "bot"
    pull_model(story, bot)
    served = directory_files(bot)
    remote, away = story.dvc_remote, story.dvc_remote.with_name("dvc-remote-away")
    remote.rename(away)
    try:
        started = time.perf_counter()
        assert "nothing downloaded" in pull_model(story, bot).stdout
        skipped = time.perf_counter() - started
        assert directory_files(bot) == served
        pull_state_path(bot).unlink()  # no record of the last pull: the poll must download, and the remote is away
        failed = pull_model(story, bot, check=False)
        assert failed.returncode == 1 and f"{bot} is unchanged" in failed.stderr, failed.stderr
    finally:
        away.rename(remote)
    pull_model(story, bot)
    shutil.rmtree(bot)  # the directory replaced by hand (here with v1): the record no longer describes it
    bot.mkdir()
    for name, data in story.v1.files.items():
        (bot / name).write_bytes(data)
    v2_hash = json.loads(story.v2.files[MANIFEST_NAME])["model_sha256"]
    started = time.perf_counter()
    assert f"-> {v2_hash}" in pull_model(story, bot).stdout
    print(f"pull-model poll: {skipped:.2f} s with nothing to download, {time.perf_counter() - started:.2f} s with a download and swap")
    assert (bot / MANIFEST_NAME).read_bytes() == served[MANIFEST_NAME]  # v1's files stay until the next swap


def _kill_group(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.fault
def test_sigkill_during_pull_model_leaves_the_old_model_or_the_new_one(story: Story, tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.mkdir()
    for name, data in story.v1.files.items():
        (template / name).write_bytes(data)
    command = [str(BIN / "cryptoml"), "pull-model", "--repo", str(story.origin), "--to"]
    started = time.perf_counter()
    run([*command, str(tmp_path / "timing")], tmp_path)
    duration = time.perf_counter() - started
    outcomes = []
    # Late points hit the download's end, the verification and the swap, which are the last tenth of a pull.
    for kill_at in (0.4, 0.8, 0.95, 0.99):
        bot = Path(shutil.copytree(template, tmp_path / f"bot-{kill_at}"))
        process = subprocess.Popen([*command, str(bot)], cwd=tmp_path, start_new_session=True, text=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * kill_at)
        _kill_group(process)
        outcomes.append(record_production_check(bot, before=story.v1.digest, new=[story.v2.digest]))
        pull_model(story, bot)  # the next poll completes the swap
        record_production_check(bot, before=story.v2.digest)
    print(f"pull-model killed at fractions of its {duration:.1f} s: outcomes {outcomes}")


READER = """
import json, sys, time
from pathlib import Path
from cryptoml.live.serving import ServingModel
directory, stop, report = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
follower = ServingModel.load(directory)
loads = failures = reloads = 0
seen = set()
while not stop.exists():
    try:
        seen.add(ServingModel.load(directory).model_sha256)
        loads += 1
    except Exception as exc:
        failures += 1
        print(exc, file=sys.stderr)
    reloads += follower.reload_if_changed()
    time.sleep(0.01)
report.write_text(json.dumps({"loads": loads, "failures": failures, "reloads": reloads, "seen": sorted(seen),
                              "follower": follower.model_sha256}))
"""


def test_a_rollback_reaches_the_bot_within_one_poll_and_the_reader_never_fails(story: Story, tmp_path: Path) -> None:
    story = copy_story(story, tmp_path / "story")  # the rollback is committed, pushed and registered
    bot = tmp_path / "bot"
    pull_model(story, bot)
    v1_hash = json.loads(story.v1.files[MANIFEST_NAME])["model_sha256"]
    v2_hash = json.loads(story.v2.files[MANIFEST_NAME])["model_sha256"]
    stop, report = tmp_path / "stop", tmp_path / "report.json"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(bot), str(stop), str(report)], stderr=subprocess.PIPE, text=True)
    try:
        rollback = run(["cryptoml", "rollback", "v1.0.0"], story.repo).stdout
        assert f"{v2_hash} -> {v1_hash}" in rollback
        assert directory_files(story.repo / PRODUCTION) == story.v1.files
        assert run(["dvc", "status", "-q"], story.repo, check=False).returncode == 0
        commit_all(story.repo, "roll back to v1.0.0")
        run(["git", "push", "-q", "origin", "main"], story.repo)
        registered = run(["cryptoml", "register", "--push", "origin"], story.repo).stdout
        assert f"created {NAME}#prod#v1.0.0" in registered and "@v" not in registered  # no new version
        assert gto_show(story.repo)["stage"] == {"prod": "v1.0.0"}
        assert f"-> {v1_hash}" in pull_model(story, bot, "--stage", "prod").stdout  # the bot's next poll
        assert "nothing changed" in pull_model(story, bot).stdout
    finally:
        stop.touch()
        _, errors = reader.communicate(timeout=60)
    reads = json.loads(report.read_text())
    assert reads["failures"] == 0, errors
    assert reads["loads"] > 0 and reads["follower"] == v1_hash and reads["reloads"] == 1
    assert set(reads["seen"]) <= {v1_hash, v2_hash}
    assert (bot / MANIFEST_NAME).read_bytes() == story.v1.files[MANIFEST_NAME]
    record_production_check(bot, before=story.v1.digest)
