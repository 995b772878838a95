"""`cryptoml doctor` (the original system's dev_check): can this checkout train, reproduce and serve the model?

Each check is green or red, and a red one comes with a one-line fix. Every check takes what it inspects
(paths, versions, probe rows) as arguments, so tests point it at broken fixtures; `run_checks` wires them to a
repository root. A check that fails, or cannot run because something it needs is broken (no production model,
no dvc repository), is red with the reason: a doctor reports every problem and never stops at the first.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from rich.console import Console
from rich.text import Text

from cryptoml import paths
from cryptoml.candles.synthetic import simulate_candles
from cryptoml.config import load_params
from cryptoml.features.manager import FeatureManager
from cryptoml.live.serving import PARITY_TOLERANCE, compare_up_probabilities
from cryptoml.model.artifacts import MANIFEST_NAME, Manifest
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.release.promotion import METADATA_NAME, read_production_metadata
from cryptoml.release.registry import RegistryError, dvc

PYPROJECT = Path("pyproject.toml")
LOCK_FILE = Path("requirements.lock")
LISTED_PROBLEMS = 5  # problems a red detail names before "and N more"
# The ONNX/native probe: fixed synthetic candles, so every run compares the same rows.
PROBE_START = pd.Timestamp("2024-01-01T00:00:00Z")
PROBE_TIMEFRAME = "1h"
PROBE_ROWS = 300
PROBE_SEED = 7
# `name==version` at the start of a lock line; hash and "# via" lines are indented or comments.
_LOCK_PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;\\]+)")

FIXES: dict[str, str] = {
    "python": "make clean-venv && make setup PYTHON=<a python matching requires-python>",
    "libraries": "rm .venv/.installed && make setup (reinstalls exactly requirements.lock)",
    "params": "correct the named key in params.yaml",
    "dvc status": "dvc pull (outputs missing or modified) or dvc repro (dependencies or params changed)",
    "artifacts": "dvc checkout models/production (the committed model), or cryptoml rollback <rev>",
    "feature spec": "retrain on the current features: dvc repro",
    "onnx parity": "dvc checkout models/production; if it persists, retrain: dvc repro",
    "dvc remote": "dvc remote add -d <name> <url> (CI: make dvc-remote); check the endpoint and the credentials in the environment",
}


class CheckFailed(Exception):
    """A check found a problem; the message is the red line's detail."""


@dataclass(frozen=True)
class CheckResult:
    """One line of the report; `fix` is kept on green checks too, so every JSON entry has the same keys."""

    name: str
    ok: bool
    detail: str
    fix: str  # shown under a red line


def first_few(items: Iterable[str], separator: str = ", ") -> str:
    """Up to LISTED_PROBLEMS items and how many more, so a red line stays readable."""
    listed = list(items)
    shown = separator.join(listed[:LISTED_PROBLEMS])
    hidden = len(listed) - LISTED_PROBLEMS
    return f"{shown} and {hidden} more" if hidden > 0 else shown


# --- environment ----------------------------------------------------------------------------------


def check_python(pyproject: Path, running: str = platform.python_version()) -> str:
    """The interpreter against pyproject's requires-python (what the lock was resolved for)."""
    required = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    if not SpecifierSet(required).contains(running, prereleases=True):
        raise CheckFailed(f"Python {running} runs cryptoml; {pyproject} requires {required}")
    return f"Python {running} (requires-python {required})"


def locked_versions(lock_text: str) -> dict[str, str]:
    """The pinned version of each distribution, keyed by its PEP 503 name.

    uv compiles the lock for one platform (Makefile `lock`), so its pins carry no environment markers.
    """
    pins = (_LOCK_PIN.match(line) for line in lock_text.splitlines())
    return {canonicalize_name(pin["name"]): pin["version"] for pin in pins if pin}


def installed_versions() -> dict[str, str]:
    """Installed distributions by PEP 503 name; the first on sys.path wins, as it does for imports."""
    versions: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        versions.setdefault(canonicalize_name(distribution.metadata["Name"]), distribution.version)
    return versions


