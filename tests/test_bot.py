"""`cryptoml bot --paper`: the batch's P(up) and the trading rule's positions candle by candle, the journal (append-only,
resumed byte for byte after a SIGKILL), the model it follows, the faults of its feed, and its process's imports."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cryptoml.candles import ccxt_client
from cryptoml.candles.synthetic import simulate_candles
from cryptoml.cli import app
from cryptoml.config import load_params
from cryptoml.features.manager import FeatureManager
from cryptoml.live.bot import BotSettings, PaperBot, read_settings
from cryptoml.live.feed import ExchangeFeed, ReplayFeed, epoch_ms, iso_utc
from cryptoml.live.journal import FORMAT, Journal, JournalError, read_journal
from cryptoml.live.serving import ServingModel
from cryptoml.model.artifacts import MODEL_NAMES, read_artifacts
from cryptoml.model.backtest import net_returns, next_bar_returns
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.labels import build_dataset
from cryptoml.model.rule import Holding, TradingRule
from cryptoml.release.promotion import install_model
from tests.fake_exchange import FakeBitbank
from tests.test_cli import write_params

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_1H = "BTC_USDT_1h_2017-08-17_2020-02-01.csv"
SEED_CANDLES = 1000
P_UP_TOLERANCE = 1e-9
# Never in the bot's process. (pydantic is: typer 0.29 coerces every command's options with it, about 6 MB.)
HEAVY = {"pandas", "numba", "llvmlite", "sklearn", "lightgbm", "xgboost", "scipy", "rich"}
runner = CliRunner()


# --- fixtures: a small model fitted on synthetic candles' features, candles as CSV files --------------------------


def fit_model(directory: Path, seed: int, train_end: str = "2030-01-01T00:00:00+00:00", candles: pd.DataFrame | None = None) -> Path:
    """A 20-tree ensemble fitted on the candles' features (default: 3,000 synthetic ones), with a rule that trades
    about a fifth of the time."""
    if candles is None:
        start = pd.Timestamp("2023-01-01", tz="UTC")
        candles = simulate_candles(start, start + pd.Timedelta(hours=3000), "1h", seed)
    X, y = build_dataset(FeatureManager().generate_features(candles), candles.set_index("timestamp")["close"], 1, 3.0e-3)
    model = ProductionEnsemble(model_params={name: {"n_estimators": 20} for name in MODEL_NAMES}).fit(X, y)
    entry, exit = np.quantile(model.predict_proba(X)[:, 1], [0.8, 0.6])
    model.set_params(trading_rule=TradingRule(entry=float(entry), exit=float(exit), min_hold=3))
    model.save(directory, version_info={"train_end": train_end, "git_commit": f"test-{seed}"})
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bot-models")
    return [fit_model(root / f"model-{seed}", seed) for seed in (1, 2)]


def write_csv(candles: pd.DataFrame, path: Path) -> Path:
    candles.assign(timestamp=candles["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(path, index=False)
    return path


def synthetic_candles(hours: int, seed: int = 5, gaps: tuple[slice, ...] = ()) -> pd.DataFrame:
    start = pd.Timestamp("2024-01-01", tz="UTC")
    candles = simulate_candles(start, start + pd.Timedelta(hours=hours), "1h", seed)
    dropped = np.zeros(len(candles), dtype=bool)
    for gap in gaps:
        dropped[gap] = True
    return candles[~dropped].reset_index(drop=True)


@pytest.fixture(scope="module")
def replay_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,600 synthetic candles with two gaps after the seed (one candle, then a day)."""
    candles = synthetic_candles(1600, gaps=(slice(1200, 1201), slice(1400, 1424)))
    return write_csv(candles, tmp_path_factory.mktemp("candles") / "candles.csv")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {})
    return tmp_path


