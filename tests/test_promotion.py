"""The quality gate, and a promotion that neither a concurrent reader nor SIGKILL catches half-way."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from cryptoml.config import LabelParams
from cryptoml.live.serving import PARITY_TOLERANCE, ServingModel
from cryptoml.model.artifacts import MANIFEST_NAME, MODEL_NAMES, ModelArtifacts, read_artifacts
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.backtest import next_bar_returns, path_figures
from cryptoml.model.labels import make_labels
from cryptoml.model.rule import Holding, TradingRule
from cryptoml.model.training import score
from cryptoml.release import promotion
from cryptoml.release.promotion import (
    METADATA_NAME,
    ChampionComparison,
    GateParams,
    PromotionError,
    RuleRecord,
    compare_with_champion,
    decide,
    promote,
    read_production_metadata,
    with_trading_rule,
)
from tests.faults import manifest_digest, record_concurrent_loads, record_production_check
from tests.test_ensemble import make_data

DEFAULT = GateParams()
# The walk-forward rule's record of a challenger that made money after costs, with some evidence.
GOOD_RULE = RuleRecord(total_return=0.05, psr=0.8, production_rule_trades=True)
HOUR = pd.Timedelta(hours=1)

# --- the gate -----------------------------------------------------------------------------------

# 0.5 is exact in binary, so log losses at a ratio limit compare exactly.
BASELINES = {"class_prior": {"roc_auc": 0.5, "log_loss": 0.5, "brier": 0.25}}
CHAMPION = {"roc_auc": 0.6, "log_loss": 0.45}


def versus(champion: dict[str, float], challenger: dict[str, float]) -> ChampionComparison:
    """Challenger and champion scores on the rows both records share."""
    return ChampionComparison(rows=1000, start="2024-01-01T00:00:00+00:00", end="2024-02-11T15:00:00+00:00", challenger=challenger, champion=champion)


def skilled(**overrides: float) -> dict[str, float]:
    """Holdout metrics of a model with modest real skill: a little above chance, a little below the prior's log loss."""
    prior_log_loss = BASELINES["class_prior"]["log_loss"]
    prior_brier = BASELINES["class_prior"]["brier"]
    metrics = {"roc_auc": DEFAULT.min_roc_auc + 0.04, "log_loss": 0.99 * prior_log_loss, "brier": 0.99 * prior_brier, "f1": 0.3, "mcc": 0.08}
    return {**metrics, **overrides}


def failed_names(challenger: dict[str, float], champion: dict[str, float] | None = None, settings: GateParams = DEFAULT) -> list[str]:
    comparison = None if champion is None else versus(champion, challenger)
    return [check.name for check in decide(challenger, BASELINES, comparison, settings, rule=GOOD_RULE).checks if not check.passed]


def test_a_skilled_challenger_is_promoted_on_the_first_run() -> None:
    decision = decide(skilled(), BASELINES, None, DEFAULT, rule=GOOD_RULE)
    assert decision.promote
    assert [check.name for check in decision.checks] == ["min_roc_auc", "max_brier_ratio", "max_log_loss_ratio", "min_rule_return", "min_rule_psr"]
    assert all(check.passed for check in decision.checks)
    assert decision.reasons == [*(check.message for check in decision.checks), "no champion to compare with (first promotion): the absolute checks decide"]


@pytest.mark.parametrize(
    ("overrides", "failing"),
    [
        ({"roc_auc": np.nextafter(DEFAULT.min_roc_auc, 0.0)}, "min_roc_auc"),
        ({"brier": BASELINES["class_prior"]["brier"] * DEFAULT.max_brier_ratio}, "max_brier_ratio"),
        ({"log_loss": BASELINES["class_prior"]["log_loss"] * DEFAULT.max_log_loss_ratio}, "max_log_loss_ratio"),
    ],
    ids=["roc-auc-below-the-minimum", "brier-equal-to-the-prior", "log-loss-at-the-guard"],
)
def test_each_absolute_check_rejects_on_its_own(overrides: dict[str, float], failing: str) -> None:
    decision = decide(skilled(**overrides), BASELINES, None, DEFAULT, rule=GOOD_RULE)
    assert not decision.promote
    assert [check.name for check in decision.checks if not check.passed] == [failing]
    assert decision.reasons == [check.message for check in decision.checks if check.name == failing]


def test_the_absolute_limits_are_inclusive_for_roc_auc_and_strict_for_log_loss() -> None:
    at_limits = skilled(
        roc_auc=DEFAULT.min_roc_auc,
        log_loss=np.nextafter(BASELINES["class_prior"]["log_loss"] * DEFAULT.max_log_loss_ratio, 0.0),
        brier=np.nextafter(BASELINES["class_prior"]["brier"] * DEFAULT.max_brier_ratio, 0.0),
    )
    assert failed_names(at_limits) == []


def test_check_messages_state_value_sign_and_limit() -> None:
    decision = decide(skilled(roc_auc=0.51), BASELINES, None, DEFAULT, rule=GOOD_RULE)
    assert decision.reasons == [f"out-of-sample ROC AUC vs gate.min_roc_auc: 0.5100 < {DEFAULT.min_roc_auc:.4f}"]


