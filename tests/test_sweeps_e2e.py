"""A parameter sweep with DVC's own queue: `dvc exp run --queue` twice, `dvc queue start -j 2`, results compared.

One repository, trained and committed once; the sweep runs once in a module fixture and the tests read it. The
queue's workers are background processes (celery, started by `dvc queue start`), so the fixture polls
`dvc queue status` with a bounded timeout, stops the workers at the end and checks that none outlived it. On a
failure the message holds `dvc queue status`, every experiment's `dvc queue logs` and the raw worker logs
(`.dvc/tmp/exps/celery/*.out`), which hold what `dvc queue logs` lacks when a task fails before its first stage.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from cryptoml.model.executor import SCHEDULER_ENV
from tests.repo import REPO_ROOT, copy_repo, run, set_params, venv_environment
from tests.test_executor import local_cluster

pytestmark = pytest.mark.e2e

# The session's reproduced pipeline (FAST_TRAINING, OPEN_GATE) is the sweep's base: FAST models score near chance on
# three months of synthetic candles, and the open gate lets them pass, so promote runs its full path (a swap) inside
# each experiment. This module tests where the sweep runs, not model quality.
SWEPT = "model.lightgbm.learning_rate"
SWEEP = {"lr-0.02": 0.02, "lr-0.2": 0.2}  # experiment name -> value; neither is params.yaml's, which the workspace keeps
WORKSPACE_VALUE = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["model"]["lightgbm"]["learning_rate"]
JOBS = 2
EVALUATION = "metrics/evaluate.json"
PRODUCTION = Path("models/production")
SWEEP_TIMEOUT = 600.0  # seconds for both experiments; each full pipeline takes 15-40 s on a loaded 2-core machine
START_TIMEOUT = 60.0  # seconds for `dvc queue start` to spawn the workers and exit
POLL = 3.0
WORKER_EXIT_TIMEOUT = 60.0  # seconds for the workers to exit after `dvc queue stop --kill`
# A task that stays queued while no worker is alive (DVC issue 10562) is reported after this long: workers take a
# few seconds to register after `dvc queue start`, so "0 active, 0 idle" at the start is not yet a stall.
STALL_GRACE = 60.0


@dataclass(frozen=True)
class Sweep:
    repo: Path
    before: dict[str, bytes]  # models/production/* and dvc.lock before the sweep
    after: dict[str, bytes]
    show: list[dict[str, Any]]  # `dvc exp show --json` after the sweep
    show_md: str
    status: str  # `dvc queue status` when the sweep ended


def workspace_files(repo: Path) -> dict[str, bytes]:
    files = {f"{PRODUCTION}/{path.name}": path.read_bytes() for path in sorted((repo / PRODUCTION).iterdir())}
    return {**files, "dvc.lock": (repo / "dvc.lock").read_bytes()}


def diagnostics(repo: Path, names: Iterable[str]) -> str:
    """What to read when the queue misbehaves: its status, each experiment's logs, the raw celery worker logs."""
    parts = [run(["dvc", "queue", "status"], repo, check=False).stdout]
    for name in names:
        logs = run(["dvc", "queue", "logs", name], repo, check=False)
        parts.append(f"--- dvc queue logs {name} (exit {logs.returncode})\n{logs.stdout}{logs.stderr}")
    for path in sorted((repo / ".dvc/tmp/exps/celery").glob("*.out")):
        parts.append(f"--- {path.relative_to(repo)} (last 3000 characters)\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def task_states(status: str, names: Iterable[str]) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`'s table."""
    states = {}
    for line in status.splitlines():
        cells = line.split()
        if cells and cells[0] != "Task" and len(cells) >= 3 and cells[1] in names:
            states[cells[1]] = cells[-1]
    return states


def queue_processes(repo: Path) -> list[psutil.Process]:
    """Processes working in this repository or in its experiments' temp dirs (.dvc/tmp/exps/...)."""
    found = []
    for process in psutil.process_iter(["cwd"]):
        cwd = process.info.get("cwd")
        if cwd and Path(cwd).is_relative_to(repo):
            found.append(process)
    return found


def start_workers(repo: Path, env: dict[str, str] | None) -> None:
    """`dvc queue start -j 2`, its output in a file (the workers inherit `env`).

    Not a pipe: each worker's manager is forked from `dvc queue start` and keeps its stdout open until the worker
    exits, so reading a pipe to its end waits for the whole sweep, and forever for a worker that never exits.
    """
    output = repo / ".dvc/tmp/queue-start.out"
    with output.open("w") as file:
        started = subprocess.run(
            ["dvc", "queue", "start", "-j", str(JOBS)],
            cwd=repo,
            env=venv_environment(env),
            stdout=file,
            stderr=subprocess.STDOUT,
            timeout=START_TIMEOUT,
        )
    assert started.returncode == 0, f"dvc queue start exited {started.returncode}\n{output.read_text()}"


def run_sweep(repo: Path, names: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Start the workers, then poll `dvc queue status` until none of `names` is queued or running; fail with the
    diagnostics on a stall or a timeout. Returns the last status."""
    start_workers(repo, env)
    start = time.monotonic()
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        states = task_states(status, names)
        elapsed = time.monotonic() - start
        if set(states) == set(names) and not {"Queued", "Running"} & set(states.values()):
            return status
        if elapsed > STALL_GRACE and "0 active, 0 idle" in status and "Running" not in states.values():
            reason = f"queued experiments but no worker after {elapsed:.0f} s (DVC issue 10562)"
            pytest.fail(f"{reason}\n{diagnostics(repo, names)}")
        if elapsed > SWEEP_TIMEOUT:
            pytest.fail(f"sweep not done after {SWEEP_TIMEOUT:.0f} s\n{diagnostics(repo, names)}")
        time.sleep(POLL)


def stop_workers(repo: Path) -> None:
    """`dvc queue stop --kill`, then wait for every process in the repository to exit; kill what outlives the wait
    (also when `dvc queue stop` itself hangs)."""
    try:
        run(["dvc", "queue", "stop", "--kill"], repo, check=False, timeout=WORKER_EXIT_TIMEOUT)
    finally:
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT
        while (left := queue_processes(repo)) and time.monotonic() < deadline:
            time.sleep(1.0)
        for process in left:  # started by this test's queue (their working directory is inside its repository)
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    assert not left, f"queue processes outlived `dvc queue stop --kill` by {WORKER_EXIT_TIMEOUT:.0f} s: {left}"


@pytest.fixture(scope="module")
def sweep(reproduced_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The sweep, its workers stopped before the results are read (a worker can hold the experiments' lock that
    `dvc exp show` waits for: treeverse/dvc#8762)."""
    repo = copy_repo(reproduced_repo, tmp_path_factory.mktemp("sweep"))
    before = workspace_files(repo)
    try:
        for name, value in SWEEP.items():
            run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"{SWEPT}={value}"], repo)
        status = run_sweep(repo, list(SWEEP))
    finally:
        stop_workers(repo)
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    show_md = run(["dvc", "exp", "show", "--md"], repo).stdout
    return Sweep(repo, before, workspace_files(repo), show, show_md, status)


