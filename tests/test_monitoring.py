"""`cryptoml monitor`: PSI drift against the reference stored with the model, live scores, model age, output, alerts."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cryptoml import paths
from cryptoml.candles import synthetic
from cryptoml.candles.synthetic import simulate_candles
from cryptoml.cli import app
from cryptoml.config import DEFAULT_DRIFT_FEATURES, LiveRules, MonitorParams, ParamsError, load_params
from cryptoml.features.manager import LIVE_WINDOW, FeatureManager
from cryptoml.features.spec import FEATURE_NAMES
from cryptoml.io import dump_json
from cryptoml.live.alerts import WEBHOOK_ENV
from cryptoml.live.monitoring import (
    EXIT_CODES,
    drift_checks,
    feature_drift,
    feature_reference_of,
    live_checks,
    parse_now,
    run_monitor,
)
from cryptoml.live.predict import StaleModelError, run_predict
from cryptoml.model.drift import PSI_EPSILON, bin_fractions, feature_reference, population_stability_index, reference_bins
from cryptoml.pipeline import TRAIN_PARAM_SECTIONS, run_evaluate, run_features, run_fetch, run_promote, run_train
from cryptoml.release.promotion import METADATA_NAME
from tests.repo import FAST_TRAINING, REPO_ROOT
from tests.test_cli import write_params
from tests.test_serving import write_candles_csv
from tests.webhook import webhook_receiver

runner = CliRunner()
HOUR = pd.Timedelta(hours=1)
PRICES = ["open", "high", "low", "close"]
# Features without a price or volume scale: the same market process gives them the same distribution any month.
SCALE_FREE = DEFAULT_DRIFT_FEATURES
# The gate is relaxed so that the small, weak FAST_TRAINING model is promoted and can be monitored.
WORKSPACE_PARAMS = {**FAST_TRAINING, "gate.min_roc_auc": 0.0, "gate.max_brier_ratio": None, "gate.max_log_loss_ratio": None}


# --- PSI and the reference bins ----------------------------------------------------------------


def test_psi_of_the_reference_sample_itself_is_zero_and_small_for_a_resample() -> None:
    rng = np.random.default_rng(0)
    sample = rng.normal(size=20_000)
    edges, fractions = reference_bins(sample)
    assert len(edges) == 9 and sum(fractions) == pytest.approx(1.0)
    assert population_stability_index(edges, fractions, sample) == 0.0
    assert population_stability_index(edges, fractions, rng.normal(size=20_000)) < 0.01


def test_psi_of_a_known_shift_matches_the_hand_computed_value() -> None:
    # Reference: half the rows <= 0, half above; recent: three quarters <= 0.
    recent = [-2.0, -1.0, 0.0, 1.0]
    expected = (0.75 - 0.5) * math.log(0.75 / 0.5) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert population_stability_index([0.0], [0.5, 0.5], recent) == pytest.approx(expected, rel=1e-12)


def test_an_empty_bin_counts_as_epsilon_so_the_psi_stays_finite() -> None:
    psi = population_stability_index([0.0], [0.5, 0.5], [1.0, 2.0])
    expected = (PSI_EPSILON - 0.5) * math.log(PSI_EPSILON / 0.5) + 0.5 * math.log(1.0 / 0.5)
    assert psi == pytest.approx(expected, rel=1e-12)


def test_repeated_values_give_fewer_bins_that_still_hold_every_row() -> None:
    values = np.concatenate([np.zeros(600), np.linspace(1.0, 2.0, 400)])
    edges, fractions = reference_bins(values)
    assert edges == sorted(set(edges)) and len(edges) < 9
    assert fractions[0] == pytest.approx(0.6)  # the bin (-inf, 0] holds every zero
    assert population_stability_index(edges, fractions, values) == 0.0


@pytest.mark.fault
@pytest.mark.parametrize(
    ("edges", "fractions", "values", "message"),
    [
        ([0.0], [1.0], [1.0], "1 edge\\(s\\) needs 2 fractions, got 1"),
        ([0.0], [0.5, 0.5], [], "non-empty"),
        ([0.0], [0.5, 0.5], [1.0, float("nan")], "position 1 is nan"),
    ],
)
def test_psi_refuses_bad_input_naming_it(edges: list[float], fractions: list[float], values: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        population_stability_index(edges, fractions, values)


def test_the_feature_reference_is_deterministic_and_covers_every_feature() -> None:
    candles = simulate_candles(pd.Timestamp("2024-01-01T00:00Z"), pd.Timestamp("2024-02-01T00:00Z"))
    features = FeatureManager().generate_features(candles)
    reference = feature_reference(features)
    assert dump_json(reference) == dump_json(feature_reference(features.copy()))
    assert tuple(reference["features"]) == FEATURE_NAMES and reference["rows"] == len(features)
    for name, bins in reference["features"].items():
        assert bins["fractions"] == bin_fractions(bins["edges"], features[name]).tolist(), name


# --- drift on synthetic markets ------------------------------------------------------------------


def scale_free_drift(history: pd.DataFrame, recent: pd.DataFrame, split: pd.Timestamp) -> dict[str, str]:
    """The drift level of each scale-free feature of `recent` after `split`, against those of `history` before it."""
    features = FeatureManager()
    before = features.generate_features(history)
    after = features.generate_features(recent)
    reference = feature_reference(before[before.index < split][list(SCALE_FREE)])["features"]
    checks = drift_checks(feature_drift(reference, after[after.index >= split]), MonitorParams())
    return {check.name: check.level for check in checks}


def test_drift_is_not_reported_on_an_unshifted_continuation_and_is_on_tripled_volatility(monkeypatch: pytest.MonkeyPatch) -> None:
    start, split, end = pd.Timestamp("2023-01-01T00:00Z"), pd.Timestamp("2024-01-01T00:00Z"), pd.Timestamp("2024-03-01T00:00Z")
    market = simulate_candles(start, end)
    assert scale_free_drift(market, market, split) == dict.fromkeys(SCALE_FREE, "ok")
    monkeypatch.setattr(synthetic, "SIGMA_HOURLY", 3 * synthetic.SIGMA_HOURLY)
    assert scale_free_drift(market, simulate_candles(start, end), split)["returns_1"] == "alert"


def test_drift_levels_follow_the_params() -> None:
    settings = MonitorParams(psi_warn=0.1, psi_alert=0.25)
    values = pd.DataFrame({"returns_1": [-3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]})
    drift = feature_drift({"returns_1": {"edges": [0.0], "fractions": [0.5, 0.5]}}, values)
    psi = drift[0].psi
    assert 0.1 <= psi < 0.25
    assert drift_checks(drift, settings)[0].level == "warn"
    assert drift_checks(drift, MonitorParams(psi_warn=psi / 2, psi_alert=psi))[0].level == "alert"
    assert drift_checks(drift, MonitorParams(psi_warn=psi * 2, psi_alert=psi * 3))[0].level == "ok"
    not_watched = drift_checks(drift, MonitorParams(psi_warn=psi / 2, psi_alert=psi, drift_features=["rsi_14"]))[0]
    assert (not_watched.level, not_watched.limit) == ("info", None)
    assert "not in monitor.drift_features" in not_watched.message


# --- live rules ------------------------------------------------------------------------------------


def test_a_failed_live_rule_alerts_and_a_rule_without_enough_rows_is_skipped() -> None:
    rules = LiveRules(min_roc_auc=0.52, max_log_loss_ratio=1.02, min_f1=0.6)
    metrics = {"roc_auc": 0.51, "log_loss": 0.5, "f1": 0.61}
    checks = {check.name: check for check in live_checks(metrics, prior_log_loss=0.5, rules=rules, skipped_because="")}
    assert {name: check.level for name, check in checks.items()} == {"min_roc_auc": "alert", "max_log_loss_ratio": "ok", "min_f1": "ok"}
    assert checks["min_roc_auc"].message == "live ROC AUC: 0.5100 < monitor.live.min_roc_auc 0.52"
    skipped = live_checks(None, None, LiveRules(), skipped_because="12 labelled row(s) < monitor.min_rows=200")
    assert [(check.name, check.level) for check in skipped] == [("min_roc_auc", "skipped"), ("max_log_loss_ratio", "skipped")]
    assert all("skipped (12 labelled row(s) < monitor.min_rows=200)" in check.message for check in skipped)


@pytest.mark.fault
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda features: features.pop("zscore"), r"lacks feature\(s\) \['zscore'\]"),
        (lambda features: features["close"]["fractions"].pop(), r"features.close needs .* got 9 edge\(s\) and 9 fraction\(s\)"),
        (lambda features: features["rsi_14"]["edges"].reverse(), "features.rsi_14 needs strictly increasing edges"),
    ],
)
def test_a_damaged_reference_is_refused_naming_the_feature(damage: Callable[[dict], object], message: str) -> None:
    rng = np.random.default_rng(1)
    metadata = {"feature_reference": feature_reference(pd.DataFrame(rng.normal(size=(500, 12)), columns=list(FEATURE_NAMES)))}
    damage(metadata["feature_reference"]["features"])
    with pytest.raises(ValueError, match=message):
        feature_reference_of(metadata, "the metadata")


@pytest.mark.fault
@pytest.mark.parametrize("value", ["", "yesterday"])
def test_an_unreadable_now_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=f"--now: expected an ISO-8601 UTC time .*, got {value!r}"):
        parse_now(value)
    assert parse_now("2025-01-06T09:00:00+09:00") == pd.Timestamp("2025-01-06T00:00:00Z")


@pytest.mark.fault
def test_monitor_params_are_validated_naming_the_key(tmp_path: Path) -> None:
    write_params(tmp_path, {"monitor.psi_warn": 0.3})
    with pytest.raises(ParamsError, match=r"monitor.psi_warn \(0.3\) must be below monitor.psi_alert \(0.25\)"):
        load_params(tmp_path / "params.yaml")
    write_params(tmp_path, {"monitor.live.min_auc": 0.5})
    with pytest.raises(ParamsError, match="monitor.live.min_auc: unknown key"):
        load_params(tmp_path / "params.yaml")
    write_params(tmp_path, {"monitor.drift_features": ["close", "rsi"]})
    with pytest.raises(ParamsError, match=r"monitor.drift_features: .*unknown feature\(s\) \['rsi'\]"):
        load_params(tmp_path / "params.yaml")


# --- a promoted model, monitored end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch, features, train, evaluate, promote on three months of synthetic candles (a few seconds)."""
    root = tmp_path_factory.mktemp("monitor")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        write_params(root, WORKSPACE_PARAMS)
        params = load_params(paths.PARAMS)
        run_fetch(params)
        run_features()
        run_train(params)
        run_evaluate(params)
        assert run_promote(params).promote
    return root


