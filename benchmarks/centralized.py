"""Centralized benchmark: accuracy of every method, and training throughput of
fedtune's loop against a plain PyTorch loop and the Hugging Face Trainer.

    export FEDTUNE_DATA_DIR=/path/to/data HF_HUB_OFFLINE=1
    python benchmarks/centralized.py                      # all parts, ~1 hour on 2 cores
    python benchmarks/centralized.py --parts throughput   # one part
    python benchmarks/centralized.py --quick              # smoke test, numbers meaningless

Parts:
  methods     every method on FPB all-agree (default DataConfig) with MiniLM, through
              `run_centralized`, the split loaded once; hyperparameters from HPARAMS.
  fingpt      lora and full on the FinGPT split (50% agreement, 1,212 test sentences).
  reference   LoRA trained by the plain PyTorch loop (below) for the lora row's epochs,
              tested on the same all-agree split: the accuracy reference.
  throughput  training samples/s of fedtune's `train()`, a minimal hand-written loop and
              `transformers.Trainer` on the same model, data, batch size and step count,
              interleaved over several rounds (medians reported). On a decoder
              (`--model smollm2 --batch-size 8 --throughput-methods lora`) the loops
              train the generative classifier (prompt + label word) and fedtune also
              runs with the LM head at every position, to show what scoring only the
              label positions gives.

Results are printed and appended as a dated section (machine, command, tables, plots
under img/ next to it) to `--output` (default docs/benchmarks.md). Run directories go to
runs/bench-<timestamp>/ (git-ignored). --quick writes both to the temporary directory
unless --output is given, so a smoke test leaves nothing in the repository.

On a busy machine use --threads 1: with torch's default of one thread per core and
another process on the same cores, training ran ~5x slower than with one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import peft
import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from fedtune.adapted import AdaptedModel
from fedtune.classify import CausalLMFormulation
from fedtune.config import DataConfig, ModelConfig, RunConfig, TrainConfig, method_config
from fedtune.data import Splits, make_splits
from fedtune.evaluate import evaluate
from fedtune.models import detect_kind, load_config, resolve_model_name
from fedtune.regimes import run_centralized
from fedtune.train import train

plt.switch_backend("Agg")  # files only, no display
transformers.logging.set_verbosity_error()  # no load reports per model build
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices

# Per method: `method` = method config overrides (lr, r, ...), `train` = TrainConfig overrides.
# Row name -> method config and train overrides. A row whose name is not a method
# says which method it varies in "base" (e.g. `lora-qv`: PEFT's default LoRA targets).
HPARAMS: dict[str, dict[str, Any]] = {
    "head": {"method": {"lr": 1e-2}, "train": {"epochs": 10}},
    "full": {"method": {"lr": 5e-5}, "train": {"epochs": 4}},
    "lora": {"method": {}, "train": {"epochs": 6}},
    "lora-qv": {
        "base": "lora",
        "method": {"lr": 3e-3, "r": 8, "alpha": 16, "target_modules": []},
        "train": {"epochs": 6},
    },
    "ptuning": {"method": {"lr": 1e-2}, "train": {"epochs": 10, "patience": 3}},
    "prompt": {"method": {"lr": 3e-2}, "train": {"epochs": 10, "patience": 3}},
    "prefix": {"method": {"lr": 1e-2}, "train": {"epochs": 10, "patience": 3}},
    "ia3": {"method": {"lr": 1e-2}, "train": {"epochs": 10, "patience": 3}},
}
FINGPT_METHODS = ["lora", "full"]
THROUGHPUT_METHODS = ["lora", "full"]
PARTS = ["methods", "fingpt", "reference", "throughput"]
SEED = 42
BATCH_SIZE = 32
WARMUP_RATIO = TrainConfig().warmup_ratio  # the same warmup for all three loops
MODEL = ModelConfig()  # MiniLM (`minilm`), max_length 64
REPO = Path(__file__).resolve().parent.parent

Row = list[str]  # one table row, already formatted
Record = dict[str, Any]  # a run summary or one throughput measurement


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    limit: int  # training examples kept (0 = all)
    epochs: float | None  # overrides HPARAMS epochs (quick runs)
    steps: int  # throughput: optimizer steps per measurement
    rounds: int  # throughput: repetitions of each contender
    threads: int  # torch threads, the same for every run
    runs_dir: Path


# --- tables: one definition, printed with rich and written as Markdown -------------


def show(console: Console, title: str, headers: Row, rows: list[Row], left: int = 1) -> str:
    """Print a rich table; return it as Markdown. The first `left` columns align left."""
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    align = [":---"] * left + ["---:"] * (len(headers) - left)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return f"**{title}**\n\n" + "\n".join(lines) + "\n"


def bullets(notes: tuple[str, ...]) -> str:
    return "".join(f"- {n}\n" for n in notes)


# --- parts `methods` and `fingpt`: run_centralized per method -----------------------

METHODS_NOTES = """\
Each row is one `run_centralized` call; the best validation-loss checkpoint (evaluated
every epoch) is restored before testing. Wall time covers the whole call (model loading,
tokenization, training, validation, test evaluation, saving); train samples/s counts the
optimizer steps only.
"""
RESULT_HEADERS = [
    "method", "accuracy", "macro-F1", "weighted F1", "trainable params (% of model)",
    "epochs / steps (best step)", "wall time (s)", "train samples/s",
]  # fmt: skip


def run_methods(
    data: DataConfig, methods: list[str], tag: str, s: Settings, console: Console
) -> tuple[Splits, list[Record]]:
    splits = make_splits(data)  # loaded once, shared by every method
    summaries = []
    for name in methods:
        hp = HPARAMS[name]
        train_over = {**hp["train"], "threads": s.threads}
        if s.epochs is not None:
            train_over["epochs"] = s.epochs
        cfg = RunConfig(
            name=f"{tag}-{name}",
            output_dir=str(s.runs_dir),
            seed=SEED,
            data=data,
            model=MODEL,
            method=method_config(hp.get("base", name), hp["method"]),
            train=dataclasses.replace(TrainConfig(), **train_over),
        )
        summary = run_centralized(cfg, console, splits)
        summary["method"] = name  # the row name, e.g. lora-qv
        summaries.append(summary)
    return splits, summaries


def result_rows(summaries: list[Record]) -> list[Row]:
    return [
        [
            r["method"],
            f"{r['accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
            f"{r['weighted_f1']:.4f}",
            f"{r['trainable_parameters']:,} ({r['trainable_percent']:.3g}%)",
            f"{r['epochs']:.3g} / {r['steps']} ({r['best_step']})",
            f"{r['wall_seconds']:.0f}",
            f"{r['samples_per_second']:.1f}",
        ]
        for r in summaries
    ]


def part_methods(
    data: DataConfig, methods: list[str], tag: str, title: str, s: Settings, console: Console
) -> tuple[Splits, list[Record], str]:
    console.rule(f"[bold]{title}")
    splits, rows = run_methods(data, methods, tag, s, console)
    table = show(console, f"{title}: test set", RESULT_HEADERS, result_rows(rows))
    return splits, rows, f"### {title}\n\n{bullets(splits.notes)}\n{table}"


def plot_methods(summaries: list[Record], path: Path, title: str) -> None:
    """One colour per method (labels next to points collide: many methods have ~1e5
    trainable parameters); filled circle = accuracy, cross = macro-F1."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for i, r in enumerate(summaries):
        x, color = r["trainable_parameters"], f"C{i % 10}"
        ax.scatter([x], [r["accuracy"]], color=color, label=r["method"], zorder=3)
        ax.scatter([x], [r["macro_f1"]], color=color, marker="x", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (●) and macro-F1 (×)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- part `throughput`: the training loops on the same model and data --------------
# Each contender gets a freshly built model and the raw texts/label ids; it tokenizes,
# then returns (samples trained on, seconds). Only training is timed: from optimizer
# creation (inside train() / trainer.train()) to the last optimizer step.

Contender = Callable[[AdaptedModel, list[str], list[int], int, float], tuple[int, float]]


def fedtune_loop(
    model: AdaptedModel, texts: list[str], labels: list[int], steps: int, lr: float,
    bucket_size: int = TrainConfig().bucket_size,
) -> tuple[int, float]:  # fmt: skip
    feats = model.formulation.encode(texts, labels)
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH_SIZE, progress=False,
                      bucket_size=bucket_size)  # fmt: skip
    t0 = time.perf_counter()
    result = train(model, feats, None, cfg, lr, SEED)
    return result.samples_seen, time.perf_counter() - t0


