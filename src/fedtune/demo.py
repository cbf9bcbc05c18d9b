"""`fedtune demo`: the main job on defaults that work offline — the source post's
experiment. The bundled MiniLM on Financial PhraseBank (all annotators agree),
three sites of 600 sentences and a validation set shared by all, P-tuning (the
post's method) and LoRA, each trained centralized, local-only at every site and
federated (FedAvg) with the same budget; then the two frozen-model methods
(embeddings + logistic regression, kNN over a vector index) on the same split.
One report: the post's two figures, a table, and a quality-versus-cost ranking.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.config import DataConfig, FederatedConfig, RunConfig, TrainConfig
from fedtune.federated.compare import run_regimes
from fedtune.train import cpu_has_bf16

# Budget per method: rounds x 1 local epoch federated = as many epochs centralized
# and at each local-only site; the plan fits the 10-minute budget from a fresh clone
# on 2 CPU cores, setup included, without bf16 (measured: docs/benchmarks.md, "The
# demo in ten minutes"); longer runs: `fedtune compare examples/federated.toml`.
# - Both trained methods feed the classification head the mean of MiniLM's token
#   states, as sentence-transformers trained it (`pooling = "mean"`): through the
#   untrained [CLS] pooler, P-tuning reached 0.84 after 3 epochs; with the mean, 0.91
#   after 2.
# - P-tuning's sites train at a third of the batch size (11 of 32), so that each takes
#   as many optimizer steps per round as centralized training per epoch (soft prompts
#   improve per step; at batch 32 the federated prompt lagged by 12.5 points over
#   three seeds), at lr 5e-2 (2e-2: federated 3.8 points under centralized, 5e-2: 1.5).
# - P-tuning's two epochs federate as 4 rounds of half an epoch with SCAFFOLD: the
#   sites' prompt encoders drift less between averages and SCAFFOLD corrects from the
#   second round on. Over seeds 1, 2, 3, 42 under bf16: federated -1.8 +- 0.9 points
#   against centralized and above every site 4 of 4 times, against -2.7 +- 0.8 and 2 of
#   4 as 2 rounds of FedAvg; the same time (`benchmarks/demo_seeds.py`). With the prompt
#   encoder kept in fp32 inside autocast (fedtune.methods.peft), over 8 seeds under
#   bf16: -0.4 +- 0.4 and above every site 8 of 8 (the encoder in bf16: -1.6 +- 0.5);
#   since the server sums the sites' updates in name order: -0.9 +- 0.3, 7 of 8.
# - LoRA without dropout on the adapters' input: 1.4x faster steps on CPU, same
#   accuracy (0.932 vs 0.935 after one epoch); at lr 2e-3, because at 4e-3 one seed
#   of four trained centralized LoRA to the majority class (0.614).
DEMO_PLAN: dict[str, dict[str, Any]] = {
    "ptuning": {"method": {"lr": 5e-2, "num_virtual_tokens": 10, "pooling": "mean"},
                "rounds": 4, "federated": {"local_batch_size": 11, "local_epochs": 0.5,
                                           "strategy": "scaffold"}},
    "lora": {"method": {"lr": 2e-3, "pooling": "mean", "dropout": 0.0}, "rounds": 2},
    # Frozen model: seconds, not minutes (one embedding pass, cached on disk).
    "features": {"method": {}, "rounds": 5},
    "knn": {"method": {}, "rounds": 1},
}
QUICK_LIMIT = 150  # training examples in --quick mode (3 sites x 50)


def demo_config(output_dir: str, quick: bool) -> RunConfig:
    data = DataConfig(source="fpb", agreement="all", test_size=0.15, val_size=0.05)
    sizes = (50, 50, 50) if quick else (600, 600, 600)
    fed = FederatedConfig(sites=3, partition="sizes", sizes=sizes, validation="shared",
                          rounds=2, local_epochs=1.0)  # fmt: skip
    train = TrainConfig(batch_size=32, bf16=cpu_has_bf16() and not quick)
    return RunConfig(name="", output_dir=output_dir, data=data, train=train, federated=fed)


def _rounds(p: dict[str, Any]) -> str:
    fed = p.get("federated", {})
    strategy = {"scaffold": "SCAFFOLD"}.get(fed.get("strategy", ""), "FedAvg")
    return f"{p['rounds']} rounds x {fed.get('local_epochs', 1.0):g} local epoch, {strategy}"


def run_demo(output_dir: str = "runs", quick: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    cfg = demo_config(output_dir, quick)
    methods = list(DEMO_PLAN)
    plan = ", ".join(f"{m} (federated by query)" if m == "knn" else f"{m} ({_rounds(p)})"
                     for m, p in DEMO_PLAN.items())  # fmt: skip
    console.rule("[bold]fedtune demo: centralized vs local-only vs federated")
    console.print(
        "MiniLM (22.7M parameters, bundled) on Financial PhraseBank all-agree; 3 sites x "
        f"{cfg.federated.sizes[0]} sentences, shared validation set; methods: "
        f"{plan}" + (" (quick smoke run)" if quick else "")
    )
    out = run_regimes(
        dataclasses.replace(cfg, name=""),
        methods,
        console=console,
        method_overrides={m: dict(p["method"]) for m, p in DEMO_PLAN.items()},
        federated_overrides={m: {"rounds": p["rounds"], **p.get("federated", {})}
                             for m, p in DEMO_PLAN.items()},
    )
    console.rule(f"[bold green]done: report at {out / 'report.md'}")
    return out
