"""Terminal output for the command line: a progress bar, aligned tables, a live screen.

Written here rather than taken from rich: the agent runs on boards with 512 MB, and rich
(with pygments, which it pulls in, and which structlog imports whenever rich is
installed) costs about 10 MB of resident memory in every process.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

Progress = Callable[[int, int | None], None]


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**30:.2f} GiB"


def mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"


@contextlib.contextmanager
def byte_progress(description: str, stream: TextIO | None = None) -> Iterator[Progress]:
    """A progress bar for bytes on a terminal; a no-op callback elsewhere (logs, CI)."""
    out = stream or sys.stderr
    if not out.isatty():
        yield lambda _done, _total: None
        return
    started = time.monotonic()
    last = [0.0]

    def update(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and (total is None or done < total):
            return
        last[0] = now
        rate = done / max(now - started, 1e-6)
        width = max(10, min(40, shutil.get_terminal_size().columns - 60))
        if total:
            filled = int(width * done / total)
            bar = "#" * filled + "." * (width - filled)
            eta = (total - done) / rate if rate > 0 else 0
            text = (
                f"{description} [{bar}] {mib(done)}/{mib(total)} {mib(int(rate))}/s eta {eta:.0f}s"
            )
        else:
            text = f"{description} {mib(done)} {mib(int(rate))}/s"
        out.write("\r" + text[: shutil.get_terminal_size().columns - 1])
        out.flush()

    try:
        yield update
    finally:
        out.write("\n")
        out.flush()


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None
) -> None:
    if title:
        print(title)
    print(render_table(headers, rows))


class LiveScreen:
    """Redraws a block of text in place on a terminal (clear + home), for `fleet`."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.out = stream or sys.stdout

    def show(self, text: str) -> None:
        self.out.write("\x1b[H\x1b[2J" + text + "\n")
        self.out.flush()

    def __enter__(self) -> LiveScreen:
        self.out.write("\x1b[?25l")  # hide the cursor while redrawing
        return self

    def __exit__(self, *_: object) -> None:
        self.out.write("\x1b[?25h")
        self.out.flush()


@contextlib.contextmanager
def step_progress(
    description: str, stream: TextIO | None = None
) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar for counted steps (phase, done, total) on a terminal; quiet elsewhere."""
    out = stream or sys.stderr
    if not out.isatty():
        yield lambda _phase, _done, _total: None
        return

    def update(phase: str, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        out.write(
            f"\r{description} {phase:<12} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        )
        out.flush()

    try:
        yield update
    finally:
        out.write("\n")
        out.flush()
