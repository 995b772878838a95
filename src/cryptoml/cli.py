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
    from cryptoml.exchange import ExchangeFetchError

    return (ValueError, FileNotFoundError, ExchangeFetchError)


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