def version_mismatches(locked: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """Each locked distribution that is missing or installed at another version; extra ones are fine."""
    return [
        f"{name} {version} locked, {installed.get(name, 'not')} installed"
        for name, version in sorted(locked.items())
        if installed.get(name) != version
    ]


def check_libraries(lock: Path, installed: Mapping[str, str]) -> str:
    """The venv against the lock: `make setup` reinstalls only when the lock changes, so a stray pip install goes unseen."""
    locked = locked_versions(lock.read_text())
    if not locked:
        raise CheckFailed(f"{lock} pins no `name==version` line")
    mismatches = version_mismatches(locked, installed)
    if mismatches:
        raise CheckFailed(f"{len(mismatches)} of {len(locked)} pins in {lock} differ: {first_few(mismatches)}")
    return f"all {len(locked)} pins of {lock} installed"


def check_params(params_file: Path) -> str:
    load_params(params_file)  # a ParamsError names the file and every offending key
    return f"{params_file} is valid"


# --- pipeline and DVC -----------------------------------------------------------------------------


def _dvc_json(args: list[str], root: Path) -> Any:
    """dvc's `--json` answer; a failure is red with dvc's own first paragraph (not its support banner)."""
    try:
        output = dvc([*args, "--json"], cwd=root)
    except RegistryError as exc:
        raise CheckFailed(str(exc).split("\n\n")[0]) from None
    return json.loads(output or "{}")


def describe_stage(stage: str, changes: list[Any]) -> str:
    """One entry of `dvc status --json`, e.g. "train: changed deps src/x.py (modified), params.yaml (cv.n_splits)"."""
    described = []
    for change in changes:
        if isinstance(change, str):  # "always changed", "changed checksum"
            described.append(change)
            continue
        for kind, states in change.items():
            # a file's state is a word; params.yaml's is {changed key: state}
            files = (f"{path} ({state if isinstance(state, str) else ', '.join(state)})" for path, state in states.items())
            described.append(f"{kind} {first_few(files)}")
    return f"{stage}: {' + '.join(described)}"


def check_dvc_status(root: Path) -> str:
    """Every stage's outputs match dvc.lock and its dependencies are unchanged (what `dvc repro` would run)."""
    status: dict[str, list[Any]] = _dvc_json(["status"], root)
    if status:
        stages = first_few((describe_stage(stage, changes) for stage, changes in status.items()), separator="; ")
        raise CheckFailed(f"{len(status)} stage(s) or .dvc file(s) not up to date: {stages}")
    return "the workspace matches dvc.lock"


def check_remote(root: Path) -> str:
    """The default remote answers `dvc status --cloud`; what it lacks is reported, not red.

    dvc asks the remote only about outputs in dvc.lock and .dvc files: a repository that tracks none is green unasked.
    """
    status: dict[str, str] = _dvc_json(["status", "--cloud"], root)
    if not status:
        return "reachable, in sync with the local cache"
    counts = Counter(status.values())
    return f"reachable; not in sync: {', '.join(f'{n} {state}' for state, n in sorted(counts.items()))} (new: dvc push)"


# --- the production model -------------------------------------------------------------------------


def check_artifacts(production_dir: Path) -> str:
    """Every file's size and sha256 against the manifest (load verifies them), and the metadata names that model."""
    model = ProductionEnsemble.load(production_dir, backend="native")
    if read_production_metadata(production_dir) is None:
        raise CheckFailed(f"{production_dir / METADATA_NAME} is missing or names another model than {model.model_sha256_}")
    return f"{model.model_sha256_}: files match {MANIFEST_NAME}, {METADATA_NAME} names it"


def check_feature_spec(production_dir: Path, current: str) -> str:
    """The spec hash the model recorded against the current FeatureManager's (read without loading the model)."""
    path = production_dir / MANIFEST_NAME
    try:
        model = Manifest.parse(path.read_bytes()).model
    except FileNotFoundError:
        raise CheckFailed(f"{path} missing: there is no production model") from None
    if model.feature_spec_hash != current:
        raise CheckFailed(
            f"the model was trained on feature spec {model.feature_spec_hash} (FeatureManager "
            f"{model.feature_manager_version}); the current FeatureManager has {current}"
        )
    return f"{current} (FeatureManager {model.feature_manager_version})"


def probe_features() -> pd.DataFrame:
    """PROBE_ROWS feature rows of fixed synthetic candles, made by the same FeatureManager as training."""
    manager = FeatureManager()
    bars = PROBE_ROWS + manager.warmup_rows
    end = PROBE_START + bars * pd.Timedelta(PROBE_TIMEFRAME)
    return manager.generate_features(simulate_candles(PROBE_START, end, PROBE_TIMEFRAME, PROBE_SEED))


def check_onnx_parity(production_dir: Path, probe: pd.DataFrame) -> str:
    """P(up) served by the ONNX graph against the native models' on the probe rows, within PARITY_TOLERANCE."""
    served = ProductionEnsemble.load(production_dir, backend="onnx")
    native = ProductionEnsemble.load(production_dir, backend="native")
    report = compare_up_probabilities(
        native.predict_proba(probe)[:, 1], served.predict_proba(probe)[:, 1], native.decision_threshold, PARITY_TOLERANCE
    )
    summary = (
        f"max |P(up) difference| {report.max_abs_difference:.1e} on {report.rows} probe rows "
        f"(tolerance {report.tolerance:g}; {report.decisions_differing} decision(s) differ)"
    )
    if not report.passed:
        raise CheckFailed(f"the ONNX graph disagrees with the native models: {summary}")
    return summary


# --- running and reporting ------------------------------------------------------------------------


def run_check(name: str, check: Callable[[], str]) -> CheckResult:
    """Green with the check's detail, or red with the reason it failed or could not run."""
    try:
        detail = check()
    except CheckFailed as exc:
        return CheckResult(name, False, str(exc), FIXES[name])
    except Exception as exc:  # a prerequisite is broken (no model, bad file, no dvc): report it, run the other checks
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}", FIXES[name])
    return CheckResult(name, True, detail, FIXES[name])