def test_f1_is_not_part_of_the_default_gate() -> None:
    """The all-positive baseline beats real models on F1, so F1 is off unless params turn it on."""
    assert decide(skilled(f1=0.0, mcc=-0.1), BASELINES, None, DEFAULT, rule=GOOD_RULE).promote


@pytest.mark.parametrize(("setting", "metric", "floor"), [("min_f1", "f1", 0.6), ("min_mcc", "mcc", 0.05)])
def test_the_optional_floors_apply_when_set(setting: str, metric: str, floor: float) -> None:
    settings = GateParams(**{setting: floor})
    assert failed_names(skilled(**{metric: floor}), settings=settings) == []
    assert failed_names(skilled(**{metric: np.nextafter(floor, -1.0)}), settings=settings) == [setting]


def test_the_champion_checks_are_inclusive_at_the_tolerances() -> None:
    roc_limit = CHAMPION["roc_auc"] - DEFAULT.champion_tolerance
    log_loss_limit = CHAMPION["log_loss"] + DEFAULT.champion_log_loss_tolerance
    assert failed_names(skilled(roc_auc=roc_limit, log_loss=log_loss_limit), CHAMPION) == []
    assert failed_names(skilled(roc_auc=np.nextafter(roc_limit, 0.0), log_loss=log_loss_limit), CHAMPION) == ["champion_roc_auc"]
    assert failed_names(skilled(roc_auc=roc_limit, log_loss=np.nextafter(log_loss_limit, 1.0)), CHAMPION) == ["champion_log_loss"]


def test_a_challenger_that_passes_alone_is_rejected_when_clearly_worse_than_the_champion() -> None:
    challenger = skilled()
    assert decide(challenger, BASELINES, None, DEFAULT, rule=GOOD_RULE).promote
    champion = {"roc_auc": challenger["roc_auc"] + 0.05, "log_loss": 0.9 * challenger["log_loss"]}
    decision = decide(challenger, BASELINES, versus(champion, challenger), DEFAULT, rule=GOOD_RULE)
    assert not decision.promote
    assert [check.name for check in decision.checks if not check.passed] == ["champion_roc_auc", "champion_log_loss"]


def test_the_decision_record_is_plain_rounded_json() -> None:
    settings = GateParams(min_f1=0.6)
    decision = decide(
        skilled(roc_auc=0.5712345678, f1=0.25),
        BASELINES,
        None,
        settings,
        challenger_sha256="sha256:" + "a" * 64,
        champion_note="the champion was built for feature spec sha256:0000: not re-scored",
        rule=GOOD_RULE,
    )
    record = json.loads(json.dumps(decision.as_json(), allow_nan=False))
    assert record["decision"] == "rejected"
    assert record["challenger_sha256"] == "sha256:" + "a" * 64
    assert record["champion_sha256"] is None
    assert record["champion_note"].startswith("the champion was built for feature spec")
    assert record["gate"]["min_f1"] == settings.min_f1
    assert record["gate"]["min_mcc"] is None
    checks = {check["name"]: check for check in record["checks"]}
    assert list(checks) == ["min_roc_auc", "max_brier_ratio", "max_log_loss_ratio", "min_f1", "min_rule_return", "min_rule_psr"]
    assert checks["min_roc_auc"] == {
        "name": "min_roc_auc",
        "passed": True,
        "value": 0.571235,
        "limit": settings.min_roc_auc,
        "message": f"out-of-sample ROC AUC vs gate.min_roc_auc: 0.5712 >= {settings.min_roc_auc:.4f}",
    }
    assert checks["min_f1"]["passed"] is False
    assert record["reasons"] == [checks["min_f1"]["message"]]


def test_a_promoted_record_says_promoted_and_carries_the_champion() -> None:
    comparison = versus({"roc_auc": 0.5, "log_loss": 0.5}, skilled())
    record = decide(skilled(), BASELINES, comparison, DEFAULT, champion_sha256="sha256:" + "b" * 64, rule=GOOD_RULE).as_json()
    assert record["decision"] == "promoted"
    assert record["champion_sha256"] == "sha256:" + "b" * 64
    assert [check["name"] for check in record["checks"]][-4:] == ["champion_roc_auc", "champion_log_loss", "min_rule_return", "min_rule_psr"]
    assert record["champion_comparison"]["rows"] == 1000
    assert "on the 1000 rows both predicted out of sample" in record["checks"][-3]["message"]


