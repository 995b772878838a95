"""The quality gate that decides whether a challenger replaces the production model, and the promotion.

Gate (`decide`) judges the procedure that made the challenger, through the out-of-sample record of
its retrain policy (every prediction from a model that had not seen its row), never the production
fit itself, which has seen every row. F1 at a fixed threshold cannot be the gate: on real BTC candles
a model with real skill has an out-of-sample ROC AUC near 0.55-0.6 and an F1 far below the always-up
baseline's. The absolute checks therefore ask of the policy's pooled predictions for ranking skill
(ROC AUC above chance) and for probabilities better than the constant class prior (Brier score below
the class_prior baseline's), which no baseline can show, with log loss at most 1% above the prior's
as a guard against over-confident probabilities; F1 and MCC floors are optional.

Economic checks judge the trading rule the way the bot trades it, after costs: the walk-forward rule's
record over the evaluation span (each step traded with the rule chosen before it) must not have lost
money (gate.min_rule_return) and must make a positive true Sharpe ratio at least as likely as not
(gate.min_rule_psr, the probabilistic Sharpe ratio). They decide whether the bot trades, not which model
it serves: a challenger that passes the statistical checks but fails a floor is promoted with the flat
rule (`Decision.flat_rule`; `with_trading_rule` rewrites its manifest), because its record, which holds
the latest weeks, says that trading the signal no longer pays, and keeping the champion would keep
trading it. A challenger whose own rule is already flat has nothing to check. A rejection (a statistical
check failed, or the stored positions earned less than the champion's on the shared rows) keeps the
champion and its rule (docs/evaluation.md: "What the gate's outcomes mean for the bot").

Champion comparison (`compare_with_champion`): each production model keeps its own out-of-sample
record, hashed in its manifest. The challenger's record and the champion's are compared on the rows
both predicted, against today's labels; the champion is never asked to predict, since it was trained
on most of those rows. Step boundaries are anchored to the calendar, so a data-only weekly retrain
(same code and params, data.end one week later) reproduces the champion's predictions on the shared
steps exactly: the comparison then shows no difference and the absolute checks, which include the
new week, decide. A change of code or params gives a paired comparison of two procedures on the
same rows and the same labels. The after-cost return of both records' stored positions on the shared
rows is compared too (gate.champion_return_tolerance); a champion whose record stores no positions
(saved before trading rules) is compared on P(up) only. Fewer than gate.champion_min_shared_rows shared
rows (a new market or data window, or a champion saved before records existed) skip the comparison,
with a note.

Promotion (`promote`) into a directory that a trading bot may be loading at the same moment:

1. the challenger is loaded and its files verified before production is touched;
2. its component files are written beside the current ones; their names are content-addressed, so
   no file the current manifest lists changes, and the directory entries are synced;
3. `production_model_metadata.json` is replaced atomically; it names the model hash it describes;
4. `ensemble.json` is replaced atomically: the commit point, so a reader sees the old model or the
   new one, never a mix;
5. component files listed neither by the new manifest nor by the one it replaced are removed (a
   reader that read the previous manifest a moment ago still finds its files), with the leftovers
   of writes killed half-way.

A kill before step 4 leaves the old manifest and every file it lists byte-identical; a kill after it
leaves the new model complete. Only the metadata can run ahead: between steps 3 and 4 (or after a
kill there) it describes the challenger while the old model is served. The manifest decides what is
served, so `read_production_metadata` returns metadata only when it names the served model's hash.
One promotion at a time: the pipeline runs it as a single DVC stage. Steps 2-5 are `install_model`,
which `cryptoml rollback` and `cryptoml pull-model` use too.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryptoml.config import GateParams
from cryptoml.io import dump_json, rounded_json, write_bytes_atomic
from cryptoml.model.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    Manifest,
    ModelArtifacts,
    listed_component_files,
    prune_components,
    read_artifacts,
)
from cryptoml.model.backtest import next_bar_returns, path_figures, periods_per_year
from cryptoml.model.ensemble import ProductionEnsemble
from cryptoml.model.evaluation import classification_metrics
from cryptoml.model.rule import TradingRule

METADATA_NAME = "production_model_metadata.json"
# Digits kept in metrics/promotion.json: far finer than any gate limit, stable across platforms.
_JSON_DIGITS = 6


class PromotionError(Exception):
    """The challenger or its metadata cannot be promoted; production was not changed."""


# --- the gate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One rule of the gate: `passed` is `value <op> limit`, and `message` says so in a sentence."""

    name: str
    passed: bool
    value: float
    limit: float
    message: str


