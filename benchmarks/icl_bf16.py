"""fp32 vs bf16 autocast for ICL label scoring, side by side in one process.

SmolLM2-135M-Instruct (or --model), 4 similar demonstrations as chat turns (the
`icl` defaults), the first --n test sentences of FPB all-agree (examples/icl.toml's
split); fp32 and bf16 passes alternate, --repeats times each, on one loaded model
(`train.bf16` sets `ICL.bf16`; here it is toggled between passes).

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/icl_bf16.py

Prints prompts/s and accuracy per pass, the share of answers both agree on and the
largest difference of the label log-probabilities.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedtune.config import load_config
from fedtune.data import make_splits
from fedtune.methods.frozen import log_normalize
from fedtune.regimes import build_frozen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config("examples/icl.toml", [f"method.model={args.model}",
                                            f"method.shots={args.shots}", "train.progress=false"])
    splits = make_splits(cfg.data)
    icl = build_frozen(cfg, splits.labels).fit(splits.train)
    test = splits.test[: args.n]
    texts, y = [e.text for e in test], icl.label_ids(test)
    icl.predict_scores(texts[:8])  # load the model, warm up
    scores: dict[bool, np.ndarray] = {}
    for _ in range(args.repeats):
        for bf16 in (False, True):
            icl.bf16 = bf16
            t = time.perf_counter()
            scores[bf16] = icl.predict_scores(texts)
            dt = time.perf_counter() - t
            acc = float((scores[bf16].argmax(1) == y).mean())
            print(f"{'bf16' if bf16 else 'fp32'}: {len(texts) / dt:.2f} prompts/s "
                  f"({dt:.1f} s), accuracy {acc:.3f}", flush=True)  # fmt: skip
    same = float((scores[False].argmax(1) == scores[True].argmax(1)).mean())
    diff = np.abs(log_normalize(scores[False]) - log_normalize(scores[True])).max()
    print(f"answers the same: {same:.3f}; largest |log-prob difference|: {diff:.3f}")


if __name__ == "__main__":
    main()
