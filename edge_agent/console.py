"""Terminal output for the command line: progress bars and tables (rich), plain elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

# Piped output (logs, `| less`) gets wide lines instead of rich's 80-column default.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)

ProgressFn = "Callable[[int, int | None], None]"


@contextlib.contextmanager
def byte_progress(description: str) -> Iterator[object]:
    """A progress bar for bytes on a terminal; a no-op callback elsewhere."""
    if not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None
) -> None:
    grid = Table(title=title, show_lines=False, header_style="bold")
    for header in headers:
        grid.add_column(header)
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    out.print(grid)


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**30:.2f} GiB"


def mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"
