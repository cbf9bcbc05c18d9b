"""`flower-supernode` with a shorter idle poll: what `fedtune site` runs.

Flower 1.41's SuperNode, when it has no message, sleeps a hard-coded 3 s before
asking the SuperLink again, and waits for its ClientApp's reply in 0.5 s steps
(flwr/supernode/start_client_internal.py): a round waits 1.5 s on average for each
site to notice it. There is no option for it, so this entry point caps the sleeps
of that one module at `--fedtune-poll` seconds (default `DEFAULT_POLL`) and then
runs Flower's own `flower-supernode` with the remaining arguments. Each idle poll is
one small request to the SuperLink (1 / poll per second per site).

If the installed Flower does not have the module layout this was written for, the
SuperNode runs unpatched (with a warning).

    python -m fedtune.federated.supernode --fedtune-poll 0.2 --superlink host:9092 ...
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import ModuleType

log = logging.getLogger("fedtune.supernode")

DEFAULT_POLL = 0.25
"""Seconds an idle SuperNode waits between polls (Flower's own: 3 s)."""
OPTION = "--fedtune-poll"


class _CappedTime(ModuleType):
    """The `time` module, with `sleep` capped at `cap` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def patch_poll(cap: float) -> bool:
    """Cap the sleeps of Flower's SuperNode loop at `cap` seconds; False (and a
    warning) when the installed Flower is not laid out as expected."""
    import importlib

    try:
        loop: ModuleType | None = importlib.import_module("flwr.supernode.start_client_internal")
    except ImportError:
        loop = None
    if loop is None or getattr(loop, "time", None) is not time:
        log.warning("this Flower's SuperNode loop is not the one fedtune patches (1.41): "
                    "running it with its own 3 s idle poll")  # fmt: skip
        return False
    setattr(loop, "time", _CappedTime(cap))  # noqa: B010 - a module attribute
    return True


def split_args(argv: Sequence[str]) -> tuple[float, list[str]]:
    """(`--fedtune-poll` value, the arguments for flower-supernode)."""
    args, poll = list(argv), DEFAULT_POLL
    if OPTION in args:
        i = args.index(OPTION)
        try:
            poll = float(args[i + 1])
        except (IndexError, ValueError):
            raise SystemExit(f"{OPTION} needs a number of seconds") from None
        if not 0.01 <= poll <= 3.0:
            raise SystemExit(f"{OPTION} {poll}: give 0.01 to 3 seconds")
        del args[i : i + 2]
    return poll, args


def _exit_with_parent() -> None:
    """SIGTERM this SuperNode when the process that started it (the site worker) is
    gone, e.g. killed by the OOM killer: a SuperNode without its worker would take
    messages it cannot answer."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the site worker is gone: stopping the SuperNode")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fedtune-parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    poll, args = split_args(sys.argv[1:] if argv is None else argv)
    patch_poll(poll)
    _exit_with_parent()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
