"""`cryptoml <stage>`: arguments -> validated params -> one library call -> exit code."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from cryptoml import paths
from cryptoml.config import load_params
from cryptoml.console import configure_logging

app = typer.Typer(
    help="Train, check, version, promote and serve the cryptoml signal model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("cryptoml")
ParamsOption = Annotated[Path, typer.Option("--params", help="params file")]


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors caused by inputs (bad params, candles, artifacts, an unreachable exchange), not bugs.

    They are shown as one clear message and exit code 1, without a traceback. Input checks raise ValueError
    subclasses by convention, so ValueError is in the list.
    """
    from cryptoml.ensemble import ArtifactError
    from cryptoml.exchange import ExchangeFetchError

    return (ValueError, FileNotFoundError, ExchangeFetchError, ArtifactError)


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
    """Cross-validate and fit the ensemble on the training part; write models/training/ and metrics/train.json."""
    from cryptoml.pipeline import run_train

    run_train(load_params(params_file))


@app.command()
@_command
def evaluate(params_file: ParamsOption = paths.PARAMS) -> None:
    """Score the trained model, its components and the baselines on the holdout; write metrics and plots."""
    from cryptoml.pipeline import run_evaluate

    run_evaluate(load_params(params_file))


@app.command()
@_command
def promote(
    params_file: ParamsOption = paths.PARAMS,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 when the gate rejects (for automation)")] = False,
) -> None:
    """Gate the trained model against the baselines and the production model; promote it if it passes."""
    from cryptoml.pipeline import run_promote

    decision = run_promote(load_params(params_file))
    if strict and not decision.promote:
        raise typer.Exit(code=1)


@app.command()
@_command
def info(as_json: Annotated[bool, typer.Option("--json", help="print everything as JSON")] = False) -> None:
    """Show the production model: hashes, provenance, weights, threshold, holdout metrics."""
    from cryptoml.ensemble import ProductionEnsemble
    from cryptoml.io import dump_json
    from cryptoml.promotion import read_production_metadata

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
        "holdout window": f"{window.get('holdout_start')} .. {window.get('holdout_end')}",
        "weights": model.get_model_info()["weights"],
        "decision threshold": model.decision_threshold,
        "feature spec": model.get_model_info()["feature_spec_hash"],
        **{f"holdout {k}": v for k, v in metadata.get("performance_metrics", {}).items()},
    }
    for key, value in rows.items():
        typer.echo(f"{key:>22}: {value}")


@app.command()
@_command
def history() -> None:
    """List every production version recorded in git (oldest first)."""
    from cryptoml.registry import history as production_history

    versions = production_history(paths.PROMOTION_METRICS)
    if not versions:
        typer.echo(f"no production model recorded in the git history of {paths.PROMOTION_METRICS}")
        return
    typer.echo("commit      date                       model sha256          roc_auc  brier   mcc     data window")
    for v in versions:
        m = v.metrics
        typer.echo(
            f"{v.commit[:10]}  {v.date:<25}  {v.model_hash[7:25]}  "
            f"{m.get('roc_auc', float('nan')):.4f}   {m.get('brier', float('nan')):.4f}  "
            f"{m.get('mcc', float('nan')):.4f}  {v.data_start} .. {v.data_end}"
        )


@app.command()
@_command
def rollback(
    rev: Annotated[str, typer.Argument(help="git revision whose production model to restore")],
    pull: Annotated[bool, typer.Option("--pull", help="fetch the outputs from the DVC remote")] = False,
) -> None:
    """Restore the production model of REV (dvc.lock + params.yaml + metrics, then dvc checkout, sha256 verified)."""
    from cryptoml.pipeline import run_rollback

    before, after = run_rollback(rev, pull=pull)
    old = before["model_hash"] if before else "none"
    typer.echo(f"production model: {old} -> {after['model_hash']} (made at commit {after['git_commit']})")
    for key, value in after["metrics"].items():
        previous = before["metrics"].get(key) if before else None
        typer.echo(f"  {key:>10}: {previous} -> {value}")
    typer.echo("dvc.lock, params.yaml and metrics/ are restored from " f"{rev}: review and commit them.")
