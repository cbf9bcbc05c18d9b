"""The federated regime: equivalences with centralized training, Flower's
aggregation rules against hand-computed numbers, partitioners, byte accounting,
checkpoint + resume, the compare pipeline and bad input."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from rich.console import Console
from safetensors.torch import load_file

import fedtune.federated.apps as apps
from fedtune.config import FederatedConfig, RunConfig, load_config
from fedtune.data import Example
from fedtune.errors import ConfigError, DataError
from fedtune.federated.compare import run_regimes, val_curve
from fedtune.federated.grid import InProcessGrid, exchange
from fedtune.federated.partition import Partition, partition_examples
from fedtune.federated.runner import run_federated
from fedtune.federated.scaffold import (
    CONTROL,
    SITE_CONTROL,
    Scaffold,
    site_controls,
    update_site_control,
)
from fedtune.federated.server import build_strategy, checkpoint_state, find_checkpoint
from fedtune.federated.wire import (
    decode_state,
    encode_state,
    payload_bytes,
    recorddict_from_bytes,
)
from fedtune.regimes import run_centralized
from fedtune.runs import read_jsonl
from fedtune.train import proximal_term


def _cfg(tiny: dict[str, str], table: Path, out: Path, *extra: str) -> RunConfig:
    apps.clear_workspace()
    return load_config(None, [
        "data.source=file", f"data.path={table}", f"model.name={tiny['bert']}",
        "train.progress=false", "train.batch_size=8", f"output_dir={out}",
        "method.name=lora", "method.lr=0.01", *extra,
    ])  # fmt: skip


def _history(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["event"] == "round"]


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_one_site_one_epoch_per_round_equals_centralized(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, strategy: str
) -> None:
    # SCAFFOLD's one site: c = c_1 after every round, so no correction.
    common = ["federated.sites=1", "train.epochs=3", "federated.rounds=3",
              f"federated.strategy={strategy}"]  # fmt: skip
    cen = run_centralized(_cfg(tiny_models, table, tmp_path, *common, "name=c"))
    run_federated(_cfg(tiny_models, table, tmp_path, *common, "name=f"))
    c = [r for r in read_jsonl(tmp_path / "c" / "metrics.jsonl") if r["event"] == "eval"]
    f = _history(tmp_path / "f")
    assert len(c) == len(f) == 3
    for a, b in zip(c, f, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6, abs=1e-7)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6, abs=1e-7)
    last = json.loads((tmp_path / "f" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["accuracy"] == pytest.approx(cen["accuracy"])


def test_local_batch_size_is_the_sites_batch(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    # federated.local_batch_size 4 (train.batch_size 8) == centralized at batch 4:
    # the same batches, steps per round and schedule.
    common = ["federated.sites=1", "train.epochs=2", "federated.rounds=2"]
    run_centralized(_cfg(tiny_models, table, tmp_path, *common, "name=c", "train.batch_size=4"))
    run_federated(_cfg(tiny_models, table, tmp_path, *common, "name=f",
                       "federated.local_batch_size=4"))  # fmt: skip
    c = [r for r in read_jsonl(tmp_path / "c" / "metrics.jsonl") if r["event"] == "eval"]
    f = _history(tmp_path / "f")
    for a, b in zip(c, f, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6, abs=1e-7)
    with pytest.raises(ConfigError, match="local_batch_size"):
        run_federated(_cfg(tiny_models, table, tmp_path, "name=bad",
                           "federated.local_batch_size=-1"))  # fmt: skip
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_identical_sites_equal_one_site(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    strategy: str,
) -> None:  # fmt: skip
    real = apps.partition_examples

    def cloned(examples, labels, fed, seed):  # type: ignore[no-untyped-def]
        one = real(examples, labels, FederatedConfig(sites=1), seed).sites[0]
        return Partition([one] * fed.sites)

    monkeypatch.setattr(apps, "partition_examples", cloned)
    run_federated(_cfg(tiny_models, table, tmp_path, "federated.sites=1", "name=one",
                       "federated.rounds=2", f"federated.strategy={strategy}"))  # fmt: skip
    run_federated(_cfg(tiny_models, table, tmp_path, "federated.sites=3", "name=three",
                       "federated.rounds=2", f"federated.strategy={strategy}"))  # fmt: skip
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "three"), strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    one = load_file(str(tmp_path / "one" / "checkpoint" / "global.safetensors"))
    three = load_file(str(tmp_path / "three" / "checkpoint" / "global.safetensors"))
    for k in one:
        torch.testing.assert_close(three[k], one[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedavg", "median"])
def test_aggregation_reads_the_sites_by_name_not_by_node_id(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    strategy: str,
) -> None:  # fmt: skip
    # A deployed federation's node ids are drawn at random: the rule must see the same
    # sites in the same order as in process, else its float sums (and a robust rule's
    # ties) come out otherwise. Here the node ids come in reverse.
    import fedtune.federated.server as server

    seen: list[list[str]] = []
    real = server.screen

    def spy(replies, *args):  # type: ignore[no-untyped-def]  # what the rule gets, in order
        seen.append([str(r.content["site"]["name"]) for r in replies])
        return real(replies, *args)

    monkeypatch.setattr(server, "screen", spy)
    common = ["federated.sites=3", "federated.rounds=2", f"federated.strategy={strategy}"]
    run_federated(_cfg(tiny_models, table, tmp_path, *common, "name=ids"))
    forward = [tuple(s) for s in seen]
    names = sorted(forward[0])
    assert forward == [tuple(names)] * 2, forward
    monkeypatch.setattr(InProcessGrid, "get_node_ids",
                        lambda self: sorted(self.contexts, reverse=True))  # fmt: skip
    seen.clear()
    run_federated(_cfg(tiny_models, table, tmp_path, *common, "name=reversed"))
    assert [tuple(s) for s in seen] == forward
    a = load_file(str(tmp_path / "ids" / "checkpoint" / "global.safetensors"))
    b = load_file(str(tmp_path / "reversed" / "checkpoint" / "global.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _record(arrays: dict[str, list[float]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, dtype=np.float32)) for k, v in arrays.items()})


def _reply(arrays: dict[str, list[float]], n: int,
           control: dict[str, list[float]] | None = None) -> Message:  # fmt: skip
    msg = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1000, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m"
    content = RecordDict({
        "arrays": _record(arrays), "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
    })  # fmt: skip
    if control is not None:
        content[CONTROL] = _record(control)
    return Message(content, reply_to=msg)


@pytest.fixture
def identity() -> None:
    InProcessGrid(apps.client_app, {}, run_id=7)  # sets Flower's task identity


def test_fedavg_weights_by_examples(identity: None) -> None:
    strategy = build_strategy(FederatedConfig(strategy="fedavg"), lr=0.1)
    agg, metrics = strategy.aggregate_train(1, [_reply({"w": [1, 2]}, 1), _reply({"w": [4, 8]}, 3)])
    assert agg is not None and metrics is not None
    # (1 * 1 + 4 * 3) / 4, (2 * 1 + 8 * 3) / 4
    np.testing.assert_allclose(agg["w"].numpy(), [3.25, 6.5])


def test_fedadam_update_rule(identity: None) -> None:
    fed = FederatedConfig(strategy="fedadam", server_lr=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    strategy = build_strategy(fed, lr=0.1)
    strategy.current_arrays = {"w": np.array([0.0], dtype=np.float32)}
    agg, _ = strategy.aggregate_train(1, [_reply({"w": [1.0]}, 2)])
    assert agg is not None
    # delta 1; m = 0.1; v = 0.01; eta_norm = 0.01 * sqrt(1 - 0.99^2) / (1 - 0.9^2)
    eta_norm = 0.01 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = eta_norm * 0.1 / (np.sqrt(0.01) + 1e-3)
    np.testing.assert_allclose(agg["w"].numpy(), [expected], rtol=1e-5)
    assert expected == pytest.approx(0.0073511, rel=1e-4)


def test_fedprox_term_and_config() -> None:
    w = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    a = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    # mu / 2 * (1 + 4 + 4) with mu = 0.5
    assert proximal_term(w, a, 0.5).item() == pytest.approx(2.25)
    strategy = build_strategy(FederatedConfig(strategy="fedprox", proximal_mu=0.3), lr=0.1)
    assert strategy.proximal_mu == pytest.approx(0.3)  # type: ignore[attr-defined]


def test_fedprox_pulls_sites_towards_the_global_model(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    def drift(name: str, *extra: str) -> float:
        cfg = _cfg(tiny_models, table, tmp_path, f"name={name}", "federated.rounds=1",
                   "train.max_steps=0", "federated.local_epochs=3", *extra)  # fmt: skip
        init = {k: v.clone() for k, v in apps.workspace(cfg).initial_state.items()}
        run_federated(cfg)
        final = load_file(str(tmp_path / name / "checkpoint" / "global.safetensors"))
        return sum(float((final[k] - init[k]).pow(2).sum()) for k in init)

    plain = drift("avg")
    prox = drift("prox", "federated.strategy=fedprox", "federated.proximal_mu=50")
    assert prox < plain


def test_scaffold_update_rules_by_hand() -> None:
    # Server: 4 sites, half of them sampled, eta_g 0.5, x = [1, 2], c = 0 at first.
    grid = InProcessGrid(apps.client_app, dict.fromkeys(range(1000, 1004)), run_id=7)  # type: ignore[arg-type]
    fed = FederatedConfig(strategy="scaffold", server_lr=0.5, fraction=0.5, sites=4)
    strategy = build_strategy(fed, lr=0.1)
    assert isinstance(strategy, Scaffold)
    assert len(list(strategy.configure_train(1, _record({"w": [1, 2]}), ConfigRecord(), grid))) == 2
    np.testing.assert_array_equal(strategy.train_payload()[CONTROL]["w"].numpy(), [0, 0])
    agg, _ = strategy.aggregate_train(1, [_reply({"w": [0, 0]}, 1, {"w": [2, 4]}),
                                          _reply({"w": [4, 8]}, 3, {"w": [-2, 0]})])  # fmt: skip
    assert agg is not None
    # FedAvg's [3, 6]; x + 0.5 * ([3, 6] - [1, 2]) = [2, 4]
    np.testing.assert_allclose(agg["w"].numpy(), [2, 4])
    # c + |S|/N * mean(dc) = 0 + 2/4 * [0, 2]
    np.testing.assert_allclose(strategy.control["w"], [0, 1])
    with pytest.raises(ConfigError, match="without its SCAFFOLD control"):
        strategy.aggregate_train(2, [_reply({"w": [0, 0]}, 1)])

    # Site: c_i+ = (x - y) / sum(lr) - (c - c_i), kept in the site's state; dc = c_i+ - c_i.
    state = RecordDict()
    t = torch.tensor
    c, c_i = site_controls({"w": t([0.2, 0.0])}, state)
    torch.testing.assert_close(c_i["w"], t([0.0, 0.0]))
    c_i = {"w": t([0.1, 0.3])}
    dc = update_site_control(state, {"w": t([1.0, 2.0])}, {"w": t([0.5, 3.0])}, c, c_i, 0.5)
    # (x - y) / 0.5 = [1, -2]; c - c_i = [0.1, -0.3]; c_i+ = [0.9, -1.7]
    torch.testing.assert_close(site_controls(c, state)[1]["w"], t([0.9, -1.7]))
    torch.testing.assert_close(dc["w"], t([0.8, -2.0]))


def test_scaffold_refuses_methods_without_gradient_steps(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="scaffold"):
        run_federated(_cfg(tiny_models, table, tmp_path, "name=s", "method.name=features",
                           "federated.strategy=scaffold"))  # fmt: skip
    assert not (tmp_path / "s").exists()


def _examples(n: int = 60) -> list[Example]:
    return [Example(f"t{i}", LABELS[i % 3], f"row {i}", f"s{i % 4}") for i in range(n)]


@pytest.mark.parametrize(
    ("over", "sizes"),
    [
        ({"partition": "iid", "sites": 3}, [20, 20, 20]),
        ({"partition": "sizes", "sites": 2, "sizes": (10, 25)}, [10, 25]),
        ({"partition": "column"}, [15, 15, 15, 15]),
    ],
)
def test_partitions_are_disjoint_and_sized(over: dict, sizes: list[int]) -> None:
    p = partition_examples(_examples(), LABELS, FederatedConfig(**over), seed=1)
    assert [len(s.train) for s in p.sites] == sizes
    texts = [e.text for s in p.sites for e in s.train]
    assert len(texts) == len(set(texts))
    again = partition_examples(_examples(), LABELS, FederatedConfig(**over), seed=1)
    assert [[e.text for e in s.train] for s in again.sites] == [
        [e.text for e in s.train] for s in p.sites
    ]


def test_dirichlet_and_quantity_skew() -> None:
    ex = _examples(600)
    p = partition_examples(ex, LABELS, FederatedConfig(partition="dirichlet", alpha=0.1), seed=0)
    assert sum(len(s.train) for s in p.sites) == 600
    mixes = [[sum(e.label == lab for e in s.train) / len(s.train) for lab in LABELS]
             for s in p.sites]  # fmt: skip
    assert max(max(m) for m in mixes) > 0.6  # skewed: some site dominated by one label
    q = partition_examples(ex, LABELS, FederatedConfig(partition="quantity", alpha=0.5), seed=0)
    sizes = sorted(len(s.train) for s in q.sites)
    assert sum(sizes) == 600 and sizes[-1] > sizes[0] and sizes[0] >= 10


def test_site_validation_holdout() -> None:
    fed = FederatedConfig(partition="iid", sites=2, validation="site", site_val_size=0.2)
    p = partition_examples(_examples(), LABELS, fed, seed=0)
    assert [(len(s.train), len(s.validation)) for s in p.sites] == [(24, 6), (24, 6)]


def test_partition_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"federated.sizes has 2 entries"):
        partition_examples(_examples(), LABELS, FederatedConfig(partition="sizes", sizes=(5, 5)), 0)
    with pytest.raises(ConfigError, match=r"add up to at most the 60"):
        fed = FederatedConfig(partition="sizes", sites=2, sizes=(50, 50))
        partition_examples(_examples(), LABELS, fed, 0)
    no_site = [Example("a", "neutral", "f.csv:2")]
    with pytest.raises(DataError, match=r"f.csv:2.*data.site_column"):
        partition_examples(no_site, LABELS, FederatedConfig(partition="column"), 0)


@pytest.mark.parametrize(
    ("transport", "width", "strategy"),
    [("fp32", 4, "fedavg"), ("fp16", 2, "fedavg"), ("bf16", 2, "fedavg"), ("bf16", 2, "scaffold")],
)
def test_bytes_accounted_exactly(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, transport: str, width: int,
    strategy: str,
) -> None:  # fmt: skip
    cfg = _cfg(tiny_models, table, tmp_path, "name=b", "federated.rounds=2",
               f"federated.transport={transport}", f"federated.strategy={strategy}")  # fmt: skip
    summary = run_federated(cfg)
    # SCAFFOLD sends the control beside the state, both ways: two states per message.
    n_params = summary["trainable_parameters"] * (2 if strategy == "scaffold" else 1)
    assert summary["payload_up_per_site_round"] == n_params * width
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["state"]
    traffic = state["traffic"]
    assert len(traffic) == 2 * 3 * 2  # rounds x sites x (down + up)
    assert all(t["payload_bytes"] == n_params * width for t in traffic)
    assert sum(t["payload_bytes"] for t in traffic) == n_params * width * len(traffic)
    # The serialized message carries the payload plus bounded framing.
    assert all(0 < t["bytes"] - t["payload_bytes"] < 200 * 40 for t in traffic)


def test_transport_roundtrip_precision() -> None:
    state = {"a": torch.randn(64, 8), "b": torch.randn(5)}
    for transport, tol in (("fp32", 0.0), ("fp16", 1e-2), ("bf16", 2e-2)):
        record = encode_state(state, transport)
        back = decode_state(record, transport)
        assert payload_bytes(record) == (64 * 8 + 5) * (4 if transport == "fp32" else 2)
        for k in state:
            assert back[k].dtype == torch.float32
            torch.testing.assert_close(back[k], state[k], rtol=tol, atol=tol)


def _interrupt_at_push(monkeypatch: pytest.MonkeyPatch, n: int):  # type: ignore[no-untyped-def]
    """Ctrl-C during the server's n-th push of messages (round n when every round
    pushes once); returns the real method, to put back."""
    real = InProcessGrid.push_messages
    calls = {"n": 0}

    def dies(self, messages):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, messages)

    monkeypatch.setattr(InProcessGrid, "push_messages", dies)
    return real


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold", "trimmedmean"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    strategy: str,
) -> None:  # fmt: skip
    # Server optimizer state (FedAdam's moments; SCAFFOLD's c) and site state (SCAFFOLD's
    # c_i, each site's optimizer) are both checkpointed.
    extra = ("federated.rounds=3", f"federated.strategy={strategy}", "federated.fraction=0.67",
             "federated.min_sites=2")  # fmt: skip
    run_federated(_cfg(tiny_models, table, tmp_path, "name=full", *extra))
    if strategy == "scaffold":  # c = the mean of all sites' c_i, under sampling too
        ckpt = tmp_path / "full" / "checkpoint"
        c = load_file(str(ckpt / "strategy.safetensors"))
        sites = [recorddict_from_bytes(f.read_bytes()).array_records[SITE_CONTROL]
                 for f in sorted((ckpt / "sites").iterdir())]  # fmt: skip
        assert len(sites) == 3 and len(c) == len(sites[0]) > 0
        for name, control in c.items():
            mean = np.mean([s[name.split("|")[-1]].numpy() for s in sites], axis=0)
            assert float(np.abs(control.numpy()).max()) > 0
            np.testing.assert_allclose(control.numpy(), mean, rtol=1e-4, atol=1e-7)

    real = _interrupt_at_push(monkeypatch, 3)  # in round 3
    with pytest.raises(KeyboardInterrupt):
        run_federated(_cfg(tiny_models, table, tmp_path, "name=cut", *extra))
    assert len(_history(tmp_path / "cut")) == 2
    monkeypatch.setattr(InProcessGrid, "push_messages", real)
    apps.clear_workspace()  # as a fresh process would
    run_federated(load_config(None, []), resume=tmp_path / "cut")
    full = load_file(str(tmp_path / "full" / "checkpoint" / "global.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "checkpoint" / "global.safetensors"))
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=0)
    assert [h["val_loss"] for h in _history(tmp_path / "cut")] == [
        h["val_loss"] for h in _history(tmp_path / "full")
    ]
    assert (tmp_path / "cut" / "model" / "fedtune.json").is_file()


def test_resume_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an interrupted federated run"):
        run_federated(load_config(None, []), resume=tmp_path)


def test_personalized_models_and_site_validation(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_models, table, tmp_path, "name=p", "federated.rounds=1",
               "federated.validation=site", "federated.personalize_epochs=1",
               "federated.strategy=fedavgm")  # fmt: skip
    summary = run_federated(cfg)
    assert [r["site"] for r in summary["personalized"]] == ["site-1", "site-2", "site-3"]
    assert all("personal_val_accuracy" in r for r in summary["personalized"])
    assert "site_val_loss" in summary["history"][-1]
    assert (tmp_path / "p" / "sites" / "site-2" / "model" / "fedtune.json").is_file()
    assert "personalized" in (tmp_path / "p" / "report.md").read_text()
    # Without site validation sets there is nothing to score personalization on: the
    # run stops before its first round (it used to fail after its last), writing nothing.
    bad = _cfg(tiny_models, table, tmp_path, "name=q", "federated.rounds=1",
               "federated.personalize_epochs=1")  # fmt: skip
    with pytest.raises(ConfigError, match=r"federated\.validation = 'site'"):
        run_federated(bad)
    assert not (tmp_path / "q").exists()


def test_compare_pipeline_writes_both_figures(
    tiny_models: dict[str, str], table: Path, tmp_path: Path,
    check_paired_findings: Callable[[Path, str], None],
) -> None:
    cfg = _cfg(tiny_models, table, tmp_path, "name=cmp", "federated.rounds=2",
               "federated.partition=column", "data.site_column=site")  # fmt: skip
    out = run_regimes(cfg, ["lora", "ptuning"],
                      federated_overrides={"ptuning": {"local_batch_size": 4}})  # fmt: skip
    report = (out / "report.md").read_text()
    (line,) = [x for x in report.splitlines() if x.startswith("| ptuning | federated | all |")]
    # Local-only sites train at the sites' batch too (same steps as a federated site).
    assert "), site batch 4 |" in line and report.count("site batch 4 |") == 4
    assert not [x for x in report.splitlines() if x.startswith("| lora |") and "site batch" in x]
    for name in ("fig_a_centralized_vs_federated.png", "fig_b_local_vs_federated.png"):
        assert (out / name).stat().st_size > 10_000 and name in report
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["method"], r["regime"]) for r in rows] == [
        (m, reg) for m in ("lora", "ptuning")
        for reg in ("centralized", "local", "local", "local", "federated")
    ]  # fmt: skip
    fed = [r for r in rows if r["regime"] == "federated"]
    assert all(r["bytes_total"] > 0 and r["sites"] == ["org-0", "org-1", "org-2"] for r in fed)
    cen = [r for r in rows if r["regime"] == "centralized"]
    assert all(r["epochs"] == pytest.approx(2.0) for r in cen)  # same budget
    local = [r for r in rows if r["method"] == "ptuning" and r["regime"] == "local"]
    assert all(r["site_batch_size"] == 4 for r in local)
    for r in local:  # each local site took ceil(n / 4) steps per epoch, as its federated twin
        assert r["steps"] == 2 * -(-r["n_train"] // 4)
    # Figure a's curves, from the saved runs: one point per round (x = round x local
    # epochs) and one per centralized evaluation, ending at the same budget.
    fed_x = [x for x, _ in val_curve(out / "ptuning-federated")]
    assert fed_x == pytest.approx([cfg.federated.local_epochs * n for n in (1, 2)])
    assert val_curve(out / "ptuning-centralized")[-1][0] == pytest.approx(fed_x[-1])
    check_paired_findings(out, "accuracy")


def test_a_comparison_of_one_regime_plots_without_a_legend_warning(tmp_path: Path) -> None:
    """`--regimes centralized` leaves figure b with nothing to draw: no matplotlib
    warning about an empty legend reaches the user."""
    import warnings

    from fedtune.federated.compare import _plot

    curves = {"ptuning": {"centralized": [(0.0, 1.1), (1.0, 0.4)]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _plot(curves, "local", tmp_path / "b.png", "local vs federated")
        _plot(curves, "centralized", tmp_path / "a.png", "centralized vs federated")
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


def test_a_comparison_reads_the_two_findings_off_its_runs() -> None:
    """The report's findings table: federated minus centralized and minus the best
    local-only site, in points, with one run's binomial standard error; a method that
    ran no federated regime (or only that) gets no row."""
    from fedtune.federated.compare import findings

    def row(method: str, regime: str, site: str, acc: float) -> dict[str, object]:
        return {"method": method, "regime": regime, "site": site, "accuracy": acc,
                "n_test": 400}  # fmt: skip

    rows = [row("ptuning", "centralized", "all", 0.91),
            row("ptuning", "local", "site-1", 0.86), row("ptuning", "local", "site-2", 0.885),
            row("ptuning", "federated", "all", 0.90), row("lora", "centralized", "all", 0.93),
            row("features", "federated", "all", 0.9)]  # fmt: skip
    lines = findings(rows, "accuracy")
    assert "| ptuning | -1.0 | +1.5 (site-2) | 1.5 |" in lines  # sqrt(.9 * .1 / 400) = 1.5
    assert not any(line.startswith(("| lora", "| features")) for line in lines)
    assert findings(rows[5:], "accuracy") == []
    gen = [{**r, "rougeL": r["accuracy"]} for r in rows[:4]]
    assert "| ptuning | -1.0 | +1.5 (site-2) | - |" in findings(gen, "rougeL")


def test_the_findings_read_off_the_validation_loss_as_the_post_does() -> None:
    """The post's figures are validation-loss curves: the findings also compare each
    run's lowest shared validation loss, federated against centralized and every site;
    a method without losses (frozen) gets no row there."""
    from fedtune.federated.compare import findings

    def row(method: str, regime: str, site: str, loss: float) -> dict[str, object]:
        return {"method": method, "regime": regime, "site": site, "accuracy": 0.9,
                "n_test": 400, "best_val_loss": loss}  # fmt: skip

    nan = float("nan")
    frozen = [{**row("knn", regime, "all", 0.3), "kind": "frozen"}
              for regime in ("centralized", "federated")]  # fmt: skip
    rows = [row("ptuning", "centralized", "all", 0.042), row("ptuning", "local", "site-1", 0.24),
            row("ptuning", "local", "site-2", 0.12), row("ptuning", "federated", "all", 0.14),
            row("lora", "centralized", "all", 0.116), row("lora", "local", "site-1", 0.173),
            row("lora", "federated", "all", 0.077), *frozen,
            row("ia3", "centralized", "all", 0.2), row("ia3", "federated", "all", nan)]  # fmt: skip
    lines = findings(rows, "accuracy")
    assert ("| ptuning | 0.1400 | 0.0420 | 0.1200 (site-2) | above centralized (3.33x); "
            "not below site-2 |") in lines
    assert ("| lora | 0.0770 | 0.1160 | 0.1730 (site-1) | below centralized (0.66x); "
            "below every local-only site |") in lines
    # A frozen method keeps no model by its loss; a NaN loss is no reading.
    assert not any(line.startswith(("| knn | 0.3", "| ia3 | nan")) for line in lines)
    assert lines.index("| method | federated | centralized | lowest local-only site | "
                       "reading |") < lines.index("| ptuning | +0.0 | +0.0 (site-1) | 1.5 |")
    level = findings([row("lora", "centralized", "all", 0.1), row("lora", "federated", "all",
                                                                  0.1)], "accuracy")  # fmt: skip
    assert "| lora | 0.1000 | 0.1000 | - | level with centralized (1.00x) |" in level
    no_loss = [{k: v for k, v in r.items() if k != "best_val_loss"} for r in rows]
    assert not any("lowest local-only site" in line for line in findings(no_loss, "accuracy"))


def test_the_findings_carry_a_paired_interval_from_per_example_scores() -> None:
    """With each run's per-example test scores, each gap gets its paired bootstrap 95%
    interval: a gap made of the same shift on every example has a zero-width interval;
    one made of a few examples holds 0; runs tested on other examples get none."""
    from fedtune.federated.compare import findings, paired_gap

    assert paired_gap([0.5] * 50, [0.4] * 50) == pytest.approx((0.1, 0.1, 0.1))
    cen = [1.0] * 90 + [0.0] * 10
    fed = [0.0] * 2 + [1.0] * 88 + [0.0] * 10  # two examples lost: -2 points
    gap, lo, hi = paired_gap(fed, cen)
    assert gap == pytest.approx(-0.02) and lo < -0.02 < hi and lo >= -0.06 and hi == 0.0
    assert paired_gap(fed, cen[:50]) is None and paired_gap([], []) is None

    def row(regime: str, site: str, scores: list[float]) -> dict[str, object]:
        return {"method": "lora", "regime": regime, "site": site, "rougeL": sum(scores) / 100,
                "n_test": 100, "test_scores": scores}  # fmt: skip

    lines = findings([row("centralized", "all", cen), row("local", "a", [0.5] * 100),
                      row("federated", "all", fed)], "rougeL")  # fmt: skip
    line = next(x for x in lines if x.startswith("| lora"))
    assert line.startswith(f"| lora | -2.0 [{100 * lo:+.1f}, +0.0] | +38.0 [+3")  # 31-44
    assert line.endswith("] (a) | - |")


def test_paired_intervals_resample_whole_groups_when_examples_have_them() -> None:
    """Questions about one report move together: with each example's group, the
    interval resamples groups (10 reports x 10 questions, half the reports all gained,
    half all level) and is far wider than one that takes the 100 questions as
    independent; the gap itself is the same. Groups of one example, or one group for
    all, are the example bootstrap."""
    from fedtune.federated.compare import findings, paired_gap

    cen = [0.0] * 100
    fed = [1.0 if i // 10 % 2 == 0 else 0.0 for i in range(100)]  # reports 0, 2, 4, 6, 8
    groups = [f"report-{i // 10}" for i in range(100)]
    plain, clustered = paired_gap(fed, cen), paired_gap(fed, cen, groups)
    assert plain is not None and clustered is not None
    assert plain[0] == clustered[0] == pytest.approx(0.5)
    assert clustered[1] < plain[1] < 0.5 < plain[2] < clustered[2]
    assert clustered[2] - clustered[1] > 2.5 * (plain[2] - plain[1])  # ~0.6 vs ~0.2
    assert paired_gap(fed, cen, [str(i) for i in range(100)]) == plain
    assert paired_gap(fed, cen, ["one"] * 100) == plain
    assert paired_gap([0.5] * 50, [0.4] * 50, groups[:50]) == pytest.approx((0.1, 0.1, 0.1))

    def row(regime: str, scores: list[float]) -> dict[str, object]:
        return {"method": "lora", "regime": regime, "site": "all", "rougeL": sum(scores) / 100,
                "n_test": 100, "test_scores": scores, "test_groups": groups}  # fmt: skip

    lines = findings([row("centralized", cen), row("federated", fed)], "rougeL")
    line = next(x for x in lines if x.startswith("| lora"))
    assert line.startswith(f"| lora | +50.0 [{100 * clustered[1]:+.1f}, {100 * clustered[2]:+.1f}]")
    assert any("resampled as 10 whole groups" in x for x in lines)


def test_compare_over_seeds_reports_mean_and_spread(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    from fedtune.federated.compare import run_seeds

    cfg = _cfg(tiny_models, table, tmp_path, "name=seeds", "federated.rounds=1",
               "federated.partition=column", "data.site_column=site")  # fmt: skip
    out = run_seeds(cfg, [1, 2], ["lora"], ("centralized", "local", "federated"))
    per_seed = {s: json.loads((out / f"seed-{s}" / "comparison.json").read_text())
                for s in (1, 2)}  # fmt: skip
    for s in (1, 2):  # each seed's comparison ran with that seed
        assert json.loads((out / f"seed-{s}" / "lora-centralized" / "config.json")
                          .read_text())["seed"] == s  # fmt: skip
    rows = json.loads((out / "seeds.json").read_text())
    assert len(rows) == 2 * 5 and {r["seed"] for r in rows} == {1, 2}
    report = (out / "report.md").read_text()
    assert (out / "seeds.png").stat().st_size > 10_000 and "seeds.png" in report
    # The centralized row's mean and the paired federated - centralized gap, by hand.
    cen = [per_seed[s][0]["accuracy"] for s in (1, 2)]
    fed = [per_seed[s][-1]["accuracy"] for s in (1, 2)]
    assert per_seed[1][0]["regime"] == "centralized" and per_seed[1][-1]["regime"] == "federated"
    mean, sd = np.mean(cen), np.std(cen, ddof=1)
    assert f"| lora | centralized | all | 2 | {100 * mean:.1f} ± {100 * sd:.1f} |" in report
    gaps = [f - c for f, c in zip(fed, cen, strict=True)]
    assert f"| lora | {100 * np.mean(gaps):.1f} ± {100 * np.std(gaps, ddof=1):.1f} |" in report
    assert not list(tmp_path.glob(".*partial"))

    with pytest.raises(ConfigError, match="two different seeds"):
        run_seeds(dataclasses.replace(cfg, name="one"), [3, 3])
    assert not (tmp_path / "one").exists()


def test_an_interrupted_compare_resumes_where_it_stopped(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedtune.federated.compare as compare

    extra = ("federated.rounds=2", "federated.partition=column", "data.site_column=site")
    ref = run_regimes(_cfg(tiny_models, table, tmp_path, "name=ref", *extra), ["lora"])

    real_push = _interrupt_at_push(monkeypatch, 2)  # in round 2
    with pytest.raises(KeyboardInterrupt):
        run_regimes(_cfg(tiny_models, table, tmp_path, "name=cut", *extra), ["lora"])
    staging = tmp_path / ".cut.partial"
    assert not (tmp_path / "cut").exists() and (staging / "compare.json").is_file()
    assert (staging / "lora-local-org-2" / "model").is_dir()  # finished runs are kept
    assert len(_history(staging / "lora-federated")) == 1  # and the federated checkpoint
    ckpt = find_checkpoint(staging / "lora-federated")
    assert ckpt is not None
    before = checkpoint_state(ckpt)
    assert before.seconds > 0
    # Starting it afresh under the same name (or any run of that name) would wipe it.
    with pytest.raises(ConfigError, match=r"interrupted comparison.*--resume"):
        run_regimes(_cfg(tiny_models, table, tmp_path, "name=cut", *extra), ["lora"])
    with pytest.raises(ConfigError, match="interrupted comparison"):
        run_centralized(_cfg(tiny_models, table, tmp_path, "name=cut", *extra))
    assert (staging / "lora-local-org-2" / "model").is_dir()

    monkeypatch.setattr(InProcessGrid, "push_messages", real_push)
    reruns: list[str] = []
    real_central = compare.run_centralized

    def counted(cfg, *a, **k):  # type: ignore[no-untyped-def]
        reruns.append(cfg.name)
        return real_central(cfg, *a, **k)

    monkeypatch.setattr(compare, "run_centralized", counted)
    apps.clear_workspace()  # as a fresh process would
    out = compare.resume_comparison(staging)  # the hidden folder or the final name
    assert out == tmp_path / "cut" and not staging.exists() and reruns == []
    got = json.loads((out / "comparison.json").read_text())
    want = json.loads((ref / "comparison.json").read_text())
    assert [(r["regime"], r["site"], r["accuracy"]) for r in got] == [
        (r["regime"], r["site"], r["accuracy"]) for r in want
    ]
    assert [h["val_loss"] for h in _history(out / "lora-federated")] == [
        h["val_loss"] for h in _history(ref / "lora-federated")
    ]
    assert (out / "fig_a_centralized_vs_federated.png").is_file()
    (fed,) = [r for r in got if r["regime"] == "federated"]
    assert fed["wall_seconds"] > before.seconds  # counts the round run before, too
    with pytest.raises(ConfigError, match="finished comparison"):
        compare.resume_comparison(out)
    with pytest.raises(ConfigError, match="no interrupted comparison"):
        compare.resume_comparison(tmp_path / "nothing")


@pytest.mark.parametrize("seeds", [None, [1, 2]], ids=["one", "seeds"])
def test_a_compare_that_fails_before_any_run_finishes_leaves_nothing(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    seeds: list[int] | None,
) -> None:  # fmt: skip
    import fedtune.federated.compare as compare
    from fedtune.errors import ModelError

    def not_installed(cfg, *a, **k):  # type: ignore[no-untyped-def]
        raise ModelError("model `gemma3` is not installed: run `fedtune models install gemma3`")

    real_central = compare.run_centralized
    monkeypatch.setattr(compare, "run_centralized", not_installed)
    cfg = _cfg(tiny_models, table, tmp_path, "name=early", "federated.rounds=1")
    console = Console(record=True, width=200)
    with pytest.raises(ModelError, match="not installed"):
        if seeds is None:
            compare.run_regimes(cfg, ["lora"], console=console)
        else:
            compare.run_seeds(cfg, seeds, ["lora"], console=console)
    # No hidden folder that a rerun under the same name would refuse to replace.
    assert not list(tmp_path.glob(".*partial")) and not (tmp_path / "early").exists()
    shown = console.export_text()
    assert "nothing kept" in shown and "--resume" not in shown
    monkeypatch.setattr(compare, "run_centralized", real_central)  # installed: runs at once
    assert compare.run_regimes(cfg, ["lora"], ("centralized",)) == tmp_path / "early"


def test_a_comparison_plan_names_its_data_files_absolutely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.federated.compare import _plan_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.source=file", "data.path=data/t.csv", "federated.partition=own",
                             "federated.site_paths=['a.csv', 'b/b.csv']"])  # fmt: skip
    plan = _plan_config(cfg, tmp_path / "runs" / "cmp")
    assert plan["name"] == "cmp" and plan["data"]["path"] == str(tmp_path / "data" / "t.csv")
    assert plan["federated"]["site_paths"] == [str(tmp_path / "a.csv"), str(tmp_path / "b/b.csv")]


@pytest.mark.parametrize("stop", [SystemExit(143), OSError(28, "No space left on device")],
                         ids=["sigterm", "failure"])  # fmt: skip
def test_a_stopped_seeds_compare_keeps_its_finished_seeds(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    stop: BaseException,
) -> None:  # fmt: skip
    import fedtune.federated.compare as compare

    real_central = compare.run_centralized
    calls: list[str] = []

    def dies_in_seed_2(cfg, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(f"{cfg.seed}:{cfg.name}")
        if cfg.name == "lora-local-org-1" and cfg.seed == 2:  # seed 2's second local site
            raise stop  # SystemExit(143) is what the CLI turns SIGTERM into
        return real_central(cfg, *a, **k)

    monkeypatch.setattr(compare, "run_centralized", dies_in_seed_2)
    cfg = _cfg(tiny_models, table, tmp_path, "name=seeds", "federated.rounds=1",
               "federated.partition=column", "data.site_column=site")  # fmt: skip
    with pytest.raises(type(stop)):
        compare.run_seeds(cfg, [1, 2], ["lora"], ("centralized", "local"))
    staging = tmp_path / ".seeds.partial"
    assert (staging / "seed-1" / "comparison.json").is_file()
    assert (staging / ".seed-2.partial" / "lora-local-org-0").is_dir()
    calls.clear()
    monkeypatch.setattr(compare, "run_centralized",
                        lambda cfg, *a, **k: calls.append(cfg.name) or real_central(cfg, *a, **k))
    apps.clear_workspace()
    out = compare.resume_comparison(tmp_path / "seeds")
    assert calls == ["lora-local-org-1", "lora-local-org-2"]  # only what had not finished
    rows = json.loads((out / "seeds.json").read_text())
    assert len(rows) == 2 * 4 and not list(tmp_path.glob(".*partial"))


def test_seeds_report_numbers_by_hand(tmp_path: Path) -> None:
    from fedtune.federated.compare import write_seeds_report

    def row(regime: str, site: str, acc: float) -> dict:
        return {"method": "lora", "regime": regime, "site": site, "accuracy": acc,
                "macro_f1": acc - 0.1, "weighted_f1": acc}  # fmt: skip

    per_seed = {
        1: [row("centralized", "all", 0.80), row("local", "a", 0.70),
            row("local", "b", 0.75), row("federated", "all", 0.78)],
        2: [row("centralized", "all", 0.90), row("local", "a", 0.60),
            row("local", "b", 0.85), row("federated", "all", 0.86)],
    }  # fmt: skip
    report = write_seeds_report(tmp_path, per_seed, "t").read_text()
    # mean 85.0, sample sd sqrt(((80-85)^2 + (90-85)^2) / 1) = 7.07
    assert "| lora | centralized | all | 2 | 85.0 ± 7.1 | 75.0 ± 7.1 | 85.0 ± 7.1 | 80.0–90.0 |" \
        in report
    # federated - centralized: -2, -4 -> -3.0 ± 1.4; federated - best local: 3, 1 -> 2.0 ± 1.4
    assert "| lora | -3.0 ± 1.4 | 2.0 ± 1.4 |" in report


def test_a_failing_site_drops_out_and_min_sites_abandons_the_round(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = apps.train

    def site_2_crashes(*args, **kwargs):  # type: ignore[no-untyped-def]
        if str(kwargs.get("description", "")).startswith("site-2"):
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(apps, "train", site_2_crashes)
    run_federated(_cfg(tiny_models, table, tmp_path, "name=two", "federated.rounds=1",
                       "federated.min_sites=2"))  # fmt: skip
    (rec,) = _history(tmp_path / "two")
    assert rec["sites"] == 2 and rec["failed"] == {"site-2": "RuntimeError: disk full"}
    assert not rec.get("abandoned")

    # A site that fails its evaluation (per-site validation) is named too, with the phase.
    real_eval = apps._evaluate_on

    def site_3_cannot_evaluate(ws, tag, examples, **kwargs):  # type: ignore[no-untyped-def]
        if tag == "val-2":
            raise OSError("validation file unreadable")
        return real_eval(ws, tag, examples, **kwargs)

    monkeypatch.setattr(apps, "_evaluate_on", site_3_cannot_evaluate)
    summary = run_federated(_cfg(tiny_models, table, tmp_path, "name=eval", "federated.rounds=1",
                                 "federated.validation=site", "federated.min_sites=2"))  # fmt: skip
    (rec,) = _history(tmp_path / "eval")
    assert rec["failed_evaluate"] == {"site-3": "OSError: validation file unreadable"}
    assert [(d["phase"], d["site"]) for d in summary["dropped"]] == [
        ("train", "site-2"), ("evaluate", "site-3")]  # fmt: skip
    assert "| 1 | evaluate | site-3 |" in (tmp_path / "eval" / "report.md").read_text()

    cfg = _cfg(tiny_models, table, tmp_path, "name=three", "federated.rounds=2",
               "federated.min_sites=3")  # fmt: skip
    init = {k: v.clone() for k, v in apps.workspace(cfg).initial_state.items()}
    run_federated(cfg)
    assert all(r["abandoned"] for r in _history(tmp_path / "three"))
    final = load_file(str(tmp_path / "three" / "checkpoint" / "global.safetensors"))
    for k in init:
        torch.testing.assert_close(final[k], init[k], rtol=0, atol=0)


def test_a_site_refuses_a_server_running_another_fedtune(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the Deployment Engine every party runs its own installed fedtune: the
    server sends its version with every message and a site refuses a mismatch."""
    import types

    import fedtune.federated.server as server

    monkeypatch.setattr(server, "fedtune", types.SimpleNamespace(__version__="9.9.9"))
    with pytest.raises(ConfigError, match=r"the server 9\.9\.9: install the same fedtune"):
        run_federated(_cfg(tiny_models, table, tmp_path, "name=v", "federated.rounds=1"))


