"""Federated benchmarks on MiniLM (FPB all-agree).

    python benchmarks/federated.py memory     # peak RSS: 10 simulated sites vs 1 site, LoRA
    python benchmarks/federated.py overhead   # in-process federation vs the same steps in a
                                              # plain PyTorch loop and in fedtune's own loop
    python benchmarks/federated.py transport  # fp32 vs fp16 vs bf16 updates: accuracy, bytes
    python benchmarks/federated.py fingpt     # FinGPT split, 3 sites, IID and Dirichlet(0.5)
    python benchmarks/federated.py protocol   # the source protocol: 3 x 600, shared
                                              # validation, ptuning and lora, all regimes
    python benchmarks/federated.py lean [r4-bf16 r2-fp32]  # the protocol for LoRA
                                              # variants under 0.5% of the model per round
    python benchmarks/federated.py averaging [METHOD]  # the demo's split, one round:
                                              # each site's model vs their average, with
                                              # one schedule over all rounds vs one per round

Each measurement of `memory` runs in its own process (peak RSS is per process);
results are printed as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time

MEMORY_SITES = (1, 10)


def _one_memory_run(sites: int, out: str) -> None:
    from fedtune.config import load_config
    from fedtune.federated.runner import run_federated

    # Same total data and steps for both: 600 training examples split over `sites`.
    cfg = load_config(None, [
        "method.name=lora", "train.progress=false", f"output_dir={out}", f"name=m{sites}",
        "data.limit=600", "federated.partition=iid", f"federated.sites={sites}",
        "federated.rounds=1", "federated.local_steps=2", "train.batch_size=16",
    ])  # fmt: skip
    t = time.perf_counter()
    run_federated(cfg)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"sites": sites, "peak_rss_mb": rss_mb, "seconds": time.perf_counter() - t}))


def memory() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for sites in MEMORY_SITES:
            res = subprocess.run(
                [sys.executable, __file__, "_memory", str(sites), out],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print("| simulated sites | peak RSS (MB) | ratio to 1 site |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['sites']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.3f} |")


def overhead() -> None:
    """Framework overhead: the rounds of an in-process federation (3 sites x 600, LoRA,
    2 rounds x 1 local epoch, no validation: only training and the federation) vs the
    same number of optimizer steps run by a plain PyTorch loop and by fedtune's own
    loop on the pooled data, one after another in this process."""
    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from centralized import plain_loop  # the reference loop of the centralized benchmark

    from fedtune.adapted import AdaptedModel
    from fedtune.config import TrainConfig, load_config
    from fedtune.federated.runner import run_federated
    from fedtune.train import train

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("examples/federated.toml", [
            f"output_dir={out}", "name=o", "data.val_size=0", "federated.rounds=2",
            "train.progress=false",
        ])  # fmt: skip
        summary = run_federated(cfg)
    rounds = [h for h in summary["history"] if h["round"] > 0]
    fed_wall = sum(h["seconds"] for h in rounds)
    site_train = sum(sum(h["site_train_seconds"].values()) for h in rounds)
    steps = 2 * 3 * 19  # rounds x sites x ceil(600 / 32)
    from fedtune.data import make_splits
    from fedtune.federated.partition import partition_examples

    splits = make_splits(cfg.data)
    pooled = partition_examples(splits.train, splits.labels, cfg.federated, cfg.seed).pooled_train
    texts = [e.text for e in pooled]
    labels = [splits.labels.index(e.label) for e in pooled]
    model = AdaptedModel.build(cfg.model, cfg.method, splits.labels, seed=cfg.seed)
    _, plain_wall = plain_loop(model, texts, labels, steps, cfg.method.lr)
    model = AdaptedModel.build(cfg.model, cfg.method, splits.labels, seed=cfg.seed)
    feats = model.formulation.encode(texts, labels)
    t0 = time.perf_counter()
    train(model, feats, None, TrainConfig(max_steps=steps, progress=False), cfg.method.lr, 42)
    own_wall = time.perf_counter() - t0
    print("| what | optimizer steps | wall (s) | federation / this |")
    print("|---|---|---|---|")
    print(
        f"| in-process federation, 2 rounds x 3 sites (all of it) | {steps} | {fed_wall:.1f} | 1 |"
    )
    print(f"| of which site training inside fedtune's loop | {steps} | {site_train:.1f} "
          f"| {fed_wall / site_train:.3f} |")  # fmt: skip
    print(f"| plain PyTorch loop, pooled data | {steps} | {plain_wall:.1f} "
          f"| {fed_wall / plain_wall:.3f} |")  # fmt: skip
    print(f"| fedtune's loop, pooled data | {steps} | {own_wall:.1f} "
          f"| {fed_wall / own_wall:.3f} |")  # fmt: skip


def transport() -> None:
    """Accuracy and bytes of fp32, fp16 and bf16 updates (3 x 600, LoRA, 3 rounds)."""
    from fedtune.config import load_config
    from fedtune.federated.runner import run_federated

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for t in ("fp32", "fp16", "bf16"):
            cfg = load_config("examples/federated.toml", [
                f"output_dir={out}", f"name={t}", "federated.rounds=3", f"federated.transport={t}",
                "train.progress=false", "train.bf16=true",
            ])  # fmt: skip
            s = run_federated(cfg)
            rows.append((t, s))
    print("| transport | test accuracy | macro-F1 | up bytes/site/round | payload/site/round |")
    print("|---|---|---|---|---|")
    for t, s in rows:
        up, payload = s["bytes_up_per_site_round"], s["payload_up_per_site_round"]
        print(f"| {t} | {s['accuracy']:.4f} | {s['macro_f1']:.4f} | {up:,.0f} | {payload:,.0f} |")


def fingpt() -> None:
    """The FinGPT split (1,212 test sentences), 3 sites, IID and Dirichlet(0.5), LoRA:
    centralized, local-only per site, federated (same budget)."""
    from fedtune.config import load_config
    from fedtune.federated.compare import run_regimes

    for part in (["federated.partition=iid"],
                 ["federated.partition=dirichlet", "federated.alpha=0.5"]):  # fmt: skip
        cfg = load_config(None, [
            "data.agreement=50", "data.split=fingpt", "method.name=lora",
            "federated.rounds=4", "federated.local_epochs=1", "train.bf16=true",
            "train.progress=false", "output_dir=runs/benchmarks",
            f"name=fingpt-{part[0].split('=')[1]}-{time.strftime('%H%M%S')}", *part,
        ])  # fmt: skip
        run_regimes(cfg, ["lora"])


def protocol() -> None:
    from fedtune.config import load_config
    from fedtune.federated.compare import run_regimes

    # Up to 12 rounds (epochs); every regime stops after 3 evaluations without a
    # lower shared validation loss, and the report says where.
    cfg = load_config("examples/federated.toml", [
        "output_dir=runs/benchmarks", f"name=protocol-{time.strftime('%H%M%S')}",
        "federated.rounds=12", "federated.patience=3", "train.patience=3", "train.bf16=true",
        "train.progress=false",
    ])  # fmt: skip
    run_regimes(cfg, ["ptuning", "lora"])


LEAN = {
    "r4-bf16": ["method.r=4", "method.alpha=8", "federated.transport=bf16"],
    "r2-fp32": ["method.r=2", "method.alpha=4"],
}
"""LoRA on every linear layer with a small rank: the update under 0.5% of MiniLM."""


def lean(variants: list[str]) -> None:
    """The source protocol (as `protocol`, LoRA only, centralized and federated) for
    LoRA variants whose update is <= 0.5% of the full model per site per round."""
    from fedtune.config import load_config
    from fedtune.federated.compare import run_regimes

    for name in variants or list(LEAN):
        cfg = load_config("examples/federated.toml", [
            "output_dir=runs/benchmarks", f"name=lean-{name}-{time.strftime('%H%M%S')}",
            "federated.rounds=12", "federated.patience=3", "train.patience=3",
            "train.bf16=true", "train.progress=false", "method.name=lora", *LEAN[name],
        ])  # fmt: skip
        run_regimes(cfg, ["lora"], regimes=("centralized", "federated"))


def averaging(method: str = "ptuning") -> None:
    """Does FedAvg keep what the sites learnt in a round? The demo's split and recipe
    (`fedtune.demo`): the three sites train one round from the same start, exactly as
    a federated site does (`TrainSession`, batch 11 for ptuning), under the two
    `federated.site_state` schedules: `keep` (one warmup + linear decay over all the
    run's rounds, so round 1 ends at about three quarters of the peak rate) and `reset` (a fresh
    schedule per round, annealed to 0 at its end). Prints each site's shared
    validation loss, the averaged model's, the average of one part only (the rest
    site-1's), and how far and how alike the sites moved each tensor."""
    import dataclasses

    import torch

    from fedtune.adapted import AdaptedModel
    from fedtune.config import method_config
    from fedtune.data import make_splits
    from fedtune.demo import DEMO_PLAN, demo_config
    from fedtune.evaluate import evaluate_features
    from fedtune.federated.apps import local_steps, site_train_config
    from fedtune.federated.partition import partition_examples
    from fedtune.train import TrainSession, train

    plan = DEMO_PLAN[method]
    cfg = demo_config(tempfile.gettempdir(), quick=False)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False),
                              federated=dataclasses.replace(cfg.federated, **{
                                  k: v for k, v in plan.get("federated", {}).items()
                                  if k != "site_state"}))  # fmt: skip
    rounds = plan["rounds"]
    mcfg = method_config(method, plan["method"])
    splits = make_splits(cfg.data)
    sites = partition_examples(splits.train, splits.labels, cfg.federated, cfg.seed).sites
    index = {label: i for i, label in enumerate(splits.labels)}
    model = AdaptedModel.build(cfg.model, mcfg, splits.labels, seed=cfg.seed)

    def feats(examples: list) -> list[dict]:
        return model.formulation.encode([e.text for e in examples],
                                        [index[e.label] for e in examples])  # fmt: skip

    val = feats(splits.validation)

    def val_loss(state: dict[str, torch.Tensor]) -> float:
        model.load_trainable_state(state)
        return evaluate_features(model, val).loss

    start = {k: v.clone() for k, v in model.trainable_state().items()}
    tcfg = site_train_config(cfg)
    print(f"{method} on the demo's split, {len(sites)} sites, one round from the same start "
          f"(validation loss {val_loss(start):.4f}); lr {mcfg.lr:g}, site batch "
          f"{tcfg.batch_size}, {rounds} rounds planned\n")  # fmt: skip
    columns = ["schedule", *(s.name for s in sites), "average of the sites",
               "average of the head only", "average of the rest only",
               "tensors moved (x start norm)", "cosine between sites' updates"]  # fmt: skip
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for schedule in ("keep", "reset"):
        states = []
        for site in sites:
            model.load_trainable_state(start)
            fs = feats(site.train)
            steps = local_steps(cfg, len(fs))
            total = steps * (rounds if schedule == "keep" else 1)
            session = TrainSession.new(model, len(fs), tcfg, mcfg.lr, cfg.seed, total_steps=total)
            train(model, fs, None, tcfg, mcfg.lr, session=session, steps=steps)
            states.append({k: v.clone() for k, v in model.trainable_state().items()})
        avg = {k: sum(s[k] for s in states) / len(states) for k in start}
        head = [k for k in start if "modules_to_save" in k or "classifier" in k]
        mixed = [{k: (avg[k] if (k in head) == part else states[0][k]) for k in start}
                 for part in (True, False)]  # fmt: skip
        moved, cosines = [], []
        for k in start:
            ups = [(s[k] - start[k]).flatten() for s in states]
            if float(start[k].norm()) > 0:
                moved.append(float(sum(u.norm() for u in ups) / len(ups) / start[k].norm()))
            cosines += [float(torch.nn.functional.cosine_similarity(ups[i], ups[j], dim=0))
                        for i in range(len(ups)) for j in range(i + 1, len(ups))]  # fmt: skip
        losses = [val_loss(s) for s in states] + [val_loss(avg)] + [val_loss(m) for m in mixed]
        print(f"| `{schedule}` | " + " | ".join(f"{x:.4f}" for x in losses)
              + f" | {min(moved):.2f}-{max(moved):.2f} | {sum(cosines) / len(cosines):.2f} |")


if __name__ == "__main__":
    if sys.argv[1] == "_memory":
        _one_memory_run(int(sys.argv[2]), sys.argv[3])
    else:
        parts = {"memory": memory, "overhead": overhead, "transport": transport,
                 "fingpt": fingpt, "protocol": protocol}  # fmt: skip
        if sys.argv[1] == "lean":
            lean(sys.argv[2:])
        elif sys.argv[1] == "averaging":
            averaging(*sys.argv[2:3])
        else:
            parts[sys.argv[1]]()
