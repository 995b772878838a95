"""`cryptoml <stage>`: arguments -> validated params -> one library call -> exit code.

Every import beyond typer is made by the command that needs it, so that `cryptoml bot` loads neither pandas nor
pydantic (cryptoml.config imports both): the bot's process stays small (tests/test_bot.py checks what it imports).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cryptoml import paths
from cryptoml.console import configure_logging

if TYPE_CHECKING:
    from cryptoml.config import Params

app = typer.Typer(
    help="Train, check, version, promote and serve the cryptoml signal model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("cryptoml")
ParamsOption = Annotated[Path, typer.Option("--params", help="params file")]
ModelOption = Annotated[Path, typer.Option("--model", help="model directory")]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object (for machines)")]


def load_params(path: Path) -> Params:
    """params.yaml, validated by cryptoml.config (imported here: it loads pandas and pydantic)."""
    from cryptoml.config import load_params as load_and_validate

    return load_and_validate(path)


def _candles_option(what: str) -> Any:
    return typer.Option("--input", help=f"{what} CSV: timestamp,open,high,low,close,volume (UTC, oldest first)")


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors caused by inputs (bad params, candles, artifacts, an unreachable exchange or scheduler), not bugs.

    They are shown as one clear message and exit code 1, without a traceback. Input checks raise ValueError
    subclasses by convention, so ValueError is in the list.
    """
    from cryptoml.candles.ccxt_client import ExchangeFetchError
    from cryptoml.live.feed import FeedError
    from cryptoml.model.artifacts import ArtifactError
    from cryptoml.model.executor import ExecutorError

    return (ValueError, FileNotFoundError, ExchangeFetchError, FeedError, ArtifactError, ExecutorError)


def _command(func: Callable[..., None]) -> Callable[..., None]:
    @wraps(func)
    def run(*args: Any, **kwargs: Any) -> None:
        configure_logging()
        try:
            func(*args, **kwargs)
        except _expected_errors() as exc:
            log.error("%s", exc)
            raise typer.Exit(code=1) from None

    return run


@app.command()
@_command
def fetch(params_file: ParamsOption = paths.PARAMS) -> None:
    """Fetch candles for [data.start, data.end) from data.source, validate them, write data/raw/ohlcv.parquet."""
    from cryptoml.pipeline import run_fetch

    run_fetch(load_params(params_file))


@app.command()
@_command
def features() -> None:
    """Compute the 12 features from data/raw/ohlcv.parquet into data/features.parquet."""
    from cryptoml.pipeline import run_features

    run_features()


@app.command()
@_command
def train(params_file: ParamsOption = paths.PARAMS) -> None:
    """Replay the retrain policy walk-forward and fit the production model on every labelled row; write models/training/."""
    from cryptoml.pipeline import run_train

    run_train(load_params(params_file))


@app.command()
@_command
def evaluate(params_file: ParamsOption = paths.PARAMS) -> None:
    """Score the retrain policy's out-of-sample record beside the frozen model and the baselines; write metrics and plots."""
    from cryptoml.pipeline import run_evaluate

    run_evaluate(load_params(params_file))


@app.command()
@_command
def promote(
    params_file: ParamsOption = paths.PARAMS,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 when the gate rejects (for automation)")] = False,
) -> None:
    """Gate the policy's out-of-sample record against the baselines and the champion's; promote the model if it passes."""
    from cryptoml.pipeline import run_promote

    decision = run_promote(load_params(params_file))
    if strict and not decision.promote:
        raise typer.Exit(code=1)


