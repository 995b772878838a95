"""Atomic writes: complete new bytes or untouched old bytes, never a partial file, normal permissions."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest

from cryptoml.io import METRICS_DECIMALS, atomic_path, dump_json, rounded_json, write_bytes_atomic, write_json_atomic


@pytest.mark.fault
def test_failed_write_leaves_old_bytes_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash in the middle")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_creates_parents_and_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044 == 0o044  # group and others may read


def test_json_is_canonical_and_refuses_nan(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    write_json_atomic(target, {"b": 1, "a": [1.5]})
    assert target.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}
    with pytest.raises(ValueError):
        dump_json({"x": float("nan")})


def test_rounded_json_is_json_ready_and_refuses_non_finite_values() -> None:
    metrics = rounded_json({"a": {"b": np.float64(1 / 3), "n": np.int64(4), "ok": np.bool_(True), "when": "2024", "l": (0.5, None)}})
    assert metrics == {"a": {"b": round(1 / 3, METRICS_DECIMALS), "n": 4, "ok": True, "when": "2024", "l": [0.5, None]}}
    json.dumps(metrics, allow_nan=False)
    with pytest.raises(ValueError, match=r"metrics\.ensemble\.log_loss is inf"):
        rounded_json({"ensemble": {"log_loss": math.inf}})
    with pytest.raises(TypeError, match="metrics.x is a object"):
        rounded_json({"x": object()})
