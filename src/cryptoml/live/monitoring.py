"""`cryptoml monitor`: is the production model going stale or wrong, before it costs money?

Three kinds of check, each ok, warn or alert, with limits from params.yaml (`monitor:`):

* Drift: the population stability index (cryptoml.model.drift) of each feature on the recent rows against the
  distribution stored with the model at training (`feature_reference` in its metadata), so only the production
  directory is needed. For the features in monitor.drift_features (by default those without a price or volume unit:
  returns_1, rsi_14, bb_position, zscore, volume_ratio): warn at PSI >= monitor.psi_warn, alert at >=
  monitor.psi_alert. The others (close, volume, the EMAs, MACD, ATR) move with the price level, so their PSI against
  a long training window is high whenever the market trends (0.3 to 6.6 on a synthetic continuation whose live ROC
  AUC held); they are reported as "info". List them in monitor.drift_features to alert on them: trees cannot
  extrapolate beyond the prices they were fitted on.
* Live performance: the model's scores on recent rows whose label is now known (the label definition stored with
  the model), beside its holdout scores; a failed rule (monitor.live) is an alert. With fewer than
  monitor.min_rows labelled rows, or one class only, a rule is reported as skipped, never as passed.
* Age: days from the end of the model's data window (data.end) to `now`; over monitor.max_model_age_days it is a
  warning, or an alert when monitor.refuse_stale_predictions makes `cryptoml predict` refuse the model.

Recent rows: a row counts when LIVE_WINDOW closed candles end at it (its features then equal those `cryptoml
predict` served) and it lies after the last row the model was fitted on (training_info.data_end), so training rows
never flatter the live scores. The report says how many rows were excluded and why. The overall status is the worst
level; a skipped rule does not raise it. Any alert, and an over-age model, recommends a retrain.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from cryptoml.candles.store import summarize_candles
from cryptoml.config import LiveRules, MonitorParams
from cryptoml.features.manager import LIVE_WINDOW, FeatureManager
from cryptoml.features.spec import FEATURE_NAMES
from cryptoml.io import rounded_json
from cryptoml.live.predict import iso_utc, model_age_days, model_data_end, read_closed_candles
from cryptoml.model.drift import bin_fractions, population_stability_index
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.evaluation import classification_metrics
from cryptoml.model.labels import make_labels
from cryptoml.release.promotion import METADATA_NAME, read_production_metadata

log = logging.getLogger(__name__)

Level = Literal["ok", "info", "skipped", "warn", "alert"]
# A skipped rule is shown, but it is no evidence either way, so it does not raise the status; nor does an "info"
# drift (a feature not in monitor.drift_features).
_SEVERITY: dict[str, int] = {"ok": 0, "info": 0, "skipped": 0, "warn": 1, "alert": 2}
EXIT_CODES: dict[str, int] = {"ok": 0, "warn": 2, "alert": 3}
LIVE_METRICS: tuple[str, ...] = (
    "roc_auc", "log_loss", "brier", "f1", "mcc", "precision", "recall", "positive_rate", "signal_rate"
)


@dataclass(frozen=True)
class Check:
    """One monitored quantity against its limit; `message` says so in a sentence."""

    kind: Literal["drift", "live", "age"]
    name: str
    level: Level
    value: float | None
    limit: float | None
    message: str


@dataclass(frozen=True)
class FeatureDrift:
    """A feature's PSI and the fractions behind it, bin by bin (right-closed bins between `edges`)."""

    feature: str
    psi: float
    edges: list[float]
    reference: list[float]
    recent: list[float]


@dataclass(frozen=True)
class RowCounts:
    """Where the feature rows of the input went: monitored, or excluded and why."""

    closed_candles: int
    open_candles_skipped: int
    warm_up: int  # fewer than LIVE_WINDOW candles end at the row
    training_period: int  # at or before the last row the model was fitted on
    monitored: int  # drift is measured on these
    label_unknown: int  # the label's horizon has not passed yet
    labelled: int  # live performance is measured on these


