"""Flower's SuperNode, run inside a site's worker process, with its waits tied to the
worker instead of fixed sleeps.

Flower 1.40/1.41's SuperNode loop (`flwr/supernode/start_client_internal.py`) has
hard-coded waits and no option for them:
- with no message, it sleeps 3 s before asking the SuperLink again (a round waits
  1.5 s on average for each site to notice it);
- while its ClientApp works, it looks for the reply every 0.5 s;
- when a message's objects are not yet uploaded, it retries from 1 s up to 10 s.

`patch` rebinds, in that one module, the `time` it sleeps with (idle sleeps capped
at `poll` seconds; the short waits for the reply end as soon as the worker says the
reply is there), the `pull_objects` it fetches with (fedtune.federated.waits) and
the function that takes a message from the SuperLink (so that the worker is woken
the moment a task exists, instead of polling the SuperNode for one). Each idle poll
is one small request to the SuperLink (1 / poll per second per site).

If the installed Flower is not laid out as this expects, nothing is patched (with
a warning): the SuperNode keeps Flower's waits and the worker polls for tasks.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger("fedtune.supernode")

DEFAULT_POLL = 0.25
"""Seconds an idle SuperNode waits between polls of the SuperLink (Flower's: 3 s)."""
LOOP_MODULE = "flwr.supernode.start_client_internal"


class _Waits(ModuleType):
    """The `time` module as the SuperNode loop sees it: sleeps of 1 s or more (the
    idle poll) last at most `poll` s; shorter ones (waiting for the ClientApp's
    reply) end early when `reply_ready` is set."""

    def __init__(self, poll: float, reply_ready: threading.Event) -> None:
        super().__init__("time")
        self.poll = poll
        self.reply_ready = reply_ready

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds >= 1.0:
            time.sleep(min(seconds, self.poll))
        elif self.reply_ready.wait(seconds):
            self.reply_ready.clear()


def patch(poll: float, on_message: Callable[[], None], reply_ready: threading.Event) -> bool:
    """Tie the SuperNode loop of this process to its worker: `on_message()` is called
    each time the SuperNode has stored a message for its ClientApp; setting
    `reply_ready` ends its wait for the reply. False (and a warning) when the
    installed Flower is not the one this was written for."""
    from fedtune.federated.waits import shorten_pulls

    try:
        loop: ModuleType | None = importlib.import_module(LOOP_MODULE)
    except ImportError:
        loop = None
    take = getattr(loop, "_pull_and_store_message", None)
    if loop is None or getattr(loop, "time", None) is not time or not callable(take):
        log.warning("this Flower's SuperNode loop is not the one fedtune patches (1.40/1.41): "
                    "it keeps its own 3 s idle poll")  # fmt: skip
        return False

    def take_and_tell(*args: Any, **kwargs: Any) -> Any:
        run_id = take(*args, **kwargs)
        if run_id is not None:
            on_message()
        return run_id

    setattr(loop, "time", _Waits(poll, reply_ready))  # noqa: B010 - module attributes
    setattr(loop, "_pull_and_store_message", take_and_tell)  # noqa: B010
    shorten_pulls(LOOP_MODULE)
    return True


def run(args: Sequence[str]) -> int:
    """Run Flower's `flower-supernode` with `args` in this process until it exits; its
    exit code."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    try:  # timestamps on Flower's log lines: a site's log then says when messages came
        from flwr.supercore.logger import update_console_handler

        update_console_handler(timestamps=True)
    except ImportError:
        pass
    sys.argv = ["flower-supernode", *args]
    try:
        flower_supernode()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0
