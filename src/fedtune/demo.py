"""`fedtune demo`: the main job on defaults that work offline — the bundled MiniLM
on Financial PhraseBank (all annotators agree), several adaptation methods
trained centrally on one split, one report ranking them.

(The federated demo of the source post — three sites, centralized vs federated
vs local-only — replaces this once the federated regime lands.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.config import DataConfig, RunConfig, TrainConfig
from fedtune.regimes import compare_methods

# Per-method budget and learning rate (docs/benchmarks.md has the numbers with
# longer budgets). The whole demo takes 8-10 minutes on 2 CPU cores (measured 9m17s).
DEMO_PLAN: dict[str, dict[str, dict[str, Any]]] = {
    "head": {"method": {"lr": 1e-2}, "train": {"epochs": 3}},
    "lora": {"method": {}, "train": {"epochs": 4}},
    "ptuning": {"method": {"lr": 1e-2}, "train": {"epochs": 4}},
    "full": {"method": {"lr": 5e-5}, "train": {"epochs": 4}},
}
QUICK_LIMIT = 200  # training examples in --quick mode


def demo_config(output_dir: str, quick: bool) -> RunConfig:
    data = DataConfig(source="fpb", agreement="all", limit=QUICK_LIMIT if quick else 0)
    train = TrainConfig(epochs=1 if quick else 3, eval_every=0)
    return RunConfig(name="", output_dir=output_dir, data=data, train=train)


def run_demo(output_dir: str = "runs", quick: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    cfg = demo_config(output_dir, quick)
    methods = list(DEMO_PLAN)
    console.rule("[bold]fedtune demo")
    console.print(
        f"MiniLM (22.7M parameters, bundled) on Financial PhraseBank all-agree; methods: "
        f"{', '.join(methods)}{' (quick: 200 training examples, 1 epoch)' if quick else ''}"
    )
    method_overrides = {m: plan["method"] for m, plan in DEMO_PLAN.items()}
    train_overrides = {} if quick else {m: plan["train"] for m, plan in DEMO_PLAN.items()}
    out = compare_methods(
        dataclasses.replace(cfg, name=""), methods, console, method_overrides, train_overrides
    )
    console.rule(f"[bold green]done: report at {out / 'report.md'}")
    return out