@dataclass(frozen=True)
class ChampionComparison:
    """Challenger and champion scored on the rows both have stored out-of-sample predictions for.

    `after_cost_return` is in both score dicts when both records store positions (`economic_rows` of them had a
    next bar to earn), else in neither.
    """

    rows: int
    start: str
    end: str
    challenger: dict[str, float]
    champion: dict[str, float]
    economic_rows: int = 0


@dataclass(frozen=True)
class RuleRecord:
    """What the economic checks read: the walk-forward rule's after-cost figures over the evaluation span
    (metrics/evaluation_report.json backtest.rule), and whether the challenger's production rule trades."""

    total_return: float
    psr: float
    production_rule_trades: bool


# Scores of the comparison: they judge P(up) itself, so no decision threshold is involved.
_COMPARED_METRICS = ("roc_auc", "log_loss", "brier")


def _positions_return(record: pd.DataFrame, shared: pd.DatetimeIndex, bar_returns: np.ndarray, cost: float, bars_per_year: float) -> float:
    """After-cost return of a record's stored positions over the shared rows, entered from flat at the first one."""
    positions = record.set_index("timestamp")["position"].loc[shared].to_numpy(dtype=np.int64)
    return path_figures(positions, bar_returns, cost, bars_per_year).figures["total_return"]


def compare_with_champion(
    challenger: pd.DataFrame,
    champion: pd.DataFrame,
    labels: pd.Series,
    min_shared_rows: int,
    *,
    close: pd.Series,
    cost: float,
    timeframe: pd.Timedelta,
) -> tuple[ChampionComparison | None, str | None]:
    """Score both out-of-sample records (timestamp, p_up, position) on their shared labelled rows; or say why not.

    Returns (comparison, None), or (None, the reason) when fewer than `min_shared_rows` rows are shared. The
    after-cost returns use `close` for the next-bar returns and `cost` per side, the same for both records.
    """
    shared = pd.DatetimeIndex(challenger["timestamp"]).intersection(pd.DatetimeIndex(champion["timestamp"]))
    shared = shared.intersection(labels.dropna().index)
    if len(shared) < min_shared_rows:
        return None, (
            f"the champion's stored out-of-sample predictions share {len(shared)} labelled row(s) with the challenger's, "
            f"fewer than gate.champion_min_shared_rows={min_shared_rows}"
        )
    y = labels.loc[shared].to_numpy()
    with_positions = all("position" in record.columns for record in (challenger, champion))
    bar_returns = next_bar_returns(shared, close)
    has_next_bar = np.isfinite(bar_returns)
    earning, earning_returns = shared[has_next_bar], bar_returns[has_next_bar]

    def scores(record: pd.DataFrame) -> dict[str, float]:
        p_up = record.set_index("timestamp")["p_up"].loc[shared].to_numpy()
        figures = {key: value for key, value in classification_metrics(y, p_up, 0.5).items() if key in _COMPARED_METRICS}
        if with_positions:
            figures["after_cost_return"] = _positions_return(record, earning, earning_returns, cost, periods_per_year(timeframe))
        # Rounded like metrics/evaluate.json, so challenger and champion are compared at the same precision.
        return rounded_json(figures)

    comparison = ChampionComparison(
        rows=len(shared),
        start=shared[0].isoformat(),
        end=shared[-1].isoformat(),
        challenger=scores(challenger),
        champion=scores(champion),
        economic_rows=len(earning) if with_positions else 0,
    )
    return comparison, None


@dataclass(frozen=True)
class Decision:
    """The gate's verdict with every check, so metrics/promotion.json shows why, not just what."""

    promote: bool
    checks: list[Check]
    reasons: list[str]
    settings: GateParams
    challenger_sha256: str | None = None
    champion_sha256: str | None = None
    champion_note: str | None = None
    champion_comparison: ChampionComparison | None = None
    flat_rule: bool = False  # promoted with the flat rule: an economic floor failed, the statistical checks passed

    def as_json(self) -> dict[str, Any]:
        """The record for metrics/promotion.json: plain JSON, floats rounded, no NaN."""
        return {
            "decision": "promoted" if self.promote else "rejected",
            "trading": None if not self.promote else "flat" if self.flat_rule else "its rule",
            "challenger_sha256": self.challenger_sha256,
            "champion_sha256": self.champion_sha256,
            "champion_note": self.champion_note,
            "champion_comparison": asdict(self.champion_comparison) if self.champion_comparison else None,
            "checks": [{**asdict(check), "value": _rounded(check.value), "limit": _rounded(check.limit)} for check in self.checks],
            "reasons": list(self.reasons),
            "gate": {name: _rounded(value) for name, value in self.settings.model_dump().items()},
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), _JSON_DIGITS)