@app.command()
@_command
def info(as_json: JsonOption = False) -> None:
    """Show the production model: hashes, provenance, training window, weights, threshold, out-of-sample metrics."""
    from cryptoml.io import dump_json
    from cryptoml.model.ensemble import ProductionEnsemble
    from cryptoml.release.promotion import read_production_metadata

    model = ProductionEnsemble.load(paths.PRODUCTION_DIR)
    metadata = read_production_metadata(paths.PRODUCTION_DIR) or {}
    if as_json:
        typer.echo(dump_json({"model_info": model.get_model_info(), "metadata": metadata}), nl=False)
        return
    version = metadata.get("version_control", {})
    window = metadata.get("training_info", {})
    rows = {
        "model sha256": model.model_sha256_,
        "git commit": version.get("git_commit"),
        "previous version": version.get("previous_version"),
        "created at": metadata.get("created_at"),
        "training window": f"{window.get('data_start')} .. {window.get('data_end')}",
        "evaluation span": f"{window.get('evaluation_start')} .. {window.get('evaluation_end')}",
        "weights": model.get_model_info()["weights"],
        "decision threshold": model.decision_threshold,
        "feature spec": model.get_model_info()["feature_spec_hash"],
        **{f"out-of-sample {k}": v for k, v in metadata.get("performance_metrics", {}).items()},
    }
    for key, value in rows.items():
        typer.echo(f"{key:>22}: {value}")


@app.command()
@_command
def predict(
    input_csv: Annotated[Path, _candles_option("candles")],
    as_json: JsonOption = False,
    rows: Annotated[int, typer.Option("--rows", min=1, help="signals for the last ROWS closed candles")] = 1,
    model_dir: ModelOption = paths.PRODUCTION_DIR,
    params_file: ParamsOption = paths.PARAMS,
    held_bars: Annotated[
        int, typer.Option("--held-bars", min=0, help="bars the bot has held its long position before these candles (0: it is flat)")
    ] = 0,
) -> None:
    """P(up), signal and the trading rule's position of the production model for the latest closed candle(s) in a CSV
    (>= 1000 candles)."""
    from cryptoml.io import dump_json
    from cryptoml.live.predict import iso_utc, run_predict
    from cryptoml.model.rule import FLAT, LONG, Holding

    params = load_params(params_file)
    max_age = params.monitor.max_model_age_days if params.monitor.refuse_stale_predictions else None
    holding = Holding(LONG if held_bars else FLAT, held_bars)
    prediction = run_predict(input_csv, params.data.timeframe, model_dir, rows, max_model_age_days=max_age, holding=holding)
    if as_json:
        typer.echo(dump_json(prediction.as_json()), nl=False)
        return
    for signal in prediction.signals:
        typer.echo(
            f"{iso_utc(signal.timestamp)}  {signal.signal:<4}  P(up) {signal.p_up:.4f}  (up when >= {prediction.decision_threshold:.4f})  "
            f"hold: {'long' if signal.position else 'flat'}"
        )
    typer.echo(f"model {prediction.model_sha256} ({prediction.backend}); trading rule: {prediction.trading_rule.describe()}")


@app.command()
@_command
def monitor(
    input_csv: Annotated[Path | None, _candles_option("recent candles")] = None,
    journal: Annotated[Path | None, typer.Option("--journal", help="instead: the paper bot's journal (cryptoml bot --paper)")] = None,
    as_json: JsonOption = False,
    html_report: Annotated[Path | None, typer.Option("--html", help="also write a self-contained HTML drift report here")] = None,
    model_dir: ModelOption = paths.PRODUCTION_DIR,
    params_file: ParamsOption = paths.PARAMS,
    now: Annotated[str | None, typer.Option("--now", help="check as of this UTC time (ISO 8601; default now)")] = None,
) -> None:
    """Feature drift, live performance and age of the production model on recent candles (limits: monitor: in params).

    With --journal instead of --input: the paper bot's after-cost P&L, trades, flat candles, model switches and its
    P(up)'s live scores (monitor.live rules) from its journal.

    Exit 0: ok. Exit 2: warn. Exit 3: alert. Exit 1: bad input. On warn or alert one message goes to the
    webhook in $CRYPTOML_ALERT_WEBHOOK (never printed).
    """
    from cryptoml.io import dump_json, write_bytes_atomic
    from cryptoml.live.alerts import send_alert
    from cryptoml.live.monitoring import alert_message, format_journal_report, format_report, journal_report, parse_now, render_html, run_monitor

    if (input_csv is None) == (journal is None):
        raise typer.BadParameter("give --input (candles) or --journal (the paper bot's journal)", param_hint="--input / --journal")
    params = load_params(params_file)
    if journal is not None:
        record = journal_report(journal, params.label.horizon, params.label.threshold, params.monitor)
        typer.echo(dump_json(record.as_json()) if as_json else format_journal_report(record), nl=False)
        if record.status != "ok":
            send_alert(format_journal_report(record))
        raise typer.Exit(code=record.exit_code)
    assert input_csv is not None
    report = run_monitor(input_csv, params.data.timeframe, model_dir, params.monitor, parse_now(now))
    if html_report is not None:
        write_bytes_atomic(html_report, render_html(report).encode())
    typer.echo(dump_json(report.as_json()) if as_json else format_report(report), nl=False)
    if report.status != "ok":
        send_alert(alert_message(report))
    raise typer.Exit(code=report.exit_code)


