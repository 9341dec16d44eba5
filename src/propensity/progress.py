"""Progress reporting shared by long-running functions and the CLI.

Library functions accept an optional ``progress`` callable and call it as
``progress(description, completed, total)``; they never print. The CLI passes
:func:`rich_progress`, notebooks may pass :func:`print_progress` or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["ProgressCallback", "rich_progress", "print_progress", "report"]

ProgressCallback = Callable[[str, float, float], None]


def report(
    progress: ProgressCallback | None, description: str, completed: float, total: float
) -> None:
    """Call ``progress`` if one was given (keeps call sites free of ``if`` noise)."""
    if progress is not None:
        progress(description, completed, total)


def print_progress(description: str, completed: float, total: float) -> None:
    """A plain-text progress callback for logs and notebooks."""
    if completed >= total:
        print(f"{description}: done")


@contextmanager
def rich_progress(console: Console | None = None) -> Iterator[ProgressCallback]:
    """Yield a progress callback that renders one rich bar per description."""
    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:

        def update(description: str, completed: float, total: float) -> None:
            if description not in bars:
                bars[description] = bar.add_task(description, total=total)
            bar.update(bars[description], completed=completed, total=total)

        yield update
