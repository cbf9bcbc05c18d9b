"""Federated benchmarks on MiniLM (FPB all-agree).

    python benchmarks/federated.py memory     # peak RSS: 10 simulated sites vs 1 site, LoRA
    python benchmarks/federated.py protocol   # the source protocol: 3 x 600, shared
                                              # validation, ptuning and lora, all regimes

Each measurement of `memory` runs in its own process (peak RSS is per process);
results are printed as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time

MEMORY_SITES = (1, 10)


def _one_memory_run(sites: int, out: str) -> None:
    from fedtune.config import load_config
    from fedtune.federated.runner import run_federated

    # Same total data and steps for both: 600 training examples split over `sites`.
    cfg = load_config(None, [
        "method.name=lora", "train.progress=false", f"output_dir={out}", f"name=m{sites}",
        "data.limit=600", "federated.partition=iid", f"federated.sites={sites}",
        "federated.rounds=1", "federated.local_steps=2", "train.batch_size=16",
    ])  # fmt: skip
    t = time.perf_counter()
    run_federated(cfg)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"sites": sites, "peak_rss_mb": rss_mb, "seconds": time.perf_counter() - t}))


def memory() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for sites in MEMORY_SITES:
            res = subprocess.run(
                [sys.executable, __file__, "_memory", str(sites), out],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print("| simulated sites | peak RSS (MB) | ratio to 1 site |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['sites']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.3f} |")


def protocol() -> None:
    from fedtune.config import load_config
    from fedtune.federated.compare import run_regimes

    cfg = load_config("examples/federated.toml", [
        "output_dir=runs/benchmarks", "federated.rounds=10", "federated.patience=3",
        "train.bf16=true",
    ])  # fmt: skip
    run_regimes(cfg, ["ptuning", "lora"])


if __name__ == "__main__":
    if sys.argv[1] == "_memory":
        _one_memory_run(int(sys.argv[2]), sys.argv[3])
    else:
        {"memory": memory, "protocol": protocol}[sys.argv[1]]()