@pytest.fixture
def in_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workspace)
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    write_params(workspace, WORKSPACE_PARAMS)  # undo what an earlier test set
    return workspace


def production_metadata() -> dict[str, object]:
    return json.loads(paths.PRODUCTION_METADATA.read_text())


def training_end() -> pd.Timestamp:
    return pd.Timestamp(production_metadata()["training_info"]["data_end"])


def replay_csv(directory: Path, price_factor: float = 1.0) -> Path:
    """The training candles twice in a row, the second copy stamped after the training rows: recent rows from
    exactly the training distribution (the first copy is their feature window), optionally at another price level."""
    candles = pd.read_parquet(paths.RAW_CANDLES)
    training = candles[candles["timestamp"] <= training_end()]
    stamps = pd.date_range(end=training_end() + len(training) * HOUR, periods=2 * len(training), freq="h")
    replay = pd.concat([training, training], ignore_index=True).assign(timestamp=stamps)
    replay[PRICES] *= price_factor
    return write_candles_csv(replay, directory / f"replay-x{price_factor:g}.csv")


def after_last_candle(csv: Path, days: float = 0.0) -> str:
    """A --now at which every candle of `csv` is closed, `days` later."""
    return (pd.Timestamp(pd.read_csv(csv)["timestamp"].iloc[-1]) + HOUR + pd.Timedelta(days=days)).isoformat()


