"""The demo's P-tuning comparison (centralized, each site alone, federated) over seeds and
recipe variants, on the demo's own split and plan (`fedtune.demo`): the post's two
findings per seed, as federated minus centralized and federated minus the best site.

    python benchmarks/demo_seeds.py --out /work/bench/demo-seeds --seeds 1,2,3,42 \
        --variants demo,fp32,scaffold,short,short-scaffold

A variant changes the demo's P-tuning plan (`fedtune.demo.DEMO_PLAN["ptuning"]`):
- `demo`: as the demo runs it (bf16 autocast where the CPU has AVX512-BF16 or AMX;
  from commit 03b4297 on, P-tuning's prompt encoder stays in fp32 inside it, so bf16
  rows measured before that commit used a bf16 encoder: keep their folders apart);
- `fp32`: the same without bf16;
- `scaffold`: SCAFFOLD instead of FedAvg;
- `short`: the same two epochs as 4 rounds of half an epoch (more averaging, the same
  compute for every regime);
- `short-scaffold`: both; `fp32-short-scaffold`: both, without bf16.
Each (variant, seed) is one comparison folder under --out, read back if it exists (the
script resumes). Prints a Markdown table per variant and the means (± standard error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

SHORT = {"rounds": 4, "local_epochs": 0.5}
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], bool | None]] = {
    # name: (method overrides, federated overrides, bf16: None = the demo's choice)
    "demo": ({}, {}, None),
    "fp32": ({}, {}, False),
    "scaffold": ({}, {"strategy": "scaffold"}, None),
    "short": ({}, SHORT, None),
    "short-scaffold": ({}, {**SHORT, "strategy": "scaffold"}, None),
    "fp32-short-scaffold": ({}, {**SHORT, "strategy": "scaffold"}, False),
}


def run(out: Path, variant: str, seed: int) -> Path:
    from rich.console import Console

    from fedtune.demo import DEMO_PLAN, demo_config
    from fedtune.federated.compare import run_regimes

    folder = out / f"{variant}-s{seed}"
    if (folder / "comparison.json").exists():
        return folder
    method, federated, bf16 = VARIANTS[variant]
    cfg = demo_config(str(out), False)
    train = cfg.train if bf16 is None else dataclasses.replace(cfg.train, bf16=bf16)
    cfg = dataclasses.replace(cfg, seed=seed, name=folder.name, train=train)
    plan = DEMO_PLAN["ptuning"]
    fed = {"rounds": plan["rounds"], **plan.get("federated", {}), **federated}
    t0 = time.perf_counter()
    run_regimes(cfg, ["ptuning"], console=Console(quiet=True),
                method_overrides={"ptuning": {**plan["method"], **method}},
                federated_overrides={"ptuning": fed})  # fmt: skip
    print(f"{variant} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def findings(folder: Path) -> dict[str, Any]:
    rows = json.loads((folder / "comparison.json").read_text())
    acc = {(r["regime"], r["site"]): r["accuracy"] for r in rows}
    sites = [v for (regime, _), v in sorted(acc.items()) if regime == "local"]
    central, fed = acc[("centralized", "all")], acc[("federated", "all")]
    return {"centralized": central, "sites": sites, "federated": fed,
            "vs_central": 100 * (fed - central), "vs_best": 100 * (fed - max(sites)),
            "wall": sum(r["wall_seconds"] for r in rows)}  # fmt: skip


def _mean_se(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:+.1f}" if xs else "-"
    return f"{statistics.mean(xs):+.1f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="1,2,3,42")
    ap.add_argument("--variants", default="demo")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {v: [findings(run(args.out, v, s)) for s in seeds] for v in variants}
    print("| variant | seed | centralized | local-only sites | federated | fed − cent | "
          "fed − best site | wall s |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for v, rs in results.items():
        for s, r in zip(seeds, rs, strict=True):
            print(f"| {v} | {s} | {r['centralized']:.4f} | "
                  f"{' / '.join(f'{x:.4f}' for x in r['sites'])} | {r['federated']:.4f} | "
                  f"{r['vs_central']:+.1f} | {r['vs_best']:+.1f} | {r['wall']:.0f} |")
    print("\n| variant | seeds | fed − cent (mean ± SE, points) | fed − best site | "
          "above every site | wall s per seed |\n|---|---|---|---|---|---|")  # fmt: skip
    for v, rs in results.items():
        print(f"| {v} | {len(rs)} | {_mean_se([r['vs_central'] for r in rs])} | "
              f"{_mean_se([r['vs_best'] for r in rs])} | "
              f"{sum(r['vs_best'] > 0 for r in rs)} of {len(rs)} | "
              f"{statistics.mean(r['wall'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
