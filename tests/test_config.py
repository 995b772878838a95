"""params.yaml is validated at the start of a stage, and every error names its dotted key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cryptoml.config import ParamsError, load_params, parse_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture()
def raw() -> dict[str, Any]:
    return yaml.safe_load(REPO_PARAMS.read_text())


def with_value(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = changed
    for key in parents:
        node = node[key]
    node[leaf] = value
    return changed


def without(raw: dict[str, Any], dotted: str) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = changed
    for key in parents:
        node = node[key]
    del node[leaf]
    return changed


def test_repository_params_are_valid() -> None:
    params = load_params(REPO_PARAMS)
    assert params.data.source == "synthetic"
    assert params.data.start == pd.Timestamp("2023-01-01T00:00:00Z")
    assert params.label.threshold == pytest.approx(0.003)
    assert params.model.weights == {"lightgbm": 0.4, "xgboost": 0.4, "random_forest": 0.2}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.source", "ftp", "data.source"),
        ("data.timeframe", "1w", "data.timeframe"),
        ("data.start", "2023-01-01T00:00:00", "data.start: expected a UTC time"),
        ("data.start", "2023-01-01T00:00:00+09:00", "data.start: expected a UTC time"),
        ("data.start", "2026-01-01T00:00:00Z", "must be before data.end"),
        ("data.end", "2025-01-01T00:30:00Z", "data.end (2025-01-01 00:30:00+00:00) must be a 1h candle boundary"),
        ("label.horizon", 0, "label.horizon"),
        ("label.horizon", "1", "label.horizon"),
        ("label.threshold", -0.1, "label.threshold"),
        ("split.holdout", 1.5, "split.holdout"),
        ("split.holdout", "soon", "split.holdout"),
        ("split.holdout", "-3D", "split.holdout"),
        ("retrain.warmup_steps", 0, "retrain.warmup_steps"),
        ("retrain.every", "0D", "retrain.every"),
        ("retrain.every", "weekly", "retrain.every"),
        ("gate.champion_min_shared_rows", 0, "gate.champion_min_shared_rows"),
        ("model.weights", {"lightgbm": -1.0, "xgboost": 0.4, "random_forest": 0.2}, "model.weights"),
        ("model.weights", {"lightgbm": 0.0, "xgboost": 0.0, "random_forest": 0.0}, "model.weights"),
        ("model.weights", {"lightgbm": 0.4, "xgboost": 0.4, "random_forest": 0.2, "svm": 1.0}, "svm"),
        ("data.exchange.max_retries", -1, "data.exchange.max_retries"),
        ("data.surprise", 1, "data.surprise: unknown key"),
        ("gate.min_roc_auc", 1.2, "gate.min_roc_auc"),
        ("gate.max_log_loss_ratio", float("inf"), "gate.max_log_loss_ratio"),
        ("gate.max_brier_ratio", 0.0, "gate.max_brier_ratio"),
        ("gate.champion_tolerance", -0.01, "gate.champion_tolerance"),
        ("gate.min_f1", "0.6", "gate.min_f1"),
        ("gate.min_mcc", True, "gate.min_mcc"),
        ("costs.fee", -1.0e-3, "costs.fee"),
        ("costs.slippage", float("nan"), "costs.slippage"),
        ("trading.grid", {"low": 0.6, "high": 0.2, "step": 0.02}, "trading.grid.low (0.6) must be at most trading.grid.high (0.2)"),
        ("trading.grid", {"low": 0.1, "high": 0.9, "step": 0.001}, "trading.grid holds more than 200"),
        ("trading.min_hold", [1, 0], "trading.min_hold"),
        ("trading.min_hold", [], "trading.min_hold"),
        ("gate.min_rule_psr", 1.5, "gate.min_rule_psr"),
        ("gate.min_rule_return", -1.0, "gate.min_rule_return"),
    ],
)
@pytest.mark.fault
def test_invalid_values_name_the_key(raw: dict[str, Any], key: str, value: Any, message: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(with_value(raw, key, value))
    assert message in str(info.value)


@pytest.mark.parametrize("key", ["data", "data.start", "model.weights"])
@pytest.mark.fault
def test_missing_keys_are_named(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamsError, match=rf"{key}: missing required key"):
        parse_params(without(raw, key))


def test_holdout_as_duration(raw: dict[str, Any]) -> None:
    params = parse_params(with_value(raw, "split.holdout", "90D"))
    assert params.split.holdout_value == pd.Timedelta(days=90)


@pytest.mark.fault
def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(scalar)


@pytest.mark.fault
def test_float_spelling_trap_is_caught(raw: dict[str, Any]) -> None:
    """PyYAML reads 3e-3 (no dot) as the string '3e-3'; strict types refuse it instead of mis-reading it."""
    text = REPO_PARAMS.read_text().replace("threshold: 3.0e-3", "threshold: 3e-3")
    with pytest.raises(ParamsError, match="label.threshold"):
        parse_params(yaml.safe_load(text))
