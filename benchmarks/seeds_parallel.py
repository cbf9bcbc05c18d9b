"""`fedtune compare --seeds` with its runs in parallel processes, under a wall-clock
budget: for a GPU that one small model leaves mostly idle, or a machine with cores to
spare.

    python benchmarks/seeds_parallel.py CONFIG --methods ptuning,prompt --seeds 1,2,3 \
        --jobs 12 --budget 480 --out DIR [--set key=value ...]

`fedtune compare --seeds` runs every (method, regime, seed) one after the other in one
process. A 135M decoder trained at batch 8 is launch-bound on a GPU (tens of
milliseconds a step with the chip nearly idle), so one process uses a small share of
it. Here each (method, seed, regime) is its own `fedtune compare --regimes R --set
seed=S` process with one CPU thread, `--jobs` of them at a time, started in the order
methods x seeds x regimes (so the first method's seeds finish first). When `--budget`
seconds have passed, runs still going are stopped (SIGTERM, then SIGKILL) and listed
as stopped; a stopped federated run keeps its per-round validation curve in its
`metrics.jsonl`. The finished runs are merged as `fedtune merge` merges comparisons
(`fedtune.federated.merge`): with several seeds a report per seed in `seed-<s>/`, with
the source post's two figures and the paired findings (one seed: that report in DIR),
and the report over seeds (mean ± sd per method,
regime and site, the paired gaps federated − centralized and federated − best local
site, `seeds.png`).

A catalog name or `.gguf` file given as `model.name` is resolved (dequantized and
cached) once here, before the jobs start, so they do not race to build the cache.
Nothing here is specific to a GPU: on a CPU, give each job a core (`--jobs` = cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REGIME_ORDER = ("federated", "centralized", "local")


def _jobs(methods: list[str], seeds: list[int], regimes: list[str]) -> list[tuple[str, int, str]]:
    return [(m, s, r) for m in methods for s in seeds for r in regimes]


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every job's process group at once; SIGKILL to those still there
    after 20 s."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    end = time.perf_counter() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, end - time.perf_counter()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--methods", required=True)
    ap.add_argument("--seeds", required=True, help="comma-separated, e.g. 1,2,3")
    ap.add_argument("--regimes", default=",".join(REGIME_ORDER))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--budget", type=float, default=0.0, help="seconds (0 = no limit)")
    ap.add_argument("--out", required=True, help="a new folder for the runs and the report")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from fedtune.config import load_config
    from fedtune.errors import ConfigError
    from fedtune.federated.merge import write_merged
    from fedtune.models import resolve_model_name

    out = Path(args.out)
    if out.exists():
        sys.exit(f"--out {out} already exists; give a new folder")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    cfg = load_config(Path(args.config), args.sets)  # fails here on a bad key, not in 12 jobs
    t0 = time.perf_counter()
    model = resolve_model_name(cfg.model.name)
    print(f"model {cfg.model.name} -> {model} ({time.perf_counter() - t0:.1f} s)", flush=True)
    sets = [*args.sets, f"model.name={model}", "train.threads=1", "train.progress=false"]
    runs = out / "runs"
    runs.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    pending = _jobs(methods, seeds, regimes)
    running: dict[tuple[str, int, str], tuple[subprocess.Popen[bytes], float]] = {}
    status: dict[tuple[str, int, str], dict[str, object]] = {}
    start = time.perf_counter()
    deadline = start + args.budget if args.budget > 0 else float("inf")
    while pending or running:
        while pending and len(running) < args.jobs and time.perf_counter() < deadline:
            job = pending.pop(0)
            m, s, r = job
            name = f"s{s}-{m}-{r}"
            cmd = [sys.executable, "-c", "from fedtune.cli import main; main()", "compare",
                   args.config, "--methods", m, "--regimes", r,
                   *[x for kv in [*sets, f"seed={s}", f"output_dir={runs}", f"name={name}"]
                     for x in ("--set", kv)]]  # fmt: skip
            with (out / f"{name}.log").open("wb") as log:  # the job holds its own copy
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # fmt: skip
            running[job] = (proc, time.perf_counter())
            print(f"[{time.perf_counter() - start:6.0f} s] start {name}", flush=True)
        time.sleep(2)
        late = time.perf_counter() >= deadline
        stopped = {job for job, (proc, _) in running.items() if late and proc.poll() is None}
        _stop_all([running[job][0] for job in stopped])
        for job, (proc, t_start) in list(running.items()):
            rc = None if job in stopped else proc.poll()
            if rc is None and job not in stopped:
                continue
            wall = time.perf_counter() - t_start
            state = "finished" if rc == 0 else ("stopped at the budget" if rc is None
                                                 else f"failed (exit {rc})")  # fmt: skip
            status[job] = {"state": state, "wall_s": round(wall, 1)}
            del running[job]
            print(f"[{time.perf_counter() - start:6.0f} s] {state}: s{job[1]}-{job[0]}-{job[2]}"
                  f" ({wall:.0f} s)", flush=True)
        if time.perf_counter() >= deadline:
            for job in pending:
                status[job] = {"state": "not started (budget)", "wall_s": 0.0}
            pending = []

    done = [runs / f"s{s}-{m}-{r}" for (m, s, r), st in status.items() if st["state"] == "finished"]
    finished = [d for d in done if (d / "comparison.json").is_file()]
    total = time.perf_counter() - start
    lines = [f"{len(status)} jobs, {args.jobs} at a time, {total:.0f} s wall", "",
             "| seed | method | regime | state | wall s |", "|---|---|---|---|---|"]  # fmt: skip
    for (m, s, r), st in sorted(status.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        lines.append(f"| {s} | {m} | {r} | {st['state']} | {st['wall_s']} |")
    (out / "jobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    if finished:  # one report per seed (the post's two figures) and one over the seeds
        try:
            print(write_merged(finished, out).read_text(), flush=True)
        except ConfigError as e:  # e.g. only regimes that a method has no form of
            sys.exit(f"the finished runs could not be merged into a report: {e}")


if __name__ == "__main__":
    main()
