"""Terminal output: rich progress bars for a person at a terminal, plain log lines for CI and dvc logs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("cryptoml")


def interactive() -> bool:
    return sys.stdout.isatty()


def configure_logging(verbose: bool = False) -> None:
    """Rich, coloured logs on a terminal; one timestamped line per event otherwise (easy to grep in CI)."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar only when stdout is a terminal, otherwise logs the total at the end."""
    done = 0
    if not interactive():

        def count(n: int) -> None:
            nonlocal done
            done += n

        yield count
        log.info("%s: %d done", description, done)
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.advance(task, n)

        yield advance
    log.info("%s: %d done", description, done)