def experiments(show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{name: data} of the experiments on the baseline commit in `dvc exp show --json`."""
    baseline = next(entry for entry in show if entry["rev"] != "workspace")
    found = {}
    for experiment in baseline.get("experiments") or []:
        for rev in experiment["revs"]:
            state = (experiment["executor"] or {}).get("state")
            found[rev["name"]] = {**rev["data"], "rev": rev["rev"], "state": state}
    return found


def swept_value(data: dict[str, Any]) -> float:
    node = data["params"]["params.yaml"]["data"]
    for key in SWEPT.split("."):
        node = node[key]
    return node


def evaluation(data: dict[str, Any]) -> dict[str, Any]:
    return data["metrics"][EVALUATION]["data"]


def test_every_experiment_succeeds_with_its_params_and_metrics_in_exp_show(sweep: Sweep) -> None:
    states = task_states(sweep.status, SWEEP)
    assert states == dict.fromkeys(SWEEP, "Success"), f"{states}\n{diagnostics(sweep.repo, SWEEP)}"
    found = experiments(sweep.show)
    assert set(found) == set(SWEEP), f"dvc exp show --json lists {sorted(found)}\n{diagnostics(sweep.repo, SWEEP)}"
    for name, value in SWEEP.items():
        data = found[name]
        assert data["state"] == "success" and swept_value(data) == value, data["state"]
        committed = json.loads(run(["git", "show", f"{data['rev']}:{EVALUATION}"], sweep.repo).stdout)
        assert evaluation(data)["policy"]["roc_auc"] == committed["policy"]["roc_auc"]
        assert name in sweep.show_md
    aucs = {name: evaluation(found[name])["policy"]["roc_auc"] for name in SWEEP}
    assert len(set(aucs.values())) == len(SWEEP), f"the swept param changed nothing: {aucs}"


def test_the_workspace_is_untouched(sweep: Sweep) -> None:
    """Queued experiments run in temp dirs: their promote stage swapped a copy, not the workspace's model."""
    assert sweep.after == sweep.before
    assert run(["git", "status", "--porcelain"], sweep.repo).stdout == ""
    dvc_status = run(["dvc", "status"], sweep.repo, check=False)
    assert dvc_status.returncode == 0 and "up to date" in dvc_status.stdout, dvc_status.stdout
    assert WORKSPACE_VALUE not in SWEEP.values()
    assert yaml.safe_load((sweep.repo / "params.yaml").read_text())["model"]["lightgbm"]["learning_rate"] == WORKSPACE_VALUE


def metrics_of(sweep: Sweep, name: str, metrics: str) -> dict[str, Any]:
    """A metrics file as the local sweep's experiment `name` committed it."""
    return json.loads(run(["git", "show", f"{experiments(sweep.show)[name]['rev']}:{metrics}"], sweep.repo).stdout)


def test_a_queued_experiment_equals_a_plain_repro_with_its_params(sweep: Sweep, reproduced_repo: Path, tmp_path: Path) -> None:
    """Determinism across the two ways: a plain `dvc repro` of a copy with the same params gives the same metrics."""
    name, value = next(iter(SWEEP.items()))
    copy = copy_repo(reproduced_repo, tmp_path)
    set_params(copy, {SWEPT: value})
    run(["dvc", "repro"], copy)
    for metrics in (EVALUATION, "metrics/train.json"):
        assert metrics_of(sweep, name, metrics) == json.loads((copy / metrics).read_text()), metrics


@pytest.mark.slow  # two more pipeline runs: `make test-slow`
def test_the_same_sweep_on_a_dask_cluster_gives_the_same_results(sweep: Sweep) -> None:
    """CRYPTOML_DASK_SCHEDULER in the environment of `dvc queue start` sends every experiment's fits to the cluster.

    Workers keep the environment they started with, so the local sweep's workers are stopped first. `--force`:
    otherwise DVC's run cache would restore the local sweep's train outputs for the same params and nothing would
    run on the cluster.
    """
    stop_workers(sweep.repo)
    names = {f"dask-{name}": value for name, value in SWEEP.items()}
    for name, value in names.items():
        run(["dvc", "exp", "run", "--queue", "--force", "-n", name, "-S", f"{SWEPT}={value}"], sweep.repo)
    try:
        with local_cluster(JOBS) as address:
            status = run_sweep(sweep.repo, list(names), env={SCHEDULER_ENV: address})
    finally:
        stop_workers(sweep.repo)
    assert task_states(status, names) == dict.fromkeys(names, "Success"), diagnostics(sweep.repo, names)
    found = experiments(json.loads(run(["dvc", "exp", "show", "--json"], sweep.repo).stdout))
    for (name, local), dask in zip(SWEEP.items(), names, strict=True):
        log = run(["dvc", "queue", "logs", dask], sweep.repo).stdout
        assert f"tasks on dask {address}" in log, log
        for metrics in (EVALUATION, "metrics/train.json"):
            on_dask = run(["git", "show", f"{found[dask]['rev']}:{metrics}"], sweep.repo).stdout
            assert json.loads(on_dask) == metrics_of(sweep, name, metrics), (name, metrics, local)
    assert workspace_files(sweep.repo) == sweep.before