@dataclass(frozen=True)
class MonitorReport:
    """Everything `cryptoml monitor` found, for the table, the JSON, the HTML report and the alert."""

    status: Level
    now: pd.Timestamp
    model_sha256: str
    data_end: pd.Timestamp
    training_end: pd.Timestamp
    age_days: float
    first_row: pd.Timestamp
    last_row: pd.Timestamp
    rows: RowCounts
    drift: list[FeatureDrift]
    live_metrics: dict[str, float] | None
    holdout_metrics: dict[str, float]
    prior_log_loss: float | None
    checks: list[Check]

    @property
    def retrain_recommended(self) -> bool:
        """On any alert (a window that ends now is the remedy for drift too) and on age, which only a retrain fixes."""
        return any(check.level == "alert" or (check.kind == "age" and check.level != "ok") for check in self.checks)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def as_json(self) -> dict[str, Any]:
        """Plain JSON, floats rounded like every metrics file."""
        return rounded_json(
            {
                "status": self.status,
                "retrain_recommended": self.retrain_recommended,
                "now": iso_utc(self.now),
                "model_sha256": self.model_sha256,
                "data_end": iso_utc(self.data_end),
                "training_end": iso_utc(self.training_end),
                "model_age_days": self.age_days,
                "monitored_window": {"first": iso_utc(self.first_row), "last": iso_utc(self.last_row)},
                "rows": asdict(self.rows),
                "drift": {
                    item.feature: {"psi": item.psi, "edges": item.edges, "reference": item.reference, "recent": item.recent}
                    for item in self.drift
                },
                "live_metrics": self.live_metrics,
                "holdout_metrics": self.holdout_metrics,
                "class_prior_log_loss": self.prior_log_loss,
                "checks": [asdict(check) for check in self.checks],
            }
        )


# --- what the model's metadata must hold ---------------------------------------------------------


def _metadata_value(metadata: Mapping[str, Any], dotted: str, source: str) -> Any:
    node: Any = metadata
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"{source} has no {dotted!r}: it was not written by this version's train stage; retrain it")
        node = node[key]
    return node


def feature_reference_of(metadata: Mapping[str, Any], source: str) -> dict[str, dict[str, list[float]]]:
    """The per-feature training distribution stored with the model, checked bin by bin."""
    if "feature_reference" not in metadata:
        raise ValueError(
            f"{source} has no feature_reference: the model was trained before drift monitoring existed; "
            "retrain it (`cryptoml retrain`, or `dvc repro` then commit) to monitor its drift"
        )
    features = _metadata_value(metadata, "feature_reference.features", source)
    missing = [name for name in FEATURE_NAMES if name not in features]
    if missing:
        raise ValueError(f"{source}: feature_reference lacks feature(s) {missing}; expected {list(FEATURE_NAMES)}")
    for name in FEATURE_NAMES:
        edges, fractions = features[name].get("edges", []), features[name].get("fractions", [])
        if not edges or len(fractions) != len(edges) + 1 or np.any(np.diff(edges) <= 0):
            raise ValueError(
                f"{source}: feature_reference.features.{name} needs strictly increasing edges and one fraction more "
                f"than edges; got {len(edges)} edge(s) and {len(fractions)} fraction(s)"
            )
    return {name: features[name] for name in FEATURE_NAMES}


# --- the checks, as pure functions -------------------------------------------------------------


def feature_drift(reference: Mapping[str, Mapping[str, Sequence[float]]], features: pd.DataFrame) -> list[FeatureDrift]:
    """PSI of every referenced feature column of `features` against its training bins."""
    return [
        FeatureDrift(
            feature=name,
            psi=population_stability_index(bins["edges"], bins["fractions"], features[name]),
            edges=list(bins["edges"]),
            reference=list(bins["fractions"]),
            recent=bin_fractions(bins["edges"], features[name], f"feature {name!r}").tolist(),
        )
        for name, bins in reference.items()
    ]


def drift_checks(drift: Sequence[FeatureDrift], settings: MonitorParams) -> list[Check]:
    checks = []
    for item in drift:
        if item.feature not in settings.drift_features:
            level, limit, sentence = "info", None, "(not in monitor.drift_features: shown, never alerted on)"
        elif item.psi >= settings.psi_alert:
            level, limit, sentence = "alert", settings.psi_alert, f">= monitor.psi_alert {settings.psi_alert:g}"
        elif item.psi >= settings.psi_warn:
            level, limit, sentence = "warn", settings.psi_warn, f">= monitor.psi_warn {settings.psi_warn:g}"
        else:
            level, limit, sentence = "ok", settings.psi_warn, f"< monitor.psi_warn {settings.psi_warn:g}"
        checks.append(Check("drift", item.feature, level, item.psi, limit, f"{item.feature}: PSI {item.psi:.4f} {sentence}"))
    return checks