def fedtune_loop_unbucketed(
    model: AdaptedModel, texts: list[str], labels: list[int], steps: int, lr: float
) -> tuple[int, float]:
    """fedtune's loop on plain random batches (`bucket_size` 1), padded per batch like
    the plain loop's: what the loop itself costs, without the bucketing speed-up."""
    return fedtune_loop(model, texts, labels, steps, lr, bucket_size=1)


def fedtune_loop_all_logits(
    model: AdaptedModel, texts: list[str], labels: list[int], steps: int, lr: float
) -> tuple[int, float]:
    """Decoders: fedtune's loop with the LM head run at every position (as a model's
    own `labels=` loss does) instead of only where label tokens are scored: what
    `logits_to_keep` gives."""
    import fedtune.classify as classify

    keeps = classify._keeps_logits
    classify._keeps_logits = lambda _model: False
    try:
        return fedtune_loop(model, texts, labels, steps, lr)
    finally:
        classify._keeps_logits = keeps


def hf_rows(model: AdaptedModel, texts: list[str], labels: list[int]) -> tuple[list[dict], Any]:
    """The training rows and collator a user of plain PyTorch or the Trainer would
    write. Encoders: tokenized sentences with a class label, `DataCollatorWithPadding`.
    Decoders (a generative classifier): fedtune's own prompt + label-word token ids
    (so every loop sees the same tokens), `labels` = -100 on the prompt and the ids on
    the label word, `DataCollatorForSeq2Seq` (pads labels with -100): the model's own
    causal-LM loss on the label word, its head run at every position."""
    tok = model.tokenizer
    if isinstance(model.formulation, CausalLMFormulation):
        rows = [
            {"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"]),
             "labels": [-100] * f["prompt_len"] + f["input_ids"][f["prompt_len"]:]}
            for f in model.formulation.encode(texts, labels)
        ]  # fmt: skip
        return rows, DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    enc = tok(texts, truncation=True, max_length=MODEL.max_length)
    rows = [{**{k: enc[k][i] for k in enc}, "labels": y} for i, y in enumerate(labels)]
    return rows, DataCollatorWithPadding(tok)


