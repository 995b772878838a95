"""Atomic file output: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

METRICS_DECIMALS = 6


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The rename is atomic on POSIX, so `path` holds either its old bytes or the complete new ones.
    On error the temporary file is removed and `path` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should read like any other file
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def dump_json(obj: Any) -> str:
    """Canonical JSON text: sorted keys and a trailing newline, so reruns are byte-identical."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, dump_json(obj).encode())


def rounded_json(value: Any, key: str = "metrics") -> Any:
    """JSON-ready copy with floats rounded to METRICS_DECIMALS, so metric files are stable and readable in diffs.

    NaN or inf is an error naming its dotted key: a metric file must hold finite numbers only.
    """
    if isinstance(value, Mapping):
        return {str(name): rounded_json(item, f"{key}.{name}") for name, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [rounded_json(item, f"{key}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"{key} is {value}: metric files hold finite numbers only")
        return round(float(value), METRICS_DECIMALS)
    raise TypeError(f"{key} is a {type(value).__name__}, not a JSON number, string, bool, list or mapping")