@pytest.mark.parametrize(
    ("challenger", "baselines", "champion", "message"),
    [
        ({"log_loss": 0.4}, BASELINES, None, r"challenger metrics lack 'roc_auc'"),
        (skilled(), {"always_up": {"log_loss": 30.0}}, None, r"baselines lack 'class_prior'"),
        (skilled(), BASELINES, {"roc_auc": 0.6, "log_loss": math.nan}, r"champion metric 'log_loss' is nan"),
    ],
)
def test_missing_or_nan_metrics_are_errors_not_rejections(challenger: Any, baselines: Any, champion: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decide(challenger, baselines, None if champion is None else versus(champion, skilled()), DEFAULT, rule=GOOD_RULE)


# --- the champion comparison on stored out-of-sample predictions -------------------------------


# Close prices over every timestamp the records below use.
CLOSE = pd.Series(
    1e7 * np.exp(np.cumsum(np.random.default_rng(5).normal(0.0, 0.01, 4000))),
    index=pd.date_range("2024-01-01", periods=4000, freq="h", tz="UTC"),
)


def oos_record(start: str, rows: int, seed: int) -> pd.DataFrame:
    timestamps = pd.date_range(start, periods=rows, freq="h", tz="UTC")
    return pd.DataFrame({"timestamp": timestamps, "p_up": np.random.default_rng(seed).random(rows)})


def test_the_champion_is_compared_only_on_rows_both_predicted_out_of_sample() -> None:
    """The champion's record ends where its training rows go on: the challenger's later rows are never scored for it."""
    labels = pd.Series(np.random.default_rng(0).integers(0, 2, 3000), index=pd.date_range("2024-01-01", periods=3000, freq="h", tz="UTC"))
    champion = oos_record("2024-01-01", 1500, seed=1)  # its production fit then saw every row up to 2024-03-04
    challenger = oos_record("2024-01-21", 2000, seed=2)
    comparison, note = compare_with_champion(challenger, champion, labels, min_shared_rows=500, close=CLOSE, cost=1.2e-3, timeframe=HOUR)
    assert note is None and comparison is not None
    shared = pd.date_range(pd.Timestamp("2024-01-21", tz="UTC"), champion["timestamp"].iloc[-1], freq="h")
    assert (comparison.rows, comparison.start, comparison.end) == (len(shared), shared[0].isoformat(), shared[-1].isoformat())
    for name, record in (("challenger", challenger), ("champion", champion)):
        p_up = record.set_index("timestamp")["p_up"].loc[shared]
        expected = round(roc_auc_score(labels.loc[shared], p_up), 6)
        assert getattr(comparison, name)["roc_auc"] == expected, name
        assert getattr(comparison, name)["log_loss"] == round(log_loss(labels.loc[shared], p_up), 6), name


def test_identical_predictions_compare_equal_and_too_few_shared_rows_skip_the_comparison() -> None:
    labels = pd.Series(np.random.default_rng(0).integers(0, 2, 1000), index=pd.date_range("2024-01-01", periods=1000, freq="h", tz="UTC"))
    record = oos_record("2024-01-01", 1000, seed=1)
    comparison, _ = compare_with_champion(record, record.copy(), labels, min_shared_rows=500, close=CLOSE, cost=1.2e-3, timeframe=HOUR)
    assert comparison is not None and comparison.challenger == comparison.champion
    assert decide(skilled(), BASELINES, comparison, DEFAULT, rule=GOOD_RULE).promote
    comparison, note = compare_with_champion(record.iloc[600:], record, labels, min_shared_rows=500, close=CLOSE, cost=1.2e-3, timeframe=HOUR)
    assert comparison is None
    assert note == "the champion's stored out-of-sample predictions share 400 labelled row(s) with the challenger's, fewer than gate.champion_min_shared_rows=500"


# --- the economic checks -------------------------------------------------------------------------


def economic_failures(rule: RuleRecord, settings: GateParams = DEFAULT) -> list[str]:
    return [check.name for check in decide(skilled(), BASELINES, None, settings, rule=rule).checks if not check.passed]


def test_the_rule_must_have_made_money_after_costs_inclusive_at_the_floor() -> None:
    floor = DEFAULT.min_rule_return
    assert economic_failures(RuleRecord(total_return=floor, psr=0.9, production_rule_trades=True)) == []
    assert economic_failures(RuleRecord(total_return=np.nextafter(floor, -1.0), psr=0.9, production_rule_trades=True)) == ["min_rule_return"]


def test_the_rule_needs_a_probabilistic_sharpe_at_the_floor() -> None:
    floor = DEFAULT.min_rule_psr
    assert economic_failures(RuleRecord(total_return=0.1, psr=floor, production_rule_trades=True)) == []
    decision = decide(skilled(), BASELINES, None, DEFAULT, rule=RuleRecord(total_return=0.1, psr=np.nextafter(floor, 0.0), production_rule_trades=True))
    assert [check.name for check in decision.checks if not check.passed] == ["min_rule_psr"]
    assert decision.reasons[0].startswith("probabilistic Sharpe ratio (P(true Sharpe > 0)) of the walk-forward rule vs gate.min_rule_psr")


def test_a_statistically_sound_challenger_whose_rule_did_not_pay_is_promoted_with_the_flat_rule() -> None:
    """The floors decide whether the bot trades: keeping the champion would keep trading a signal the latest record
    says does not pay."""
    losing = RuleRecord(total_return=-0.05, psr=0.2, production_rule_trades=True)
    decision = decide(skilled(), BASELINES, None, DEFAULT, rule=losing)
    assert decision.promote and decision.flat_rule
    assert decision.as_json()["decision"] == "promoted" and decision.as_json()["trading"] == "flat"
    assert [check.name for check in decision.checks if not check.passed] == ["min_rule_return", "min_rule_psr"]
    assert decision.reasons[-1].startswith("promoted with the flat rule: the statistical checks passed")
    # A statistical failure rejects, whatever the economics: the champion and its rule stay.
    rejected = decide(skilled(roc_auc=0.5), BASELINES, None, DEFAULT, rule=losing)
    assert not rejected.promote and not rejected.flat_rule and rejected.as_json()["trading"] is None
    assert decide(skilled(), BASELINES, None, DEFAULT, rule=GOOD_RULE).as_json()["trading"] == "its rule"


def test_the_economic_floors_can_be_switched_off() -> None:
    off = GateParams(min_rule_return=None, min_rule_psr=None)
    decision = decide(skilled(), BASELINES, None, off, rule=RuleRecord(total_return=-0.3, psr=0.01, production_rule_trades=True))
    assert decision.promote and not decision.flat_rule and all(check.passed for check in decision.checks)


def test_a_challenger_whose_rule_stays_flat_skips_the_economic_floors_and_says_so() -> None:
    decision = decide(skilled(), BASELINES, None, DEFAULT, rule=RuleRecord(total_return=-0.2, psr=0.1, production_rule_trades=False))
    assert decision.promote and not decision.flat_rule
    assert not {"min_rule_return", "min_rule_psr"} & {check.name for check in decision.checks}
    assert "trading rule stays flat, so the economic floors do not apply: the bot will hold no position" in " ".join(decision.reasons)


def positioned(record: pd.DataFrame, positions: np.ndarray) -> pd.DataFrame:
    return record.assign(position=positions)


def test_the_champion_return_is_compared_on_the_shared_rows_only() -> None:
    """Each record's stored positions earn the same bars on the rows both hold; the rows only one record holds,
    however good or bad, do not count."""
    labels = pd.Series(np.random.default_rng(0).integers(0, 2, 3000), index=CLOSE.index[:3000])
    champion = oos_record("2024-01-01", 1500, seed=1)
    challenger = oos_record("2024-01-21", 2000, seed=2)
    shared = challenger["timestamp"].isin(champion["timestamp"])
    challenger.loc[shared, "p_up"] = champion["p_up"].to_numpy()[-shared.sum():]  # the same model on the shared rows
    # The champion held exactly the bars that went up: its opposite loses clearly.
    champion_positions = (next_bar_returns(pd.DatetimeIndex(champion["timestamp"]), CLOSE) > 0.0).astype(int)
    # The challenger holds the champion's positions on the shared rows, and is always long on its other rows.
    challenger_positions = np.ones(len(challenger), dtype=int)
    challenger_positions[shared.to_numpy()] = champion_positions[champion["timestamp"].isin(challenger["timestamp"]).to_numpy()]
    comparison, _ = compare_with_champion(
        positioned(challenger, challenger_positions), positioned(champion, champion_positions), labels, min_shared_rows=500,
        close=CLOSE, cost=1.2e-3, timeframe=HOUR,
    )
    assert comparison is not None and comparison.economic_rows == shared.sum()
    assert comparison.challenger["after_cost_return"] == comparison.champion["after_cost_return"]
    expected = path_figures(
        champion_positions[-shared.sum():], next_bar_returns(pd.DatetimeIndex(challenger["timestamp"][shared]), CLOSE), 1.2e-3, 8760.0
    ).figures["total_return"]
    assert comparison.champion["after_cost_return"] == round(expected, 6)
    worse = challenger_positions.copy()
    worse[shared.to_numpy()] = 1 - worse[shared.to_numpy()]  # the opposite of the champion on every shared row
    comparison, _ = compare_with_champion(
        positioned(challenger, worse), positioned(champion, champion_positions), labels, min_shared_rows=500,
        close=CLOSE, cost=1.2e-3, timeframe=HOUR,
    )
    assert comparison is not None
    limit = comparison.champion["after_cost_return"] - DEFAULT.champion_return_tolerance
    assert comparison.challenger["after_cost_return"] < limit, "this path loses clearly: the test can tell"
    decision = decide(skilled(), BASELINES, comparison, DEFAULT, rule=GOOD_RULE)
    assert [check.name for check in decision.checks if not check.passed] == ["champion_return"]
    assert not decision.promote, "the champion's rule earned more on the shared rows: it keeps trading"
    # A challenger promoted with the flat rule trades nothing: its return is not compared with the champion's.
    flat = decide(skilled(), BASELINES, comparison, DEFAULT, rule=RuleRecord(total_return=-0.1, psr=0.1, production_rule_trades=True))
    assert flat.promote and flat.flat_rule and "champion_return" not in {check.name for check in flat.checks}


def test_records_without_positions_compare_no_returns() -> None:
    labels = pd.Series(np.random.default_rng(0).integers(0, 2, 1000), index=CLOSE.index[:1000])
    record = oos_record("2024-01-01", 1000, seed=1)
    comparison, _ = compare_with_champion(positioned(record, np.ones(1000, dtype=int)), record, labels, min_shared_rows=500, close=CLOSE, cost=1.2e-3, timeframe=HOUR)
    assert comparison is not None and "after_cost_return" not in comparison.challenger and comparison.economic_rows == 0
    assert "champion_return" not in {check.name for check in decide(skilled(), BASELINES, comparison, DEFAULT, rule=GOOD_RULE).checks}


def markov_labels(n_rows: int = 5000, up_after_up: float = 0.45, up_after_other: float = 0.2, seed: int = 0) -> np.ndarray:
    """Labels where an up-bar makes the next one likelier, so "persistence" ranks better than chance."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n_rows, dtype=np.int64)
    for row in range(1, n_rows):
        labels[row] = rng.random() < (up_after_up if labels[row - 1] else up_after_other)
    return labels


def btc_labels(shared_data: Path) -> np.ndarray:
    candles = pd.read_csv(shared_data / "BTC_USDT_1h_2017-08-17_2020-02-01.csv", parse_dates=["timestamp"])
    close = candles.set_index("timestamp")["close"]
    return make_labels(close, LabelParams().horizon, LabelParams().threshold).to_numpy()


def baseline_metrics(labels: np.ndarray, holdout_fraction: float = 0.2) -> dict[str, dict[str, float]]:
    """Holdout metrics of the three baselines, fitted on the rows before the holdout."""
    start = int(len(labels) * (1 - holdout_fraction))
    train, holdout = labels[:start], labels[start:]
    previous = labels[start - 1 : -1].astype(np.float64)
    probabilities = {
        "class_prior": np.full(len(holdout), train.mean()),
        "always_up": np.ones(len(holdout)),
        "persistence": previous,
    }
    return {name: score(holdout, proba, threshold=0.5) for name, proba in probabilities.items()}


@pytest.mark.parametrize("source", ["seeded-markov", "btc-1h"])
def test_no_baseline_passes_the_default_gate(source: str, request: pytest.FixtureRequest) -> None:
    labels = markov_labels() if source == "seeded-markov" else btc_labels(request.getfixturevalue("shared_data"))
    baselines = baseline_metrics(labels)
    for name, metrics in baselines.items():
        decision = decide(metrics, baselines, None, DEFAULT, rule=GOOD_RULE)
        print(source, name, {key: round(metrics[key], 4) for key in ("roc_auc", "log_loss", "f1")}, decision.reasons)
        assert not decision.promote, name
        assert "max_brier_ratio" in [check.name for check in decision.checks if not check.passed], name
    if source == "seeded-markov":
        assert baselines["persistence"]["roc_auc"] >= DEFAULT.min_roc_auc, "persistence should rank above chance here"


def test_a_model_with_real_skill_passes_where_the_baselines_fail() -> None:
    """Calibrated P(up | previous label) learnt on the training rows: the skill persistence only hints at.

    Its P(up) stays below 0.5, so its F1 at 0.5 is far below the all-positive baseline's: F1 would reject it.
    """
    labels = markov_labels()
    start = int(len(labels) * 0.8)
    train, holdout, previous = labels[:start], labels[start:], labels[start - 1 : -1]
    up_after = {state: train[1:][train[:-1] == state].mean() for state in (0, 1)}
    metrics = score(holdout, np.where(previous == 1, up_after[1], up_after[0]), threshold=0.5)
    baselines = baseline_metrics(labels)
    decision = decide(metrics, baselines, None, DEFAULT, rule=GOOD_RULE)
    assert decision.promote, decision.reasons
    assert metrics["f1"] < baselines["always_up"]["f1"]


# --- promotion ----------------------------------------------------------------------------------

SMALL_PARAMS = {name: {"n_estimators": 5} for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def challengers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small saved models (models/training directories) fitted on different data, so no two share a file."""
    root = tmp_path_factory.mktemp("training")
    directories = []
    for seed in range(3):
        directory = root / f"model-{seed}"
        ProductionEnsemble(model_params=SMALL_PARAMS).fit(*make_data(seed=seed)).save(directory, version_info={"seed": seed})
        directories.append(directory)
    names = [set(read_artifacts(directory).files) for directory in directories]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(names, 2))
    return directories


