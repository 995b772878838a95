"""Shared fixtures: the real-data folder when present (a user's clone has none)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real candle data not present at {SHARED_DATA} (only in the developers' workspace)")
    return SHARED_DATA
