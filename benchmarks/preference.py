"""Preference benchmarks on Anthropic HH with SmolLM2-135M-Instruct (or --model), CPU.

    python benchmarks/preference.py --out /work/bench/pref hh          # reward, dpo
    python benchmarks/preference.py --out /work/bench/pref hh-regimes  # 3 regimes
    python benchmarks/preference.py --out /work/bench/pref rloo        # RL vs the reward model
    python benchmarks/preference.py --out /work/bench/pref grpo        # the same with GRPO

- `hh`: examples/hh-preference.toml (160 training pairs from all four subsets, ~100
  held-out pairs from prompts no training pair has), a reward model (`reward`) and DPO
  (`dpo`, beta 0.1), one epoch each, fp32 (see docs/preference.md on bf16). Held-out
  pair accuracy (chosen scored above rejected: the reward model's reward, DPO's
  implicit reward), mean reward margin, per subset.
- `hh-regimes`: `reward` and `dpo` centralized, at each subset alone and federated
  (FedAvg of LoRA (+ the reward head), one local epoch per round), the four subsets as
  the four sites.
- `rloo`: a LoRA policy trained with RLOO against the `hh` reward model (the run
  hh-reward-N, which must exist in --out), on 48 training prompts, 4 samples each, up to
  48 new tokens; scored on the held-out prompts by its win rate over the base model
  (both answer greedily), reward gain and KL, judged by a second reward model trained
  on as many other training pairs (`data.limit_skip`), not the one the policy chased.
- `grpo`: the same with method `grpo` (GRPO's loss, its own beta 0.04), the same judge.
- `--import NAME=RUN_DIR`: record a finished `fedtune run` of the same config as row NAME.
- `--set KEY=VALUE` (repeatable): a config override for every run (a part's own
  settings, e.g. rloo's 48 prompts, win), e.g. `--set train.bf16=true` on a CPU with
  AVX512-BF16 or AMX, `--set data.limit=640` (the runs are named by it); the row
  records them.

Each run's summary is appended to --out/rows.jsonl and read back on the next call, so
the script resumes; it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# The resumable rows file of benchmarks/generation.py (this script's folder is on sys.path).
from generation import _done, _keep

ROOT = Path(__file__).resolve().parents[1]
HH = str(ROOT / "examples" / "hh-preference.toml")
REGIMES = ["federated.partition=column", "federated.rounds=2", "federated.local_epochs=1"]


def _row(key: str, s: dict[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "key": key, "method": s["method"], "regime": extra.pop("regime", "centralized"),
        "site": extra.pop("site", "all"), "pair_accuracy": s["pair_accuracy"],
        "reward_margin": s["reward_margin"], "loss": s["loss"], "n_train": s["n_train"],
        "n_test": s["n_test"], "per_category": s.get("report") or {},
        "train_seconds": s.get("train_seconds"), "wall_seconds": seconds,
        "bytes_total": s.get("bytes_total"), "reward": s.get("reward"), "kl": s.get("kl"),
        "ties": s.get("ties"), "run_dir": str(s.get("run_dir", "")),
        **extra,
    }  # fmt: skip


SETS: list[str] = []  # --set overrides for every run; a part's own overrides win


def _pairs() -> int:
    """Training pairs of the `hh` runs: examples/hh-preference.toml's 160, or --set
    data.limit=N (the runs' names say it)."""
    sets = [s.split("=", 1)[1] for s in SETS if s.startswith("data.limit=")]
    return int(sets[-1]) if sets else 160


def _central(out: Path, key: str, overrides: list[str]) -> dict[str, Any]:
    done = _done(out)
    if key in done:
        return done[key]
    from fedtune.config import load_config
    from fedtune.regimes import run_centralized

    cfg = load_config(HH, ["train.progress=false", f"output_dir={out / 'runs'}", f"name={key}",
                           *SETS, *overrides])  # fmt: skip
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        s = run_centralized(cfg)
    row = _keep(out, _row(key, s, time.perf_counter() - t0, overrides=SETS))
    print(f"{key}: pair accuracy {row['pair_accuracy']:.4f}  margin {row['reward_margin']:.3f}"
          f"  ({row['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return row


def hh(out: Path) -> list[dict[str, Any]]:
    n = _pairs()
    return [_central(out, f"hh-reward-{n}", []),
            _central(out, f"hh-dpo-{n}", ["method.name=dpo"])]  # fmt: skip


RLOO = ["method.name=rloo", "data.limit=48", "train.batch_size=4", "method.num_generations=4",
        "method.max_new_tokens=48", "method.lr=3e-4", "method.beta=0.05"]  # fmt: skip


def rloo(out: Path, method: str = "rloo") -> list[dict[str, Any]]:
    n = _pairs()
    reward = out / "runs" / f"hh-reward-{n}"
    if not (reward / "model").is_dir():
        sys.exit(f"{method} needs the reward model {reward}: run the `hh` part first")
    # The fair judge: a second reward model on as many other training pairs of the split.
    judge = _central(out, f"hh-judge-{n}", [f"data.limit_skip={n}"])
    # GRPO keeps its own KL weight (beta 0.04, in the loss); the rest is RLOO's budget.
    plan = RLOO if method == "rloo" else [f"method.name={method}", *RLOO[1:-1]]
    return [judge, _central(out, f"hh-{method}-48-rm{n}", [*plan, f"method.reward_model={reward}",
                                                   f"method.judge_model={judge['run_dir']}"])]


def grpo(out: Path) -> list[dict[str, Any]]:
    return rloo(out, "grpo")


def hh_regimes(out: Path) -> list[dict[str, Any]]:
    key = "hh-regimes"
    done = _done(out)
    if any(k.startswith(key + "/") for k in done):
        return [r for k, r in done.items() if k.startswith(key + "/")]
    from fedtune.config import load_config
    from fedtune.federated.compare import run_regimes

    cfg = load_config(HH, ["train.progress=false", f"output_dir={out / 'runs'}", f"name={key}",
                           *REGIMES, *SETS])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        folder = run_regimes(cfg, ["reward", "dpo"])
    rows = json.loads((folder / "comparison.json").read_text())
    full = [json.loads((folder / r["name"] / "metrics.jsonl").read_text().splitlines()[-1])
            for r in rows]  # fmt: skip
    return [_keep(out, _row(f"{key}/{r['method']}/{r['regime']}/{r['site']}",
                            {**r, "report": f["report"]},
                            r["wall_seconds"], regime=r["regime"], site=r["site"],
                            overrides=SETS))
            for r, f in zip(rows, full, strict=True)]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    subsets = sorted({c for r in rows for c in r["per_category"]})
    lines = ["| run | regime | site | train pairs | test pairs | pair accuracy (rloo: win rate) "
             "| margin (rloo: reward gain) | kl | ties | " + " | ".join(subsets)
             + " | train s | wall s |", "|---" * (11 + len(subsets)) + "|"]  # fmt: skip
    for r in rows:
        per = [r["per_category"].get(c, {}).get("pair_accuracy") for c in subsets]
        lines.append(
            f"| {r['key']} | {r['regime']} | {r['site']} | {r['n_train']} | {r['n_test']} "
            f"| {r['pair_accuracy']:.4f} | {r['reward_margin']:.3f} | "
            + " | ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("kl", "ties"))
            + " | "
            + " | ".join("-" if p is None else f"{p:.3f}" for p in per)
            + f" | {r['train_seconds'] or 0:.0f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("parts", nargs="*", choices=["hh", "hh-regimes", "rloo", "grpo"])
    ap.add_argument("--import", dest="imports", action="append", default=[],
                    metavar="NAME=RUN_DIR")  # fmt: skip
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    SETS.extend(args.sets)
    args.out.mkdir(parents=True, exist_ok=True)
    for item in args.imports:
        key, _, run = item.partition("=")
        if key not in _done(args.out):
            summary = json.loads((Path(run) / "metrics.jsonl").read_text().splitlines()[-1])
            _keep(args.out, _row(key, summary, summary["wall_seconds"]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")  # fmt: skip
    parts = {"hh": hh, "hh-regimes": hh_regimes, "rloo": rloo, "grpo": grpo}
    for part in args.parts:
        print(f"\n## {part}\n\n{table(parts[part](args.out))}")


if __name__ == "__main__":
    main()