# Each comparison with the operator it applies and the one a failed check prints.
_COMPARISONS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    ">=": (operator.ge, "<"),
    "<": (operator.lt, ">="),
    "<=": (operator.le, ">"),
}


def _check(name: str, description: str, value: float, comparison: str, limit: float) -> Check:
    compare, failed_sign = _COMPARISONS[comparison]
    passed = bool(compare(value, limit))
    sign = comparison if passed else failed_sign
    return Check(name, passed, value, limit, f"{description}: {value:.4f} {sign} {limit:.4f}")


def _metric(metrics: Mapping[str, float], key: str, source: str) -> float:
    """A metric the gate needs; a missing or non-finite one is an evaluation bug, not a rejection."""
    if key not in metrics:
        raise ValueError(f"{source} metrics lack {key!r} (have {sorted(metrics)})")
    value = float(metrics[key])
    if not math.isfinite(value):
        raise ValueError(f"{source} metric {key!r} is {value}: the gate needs a finite number")
    return value


# Scores that a constant class-prior probability already achieves; skill means beating them.
_PRIOR_RATIOS = {"brier": ("max_brier_ratio", "Brier score"), "log_loss": ("max_log_loss_ratio", "log loss")}


def _absolute_checks(challenger: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]], settings: GateParams) -> list[Check]:
    if "class_prior" not in baselines:
        raise ValueError(f"baselines lack 'class_prior' (have {sorted(baselines)}): the score ratios compare with it")
    checks = [
        _check("min_roc_auc", "out-of-sample ROC AUC vs gate.min_roc_auc", _metric(challenger, "roc_auc", "challenger"), ">=", settings.min_roc_auc)
    ]
    for key, (setting, label) in _PRIOR_RATIOS.items():
        limit = getattr(settings, setting)
        if limit is None:
            continue
        prior = _metric(baselines["class_prior"], key, "baselines['class_prior']")
        if prior <= 0:
            raise ValueError(f"baselines['class_prior'] {key} is {prior}: a constant probability cannot score perfectly")
        description = f"out-of-sample {label} / the class_prior baseline's ({prior:.4f}) vs gate.{setting}"
        checks.append(_check(setting, description, _metric(challenger, key, "challenger") / prior, "<", limit))
    optional_floors = {"f1": ("min_f1", "F1"), "mcc": ("min_mcc", "MCC")}
    for key, (setting, label) in optional_floors.items():
        floor = getattr(settings, setting)
        if floor is not None:
            checks.append(_check(setting, f"out-of-sample {label} vs gate.{setting}", _metric(challenger, key, "challenger"), ">=", floor))
    return checks


def _champion_checks(comparison: ChampionComparison, settings: GateParams) -> list[Check]:
    champion_auc = _metric(comparison.champion, "roc_auc", "champion")
    champion_log_loss = _metric(comparison.champion, "log_loss", "champion")
    rows = f"on the {comparison.rows} rows both predicted out of sample"
    return [
        _check(
            "champion_roc_auc",
            f"ROC AUC {rows} vs the champion's {champion_auc:.4f} - gate.champion_tolerance",
            _metric(comparison.challenger, "roc_auc", "challenger"),
            ">=",
            champion_auc - settings.champion_tolerance,
        ),
        _check(
            "champion_log_loss",
            f"log loss {rows} vs the champion's {champion_log_loss:.4f} + gate.champion_log_loss_tolerance",
            _metric(comparison.challenger, "log_loss", "challenger"),
            "<=",
            champion_log_loss + settings.champion_log_loss_tolerance,
        ),
    ]


