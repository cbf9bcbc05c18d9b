"""Time a saved run's test evaluation in fp32 and under bfloat16 autocast, in one process.

    python benchmarks/bf16_eval.py RUN_DIR [--modes fp32,bf16,fp32,bf16] [--limit N]

RUN_DIR is any `fedtune run` of a trained method (its config.json and model/): the
run's own test split is rebuilt from its config, encoded once, and evaluated once per
mode, in the given order, so the ratios are comparable (absolute times are not, across
machines or loads). Prints seconds, the primary metric and the loss per mode: bf16
changes the scores by rounding, so the metric may move by an example or two. Only
worth it on a CPU with AVX512-BF16 or AMX (or a GPU); elsewhere bf16 is emulated and
far slower (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import transformers

from fedtune.adapted import AdaptedModel
from fedtune.config import RunConfig
from fedtune.data import make_splits
from fedtune.evaluate import evaluate_features
from fedtune.regimes import encode
from fedtune.runs import CONFIG_FILE, find_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--modes", default="fp32,bf16,fp32,bf16")
    p.add_argument("--limit", type=int, default=0, help="first N test examples (0 = all)")
    args = p.parse_args()
    transformers.utils.logging.set_verbosity_error()
    cfg = RunConfig.from_dict(json.loads((args.run / CONFIG_FILE).read_text()))
    model = AdaptedModel.load(find_model_dir(args.run))
    test = make_splits(cfg.data).test
    feats = encode(model, test[: args.limit] if args.limit else test)
    print(f"{args.run.name}: {cfg.method_name} on {cfg.model.name}, {len(feats)} test "
          f"examples, eval batch {cfg.train.eval_batch_size}")  # fmt: skip
    print("| mode | seconds | primary metric | loss |\n|---|---|---|---|")
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        m = evaluate_features(model, feats, cfg.train.eval_batch_size, bf16=mode == "bf16")
        seconds = time.perf_counter() - t0
        print(f"| {mode} | {seconds:.1f} | {m.primary} {m.values[m.primary]:.4f} | {m.loss:.4f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
