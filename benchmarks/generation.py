"""Generation benchmarks: closed QA on TAT-QA and instruction following on the Alpaca
demo set, with SmolLM2-135M-Instruct (or --model, e.g. gemma3), on the CPU.

    python benchmarks/generation.py --out /work/bench/generation tatqa          # methods
    python benchmarks/generation.py --out /work/bench/generation tatqa-regimes  # 3 regimes
    python benchmarks/generation.py --out /work/bench/generation alpaca         # instructions

- `tatqa`: one split of TAT-QA (examples/tatqa-lora.toml: 300 training questions, ~100
  test questions from reports no training question is about), the base model
  zero-shot (`icl`, 0 shots), 2 similar demonstrations, retrieval-grounded (the 3
  passages nearest to the question from all reports instead of its own report), LoRA
  SFT and P-tuning SFT, one epoch each. ROUGE-L, exact match and token F1, overall and
  for span questions apart from arithmetic ones.
- `tatqa-regimes`: LoRA SFT centralized (2 epochs), at each site alone (2 epochs) and
  federated (FedAvg, 2 rounds of one local epoch), sites by answer source
  (`answer_from`: table, text, table-text), so the sites hold different kinds of
  question; 150 training questions, contexts cut at 384 tokens (CPU budget).
- `--import NAME=RUN_DIR`: record a finished `fedtune run` of the same config as row
  NAME instead of running it again.
- `--model NAME`: another catalog model (or a folder) for every row; rows of a model
  other than smollm2 are keyed `NAME/row`, so one --out holds both.
- `--only ROW,...`: run only these rows of the parts (e.g. `--only tatqa-icl0,tatqa-lora`).
- `alpaca`: the instruction set (400 training, 100 test instructions): the base model
  zero-shot, 2 similar demonstrations, LoRA SFT (1 epoch) and P-tuning SFT (3 epochs,
  lr 1e-2); ROUGE-L.
- `alpaca-regimes`: LoRA on the instruction set centralized, at each of three IID sites
  and federated (FedAvg, 2 rounds of one local epoch; 2 epochs for the others).

Each run's summary is appended to --out/rows.jsonl and read back on the next call, so
the script resumes; it prints Markdown tables.
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

ROOT = Path(__file__).resolve().parents[1]
TATQA = str(ROOT / "examples" / "tatqa-lora.toml")
ALPACA = [
    "data.task=generation", "data.source=file", "data.test_size=0.1", "data.val_size=0.05",
    "data.limit=400", "model.max_length=256", "model.max_new_tokens=64",
    "model.max_target_length=128", "method.lr=1e-3", "train.epochs=1", "train.batch_size=8",
    "train.bf16=true",
]  # fmt: skip


# The three regimes cost 3x the methods' runs (centralized, each site, federated), so
# on 2 CPU cores they run on half the training questions with a shorter context.
REGIMES = ["data.limit=150", "model.max_length=384", "federated.rounds=2",
           "federated.local_epochs=1", "train.epochs=2"]  # fmt: skip


def _done(out: Path) -> dict[str, dict[str, Any]]:
    rows = out / "rows.jsonl"
    if not rows.is_file():
        return {}
    return {r["key"]: r for r in map(json.loads, rows.read_text().splitlines())}


def _keep(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    with (out / "rows.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _row(key: str, s: dict[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
    per = s.get("report") or {}
    return {
        "key": key, "method": s["method"], "regime": extra.pop("regime", "centralized"),
        "site": extra.pop("site", "all"), "rougeL": s["rougeL"], "exact_match": s["exact_match"],
        "f1": s["f1"], "loss": s["loss"], "n_train": s["n_train"], "n_test": s["n_test"],
        "per_category": per, "samples": s.get("samples", [])[:3],
        "train_seconds": s.get("train_seconds"), "wall_seconds": seconds,
        "bytes_total": s.get("bytes_total"), **extra,
    }  # fmt: skip


MODEL = "smollm2"
ONLY: set[str] = set()


def _central(out: Path, key: str, config: str | None, overrides: list[str]) -> dict[str, Any]:
    if MODEL != "smollm2":
        key, overrides = f"{MODEL}/{key}", [*overrides, f"model.name={MODEL}"]
    done = _done(out)
    if key in done:
        return done[key]
    from fedtune.config import load_config
    from fedtune.regimes import run_centralized

    cfg = load_config(config, ["train.progress=false", f"output_dir={out / 'runs'}",
                               f"name={key.replace('/', '-')}", *overrides])  # fmt: skip
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        s = run_centralized(cfg)
    row = _keep(out, _row(key, s, time.perf_counter() - t0))
    print(f"{key}: ROUGE-L {row['rougeL']:.4f}  EM {row['exact_match']:.4f}  F1 {row['f1']:.4f}"
          f"  ({row['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return row


def _rows(out: Path, specs: list[tuple[str, str | None, list[str]]]) -> list[dict[str, Any]]:
    return [_central(out, key, config, overrides) for key, config, overrides in specs
            if not ONLY or key in ONLY]  # fmt: skip


def tatqa(out: Path) -> list[dict[str, Any]]:
    return _rows(out, [
        ("tatqa-icl0", TATQA, ["method.name=icl", "method.shots=0"]),
        ("tatqa-icl2", TATQA, ["method.name=icl", "method.shots=2", "method.selection=similar"]),
        ("tatqa-rag3", TATQA, ["method.name=icl", "method.shots=0", "method.retrieve=3"]),
        ("tatqa-lora", TATQA, []),
        ("tatqa-ptuning", TATQA, ["method.name=ptuning", "method.lr=1e-2"]),
        # One epoch (38 steps) was too few for P-tuning; on the instruction set three
        # epochs at this learning rate drew level with LoRA.
        ("tatqa-ptuning3", TATQA, ["method.name=ptuning", "method.lr=1e-2", "train.epochs=3"]),
    ])  # fmt: skip


def tatqa_regimes(out: Path) -> list[dict[str, Any]]:
    return _regimes(out, "tatqa-regimes", TATQA, ["data.site_column=answer_from",
                                                  "federated.partition=column", *REGIMES])


def alpaca_regimes(out: Path) -> list[dict[str, Any]]:
    # The set has no category or source column to give sites different kinds of
    # instruction: three IID sites of ~133 instructions each.
    path = f"data.path={os.environ.get('FEDTUNE_DATA_DIR', '')}/instructions/alpaca_en_demo.json"
    return _regimes(out, "alpaca-regimes", None, [
        *ALPACA, path, "model.name=smollm2", "method.name=lora", "federated.partition=iid",
        "federated.rounds=2", "federated.local_epochs=1"])  # fmt: skip


def _regimes(out: Path, key: str, config: str | None,
             overrides: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """LoRA in the three regimes (`fedtune compare`), one row per run."""
    model = []
    if MODEL != "smollm2":
        key, model = f"{MODEL}/{key}", [f"model.name={MODEL}"]
    done = _done(out)
    if any(k.startswith(key + "/") for k in done):
        return [r for k, r in done.items() if k.startswith(key + "/")]
    from fedtune.config import load_config
    from fedtune.federated.compare import run_regimes

    cfg = load_config(config, ["train.progress=false", f"output_dir={out / 'runs'}",
                               f"name={key.replace('/', '-')}", *overrides, *model])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        folder = run_regimes(cfg, ["lora"])
    rows = json.loads((folder / "comparison.json").read_text())
    # comparison.json leaves out the per-category report: each run's summary has it.
    full = [json.loads((folder / r["name"] / "metrics.jsonl").read_text().splitlines()[-1])
            for r in rows]  # fmt: skip
    return [_keep(out, _row(f"{key}/{r['regime']}/{r['site']}", {**r, "report": f["report"]},
                            r["wall_seconds"], regime=r["regime"], site=r["site"]))
            for r, f in zip(rows, full, strict=True)]  # fmt: skip


def alpaca(out: Path) -> list[dict[str, Any]]:
    path = f"data.path={os.environ.get('FEDTUNE_DATA_DIR', '')}/instructions/alpaca_en_demo.json"
    base = [*ALPACA, path, "model.name=smollm2"]
    return _rows(out, [
        ("alpaca-icl0", None, [*base, "method.name=icl", "method.shots=0"]),
        ("alpaca-icl2", None, [*base, "method.name=icl", "method.shots=2",
                               "method.selection=similar"]),
        ("alpaca-lora", None, [*base, "method.name=lora"]),
        # Prompt-style methods need more steps than LoRA (TAT-QA: one epoch was too few).
        ("alpaca-ptuning", None, [*base, "method.name=ptuning", "method.lr=1e-2",
                                  "train.epochs=3"]),
    ])  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | regime | site | train | test | ROUGE-L | EM | F1 | span F1 "
             "| arithmetic F1 | train s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        per = r["per_category"]
        span = per.get("span", {}).get("f1")
        arith = per.get("arithmetic", {}).get("f1")
        lines.append(
            f"| {r['key']} | {r['regime']} | {r['site']} | {r['n_train']} | {r['n_test']} "
            f"| {100 * r['rougeL']:.1f} | {100 * r['exact_match']:.1f} | {100 * r['f1']:.1f} "
            f"| {'-' if span is None else f'{100 * span:.1f}'} "
            f"| {'-' if arith is None else f'{100 * arith:.1f}'} "
            f"| {r['train_seconds'] or 0:.0f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("parts", nargs="*",
                    choices=["tatqa", "tatqa-regimes", "alpaca", "alpaca-regimes"])
    ap.add_argument("--import", dest="imports", action="append", default=[],
                    metavar="NAME=RUN_DIR")  # fmt: skip
    ap.add_argument("--model", default="smollm2", help="catalog name or folder for every row")
    ap.add_argument("--only", default="", metavar="ROW,...", help="run only these rows")
    args = ap.parse_args()
    global MODEL, ONLY
    MODEL, ONLY = args.model, {k for k in args.only.split(",") if k}
    args.out.mkdir(parents=True, exist_ok=True)
    for item in args.imports:
        key, _, run = item.partition("=")
        if key not in _done(args.out):
            summary = json.loads((Path(run) / "metrics.jsonl").read_text().splitlines()[-1])
            _keep(args.out, _row(key, summary, summary["wall_seconds"]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")  # fmt: skip
    parts = {"tatqa": tatqa, "tatqa-regimes": tatqa_regimes, "alpaca": alpaca,
             "alpaca-regimes": alpaca_regimes}
    for part in args.parts:
        print(f"\n## {part}\n\n{table(parts[part](args.out))}")


if __name__ == "__main__":
    main()
