"""`cryptoml bot --paper`: the reference loop from a closed candle to a position, journalled. No order is ever placed.

For each closed candle a feed gives (cryptoml.live.feed: a CSV replayed as if live, or an exchange through ccxt):

1. Order: a candle at or before the last journalled one (a duplicate, an older one) or off the grid is skipped and
   logged; it never reaches the state.
2. Model: `ServingModel.reload_if_changed()` follows the served directory (`cryptoml pull-model`), so a new model
   takes over between two candles; the entry of the first candle it serves records the switch (`model_switch`). A
   reload that fails keeps the verified model in memory (ServingModel's policy); with no verified model at all (the
   directory missing or unverifiable when the bot starts), every candle is flat until one loads.
3. Features: FeatureState.update, O(1). A gap (the feed skipped candles the exchange does not have) is refused by
   the state; the bot then re-seeds it from the last `seed_candles` candles up to this one, which reads the gap as
   the batch and training do (consecutive rows), and records it in the entry (`seed`). The position is kept.
4. P(up) from the ONNX graph; the position from the model's own trading rule (ServingModel.next_holding). A stale
   model (older than monitor.max_model_age_days at the candle's close) or none: flat, and `flat_reason` says why.
5. Paper P&L as cryptoml.model.backtest counts it: the position decided at the close of bar t earns
   close[t+1] / close[t] - 1, and each change of position pays costs.fee + costs.slippage of the value.
6. The entry is appended to the journal (cryptoml.live.journal) before the next candle is read.

Restart: the journal says where to resume. The state is rebuilt exactly as it was: seeded from the candles the last
`seed` entry names and updated with those journalled since, read again from the feed; so a run killed at any point
and resumed writes the same bytes as one never killed. When that would re-read more than the feed's
`rebuild_limit` (an exchange: bot.max_rebuild_candles), or the feed no longer has those candles, the next candle is
seeded afresh and its entry says so (`seed.reason` "restart").

Model age and the training window are counted at the candle's close time, not the wall clock, so a replay of old
candles judges the model as a bot would have then; `in_training_window` marks candles at or before the last row the
model was fitted on (version_info train_end, else data_end): P(up) there may be in-sample.

This module, the feed, the journal, the state and ServingModel import neither pandas, numba, scikit-learn, LightGBM
nor XGBoost; params.yaml is read with yaml for the few keys the bot needs (`read_settings`, checked against
cryptoml.config's schema by the tests).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cryptoml.candles.timeframe import timeframe_ms
from cryptoml.features.state import GAP, CandleSequenceError, FeatureState
from cryptoml.live.feed import Candle, ExchangeFeed, Feed, FeedError, ReplayFeed, epoch_ms, iso_utc
from cryptoml.live.journal import SEED, Entry, Journal
from cryptoml.live.serving import ServingModel, recorded_data_end
from cryptoml.model.artifacts import ArtifactError
from cryptoml.model.rule import FLAT, Holding

log = logging.getLogger("cryptoml.bot")

DAY_MS = 86_400_000


# --- settings: a few keys of params.yaml, read without pydantic or pandas ---------------------------------------------


@dataclass(frozen=True)
class BotSettings:
    """What the bot reads from params.yaml (cryptoml.config holds the schema and the defaults' documentation)."""

    timeframe: str = "1h"
    exchange_id: str = "bitbank"
    symbol: str = "BTC/JPY"
    api_url: str | None = None
    max_retries: int = 5
    backoff_seconds: float = 1.0
    fee: float = 1.2e-3
    slippage: float = 0.0
    max_model_age_days: float = 14.0
    poll_seconds: float = 60.0
    timeout_seconds: float = 10.0
    seed_candles: int = 1000
    max_rebuild_candles: int = 5000

    @property
    def cost_per_side(self) -> float:
        return self.fee + self.slippage


# (key in BotSettings, dotted key in params.yaml, type, lowest allowed value)
_KEYS: tuple[tuple[str, str, type, float | None], ...] = (
    ("timeframe", "data.timeframe", str, None),
    ("exchange_id", "data.exchange.id", str, None),
    ("symbol", "data.exchange.symbol", str, None),
    ("api_url", "data.exchange.api_url", str, None),
    ("max_retries", "data.exchange.max_retries", int, 0),
    ("backoff_seconds", "data.exchange.backoff_seconds", float, 0),
    ("fee", "costs.fee", float, 0),
    ("slippage", "costs.slippage", float, 0),
    ("max_model_age_days", "monitor.max_model_age_days", float, 0),
    ("poll_seconds", "bot.poll_seconds", float, 0),
    ("timeout_seconds", "bot.timeout_seconds", float, 0),
    ("seed_candles", "bot.seed_candles", int, 1000),
    ("max_rebuild_candles", "bot.max_rebuild_candles", int, 1000),
)


def read_settings(path: Path) -> BotSettings:
    """The bot's keys of a params file; ValueError naming the key for a wrong type or value."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the params: {exc}") from None
    values: dict[str, Any] = {}
    for name, dotted, kind, lowest in _KEYS:
        node: Any = raw
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            continue
        number = kind in (int, float) and isinstance(node, int | float) and not isinstance(node, bool)
        if not (isinstance(node, kind) or (kind is float and number)) or (number and not math.isfinite(node)):
            raise ValueError(f"{path}: {dotted}: expected a {kind.__name__}, got {node!r}")
        if lowest is not None and node < lowest:
            raise ValueError(f"{path}: {dotted}: must be at least {lowest}, got {node!r}")
        values[name] = float(node) if kind is float else node
    settings = BotSettings(**values)
    timeframe_ms(settings.timeframe)
    return settings


# --- the loop -----------------------------------------------------------------------------------------------------


class PaperBot:
    """The loop of the module docstring over one feed, one journal and one served model directory."""

    def __init__(
        self,
        feed: Feed,
        journal: Journal,
        model_dir: Path,
        settings: BotSettings,
        load_model: Callable[[Path], ServingModel] = ServingModel.load,
    ) -> None:
        self.feed, self.journal, self.model_dir, self.settings = feed, journal, Path(model_dir), settings
        self._load_model = load_model
        self.model: ServingModel | None = None
        self._model_problem = "no model loaded yet"
        self.state: FeatureState | None = None
        self.recent: deque[Candle] = deque(maxlen=settings.seed_candles)
        self.last: Entry | None = journal.resume.last
        self._reseed_reason: str | None = None  # the state must be seeded afresh at the next candle, for this reason
        self._started = False
        self.journalled = 0

    # --- model ----------------------------------------------------------------------------------------------
    def _refresh_model(self) -> None:
        """Follow the directory: reload a changed model (keeping the current one on failure), or load the first."""
        if self.model is not None:
            if self.model.reload_if_changed():
                log.info("model %s now served from %s", self.model.model_sha256, self.model_dir)
            return
        try:
            self.model = self._load_model(self.model_dir)
        except (ArtifactError, OSError, ValueError) as exc:
            problem = f"no verified model in {self.model_dir}: {exc}"
            if problem != self._model_problem:
                log.error("%s: trading flat until one loads", problem)
            self._model_problem = problem
            return
        log.info("model %s loaded from %s (rule: %s)", self.model.model_sha256, self.model_dir, self.model.rule.describe())

    def _model_fields(self, candle_ms: int) -> tuple[dict[str, Any], str | None]:
        """The entry's model fields at this candle, and why the bot must be flat (None: it may trade)."""
        if self.model is None:
            return {"model_sha256": None, "model_commit": None, "model_age_days": None, "in_training_window": None}, self._model_problem
        recorded = recorded_data_end(self.model.version_info)
        data_end = None if recorded is None else epoch_ms(recorded)
        close_ms = candle_ms + self.feed.timeframe_ms
        fields = {
            "model_sha256": self.model.model_sha256,
            "model_commit": self.model.version_info.get("git_commit"),
            "model_age_days": None if data_end is None else (close_ms - data_end) / DAY_MS,
            "in_training_window": None if data_end is None else candle_ms <= data_end,
        }
        if data_end is None:
            return fields, f"model {self.model.model_sha256} records no train_end or data_end: its age is unknown"
        if fields["model_age_days"] > self.settings.max_model_age_days:
            return fields, (
                f"stale model: its data ends {iso_utc(data_end)}, {fields['model_age_days']:.1f} days before this candle "
                f"closed, over monitor.max_model_age_days {self.settings.max_model_age_days:g}"
            )
        return fields, None

    # --- features -------------------------------------------------------------------------------------------
    def _seed(self, candles: list[Candle], reason: str) -> dict[str, Any]:
        self.state = FeatureState.seed(candles, self.feed.timeframe_ms, now_ms=candles[-1][0] + self.feed.timeframe_ms)
        self.recent.clear()
        self.recent.extend(candles)
        return {"from": iso_utc(candles[0][0]), "candles": len(candles), "reason": reason}

    def _advance(self, candle: Candle) -> dict[str, Any] | None:
        """Bring the state to this candle; the `seed` field when it was (re-)seeded at it."""
        if self.state is None or self._reseed_reason is not None:
            history = self.feed.history(candle[0], self.settings.seed_candles)
            if len(history) < self.settings.seed_candles or history[-1][0] != candle[0]:
                raise FeedError(f"{self.feed.name}: no {self.settings.seed_candles} candles of history up to {iso_utc(candle[0])}")
            seeded = self._seed(history, self._reseed_reason or "start")
            self._reseed_reason = None
            return seeded
        try:
            self.state.update(candle, now_ms=candle[0] + self.feed.timeframe_ms)
        except CandleSequenceError as refused:
            if refused.kind != GAP:
                raise
            missing = (candle[0] - self.state.last_timestamp) // self.feed.timeframe_ms - 1
            reason = f"gap: {missing} candle(s) missing after {iso_utc(self.state.last_timestamp)}"
            log.warning("%s; re-seeding from the last %d candles", reason, self.settings.seed_candles)
            return self._seed([*self.recent, candle][-self.settings.seed_candles :], reason)
        self.recent.append(candle)
        return None

    # --- one candle -----------------------------------------------------------------------------------------
    def _skip_reason(self, candle: Candle) -> str | None:
        timestamp = candle[0]
        if timestamp % self.feed.timeframe_ms:
            return "off the candle grid"
        if self.last is not None:
            last_ms = epoch_ms(self.last["t"])
            if timestamp == last_ms:
                return "a duplicate of the last journalled candle"
            if timestamp < last_ms:
                return f"older than the last journalled candle, {self.last['t']}"
        return None

    def step(self, candle: Candle) -> Entry | None:
        """Journal one closed candle (the module docstring's steps); None when it is skipped."""
        skipped = self._skip_reason(candle)
        if skipped is not None:
            log.warning("candle %s skipped: %s", iso_utc(candle[0]), skipped)
            return None
        return self._journal(candle, self._advance(candle))

    def _journal(self, candle: Candle, seeded: dict[str, Any] | None) -> Entry:
        """P(up), the position and the P&L of the candle the state has just seen, appended to the journal."""
        self._refresh_model()
        model_fields, flat_reason = self._model_fields(candle[0])
        p_up = None if self.model is None else float(self.model.predict_proba(self.state.features[np.newaxis, :])[0, 1])  # type: ignore[union-attr]
        previous = Holding() if self.last is None else Holding(self.last["position"], self.last["held"])
        holding = Holding() if flat_reason is not None or self.model is None else self.model.next_holding(p_up, previous)  # type: ignore[arg-type]
        entry = self._entry(candle, p_up, holding, previous, model_fields)
        if seeded is not None:
            entry[SEED] = seeded
        if flat_reason is not None:
            entry["flat_reason"] = flat_reason
            if self.last is None or self.last.get("flat_reason") != flat_reason:
                log.warning("candle %s: flat: %s", entry["t"], flat_reason)
        if self.last is not None and self.last["model_sha256"] != entry["model_sha256"]:
            entry["model_switch"] = {"from": self.last["model_sha256"]}
            log.info("candle %s: model switch %s -> %s", entry["t"], self.last["model_sha256"], entry["model_sha256"])
        self.journal.append(entry)
        self.last = entry
        self.journalled += 1
        return entry

    def _entry(self, candle: Candle, p_up: float | None, holding: Holding, previous: Holding, model_fields: dict[str, Any]) -> Entry:
        """The journal fields of a candle: backtest's convention (module docstring, point 5)."""
        close = candle[4]
        bar_return = 0.0 if self.last is None else previous.position * (close / self.last["close"] - 1.0)
        changes = abs(holding.position - previous.position)
        cost = self.settings.cost_per_side * changes
        equity = (1.0 if self.last is None else self.last["equity"]) * (1.0 + bar_return) * (1.0 - self.settings.cost_per_side) ** changes
        return {
            "t": iso_utc(candle[0]),
            "close": close,
            "p_up": p_up,
            "position": holding.position,
            "held": holding.bars,
            "return": bar_return,
            "cost": cost,
            "equity": equity,
            **model_fields,
        }

    # --- start, restart, run --------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """A resumed run's state, exactly as it was after the last journalled candle (module docstring)."""
        resume = self.journal.resume
        if resume.last is None:
            return
        anchor, last = resume.anchor, resume.last
        if anchor is None:
            self._reseed_reason = "restart: the journal records no seed"
            return
        seed_count = int(anchor[SEED]["candles"])
        needed = seed_count + resume.since_anchor
        limit = self.feed.rebuild_limit
        if limit is not None and needed > limit:
            self._reseed_reason = f"restart: rebuilding the state would re-read {needed} candles, over {limit}"
            log.warning("%s: the next candle is seeded afresh", self._reseed_reason)
            return
        candles = self.feed.history(epoch_ms(last["t"]), needed)
        expected = (anchor[SEED]["from"], anchor["t"], last["t"], last["close"])
        found = (iso_utc(candles[0][0]), iso_utc(candles[seed_count - 1][0]), iso_utc(candles[-1][0]), candles[-1][4]) if len(candles) == needed else None
        if found != expected:
            self._reseed_reason = f"restart: {self.feed.name} no longer holds the journalled candles since {anchor[SEED]['from']}"
            log.warning("%s: the next candle is seeded afresh", self._reseed_reason)
            return
        self._seed(candles[:seed_count], "rebuild")
        for candle in candles[seed_count:]:
            self.state.update(candle, now_ms=candle[0] + self.feed.timeframe_ms)  # type: ignore[union-attr]
            self.recent.append(candle)
        log.info("resumed after %s: state rebuilt from %d candles", last["t"], needed)

    def start(self) -> None:
        """Seed a new journal from the feed's history and journal its last candle, or rebuild a resumed run's state."""
        if self.journal.resume.last is not None:
            self._rebuild()
            return
        history = self.feed.start(self.settings.seed_candles)
        self._journal(history[-1], self._seed(history, "start"))

    def run(self, max_candles: int | None = None) -> int:
        """Poll, journal, wait, until the feed ends (a replay) or max_candles were journalled in all; the number
        journalled by this bot."""
        while True:
            try:
                if not self._started:
                    self.start()
                    self._started = True
                for candle in self.feed.poll(epoch_ms(self.last["t"])):  # type: ignore[index]
                    self.step(candle)
                    if max_candles is not None and self.journalled >= max_candles:
                        return self.journalled
            except FeedError as exc:
                log.warning("%s: polling again in %g s", exc, self.settings.poll_seconds)
            if max_candles is not None and self.journalled >= max_candles or not self.feed.wait():
                return self.journalled


def journal_header(feed: Feed, settings: BotSettings) -> dict[str, Any]:
    """What a journal is about: a run with another header may not append to it."""
    return {
        "feed": feed.name,
        "symbol": settings.symbol,
        "timeframe": settings.timeframe,
        "cost_per_side": settings.cost_per_side,
        "seed_candles": settings.seed_candles,
    }


def run_paper_bot(
    journal_path: Path, model_dir: Path, params_path: Path, replay: Path | None = None, max_candles: int | None = None
) -> tuple[int, Entry | None]:
    """`cryptoml bot --paper`: build the feed, open the journal, run; the candles journalled and the last entry."""
    settings = read_settings(params_path)
    feed: Feed
    if replay is not None:
        feed = ReplayFeed(replay, timeframe_ms(settings.timeframe))
    else:
        feed = ExchangeFeed(
            settings.exchange_id,
            settings.symbol,
            settings.timeframe,
            api_url=settings.api_url,
            poll_seconds=settings.poll_seconds,
            timeout_seconds=settings.timeout_seconds,
            max_retries=settings.max_retries,
            backoff_seconds=settings.backoff_seconds,
            rebuild_limit=settings.max_rebuild_candles,
        )
    # A replay's lines are not fsync'd: a SIGKILL loses nothing written without it (the page cache outlives the
    # process), only a power cut would, and a replay can be run again; live, one fsync an hour costs nothing.
    with Journal(journal_path, journal_header(feed, settings), fsync=replay is None) as journal:
        bot = PaperBot(feed, journal, model_dir, settings)
        return bot.run(max_candles), bot.last