def metadata_for(training_dir: Path) -> dict[str, Any]:
    return {"status": "production", "source": training_dir.name}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_promoted_model_predicts_like_the_challenger(challengers: list[Path], tmp_path: Path) -> None:
    production = tmp_path / "production"
    model_sha256 = promote(challengers[0], production, metadata_for(challengers[0]))
    challenger = ProductionEnsemble.load(challengers[0])
    served = ProductionEnsemble.load(production)
    assert model_sha256 == served.model_sha256_ == challenger.model_sha256_
    X, _ = make_data(seed=5)
    np.testing.assert_array_equal(served.predict_proba(X), challenger.predict_proba(X))
    assert set(snapshot(production)) == {MANIFEST_NAME, METADATA_NAME, *read_artifacts(challengers[0]).files}
    assert (production / MANIFEST_NAME).read_bytes() == (challengers[0] / MANIFEST_NAME).read_bytes()
    assert read_production_metadata(production) == {**metadata_for(challengers[0]), "model_sha256": model_sha256}


def test_a_model_promoted_with_the_flat_rule_serves_the_same_graph_and_never_trades(challengers: list[Path], tmp_path: Path) -> None:
    production = tmp_path / "production"
    challenger = ProductionEnsemble.load(challengers[0])
    assert challenger.rule.trades
    model_sha256 = promote(challengers[0], production, metadata_for(challengers[0]), trading_rule=TradingRule.flat())
    assert model_sha256 == with_trading_rule(read_artifacts(challengers[0]), TradingRule.flat()).model_sha256 != challenger.model_sha256_
    served = ServingModel.load(production)
    assert served.model_sha256 == model_sha256 and served.rule == TradingRule.flat()
    X, _ = make_data(seed=5)
    np.testing.assert_allclose(served.predict_proba(X), challenger.predict_proba(X), rtol=0, atol=PARITY_TOLERANCE)
    assert served.next_holding(1.0, Holding()) == Holding()
    assert set(snapshot(production)) == {MANIFEST_NAME, METADATA_NAME, *read_artifacts(challengers[0]).files}  # the same files
    assert read_production_metadata(production) == {**metadata_for(challengers[0]), "model_sha256": model_sha256}


