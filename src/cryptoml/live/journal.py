"""The paper bot's journal: one JSON line per closed candle, append-only and crash-safe.

Format (JSON Lines, UTF-8, keys sorted, no spaces): the first line is the header, which names the format and what
the journal is about (feed, symbol, timeframe, cost per side, seed candles); every later line is one candle's entry
(cryptoml.live.bot writes them; docs/serving.md lists the fields). A journal is resumed only by a run with the same
header: a run on another market or with other costs would corrupt its P&L, so it is refused (JournalError).

Writes: a line is built whole, then written with one os.write on a descriptor opened with O_APPEND, then fsync'd.
A process killed at any moment therefore leaves the file as it was, or with the whole line, or with a prefix of it;
a prefix lacks the final newline. Opening the journal truncates the bytes after the last newline (logged), before
anything is appended, so the resumed run writes that candle's line again, whole. Any other line that is not a JSON
object means something else changed the file: JournalError, and nothing is written.

The entries are a function of the candles, the models served and the params only (no wall-clock time), so a run
that was killed and resumed writes the same bytes as one that was not (tests/test_bot.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = "cryptoml-bot-journal/1"
SEED = "seed"  # the key of an entry whose features came from a (re-)seeded FeatureState

Entry = dict[str, Any]


class JournalError(ValueError):
    """The journal cannot be resumed: a damaged line, or a header that is not this run's."""


def encode(entry: Entry) -> bytes:
    """One line: canonical JSON (sorted keys, floats as their shortest exact repr) and a newline."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a regular file takes it in one call; the loop is for the rule)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True)
class Resume:
    """What a resumed run needs from the journal: the last entry, the last that seeded the state, and how many
    entries follow that one."""

    last: Entry | None
    anchor: Entry | None
    since_anchor: int


def _parse(line: bytes, number: int, path: Path) -> Entry:
    try:
        entry = json.loads(line)
    except ValueError as exc:
        raise JournalError(f"{path}:{number}: not a JSON line ({exc}): the journal was changed by something else than the bot") from None
    if not isinstance(entry, dict):
        raise JournalError(f"{path}:{number}: expected a JSON object, got {type(entry).__name__}")
    return entry


def read_journal(path: Path) -> tuple[Entry, list[Entry]]:
    """The header and the entries of a journal (a torn last line, which only a crash leaves, is ignored)."""
    data = Path(path).read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    if not lines:
        raise JournalError(f"{path}: empty journal (no header)")
    header, *entries = (_parse(line, number, path) for number, line in enumerate(lines, start=1))
    if header.get("format") != FORMAT:
        raise JournalError(f"{path}: the first line is not a {FORMAT} header: {header}")
    return header, entries


class Journal:
    """An open journal: repaired and checked at open, then appended to one entry at a time."""

    def __init__(self, path: Path, header: Entry, fsync: bool = True) -> None:
        """Open (or create) `path` for a run whose header is `header`; see the module docstring."""
        self.path = Path(path)
        self.header = {"format": FORMAT, **header}
        self._fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.resume = self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    def _recover(self) -> Resume:
        """Drop a torn last line, check the header (writing it to a new journal) and find where to resume."""
        with open(self._fd, "rb", closefd=False) as handle:
            data = handle.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s: dropping a torn last line of %d byte(s) (a crash during a write)", self.path, len(data) - complete)
            os.ftruncate(self._fd, complete)
            os.fsync(self._fd)
        if complete == 0:
            self._append_line(encode(self.header))
            return Resume(None, None, 0)
        last = anchor = None
        since_anchor = 0
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            entry = _parse(line, number, self.path)
            if number == 1:
                self._check_header(entry)
                continue
            last = entry
            since_anchor += 1
            if SEED in entry:
                anchor, since_anchor = entry, 0
        return Resume(last, anchor, since_anchor)

    def _check_header(self, found: Entry) -> None:
        if found != self.header:
            differing = sorted(key for key in {*found, *self.header} if found.get(key) != self.header.get(key))
            details = ", ".join(f"{key}: journal {found.get(key)!r}, this run {self.header.get(key)!r}" for key in differing)
            raise JournalError(f"{self.path} was written by another kind of run ({details}): give this run another --journal")

    def _append_line(self, line: bytes) -> None:
        _write_all(self._fd, line)
        if self._fsync:
            os.fsync(self._fd)

    def append(self, entry: Entry) -> None:
        """Append one entry, durably (fsync) unless the journal was opened with fsync=False."""
        self._append_line(encode(entry))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
