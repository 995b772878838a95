"""One executor for many independent fits: joblib processes on this machine, or a Dask cluster.

A setting may change where work runs, never what it computes. A task is `function(shared, task)`, a
pure function of explicit data, defined at module level so that a worker process can import it. In
this project it is a seeded single-process fit whose thread count comes from the model params
(ProductionEnsemble `n_jobs`), not from the worker it lands on, so the same task gives the same
bytes on any worker; `map_tasks` returns the results in task order whichever executor ran them.
Because tasks are pure, running one again is safe: a task whose worker dies is re-run elsewhere (by
the Dask scheduler, or here by resubmitting the unfinished tasks to a fresh joblib pool).

Data moves once. `shared` (the feature matrix and labels, a few MB) is sent once per run, never per
task: on Dask it is scattered to every worker (`broadcast=True`) and each task carries its future;
locally it is dumped once with joblib and each task opens that file memory-mapped (read-only arrays,
one copy in the page cache for all processes). A task carries only the function's reference, the
task and that handle; `TransferStats` has the sizes and `map_tasks` logs them.

Where: `executor_settings` turns params (kind, workers, scheduler) into ExecutorSettings, and
CRYPTOML_DASK_SCHEDULER=tcp://host:8786 in the environment selects Dask at that address over them. An
unreachable scheduler is an ExecutorError naming the address after `connect_timeout` seconds; there is
no fall-back to local work.

The Dask workers must run the same pinned environment (requirements.lock and this package), as the
task functions are imported, not shipped; start them with one thread each (`dask worker ADDRESS
--nthreads 1 --nworkers N`), since each fit brings its own threads. `function` must not modify
`shared`: locally its arrays are read-only; on Dask the tasks of one worker share one copy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import cloudpickle
import joblib
from joblib.externals.loky.process_executor import TerminatedWorkerError

from cryptoml.console import progress

if TYPE_CHECKING:
    from distributed import Client, Future

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

SCHEDULER_ENV = "CRYPTOML_DASK_SCHEDULER"
KINDS = ("local", "dask")
# Local pools replaced after a worker process died, before the run gives up (Dask's own default,
# distributed.scheduler.allowed-failures, is 3 too): a task that kills its worker every time fails the run.
LOCAL_POOL_RESTARTS = 3
# Times the shared data is scattered again after its last copy died with the Dask workers that held it.
DASK_RESCATTERS = 3


class ExecutorError(RuntimeError):
    """The work could not be run where the settings say (unreachable scheduler, workers lost)."""


@dataclass(frozen=True)
class ExecutorSettings:
    """Where tasks run. `workers`: local joblib processes (None: one per CPU); `scheduler`: the Dask address."""

    kind: Literal["local", "dask"] = "local"
    workers: int | None = None
    scheduler: str | None = None
    connect_timeout: float = 5.0  # seconds to reach the scheduler: a wrong address fails at once
    worker_timeout: float = 60.0  # seconds to wait for the scheduler's first worker

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"executor.kind must be one of {list(KINDS)}, got {self.kind!r}")
        whole = isinstance(self.workers, int) and not isinstance(self.workers, bool)
        if self.workers is not None and not (whole and self.workers >= 1):
            raise ValueError(f"executor.workers must be a whole number >= 1 or null (one per CPU), got {self.workers!r}")
        if self.kind == "dask" and not self.scheduler:
            raise ValueError(
                f"executor.kind is 'dask' but no scheduler address is given: set executor.scheduler or {SCHEDULER_ENV} "
                "(e.g. tcp://host:8786)"
            )


def executor_settings(
    kind: str, workers: int | None, scheduler: str | None, environ: Mapping[str, str] = os.environ
) -> ExecutorSettings:
    """Settings from params; CRYPTOML_DASK_SCHEDULER=tcp://host:8786 selects Dask at that address and wins over them.

    The variable lets one run use a cluster without editing params.yaml, which is safe because the
    results do not depend on where they are computed.
    """
    from_environment = environ.get(SCHEDULER_ENV, "").strip()
    if from_environment:
        return ExecutorSettings(kind="dask", workers=workers, scheduler=from_environment)
    return ExecutorSettings(kind=kind, workers=workers, scheduler=scheduler)  # kind is checked in __post_init__


@dataclass(frozen=True)
class TransferStats:
    """What a run sent to its workers: the shared data once per copy, and a small payload per task."""

    where: str
    tasks: int
    shared_bytes: int  # pickled size of `shared`
    shared_copies: int  # 0 in-process, 1 memory-mapped file locally, one per worker on Dask
    task_bytes: int  # pickled size of all task payloads (function reference, shared handle, task), resubmissions included

    @property
    def bytes_per_task(self) -> float:
        return self.task_bytes / self.tasks if self.tasks else 0.0

    def describe(self) -> str:
        return (
            f"{self.tasks} tasks on {self.where}; shared data {self.shared_bytes} bytes sent {self.shared_copies} time(s), "
            f"{self.bytes_per_task:.0f} bytes per task"
        )


@dataclass(frozen=True)
class TaskRun(Generic[R]):
    """The results in task order and what it took to send the work (what a benchmark prints)."""

    results: list[R]
    transfer: TransferStats


def map_tasks(
    function: Callable[[S, T], R], shared: S, tasks: Sequence[T], settings: ExecutorSettings, *, description: str
) -> list[R]:
    """Run function(shared, task) for every task; results in task order, identical whatever the executor."""
    return run_tasks(function, shared, tasks, settings, description=description).results


def run_tasks(
    function: Callable[[S, T], R], shared: S, tasks: Sequence[T], settings: ExecutorSettings, *, description: str
) -> TaskRun[R]:
    """`map_tasks` with the transfer figures of the run (for benchmarks and tests)."""
    if settings.kind == "dask":
        run = _run_on_dask(function, shared, tasks, settings, description)
    elif _local_workers(settings) == 1:
        run = _run_in_process(function, shared, tasks, description)
    else:
        run = _run_on_local_pool(function, shared, tasks, _local_workers(settings), description)
    log.info("%s: %s", description, run.transfer.describe())
    return run


def _local_workers(settings: ExecutorSettings) -> int:
    return settings.workers or os.cpu_count() or 1


def _pickled_size(value: object) -> int:
    """Bytes of the value as the workers receive it (joblib's loky and Dask both pickle with cloudpickle)."""
    return len(cloudpickle.dumps(value))


def _task_bytes(function: Callable[..., object], handle: object, tasks: Sequence[object]) -> int:
    return sum(_pickled_size((function, handle, task)) for task in tasks)


# --- in-process ---------------------------------------------------------------------------------


def _run_in_process(function: Callable[[S, T], R], shared: S, tasks: Sequence[T], description: str) -> TaskRun[R]:
    """workers=1: no pool and nothing sent, the tasks run one after the other in this process."""
    results: list[R] = []
    with progress(description, total=len(tasks)) as advance:
        for task in tasks:
            results.append(function(shared, task))
            advance(1)
    return TaskRun(results, TransferStats("local, in-process", len(tasks), _pickled_size(shared), 0, 0))


# --- local joblib pool --------------------------------------------------------------------------


def call_with_shared_file(function: Callable[[S, T], R], shared_file: str, numbered_task: tuple[int, T]) -> tuple[int, R]:
    """Worker side of a local task: the shared data memory-mapped from the file written once for the run.

    Returns the task's number with its result, as results arrive in the order the tasks finish.
    """
    number, task = numbered_task
    return number, function(joblib.load(shared_file, mmap_mode="r"), task)


@contextmanager
def _shared_file(shared: object) -> Iterator[str]:
    """`shared` dumped once for the run, removed after it; numpy arrays in it are memory-mapped by each task."""
    with tempfile.TemporaryDirectory(prefix="cryptoml-shared-") as directory:
        path = str(Path(directory) / "shared.joblib")
        joblib.dump(shared, path)
        yield path


def _run_on_local_pool(
    function: Callable[[S, T], R], shared: S, tasks: Sequence[T], workers: int, description: str
) -> TaskRun[R]:
    """joblib processes (loky); when a worker process dies, the unfinished tasks go to a fresh pool."""
    results: dict[int, R] = {}
    task_bytes = 0
    with _shared_file(shared) as path, progress(description, total=len(tasks)) as advance:
        for restart in range(LOCAL_POOL_RESTARTS + 1):
            pending = [(number, task) for number, task in enumerate(tasks) if number not in results]
            task_bytes += _task_bytes(function, path, pending)
            pool = joblib.Parallel(n_jobs=workers, backend="loky", return_as="generator_unordered")
            try:
                for number, result in pool(joblib.delayed(call_with_shared_file)(function, path, item) for item in pending):
                    results[number] = result
                    advance(1)
                break
            except TerminatedWorkerError as exc:
                unfinished = len(tasks) - len(results)
                if restart == LOCAL_POOL_RESTARTS:
                    raise ExecutorError(
                        f"{description}: local worker processes died {restart + 1} times; "
                        f"{unfinished} of {len(tasks)} tasks never completed: {exc}"
                    ) from exc
                log.warning("%s: a local worker process died; the %d unfinished tasks go to a new pool", description, unfinished)
    transfer = TransferStats(f"local, {workers} processes", len(tasks), _pickled_size(shared), 1, task_bytes)
    return TaskRun([results[number] for number in range(len(tasks))], transfer)


# --- Dask ---------------------------------------------------------------------------------------


def _connect(settings: ExecutorSettings) -> Client:
    """A client of the scheduler; Dask is imported here, so local runs never load it."""
    from distributed import Client

    try:
        return Client(settings.scheduler, timeout=settings.connect_timeout, set_as_default=False)
    except (OSError, ValueError) as exc:
        raise ExecutorError(f"cannot reach {_scheduler_named(settings)} within {settings.connect_timeout:g} s: {exc}") from exc


def _scheduler_named(settings: ExecutorSettings) -> str:
    return f"the Dask scheduler at {settings.scheduler} ({SCHEDULER_ENV} / params executor.scheduler)"


def _scatter_to_every_worker(client: Client, shared: object, settings: ExecutorSettings) -> tuple[Future, int]:
    """One copy of `shared` on each worker (after waiting for the first one), and how many workers got it."""
    try:
        client.wait_for_workers(1, timeout=settings.worker_timeout)
    except TimeoutError as exc:
        raise ExecutorError(f"{_scheduler_named(settings)} has no worker after {settings.worker_timeout:g} s") from exc
    # hash=False: a new key each time, so data scattered again after a loss never meets the forgotten key.
    [future] = client.scatter([shared], broadcast=True, hash=False)
    return future, len(client.nthreads())


def _run_on_dask(
    function: Callable[[S, T], R], shared: S, tasks: Sequence[T], settings: ExecutorSettings, description: str
) -> TaskRun[R]:
    """Scatter `shared` to every worker once, then one future per task.

    The scheduler itself re-runs the tasks of a worker that died, on a worker that still holds the
    data. Only when the last copy of the data died too are the unfinished tasks (cancelled by Dask)
    submitted again with the data scattered anew, at most DASK_RESCATTERS times.
    """
    from distributed import as_completed

    results: dict[int, R] = {}
    pending = list(range(len(tasks)))
    copies = task_bytes = 0
    with _connect(settings) as client, progress(description, total=len(tasks)) as advance:
        for scatter in range(DASK_RESCATTERS + 1):
            if scatter:
                log.warning("%s: the shared data died with its last Dask worker; %d tasks resubmitted", description, len(pending))
            shared_future, workers = _scatter_to_every_worker(client, shared, settings)
            pending_tasks = [tasks[index] for index in pending]
            futures = client.map(function, [shared_future] * len(pending), pending_tasks)
            copies += workers
            task_bytes += _task_bytes(function, shared_future.key, pending_tasks)
            for future in as_completed(futures, loop=client.loop):
                if future.status == "error":
                    _raise_task_error(future, description, settings)
                if future.status == "finished":
                    advance(1)
            finished = {index: future for index, future in zip(pending, futures, strict=True) if future.status == "finished"}
            results.update(zip(finished, client.gather(list(finished.values())), strict=True))
            pending = [index for index in pending if index not in results]
            if not pending:
                break
        else:
            raise ExecutorError(
                f"{description}: {len(pending)} tasks lost their shared data {DASK_RESCATTERS + 1} times "
                f"on {_scheduler_named(settings)}"
            )
    where = f"dask {settings.scheduler}, {workers} workers"
    transfer = TransferStats(where, len(tasks), _pickled_size(shared), copies, task_bytes)
    return TaskRun([results[index] for index in range(len(tasks))], transfer)


def _raise_task_error(future: Future, description: str, settings: ExecutorSettings) -> None:
    """The failed task's own exception, as a local run raises it; ExecutorError if its workers kept dying."""
    from distributed import KilledWorker

    try:
        future.result()
    except KilledWorker as exc:
        raise ExecutorError(
            f"{description}: a task was running on Dask workers that died too often "
            f"(distributed.scheduler.allowed-failures) at {settings.scheduler}: {exc}"
        ) from exc