def test_the_previous_models_files_stay_until_the_next_promotion(challengers: list[Path], tmp_path: Path) -> None:
    production = tmp_path / "production"
    files = [set(read_artifacts(directory).files) for directory in challengers]
    for current, previous in [(0, None), (1, 0), (2, 1)]:
        promote(challengers[current], production, metadata_for(challengers[current]))
        kept = files[current] | (files[previous] if previous is not None else set())
        assert set(snapshot(production)) == {MANIFEST_NAME, METADATA_NAME, *kept}


@pytest.mark.parametrize("history", [[0, 0], [0, 1, 1]], ids=["first-model-twice", "second-model-twice"])
def test_promoting_the_served_model_again_changes_no_byte(history: list[int], challengers: list[Path], tmp_path: Path) -> None:
    production = tmp_path / "production"
    for index in history[:-1]:
        promote(challengers[index], production, metadata_for(challengers[index]))
    before = snapshot(production)
    promote(challengers[history[-1]], production, metadata_for(challengers[history[-1]]))
    assert snapshot(production) == before


@pytest.fixture
def production_with_model(challengers: list[Path], tmp_path: Path) -> Path:
    production = tmp_path / "production"
    promote(challengers[0], production, metadata_for(challengers[0]))
    return production


@pytest.mark.fault
def test_a_challenger_that_does_not_load_leaves_production_untouched(challengers: list[Path], production_with_model: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(challengers[1], tmp_path / "broken"))
    (broken / next(iter(read_artifacts(broken).files))).write_bytes(b"not a model")
    before = snapshot(production_with_model)
    with pytest.raises(PromotionError, match=r"the challenger cannot be promoted: .*lightgbm-[0-9a-f]{16}\.txt: 11 bytes"):
        promote(broken, production_with_model, metadata_for(broken))
    assert snapshot(production_with_model) == before