@app.command()
@_command
def bot(
    paper: Annotated[bool, typer.Option("--paper", help="required: journal the model's positions; no order is ever placed")] = False,
    replay: Annotated[
        Path | None, typer.Option("--replay", help="feed this candle CSV's candles as if each had just closed, instead of polling the exchange")
    ] = None,
    journal: Annotated[Path, typer.Option("--journal", help="append-only journal (JSON lines); a restart resumes it")] = Path("paper-journal.jsonl"),
    model_dir: ModelOption = paths.PRODUCTION_DIR,
    params_file: ParamsOption = paths.PARAMS,
    max_candles: Annotated[int | None, typer.Option("--max-candles", min=1, help="stop after journalling this many candles")] = None,
) -> None:
    """Paper-trade the served model: each closed candle's P(up), the trading rule's position and the paper P&L after
    costs, appended to a crash-safe journal; follows pull-model between candles; flat on a missing or stale model."""
    if not paper:
        raise typer.BadParameter("only --paper exists: this bot journals positions and never places an order", param_hint="--paper")
    from cryptoml.live.bot import run_paper_bot

    count, last = run_paper_bot(journal, model_dir, params_file, replay, max_candles)
    summary = f", last {last['t']}: position {last['position']}, paper equity {last['equity']:.6f}" if last else ""
    typer.echo(f"{journal}: {count} candle(s) journalled{summary}")


@app.command()
@_command
def history() -> None:
    """List the registered versions of the production model (GTO tags), oldest first, and where `prod` is."""
    from cryptoml.release.versions import MODEL_ARTIFACT, registered_versions

    versions = registered_versions()
    if not versions:
        typer.echo(f"no version of {MODEL_ARTIFACT} is registered: `cryptoml register` tags the production models of git history")
        return
    typer.echo("version   stage  commit      registered                 model sha256        roc_auc  brier   mcc     rule return  data window")
    for v in versions:
        m = v.record.metrics if v.record else {}
        window = f"{v.record.data_start} .. {v.record.data_end}" if v.record else "(no production record at this commit)"
        rule_return = f"{m['rule_total_return']:+.2%}" if "rule_total_return" in m else "-"
        typer.echo(
            f"{v.version:<9} {','.join(v.stages):<6} {v.commit[:10]}  {v.registered_at:<25}  {(v.model_hash or '')[7:25]:<18}  "
            f"{m.get('roc_auc', float('nan')):.4f}   {m.get('brier', float('nan')):.4f}  {m.get('mcc', float('nan')):.4f}  "
            f"{rule_return:>11}  {window}"
        )


@app.command()
@_command
def register(
    push: Annotated[str | None, typer.Option("--push", help="fetch the registry tags from this git remote first, push new ones to it")] = None,
) -> None:
    """Tag every new production model of HEAD's history as a version (GTO) and assign `prod` to HEAD's model.

    Idempotent: a second run creates nothing. A model that already has a version only gets `prod` again (a rollback).
    """
    from cryptoml.release.versions import register as register_versions

    result = register_versions(push_to=push)
    for tag in result.created:
        typer.echo(f"created {tag}")
    typer.echo(f"prod: {result.prod or 'no production model at HEAD'}" + ("" if result.created else " (nothing to do)"))