def test_sites_with_their_own_data_files(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    """partition `own`: each site reads its own file (a SuperNode's node config
    `data-path`; in process `site_paths`); the server holds validation/test only and
    learns the sites' names and sizes from their replies."""
    rows = pd.read_csv(table)
    paths = []
    for org in ("org-0", "org-1", "org-2"):
        own = rows[rows["site"] == org].drop(columns="site")
        own = own.assign(text=own["text"] + f" at {org}")  # texts only this site has
        paths.append(tmp_path / f"{org}.csv")
        own.to_csv(paths[-1], index=False)
    server_file = tmp_path / "server.csv"
    rows.drop(columns="site").to_csv(server_file, index=False)
    labels = 'data.labels=["negative","neutral","positive"]'
    cfg = _cfg(tiny_models, server_file, tmp_path, "name=own", "federated.rounds=2",
               "federated.partition=own", f"federated.site_paths={','.join(map(str, paths))}",
               labels)  # fmt: skip
    summary = run_federated(cfg)
    assert summary["sites"] == ["org-0", "org-1", "org-2"] and summary["n_train"] == 90
    server = apps.workspace(cfg)
    assert server.splits.train == [] and server.partition.sites == []
    assert not any(" at org-" in e.text for e in server.splits.validation + server.splits.test)
    own_sites = [ws.partition.sites[0] for ws in apps._SITE_WORKSPACES.values()]
    assert sorted(st.name for st in own_sites) == ["org-0", "org-1", "org-2"]
    for st in own_sites:  # each site trained on its own file only
        assert all(e.text.endswith(f" at {st.name}") for e in st.train)
    assert (tmp_path / "own" / "model" / "adapter_model.safetensors").is_file()

    with pytest.raises(ConfigError, match=r"needs data\.labels"):
        run_federated(_cfg(tiny_models, server_file, tmp_path, "name=x",
                           "federated.partition=own",
                           f"federated.site_paths={paths[0]}"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs federated\.site_paths"):
        run_federated(_cfg(tiny_models, server_file, tmp_path, "name=y",
                           "federated.partition=own", labels))  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


class _SlowGrid:
    """Replies arrive over several polls; one site never answers; a stale reply (to
    a message of an earlier exchange) and a duplicate turn up too."""

    def __init__(self, msgs: list[Message]) -> None:
        self.msgs = msgs
        self.polls = 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.polls += 1

        def reply(i: int, mid: str) -> Message:
            r = Message(RecordDict(), reply_to=self.msgs[i])
            r.metadata.__dict__["_reply_to_message_id"] = mid
            return r

        if self.polls == 1:
            return [reply(0, "old-round")]
        if self.polls == 2:
            return [reply(1, "m1")]  # arrives first, but was sent second
        if self.polls == 3:
            return [reply(0, "m0"), reply(0, "m0")]  # the second is a duplicate
        return []


def test_exchange_is_bounded_and_keeps_one_reply_per_message() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a grid does
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8, 9)]
    grid = _SlowGrid(msgs)
    t0 = time.perf_counter()
    got = exchange(grid, msgs, timeout=0.5, poll=(0.01, 0.05))  # type: ignore[arg-type]
    assert time.perf_counter() - t0 < 2.0
    # in the order sent (aggregation sums in this order), not of arrival
    assert [r.metadata.reply_to_message_id for r in got.replies] == ["m0", "m1"]
    assert got.missing == [9] and got.ignored == 2
    assert grid.polls > 3  # kept polling for node 9 until the timeout


def test_ffa_lora_trains_and_exchanges_b_only_and_averages_updates_exactly(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    """method.freeze_a (FFA-LoRA): A stays at its seeded initialisation, the same at
    every site, so only B trains and travels, and FedAvg of B is FedAvg of B @ A."""
    from fedtune.adapted import AdaptedModel

    cfg = _cfg(tiny_models, table, tmp_path, "name=ffa", "federated.rounds=2",
               "method.freeze_a=true")  # fmt: skip
    fresh = AdaptedModel.build(cfg.model, cfg.method, LABELS, seed=cfg.seed)
    state = fresh.trainable_state()
    assert state and not any(".lora_A." in k for k in state)
    assert any(".lora_B." in k for k in state)
    summary = run_federated(cfg)
    assert summary["trainable_parameters"] == sum(v.numel() for v in state.values())
    assert summary["payload_up_per_site_round"] == summary["trainable_parameters"] * 4
    trained = AdaptedModel.load(tmp_path / "ffa" / "model", trainable=True)
    a_fresh = {k: v for k, v in fresh.module.state_dict().items() if ".lora_A." in k}
    a_trained = {k: v for k, v in trained.module.state_dict().items() if ".lora_A." in k}
    assert a_fresh.keys() == a_trained.keys() and a_fresh
    for k in a_fresh:
        torch.testing.assert_close(a_trained[k], a_fresh[k], atol=0, rtol=0)
    assert not any(p.requires_grad for n, p in trained.module.named_parameters()
                   if ".lora_A." in n)  # fmt: skip
    b_changed = [k for k, v in trained.trainable_state().items() if ".lora_B." in k
                 and not torch.equal(v, state[k])]  # fmt: skip
    assert b_changed
    plain = AdaptedModel.build(cfg.model, dataclasses.replace(cfg.method, freeze_a=False), LABELS,
                               seed=cfg.seed).trainable_state()  # fmt: skip
    a_size = sum(v.numel() for k, v in plain.items() if ".lora_A." in k)
    assert sum(v.numel() for v in plain.values()) - a_size == summary["trainable_parameters"]


def test_regimes_run_apart_merge_into_the_report_of_one_comparison(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each regime in its own comparison (as a small machine runs a long one), merged:
    the same rows, scores and findings (paired intervals) as the comparison that ran
    them together, both figures, and the settings in which the parts differ. Bad
    inputs are named, and leave nothing written."""
    import shutil

    from typer.testing import CliRunner

    from fedtune.cli import app
    from fedtune.federated.merge import merge_comparisons

    extra = ("federated.rounds=2", "federated.partition=column", "data.site_column=site")
    joint = run_regimes(_cfg(tiny_models, table, tmp_path, "name=joint", *extra), ["lora"])
    monkeypatch.chdir(table.parent)  # one part reads the data by a relative path
    parts = [run_regimes(_cfg(tiny_models, Path(table.name), tmp_path, f"name={r}", *extra,
                              *(("train.eval_every=3",) if r == "centralized" else ())),
                         ["lora"], (r,))
             for r in ("federated", "centralized", "local")]  # fmt: skip
    merged = merge_comparisons(parts, tmp_path / "merged")
    both_rows = [json.loads((d / "comparison.json").read_text()) for d in (joint, merged)]
    key = ("method", "regime", "site", "accuracy", "n_train", "test_digest")
    # eval_every changes the centralized model's choice, not its training: compare the rest
    a, b = ([{k: r[k] for k in key} for r in rows if r["regime"] != "centralized"]
            for rows in both_rows)  # fmt: skip
    assert a == b and len(a) == 4
    report = (merged / "report.md").read_text()
    for name in ("fig_a_centralized_vs_federated.png", "fig_b_local_vs_federated.png"):
        assert (merged / name).stat().st_size > 10_000 and f"]({name})" in report
    fed_vs_best = [line.split(" | ")[2] for line in report.splitlines()
                   if line.startswith("| lora | ") and " [" in line]  # fmt: skip
    joint_report = (joint / "report.md").read_text()
    assert fed_vs_best and fed_vs_best[0] in joint_report  # same paired gap to the best site
    merged_from = report.split("## Merged from")[1]
    assert "| lora | centralized | all |" in merged_from
    assert "`train.eval_every` 3 (vs 0)" in merged_from
    assert merged_from.count(" | - |") == 4  # the others differ in nothing but their paths
    links = [line.rsplit("](", 1)[1].rstrip(") |") for line in report.splitlines()
             if line.startswith("| lora | ") and line.endswith("report.md) |")]  # fmt: skip
    assert len(links) == 5  # every run's link leads to its report
    assert all((merged / link).resolve().is_file() for link in links)
    for r in json.loads((merged / "comparison.json").read_text()):  # the runs stay put
        assert not (merged / r["name"]).exists()
    # A merged folder lists where its runs are: it merges again, to the same rows.
    again = merge_comparisons([merged], tmp_path / "again")
    assert json.loads((again / "comparison.json").read_text()) == both_rows[1]

    def refused(match: str, *folders: Path) -> None:
        with pytest.raises(ConfigError, match=match):
            merge_comparisons(list(folders), tmp_path / "bad")
        assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))

    def other(name: str, *more: str) -> Path:
        return run_regimes(_cfg(tiny_models, table, tmp_path, f"name={name}", *extra, *more),
                           ["lora"], ("centralized",))  # fmt: skip

    refused("tested on different examples", parts[0], other("split", "data.test_size=0.3"))
    refused("different settings .method.lr: 0.01 vs 0.02", parts[0], other("lr", "method.lr=0.02"))
    refused("trained lora 2 epochs, .* 3: regimes are compared at one budget", parts[0],
            other("longer", "federated.rounds=3"))  # fmt: skip
    refused("both lora centralized all with seed 42", joint, parts[1])
    refused("given twice", parts[0], parts[0])
    refused("given twice", joint, joint / "lora-federated")
    refused("no such folder", tmp_path / "nowhere")
    refused("pass folders `fedtune compare` wrote", joint / "lora-federated" / "model")
    refused("unfinished comparison: finish it with `fedtune compare --resume",
            tmp_path / ".joint.partial")  # fmt: skip
    with pytest.raises(ConfigError, match="already exists"):
        merge_comparisons(parts, merged)
    # One run of a comparison taken alone: the local sites of the joint one.
    sites = [joint / f"lora-local-{s}" for s in ("org-0", "org-1", "org-2")]
    only = merge_comparisons([parts[0], parts[1], *sites], tmp_path / "only")
    assert [r["regime"] for r in json.loads((only / "comparison.json").read_text())] == [
        "centralized", "local", "local", "local", "federated"]

    # Two seeds: a report per seed and the report over seeds (mean ± sd, paired gaps);
    # a `--seeds` comparison's folder gives its seed-* folders.
    seed2 = run_regimes(_cfg(tiny_models, table, tmp_path, "name=seed2", "seed=2", *extra),
                        ["lora"], ("federated", "centralized"))  # fmt: skip
    seeds = tmp_path / "seeds"
    shutil.copytree(joint, seeds / "seed-42")
    shutil.copytree(seed2, seeds / "seed-2")
    result = CliRunner().invoke(app, ["merge", str(seeds), "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    both = tmp_path / "both"
    rows = json.loads((both / "seeds.json").read_text())
    assert sorted({r["seed"] for r in rows}) == [2, 42] and (both / "seeds.png").is_file()
    acc = {(r["seed"], r["regime"]): r["accuracy"] for r in rows if r["site"] == "all"}
    gaps = [acc[s, "federated"] - acc[s, "centralized"] for s in (2, 42)]
    assert f"| lora | {100 * np.mean(gaps):.1f} ± {100 * np.std(gaps, ddof=1):.1f} |" in (
        both / "report.md").read_text()
    assert "federated − centralized" in result.output  # the table over seeds, printed
    for s in (2, 42):
        assert (both / f"seed-{s}" / "fig_a_centralized_vs_federated.png").is_file()
        line = next(x for x in (both / f"seed-{s}" / "report.md").read_text().splitlines()
                    if x.startswith("| lora | federated |"))  # fmt: skip
        assert (both / f"seed-{s}" / line.rsplit("](", 1)[1].rstrip(") |")).resolve().is_file()
    result = CliRunner().invoke(app, ["merge", str(seeds), "--out", str(both)])
    assert result.exit_code == 2 and "already exists; give --out a new folder" in result.output
