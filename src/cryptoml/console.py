"""Terminal output: rich progress bars for a person at a terminal, plain log lines for CI and dvc logs.

rich is imported only when it draws (a terminal): the paper bot logs through configure_logging, and rich would cost
its process memory under systemd, where nothing is a terminal.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("cryptoml")


def interactive() -> bool:
    return sys.stdout.isatty()


def configure_logging(verbose: bool = False) -> None:
    """Rich, coloured logs on a terminal; one timestamped line per event otherwise (easy to grep in CI)."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

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
    """Yield `advance(n)`; draws a bar (with an ETA when `total` is known) only when stdout is a terminal.

    Otherwise, with a known `total`, logs one line per advance (done/total, elapsed, ETA) so a long run in
    CI or a dvc log shows it is alive; without one, logs the count at the end.
    """
    done = 0
    if not interactive():
        started = time.monotonic()

        def count(n: int) -> None:
            nonlocal done
            done += n
            if total:
                log.info("%s", progress_line(description, done, total, time.monotonic() - started))

        yield count
        log.info("%s: %d done", description, done)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()] if total is not None else [TimeElapsedColumn()]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.advance(task, n)

        yield advance
    log.info("%s: %d done", description, done)


def progress_line(description: str, done: int, total: int, elapsed: float) -> str:
    """A line such as "fit: 3/10 done, 4.2 s elapsed, ETA 9.8 s"; the ETA assumes the remaining steps take as long as the done."""
    remaining = elapsed / done * (total - done) if done else float("nan")
    return f"{description}: {done}/{total} done, {elapsed:.1f} s elapsed, ETA {remaining:.1f} s"
