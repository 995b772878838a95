"""The package layering of docs/architecture.md, read from every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("candles", "features", "model", "release", "live")
EDGES = {"cryptoml.cli", "cryptoml.pipeline", "cryptoml.doctor"}


def cryptoml_imports(path: Path) -> set[str]:
    """Every cryptoml module that `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cryptoml":
            if node.module == "cryptoml":
                found.update(f"cryptoml.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "cryptoml")
    return found


def imports_of(package: str) -> dict[str, set[str]]:
    """{module: the cryptoml modules it imports} for every module of `package`."""
    root = SOURCE / "cryptoml" / package
    return {".".join(path.relative_to(SOURCE).with_suffix("").parts): cryptoml_imports(path) for path in sorted(root.glob("*.py"))}


def test_every_module_is_in_a_package_or_is_a_named_edge() -> None:
    top_level = {path.stem for path in (SOURCE / "cryptoml").glob("*.py")}
    assert top_level == {"__init__", "cli", "config", "console", "doctor", "io", "paths", "pipeline"}
    assert {path.name for path in (SOURCE / "cryptoml").iterdir() if path.is_dir() and path.name != "__pycache__"} == set(PACKAGES)


def test_the_features_import_nothing_else_from_cryptoml() -> None:
    outside = {module: {name for name in names if not name.startswith("cryptoml.features")} for module, names in imports_of("features").items()}
    assert outside == dict.fromkeys(outside, set())


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of the modules outside cryptoml that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found - {"cryptoml", "__future__"}


@pytest.mark.parametrize(
    ("module", "reaches"),
    [("kernels", {"cryptoml.features.spec"}), ("state", {"cryptoml.features.kernels", "cryptoml.features.spec"})],
)
def test_the_kernels_and_the_bots_feature_state_import_neither_numba_nor_pandas(module: str, reaches: set[str]) -> None:
    """One definition of each indicator: the manager compiles the kernels with numba, the bot's state runs them as
    they are (tests/test_state.py checks what importing it loads, in a fresh interpreter)."""
    path = SOURCE / "cryptoml" / "features" / f"{module}.py"
    assert cryptoml_imports(path) == reaches
    assert third_party_imports(path) & {"numba", "llvmlite", "pandas", "scipy", "sklearn", "lightgbm", "xgboost"} == set()


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_an_edge(package: str) -> None:
    offending = {module: names & EDGES for module, names in imports_of(package).items() if names & EDGES}
    assert offending == {}


def test_the_model_builds_on_no_release_code_and_on_live_serving_only() -> None:
    upward = {
        module: {name for name in names if name.startswith(("cryptoml.release", "cryptoml.live")) and name != "cryptoml.live.serving"}
        for module, names in imports_of("model").items()
    }
    assert upward == dict.fromkeys(upward, set())


def test_the_bots_import_reaches_only_the_spec_the_manifest_the_rule_and_the_paths() -> None:
    assert cryptoml_imports(SOURCE / "cryptoml/live/serving.py") == {
        "cryptoml.features.spec", "cryptoml.model.artifacts", "cryptoml.model.rule", "cryptoml.paths"
    }
    assert cryptoml_imports(SOURCE / "cryptoml/model/artifacts.py") == {"cryptoml.features.spec", "cryptoml.model.rule"}
    assert cryptoml_imports(SOURCE / "cryptoml/model/rule.py") == set()


FORBIDDEN_IN_THE_BOT = {"pandas", "numba", "llvmlite", "scipy", "sklearn", "lightgbm", "xgboost", "pydantic", "rich"}


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported by the module's own body (not inside a function, nor under `if TYPE_CHECKING`)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0] if not node.module.startswith("cryptoml") else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] if not alias.name.startswith("cryptoml") else alias.name for alias in node.names)
    return found - {"__future__"}


def test_the_bots_modules_reach_only_the_light_ones_and_no_heavy_library() -> None:
    """The bot's loop, feed and journal (tests/test_bot.py checks the whole command's imports in a fresh process)."""
    allowed = {
        "cryptoml.candles.timeframe", "cryptoml.candles.ccxt_client", "cryptoml.features.state", "cryptoml.live.feed",
        "cryptoml.live.journal", "cryptoml.live.serving", "cryptoml.model.artifacts", "cryptoml.model.rule",
    }
    for name in ("bot", "feed", "journal"):
        path = SOURCE / "cryptoml" / "live" / f"{name}.py"
        assert cryptoml_imports(path) <= allowed, name
        assert third_party_imports(path) & FORBIDDEN_IN_THE_BOT == set(), name
    assert "ccxt" not in module_level_imports(SOURCE / "cryptoml/live/feed.py"), "a replay must not load ccxt"
    for light in ("candles/timeframe.py", "candles/ccxt_client.py", "console.py"):
        assert module_level_imports(SOURCE / "cryptoml" / light) & FORBIDDEN_IN_THE_BOT == set(), light
    cryptoml_modules = {name for name in module_level_imports(SOURCE / "cryptoml/cli.py") if name.startswith("cryptoml")}
    assert cryptoml_modules <= {"cryptoml", "cryptoml.console"}, "cli imports the rest inside the commands"
