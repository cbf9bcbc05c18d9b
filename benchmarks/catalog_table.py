"""Quality and cost of the four catalog models on one task: the FinGPT split of FPB
(50% agreement; 3,265 train / 363 validation / 1,212 test), LoRA on each, trained
centrally with `fedtune train` in a fresh process per model.

    python benchmarks/catalog_table.py --out /work/bench/catalog          # all four
    python benchmarks/catalog_table.py --out DIR smollm2 --epochs 1       # some of them

Encoders classify with a new head; decoders classify generatively (the template
"Sentence: {text}\\nSentiment:" and the label word scored by the LM head, no new
head). Per model: validation and test accuracy, macro/weighted F1, trainable
parameters, the bytes a site sends per federated round (the trainable state in fp32,
measured by serialising it as the Flower wire does), training samples/s, training and
wall time (wall: the whole `fedtune train`, first-use GGUF conversion included) and the
process's peak RSS (wait4).
Runs that already finished in --out are read back instead of run again, so the
table can be built up over several sessions. Prints a Markdown table for
docs/benchmarks.md, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# One recipe for all four: LoRA r 16 on all linear layers, lr 5e-4, max length 64,
# batch 32, bf16 autocast where the CPU computes bf16 natively (AVX512-BF16 or AMX;
# emulated, a SmolLM2 step ran 15x slower than fp32: benchmarks/bf16_step.py). The
# decoders' sequences are longer by the template.
RECIPE = ["--method", "lora", "--agreement", "50", "--split", "fingpt",
          "--lr", "5e-4", "--max-length", "64"]  # fmt: skip

WIRE = """
import json, sys
from fedtune.adapted import AdaptedModel
from fedtune.federated.wire import encode_state, payload_bytes
adapted = AdaptedModel.load(sys.argv[1], trainable=True)
print(json.dumps({"bytes": payload_bytes(encode_state(adapted.trainable_state()))}))
"""


def train(name: str, out: Path, epochs: float, limit: int, extra: list[str]) -> dict:
    """Run `fedtune train` for one model (unless its run is already there) and return
    its test metrics with wall seconds and peak RSS."""
    run_dir = out / (f"{name}-lora-{epochs:g}ep" + (f"-limit{limit}" if limit else ""))
    done = run_dir / "bench.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if "train_seconds" not in result:  # written before these two columns
            test, val = run_events(run_dir)
            result |= {"train_seconds": test["train_seconds"], "val_accuracy": val["val_accuracy"]}
        return result
    from fedtune.train import cpu_has_bf16

    bf16 = ["--bf16"] if cpu_has_bf16() else []
    cmd = ["fedtune", "train", "--model", name, *RECIPE, *bf16, "--epochs", str(epochs),
           "--name", run_dir.name, "--output-dir", str(out), *extra]  # fmt: skip
    if limit:
        cmd += ["--limit", str(limit)]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: `fedtune train` failed; see the output above")
    test, val = run_events(run_dir)
    result = {
        "model": name,
        "kind": test["kind"],
        "epochs": epochs,
        "n_train": test["n_train"],
        "accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "weighted_f1": test["weighted_f1"],
        "trainable": test["trainable_parameters"],
        "base": test["base_parameters"],
        "samples_per_second": test["samples_per_second"],
        "train_seconds": test["train_seconds"],
        "val_accuracy": val["val_accuracy"],
        "wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "command": " ".join(cmd),
    }
    result["bytes_per_round"] = wire_bytes(run_dir)
    done.write_text(json.dumps(result, indent=2))
    return result


def run_events(run_dir: Path) -> tuple[dict, dict]:
    """The run's test event and its last validation event (metrics.jsonl)."""
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = next(e for e in reversed(events) if e.get("event") == "test")
    val = next(e for e in reversed(events) if "val_accuracy" in e)
    return test, val


def wire_bytes(run_dir: Path) -> int:
    """The trainable state of the saved run as a site would send it, in bytes."""
    out = subprocess.run([sys.executable, "-c", WIRE, str(run_dir / "model")], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["minilm", "mpnet", "smollm2", "gemma3"])
    parser.add_argument("--out", type=Path, required=True, help="parent of the run folders")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--limit", type=int, default=0, help="at most this many training examples")
    parser.add_argument("--set", action="append", default=[], help="passed to fedtune train")
    args = parser.parse_args()
    extra = [x for s in args.set for x in ("--set", s)]
    rows = [train(m, args.out, args.epochs, args.limit, extra) for m in args.models]
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")  # fmt: skip
    print()
    print("| model | kind | train examples x epochs | val acc | test acc | macro-F1 | "
          "weighted F1 | trainable | bytes/site/round | samples/s | training | wall | "
          "peak RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = 100 * r["trainable"] / r["base"]
        print(f"| {r['model']} | {r['kind']} | {r['n_train']} x {r['epochs']:g} | "
              f"{r['val_accuracy']:.4f} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
              f"{r['weighted_f1']:.4f} | "
              f"{r['trainable'] / 1e6:.2f}M ({share:.2f}%) | "
              f"{r['bytes_per_round'] / 2**20:.1f} MiB | {r['samples_per_second']:.1f} | "
              f"{r['train_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min | "
              f"{r['peak_rss_mb'] / 1024:.1f} GB |")  # fmt: skip


if __name__ == "__main__":
    main()