@pytest.fixture(autouse=True)
def keep_logging_handlers() -> Iterator[None]:
    """`cryptoml` commands point the log at the stderr of the moment (CliRunner's, closed after the call)."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    yield
    root.handlers[:] = handlers


def run_bot(*arguments: str | Path) -> str:
    result = runner.invoke(app, ["bot", "--paper", *map(str, arguments)])
    assert result.exit_code == 0, result.output
    return result.output


def entries(journal: Path) -> list[dict]:
    return read_journal(journal)[1]


# --- the replay equals the batch ---------------------------------------------------------------------------------


def batch_rows(candles: pd.DataFrame, times: list[str]) -> pd.DataFrame:
    """FeatureManager.generate_features of all the candles, at the journalled candles' times."""
    return FeatureManager().generate_features(candles).loc[pd.to_datetime(times, utc=True)]


def assert_replay_is_the_batch(csv: Path, model_dir: Path, journal: Path, cost: float) -> list[dict]:
    """Every journalled candle's P(up) is ServingModel's on the batch features of the file's candles, its position the
    rule's on those P(up) from flat, its equity the backtest's (cryptoml.model.backtest) after costs."""
    lines = entries(journal)
    candles = pd.read_csv(csv)
    candles["timestamp"] = pd.to_datetime(candles["timestamp"], utc=True)
    assert [line["t"] for line in lines] == candles["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ").iloc[SEED_CANDLES - 1 :].tolist()
    model = ServingModel.load(model_dir)
    batch = model.predict_proba(batch_rows(candles, [line["t"] for line in lines]))[:, 1]
    journalled = np.array([line["p_up"] for line in lines])
    assert np.abs(journalled - batch).max() <= P_UP_TOLERANCE
    positions, _ = model.rule.holdings(batch, Holding())
    assert [line["position"] for line in lines] == positions.tolist()
    assert 0 < positions.sum() < len(positions), "the rule must trade in this test"
    close = candles.set_index("timestamp")["close"]
    index = close.index[SEED_CANDLES - 1 :]
    net = net_returns(positions, next_bar_returns(index, close), cost)
    expected = np.prod(1.0 + net[:-1]) * (1.0 - cost) ** abs(positions[-1] - positions[-2])
    assert lines[-1]["equity"] == pytest.approx(expected, rel=1e-12)
    return lines


def test_a_replay_of_synthetic_candles_journals_the_batch_p_up_and_the_rules_positions(
    workdir: Path, replay_csv: Path, models: list[Path]
) -> None:
    output = run_bot("--replay", replay_csv, "--journal", "journal.jsonl", "--model", models[0])
    assert "576 candle(s) journalled" in output  # 1,575 candles, the first 999 only seed
    lines = assert_replay_is_the_batch(replay_csv, models[0], workdir / "journal.jsonl", BotSettings().cost_per_side)
    seeds = [(line["t"], line["seed"]["reason"]) for line in lines if "seed" in line]
    assert seeds == [
        ("2024-02-11T15:00:00Z", "start"),
        ("2024-02-20T01:00:00Z", "gap: 1 candle(s) missing after 2024-02-19T23:00:00Z"),
        ("2024-02-29T08:00:00Z", "gap: 24 candle(s) missing after 2024-02-28T07:00:00Z"),
    ]
    assert {line["model_sha256"] for line in lines} == {read_artifacts(models[0]).model_sha256}
    assert all(line["in_training_window"] and "flat_reason" not in line for line in lines)


