"""The params.yaml schema: one typed, validated object, with the offending key named in every error."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from cryptoml.candles.timeframe import parse_timeframe
from cryptoml.features.spec import FEATURE_NAMES
from cryptoml.model.artifacts import validate_weights
from cryptoml.paths import PARAMS


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and key."""


def _utc_timestamp(value: Any) -> pd.Timestamp:
    """Accept an ISO-8601 string or datetime with an explicit UTC offset; naive times are ambiguous."""
    if not isinstance(value, (str, dt.datetime, pd.Timestamp)):
        raise ValueError(f"expected an ISO-8601 UTC time such as '2024-01-01T00:00:00Z', got {value!r}")
    try:
        ts = pd.Timestamp(value)
    except ValueError as exc:
        raise ValueError(f"expected an ISO-8601 UTC time such as '2024-01-01T00:00:00Z', got {value!r}") from exc
    if ts.tzinfo is None or ts.utcoffset() != dt.timedelta(0):
        raise ValueError(f"expected a UTC time ending in 'Z' or '+00:00', got {value!r}")
    return ts.tz_convert("UTC")


UtcTimestamp = Annotated[pd.Timestamp, BeforeValidator(_utc_timestamp)]


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise; strict types catch "200" written for 200.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)


class SyntheticSource(_Section):
    seed: int = 7


class CsvSource(_Section):
    path: str = "data/external/candles.csv"


class ExchangeSource(_Section):
    id: str = "bitbank"
    symbol: str = "BTC/JPY"
    api_url: str | None = None  # override ccxt's API base URL (tests, proxies)
    max_retries: int = Field(5, ge=0)
    backoff_seconds: float = Field(1.0, ge=0)


class DataParams(_Section):
    source: Literal["synthetic", "csv", "exchange"] = "synthetic"
    timeframe: str = "1h"
    start: UtcTimestamp
    end: UtcTimestamp
    synthetic: SyntheticSource = SyntheticSource()
    csv: CsvSource = CsvSource()
    exchange: ExchangeSource = ExchangeSource()

    @field_validator("timeframe")
    @classmethod
    def _known_timeframe(cls, value: str) -> str:
        parse_timeframe(value)
        return value

    @model_validator(mode="after")
    def _window(self) -> DataParams:
        if self.start >= self.end:
            raise ValueError(f"data.start ({self.start}) must be before data.end ({self.end})")
        step = parse_timeframe(self.timeframe)
        for key in ("start", "end"):
            ts: pd.Timestamp = getattr(self, key)
            if ts != ts.floor(step):
                raise ValueError(f"data.{key} ({ts}) must be a {self.timeframe} candle boundary, e.g. {ts.floor(step)}")
        return self


class LabelParams(_Section):
    horizon: int = Field(1, ge=1)
    threshold: float = Field(3.0e-3, ge=0.0)


class SplitParams(_Section):
    holdout: float | str = 0.2  # a fraction of the rows, or a duration such as "90D"
    embargo: int = Field(24, ge=0)

    @field_validator("holdout")
    @classmethod
    def _holdout(cls, value: float | str) -> float | str:
        if isinstance(value, str):
            return _positive_duration(value)
        if not 0.0 < value < 1.0:
            raise ValueError(f"expected a fraction in (0, 1) or a duration like '90D', got {value!r}")
        return value

    @property
    def holdout_value(self) -> float | pd.Timedelta:
        return pd.Timedelta(self.holdout) if isinstance(self.holdout, str) else float(self.holdout)


def _positive_duration(value: str) -> str:
    try:
        duration = pd.Timedelta(value)
    except ValueError as exc:
        raise ValueError(f"expected a duration like '7D' or '12h', got {value!r}") from exc
    if duration <= pd.Timedelta(0):
        raise ValueError(f"the duration must be positive, got {value!r}")
    return value


class RetrainParams(_Section):
    """The retrain policy that the evaluation replays walk-forward (README: "The retrain policy")."""

    every: str = "7D"  # a new model per step of this length: what production does every week
    warmup_steps: int = Field(1, ge=1)  # steps before the span whose predictions seed the first threshold

    @field_validator("every")
    @classmethod
    def _every(cls, value: str) -> str:
        return _positive_duration(value)

    @property
    def every_value(self) -> pd.Timedelta:
        return pd.Timedelta(self.every)


class ExecutorParams(_Section):
    """Where the independent fits run; read by no DVC stage, since it never changes what they compute."""

    kind: Literal["local", "dask"] = "local"
    workers: int | None = Field(None, ge=1)  # local processes; null = one per core
    scheduler: str | None = None  # dask: "tcp://host:8786"; CRYPTOML_DASK_SCHEDULER wins