# monitor.live rule -> (what it measures, its value from the live metrics and the class prior's log loss, higher is better)
_LIVE_RULES: dict[str, tuple[str, Callable[[Mapping[str, float], float], float], bool]] = {
    "min_roc_auc": ("live ROC AUC", lambda metrics, prior_log_loss: metrics["roc_auc"], True),
    "max_log_loss_ratio": ("live log loss / the class prior's", lambda metrics, prior_log_loss: metrics["log_loss"] / prior_log_loss, False),
    "min_f1": ("live F1", lambda metrics, prior_log_loss: metrics["f1"], True),
}


def live_checks(
    metrics: Mapping[str, float] | None, prior_log_loss: float | None, rules: LiveRules, skipped_because: str
) -> list[Check]:
    """The enabled live rules, a failure being an alert; without metrics each is skipped, saying why."""
    checks = []
    for name, limit in rules.model_dump().items():
        if limit is None:
            continue
        described, value_of, higher_is_better = _LIVE_RULES[name]
        if metrics is None or prior_log_loss is None:
            checks.append(Check("live", name, "skipped", None, limit, f"{described}: skipped ({skipped_because})"))
            continue
        value = value_of(metrics, prior_log_loss)
        passed = value >= limit if higher_is_better else value <= limit
        sign = (">=" if passed else "<") if higher_is_better else ("<=" if passed else ">")
        message = f"{described}: {value:.4f} {sign} monitor.live.{name} {limit:g}"
        checks.append(Check("live", name, "ok" if passed else "alert", value, limit, message))
    return checks


def age_check(data_end: pd.Timestamp, age_days: float, settings: MonitorParams) -> Check:
    """Over the limit is a warning, or an alert when predictions from a stale model are refused."""
    limit = settings.max_model_age_days
    described = f"model data ends {iso_utc(data_end)}, {age_days:.1f} days ago"
    if age_days <= limit:
        message = f"{described}: <= monitor.max_model_age_days {limit:g}"
        return Check("age", "max_model_age_days", "ok", age_days, limit, message)
    refused = settings.refuse_stale_predictions
    message = f"{described}: > monitor.max_model_age_days {limit:g}"
    if refused:
        message += "; `cryptoml predict` refuses it (monitor.refuse_stale_predictions)"
    return Check("age", "max_model_age_days", "alert" if refused else "warn", age_days, limit, message)


def overall_status(checks: Sequence[Check]) -> Level:
    worst = max((_SEVERITY[check.level] for check in checks), default=0)
    return next(level for level in ("ok", "warn", "alert") if _SEVERITY[level] == worst)


# --- assembling the report -------------------------------------------------------------------


def _monitored_rows(
    features: pd.DataFrame, closed: pd.DataFrame, training_end: pd.Timestamp
) -> tuple[pd.DataFrame, int, int]:
    """The feature rows of candles with a full live window after the training rows, and how many candles were left
    out for lack of a window and for being training rows."""
    full_window = np.arange(len(closed)) >= LIVE_WINDOW - 1  # LIVE_WINDOW - 1 >= the feature warm-up
    after_training = (closed["timestamp"] > training_end).to_numpy()
    kept = closed["timestamp"][full_window & after_training]
    return features.loc[kept], int((~full_window).sum()), int((full_window & ~after_training).sum())


def _live_scores(
    model: ProductionEnsemble, X: pd.DataFrame, y: np.ndarray, prior: float, min_rows: int
) -> tuple[dict[str, float] | None, float | None, str]:
    """(live metrics, the class prior's log loss on the same rows, why they are missing) at the model's threshold.

    The prior is the training rows' positive rate as a constant P(up), the class_prior baseline of evaluate.
    """
    if len(y) < min_rows:
        return None, None, f"{len(y)} labelled row(s) < monitor.min_rows={min_rows}"
    if len(np.unique(y)) < 2:
        return None, None, f"all {len(y)} labelled rows have label {int(y[0])}: the scores are undefined on one class"
    threshold = model.decision_threshold
    metrics = classification_metrics(y, model.predict_proba(X)[:, 1], threshold)
    prior_log_loss = classification_metrics(y, np.full(len(y), prior), threshold)["log_loss"]
    return {key: metrics[key] for key in LIVE_METRICS}, prior_log_loss, ""