@app.command()
@_command
def rollback(
    target: Annotated[str, typer.Argument(help="registered version (v1.2.0) or git revision whose production model to restore")],
    pull: Annotated[bool, typer.Option("--pull", help="fetch the model from the DVC remote when the cache lacks it")] = False,
) -> None:
    """Restore TARGET's production model, dvc.lock, params, metrics and plots; verified before anything changes."""
    from cryptoml.release.rollback import ROLLBACK_FILES, run_rollback

    before, after = run_rollback(target, pull=pull)
    production = after.production
    old = before["model_hash"] if before else "none"
    typer.echo(f"production model: {old} -> {production['model_hash']} (made at commit {production['git_commit']})")
    for key, value in production["metrics"].items():
        previous = before["metrics"].get(key) if before else None
        typer.echo(f"  {key:>10}: {previous} -> {value}")
    restored = ", ".join(path.as_posix() for path in ROLLBACK_FILES)
    typer.echo(f"{restored} are restored from {target} ({after.commit}): review, commit and push; `cryptoml register` then assigns prod.")


@app.command("pull-model")
@_command
def pull_model(
    repo: Annotated[str, typer.Option("--repo", help="git URL of the model repository (its GTO tags and DVC remote)")],
    to: Annotated[Path, typer.Option("--to", help="the bot's model directory, swapped reader-safely")],
    stage: Annotated[str, typer.Option("--stage", help="registry stage to follow")] = "prod",
    remote: Annotated[str | None, typer.Option("--remote", help="DVC remote of the repository to download from")] = None,
    remote_config: Annotated[list[str] | None, typer.Option("--remote-config", help="KEY=VALUE for that remote (repeatable)")] = None,
) -> None:
    """Make TO serve the model of STAGE (dvc artifacts get, verified, swapped); nothing is written when it already does."""
    from cryptoml.release.deploy import pull_model as run_pull

    result = run_pull(repo, to, stage=stage, remote=remote, remote_config=remote_config or ())
    if result.changed:
        typer.echo(f"{to}: {result.previous_sha256 or 'no model'} -> {result.model_sha256} ({stage})")
    elif result.downloaded:
        typer.echo(f"{to}: already serves {result.model_sha256} ({stage}); nothing changed")
    else:
        typer.echo(f"{to}: already serves {result.model_sha256} ({stage}); nothing changed, nothing downloaded ({stage} not reassigned)")


@app.command()
def retrain(
    until: Annotated[
        str | None,
        typer.Option("--until", help="train on the candles closed by this UTC time (ISO 8601, e.g. 2025-01-06T00:00:00Z; default now)"),
    ] = None,
    pr_body: Annotated[Path | None, typer.Option("--pr-body", help="write the pull-request markdown here (default stdout)")] = None,
    base: Annotated[str, typer.Option("--base", help="the branch the pull request targets; the diffs compare with it")] = "main",
    push: Annotated[bool, typer.Option("--push", help="push the retrain/<date> branch to origin after a promotion")] = False,
) -> None:
    """Weekly retrain: move data.end, commit it on retrain/<date>, dvc pull + repro; on a promotion dvc push and commit.

    Exit 0: promoted (branch committed, pull-request body written). Exit 2: rejected by the quality gate.
    Exit 1: failed. A rejection or failure alerts the webhook in $CRYPTOML_ALERT_WEBHOOK (never printed).
    """
    from cryptoml.release.retrain import retrain as run_retrain

    configure_logging()
    raise typer.Exit(code=int(run_retrain(until, base=base, pr_body=pr_body, push=push)))


@app.command()
@_command
def doctor(
    remote: Annotated[bool, typer.Option("--remote", help="also check that the default DVC remote answers (network)")] = False,
    as_json: JsonOption = False,
) -> None:
    """Check Python and libraries against the lock, params, dvc status, the production model's files, feature spec and ONNX parity.

    One green or red line per check, with a fix under each red one. Exit 1 when any check is red.
    """
    from rich.console import Console

    from cryptoml.doctor import print_results, results_json, run_checks
    from cryptoml.io import dump_json

    results = run_checks(Path("."), remote=remote)
    if as_json:
        typer.echo(dump_json(results_json(results)), nl=False)
    else:
        print_results(results, Console(highlight=False))
    if not all(result.ok for result in results):
        raise typer.Exit(code=1)