def run_checks(root: Path, remote: bool = False) -> list[CheckResult]:
    """Every check on the repository at `root`; the DVC remote only when asked (it needs the network)."""
    production_dir = root / paths.PRODUCTION_DIR
    checks: dict[str, Callable[[], str]] = {
        "python": lambda: check_python(root / PYPROJECT),
        "libraries": lambda: check_libraries(root / LOCK_FILE, installed_versions()),
        "params": lambda: check_params(root / paths.PARAMS),
        "dvc status": lambda: check_dvc_status(root),
        "artifacts": lambda: check_artifacts(production_dir),
        "feature spec": lambda: check_feature_spec(production_dir, FeatureManager().spec_hash()),
        "onnx parity": lambda: check_onnx_parity(production_dir, probe_features()),
    }
    if remote:
        checks["dvc remote"] = lambda: check_remote(root)
    return [run_check(name, check) for name, check in checks.items()]


def results_json(results: list[CheckResult]) -> dict[str, Any]:
    return {"ok": all(result.ok for result in results), "checks": [asdict(result) for result in results]}


def print_results(results: list[CheckResult], console: Console) -> None:
    """One ✔/✘ line per check (green/red on a terminal), the fix under each red one, then a summary."""
    width = max(len(result.name) for result in results)
    indent = " " * (width + 5)  # under the detail: mark, two spaces, name, two spaces
    for result in results:
        mark, style = ("✔", "green") if result.ok else ("✘", "red")
        detail = result.detail.replace("\n", "\n" + indent)
        console.print(Text.assemble((mark, style), "  ", (result.name.ljust(width), "bold"), "  ", detail), soft_wrap=True)
        if not result.ok:
            console.print(Text.assemble(indent, ("fix: ", "yellow"), result.fix), soft_wrap=True)
    red = [result.name for result in results if not result.ok]
    summary = f"{len(results) - len(red)} of {len(results)} checks passed"
    console.print(Text(f"{summary}; red: {', '.join(red)}" if red else summary, style="red" if red else "green"), soft_wrap=True)
