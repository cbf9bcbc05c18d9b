"""What running the LM head only at the scored positions saves, per decoder.

    python benchmarks/decoder_head.py [--models smollm2,gemma3] [--method lora] [--steps 4]

A decoder classifies by the log-likelihood of the label word after the prompt;
only the positions that predict label tokens need the LM head. fedtune passes
transformers' `logits_to_keep` so the head runs on the last few positions (the
"last" rows below); "all" forces the head on every position, as a plain
`model(...).logits` does. Each model: one fixed batch of 32 real FPB-style
sentences (lengths 20-45 tokens, right-padded), bf16 autocast, LoRA; the median of
`--steps` training steps (loss + backward + AdamW step) and of as many evaluation
passes (scores under no_grad). Both variants run alternately in one process, so
their ratio is comparable; absolute times are not across machines or loads.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time
from collections.abc import Callable

import torch
import transformers

import fedtune.classify as classify
from fedtune.adapted import AdaptedModel
from fedtune.config import ModelConfig, method_config

SENTENCES = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period "
    "in 2007 representing 7.7 % of net sales .",
    "The company said that its net sales fell by 5 % .",
    "Finnish Talentum reports its operating profit increased to EUR 20.5 mn in 2005 from "
    "EUR 9.3 mn in 2004 , and net sales totaled EUR 103.3 mn , up from EUR 96.4 mn .",
    "The contract value amounts to about EUR 11 million , the company added .",
]


def _median_seconds(fn: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model: AdaptedModel, batch: dict, opt: torch.optim.Optimizer) -> None:
    model.module.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.formulation.loss(model.module, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _eval_pass(model: AdaptedModel, batch: dict) -> None:
    model.module.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.formulation.scores(model.module, batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--method", default="lora")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    keeps = classify._keeps_logits
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast")
    print()
    print(
        "| model | method | head on | train step s | eval pass s | train speed-up | eval speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = AdaptedModel.build(
            ModelConfig(name=name, max_length=64), method_config(args.method),
            ("negative", "neutral", "positive"),
        )  # fmt: skip
        form = model.formulation
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(32)]
        batch = form.collate(form.encode(texts, [i % 3 for i in range(32)]))
        params = [q for q in model.module.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        step = functools.partial(_train_step, model, batch, opt)
        evaluate = functools.partial(_eval_pass, model, batch)
        step()  # warm-up (allocations, one-time kernels)
        results = {}
        for label, use in (("all", False), ("last", True), ("all", False), ("last", True)):
            classify._keeps_logits = (lambda m: False) if not use else keeps  # type: ignore[assignment]
            t, e = _median_seconds(step, args.steps), _median_seconds(evaluate, args.steps)
            results[label] = (t, e)  # the second round of each (warm) is kept
        classify._keeps_logits = keeps  # type: ignore[assignment]
        (ta, ea), (tl, el) = results["all"], results["last"]
        width = batch["input_ids"].shape[1]
        print(f"| {name} | {args.method} | all {width} positions | {ta:.2f} | {ea:.2f} | | |")
        print(f"| {name} | {args.method} | last positions | {tl:.2f} | {el:.2f} | "
              f"{ta / tl:.2f}x | {ea / el:.2f}x |", flush=True)  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of the process: {rss:.0f} MB")


if __name__ == "__main__":
    main()
