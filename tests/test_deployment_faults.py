"""Faults on Flower's Deployment Engine (fedtune.deploy), with real processes on
loopback: a site that crashes mid-round, a SuperLink that crashes after round 1
and a run resumed from its checkpoint.

A SIGKILLed SuperNode is noticed by the SuperLink only when its heartbeats stop
(Flower: every 30 s, 2 missed), so the crash test waits up to a minute for the
round to go on without it (~90 s in all; in the default suite). The restart test
takes ~3 min (the SuperNodes reconnect with Flower's back-off): `slow`
(`scripts/test -m slow`).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_deployment import _rounds, _write_config

from fedtune.certs import make_certs
from fedtune.deploy import (
    FlowerRun,
    LocalFederation,
    fedtune_run_config,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

SITES = ("org-a", "org-b", "org-c")


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[LocalFederation]:
    certs = make_certs(tmp_path / "certs", list(SITES))
    env = {"HF_HUB_OFFLINE": "1", "FEDTUNE_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with LocalFederation(tmp_path / "fed", SITES, certs, env=env, task_poll_interval=0.1,
                         start_timeout=120) as fed:  # fmt: skip
        yield fed


Result = list[FlowerRun | BaseException]


def _submit_in_background(fed: LocalFederation, app: Path, config: Path,
                          out: Path) -> tuple[threading.Thread, Result]:  # fmt: skip
    result: Result = []

    def go() -> None:
        try:
            result.append(fed.submit(app, fedtune_run_config(config, out),
                                     timeout=600, check=False))  # fmt: skip
        except BaseException as err:  # handed to the test
            result.append(err)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, result


def _wait_for(what: str, condition, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_site_that_crashes_mid_round_is_dropped_and_named(
    federation: LocalFederation, app: Path, tiny_models: dict[str, str], tmp_path: Path
) -> None:
    config = _write_config(tmp_path, tiny_models["bert"], "min_sites = 2")
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 3"))
    out = tmp_path / "run"
    log = federation.logs / "supernode-org-c.log"
    received = re.compile(r"Receiving: train message")
    thread, result = _submit_in_background(federation, app, config, out)
    # Round 2's message reached org-c: crash it (SIGKILL, no goodbye) before it replies.
    _wait_for("org-c to receive round 2",
              lambda: len(received.findall(log.read_text(errors="replace"))) >= 2)  # fmt: skip
    t_kill = time.time()
    federation.kill("org-c")
    thread.join(timeout=600)
    run = result[0]
    assert isinstance(run, FlowerRun) and run.completed, run
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["sites"] == 3 and not rounds[0]["failed"]
    # Round 2 went on with the two others; org-c (partition-id 2: the config's site-3)
    # is named, with Flower's reason.
    assert rounds[1]["sites"] == 2 and list(rounds[1]["failed"]) == ["site-3"]
    assert "unavailable" in rounds[1]["failed"]["site-3"].lower()
    assert rounds[1]["failed_at"] >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_kill))
    assert rounds[2]["sites"] == 2
    report = (out / "report.md").read_text()
    assert "Sites that dropped out" in report and "| 2 | train | site-3 |" in report
    assert (out / "model" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_superlink_crash_then_resume_equals_the_uninterrupted_run(
    federation: LocalFederation, app: Path, tiny_models: dict[str, str], tmp_path: Path
) -> None:
    # Fresh optimizer state each round at the sites (site_state = "reset"): a site's
    # loop state lives in Flower's per-run Context, which a new (resumed) run starts
    # empty; the server's state (global model, FedAdam moments, RNG) is checkpointed.
    config = _write_config(tmp_path, tiny_models["bert"], 'site_state = "reset"',
                           'strategy = "fedadam"')  # fmt: skip
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 3"))
    out = tmp_path / "run"
    thread, _ = _submit_in_background(federation, app, config, out)
    _wait_for("round 1's checkpoint", lambda: len(_rounds(out)) >= 1)
    federation.restart_superlink(kill=True)
    thread.join(timeout=120)
    assert len(_rounds(out)) == 1, "the run died with the SuperLink after round 1"
    federation.wait_online(timeout=120)
    run = federation.submit(app, fedtune_run_config(config, resume=out), timeout=600)
    assert run.completed
    assert [r["round"] for r in _rounds(out)] == [1, 2, 3]

    # The same run without the crash, on the same federation (same processes and
    # threads, so the same floating-point sums).
    ref = tmp_path / "uninterrupted"
    assert federation.submit(app, fedtune_run_config(config, ref),
                             timeout=600).completed  # fmt: skip
    ours = load_file(str(out / "checkpoint" / "global.safetensors"))
    theirs = load_file(str(ref / "checkpoint" / "global.safetensors"))
    assert ours.keys() == theirs.keys()
    # Equal to float32 round-off, not bit for bit: two site processes' CPU matrix
    # products may differ in the last bits (seen here: in round 2 one site's train
    # loss differed in the 8th digit while the other two, given the same global
    # state, matched exactly).
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    a, b = _rounds(out), _rounds(ref)
    assert a[0]["train_loss"] == b[0]["train_loss"]  # round 1 ran before the crash
    np.testing.assert_allclose([r["val_loss"] for r in a], [r["val_loss"] for r in b],
                               rtol=1e-5)  # fmt: skip