def plain_loop(
    model: AdaptedModel, texts: list[str], labels: list[int], steps: int, lr: float
) -> tuple[int, float]:
    """The simplest correct loop: random batches, padded per batch, AdamW, linear decay."""
    net = model.module
    rows, collate = hf_rows(model, texts, labels)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_RATIO * steps), steps)
    net.train()
    step = seen = 0
    while step < steps:
        for idx in torch.randperm(len(rows)).split(BATCH_SIZE):
            batch = collate([rows[i] for i in idx])
            loss = net(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step, seen = step + 1, seen + len(idx)
            if step == steps:
                break
    return seen, time.perf_counter() - t0


def plain_reference(splits: Splits, s: Settings, console: Console) -> Record:
    """LoRA trained by `plain_loop` for the same epochs as the `lora` row, tested on
    the same split: the accuracy reference for fedtune's loop (which also clips
    gradients and restores the best validation checkpoint; the plain loop does not)."""
    t0 = time.perf_counter()
    hp = HPARAMS["lora"]
    mcfg = method_config("lora", hp["method"])
    model = AdaptedModel.build(MODEL, mcfg, splits.labels, seed=SEED)
    index = {label: i for i, label in enumerate(splits.labels)}
    texts, labels = [e.text for e in splits.train], [index[e.label] for e in splits.train]
    epochs = s.epochs if s.epochs is not None else hp["train"]["epochs"]
    steps = math.ceil(epochs * math.ceil(len(texts) / BATCH_SIZE))
    torch.set_num_threads(s.threads)
    seen, seconds = plain_loop(model, texts, labels, steps, mcfg.lr)
    model.module.eval()
    test = evaluate(model, [e.text for e in splits.test], [index[e.label] for e in splits.test])
    n = model.trainable_parameters()
    console.print(f"plain loop (lora): test accuracy {test.accuracy:.4f}")
    return {
        "method": "plain loop (lora)", **test.summary(), "trainable_parameters": n,
        "trainable_percent": 100 * n / model.base_parameters, "epochs": float(epochs),
        "steps": steps, "best_step": steps, "wall_seconds": time.perf_counter() - t0,
        "samples_per_second": seen / seconds,
    }  # fmt: skip


def hf_trainer(
    model: AdaptedModel, texts: list[str], labels: list[int], steps: int, lr: float
) -> tuple[int, float]:
    """transformers.Trainer with its defaults (sampler, optimizer, clipping); the timed
    trainer.train() call includes its own dataloader and optimizer setup."""
    rows, collate = hf_rows(model, texts, labels)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH_SIZE, learning_rate=lr,
            max_steps=steps, warmup_steps=int(WARMUP_RATIO * steps), lr_scheduler_type="linear",
            report_to="none", eval_strategy="no", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, use_cpu=True, seed=SEED,
        )  # fmt: skip
        trainer = Trainer(model=model.module, args=args, train_dataset=rows,
                          data_collator=collate)  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # added by disable_tqdm; prints the metrics
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    # Its sampler walks whole epochs in order; count the (possibly short) last batches.
    per_epoch = -(-len(rows) // BATCH_SIZE)
    seen = sum(min(BATCH_SIZE, len(rows) - (i % per_epoch) * BATCH_SIZE) for i in range(steps))
    return seen, seconds


CONTENDERS: dict[str, Contender] = {
    "fedtune train()": fedtune_loop,
    "plain PyTorch loop": plain_loop,
    "HF Trainer": hf_trainer,
    "fedtune, no bucketing": fedtune_loop_unbucketed,
}
DECODER_CONTENDERS: dict[str, Contender] = {
    **CONTENDERS, "fedtune, all-position logits": fedtune_loop_all_logits,
}


@functools.cache
def _kind(name: str) -> str:
    return detect_kind(load_config(resolve_model_name(name)))  # reads the model's config


def contenders() -> dict[str, Contender]:
    """The loops compared on MODEL: decoders add fedtune with the LM head at every position."""
    return DECODER_CONTENDERS if _kind(MODEL.name) == "decoder" else CONTENDERS


def run_throughput(splits: Splits, s: Settings, console: Console) -> list[Record]:
    index = {label: i for i, label in enumerate(splits.labels)}
    texts = [e.text for e in splits.train]
    labels = [index[e.label] for e in splits.train]
    names = list(contenders())
    records = []
    for method in THROUGHPUT_METHODS:
        mcfg = method_config(method, HPARAMS[method]["method"])
        for rnd in range(s.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate the start
            for name in order:
                model = AdaptedModel.build(MODEL, mcfg, splits.labels, seed=SEED)
                torch.set_num_threads(s.threads)
                samples, seconds = contenders()[name](model, texts, labels, s.steps, mcfg.lr)
                records.append({"method": method, "round": rnd + 1, "contender": name,
                                "samples": samples, "seconds": seconds,
                                "samples_per_second": samples / seconds})  # fmt: skip
                console.print(f"  {method:5} round {rnd + 1}  {name:20} {samples / seconds:7.1f} "
                              f"samples/s  ({samples} samples, {seconds:.1f} s)")  # fmt: skip
                del model
                gc.collect()
    return records


def medians(records: list[Record]) -> dict[tuple[str, str], float]:
    keys = {(r["method"], r["contender"]) for r in records}
    return {
        k: statistics.median(
            r["samples_per_second"] for r in records if (r["method"], r["contender"]) == k
        )
        for k in keys
    }


def throughput_rows(records: list[Record]) -> list[Row]:
    med = medians(records)
    names = list(contenders())
    ours, plain, hf, flat = list(CONTENDERS)
    rows = []
    for m in THROUGHPUT_METHODS:
        rows.append([
            m, *(f"{med[m, n]:.1f}" for n in names),
            f"{med[m, ours] / med[m, plain]:.2f}×", f"{med[m, ours] / med[m, hf]:.2f}×",
            f"{med[m, flat] / med[m, plain]:.2f}×",
            *(f"{med[m, ours] / med[m, n]:.2f}×" for n in names[len(CONTENDERS):]),
        ])  # fmt: skip
    return rows


def plot_throughput(records: list[Record], path: Path, title: str) -> None:
    med = medians(records)
    names = list(contenders())
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(THROUGHPUT_METHODS))]
        ax.bar(xs, [med[m, name] for m in THROUGHPUT_METHODS], width, label=name)
        for x, m in zip(xs, THROUGHPUT_METHODS, strict=True):  # every round as a dot
            runs = [r["samples_per_second"] for r in records
                    if r["method"] == m and r["contender"] == name]  # fmt: skip
            ax.scatter([x] * len(runs), runs, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(THROUGHPUT_METHODS)), THROUGHPUT_METHODS)
    ax.set_ylabel("training samples/s (bar: median, dots: rounds)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


THROUGHPUT_NOTES = f"""\
Each measurement builds a fresh model (same seed) and times training only: from optimizer
creation to the last optimizer step; model loading and tokenization are excluded. Samples/s
counts the examples actually trained on. Contenders run interleaved, the starting one
rotating each round; the table gives medians.

- `fedtune.train.train()`: its default length bucketing (`bucket_size` {TrainConfig().bucket_size}),
  torch AdamW, gradient clipping at 1.0, warmup + linear decay.
- plain PyTorch loop: `randperm` batches padded per batch by the tokenizer, torch AdamW,
  the same warmup + linear decay, no clipping (the ~25-line `plain_loop` in the script).
- HF Trainer: `transformers.Trainer` defaults (random sampler, `adamw_torch_fused`,
  clipping at 1.0), `DataCollatorWithPadding`, the same schedule; the timed
  `trainer.train()` call includes its own dataloader and optimizer setup.
- fedtune, no bucketing: `fedtune.train.train()` with `bucket_size` 1 (random batches padded
  per batch, as the plain loop's): the loop's own cost without the bucketing speed-up.
"""
DECODER_NOTES = """\
- Decoders (a generative classifier: prompt, then the label word): every loop trains on
  the same token ids (fedtune's prompt + label word). The plain loop and the Trainer use
  the model's own causal-LM loss (`labels` = -100 on the prompt, `DataCollatorForSeq2Seq`),
  which runs the LM head at every position; fedtune runs it only from the first label
  position on (`logits_to_keep`).
- fedtune, all-position logits: fedtune's loop with the head at every position: what
  `logits_to_keep` gives (column "ours / all-position logits").
"""


def part_throughput(splits: Splits, s: Settings, console: Console) -> tuple[list[Record], str]:
    console.rule("[bold]throughput: fedtune train() vs plain loop vs HF Trainer "
                 "(and fedtune without bucketing)")
    records = run_throughput(splits, s, console)
    intro = (
        f"Training samples/s of `{MODEL.name}` + {' and '.join(THROUGHPUT_METHODS)} on the "
        f"{len(splits.train)} all-agree training sentences, {s.steps} optimizer steps of "
        f"batch {BATCH_SIZE}, {s.rounds} round(s), torch threads {s.threads}.\n\n"
    )
    extra = list(contenders())[len(CONTENDERS):]
    headers = ["method", *contenders(), "ours / plain", "ours / Trainer", "no bucketing / plain",
               *(f"ours / {n.removeprefix('fedtune, ')}" for n in extra)]  # fmt: skip
    notes = THROUGHPUT_NOTES + (DECODER_NOTES if extra else "")
    medians_md = show(console, "Training samples/s (median)", headers, throughput_rows(records))
    detail = [
        [r["method"], str(r["round"]), r["contender"], str(r["samples"]),
         f"{r['seconds']:.2f}", f"{r['samples_per_second']:.1f}"]
        for r in records
    ]  # fmt: skip
    detail_md = show(console, "Every measurement, in run order",
                     ["method", "round", "contender", "samples", "seconds", "samples/s"],
                     detail, left=3)  # fmt: skip
    md = f"### Training throughput\n\n{intro}{notes}\n{medians_md}\n{detail_md}"
    return records, md


# --- report -------------------------------------------------------------------------


def machine(threads: int) -> list[Row]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown")  # fmt: skip
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    kib = next((int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal")), 0)
    return [
        ["date", time.strftime("%Y-%m-%d %H:%M %Z")],
        ["CPU", cpu],
        ["cores", f"{os.cpu_count()} (os.cpu_count), torch threads {threads}"],
        ["RAM", f"{kib / 2**20:.1f} GiB"],
        ["load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())],
        ["OS", platform.platform()],
        ["Python", platform.python_version()],
        ["torch / transformers / peft",
         f"{torch.__version__} / {transformers.__version__} / {peft.__version__}"],
    ]  # fmt: skip


def write_report(output: Path, title: str, body: list[str]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if not output.exists():
        output.write_text(
            "# Benchmarks\n\nDated sections appended by `benchmarks/centralized.py`, newest "
            "last. Each names the machine and the exact command; numbers from different "
            "machines or loads are not comparable.\n"
        )
    with output.open("a") as f:
        f.write(f"\n## {title}\n\n" + "\n".join(body))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--methods", default=",".join(HPARAMS), help="methods of part `methods`")
    p.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    p.add_argument("--output", type=Path, default=None,
                   help="Markdown file to append to (default docs/benchmarks.md; "
                        "a temporary file with --quick)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="throughput: steps (default 40)")
    p.add_argument("--rounds", type=int, default=None, help="throughput: rounds (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--model", default=MODEL.name,
                   help="model of every part: a catalog name (minilm, mpnet, smollm2, gemma3), "
                        "a Hub id or a folder (default minilm)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="batch size (default 32)")
    p.add_argument("--throughput-methods", default=",".join(THROUGHPUT_METHODS),
                   help="methods of part `throughput` (default lora,full)")  # fmt: skip
    args = p.parse_args(argv)
    for part in args.parts.split(","):
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    for m in args.methods.split(","):
        if m not in HPARAMS:
            p.error(f"unknown method {m!r}; choose from {', '.join(HPARAMS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    global MODEL, BATCH_SIZE, THROUGHPUT_METHODS  # one model and batch size for every part
    MODEL = dataclasses.replace(MODEL, name=args.model)
    BATCH_SIZE = args.batch_size
    THROUGHPUT_METHODS = args.throughput_methods.split(",")
    console = Console(width=None if sys.stdout.isatty() else 150)
    stamp, started = time.strftime("%Y%m%d-%H%M%S"), time.strftime("%Y-%m-%d %H:%M")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(
        quick=args.quick,
        limit=200 if args.quick else 0,
        epochs=1 if args.quick else None,
        steps=args.steps or (6 if args.quick else 40),
        rounds=args.rounds or (2 if args.quick else 3),
        threads=torch.get_num_threads(),
        runs_dir=(Path(tempfile.gettempdir()) if args.quick else REPO / "runs") / f"bench-{stamp}",
    )
    quick_default = Path(tempfile.gettempdir()) / f"bench-quick-{stamp}.md"
    output = args.output or (quick_default if s.quick else REPO / "docs" / "benchmarks.md")
    img_dir = output.parent / "img"
    parts = args.parts.split(",")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        console.print(f"[yellow]load average {load:.1f} on {cores} cores: other processes share "
                      "the CPU, timings will be noisy (try --threads 1)[/]")  # fmt: skip

    def image(name: str, alt: str) -> tuple[Path, str]:
        img_dir.mkdir(parents=True, exist_ok=True)
        path = img_dir / f"centralized-{stamp}-{name}.png"
        return path, f"\n![{alt}]({os.path.relpath(path, output.parent)})\n"

    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    setup = (
        f"Model `{MODEL.name}` (max_length {MODEL.max_length}), seed {SEED}, batch size "
        f"{BATCH_SIZE}; hyperparameters: `HPARAMS` in `benchmarks/centralized.py`."
    )
    if s.quick:
        setup += (f" **Quick run ({s.limit} training examples, {s.epochs:g} epoch): "
                  "the numbers are meaningless.**")  # fmt: skip
    if {"methods", "fingpt"} & set(parts):
        runs = s.runs_dir.relative_to(REPO) if s.runs_dir.is_relative_to(REPO) else s.runs_dir
        setup += f" Run directories: `{runs}/`."
        setup += "\n\n" + METHODS_NOTES
    body = [
        show(console, "Machine", ["", ""], machine(s.threads), left=2),
        f"Command:\n\n```\n{command}\n```\n\n{setup}\n",
    ]

    allagree = DataConfig(limit=s.limit)  # FPB all-agree, random split, seed 42
    splits: Splits | None = None
    if "methods" in parts:
        title = "Methods on FPB all-agree"
        splits, rows, md = part_methods(allagree, args.methods.split(","), "fpb", title, s, console)
        path, img = image("methods", "test accuracy vs trainable parameters")
        plot_methods(rows, path, "FPB all-agree: test score vs trainable parameters")
        body.append(md + img)
    if "fingpt" in parts:
        fingpt = DataConfig(agreement="50", split="fingpt", limit=s.limit)
        title = "FinGPT split (FPB 50% agreement)"
        body.append(part_methods(fingpt, FINGPT_METHODS, "fingpt", title, s, console)[2])
    if "reference" in parts:
        splits = splits or make_splits(allagree)
        title = "Plain PyTorch loop, LoRA, FPB all-agree"
        console.rule(f"[bold]{title}")
        ref = [plain_reference(splits, s, console)]
        body.append(f"### {title}\n\n" + show(console, title, RESULT_HEADERS, result_rows(ref)))
    if "throughput" in parts:
        records, md = part_throughput(splits or make_splits(allagree), s, console)
        path, img = image("throughput", "training samples/s per training loop")
        plot_throughput(records, path, f"Training throughput, {s.steps} steps, batch {BATCH_SIZE}")
        body.append(md + img)
    write_report(output, f"Centralized, {started}" + (" (quick)" if s.quick else ""), body)
    console.print(f"[bold]appended to[/] {output}")


if __name__ == "__main__":
    main()
