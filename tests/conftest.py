"""Shared fixtures: one reproduced pipeline per session, the real-data folder when present (a user's clone has none);
the fault suite's counts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.faults import LEDGER
from tests.repo import reproduce_once

# Dask's loggers get a handler on the stderr of the moment they are configured (pytest's capture, closed later):
# its shutdown messages would then print "--- Logging error ---" tracebacks. Errors still show.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE. "ci" (make test, CI) is derandomized: a run's examples depend
# only on the code, so a test that passed on a commit passes on every run of it. "random" draws new examples each run
# and "thorough" 2,000 of them per test, to explore (make test-hypothesis); a failure found there becomes an @example.
# No profile lets the wall clock decide a result: no deadline, and no "too slow" health check (a loaded machine
# generates examples slower; that says nothing about the code).
UNTIMED = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "print_blob": True}
settings.register_profile("ci", derandomize=True, database=None, **UNTIMED)
settings.register_profile("random", **UNTIMED)
settings.register_profile("thorough", max_examples=2000, **UNTIMED)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def reproduced_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one reproduced pipeline (tests.repo.reproduce_once); tests change copies of it (copy_repo)."""
    return reproduce_once(tmp_path_factory.mktemp("reproduced"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real candle data not present at {SHARED_DATA} (only in the developers' workspace)")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The workflow runs under act (marker `workflows`) take minutes: only a -m that names them selects them
    (`make test-workflows`); `make test` and a bare `pytest` leave them out."""
    if "workflows" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("workflows") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("workflows") is None]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Count the examples hypothesis runs in fault tests, through its documented, replaceable `inner_test`."""
    handle = getattr(getattr(item, "obj", None), "hypothesis", None)
    if item.get_closest_marker("fault") is None or handle is None:
        return (yield)
    inner = handle.inner_test

    def counted(*args: Any, **kwargs: Any) -> Any:
        LEDGER.hypothesis_examples += 1
        return inner(*args, **kwargs)

    handle.inner_test = counted
    try:
        return (yield)
    finally:
        handle.inner_test = inner


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One outcome per fault test: a failure in any phase fails it; skips and known defects (xfail) are counted apart."""
    if "fault" not in report.keywords:
        return
    if report.skipped and hasattr(report, "wasxfail"):
        LEDGER.record_outcome(report.nodeid, "xfailed")
    elif report.failed or report.skipped:
        LEDGER.record_outcome(report.nodeid, report.outcome)
    elif report.when == "call":
        LEDGER.record_outcome(report.nodeid, "passed")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker: hand the ledger's counters to the controller, which prints the summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_ledger"] = LEDGER.counters()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown when xdist is not loaded
def pytest_testnodedown(node: Any, error: Any) -> None:
    """On the pytest-xdist controller: add a finished worker's counters (its test outcomes came as reports)."""
    LEDGER.add(getattr(node, "workeroutput", {}).get("fault_ledger", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if LEDGER.outcomes:
        failing = bool(LEDGER.count("failed") or LEDGER.models_lost)
        terminalreporter.write_sep("=", LEDGER.summary(), bold=True, red=failing, green=not failing)