@pytest.mark.fault
def test_a_challenger_replaced_between_its_check_and_its_copy_is_refused(
    challengers: list[Path], production_with_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes copied must be those of the model that was loaded (a training run must not race a promotion)."""
    monkeypatch.setattr(promotion, "read_artifacts", lambda directory: read_artifacts(challengers[2]))
    before = snapshot(production_with_model)
    with pytest.raises(PromotionError, match=r"model-1 changed while it was being promoted"):
        promote(challengers[1], production_with_model, metadata_for(challengers[1]))
    assert snapshot(production_with_model) == before


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"model_sha256": "sha256:" + "0" * 64}, r"metadata\['model_sha256'\] is 'sha256:0+' but the model in .* is sha256:"),
        ({"created_at": pd.Timestamp("2025-01-01")}, r"metadata must be plain JSON data"),
        ({"score": math.nan}, r"metadata must be plain JSON data"),
    ],
)
@pytest.mark.fault
def test_bad_metadata_is_refused_before_production_changes(
    metadata: dict[str, Any], message: str, challengers: list[Path], production_with_model: Path
) -> None:
    before = snapshot(production_with_model)
    with pytest.raises(PromotionError, match=message):
        promote(challengers[1], production_with_model, metadata)
    assert snapshot(production_with_model) == before


def test_production_metadata_is_returned_only_for_the_served_model(challengers: list[Path], production_with_model: Path, tmp_path: Path) -> None:
    assert read_production_metadata(tmp_path / "nothing-promoted-yet") is None
    served = read_production_metadata(production_with_model)
    assert served is not None and served["model_sha256"] == read_artifacts(challengers[0]).model_sha256
    # A promotion of another model killed after writing its metadata, before swapping the manifest:
    ahead = {**metadata_for(challengers[1]), "model_sha256": read_artifacts(challengers[1]).model_sha256}
    (production_with_model / METADATA_NAME).write_text(json.dumps(ahead))
    assert read_production_metadata(production_with_model) is None


@pytest.mark.fault
def test_unreadable_production_metadata_is_an_error(production_with_model: Path) -> None:
    (production_with_model / METADATA_NAME).write_text("{not json")
    with pytest.raises(PromotionError, match=r"production_model_metadata.json: not valid JSON"):
        read_production_metadata(production_with_model)


# --- concurrency and crashes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def processes() -> BaseContext:
    """A fork server with the libraries imported once: children start in milliseconds, none inherits OpenMP state."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cryptoml.release.promotion", __name__])
    return context


