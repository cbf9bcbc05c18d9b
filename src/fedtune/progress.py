"""Whether rich progress bars can be shown: only where they can redraw themselves (an
interactive terminal, Jupyter). In a pipe, a log file or CI rich would leave a blank
line per bar; the one-line-per-epoch/round messages are the progress there."""

from __future__ import annotations

from rich import get_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def bars_visible() -> bool:
    console = get_console()
    return console.is_interactive or console.is_jupyter


def count_bar(title: str, hide: bool = False) -> Progress:
    """A transient bar "title ━━━ 12/339 0:00:41 0:10:02" for work counted in items
    (requests to a server); hidden where bars cannot redraw, or when `hide`."""
    return Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=hide or not bars_visible(),
                    transient=True)  # fmt: skip
