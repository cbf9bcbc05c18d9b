"""Hyperparameter / design sweep of `lora` and `full` fine-tuning of MiniLM on the
FinGPT split of Financial PhraseBank (50% agreement; 3,265 train, 363 validation,
1,212 test sentences): which settings reach >= 0.86 test accuracy (issue 2)?

    export FEDTUNE_DATA_DIR=/path/to/data HF_HUB_OFFLINE=1
    python benchmarks/fingpt_sweep.py --stage screen --device cuda --workers 12 --out sweep/
    python benchmarks/fingpt_sweep.py --stage final --device cuda --workers 12 --out sweep/
    python benchmarks/fingpt_sweep.py --stage screen --quick --device cpu     # smoke test
    python benchmarks/fingpt_sweep.py --export-splits fingpt.json  # splits for a machine
                                                   # without `datasets` (then --splits)
    python benchmarks/fingpt_sweep.py --report sweep/results.jsonl  # tables only

Stages (each run: `AdaptedModel.build` + fedtune's `train()` with per-epoch validation
and the best-validation-loss checkpoint restored, exactly as `fedtune train` does; then
validation and test metrics of that checkpoint):
  screen  the grid below (`screen_jobs`): pooling of the classification head (`cls`,
          BERT's [CLS] pooler, vs `mean`, the masked mean of the last hidden states that
          all-MiniLM-L6-v2 was trained with), learning rate x epochs, then around a
          middle setting: batch size, max_length, weight decay, warmup, cosine schedule,
          LoRA rank/alpha/targets/dropout, training the pooler in full. Seeds 42 and 7.
  final   the `--top` configurations per method with the best mean validation accuracy
          in `--out`/results.jsonl, run again with seeds 1, 2, 3 (5 seeds in all).
  extra   a second grid around the screen's best mean-pooling settings (`extra_jobs`).
  confirm more seeds (1, 2, 3) of the candidates for HPARAMS and of the HPARAMS of
          benchmarks/centralized.py before this sweep (`confirm_jobs`).

Selection uses validation accuracy only; the test accuracy of every run is recorded
but never used to choose. Jobs run in `--workers` processes (one CUDA context each:
MiniLM's steps are launch-bound, so several processes keep a GPU busier than one);
results are appended to `--out`/results.jsonl as they finish, so an interrupted sweep
keeps what it finished. `--budget-s` stops starting new jobs after that many seconds.

Needs fedtune importable (`PYTHONPATH=src` from the repository root) and the model as a
directory (`--model`, default the bundled `minilm`).

Result of the run on an H100 (2026-11-22; 111 runs; benchmarks/fingpt_sweep_results.md):
no configuration reaches 0.86 test accuracy (best single run 0.8333, configuration means
0.80-0.82); mean pooling does not close the gap but keeps LoRA at lr 2e-3 from collapsing
to the majority class (2 of 5 seeds with the [CLS] pooler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

Job = dict[str, Any]
"""method, method_over (method config), train_over (TrainConfig), max_length, seed."""

SCREEN_SEEDS = (42, 7)
FINAL_SEEDS = (1, 2, 3)


def job(
    method: str, seed: int, max_length: int = 64, train: dict[str, Any] | None = None, **over: Any
) -> Job:
    return {"method": method, "method_over": over, "train_over": train or {},
            "max_length": max_length, "seed": seed}  # fmt: skip


def screen_jobs() -> list[Job]:
    jobs: list[Job] = []
    for seed in SCREEN_SEEDS:
        # Pooling x learning rate x epochs (batch 32, max_length 64, warmup 6%, linear decay).
        for pooling in ("cls", "mean"):
            for lr in (2e-5, 5e-5, 1e-4):
                for ep in (4, 8):
                    jobs.append(job("full", seed, train={"epochs": ep}, lr=lr, pooling=pooling))
            for lr in (1e-3, 2e-3, 4e-3):
                for ep in (6, 10):
                    jobs.append(job("lora", seed, train={"epochs": ep}, lr=lr, pooling=pooling))
        jobs.append(job("full", seed, train={"epochs": 4}, lr=2e-4, pooling="mean"))
        # Around a middle setting, mean pooling.
        f = {"lr": 5e-5, "pooling": "mean"}
        lo = {"lr": 2e-3, "pooling": "mean"}
        for m, over, ep in (("full", f, 6), ("lora", lo, 8)):
            jobs += [
                job(m, seed, train={"epochs": ep, "batch_size": 16}, **over),
                job(m, seed, train={"epochs": ep, "batch_size": 64}, **over),
                job(m, seed, 128, train={"epochs": ep}, **over),
                job(m, seed, train={"epochs": ep, "weight_decay": 0.01}, **over),
                job(m, seed, train={"epochs": ep, "warmup_ratio": 0.1, "scheduler": "cosine"},
                    **over),
            ]  # fmt: skip
        lt = {"epochs": 8}
        jobs += [
            job("lora", seed, train=lt, lr=2e-3, pooling="mean", r=8, alpha=16),
            job("lora", seed, train=lt, lr=2e-3, pooling="mean", r=32, alpha=64),
            job("lora", seed, train=lt, lr=1e-3, pooling="mean", r=64, alpha=128),
            job("lora", seed, train=lt, lr=2e-3, pooling="mean", dropout=0.0),
            job("lora", seed, train=lt, lr=3e-3, pooling="mean", r=8, alpha=16, target_modules=[]),
            job("lora", seed, train=lt, lr=2e-3, pooling="cls", modules_to_save=["pooler"]),
        ]
    return jobs


def extra_jobs(results: list[dict[str, Any]]) -> list[Job]:
    """Around the best mean-pooling screen configuration of each method: learning rate
    x0.5/x2, epochs -2/+4, max_length 128 with batch 16; seeds 42 and 7."""
    jobs: list[Job] = []
    for method in ("full", "lora"):
        ranked = [
            c for c in rank(results, method) if c["job"]["method_over"].get("pooling") == "mean"
        ]
        if not ranked:
            continue
        best = ranked[0]["job"]
        lr = best["method_over"]["lr"]
        ep = best["train_over"].get("epochs", 3)
        variants = [
            ({**best["method_over"], "lr": lr / 2}, best["train_over"], best["max_length"]),
            ({**best["method_over"], "lr": lr * 2}, best["train_over"], best["max_length"]),
            (best["method_over"], {**best["train_over"], "epochs": max(2, ep - 2)},
             best["max_length"]),
            (best["method_over"], {**best["train_over"], "epochs": ep + 4}, best["max_length"]),
            (best["method_over"], {**best["train_over"], "batch_size": 16}, 128),
        ]  # fmt: skip
        for seed in SCREEN_SEEDS:
            for mo, to, ml in variants:
                jobs.append({"method": method, "method_over": dict(mo), "train_over": dict(to),
                             "max_length": ml, "seed": seed})  # fmt: skip
    return jobs


def confirm_jobs() -> list[Job]:
    jobs = [job("full", 7, train={"epochs": 4}, lr=5e-5, pooling="cls")]
    for seed in FINAL_SEEDS:
        jobs += [
            job("full", seed, train={"epochs": 4}, lr=5e-5, pooling="cls"),  # HPARAMS before
            job("lora", seed, train={"epochs": 6}, lr=2e-3, pooling="cls"),  # HPARAMS before
            job("lora", seed, train={"epochs": 6}, lr=1e-3, pooling="cls"),
            job("lora", seed, train={"epochs": 8}, lr=2e-3, pooling="mean"),
            job("full", seed, train={"epochs": 4, "batch_size": 16}, lr=5e-5, pooling="mean"),
        ]
    return jobs


def config_key(j: Job) -> str:
    """The configuration without its seed."""
    return json.dumps({k: j[k] for k in ("method", "method_over", "train_over", "max_length")},
                      sort_keys=True)  # fmt: skip


def rank(results: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """Configurations of `method`, best mean validation accuracy first."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r["job"]["method"] == method and "val_accuracy" in r:
            groups[config_key(r["job"])].append(r)
    out = []
    for rs in groups.values():
        val = [r["val_accuracy"] for r in rs]
        test = [r["test_accuracy"] for r in rs]
        out.append({
            "job": rs[0]["job"], "n": len(rs), "seeds": sorted(r["job"]["seed"] for r in rs),
            "val_mean": statistics.mean(val), "val_sd": statistics.pstdev(val),
            "test_mean": statistics.mean(test), "test_sd": statistics.pstdev(test),
            "test_min": min(test), "test_max": max(test),
            "best_epoch": statistics.mean(r["best_epoch"] for r in rs),
            "seconds": statistics.mean(r["seconds"] for r in rs),
        })  # fmt: skip
    return sorted(out, key=lambda c: (-c["val_mean"], c["job"]["method_over"].get("lr", 0)))


