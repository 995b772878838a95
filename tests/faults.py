"""The fault suite's ledger: cases run, and what every crash, concurrency and remote test found in production.

Tests import `record_production_check` like any helper; tests/conftest.py counts the `fault`-marked tests and
prints the ledger at the end of the run, so the counts come only from what actually ran.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from cryptoml.model.artifacts import MANIFEST_NAME, ArtifactError


@dataclass
class Ledger:
    """Session counters; one instance (LEDGER) lives as long as the pytest process."""

    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> "passed", "failed", "skipped" or "xfailed"
    hypothesis_examples: int = 0
    production_checks: int = 0
    models_lost: int = 0
    concurrent_loads: int = 0
    concurrent_load_failures: int = 0

    def record_outcome(self, test_id: str, outcome: str) -> None:
        """A failure in any phase (setup, call, teardown) makes the case failed."""
        if self.outcomes.get(test_id) != "failed":
            self.outcomes[test_id] = outcome

    def counters(self) -> dict[str, int]:
        """What a pytest-xdist worker sends back to the controller (outcomes reach it as test reports)."""
        return {name: value for name, value in vars(self).items() if name != "outcomes"}

    def add(self, counters: dict[str, int]) -> None:
        for name, value in counters.items():
            setattr(self, name, getattr(self, name) + value)

    def count(self, outcome: str) -> int:
        return sum(1 for recorded in self.outcomes.values() if recorded == outcome)

    def summary(self) -> str:
        failed, skipped, known = self.count("failed"), self.count("skipped"), self.count("xfailed")
        examples = f" (+ {self.hypothesis_examples} hypothesis examples)" if self.hypothesis_examples else ""
        loads = (
            f", {self.concurrent_loads} loads during promotions ({self.concurrent_load_failures} partial)"
            if self.concurrent_loads
            else ""
        )
        return (
            f"fault suite: {self.count('passed') + failed} cases tried{examples}, {failed} failed, "
            f"{skipped} skipped, {known} known defects (xfail); production models checked {self.production_checks}, "
            f"models lost {self.models_lost}{loads}"
        )


LEDGER = Ledger()


def manifest_digest(manifest: bytes) -> str:
    """Identifies a model: a directory that loads verifies every listed file's sha256 against its manifest,
    so equal manifest bytes mean byte-identical model files."""
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def served_model_digest(directory: Path) -> str:
    """The digest of the model `directory` serves, after a full verified load (raises ArtifactError otherwise)."""
    from cryptoml.model.ensemble import ProductionEnsemble  # heavy: conftest imports this module for the ledger alone

    ProductionEnsemble.load(directory)
    return manifest_digest((directory / MANIFEST_NAME).read_bytes())


def record_production_check(directory: Path, before: str | None, new: Collection[str] = ()) -> str:
    """Count one check of a production directory after a fault; a lost model fails the test and is counted.

    The model must load and be the one served before the fault (`before`, byte for byte) or a complete
    model among `new`. Returns "old" or "new".
    """
    LEDGER.production_checks += 1
    try:
        served = served_model_digest(directory)
    except (ArtifactError, OSError) as exc:
        LEDGER.models_lost += 1
        raise AssertionError(f"production model lost in {directory}: it no longer loads ({exc})") from exc
    if served == before:
        return "old"
    if served in new:
        return "new"
    LEDGER.models_lost += 1
    raise AssertionError(
        f"production model lost in {directory}: it serves {served}, neither the model before the fault ({before}) "
        f"nor an expected new one ({sorted(new)})"
    )


def record_concurrent_loads(loads: int, failures: int) -> None:
    """Readers' loads while promotions ran, and how many of them failed (saw a partial model)."""
    LEDGER.concurrent_loads += loads
    LEDGER.concurrent_load_failures += failures
