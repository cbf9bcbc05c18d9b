"""Shorter waits for a message's objects in Flower's runtime (1.40/1.41).

Flower moves a message's content as separate objects, and a receiver that asks for
one before the sender has uploaded it retries with a backoff that starts at 1 s
and doubles up to 10 s (`flwr.supercore.inflatable.inflatable_utils.pull_objects`,
PULL_INITIAL_BACKOFF / PULL_BACKOFF_CAP). In a round that happens twice per site:
the SuperNode takes the server's message while the ServerApp is still uploading
it, and the ServerApp sees a reply while the SuperNode is still uploading that -
on loopback 1 s of waiting for objects that arrive within milliseconds. There is no
option for it, so `shorten_pulls` rebinds `pull_objects` in one module of Flower to
the same function with backoff from `INITIAL` s capped at `CAP` s (the overall
bound stays Flower's: PULL_MAX_TIME, 2 h). Each retry is one small request.

Version-guarded: if the module does not hold Flower's `pull_objects`, nothing
changes (with a warning).
"""

from __future__ import annotations

import functools
import importlib
import logging

log = logging.getLogger("fedtune.waits")

INITIAL = 0.02
"""First wait (s) for an object that is not there yet (Flower's: 1 s)."""
CAP = 0.25
"""Longest wait (s) between two asks for it (Flower's: 10 s)."""
MAX_TRIES = 1_000_000
"""Asks per object: bounded by Flower's overall time limit instead."""


def shorten_pulls(module_name: str) -> bool:
    """Rebind `pull_objects` in the Flower module `module_name` with short backoff;
    False (and a warning) when that module is not laid out as expected."""
    try:
        from flwr.supercore.inflatable import inflatable_utils

        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    current = getattr(module, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is inflatable_utils.pull_objects:
        return True  # done already
    if module is None or current is not inflatable_utils.pull_objects:
        log.warning("%s is not the Flower module fedtune shortens waits in (1.40/1.41): "
                    "it keeps Flower's 1-10 s waits for message objects", module_name)  # fmt: skip
        return False
    fast = functools.partial(inflatable_utils.pull_objects, initial_backoff=INITIAL,
                             backoff_cap=CAP, max_tries_per_object=MAX_TRIES)  # fmt: skip
    setattr(module, "pull_objects", fast)  # noqa: B010 - a module attribute
    return True
