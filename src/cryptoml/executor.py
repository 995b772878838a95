"""Placeholder until the executor branch lands: local joblib only (same interface)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from joblib import Parallel, delayed

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ExecutorSettings:
    kind: Literal["local", "dask"] = "local"
    workers: int | None = None
    scheduler: str | None = None


def map_tasks(function: Callable[[S, T], R], shared: S, tasks: Sequence[T], settings: ExecutorSettings, *, description: str) -> list[R]:
    workers = settings.workers or os.cpu_count() or 1
    if workers == 1:
        return [function(shared, task) for task in tasks]
    return Parallel(n_jobs=workers, backend="loky")(delayed(function)(shared, task) for task in tasks)