def model_age_limit_beyond(csv: Path) -> float:
    """A monitor.max_model_age_days under which the model is fresh at after_last_candle(csv)."""
    return math.ceil((pd.Timestamp(after_last_candle(csv)) - training_end()) / pd.Timedelta(days=1)) + 1


def test_the_training_metadata_holds_a_reproducible_reference_of_the_fitted_rows(in_workspace: Path) -> None:
    metadata_bytes = paths.TRAINING_METADATA.read_bytes()
    reference = json.loads(metadata_bytes)["feature_reference"]
    assert set(reference["features"]) == set(FEATURE_NAMES)
    assert reference["rows"] == json.loads(metadata_bytes)["training_info"]["samples_count"]
    assert production_metadata()["feature_reference"] == reference
    # Exactly the sections the train stage reads, and data (the window of the candles it trains on), so no other
    # section's change makes its metadata stale.
    train_stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["train"]["params"]
    assert set(json.loads(metadata_bytes)["params"]) == set(TRAIN_PARAM_SECTIONS) == {"data", *train_stage}
    run_train(load_params(paths.PARAMS))
    assert paths.TRAINING_METADATA.read_bytes() == metadata_bytes


def test_an_unshifted_replay_is_ok_and_exits_0_without_an_alert(in_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = replay_csv(in_workspace)
    write_params(in_workspace, {**WORKSPACE_PARAMS, "monitor.max_model_age_days": model_age_limit_beyond(csv)})
    with webhook_receiver() as receiver:
        monkeypatch.setenv(WEBHOOK_ENV, receiver.url)
        result = runner.invoke(app, ["monitor", "--input", str(csv), "--now", after_last_candle(csv)])
    assert result.exit_code == EXIT_CODES["ok"] == 0, result.output
    assert result.stdout.startswith("status: OK")
    levels = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines() if line.split(" ")[0] in FEATURE_NAMES}
    assert levels == {name: "ok" if name in SCALE_FREE else "info" for name in FEATURE_NAMES}
    assert [line for line in result.stdout.splitlines() if line.startswith("[")] == [
        line for line in result.stdout.splitlines() if line.startswith("[     ok]")
    ]
    assert receiver.posts == []


