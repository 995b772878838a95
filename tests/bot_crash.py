"""Runs `cryptoml bot ...` and SIGKILLs it inside its Nth journal write, after K bytes of the line: what a crash at
that point of a write leaves on disk.

    python tests/bot_crash.py N K bot --paper --replay candles.csv --journal j.jsonl ...

K is a byte count, or `all` (the whole line written, killed before anything else happens). A kill is a real SIGKILL
of this process: nothing runs after it, no handler, no buffer flush.
"""

from __future__ import annotations

import os
import signal
import sys

from cryptoml.cli import app
from cryptoml.live import journal


def main() -> None:
    crash_at, written, *arguments = sys.argv[1:]
    write = journal._write_all
    calls = 0

    def crashing_write(fd: int, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == int(crash_at):
            write(fd, data if written == "all" else data[: int(written)])
            os.kill(os.getpid(), signal.SIGKILL)
        write(fd, data)

    journal._write_all = crashing_write
    app(arguments)


if __name__ == "__main__":
    main()