def final_jobs(results: list[dict[str, Any]], top: int) -> list[Job]:
    jobs = []
    for method in ("full", "lora"):
        for c in rank(results, method)[:top]:
            for seed in FINAL_SEEDS:
                if seed not in c["seeds"]:
                    jobs.append({**c["job"], "seed": seed})
    return jobs


# --- one run, in a worker process ------------------------------------------------------

_SPLITS: Any = None


def _init_worker(splits_path: str, threads: int) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    global _SPLITS
    _SPLITS = load_splits(splits_path)


def load_splits(path: str) -> dict[str, Any]:
    if path:
        return json.loads(Path(path).read_text())
    from fedtune.config import DataConfig
    from fedtune.data import make_splits

    s = make_splits(DataConfig(agreement="50", split="fingpt"))
    part = lambda xs: [[e.text, e.label] for e in xs]  # noqa: E731
    return {"labels": list(s.labels), "notes": list(s.notes), "train": part(s.train),
            "validation": part(s.validation), "test": part(s.test)}  # fmt: skip


def run_job(j: Job, model: str, device: str, deadline: float, quick: bool) -> dict[str, Any]:
    if time.time() > deadline:
        return {"job": j, "skipped": "budget"}
    import dataclasses

    import torch

    from fedtune.adapted import AdaptedModel
    from fedtune.config import ModelConfig, TrainConfig, method_config
    from fedtune.evaluate import evaluate_features
    from fedtune.train import train

    t0 = time.perf_counter()
    labels = tuple(_SPLITS["labels"])
    index = {label: i for i, label in enumerate(labels)}
    mcfg = method_config(j["method"], j["method_over"])
    model_cfg = ModelConfig(name=model, max_length=j["max_length"])
    adapted = AdaptedModel.build(model_cfg, mcfg, labels, seed=j["seed"])
    enc = adapted.formulation.encode

    def feats(part: str, limit: int = 0) -> list[Any]:
        rows = _SPLITS[part][:limit] if limit else _SPLITS[part]
        return enc([t for t, _ in rows], [index[y] for _, y in rows])

    train_f = feats("train", 96 if quick else 0)
    val_f, test_f = feats("validation", 64 if quick else 0), feats("test", 64 if quick else 0)
    tcfg = dataclasses.replace(
        TrainConfig(), device=device, progress=False, **{"epochs": 3.0, **j["train_over"]}
    )
    if quick:
        tcfg = dataclasses.replace(tcfg, epochs=1)
    result = train(adapted, train_f, val_f, tcfg, mcfg.lr, j["seed"])
    val = evaluate_features(adapted, val_f, tcfg.eval_batch_size)
    test = evaluate_features(adapted, test_f, tcfg.eval_batch_size)
    best = next(h for h in result.history if h["step"] == result.best_step)
    out = {
        "job": j,
        "val_accuracy": val.accuracy, "val_loss": val.loss, "val_macro_f1": val.macro_f1,
        "test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1,
        "test_weighted_f1": test.weighted_f1,
        "best_epoch": best["epoch"], "max_val_accuracy": max(h["val_accuracy"]
                                                              for h in result.history),
        "val_curve": [round(h["val_accuracy"], 4) for h in result.history],
        "val_loss_curve": [round(h["val_loss"], 4) for h in result.history],
        "trainable_parameters": adapted.trainable_parameters(),
        "seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and
        device != "cpu" else "cpu", "pid": os.getpid(),
    }  # fmt: skip
    del adapted
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# --- tables ------------------------------------------------------------------------------