def test_a_tripled_price_level_alerts_exits_3_and_posts_one_message(in_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Price-level features alert only when listed in monitor.drift_features; by default they are shown as info."""
    csv = replay_csv(in_workspace, price_factor=3.0)
    fresh = {**WORKSPACE_PARAMS, "monitor.max_model_age_days": model_age_limit_beyond(csv)}
    write_params(in_workspace, fresh)
    by_default = runner.invoke(app, ["monitor", "--input", str(csv), "--now", after_last_candle(csv), "--json"])
    drift_levels = {check["name"]: check["level"] for check in json.loads(by_default.stdout)["checks"] if check["kind"] == "drift"}
    assert drift_levels == {name: "ok" if name in SCALE_FREE else "info" for name in FEATURE_NAMES}
    write_params(in_workspace, {**fresh, "monitor.drift_features": [*SCALE_FREE, "close", "ema_20", "ema_50"]})
    with webhook_receiver() as receiver:
        monkeypatch.setenv(WEBHOOK_ENV, receiver.url)
        result = runner.invoke(app, ["monitor", "--input", str(csv), "--now", after_last_candle(csv), "--json"])
    assert result.exit_code == EXIT_CODES["alert"] == 3, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "alert"
    levels = {name: drift["psi"] >= 0.25 for name, drift in report["drift"].items()}
    assert levels["close"] and levels["ema_20"] and levels["ema_50"]
    assert not any(levels[name] for name in ("returns_1", "rsi_14", "zscore", "bb_position", "volume_ratio"))
    assert len(receiver.posts) == 1
    message = receiver.posts[0]["content"]
    assert message.startswith("cryptoml monitor: ALERT") and "close: PSI" in message
    assert receiver.url not in result.output


def test_a_stale_model_is_a_warning_exit_2(in_workspace: Path) -> None:
    csv = replay_csv(in_workspace)
    write_params(in_workspace, {**WORKSPACE_PARAMS, "monitor.max_model_age_days": 14.0})
    now = after_last_candle(csv, days=30)
    result = runner.invoke(app, ["monitor", "--input", str(csv), "--now", now])
    assert result.exit_code == EXIT_CODES["warn"] == 2, result.output
    assert result.stdout.startswith("status: WARN")
    # The age counts from the last row the model was fitted on, within label.horizon bars of data.end.
    data_end = training_end()
    assert data_end == pd.Timestamp(production_metadata()["params"]["data"]["end"]) - 2 * HOUR
    age = (pd.Timestamp(now) - data_end) / pd.Timedelta(days=1)
    assert f"[   warn] model data ends {data_end.strftime('%Y-%m-%dT%H:%M:%SZ')}, {age:.1f} days ago: > monitor.max_model_age_days 14" in result.stdout
    assert "retrain recommended" in result.stdout


def test_live_scores_use_only_rows_after_the_training_rows_and_say_what_was_left_out(in_workspace: Path) -> None:
    """The real continuation of the training candles, from the start of the data: training rows are in the file."""
    params = load_params(paths.PARAMS)
    end = params.data.end + pd.Timedelta(days=14)
    csv = write_candles_csv(simulate_candles(params.data.start, end, seed=params.data.synthetic.seed), in_workspace / "continuation.csv")
    report = run_monitor(csv, "1h", paths.PRODUCTION_DIR, params.monitor, now=end)
    closed = pd.read_csv(csv)["timestamp"].map(pd.Timestamp)
    rows = report.rows
    assert report.first_row == training_end() + HOUR
    assert rows.monitored == int((closed > training_end()).sum())
    assert rows.warm_up == LIVE_WINDOW - 1
    assert rows.warm_up + rows.training_period + rows.monitored == rows.closed_candles == len(closed)
    assert rows.labelled + rows.label_unknown == rows.monitored and rows.label_unknown == params.label.horizon
    assert report.live_metrics is not None and report.prior_log_loss is not None
    assert set(report.holdout_metrics) == set(report.live_metrics)


def test_the_html_report_is_self_contained_with_a_histogram_per_feature(in_workspace: Path) -> None:
    csv = replay_csv(in_workspace, price_factor=3.0)
    report_path = in_workspace / "reports" / "drift.html"
    result = runner.invoke(app, ["monitor", "--input", str(csv), "--now", after_last_candle(csv), "--html", str(report_path)])
    status = {code: level for level, code in EXIT_CODES.items()}[result.exit_code]
    page = report_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and f"<title>cryptoml monitor: {status}</title>" in page
    assert page.count("<svg") == len(FEATURE_NAMES)
    assert all(f"<td>{name}</td>" in page for name in FEATURE_NAMES)
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert not list(report_path.parent.glob(".*.tmp"))


@pytest.mark.fault
@pytest.mark.parametrize("one_short", [True, False], ids=["one row short", "no row after training"])
def test_too_few_recent_rows_exit_1_saying_how_many_are_needed(in_workspace: Path, one_short: bool) -> None:
    params = load_params(paths.PARAMS)
    min_rows = params.monitor.min_rows
    # The training rows end with data.end: the rows to monitor come from the market's continuation.
    candles = simulate_candles(params.data.start, params.data.end + pd.Timedelta(days=30), seed=params.data.synthetic.seed)
    recent_rows = min_rows - 1 if one_short else 0
    kept = int((candles["timestamp"] <= training_end()).sum()) + recent_rows
    csv = write_candles_csv(candles.iloc[:kept], in_workspace / "short.csv")
    result = runner.invoke(app, ["monitor", "--input", str(csv), "--now", after_last_candle(csv)])
    assert result.exit_code == 1
    assert f"{csv}: {recent_rows} row(s) to monitor, monitor.min_rows={min_rows} needed" in result.output


@pytest.mark.fault
def test_a_malformed_csv_exits_1_naming_the_line(in_workspace: Path) -> None:
    csv = replay_csv(in_workspace)
    lines = csv.read_text().splitlines()
    cells = lines[3].split(",")
    cells[lines[0].split(",").index("close")] = "oops"
    lines[3] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["monitor", "--input", str(csv)])
    assert result.exit_code == 1
    assert f"{csv}: column 'close' must be numeric — line 4: 'oops'" in result.output


@pytest.mark.fault
def test_a_model_without_a_reference_asks_for_a_retrain(in_workspace: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(paths.PRODUCTION_DIR, tmp_path / "old-model"))
    metadata = production_metadata()
    del metadata["feature_reference"]
    (model_dir / METADATA_NAME).write_text(dump_json(metadata))
    csv = replay_csv(in_workspace)
    result = runner.invoke(app, ["monitor", "--input", str(csv), "--model", str(model_dir), "--now", after_last_candle(csv)])
    assert result.exit_code == 1
    assert "has no feature_reference: the model was trained before drift monitoring existed; retrain it" in result.output


def test_predict_refuses_a_stale_model_only_when_configured(in_workspace: Path) -> None:
    csv = replay_csv(in_workspace)
    now = after_last_candle(csv)
    write_params(in_workspace, {**WORKSPACE_PARAMS, "monitor.max_model_age_days": 14.0, "monitor.refuse_stale_predictions": True})
    refused = runner.invoke(app, ["predict", "--input", str(csv)])
    assert refused.exit_code == 1
    assert f"is stale: its data ends {training_end().strftime('%Y-%m-%dT%H:%M:%SZ')}" in refused.output
    assert "over monitor.max_model_age_days=14" in refused.output
    with pytest.raises(StaleModelError, match=r"days before"):
        run_predict(csv, "1h", paths.PRODUCTION_DIR, now=pd.Timestamp(now), max_model_age_days=14.0)
    fresh = run_predict(csv, "1h", paths.PRODUCTION_DIR, now=pd.Timestamp(now), max_model_age_days=model_age_limit_beyond(csv))
    assert len(fresh.signals) == 1
    write_params(in_workspace, {**WORKSPACE_PARAMS, "monitor.max_model_age_days": 14.0})
    assert runner.invoke(app, ["predict", "--input", str(csv)]).exit_code == 0