def monitor(
    closed: pd.DataFrame,
    model: ProductionEnsemble,
    metadata: Mapping[str, Any],
    settings: MonitorParams,
    now: pd.Timestamp,
    *,
    source: str,
    open_candles_skipped: int = 0,
) -> MonitorReport:
    """Check the model on closed candles (oldest first); `source` names the candles in errors."""
    meta_source = f"the metadata of model {model.model_sha256_}"
    reference = feature_reference_of(metadata, meta_source)
    training_end = pd.Timestamp(_metadata_value(metadata, "training_info.data_end", meta_source)).tz_convert("UTC")
    label = _metadata_value(metadata, "training_info.label", meta_source)
    prior = float(_metadata_value(metadata, "training_info.positive_rate", meta_source))
    holdout = dict(_metadata_value(metadata, "performance_metrics", meta_source))
    try:
        features = FeatureManager().generate_features(closed)
    except ValueError as exc:
        raise ValueError(f"{source}: {len(closed)} closed candle(s): {exc}") from None
    recent, warm_up, training_period = _monitored_rows(features, closed, training_end)
    if len(recent) < settings.min_rows:
        raise ValueError(
            f"{source}: {len(recent)} row(s) to monitor, monitor.min_rows={settings.min_rows} needed. A row counts when "
            f"{LIVE_WINDOW} closed candles end at it (LIVE_WINDOW) and it is after the model's training rows, which end "
            f"{iso_utc(training_end)}; of {len(closed)} closed candles, {warm_up} lack the window and {training_period} "
            f"are training rows: give at least {settings.min_rows} candles after {iso_utc(training_end)} and the "
            f"{LIVE_WINDOW - 1} before them"
        )
    labels = make_labels(closed.set_index("timestamp")["close"], int(label["horizon"]), float(label["threshold"]))
    known = recent.index.isin(labels.index)
    y = labels.reindex(recent.index[known]).to_numpy()
    live_metrics, prior_log_loss, skipped_because = _live_scores(model, recent[known], y, prior, settings.min_rows)
    data_end = model_data_end(model)
    age = model_age_days(data_end, now)
    drift = feature_drift(reference, recent)
    checks = [
        *drift_checks(drift, settings),
        *live_checks(live_metrics, prior_log_loss, settings.live, skipped_because),
        age_check(data_end, age, settings),
    ]
    return MonitorReport(
        status=overall_status(checks),
        now=now,
        model_sha256=str(model.model_sha256_),
        data_end=data_end,
        training_end=training_end,
        age_days=age,
        first_row=recent.index[0],
        last_row=recent.index[-1],
        rows=RowCounts(
            closed_candles=len(closed),
            open_candles_skipped=open_candles_skipped,
            warm_up=warm_up,
            training_period=training_period,
            monitored=len(recent),
            label_unknown=int((~known).sum()),
            labelled=len(y),
        ),
        drift=drift,
        live_metrics=live_metrics,
        holdout_metrics={key: float(value) for key, value in holdout.items() if key in LIVE_METRICS},
        prior_log_loss=prior_log_loss,
        checks=checks,
    )


def run_monitor(
    csv_path: Path, timeframe: str, model_dir: Path, settings: MonitorParams, now: pd.Timestamp | None = None
) -> MonitorReport:
    """The I/O edge: read and validate the candles, load the model and its metadata, check."""
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    candles, closed = read_closed_candles(csv_path, timeframe, now)
    report = summarize_candles(closed, timeframe)
    if report.gaps:
        log.warning(
            "%s: %d gap(s) (%d missing candle(s)): the indicators treat the candles around a gap as consecutive",
            csv_path, report.gaps, report.missing_candles,
        )
    model = ProductionEnsemble.load(model_dir)
    metadata = read_production_metadata(model_dir)
    if metadata is None:
        raise ValueError(
            f"{model_dir / METADATA_NAME}: missing, or it describes another model than {model.model_sha256_}: "
            "monitoring needs a model promoted by `cryptoml promote`"
        )
    skipped = len(candles) - len(closed)
    return monitor(closed, model, metadata, settings, now, source=str(csv_path), open_candles_skipped=skipped)