def _champion_return_check(comparison: ChampionComparison, settings: GateParams) -> list[Check]:
    """The after-cost return of the stored positions on the shared rows; none when a record stores no positions."""
    if "after_cost_return" not in comparison.champion or "after_cost_return" not in comparison.challenger:
        return []
    champion_return = _metric(comparison.champion, "after_cost_return", "champion")
    return [
        _check(
            "champion_return",
            f"after-cost return of the stored positions on the {comparison.economic_rows} shared rows vs the champion's "
            f"{champion_return:.4f} - gate.champion_return_tolerance",
            _metric(comparison.challenger, "after_cost_return", "challenger"),
            ">=",
            champion_return - settings.champion_return_tolerance,
        )
    ]


def _economic_checks(rule: RuleRecord, settings: GateParams) -> list[Check]:
    """The walk-forward rule's floors (none when the production rule stays flat: it has nothing to lose)."""
    if not rule.production_rule_trades:
        return []
    checks = []
    if settings.min_rule_return is not None:
        checks.append(
            _check("min_rule_return", "after-cost return of the walk-forward rule vs gate.min_rule_return", rule.total_return, ">=", settings.min_rule_return)
        )
    if settings.min_rule_psr is not None:
        checks.append(
            _check("min_rule_psr", "probabilistic Sharpe ratio (P(true Sharpe > 0)) of the walk-forward rule vs gate.min_rule_psr", rule.psr, ">=", settings.min_rule_psr)
        )
    return checks


def decide(
    challenger: Mapping[str, float],
    baselines: Mapping[str, Mapping[str, float]],
    comparison: ChampionComparison | None,
    settings: GateParams,
    *,
    challenger_sha256: str | None = None,
    champion_sha256: str | None = None,
    champion_note: str | None = None,
    rule: RuleRecord,
) -> Decision:
    """Promote when every check passes; with the flat rule when only an economic floor fails; else reject.

    `challenger` and `baselines` are the policy's pooled out-of-sample metrics (metrics/evaluation_report.json).
    `comparison` is None on the first run and when the champion cannot be compared (say why in
    `champion_note`); the absolute checks then decide alone. `rule` is the walk-forward rule's record for the
    economic floors. The champion's after-cost return is compared only when the promoted rule would trade.
    """
    statistical = _absolute_checks(challenger, baselines, settings)
    if comparison is not None:
        statistical += _champion_checks(comparison, settings)
    economic = _economic_checks(rule, settings)
    flat_rule = all(check.passed for check in statistical) and not all(check.passed for check in economic)
    checks = statistical + economic
    if comparison is not None and not flat_rule:
        checks += _champion_return_check(comparison, settings)
    failed = [check.message for check in checks if not check.passed]
    reasons = failed or [check.message for check in checks]
    if flat_rule:
        reasons.append(
            "promoted with the flat rule: the statistical checks passed, but trading the signal did not pay after costs "
            "out of sample, so the bot holds no position until a later model's rule does"
        )
    elif not rule.production_rule_trades:
        reasons.append("the challenger's trading rule stays flat, so the economic floors do not apply: the bot will hold no position")
    if comparison is None and not failed:
        reasons.append(f"no champion to compare with ({champion_note or 'first promotion'}): the absolute checks decide")
    return Decision(
        promote=flat_rule or not failed,
        flat_rule=flat_rule,
        checks=checks,
        reasons=reasons,
        settings=settings,
        challenger_sha256=challenger_sha256,
        champion_sha256=champion_sha256,
        champion_note=champion_note,
        champion_comparison=comparison,
    )


# --- the promotion ------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    """Make the renames into `directory` durable before a later step relies on them (power loss, not just a kill)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _metadata_bytes(metadata: Mapping[str, Any], model_sha256: str, training_dir: Path) -> bytes:
    """Canonical JSON of the lead's metadata, which must name (or is given) the challenger's hash."""
    named = metadata.get("model_sha256", model_sha256)
    if named != model_sha256:
        raise PromotionError(f"metadata['model_sha256'] is {named!r} but the model in {training_dir} is {model_sha256}")
    try:
        return dump_json({**metadata, "model_sha256": model_sha256}).encode()
    except (TypeError, ValueError) as exc:
        raise PromotionError(f"metadata must be plain JSON data (str, finite numbers, bool, None, lists, dicts): {exc}") from None


