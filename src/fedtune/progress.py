"""Whether rich progress bars can be shown: only where they can redraw themselves (an
interactive terminal, Jupyter). In a pipe, a log file or CI rich would leave a blank
line per bar; the one-line-per-epoch/round messages are the progress there."""

from __future__ import annotations

from rich import get_console


def bars_visible() -> bool:
    console = get_console()
    return console.is_interactive or console.is_jupyter
