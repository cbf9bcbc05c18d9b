"""Per-round wall time on Flower's Deployment Engine vs the in-process federation.

    python benchmarks/deployment.py [--rounds 5] [--steps 4] [--sites 3]
        [--modes inprocess,warm,cold,idle-warm,idle-cold] [--keep DIR]

examples/federated.toml (MiniLM + LoRA, FPB all-agree from FEDTUNE_DATA_DIR, `--sites`
sites of 600, shared validation set evaluated by the server after every round) with
`--steps` local optimizer steps of batch 16 per site per round. Modes:

- `inprocess`: `fedtune federate` (sites one after another in this process);
- `warm`: a SuperLink and one SuperNode per site on loopback with TLS and node
  authentication (`fedtune.deploy.LocalFederation`), each site one long-lived
  process running its ClientApp with the base model loaded (the default);
- `cold`: Flower's plain SuperNode: a fresh ClientApp process per message imports
  fedtune and loads the base model every round;
- `idle-warm` / `idle-cold`: CPU the started federation uses while no run is going
  (its polling), % of one core over 20 s.

Reported per mode: round 1 (first load) and the median of rounds 2..N of the round,
the slowest site's own training, the server's validation of the global model, the
overhead = round - slowest site's training, and the per-site overhead = the time
from the server starting to push a round's message until that site's reply came,
minus the site's training (in process: the exchange beyond all sites' training,
per site). Each process gets one thread (OMP_NUM_THREADS=1): more than two sites
share two cores. Prints a Markdown table; `--keep` keeps the runs and logs.
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


def _overrides(rounds: int, steps: int, sites: int) -> list[str]:
    return [f"federated.rounds={rounds}", f"federated.local_steps={steps}",
            f"federated.sites={sites}", "federated.sizes=" + ",".join(["600"] * sites),
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
        "site_overhead": statistics.median(v for r in rounds[later] for v in _site_overheads(r)),
        "validate": statistics.median(r["timing"]["validate"] for r in rounds[later]),
        "note": extra,
    }


def _site_overheads(r: dict[str, Any]) -> list[float]:
    """Seconds each site's part of a round took beyond its local training: from the
    start of the push to its reply, minus its training (sites in parallel); in
    process (sites one after another), the exchange beyond all training, per site."""
    train = list(r["site_train_seconds"].values())
    if "inprocess" in r.get("_mode", ""):
        return [(r["timing"]["exchange"] - sum(train)) / len(train)]
    came = r["timing"]["replies"]
    return [came[site] - t for site, t in r["site_train_seconds"].items() if site in came]


def run_inprocess(overrides: list[str], out: Path) -> dict[str, Any]:
    from fedtune.config import load_config
    from fedtune.federated.runner import run_federated

    cfg = load_config(str(CONFIG), [*overrides, f"output_dir={out}", "name=inprocess"])
    run_federated(cfg)
    rounds = [{**r, "_mode": "inprocess"} for r in _rounds(out / "inprocess")]
    s = _summary("in process (sites one after another)", rounds)
    # Sites run one after another here: the round waits for all of them.
    s["overhead"] = statistics.median(
        [r["seconds"] - sum(r["site_train_seconds"].values()) for r in rounds][1:]
    )
    return s


def run_deployed(overrides: list[str], out: Path, warm: bool, n_sites: int) -> dict[str, Any]:
    from fedtune.certs import make_certs
    from fedtune.deploy import LocalFederation, fedtune_run_config, find_app_dir, stage_app

    name = "warm" if warm else "cold"
    root = out / name
    sites = [f"org-{chr(ord('a') + i)}" for i in range(n_sites)]
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


def run_idle(out: Path, warm: bool, n_sites: int, seconds: float = 20.0) -> dict[str, Any]:
    """CPU an idle federation uses (SuperLink + sites polling), % of one core."""
    import psutil

    from fedtune.certs import make_certs
    from fedtune.deploy import LocalFederation

    root = out / ("idle-warm" if warm else "idle-cold")
    sites = [f"org-{chr(ord('a') + i)}" for i in range(n_sites)]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with LocalFederation(root / "fed", sites, make_certs(root / "certs", sites), env=env,
                         task_poll_interval=0.1, start_timeout=300, warm=warm) as fed:  # fmt: skip
        time.sleep(5)
        me = psutil.Process()

        def cpu() -> dict[int, float]:
            times = {}
            for p in me.children(recursive=True):
                try:
                    t = p.cpu_times()
                    times[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            return times

        a = cpu()
        time.sleep(seconds)
        b = cpu()
        del fed
    used = sum(t - a.get(pid, 0.0) for pid, t in b.items()) / seconds * 100
    label = "warm (default)" if warm else "cold"
    return {"mode": f"idle federation, {label}", "cpu_percent_of_one_core": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", default="inprocess,warm,cold")
    parser.add_argument("--sites", type=int, default=3, help="sites of 600 sentences")
    parser.add_argument("--keep", type=Path, help="keep runs and logs in this folder "
                        "(default: a temporary one, removed)")  # fmt: skip
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep.resolve() if args.keep else Path(tmp)
        cfg = _overrides(args.rounds, args.steps, args.sites)
        for mode in args.modes.split(","):
            if mode == "inprocess":
                rows.append(run_inprocess(cfg, out))
            elif mode in ("warm", "cold"):
                rows.append(run_deployed(cfg, out, warm=mode == "warm", n_sites=args.sites))
            elif mode in ("idle-warm", "idle-cold"):
                print(json.dumps(run_idle(out, mode == "idle-warm", args.sites)), flush=True)
                continue
            else:
                raise SystemExit(f"unknown mode {mode!r}: inprocess, warm, cold, idle-warm, "
                                 "idle-cold")
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.rounds} rounds, {args.steps} local steps of batch 16 per site per round, "
          f"{args.sites} sites; seconds; medians over rounds 2..N\n")  # fmt: skip
    print("| mode | round 1 | round (median) | slowest site's training | server validation "
          "| overhead per round | per site | notes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['round1']:.1f} | {r['median']:.2f} | "
              f"{r['slowest_site_train']:.2f} | {r['validate']:.2f} | {r['overhead']:.2f} | "
              f"{r['site_overhead']:.2f} | {r['note']} |")  # fmt: skip


if __name__ == "__main__":
    main()
