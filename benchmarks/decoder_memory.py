"""Peak memory and step time of a decoder LoRA training step, per training setting.

    python benchmarks/decoder_memory.py --config examples/hh-preference.toml --set train.bf16=true
    python benchmarks/decoder_memory.py --config examples/tatqa-lora.toml --set model.max_length=384

Each variant runs in its own process (peak RSS is per process): it builds the run's
model (config + --set), encodes the config's first training examples, then takes
--steps optimizer steps (forward, backward, AdamW) on one fixed batch of
train.batch_size examples through the task's own loss, under bf16 autocast when
train.bf16 is set. It prints the median time of the steps after the first, and the
process's peak RSS. Variants (each adds to the config):

- `default`: the config as it is (fedtune's LoRA: adapter dropout 0.1);
- `no-dropout`: `method.dropout=0.0` (PEFT's own default): PEFT applies the adapter
  dropout to the input of every adapted layer, a copy of the activations per layer;
- `checkpointing`: `train.gradient_checkpointing=true` (each layer's activations
  recomputed in the backward pass instead of kept);
- `both`: the two together.

Variants run one after another, alternating over --rounds, so their ratios are
comparable; absolute times are not across machines or loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "default": [],
    "no-dropout": ["method.dropout=0.0"],
    "checkpointing": ["train.gradient_checkpointing=true"],
    "both": ["method.dropout=0.0", "train.gradient_checkpointing=true"],
}


def one(config: str, sets: list[str], steps: int) -> dict[str, float]:
    """One variant in this process: median step seconds and peak RSS (MB)."""
    import torch
    import transformers

    from fedtune.adapted import AdaptedModel
    from fedtune.config import load_config
    from fedtune.data.splits import make_splits
    from fedtune.train import _checkpoint_layers

    transformers.utils.logging.set_verbosity_error()
    cfg = load_config(config, sets)
    torch.manual_seed(cfg.seed)
    splits = make_splits(cfg.data)
    model = AdaptedModel.build(cfg.model, cfg.method, splits.labels, seed=cfg.seed,
                               task=cfg.data.task)  # fmt: skip
    if cfg.train.gradient_checkpointing:
        _checkpoint_layers(model)
    form = model.formulation
    batch = form.collate(form.encode_examples(list(splits.train[: cfg.train.batch_size])))
    module = model.module
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            loss = form.loss(module, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    rows, width = batch["input_ids"].shape
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times[1:]), "peak_mb": peak, "tokens": tokens,
            "rows": int(rows), "width": int(width)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="examples/hh-preference.toml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        print(json.dumps(one(args.config, [*args.sets, *VARIANTS[args._one]], args.steps)))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"Config: {args.config} {' '.join(args.sets)}")
    print("\n| round | variant | batch rows x width | real tokens | step s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            cmd = [sys.executable, __file__, "--config", args.config, "--steps",
                   str(args.steps), "--_one", name] + [f"--set={s}" for s in args.sets]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"variant {name} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(res)
            print(f"| {r + 1} | {name} | {res['rows']} x {res['width']} | {res['tokens']} | "
                  f"{res['step_s']:.2f} | {res['peak_mb']:,.0f} |", flush=True)  # fmt: skip
    base = statistics.median(x["step_s"] for x in results[names[0]])
    base_mb = statistics.median(x["peak_mb"] for x in results[names[0]])
    print(f"\n| variant | step s | vs {names[0]} (time) | peak RSS MB | vs {names[0]} (memory) |")
    print("|---|---|---|---|---|")
    for name in names:
        s = statistics.median(x["step_s"] for x in results[name])
        mb = statistics.median(x["peak_mb"] for x in results[name])
        print(f"| {name} | {s:.2f} | {s / base:.2f}x | {mb:,.0f} | {mb / base_mb:.2f}x |")


if __name__ == "__main__":
    main()