def parse_now(value: str | None) -> pd.Timestamp | None:
    """--now as a UTC time; a time without an offset is read as UTC, as `cryptoml retrain --until` does."""
    if value is None:
        return None
    try:
        moment = pd.Timestamp(value)
    except ValueError:
        moment = pd.NaT
    if pd.isna(moment):
        raise ValueError(f"--now: expected an ISO-8601 UTC time such as 2025-01-06T00:00:00Z, got {value!r}")
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


# --- output ---------------------------------------------------------------------------------------


def _rows_sentence(report: MonitorReport) -> str:
    rows = report.rows
    return (
        f"{rows.monitored} rows monitored ({iso_utc(report.first_row)} .. {iso_utc(report.last_row)}), "
        f"{rows.labelled} with a known label; left out: {rows.warm_up} warm-up candles (fewer than {LIVE_WINDOW} "
        f"up to them), {rows.training_period} training rows (up to {iso_utc(report.training_end)}), "
        f"{rows.open_candles_skipped} open candle(s)"
    )


def format_report(report: MonitorReport) -> str:
    """The table a person reads in a terminal."""
    lines = [
        f"status: {report.status.upper()}   model {report.model_sha256}   now {iso_utc(report.now)}",
        _rows_sentence(report),
        "",
        f"{'feature':<14} {'PSI':>8}  level",
    ]
    levels = {check.name: check.level for check in report.checks if check.kind == "drift"}
    lines += [f"{item.feature:<14} {item.psi:>8.4f}  {levels[item.feature]}" for item in report.drift]
    lines += ["", f"{'metric':<14} {'live':>8} {'holdout':>8}"]
    for key in LIVE_METRICS:
        live = f"{report.live_metrics[key]:>8.4f}" if report.live_metrics else f"{'-':>8}"
        holdout = f"{report.holdout_metrics[key]:>8.4f}" if key in report.holdout_metrics else f"{'-':>8}"
        lines.append(f"{key:<14} {live} {holdout}")
    if report.prior_log_loss is not None:
        lines.append(f"{'prior log_loss':<14} {report.prior_log_loss:>8.4f}   (training positive rate as P(up), same rows)")
    lines += ["", *(f"[{check.level:>7}] {check.message}" for check in report.checks if check.kind != "drift")]
    if report.retrain_recommended:
        lines.append("retrain recommended: `cryptoml retrain`")
    return "\n".join(lines) + "\n"


def alert_message(report: MonitorReport) -> str:
    """One short webhook message: what crossed which limit, and what to do."""
    problems = [check for check in report.checks if _SEVERITY[check.level] > 0]
    lines = [
        f"cryptoml monitor: {report.status.upper()} for model {report.model_sha256[:19]} "
        f"({report.rows.monitored} recent rows up to {iso_utc(report.last_row)})"
    ]
    lines += [f"- {check.level}: {check.message}" for check in problems]
    if report.retrain_recommended:
        lines.append("retrain recommended: `cryptoml retrain`")
    return "\n".join(lines)


_COLOURS = {"ok": "#2e7d32", "info": "#1565c0", "skipped": "#757575", "warn": "#ef6c00", "alert": "#c62828"}
_REFERENCE_COLOUR = "#9e9e9e"
_BAR_WIDTH, _BAR_GAP, _CHART_HEIGHT = 9, 4, 60


def _badge(level: str) -> str:
    return f'<span class="level" style="background:{_COLOURS[level]}">{level}</span>'


