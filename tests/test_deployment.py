"""Flower's Deployment Engine (fedtune.deploy): a SuperLink and three SuperNodes on
loopback with TLS and SuperNode authentication (keys from `make_certs`), each site
with its warm worker (fedtune.federated.worker), a run submitted with `fedtune submit`,
a site's NaN update rejected by the server, and SecAgg+ across the SuperNodes.
(Faults that break the federation, a site or the SuperLink killed, are in
test_deployment_faults.py, with a federation each.)

One federation serves the module: starting it takes 15-20 s on two cores (each site's
worker imports torch and transformers once); a 2-round run of a tiny model ~15 s
(the ServerApp process loads fedtune and the model, then ~1 s per round)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS, TEXTS, Y
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import fedtune.federated.apps as apps
from fedtune.adapted import AdaptedModel
from fedtune.certs import make_certs
from fedtune.cli import app as cli_app
from fedtune.config import load_config
from fedtune.deploy import (
    DeploymentError,
    LocalFederation,
    check_port_free,
    fedtune_run_config,
    find_app_dir,
    flower_binary,
    format_config,
    stage_app,
    superlink_command,
    supernode_command,
    write_connection,
)
from fedtune.errors import ConfigError
from fedtune.federated.runner import run_federated

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

SITES = ("org-a", "org-b", "org-c")
ROUNDS = 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("deploy")
    certs = make_certs(root / "certs", [*SITES, "intruder"])
    env = {
        "HF_HUB_OFFLINE": "1",
        "FEDTUNE_CACHE_DIR": str(root / "cache"),
        # three ClientApps share two cores: one thread each
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # Each site's own data file, named only in its node config (used by runs with
    # federated.partition = "own"; the others ignore it).
    node_config = {}
    for i, site in enumerate(SITES):
        rows = [{"text": f"{TEXTS[j % 6]} {j} at {site}", "label": LABELS[Y[j % 6]]}
                for j in range(i, 90, len(SITES))]  # fmt: skip
        pd.DataFrame(rows).to_csv(root / f"{site}.csv", index=False)
        node_config[site] = {"data-path": str(root / f"{site}.csv"), "site-name": site}
    fed = LocalFederation(root / "fed", SITES, certs, env=env, task_poll_interval=0.1,
                          start_timeout=120, node_config=node_config)  # fmt: skip
    with fed:
        yield fed
    # Everything it started is gone: the SuperLink, the SuperNodes and their
    # SuperExec / app processes (one process group each).
    procs = [fed.superlink, *fed.nodes.values()]
    for p in procs:
        assert p is not None and p.popen.poll() is not None, p
        with pytest.raises(ProcessLookupError):
            os.killpg(p.popen.pid, 0)


def _rounds(out: Path) -> list[dict]:  # type: ignore[type-arg]
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "round"]


def _write_config(root: Path, tiny: str, *extra: str) -> Path:
    """The run config; with `extra` lines in [federated] (e.g. partition = "own")."""
    rows = [{"text": f"{TEXTS[i % 6]} {i}", "label": LABELS[Y[i % 6]]} for i in range(90)]
    pd.DataFrame(rows).to_csv(root / "d.csv", index=False)
    path = root / "fed.toml"
    path.write_text(
        f"""name = "deployed"