def test_a_replay_of_the_real_binance_candles_journals_the_batch_p_up(
    shared_data: Path, tmp_path: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,411 journalled candles, 12 gaps among them, a model fitted on the first 4,000 candles."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {})
    candles = pd.read_csv(shared_data / REAL_1H, nrows=4000).assign(timestamp=lambda frame: pd.to_datetime(frame["timestamp"], utc=True))
    model = fit_model(tmp_path / "model", 0, candles=candles)
    run_bot("--replay", shared_data / REAL_1H, "--journal", "journal.jsonl", "--model", model)
    lines = assert_replay_is_the_batch(shared_data / REAL_1H, model, tmp_path / "journal.jsonl", BotSettings().cost_per_side)
    steps = np.diff([epoch_ms(line["t"]) for line in lines])
    assert len(lines) == 20_411 and sum("seed" in line for line in lines) == 1 + np.count_nonzero(steps > 3_600_000) == 13


# --- the bot's process --------------------------------------------------------------------------------------------


def imported_modules(command: list[str], cwd: Path) -> set[str]:
    """The top-level modules a fresh interpreter running `command` imported (Python's -X importtime report)."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={"PYTHONPROFILEIMPORTTIME": "1", "PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_the_bot_command_imports_no_pandas_numba_or_training_library(workdir: Path, replay_csv: Path, models: list[Path]) -> None:
    """The actual console script, `cryptoml bot --paper --replay`, from a closed candle to a journalled position."""
    cryptoml = str(Path(sys.executable).parent / "cryptoml")
    command = [cryptoml, "bot", "--paper", "--replay", str(replay_csv), "--journal", "j.jsonl", "--model", str(models[0]), "--max-candles", "50"]
    imported = imported_modules(command, workdir)
    assert {"onnxruntime", "numpy", "yaml", "typer", "cryptoml"} <= imported
    assert imported & (HEAVY | {"ccxt"}) == set()
    assert len(entries(workdir / "j.jsonl")) == 50


# --- restart -------------------------------------------------------------------------------------------------------


def crash(arguments: list[str], at_write: int, written: str, cwd: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "tests" / "bot_crash.py"), str(at_write), written, "bot", "--paper", *arguments]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-3000:]


@pytest.mark.fault
def test_a_run_killed_anywhere_in_a_journal_write_and_resumed_writes_the_uninterrupted_journal(
    workdir: Path, replay_csv: Path, models: list[Path]
) -> None:
    """SIGKILL before a line, inside it, before its newline, right after it, and in the header; twice in one journal.
    Write 230 is the candle after the one-candle gap: the resumed state is rebuilt from that gap's seed."""
    arguments = ["--replay", str(replay_csv), "--model", str(models[0])]
    run_bot(*arguments, "--journal", "whole.jsonl")
    whole = (workdir / "whole.jsonl").read_bytes()
    line = len(whole.splitlines()[229]) + 1
    for at_write, written in [(1, "40"), (2, "0"), (230, "0"), (230, str(line // 2)), (230, str(line - 1)), (230, "all"), (500, "7")]:
        journal = workdir / f"crash-{at_write}-{written}.jsonl"
        crash([*arguments, "--journal", str(journal)], at_write, written, workdir)
        assert whole.startswith(journal.read_bytes()[: journal.read_bytes().rfind(b"\n") + 1])
        if at_write == 500:  # a second crash, in the resumed run's first write
            crash([*arguments, "--journal", str(journal)], 1, "3", workdir)
        run_bot(*arguments, "--journal", journal)
        assert journal.read_bytes() == whole, (at_write, written)


@pytest.mark.fault
def test_a_journal_of_another_run_or_damaged_by_hand_is_refused_unchanged(workdir: Path, replay_csv: Path, models: list[Path]) -> None:
    run_bot("--replay", replay_csv, "--journal", "j.jsonl", "--model", models[0], "--max-candles", "5")
    before = (workdir / "j.jsonl").read_bytes()
    write_params(workdir, {"costs.slippage": 2.0e-4})
    result = runner.invoke(app, ["bot", "--paper", "--replay", str(replay_csv), "--journal", "j.jsonl", "--model", str(models[0])])
    assert result.exit_code == 1 and (workdir / "j.jsonl").read_bytes() == before
    with pytest.raises(JournalError, match="cost_per_side: journal 0.0012, this run 0.0014"):
        Journal(workdir / "j.jsonl", {**read_journal(workdir / "j.jsonl")[0], "cost_per_side": 0.0014})
    lines = before.splitlines(keepends=True)
    (workdir / "j.jsonl").write_bytes(b"".join([*lines[:2], b"{not json\n", *lines[3:]]))
    with pytest.raises(JournalError, match=r"j.jsonl:3: not a JSON line"):
        Journal(workdir / "j.jsonl", read_journal(workdir / "j.jsonl")[0])


# --- the model -----------------------------------------------------------------------------------------------------


def bot_over(csv: Path, model_dir: Path, journal: Path, **settings: float) -> PaperBot:
    feed = ReplayFeed(csv, 3_600_000)
    return PaperBot(feed, Journal(journal, {"feed": feed.name}, fsync=False), model_dir, BotSettings(**settings))


@pytest.mark.fault
def test_a_model_swapped_in_during_a_step_serves_from_the_next_candle_and_the_switch_is_journalled(
    tmp_path: Path, replay_csv: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = Path(shutil.copytree(models[0], tmp_path / "served"))
    old, new = (read_artifacts(path) for path in models)
    predict = ServingModel.predict_proba
    calls = 0

    def swap_inside_the_step(model: ServingModel, rows: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 20:  # pull-model swaps the directory between this step's reload and its prediction
            install_model(served, new, None)
        return predict(model, rows)

    monkeypatch.setattr(ServingModel, "predict_proba", swap_inside_the_step)
    bot = bot_over(replay_csv, served, tmp_path / "j.jsonl")
    bot.run(max_candles=40)
    lines = entries(tmp_path / "j.jsonl")
    assert [line["model_sha256"] for line in lines] == [old.model_sha256] * 20 + [new.model_sha256] * 20
    assert [line.get("model_switch") for line in lines if "model_switch" in line] == [{"from": old.model_sha256}]
    assert "model_switch" in lines[20]
    candles = pd.read_csv(replay_csv)
    candles["timestamp"] = pd.to_datetime(candles["timestamp"], utc=True)
    rows = batch_rows(candles, [line["t"] for line in lines])
    expected = np.concatenate([predict(ServingModel.load(models[0]), rows.iloc[:20])[:, 1], predict(ServingModel.load(models[1]), rows.iloc[20:])[:, 1]])
    assert np.abs(np.array([line["p_up"] for line in lines]) - expected).max() <= P_UP_TOLERANCE


@pytest.mark.fault
def test_no_trade_on_a_missing_unverifiable_or_stale_model(tmp_path: Path, replay_csv: Path, models: list[Path]) -> None:
    served = tmp_path / "served"
    bot = bot_over(replay_csv, served, tmp_path / "missing.jsonl")
    bot.run(max_candles=10)
    shutil.copytree(models[0], served)
    graph = next(path for path in served.iterdir() if path.name.endswith(".onnx.gz"))
    graph.write_bytes(graph.read_bytes()[:-1])  # unverifiable: its sha256 no longer matches the manifest
    bot.run(max_candles=20)
    graph.unlink()
    shutil.copy(models[0] / graph.name, graph)
    bot.run(max_candles=200)
    lines = entries(tmp_path / "missing.jsonl")
    assert np.all(np.diff([epoch_ms(line["t"]) for line in lines]) == 3_600_000)
    assert all(line["position"] == 0 and line["p_up"] is None and "no verified model" in line["flat_reason"] for line in lines[:20])
    assert "manifest missing" in lines[0]["flat_reason"] and "the manifest says" in lines[10]["flat_reason"]
    assert lines[20]["model_switch"] == {"from": None} and "flat_reason" not in lines[20]
    assert any(line["position"] for line in lines[20:])

    stale = fit_model(tmp_path / "stale", 1, train_end="2024-01-20T00:00:00+00:00")
    bot = bot_over(replay_csv, stale, tmp_path / "stale.jsonl", max_model_age_days=30.0)
    bot.run(max_candles=300)
    lines = entries(tmp_path / "stale.jsonl")
    ages = [line["model_age_days"] for line in lines]
    assert ages[0] == pytest.approx((epoch_ms(lines[0]["t"]) + 3_600_000 - epoch_ms("2024-01-20T00:00:00Z")) / 86_400_000)
    assert not any(line["in_training_window"] for line in lines)
    fresh = [line for line, age in zip(lines, ages, strict=True) if age <= 30.0]
    stale_lines = [line for line, age in zip(lines, ages, strict=True) if age > 30.0]
    assert fresh and stale_lines and all("flat_reason" not in line for line in fresh)
    assert all(line["position"] == 0 and line["p_up"] is not None and line["flat_reason"].startswith("stale model") for line in stale_lines)


# --- the exchange: down, slow -----------------------------------------------------------------------------------


class SimulatedClock:
    """The bot's wall clock in a test: every sleep (a poll's wait, a retry's backoff) moves it on, instantly."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        return self.now_ms

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_ms += round(seconds * 1000)


def exchange_bot(fake: FakeBitbank, clock: SimulatedClock, journal: Path, model_dir: Path, **options: float) -> PaperBot:
    settings = {"max_retries": 2, "backoff_seconds": 0.001, "timeout_seconds": 2.0, **options}
    feed = ExchangeFeed(
        "bitbank", "BTC/JPY", "1h", api_url=fake.url, poll_seconds=3600.0, rate_limit_ms=1, rebuild_limit=5000,
        clock_ms=clock, sleep=clock.sleep, timeout_seconds=settings["timeout_seconds"],
        max_retries=int(settings["max_retries"]), backoff_seconds=settings["backoff_seconds"],
    )
    return PaperBot(feed, Journal(journal, {"feed": feed.name}, fsync=False), model_dir, BotSettings())


@pytest.fixture
def exchange_candles(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    """1,100 candles the fake bitbank serves, and a replay of the same candles from its 11th, the bot's first seed."""
    candles = synthetic_candles(1100)
    return candles, write_csv(candles.iloc[10:], tmp_path / "replay.csv")


def journal_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()[1:]  # the header names the feed


@pytest.mark.fault
def test_an_exchange_down_for_two_polls_loses_no_candle_and_the_retries_are_bounded(
    tmp_path: Path, exchange_candles: tuple[pd.DataFrame, Path], models: list[Path]
) -> None:
    candles, replay = exchange_candles
    clock = SimulatedClock(epoch_ms(candles["timestamp"].iloc[1010].isoformat()))  # candle 1009 has just closed
    with FakeBitbank(candles) as fake:
        bot = exchange_bot(fake, clock, tmp_path / "live.jsonl", models[0])
        bot.run(max_candles=1)  # seeded with candles 10..1009, journals 1009
        day = fake.candle_path(candles["timestamp"].iloc[1010])
        fake.fail(day, 503, times=2 * 3)  # two polls of 1 + max_retries 2 requests each
        bot.run(max_candles=30)
        assert fake.request_count(day) >= 2 * 3 + 1
    # Each failed poll: 1 + max_retries requests, backoff_seconds * 2**attempt between them; then the next poll.
    assert sorted(sleep for sleep in clock.sleeps if sleep != 3600.0) == [0.001, 0.001, 0.002, 0.002]
    bot_over(replay, models[0], tmp_path / "replay.jsonl").run(max_candles=30)
    assert journal_lines(tmp_path / "live.jsonl") == journal_lines(tmp_path / "replay.jsonl")


@pytest.mark.fault
def test_a_slow_exchange_times_out_and_is_retried(tmp_path: Path, exchange_candles: tuple[pd.DataFrame, Path], models: list[Path]) -> None:
    candles, replay = exchange_candles
    clock = SimulatedClock(epoch_ms(candles["timestamp"].iloc[1010].isoformat()))
    with FakeBitbank(candles) as fake:
        bot = exchange_bot(fake, clock, tmp_path / "live.jsonl", models[0], timeout_seconds=0.2)
        bot.run(max_candles=1)
        day = fake.candle_path(candles["timestamp"].iloc[1010])
        fake.slow(day, 1.0)
        bot.run(max_candles=3)
    assert [sleep for sleep in clock.sleeps if sleep != 3600.0] == [0.001]  # one timeout, one retry
    bot_over(replay, models[0], tmp_path / "replay.jsonl").run(max_candles=3)
    assert journal_lines(tmp_path / "live.jsonl") == journal_lines(tmp_path / "replay.jsonl")


# --- soak ---------------------------------------------------------------------------------------------------------

# A fresh process replays the candles through PaperBot, its resident memory read after every `every` candles.
SOAK = """
import json, sys
from pathlib import Path
from cryptoml.live.bot import BotSettings, PaperBot
from cryptoml.live.feed import ReplayFeed
from cryptoml.live.journal import Journal

def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

csv, journal, model, every = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
feed = ReplayFeed(csv, 3_600_000)
bot = PaperBot(feed, Journal(journal, {"feed": feed.name}, fsync=False), model, BotSettings())
samples = []
while bot.run(max_candles=(len(samples) + 1) * every) == (len(samples) + 1) * every:
    samples.append(rss_mb())
print(json.dumps({"journalled": bot.journalled, "rss_mb": samples}))
"""
# Resident memory may move this much from the first sample (after `every` candles) to the last: allocator noise,
# never a per-candle cost (a leak of 100 bytes a candle would be 10 MB over the long soak).
SOAK_RSS_GROWTH_MB = 3.0


def soak(tmp_path: Path, model_dir: Path, candles: int, every: int) -> dict:
    csv = write_csv(synthetic_candles(candles + SEED_CANDLES - 1, seed=11), tmp_path / "soak.csv")
    result = subprocess.run(
        [sys.executable, "-c", SOAK, str(csv), str(tmp_path / "soak.jsonl"), str(model_dir), str(every)],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stdout)
    assert report["journalled"] == candles
    growth = max(report["rss_mb"]) - report["rss_mb"][0]
    assert growth <= SOAK_RSS_GROWTH_MB, report["rss_mb"]
    return report


@pytest.mark.fault
def test_a_soak_of_ten_thousand_candles_keeps_its_memory(tmp_path: Path, models: list[Path]) -> None:
    soak(tmp_path, models[0], 10_000, 1_000)


@pytest.mark.slow
@pytest.mark.fault
def test_a_soak_of_a_hundred_thousand_candles_keeps_its_memory(tmp_path: Path, models: list[Path]) -> None:
    soak(tmp_path, models[0], 100_000, 5_000)


# --- candles out of order -----------------------------------------------------------------------------------------


@pytest.mark.fault
def test_duplicate_older_and_off_grid_candles_are_skipped_and_change_nothing(tmp_path: Path, models: list[Path]) -> None:
    candles = synthetic_candles(1100)
    clean = write_csv(candles, (tmp_path / "clean").mkdir() or tmp_path / "clean" / "c.csv")
    messy = pd.concat(
        [candles.iloc[:1050], candles.iloc[[1049]], candles.iloc[1050:1060], candles.iloc[[1030]],
         candles.iloc[[1059]].assign(timestamp=candles["timestamp"].iloc[1059] + pd.Timedelta(minutes=30)), candles.iloc[1060:]]
    )
    messy_csv = write_csv(messy, (tmp_path / "messy").mkdir() or tmp_path / "messy" / "c.csv")
    for csv in (clean, messy_csv):
        bot_over(csv, models[0], csv.with_suffix(".jsonl")).run()
    assert messy_csv.with_suffix(".jsonl").read_bytes() == clean.with_suffix(".jsonl").read_bytes()


# --- settings ------------------------------------------------------------------------------------------------------


def test_the_bots_settings_read_with_yaml_alone_agree_with_the_params_schema(tmp_path: Path) -> None:
    for changes in ({}, {"bot.seed_candles": 1200, "costs.slippage": 2.0e-4, "data.exchange.api_url": "http://127.0.0.1:1"}):
        write_params(tmp_path, changes)
        params, settings = load_params(tmp_path / "params.yaml"), read_settings(tmp_path / "params.yaml")
        assert settings == BotSettings(
            timeframe=params.data.timeframe, exchange_id=params.data.exchange.id, symbol=params.data.exchange.symbol,
            api_url=params.data.exchange.api_url, max_retries=params.data.exchange.max_retries,
            backoff_seconds=params.data.exchange.backoff_seconds, fee=params.costs.fee, slippage=params.costs.slippage,
            max_model_age_days=params.monitor.max_model_age_days, **params.bot.model_dump(),
        )
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    del raw["bot"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert read_settings(tmp_path / "params.yaml").seed_candles == load_params(tmp_path / "params.yaml").bot.seed_candles
    for dotted, value, message in [("bot.seed_candles", 999, "must be at least 1000"), ("costs.fee", "0.1", "expected a float")]:
        write_params(tmp_path, {dotted: value})
        with pytest.raises(ValueError, match=f"{dotted}: {message}"):
            read_settings(tmp_path / "params.yaml")


def test_the_journal_header_names_the_format_and_the_run(workdir: Path, replay_csv: Path, models: list[Path]) -> None:
    run_bot("--replay", replay_csv, "--journal", "j.jsonl", "--model", models[0], "--max-candles", "3")
    header, lines = read_journal(workdir / "j.jsonl")
    assert header == {"format": FORMAT, "feed": "replay:candles.csv", "symbol": "BTC/JPY", "timeframe": "1h", "cost_per_side": 0.0012, "seed_candles": 1000}
    assert set(lines[1]) == {
        "t", "close", "p_up", "position", "held", "return", "cost", "equity", "model_sha256", "model_commit", "model_age_days", "in_training_window"
    }
    assert all(math.isfinite(line["equity"]) for line in lines)
    assert (workdir / "j.jsonl").read_text().count("\n") == 4 and json.loads((workdir / "j.jsonl").read_text().splitlines()[1])["seed"]
    refused = runner.invoke(app, ["bot", "--replay", str(replay_csv), "--journal", "other.jsonl", "--model", str(models[0])])
    assert refused.exit_code == 2 and "only --paper exists" in refused.output and not (workdir / "other.jsonl").exists()


# --- cryptoml monitor --journal ----------------------------------------------------------------------------------


def test_monitor_reads_the_journal_for_live_performance(workdir: Path, replay_csv: Path) -> None:
    model = fit_model(workdir / "model", 1, train_end="2024-02-01T00:00:00+00:00")  # before every journalled candle
    bot = bot_over(replay_csv, model, workdir / "j.jsonl", max_model_age_days=1000.0)
    bot.run(max_candles=400)
    bot.journal.close()
    result = runner.invoke(app, ["monitor", "--journal", "j.jsonl", "--json"])
    assert result.exit_code in (0, 3), result.output
    report = json.loads(result.stdout)
    lines = entries(workdir / "j.jsonl")
    close = np.array([line["close"] for line in lines])
    labels = (close[1:] / close[:-1] - 1.0 > 3.0e-3).astype(int)
    assert report["candles"] == 400 and report["scored_rows"] == 399
    assert report["live_metrics"]["roc_auc"] == pytest.approx(roc_auc_score(labels, [line["p_up"] for line in lines[:-1]]), abs=1e-6)
    assert report["paper_return"] == pytest.approx(lines[-1]["equity"] - 1.0, abs=1e-6)
    assert report["trades"] == sum(1 for before, after in zip([0] + [line["position"] for line in lines], [line["position"] for line in lines]) if after > before)
    assert runner.invoke(app, ["monitor"]).exit_code == 2  # neither --input nor --journal: a usage error


def test_the_command_polls_the_exchange_of_params_through_ccxt(workdir: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`cryptoml bot --paper` without --replay: data.exchange's bitbank (a local fake serving the last 1,100 hours)."""
    connect = ccxt_client.connect
    monkeypatch.setattr(ccxt_client, "connect", lambda exchange_id, api_url, rate_limit_ms, timeout_ms=None: connect(exchange_id, api_url, 1, timeout_ms))
    now = pd.Timestamp.now(tz="UTC").floor("h")
    candles = simulate_candles(now - pd.Timedelta(hours=1100), now + pd.Timedelta(hours=2), "1h", 5)  # the last ones are forming
    with FakeBitbank(candles) as fake:
        write_params(workdir, {"data.exchange.api_url": fake.url, "data.exchange.backoff_seconds": 0.001})
        output = run_bot("--journal", "live.jsonl", "--model", models[0], "--max-candles", "1")
    header, lines = read_journal(workdir / "live.jsonl")
    assert header["feed"] == "bitbank" and "1 candle(s) journalled" in output
    last_closed = epoch_ms(lines[0]["t"])
    assert last_closed in (epoch_ms(now.isoformat()) - 3_600_000, epoch_ms(now.isoformat()))  # the hour may turn during the test
    assert lines[0]["seed"] == {"from": iso_utc(last_closed - 999 * 3_600_000), "candles": 1000, "reason": "start"}
