"""In-context learning on small real LMs: shots x demonstration selection x
contextual calibration, on FPB all-agree (the default random split).

    python benchmarks/icl_table.py                              # smollm2 and gemma3
    python benchmarks/icl_table.py --models smollm2 --shots 0,4 --test 150

Each (model, shots, selection) scores the test sentences once with
`method.calibrate = true`; the uncalibrated row is the same run's scores before
calibration (recorded on the way), so the two rows differ only by the correction and
the calibrated one's extra cost is its content-free passes (timed apart). `--test N` scores a
stratified, seeded subset of N test sentences (all when 0); the majority-class
share of those sentences is printed with the table. Local backend, fp32 unless
`--bf16` (autocast, as `train.bf16 = true` does); `--prior` adds a row per run:
the calibrated scores aimed at the training labels' frequencies (`method.prior =
"train"`, no extra passes). The chat template is used when
the model has one (`method.chat = "auto"`; `--chat auto,off` adds the plain prompt),
the row says which.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import Counter

import numpy as np
from fpb_test import fpb_test
from sklearn.metrics import f1_score

import fedtune.methods.icl as icl_module
from fedtune.config import ModelConfig
from fedtune.methods.icl import ICL, IclConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--shots", default="0,4,8")
    p.add_argument("--selections", default="random,similar")
    p.add_argument("--test", type=int, default=0, help="stratified test subset (0 = all)")
    p.add_argument("--chat", default="auto",
                   help="comma-separated method.chat values: auto (the chat template when "
                        "the model has one), off (the plain prompt)")
    p.add_argument("--chat-demos", default="inline",
                   help="comma-separated method.chat_demos values: inline (demonstrations "
                        "as text in the user turn), turns (each its own user and assistant "
                        "turn)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="autocast the scoring to bf16")
    p.add_argument("--prior", action="store_true",
                   help="also the row calibrated toward the training label prior")
    args = p.parse_args()
    splits, test, y, texts = fpb_test(args.test, args.seed)
    labels = splits.labels
    majority = Counter(e.label for e in test).most_common(1)[0]
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"FPB all-agree, {len(splits.train)} train (demonstration pool), {len(test)} test "
          f"sentences; majority class {majority[0]} = {majority[1] / len(test):.4f}")  # fmt: skip
    print()
    print("| model | prompt | shots | selection | calibrated | accuracy | macro-F1 | "
          "seconds | s/sentence |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    real_calibration = icl_module.contextual_calibration
    combos = [(m, c, d) for m in args.models.split(",") for c in args.chat.split(",")
              for d in args.chat_demos.split(",")]  # fmt: skip
    for model, chat, chat_demos in combos:
        for shots in (int(s) for s in args.shots.split(",")):
            for selection in args.selections.split(",") if shots else ["-"]:
                cfg = IclConfig(shots=shots, selection=selection if shots else "random",
                                calibrate=True, chat=chat,  # type: ignore[arg-type]
                                chat_demos=chat_demos)  # type: ignore[arg-type]
                method = ICL(cfg, ModelConfig(name=model), labels, seed=args.seed,
                             bf16=args.bf16)  # fmt: skip
                method.fit(splits.train)
                # The instance's scoring calls, timed: the first scores the real
                # prompts, the second the content-free ones; the calibration's input is
                # kept to print the uncalibrated row.
                calls: list[float] = []
                seen: dict[str, np.ndarray] = {}
                score_heads = method._score_heads

                def timed(form, heads, calls=calls, score_heads=score_heads):  # type: ignore[no-untyped-def]
                    t = time.perf_counter()
                    out = score_heads(form, heads)
                    calls.append(time.perf_counter() - t)
                    return out

                def record(scores, prior, rows, seen=seen):  # type: ignore[no-untyped-def]
                    seen["raw"] = scores
                    return real_calibration(scores, prior, rows)

                method._score_heads = timed  # type: ignore[method-assign]
                icl_module.contextual_calibration = record  # type: ignore[assignment]
                try:
                    calibrated = method.predict_scores(texts)
                finally:
                    icl_module.contextual_calibration = real_calibration
                prompt = "plain"
                if method.uses_chat:
                    prompt = "chat, turns" if shots and chat_demos == "turns" else "chat"
                raw_s, prior_s = calls[0], sum(calls[1:])
                rows = [("no", seen["raw"], raw_s), ("yes", calibrated, raw_s + prior_s)]
                if args.prior:
                    rows.append(("yes, train prior",
                                 calibrated + np.log(method.label_prior()), raw_s + prior_s))
                for name, scores, secs in rows:
                    pred = scores.argmax(-1)
                    acc = float((pred == y).mean())
                    f1 = f1_score(y, pred, average="macro", labels=range(len(labels)))
                    per = secs / len(texts)
                    print(f"| {model} | {prompt} | {shots} | {selection} | {name} | {acc:.4f} | "
                          f"{f1:.4f} | {secs:.0f} | {per:.2f} |", flush=True)  # fmt: skip
                if method.notes:
                    print(f"<!-- {model} {shots} {selection}: {'; '.join(method.notes)} -->")


if __name__ == "__main__":
    main()