def with_trading_rule(artifacts: ModelArtifacts, rule: TradingRule) -> ModelArtifacts:
    """The same model files under a manifest whose trading rule is `rule`: a new model hash, since the rule is part
    of the model. Only formats that hold a rule can take one."""
    manifest = Manifest.parse(artifacts.manifest)
    if manifest.model.trading_rule is None:
        raise PromotionError(f"a {manifest.format} manifest holds no trading rule to replace")
    model = replace(manifest.model, trading_rule=rule.as_json())
    rewritten = replace(manifest, model=model, model_sha256=model.sha256())
    return replace(artifacts, manifest=dump_json(rewritten.as_json()).encode(), model_sha256=rewritten.model_sha256)


def promote(training_dir: Path, production_dir: Path, metadata: Mapping[str, Any], trading_rule: TradingRule | None = None) -> str:
    """Make the model in `training_dir` the production model (steps in the module docstring); return its hash.

    With `trading_rule`, the model is promoted with that rule instead of its own (with_trading_rule), so its hash
    is the rewritten manifest's. Re-promoting the model production already lists keeps every component file
    present, so the directory is byte-identical after a repeat with the same metadata (and after a promotion
    killed during its clean-up, the older files its re-run keeps go at the next promotion).
    """
    training_dir, production_dir = Path(training_dir), Path(production_dir)
    try:
        loaded_sha256 = ProductionEnsemble.load(training_dir).model_sha256_
        artifacts = read_artifacts(training_dir)
    except ArtifactError as exc:
        raise PromotionError(f"the challenger cannot be promoted: {exc}") from exc
    if artifacts.model_sha256 != loaded_sha256:
        raise PromotionError(f"{training_dir} changed while it was being promoted ({loaded_sha256} then {artifacts.model_sha256})")
    if trading_rule is not None:
        artifacts = with_trading_rule(artifacts, trading_rule)
    metadata_bytes = _metadata_bytes(metadata, artifacts.model_sha256, training_dir)

    install_model(production_dir, artifacts, metadata_bytes)
    return artifacts.model_sha256


def install_model(
    production_dir: Path,
    artifacts: ModelArtifacts,
    metadata: bytes | None,
    *,
    companions: Mapping[str, bytes] | None = None,
    keep_replaced: bool = True,
) -> None:
    """The reader-safe swap (steps 2-5 of the module docstring) that promotion, rollback and pull-model share.

    `artifacts` must be verified (read_artifacts). `companions` are further component files to put beside
    the model: a rollback restores a DVC-tracked directory exactly as its version recorded it, with the
    previous model's files its promotion kept. `keep_replaced=False` removes the replaced model's files
    right after the switch, so the directory then holds exactly the new files; a reader that had read the
    old manifest finds a file gone, sees the manifest changed and starts over from the new one
    (artifacts.read_model).
    """
    production_dir.mkdir(parents=True, exist_ok=True)
    replaced = listed_component_files(production_dir)
    installed = set(artifacts.files) | set(companions or {})
    is_repeat = replaced == set(artifacts.files)  # nothing becomes "previous", so no component goes
    keep = installed
    if keep_replaced:
        keep |= {path.name for path in production_dir.iterdir()} if is_repeat else replaced
    for name, data in {**(companions or {}), **artifacts.files}.items():
        write_bytes_atomic(production_dir / name, data)
    _fsync_directory(production_dir)
    if metadata is not None:
        write_bytes_atomic(production_dir / METADATA_NAME, metadata)
    write_bytes_atomic(production_dir / MANIFEST_NAME, artifacts.manifest)
    _fsync_directory(production_dir)
    prune_components(production_dir, keep)


def read_production_metadata(production_dir: Path) -> dict[str, Any] | None:
    """The metadata of the model production serves; None when there is no such model or metadata.

    None also when the metadata names another model than the manifest: a promotion is between its
    steps 3 and 4, or was killed there, and the served model's own metadata is already overwritten.
    """
    path = Path(production_dir) / METADATA_NAME
    try:
        text = path.read_bytes()
        served_sha256 = read_artifacts(Path(production_dir)).model_sha256
    except (FileNotFoundError, ArtifactError):
        return None
    try:
        metadata = json.loads(text)
    except ValueError as exc:
        raise PromotionError(f"{path}: not valid JSON ({exc}); promotions write it atomically, so it was edited") from None
    if not isinstance(metadata, dict):
        raise PromotionError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    return metadata if metadata.get("model_sha256") == served_sha256 else None
