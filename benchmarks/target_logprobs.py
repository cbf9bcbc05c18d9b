"""Response log-probabilities with the LM head on the target tokens only, against the
head on every position from the first response token on (fedtune's earlier path):
time, peak memory and agreement, for DPO on Anthropic HH pairs with SmolLM2.

    python benchmarks/target_logprobs.py [--pairs 64] [--repeats 2] [--model smollm2]

Time: both paths alternate in one process on the same batch (the ratio is what to
read). Peak memory: each path in a fresh process (ru_maxrss is a high-water mark).
Needs $FEDTUNE_DATA_DIR/hh-rlhf and the model (`fedtune models install smollm2`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch
import transformers

HH = ["data.task=preference", "data.source=hh", "data.test_size=0.012", "data.val_size=0.005",
      "model.max_length=128", "model.max_target_length=64", "method.name=dpo"]  # fmt: skip


def _setup(model_name: str, pairs: int) -> tuple[Any, dict[str, torch.Tensor]]:
    from fedtune.adapted import AdaptedModel
    from fedtune.config import load_config
    from fedtune.data import make_splits
    from fedtune.regimes import encode

    transformers.utils.logging.set_verbosity_error()
    cfg = load_config(None, [*HH, f"model.name={model_name}"])
    splits = make_splits(cfg.data)
    model = AdaptedModel.build(cfg.model, cfg.method, splits.labels, task="preference")
    model.module.eval()
    batch = model.formulation.collate(encode(model, splits.test[:pairs]))
    return model, batch


def _logprobs(model: Any, batch: dict[str, torch.Tensor], general: bool) -> torch.Tensor:
    import fedtune.classify as classify

    plain = classify._plain_head
    if general:
        classify._plain_head = lambda m: None  # type: ignore[assignment]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.formulation.sequence_logprobs(model.module, batch)
    finally:
        classify._plain_head = plain  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--memory", choices=["targets", "general"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory:  # the child process: one pass, then its peak RSS
        model, batch = _setup(args.model, args.pairs)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _logprobs(model, batch, general=args.memory == "general")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"before_gb": before / 1e6, "peak_gb": peak / 1e6}))
        return
    # Memory first: a child's ru_maxrss starts at its parent's at fork time (Linux keeps
    # it across exec), so the children run before this process loads anything.
    peaks = {}
    for path in ("targets", "general"):
        child = subprocess.run([sys.executable, __file__, "--memory", path, "--pairs",
                                str(args.pairs), "--model", args.model],
                               capture_output=True, text=True, check=True)  # fmt: skip
        peaks[path] = json.loads(child.stdout.strip().splitlines()[-1])
    model, batch = _setup(args.model, args.pairs)
    rows, width = batch["input_ids"].shape
    targets = int(model.formulation._target_mask(batch).sum())
    print(f"{args.model}, DPO, {args.pairs} pairs = {rows} rows x {width} tokens, "
          f"{targets} response tokens; bf16 autocast, {torch.get_num_threads()} threads")
    print("| path | seconds | peak RSS (GB, own process) |\n|---|---|---|")
    seconds: dict[str, list[float]] = {"targets": [], "general": []}
    out = {}
    for _ in range(args.repeats):
        for path in ("targets", "general"):
            t0 = time.perf_counter()
            out[path] = _logprobs(model, batch, general=path == "general")
            seconds[path].append(time.perf_counter() - t0)
    for path in ("targets", "general"):
        mem = peaks[path]
        print(f"| {path} | {' / '.join(f'{s:.1f}' for s in seconds[path])} | "
              f"{mem['peak_gb']:.1f} (model and data: {mem['before_gb']:.1f}) |")
    diff = (out["targets"] - out["general"]).abs().max().item()
    print(f"max |difference| of the {rows} summed log-probs: {diff:.2e}")


if __name__ == "__main__":
    main()