def _histogram_svg(item: FeatureDrift, colour: str) -> str:
    """Training (grey) and recent (the level's colour) fractions side by side, bin by bin, on a shared scale."""
    top = max(*item.reference, *item.recent)
    bars = []
    for position, (reference, recent) in enumerate(zip(item.reference, item.recent, strict=True)):
        x = position * (2 * _BAR_WIDTH + _BAR_GAP)
        for offset, fraction, fill in ((0, reference, _REFERENCE_COLOUR), (_BAR_WIDTH, recent, colour)):
            height = _CHART_HEIGHT * fraction / top
            bars.append(
                f'<rect x="{x + offset}" y="{_CHART_HEIGHT - height:.1f}" width="{_BAR_WIDTH - 1}" '
                f'height="{height:.1f}" fill="{fill}"><title>bin {position + 1}: {fraction:.1%}</title></rect>'
            )
    width = len(item.reference) * (2 * _BAR_WIDTH + _BAR_GAP)
    label = f"{html.escape(item.feature)}: fraction of rows per bin, training vs recent"
    return f'<svg width="{width}" height="{_CHART_HEIGHT}" role="img" aria-label="{label}">{"".join(bars)}</svg>'


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_html(report: MonitorReport) -> str:
    """A self-contained page (inline CSS and SVG, no script, no external asset) a person can open anywhere."""
    levels = {check.name: check.level for check in report.checks if check.kind == "drift"}
    drift_rows = "".join(
        f'<tr><td>{html.escape(item.feature)}</td><td class="num">{item.psi:.4f}</td>'
        f"<td>{_badge(levels[item.feature])}</td><td>{_histogram_svg(item, _COLOURS[levels[item.feature]])}</td></tr>"
        for item in report.drift
    )
    live = report.live_metrics or {}
    metric_rows = "".join(
        f'<tr><td>{key}</td><td class="num">{_number(live.get(key))}</td>'
        f'<td class="num">{_number(report.holdout_metrics.get(key))}</td></tr>'
        for key in LIVE_METRICS
    )
    check_items = "".join(
        f"<li>{_badge(check.level)} {html.escape(check.message)}</li>" for check in report.checks if check.kind != "drift"
    )
    advice = "<p><strong>Retrain recommended:</strong> <code>cryptoml retrain</code></p>" if report.retrain_recommended else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cryptoml monitor: {report.status}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #212121; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border-bottom: 1px solid #e0e0e0; padding: 4px 10px; text-align: left; vertical-align: middle; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.level {{ color: white; border-radius: 3px; padding: 1px 6px; font-size: 90%; }}
.key {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }}
</style></head><body>
<h1>cryptoml monitor: {_badge(report.status)}</h1>
<p>Model <code>{html.escape(report.model_sha256)}</code>, checked at {iso_utc(report.now)}.</p>
<p>{html.escape(_rows_sentence(report))}.</p>
<h2>Feature drift</h2>
<p>Population stability index of each feature against the rows the model was fitted on, over the deciles of those
rows: <span class="key" style="background:{_REFERENCE_COLOUR}"></span>training
<span class="key" style="background:{_COLOURS["ok"]}"></span>recent (coloured by level).</p>
<table><tr><th>feature</th><th>PSI</th><th>level</th><th>fraction of rows per bin</th></tr>{drift_rows}</table>
<h2>Live performance</h2>
<table><tr><th>metric</th><th>live</th><th>holdout</th></tr>{metric_rows}
<tr><td>class-prior log_loss</td><td class="num">{_number(report.prior_log_loss)}</td><td></td></tr></table>
<h2>Rules</h2>
<ul>{check_items}</ul>
{advice}
</body></html>
"""


# --- the paper bot's journal (`cryptoml monitor --journal`) ----------------------------------------------------

JOURNAL_METRICS: tuple[str, ...] = ("roc_auc", "log_loss", "brier", "positive_rate")


@dataclass(frozen=True)
class JournalReport:
    """The paper bot's live record: its after-cost P&L beside buy-and-hold, and its P(up) against what happened."""

    status: Level
    feed: str
    candles: int
    first: str
    last: str
    paper_return: float  # after costs, through the last journalled candle's position change
    buy_and_hold_return: float  # close of the last candle / close of the first - 1
    trades: int  # entries into a long position
    long_fraction: float
    costs: float  # sum of the per-change costs paid (fractions of the value traded)
    flat_reasons: dict[str, int]  # candles forced flat, by the first words of the reason
    model_switches: int
    reseeds: int  # seeds after the first (gaps and restarts)
    scored_rows: int  # rows with a P(up) and a known label, outside the model's training window
    live_metrics: dict[str, float] | None
    prior_log_loss: float | None
    checks: list[Check]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def as_json(self) -> dict[str, Any]:
        return rounded_json({**asdict(self), "checks": [asdict(check) for check in self.checks]})