[data]
source = "file"
path = {json.dumps(str(root / "d.csv"))}
labels = {json.dumps(list(LABELS))}
[model]
name = {json.dumps(tiny)}
[method]
name = "lora"
lr = 0.01
[train]
progress = false
batch_size = 8
[federated]
sites = {len(SITES)}
rounds = {ROUNDS}
{chr(10).join(extra)}
""",
        encoding="utf-8",
    )
    return path


def test_federated_lora_over_tls_with_node_auth(
    federation: LocalFederation, tiny_models: dict[str, str], tmp_path: Path
) -> None:
    assert all(n.node_id for n in federation.nodes.values())  # connected and activated
    # Each site trains on its own file, named in its node config only: the run config
    # names the server's validation/test data.
    site_files = [str(federation.root.parent / f"{site}.csv") for site in SITES]
    config = _write_config(tmp_path, tiny_models["bert"], 'partition = "own"')
    out = tmp_path / "run"
    # Submitted with `fedtune submit`, which follows the ServerApp's log.
    assert federation.certs is not None
    args = ["submit", str(config), "--server", federation.address,
            "--ca", str(federation.certs.ca_cert), "--output-dir", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "round   1/2" in result.output and "round   2/2" in result.output
    assert "finished:completed" in result.output
    bad = CliRunner().invoke(cli_app, ["submit", str(config), "--server", federation.address])
    assert bad.exit_code == 2 and "ca.crt" in bad.output

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites"] == len(SITES) and not r["failed"] for r in rounds)
    assert rows[-1]["event"] == "test"
    # The same federation as in process (`fedtune federate`), round for round.
    assert rows[-1]["sites"] == sorted(SITES) and rows[-1]["n_train"] == 90
    apps.clear_workspace()
    paths = "federated.site_paths=" + ",".join(site_files)
    local = run_federated(load_config(str(config), [paths]), Console(quiet=True), write=False)
    np.testing.assert_allclose([h["val_loss"] for h in rows[-1]["history"]],
                               [h["val_loss"] for h in local["history"]], rtol=1e-5)  # fmt: skip
    apps.clear_workspace()
    # Each site's worker ran its ClientApp itself, one task per round: no
    # `flwr-clientapp` process per message, no SuperExec.
    for site in SITES:
        log = (federation.logs / f"supernode-{site}.log").read_text(errors="replace")
        assert log.count("train handled in") == ROUNDS
        assert "Start `flwr-clientapp` process" not in log
        assert "not the one fedtune patches" not in log  # Flower's waits are tied to the worker
        assert "keeps Flower's 1-10 s waits" not in log
    # Where each round's time went, by site.
    assert all(set(r["timing"]["replies"]) == set(SITES) for r in rounds)
    assert all(r["timing"]["exchange"] >= max(r["timing"]["replies"].values()) for r in rounds)

    # The global adapter loads with plain peft and predicts as fedtune does.
    model_dir = out / "model"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    plain = PeftModel.from_pretrained(base, model_dir).eval()
    lora_b = [p for n, p in plain.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    enc = AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = plain(**enc).logits.log_softmax(-1).numpy()
    ours = AdaptedModel.load(model_dir).predict_scores(TEXTS)
    np.testing.assert_allclose(logits, ours, atol=1e-5)


def test_unregistered_supernode_is_refused(federation: LocalFederation) -> None:
    with pytest.raises(DeploymentError, match="Failed to activate"):
        federation.add_node("intruder", {"partition-id": 0, "num-partitions": len(SITES)},
                            timeout=60)  # fmt: skip
    assert federation.nodes["intruder"].popen.returncode not in (0, None)
    online = {int(n["node-id"]) for n in federation.list_nodes() if n["status"] == "online"}
    assert online == {federation.nodes[s].node_id for s in SITES}


def test_a_sites_tasks_go_only_to_its_own_worker(federation: LocalFederation) -> None:
    """The site's local Runtime API hands out ClientApp tasks only to requests signed
    with the secret its worker holds; the secret file is gone once the worker is in."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

    from fedtune.federated.worker import SiteWorker

    site = federation.nodes[SITES[0]]
    intruder = SiteWorker(f"127.0.0.1:{site.port}", b"not the secret")
    client = intruder._client(retry=False)
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    finally:
        client.close()
    assert refused.value.response.status_code == 401
    assert site.running  # and the site goes on (Flower's own retry would SIGINT it)
    # Each site's secret sat in a private temporary folder until its SuperNode had
    # read it and answered the worker.
    started = federation.root.stat().st_ctime
    left = [d for d in Path(tempfile.gettempdir()).glob("fedtune-site-*")
            if d.stat().st_ctime >= started and (d / "superexec.secret").exists()]  # fmt: skip
    assert not left


