"""Per-round wall time on Flower's Deployment Engine vs the in-process federation.

    python benchmarks/deployment.py [--rounds 5] [--steps 4] [--modes inprocess,warm,cold]

examples/federated.toml (MiniLM + LoRA, FPB all-agree from FEDTUNE_DATA_DIR, 3
sites of 600, shared validation set evaluated by the server after every round) with
`--steps` local optimizer steps of batch 16 per site per round. It runs:

- `inprocess`: `fedtune federate` (sites one after another in this process);
- `warm`: a SuperLink and three SuperNodes on loopback with TLS and node
  authentication (`fedtune.deploy.LocalFederation`), each site with its long-lived
  worker keeping the base model loaded (the default);
- `cold`: the same without workers: Flower's fresh ClientApp process per message
  imports fedtune and loads the base model every round.

Reported per mode: round 1 (first load) and the median of rounds 2..N, the sites'
own training time (the slowest site per round, as the round waits for it), and the
overhead = round - slowest site's training. Each site process gets one thread
(OMP_NUM_THREADS=1): three sites share two cores. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "federated.toml"


def _overrides(rounds: int, steps: int) -> list[str]:
    return [f"federated.rounds={rounds}", f"federated.local_steps={steps}",
            "train.batch_size=16", "train.progress=false"]  # fmt: skip


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "round"]


def _summary(mode: str, rounds: list[dict[str, Any]], extra: str = "") -> dict[str, Any]:
    wall = [r["seconds"] for r in rounds]
    slowest = [max(r["site_train_seconds"].values()) for r in rounds]
    total_train = [sum(r["site_train_seconds"].values()) for r in rounds]
    later = slice(1, None) if len(rounds) > 1 else slice(0, None)
    return {
        "mode": mode,
        "round1": wall[0],
        "median": statistics.median(wall[later]),
        "slowest_site_train": statistics.median(slowest[later]),
        "all_sites_train": statistics.median(total_train[later]),
        "overhead": statistics.median([w - s for w, s in zip(wall, slowest, strict=True)][later]),
        "note": extra,
    }


def run_inprocess(overrides: list[str], out: Path) -> dict[str, Any]:
    from fedtune.config import load_config
    from fedtune.federated.runner import run_federated

    cfg = load_config(str(CONFIG), [*overrides, f"output_dir={out}", "name=inprocess"])
    run_federated(cfg)
    rounds = _rounds(out / "inprocess")
    s = _summary("in process (sites one after another)", rounds)
    # Sites run one after another here: the round waits for all of them.
    s["overhead"] = statistics.median(
        [r["seconds"] - sum(r["site_train_seconds"].values()) for r in rounds][1:]
    )
    return s


def run_deployed(overrides: list[str], out: Path, warm: bool) -> dict[str, Any]:
    from fedtune.certs import make_certs
    from fedtune.deploy import LocalFederation, fedtune_run_config, find_app_dir, stage_app

    name = "warm" if warm else "cold"
    root = out / name
    sites = ["org-a", "org-b", "org-c"]
    certs = make_certs(root / "certs", sites)
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}  # fmt: skip
    app = stage_app(find_app_dir(), root / "app")
    # fedtune before 0.1.0's site workers has no `warm`: this script measures it too
    # (PYTHONPATH=<old checkout>/src python benchmarks/deployment.py --modes cold).
    kw = {"warm": warm} if "warm" in LocalFederation.__dataclass_fields__ else {}
    with LocalFederation(root / "fed", sites, certs, env=env, task_poll_interval=0.1,
                         start_timeout=300, **kw) as fed:  # type: ignore[arg-type]  # fmt: skip
        t0 = time.perf_counter()
        run = fed.submit(app, fedtune_run_config(CONFIG, root / "run", overrides), timeout=3000)
        seconds = time.perf_counter() - t0
        startup = fed.startup_seconds
    label = ("deployed, warm workers (default)" if warm
             else "deployed, a fresh ClientApp process per message")  # fmt: skip
    return _summary(label, _rounds(root / "run"),
                    f"federation start {startup:.0f} s; run {seconds:.0f} s ({run.status})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", default="inprocess,warm,cold")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = _overrides(args.rounds, args.steps)
        for mode in args.modes.split(","):
            if mode == "inprocess":
                rows.append(run_inprocess(cfg, out))
            elif mode in ("warm", "cold"):
                rows.append(run_deployed(cfg, out, warm=mode == "warm"))
            else:
                raise SystemExit(f"unknown mode {mode!r}: inprocess, warm, cold")
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.rounds} rounds, {args.steps} local steps of batch 16 per site per round, "
          "3 sites; seconds; medians over rounds 2..N\n")  # fmt: skip
    print("| mode | round 1 | round (median) | slowest site's training | overhead per round "
          "| notes |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['round1']:.1f} | {r['median']:.2f} | "
              f"{r['slowest_site_train']:.2f} | {r['overhead']:.2f} | {r['note']} |")  # fmt: skip


if __name__ == "__main__":
    main()