def _load_in_a_loop(production: Path, ready: Any, stop: Any, total_loads: Any, results: Any) -> None:
    """Reader process: load and predict until told to stop; report loads, failures and the models seen."""
    X, _ = make_data(n_rows=4)
    loads, failures, seen = 0, [], set()
    while not stop.is_set():
        try:
            model = ProductionEnsemble.load(production)
            model.predict_proba(X)
        except Exception as exc:  # any failure counts, whatever its type
            failures.append(repr(exc))
        else:
            loads += 1
            seen.add(model.model_sha256_)
            with total_loads.get_lock():
                total_loads.value += 1
        ready.set()
    results.put((loads, failures, sorted(seen)))


def readers_during_promotions(
    processes: BaseContext, challengers: list[Path], production: Path, min_promotions: int, min_loads: int
) -> tuple[int, list[str], set[str], int]:
    """Two readers load production in a loop while this process promotes the challengers in turn.

    Three models in rotation, so each promotion also removes the files of the model two back.
    Returns total loads, failures, model hashes the readers saw, and the number of promotions.
    """
    promote(challengers[0], production, metadata_for(challengers[0]))
    stop, total_loads, results = processes.Event(), processes.Value("l", 0), processes.Queue()
    readiness = [processes.Event() for _ in range(2)]
    readers = [processes.Process(target=_load_in_a_loop, args=(production, ready, stop, total_loads, results)) for ready in readiness]
    for reader in readers:
        reader.start()
    try:
        for ready in readiness:
            assert ready.wait(timeout=60), "a reader did not start"
        promotions = 0
        rotation = itertools.cycle(challengers[1:] + challengers[:1])
        while promotions < min_promotions or total_loads.value < min_loads:
            training_dir = next(rotation)
            promote(training_dir, production, metadata_for(training_dir))
            promotions += 1
        stop.set()
        reports = [results.get(timeout=60) for _ in readers]
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=60)
            if reader.is_alive():
                reader.kill()
    loads = sum(report[0] for report in reports)
    failures = [failure for report in reports for failure in report[1]]
    seen = {model_sha256 for report in reports for model_sha256 in report[2]}
    print(f"{loads} loads by {len(readers)} readers during {promotions} promotions: {len(failures)} failures, {len(seen)} models seen")
    record_concurrent_loads(loads, len(failures))
    record_production_check(production, before=None, new=[manifest_digest((training_dir / MANIFEST_NAME).read_bytes())])
    return loads, failures, seen, promotions


@pytest.mark.fault
def test_readers_never_see_a_partial_model(processes: BaseContext, challengers: list[Path], tmp_path: Path) -> None:
    loads, failures, seen, _ = readers_during_promotions(processes, challengers, tmp_path / "production", 30, 0)
    assert failures == []
    assert loads > 0
    assert len(seen) >= 2, "the readers should have loaded models from before and after promotions"


@pytest.mark.slow
@pytest.mark.fault
def test_readers_never_see_a_partial_model_over_a_thousand_loads(processes: BaseContext, challengers: list[Path], tmp_path: Path) -> None:
    loads, failures, seen, _ = readers_during_promotions(processes, challengers, tmp_path / "production", 100, 1000)
    assert failures == []
    assert loads >= 1000
    assert seen == {read_artifacts(directory).model_sha256 for directory in challengers}


# The file-system calls a promotion makes; a kill between any two of them is a distinct crash point.
_WATCHED_CALLS: tuple[tuple[Any, str], ...] = ((os, "replace"), (os, "fsync"), (os, "unlink"), (Path, "write_bytes"))
_HANG_SECONDS = 120


def _watch_io(patch: Callable[[Any, str, Any], Any], before_call: Callable[[int, str], None]) -> None:
    """Route the watched calls through before_call(call number, description such as "replace ensemble.json")."""
    numbers = itertools.count()
    for owner, name in _WATCHED_CALLS:

        def watched(*args: Any, _original: Any = getattr(owner, name), _name: str = name, **kwargs: Any) -> Any:
            target = args[1] if _name == "replace" else args[0]
            before_call(next(numbers), _name if _name == "fsync" else f"{_name} {Path(target).name}")
            return _original(*args, **kwargs)

        patch(owner, name, watched)


def _promote_hanging_before_call(training: Path, production: Path, stop_at: int, reached: Any) -> None:
    """Child process: promote, but hang before file-system call number `stop_at` so the parent kills it there."""

    def hang_at(number: int, description: str) -> None:
        if number == stop_at:
            reached.set()
            time.sleep(_HANG_SECONDS)

    _watch_io(setattr, hang_at)
    promote(training, production, metadata_for(training))


def _promote_announcing_start(training: Path, production: Path, started: Any) -> None:
    started.set()
    promote(training, production, metadata_for(training))