def test_a_deployed_sites_nan_update_is_rejected_by_the_server(
    federation: LocalFederation, app: Path, tiny_models: dict[str, str], tmp_path: Path
) -> None:
    """Update validation under the Deployment Engine: org-a (partition 0) sends a NaN
    every round; the server rejects it, names it, and averages the two others."""
    config = _write_config(tmp_path, tiny_models["bert"], 'attack = "nan"', "attackers = 1",
                           "min_sites = 2")  # fmt: skip
    out = tmp_path / "run"
    run = federation.submit(app, fedtune_run_config(config, out), timeout=600)
    assert run.completed, run
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["sites"] == 2 and list(r["rejected"]) == ["site-1"]
        assert "non-finite values" in r["rejected"]["site-1"]
    final = load_file(str(out / "checkpoint" / "global.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())
    assert "## Updates rejected" in (out / "report.md").read_text()


def test_secure_aggregation_deployed_equals_in_process(
    federation: LocalFederation, app: Path, tiny_models: dict[str, str], tmp_path: Path
) -> None:
    """SecAgg+ across SuperNodes (three sites, TLS): the same global state as the same
    run in process, up to the protocol's quantization."""
    import fedtune.federated.apps as apps
    from fedtune.config import load_config
    from fedtune.federated.runner import run_federated

    config = _write_config(tmp_path, tiny_models["bert"], "secagg = true")
    out = tmp_path / "run"
    run = federation.submit(app, fedtune_run_config(config, out), timeout=600)
    assert run.completed, run
    rounds = _rounds(out)
    assert [(r["round"], r["sites"], r.get("secagg")) for r in rounds] == [(1, 3, True),
                                                                           (2, 3, True)]
    apps.clear_workspace()
    local = tmp_path / "local"
    run_federated(load_config(str(config), [f"output_dir={local}", "name=x"]))
    apps.clear_workspace()
    a = load_file(str(out / "checkpoint" / "global.safetensors"))
    b = load_file(str(local / "x" / "checkpoint" / "global.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_methods_federated_by_query_run_deployed_as_in_process(
    federation: LocalFederation, app: Path, tiny_models: dict[str, str], tmp_path: Path
) -> None:
    """Frozen methods federated by query (fedtune.federated.query) across SuperNodes:
    knn's replies are arrays (top-k scores and label ids), generation ICL's are texts
    and a confidence per question (ConfigRecords both ways). Over gRPC and TLS the
    answers are those of the same run in process, each from the same site: the tiny
    LM's confidences tie between sites on some of these questions, and before the
    server read replies by site name (not by its random node ids) the ties went to
    other sites than in process."""
    cases = {"knn": _write_config(tmp_path, tiny_models["bert"]).read_text()
             .replace('name = "lora"\nlr = 0.01', 'name = "knn"\nk = 3')}  # fmt: skip
    rows = []
    for i in range(30):
        a, b = i % 7, (i * 3) % 5
        rows.append({"instruction": f"What is {a} plus {b}? ({i})", "context": f"note {i}",
                     "response": str(a + b)})  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cases["icl"] = f"""name = "deployed"
[data]
task = "generation"
source = "file"
path = {json.dumps(str(tmp_path / "qa.jsonl"))}
[model]
name = {json.dumps(tiny_models["llama"])}
max_length = 48
max_new_tokens = 4
[method]
name = "icl"
shots = 2
[train]
progress = false
[federated]
sites = {len(SITES)}
"""
    for method, text in cases.items():
        config = tmp_path / f"{method}.toml"
        config.write_text(text, encoding="utf-8")
        out = tmp_path / f"{method}-deployed"
        run = federation.submit(app, fedtune_run_config(config, out), timeout=600)
        assert run.completed, run
        apps.clear_workspace()
        local = tmp_path / f"{method}-local"
        summary = run_federated(load_config(str(config), [f"output_dir={local}", "name=x"]),
                                Console(quiet=True))  # fmt: skip
        apps.clear_workspace()
        test = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert test["event"] == "test" and test["strategy"] == "query", method
        assert test["n_test"] == summary["n_test"] > 0
        assert test[test["primary"]] == pytest.approx(summary[summary["primary"]], abs=1e-6)
        np.testing.assert_allclose(test["test_scores"], summary["test_scores"], atol=1e-6)
        assert test["confusion"] == summary["confusion"]
        if method == "icl":  # each answer the same text, from the same site (by order)
            deployed = [json.loads(line) for line in (out / "answers.jsonl").open()]
            in_process = [json.loads(line) for line in (local / "x" / "answers.jsonl").open()]
            site = dict(zip(test["sites"], summary["sites"], strict=True))
            assert [(d["prediction"], site[d["site"]]) for d in deployed] == [
                (p["prediction"], p["site"]) for p in in_process]


@pytest.mark.slow
def test_a_failing_run_raises_with_the_serverapp_log(federation: LocalFederation,
                                                     tmp_path: Path) -> None:  # fmt: skip
    rc = fedtune_run_config(overrides=["no_such_key=1"], output_dir=tmp_path / "out")
    with pytest.raises(DeploymentError, match=r"(?s)finished:failed.*unknown config key"):
        federation.submit(stage_app(find_app_dir(), tmp_path / "app"), rc, timeout=300)


# --- without processes: commands, errors ------------------------------------------


def test_commands_are_secure_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    link = superlink_command(certs, 9092, tmp_path)
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert str(certs.server_key.resolve()) in link
    node = supernode_command("h:9092", {"partition-id": 0}, ca_cert=certs.ca_cert,
                             auth_key=certs.site_key("a"))  # fmt: skip
    assert "--auth-supernode-private-key" in node and "--insecure" not in node
    with pytest.raises(ConfigError, match="insecure=True"):
        superlink_command(None, 9092, tmp_path)
    with pytest.raises(ConfigError, match="authentication key"):
        supernode_command("h:9092", {}, ca_cert=certs.ca_cert)
    with caplog.at_level(logging.WARNING, logger="fedtune.deploy"):
        assert "--insecure" in superlink_command(None, 9092, tmp_path, insecure=True)
    assert "insecure" in caplog.text


def test_config_strings_and_connection_file(tmp_path: Path) -> None:
    assert format_config({"partition-id": 1, "x": 0.5, "ok": True}) == (
        "partition-id=1 x=0.5 ok=true"
    )
    assert format_config({"set": "a=1;b='c'"}) == "set=\"a=1;b='c'\""
    assert format_config({"config": "/p/c.toml"}) == "config='/p/c.toml'"
    with pytest.raises(ConfigError, match="quote"):
        format_config({"k": "\"'"})
    certs = make_certs(tmp_path / "certs", ["a"])
    write_connection(tmp_path, "one", "127.0.0.1:1", certs.ca_cert)
    path = write_connection(tmp_path, "two", "h:2", insecure=True, default=False)
    data = tomllib.loads(path.read_text())["superlink"]
    assert data["default"] == "one"
    assert data["one"] == {"address": "127.0.0.1:1", "insecure": False,
                           "root-certificates": str(certs.ca_cert.resolve())}  # fmt: skip
    assert data["two"] == {"address": "h:2", "insecure": True}
    with pytest.raises(ConfigError, match="root certificate"):
        write_connection(tmp_path, "three", "h:3", tmp_path / "nope.crt")


def test_missing_binary_and_busy_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeploymentError, match="flower-superlink not found"):
        flower_binary("flower-superlink")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(DeploymentError, match="in use"):
            check_port_free("127.0.0.1", s.getsockname()[1])


def test_a_superlink_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a"])
    certs.server_key.write_text("not a key\n")
    fed = LocalFederation(tmp_path / "fed", ["a"], certs, start_timeout=60)
    with pytest.raises(DeploymentError, match=r"SuperLink exited \(code [1-9]") as err:
        fed.start()
    assert "superlink.log" in str(err.value)
    assert fed.superlink is not None and fed.superlink.popen.poll() is not None


def test_staged_app_packs_the_same_sources(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    app = stage_app(find_app_dir(), tmp_path / "app")
    names = zipfile.ZipFile(BytesIO(build_fab_from_disk(app))).namelist()
    assert "src/fedtune/federated/apps.py" in names and "src/fedtune/deploy.py" in names
    assert not [n for n in names if n.startswith((".venv", "runs/", "tests/"))]