class ModelParams(_Section):
    random_state: int = 42
    n_jobs: int = Field(2, ge=1)
    weights: dict[str, float]
    lightgbm: dict[str, Any] = {}
    xgboost: dict[str, Any] = {}
    random_forest: dict[str, Any] = {}

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        validate_weights(value)
        return value

    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        return {"lightgbm": self.lightgbm, "xgboost": self.xgboost, "random_forest": self.random_forest}


class CostParams(_Section):
    """What one side of a trade costs, as a fraction of the traded value; charged on every change of position."""

    fee: float = Field(1.2e-3, ge=0.0, lt=0.5, allow_inf_nan=False)  # bitbank's taker fee: the bot takes liquidity
    slippage: float = Field(0.0, ge=0.0, lt=0.5, allow_inf_nan=False)

    @property
    def per_side(self) -> float:
        return self.fee + self.slippage


class RuleGridParams(_Section):
    low: float = Field(0.1, gt=0.0, le=1.0)
    high: float = Field(0.6, gt=0.0, le=1.0)
    step: float = Field(0.02, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> RuleGridParams:
        if self.low > self.high:
            raise ValueError(f"trading.grid.low ({self.low}) must be at most trading.grid.high ({self.high})")
        if (self.high - self.low) / self.step > 200:
            raise ValueError(f"trading.grid holds more than 200 P(up) values (low {self.low}, high {self.high}, step {self.step}): use a larger step")
        return self


class TradingParams(_Section):
    """The trading rule the bot trades: long from P(up) >= entry until P(up) < exit, both chosen from the grid."""

    grid: RuleGridParams = RuleGridParams()
    min_hold: list[int] = Field(default_factory=lambda: [1], min_length=1)  # bars a long is held at least; one is chosen

    @field_validator("min_hold")
    @classmethod
    def _whole_bars(cls, value: list[int]) -> list[int]:
        if any(bars < 1 for bars in value):
            raise ValueError(f"expected whole numbers of bars >= 1, got {value}")
        return value


class GateParams(_Section):
    """The promotion gate: absolute skill floors on the policy's out-of-sample record, then no regression against
    the champion on the rows both records share."""

    min_roc_auc: float = Field(0.52, ge=0.0, le=1.0)
    # Proper scoring rules against the constant class prior: challenger score / prior score must be below.
    max_brier_ratio: float | None = Field(1.0, gt=0.0, allow_inf_nan=False)
    max_log_loss_ratio: float | None = Field(1.01, gt=0.0, allow_inf_nan=False)
    champion_tolerance: float = Field(0.005, ge=0.0, le=1.0)  # ROC AUC the challenger may lose to the champion
    champion_log_loss_tolerance: float = Field(0.002, ge=0.0, allow_inf_nan=False)
    champion_min_shared_rows: int = Field(500, ge=1)  # fewer shared out-of-sample rows: no champion comparison
    # The economics of the walk-forward trading rule, after costs (applied when the production rule trades).
    min_rule_return: float | None = Field(0.0, gt=-1.0, allow_inf_nan=False)
    min_rule_psr: float | None = Field(0.5, ge=0.0, le=1.0)
    champion_return_tolerance: float = Field(0.01, ge=0.0, allow_inf_nan=False)  # after-cost return it may lose on shared rows
    min_f1: float | None = Field(None, ge=0.0, le=1.0)  # the original system's rule (0.6), off by default
    min_mcc: float | None = Field(None, ge=-1.0, le=1.0)


class LiveRules(_Section):
    """Rules on the production model's live scores; None turns a rule off."""

    min_roc_auc: float | None = Field(0.5, ge=0.0, le=1.0)  # below chance: the ranking has broken down
    max_log_loss_ratio: float | None = Field(1.02, gt=0.0, allow_inf_nan=False)  # live log loss / the class prior's
    min_f1: float | None = Field(None, ge=0.0, le=1.0)  # the original system's rule (0.6), off by default


# Features without a price or volume unit: a stable market gives them the same distribution in any month, so their
# drift means the market behaves differently. The others (close, volume, the EMAs, MACD, ATR) move with the price
# level and drift whenever the market trends; monitor reports their PSI without alerting on it unless listed.
DEFAULT_DRIFT_FEATURES: tuple[str, ...] = ("returns_1", "rsi_14", "bb_position", "zscore", "volume_ratio")


class MonitorParams(_Section):
    """`cryptoml monitor`: drift and live-performance limits; read by no DVC stage."""

    psi_warn: float = Field(0.1, gt=0.0, allow_inf_nan=False)
    psi_alert: float = Field(0.25, gt=0.0, allow_inf_nan=False)
    drift_features: list[str] = Field(default_factory=lambda: list(DEFAULT_DRIFT_FEATURES))
    min_rows: int = Field(200, ge=1)  # recent rows needed for drift, labelled ones for the live rules
    max_model_age_days: float = Field(14.0, gt=0.0, allow_inf_nan=False)
    refuse_stale_predictions: bool = False
    live: LiveRules = LiveRules()

    @field_validator("drift_features")
    @classmethod
    def _known_features(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; expected names among {list(FEATURE_NAMES)}")
        return names

    @model_validator(mode="after")
    def _ordered_levels(self) -> MonitorParams:
        if self.psi_warn >= self.psi_alert:
            raise ValueError(f"monitor.psi_warn ({self.psi_warn}) must be below monitor.psi_alert ({self.psi_alert})")
        return self


class BotParams(_Section):
    """`cryptoml bot --paper`: how it polls and seeds; read by no DVC stage. The bot reads these keys with yaml alone
    (cryptoml.live.bot.read_settings, which must agree with this schema: tests/test_bot.py), to stay without pandas."""

    poll_seconds: float = Field(60.0, gt=0.0, allow_inf_nan=False)  # between two polls of the exchange
    timeout_seconds: float = Field(10.0, gt=0.0, allow_inf_nan=False)  # of one request; retries: data.exchange
    seed_candles: int = Field(1000, ge=1000)  # history a FeatureState is seeded from (>= LIVE_WINDOW: ready at once)
    max_rebuild_candles: int = Field(5000, ge=1000)  # a restart re-reads at most this many candles from the exchange


class Params(_Section):
    data: DataParams
    label: LabelParams = LabelParams()
    split: SplitParams = SplitParams()
    retrain: RetrainParams = RetrainParams()
    model: ModelParams
    costs: CostParams = CostParams()
    trading: TradingParams = TradingParams()
    gate: GateParams = GateParams()
    monitor: MonitorParams = MonitorParams()
    executor: ExecutorParams = ExecutorParams()
    bot: BotParams = BotParams()

    @model_validator(mode="after")
    def _holdout_fits_the_window(self) -> Params:
        """Refuse here a holdout the data window cannot hold, not after fetch, features and train have run.

        Rows are counted on the candle grid of [data.start, data.end) (gaps only make them fewer): the features
        drop the warm-up rows and the labels the last label.horizon candles. A holdout of fewer rows than the
        warm-up plus the horizon is shorter than one indicator window: too few rows to score a model on.
        """
        from cryptoml.features.manager import FeatureManager  # heavy import, as for model.weights

        warmup, horizon = FeatureManager().warmup_rows, self.label.horizon
        step = parse_timeframe(self.data.timeframe)
        labelled = (self.data.end - self.data.start) // step - warmup - horizon
        holdout = self.split.holdout_value
        rows = holdout // step if isinstance(holdout, pd.Timedelta) else round(labelled * holdout)
        warmup_span = self.retrain.warmup_steps * (self.retrain.every_value // step)
        fewest, most = warmup + horizon, labelled - horizon - self.split.embargo - 1 - warmup_span
        if not fewest <= rows <= most:
            raise ValueError(
                f"split.holdout ({self.split.holdout!r}) holds {rows} of the {max(labelled, 0)} labelled rows of "
                f"[data.start, data.end); it must hold at least {fewest} (the feature warm-up of {warmup} rows + "
                f"label.horizon {horizon}) and at most {most} (at least one training row must precede the "
                f"retrain.warmup_steps={self.retrain.warmup_steps} steps of retrain.every={self.retrain.every} and the "
                f"purge gap of label.horizon + split.embargo rows)"
            )
        return self


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in {"missing", "extra_forbidden"}:
        message = "missing required key" if error["type"] == "missing" else "unknown key (a typo?)"
        return f"{key}: {message}"
    if not error["loc"]:  # a check across sections: its message names the keys, the input is the whole file
        return message
    return f"{key}: {message} (got {error['input']!r})"


def parse_params(raw: Any, source: str = str(PARAMS)) -> Params:
    """Validate an already-parsed params mapping; every problem is listed with its dotted key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (data:, label:, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(err)}" for err in exc.errors())
        raise ParamsError(f"{source} is invalid:\n{problems}") from None


def load_params(path: Path = PARAMS) -> Params:
    """Read and validate params.yaml once, at the start of a stage, before any output is touched."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run from the repository root") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