def describe(j: Job) -> str:
    mo = {k: v for k, v in j["method_over"].items()}
    parts = [f"{k}={v}" for k, v in sorted(mo.items())]
    parts += [f"{k}={v}" for k, v in sorted(j["train_over"].items())]
    if j["max_length"] != 64:
        parts.append(f"max_length={j['max_length']}")
    return " ".join(parts)


def report(results: list[dict[str, Any]], limit: int = 0) -> str:
    lines = []
    for method in ("full", "lora"):
        ranked = rank(results, method)
        if not ranked:
            continue
        lines += [
            f"\n**{method}** ({len(ranked)} configurations, best mean validation accuracy "
            "first; test = the same runs' test accuracy)\n",
            "| config | seeds | val acc mean (sd) | test acc mean (sd) [min-max] "
            "| best epoch | s/run |",
            "|:---|---:|---:|---:|---:|---:|",
        ]
        for c in ranked[: limit or None]:
            lines.append(
                f"| {describe(c['job'])} | {len(c['seeds'])} | {c['val_mean']:.4f} "
                f"({c['val_sd']:.4f}) | {c['test_mean']:.4f} ({c['test_sd']:.4f}) "
                f"[{c['test_min']:.4f}-{c['test_max']:.4f}] | {c['best_epoch']:.1f} "
                f"| {c['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", choices=["screen", "final", "extra", "confirm"], default="screen")
    p.add_argument("--out", type=Path, default=Path("runs/fingpt-sweep"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--model", default="minilm", help="model name or directory")
    p.add_argument("--splits", default="", help="JSON written by --export-splits")
    p.add_argument("--export-splits", type=Path, default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--budget-s", type=float, default=0,
                   help="start no job after this many seconds (0 = no limit)")  # fmt: skip
    p.add_argument("--top", type=int, default=3, help="final: configurations per method")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, 2 jobs")
    p.add_argument("--report", type=Path, default=None, help="print the tables of a results file")
    args = p.parse_args(argv)

    if args.report:
        print(report(read_results(args.report)))
        return
    if args.export_splits:
        args.export_splits.write_text(json.dumps(load_splits("")))
        print(f"wrote {args.export_splits}")
        return
    if args.model == "minilm":
        from fedtune.models import resolve_model_name

        args.model = resolve_model_name("minilm")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    done = read_results(results_path)
    if args.stage == "screen":
        jobs = screen_jobs()
    elif args.stage == "final":
        jobs = final_jobs(done, args.top)
    elif args.stage == "extra":
        jobs = extra_jobs(done)
    else:
        jobs = confirm_jobs()
    finished = {(config_key(r["job"]), r["job"]["seed"]) for r in done if "val_accuracy" in r}
    jobs = [j for j in jobs if (config_key(j), j["seed"]) not in finished]
    if args.quick:
        jobs = jobs[:2]
    # Longest first (epochs x 1/batch), so the last jobs to finish are short ones.
    jobs.sort(key=lambda j: -j["train_over"].get("epochs", 3) / j["train_over"].get(
        "batch_size", 32))  # fmt: skip
    print(f"{args.stage}: {len(jobs)} jobs, {args.workers} workers, device {args.device}",
          flush=True)  # fmt: skip
    start = time.time()
    deadline = start + args.budget_s if args.budget_s else float("inf")
    ctx = get_context("spawn")  # CUDA needs fresh processes
    with (
        ProcessPoolExecutor(
            args.workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(args.splits, args.threads),
        ) as pool,  # fmt: skip
        results_path.open("a") as f,
    ):
        futures = [pool.submit(run_job, j, args.model, args.device, deadline, args.quick)
                   for j in jobs]  # fmt: skip
        for n, fut in enumerate(as_completed(futures), 1):
            try:
                r = fut.result()
            except Exception as e:  # one failed configuration must not end the sweep
                print(f"job failed: {e!r}", flush=True)
                continue
            if "skipped" in r:
                continue
            r["stage"] = args.stage
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"[{n}/{len(jobs)} {time.time() - start:5.0f}s] {r['job']['method']:4} "
                  f"seed {r['job']['seed']:2} {describe(r['job']):60} val {r['val_accuracy']:.4f} "
                  f"test {r['test_accuracy']:.4f} ep {r['best_epoch']:.1f} "
                  f"({r['seconds']:.0f}s)", flush=True)  # fmt: skip
    results = read_results(results_path)
    table = report(results)
    (args.out / "summary.md").write_text(table)
    print(table)
    print(f"{len(results)} results in {results_path}; {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