def journal_report(path: Path, label_horizon: int, label_threshold: float, settings: MonitorParams) -> JournalReport:
    """Read a journal (cryptoml.live.journal) and score it. Labels are params' label.horizon / label.threshold on
    the journalled closes (consecutive entries, as the features read them); the class prior is these rows' own
    positive rate, a baseline that knows the base rate in hindsight, so the log-loss rule is a strict one."""
    from cryptoml.live.journal import read_journal

    header, entries = read_journal(path)
    if not entries:
        raise ValueError(f"{path}: no candle journalled yet")
    frame = pd.DataFrame(entries)
    close = pd.Series(frame["close"].to_numpy(), index=pd.to_datetime(frame["t"], utc=True))
    labels = make_labels(close, label_horizon, label_threshold)
    scored = frame.set_index(close.index).loc[labels.index]
    scored = scored[scored["p_up"].notna() & (scored["in_training_window"] != True)]  # noqa: E712 (None is not True)
    y = labels.loc[scored.index].to_numpy()
    metrics = prior = None
    skipped_because = f"{len(y)} scored row(s) < monitor.min_rows={settings.min_rows}"
    if len(y) >= settings.min_rows and len(np.unique(y)) == 2:
        scores = classification_metrics(y, scored["p_up"].to_numpy(dtype=np.float64), 0.5)
        metrics = {key: scores[key] for key in JOURNAL_METRICS}
        prior = classification_metrics(y, np.full(len(y), y.mean()), 0.5)["log_loss"]
    elif len(y) >= settings.min_rows:
        skipped_because = f"all {len(y)} scored rows have label {int(y[0])}"
    checks = live_checks(metrics, prior, settings.live, skipped_because)
    last_reason = entries[-1].get("flat_reason")
    if last_reason:
        checks.append(Check("age", "flat", "warn", None, None, f"the bot is flat at {entries[-1]['t']}: {last_reason}"))
    positions = frame["position"].to_numpy()
    reasons = frame.get("flat_reason", pd.Series(dtype=object)).dropna()
    return JournalReport(
        status=overall_status(checks),
        feed=str(header.get("feed")),
        candles=len(entries),
        first=entries[0]["t"],
        last=entries[-1]["t"],
        paper_return=float(entries[-1]["equity"]) - 1.0,
        buy_and_hold_return=float(close.iloc[-1] / close.iloc[0] - 1.0),
        trades=int(np.count_nonzero(np.diff(positions, prepend=0) == 1)),
        long_fraction=float(positions.mean()),
        costs=float(frame["cost"].sum()),
        flat_reasons={str(reason): int(count) for reason, count in reasons.str.split(":").str[0].value_counts().items()},
        model_switches=int(frame["model_switch"].notna().sum()) if "model_switch" in frame else 0,
        reseeds=int(frame["seed"].notna().sum()) - 1 if "seed" in frame else 0,
        scored_rows=len(y),
        live_metrics=metrics,
        prior_log_loss=prior,
        checks=checks,
    )


def format_journal_report(report: JournalReport) -> str:
    lines = [
        f"status: {report.status.upper()}   paper bot journal ({report.feed}): {report.candles} candles, {report.first} .. {report.last}",
        f"paper return after costs {report.paper_return:+.2%}   buy-and-hold {report.buy_and_hold_return:+.2%}   "
        f"{report.trades} trade(s), long {report.long_fraction:.1%} of candles, costs {report.costs:.4f}",
        f"model switches {report.model_switches}, re-seeds {report.reseeds}, "
        f"flat candles by reason: {report.flat_reasons or 'none'}",
        f"{report.scored_rows} rows scored (a P(up), a known label, after the model's training window)",
    ]
    if report.live_metrics:
        lines.append("   ".join(f"{key} {value:.4f}" for key, value in report.live_metrics.items()) + f"   prior log_loss {report.prior_log_loss:.4f}")
    lines += [f"[{check.level:>7}] {check.message}" for check in report.checks]
    return "\n".join(lines) + "\n"
