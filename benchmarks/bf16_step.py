"""Time one MiniLM training step in fp32 and under bfloat16 autocast.

    python benchmarks/bf16_step.py [--methods lora,full] [--modes 2:fp32,2:bf16,1:fp32,1:bf16]

A mode is THREADS:DTYPE. Each mode runs 6 steps on one fixed batch (32 copies of a
34-token FPB sentence); the median step time is printed. Modes run in the given
order inside one process, so their ratios are comparable; absolute times are not
across machines or loads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from fedtune.adapted import AdaptedModel
from fedtune.config import ModelConfig, method_config

SENTENCE = (
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period "
    "in 2007 representing 7.7 % of net sales ."
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--modes", default="2:fp32,2:bf16,1:fp32,1:bf16,2:fp32")
    args = p.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for method in args.methods.split(","):
        model = AdaptedModel.build(
            ModelConfig(name="minilm"), method_config(method), ("a", "b", "c")
        )
        batch = model.formulation.collate(model.formulation.encode([SENTENCE] * 32, [0] * 32))
        params = [p for p in model.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.module.train()
        for mode in args.modes.split(","):
            threads, dtype = mode.split(":")
            torch.set_num_threads(int(threads))
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    loss = model.formulation.loss(model.module, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times.append(time.perf_counter() - t0)
            shape = tuple(batch["input_ids"].shape)
            print(f"{method:5} threads {threads} {dtype}  batch {shape}  "
                  f"median {1000 * statistics.median(times):.0f} ms/step")  # fmt: skip


if __name__ == "__main__":
    main()