# The crashing promotion installs challenger 2 over 1, which replaced 0: it has files to write and to remove.
CRASHING = 2


@pytest.fixture
def crash_site(challengers: list[Path], tmp_path: Path) -> Callable[[], Path]:
    """Fresh copies of a production directory where challenger 1 replaced challenger 0."""
    template = tmp_path / "template"
    for index in range(CRASHING):
        promote(challengers[index], template, metadata_for(challengers[index]))
    copies = itertools.count()
    return lambda: Path(shutil.copytree(template, tmp_path / f"production-{next(copies)}"))


def promotion_calls(challengers: list[Path], crash_site: Callable[[], Path], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The watched calls, in order, of the crashing promotion (the same in every run)."""
    calls: list[str] = []
    with monkeypatch.context() as patch:
        _watch_io(patch.setattr, lambda number, description: calls.append(description))
        promote(challengers[CRASHING], crash_site(), metadata_for(challengers[CRASHING]))
    return calls


def assert_old_or_new_model(production: Path, old: dict[str, bytes], new: ModelArtifacts) -> str:
    """The directory loads and serves the old model byte for byte, or exactly the new one; says which."""
    record_production_check(production, before=manifest_digest(old[MANIFEST_NAME]), new=[manifest_digest(new.manifest)])
    served = read_artifacts(production)
    if served.manifest == old[MANIFEST_NAME]:
        assert all(data == old[name] for name, data in served.files.items())
        outcome = "old"
    else:
        assert (served.manifest, dict(served.files)) == (new.manifest, dict(new.files))
        outcome = "new"
    metadata = read_production_metadata(production)
    assert metadata is None or metadata["model_sha256"] == served.model_sha256
    return outcome


def assert_recovers(production: Path, challengers: list[Path], clean: dict[str, bytes]) -> None:
    """Re-running the promotion after the crash gives the directory a clean promotion gives.

    Except after a kill during the clean-up: the re-run is then a repeat of the served model, which
    removes no component, so the oldest model's files wait for the next promotion.
    """
    promote(challengers[CRASHING], production, metadata_for(challengers[CRASHING]))
    after = snapshot(production)
    assert {name: after[name] for name in clean} == clean
    assert set(after) - set(clean) <= set(read_artifacts(challengers[0]).files)


@pytest.fixture
def clean_result(challengers: list[Path], crash_site: Callable[[], Path]) -> dict[str, bytes]:
    production = crash_site()
    promote(challengers[CRASHING], production, metadata_for(challengers[CRASHING]))
    return snapshot(production)


@pytest.mark.fault
def test_a_promotion_killed_between_any_two_file_operations_leaves_one_whole_model(
    processes: BaseContext,
    challengers: list[Path],
    crash_site: Callable[[], Path],
    clean_result: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = promotion_calls(challengers, crash_site, monkeypatch)
    new = read_artifacts(challengers[CRASHING])
    outcomes = []
    for stop_at in range(len(calls)):
        production = crash_site()
        old = snapshot(production)
        reached = processes.Event()
        child = processes.Process(target=_promote_hanging_before_call, args=(challengers[CRASHING], production, stop_at, reached))
        child.start()
        try:
            while not reached.wait(timeout=0.05):
                assert child.is_alive(), f"the promotion ended (exit code {child.exitcode}) before call {stop_at}"
        finally:
            child.kill()
            child.join()
        outcomes.append(assert_old_or_new_model(production, old, new))
        assert_recovers(production, challengers, clean_result)
    print(f"killed before each of {len(calls)} calls {calls}: outcomes {outcomes}")
    switch = calls.index(f"replace {MANIFEST_NAME}")
    assert outcomes == ["old"] * (switch + 1) + ["new"] * (len(calls) - switch - 1)
    assert any(call.startswith("unlink") for call in calls[switch:]), "the crashing promotion should remove files"


@pytest.mark.slow
@pytest.mark.fault
def test_a_promotion_killed_at_random_moments_leaves_one_whole_model(
    processes: BaseContext, challengers: list[Path], crash_site: Callable[[], Path], clean_result: dict[str, bytes]
) -> None:
    old, new = snapshot(crash_site()), read_artifacts(challengers[CRASHING])

    def run_child(kill_after: float | None) -> Path:
        """Promote in a child process, killed `kill_after` seconds after it starts (None: let it finish)."""
        production = crash_site()
        started = processes.Event()
        child = processes.Process(target=_promote_announcing_start, args=(challengers[CRASHING], production, started))
        child.start()
        try:
            assert started.wait(timeout=60), "the child did not start"
            child.join(timeout=kill_after)
        finally:
            child.kill()
            child.join()
        return production

    started_at = time.perf_counter()
    run_child(kill_after=None)
    window = time.perf_counter() - started_at  # a promotion in a child, start-up and exit included
    rng = random.Random(20240601)
    outcomes = []
    for _ in range(20):
        production = run_child(kill_after=rng.uniform(0, window))
        outcomes.append(assert_old_or_new_model(production, old, new))
        assert_recovers(production, challengers, clean_result)
    print(f"20 kills within the {window:.3f} s a child promotion takes: outcomes {outcomes}")
