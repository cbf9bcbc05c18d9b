"""How much human preference a frozen decoder already encodes: a linear reward probe.

    python benchmarks/reward_probe.py --out /work/bench/probe --model smollm2 \
        --set data.limit=2560 --set data.test_size=0.05

The same pairs and split as a `reward` run of examples/hh-preference.toml with the same
overrides. The frozen base model (no adapter, no head) reads each pair's two sequences,
prompt + chosen and prompt + rejected, rendered exactly as the reward model reads them
(fedtune.preference.RewardPairs). Its hidden states at three depths (half, three
quarters, last) are pooled two ways: at the token a reward head reads (transformers'
*ForSequenceClassification: the last one that is not the pad token, so the last
response token before the end token when, as in SmolLM2, the two are one token) and
the mean over the response's tokens. A linear reward r(x) = w . x on standardised features,
fitted with the Bradley-Terry loss, is logistic regression without intercept on the
differences x_chosen - x_rejected (scikit-learn, L2 strength C). The probe (pooling,
depth, C) is chosen by 5-fold cross-validation on the training pairs and tested once on
the held-out pairs; the table shows every probe's cross-validated and test accuracy, so
the spread a choice by test accuracy would hide is visible too. A rule with no
features, "prefer the longer answer" (ties split evenly), is the reference line.

Why: a reward model that stays near chance after training (docs/benchmarks.md,
"Preference") is either a recipe that fails to learn or a base model whose features do
not carry the preference. A probe on frozen features tells them apart in minutes: one
forward pass per sequence, cached in --out/features-<hash>.npz, keyed by the config
file and every override, then seconds of fitting. A linear probe on fixed poolings is a
lower bound on what the features hold, and fine-tuning changes the features: a probe
well above a trained reward model points at the recipe; one at or below it does not
clear the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HH = str(ROOT / "examples" / "hh-preference.toml")
POOLS = ("last", "mean")
C_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def read_positions(seqs: list[list[int]], pad_id: int | None) -> list[int]:
    """Where a sequence-classification head reads each sequence: its last token that is
    not the pad token (transformers' rule), its last token when there is no pad token."""
    out = []
    for seq in seqs:
        kept = [i for i, t in enumerate(seq) if t != pad_id] if pad_id is not None else []
        out.append(kept[-1] if kept else len(seq) - 1)
    return out


def extract(overrides: list[str], config: str = HH, batch_size: int = 16) -> dict[str, Any]:
    """Pooled hidden states of every split's pairs: {split: {"last"|"mean": [2, n, depths,
    H], "lengths": [2, n]}}, and the depths read (hidden_states indices)."""
    import torch

    from fedtune.adapted import make_formulation
    from fedtune.config import load_config
    from fedtune.data.splits import make_splits
    from fedtune.methods import build_method
    from fedtune.models import load_base_model, load_tokenizer

    cfg = load_config(config, overrides)
    splits = make_splits(cfg.data)
    tok = load_tokenizer(cfg.model.name, "decoder")
    form = make_formulation("decoder", tok, splits.labels, cfg.model, "preference",
                            build_method(cfg.method))  # fmt: skip
    model = load_base_model(cfg.model.name, "decoder", splits.labels).eval()
    # The backbone alone: the LM head's [B, T, vocab] logits (262k words for Gemma 3)
    # would cost more than the rest of the forward pass and are not read.
    backbone = model.get_decoder()
    n_layers = model.config.num_hidden_layers
    depths = sorted({n_layers // 2, (3 * n_layers) // 4, n_layers})
    bf16 = bool(cfg.train.bf16)
    out: dict[str, Any] = {"depths": depths}
    for split in ("train", "test"):
        feats = form.encode_examples(getattr(splits, split))
        seqs = [f["chosen_ids"] for f in feats] + [f["rejected_ids"] for f in feats]
        starts = [f["prompt_len"] for f in feats] * 2
        reads = read_positions(seqs, model.config.pad_token_id)
        hidden = model.config.hidden_size
        pooled = {p: np.zeros((len(seqs), len(depths), hidden), np.float32) for p in POOLS}
        order = np.argsort([len(s) for s in seqs], kind="stable")
        t0 = time.perf_counter()
        for b in range(0, len(seqs), batch_size):
            idx = order[b : b + batch_size]
            ids, mask = form._pad([seqs[i] for i in idx])
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                states = backbone(input_ids=ids, attention_mask=mask,
                                  output_hidden_states=True).hidden_states  # fmt: skip
            for k, depth in enumerate(depths):
                h = states[depth].float()
                for j, i in enumerate(idx):
                    pooled["last"][i, k] = h[j, reads[i]].numpy()
                    pooled["mean"][i, k] = h[j, starts[i] : len(seqs[i])].mean(0).numpy()
            done = min(b + batch_size, len(seqs))
            print(f"\r{split}: {done}/{len(seqs)} sequences, {time.perf_counter() - t0:.0f} s",
                  end="", file=sys.stderr, flush=True)  # fmt: skip
        print(file=sys.stderr)
        n = len(feats)
        out[split] = {p: v.reshape(2, n, len(depths), hidden) for p, v in pooled.items()}
        out[split]["lengths"] = np.array([len(s) for s in seqs]).reshape(2, n)
    return out


def fit_probe(chosen: np.ndarray, rejected: np.ndarray, c: float) -> tuple[Any, np.ndarray]:
    """(scaler, w): the Bradley-Terry linear reward on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(np.concatenate([chosen, rejected]))
    diff = scaler.transform(chosen) - scaler.transform(rejected)
    # Each pair in both orders: the classes balance, and with no intercept the fitted
    # w is the maximum-likelihood Bradley-Terry reward (L2-penalised).
    x = np.concatenate([diff, -diff])
    y = np.r_[np.ones(len(diff)), np.zeros(len(diff))]
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000).fit(x, y)
    return scaler, model.coef_[0]


def pair_accuracy(scaler: Any, w: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Share of pairs whose chosen response the probe scores strictly higher."""
    return float(np.mean((scaler.transform(chosen) - scaler.transform(rejected)) @ w > 0))


def probe_table(feats: dict[str, Any], folds: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Every probe's k-fold cross-validated accuracy on the training pairs and its test
    accuracy when fitted on all of them."""
    from sklearn.model_selection import KFold

    rows = []
    for pool in POOLS:
        for k, depth in enumerate(feats["depths"]):
            tr, te = feats["train"][pool][:, :, k], feats["test"][pool][:, :, k]
            for c in C_GRID:
                cv = []
                for fit_i, val_i in KFold(folds, shuffle=True, random_state=seed).split(tr[0]):
                    scaler, w = fit_probe(tr[0, fit_i], tr[1, fit_i], c)
                    cv.append(pair_accuracy(scaler, w, tr[0, val_i], tr[1, val_i]))
                scaler, w = fit_probe(tr[0], tr[1], c)
                rows.append({"pool": pool, "depth": depth, "C": c, "cv": float(np.mean(cv)),
                             "train": pair_accuracy(scaler, w, tr[0], tr[1]),
                             "test": pair_accuracy(scaler, w, te[0], te[1])})  # fmt: skip
    return rows


def cache_key(config: str, overrides: list[str]) -> str:
    """What the features depend on: the config file's text and every override."""
    text = Path(config).read_text("utf-8")
    return json.dumps({"config": text, "overrides": sorted(overrides)}, sort_keys=True)


def _save(path: Path, feats: dict[str, Any], key: str) -> None:
    flat = {f"{s}/{k}": v for s in ("train", "test") for k, v in feats[s].items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, depths=np.array(feats["depths"]), key=np.array(key), **flat)
    tmp.replace(path)


def _load(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """The cached features, or None when they were extracted for another key."""
    data = np.load(path)
    if key is not None and ("key" not in data.files or str(data["key"]) != key):
        return None
    feats: dict[str, Any] = {"depths": [int(d) for d in data["depths"]], "train": {}, "test": {}}
    for entry in data.files:
        if "/" in entry:
            split, name = entry.split("/")
            feats[split][name] = data[entry]
    return feats


def length_rule(lengths: np.ndarray) -> float:
    """Pair accuracy of "prefer the longer answer", ties counted as half right (the
    expected score of a coin flip); lengths [2, n] of chosen and rejected sequences."""
    return float(np.mean((lengths[0] > lengths[1]) + 0.5 * (lengths[0] == lengths[1])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2", help="a catalog decoder or a model folder")
    ap.add_argument("--config", default=HH, help="a preference config (default: HH's)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (the split's data.limit, data.test_size...)",
    )
    args = ap.parse_args()
    overrides = [*args.set, f"model.name={args.model}"]
    args.out.mkdir(parents=True, exist_ok=True)
    key = cache_key(args.config, overrides)
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache = args.out / f"features-{tag}.npz"
    t0 = time.perf_counter()
    feats = _load(cache, key) if cache.exists() else None
    if feats is None:
        feats = extract(overrides, args.config)
        _save(cache, feats, key)
    extract_s = time.perf_counter() - t0
    rows = probe_table(feats)
    chosen = max(rows, key=lambda r: r["cv"])
    lengths = feats["test"]["lengths"]
    n_train, n_test = feats["train"]["last"].shape[1], lengths.shape[1]
    print(f"\n{args.model}, {n_train} training pairs, {n_test} test pairs "
          f"(overrides: {' '.join(overrides)}); features {extract_s:.0f} s")  # fmt: skip
    print("\n| pooling | depth | C | 5-fold CV (train) | train | test |\n|---|---|---|---|---|---|")
    for r in rows:
        mark = " **(chosen by CV)**" if r is chosen else ""
        print(f"| {r['pool']} | {r['depth']} | {r['C']:g} | {r['cv']:.3f} | {r['train']:.3f} | "
              f"{r['test']:.3f}{mark} |")  # fmt: skip
    tests = [r["test"] for r in rows]
    longer = length_rule(lengths)
    print(f"\nchosen by CV: test {chosen['test']:.3f}; all {len(rows)} probes on test: "
          f"{min(tests):.3f}-{max(tests):.3f}; prefer the longer answer (ties half right): "
          f"test {longer:.3f}, train {length_rule(feats['train']['lengths']):.3f} (chosen "
          f"longer {np.mean(lengths[0] > lengths[1]):.3f}, shorter "
          f"{np.mean(lengths[0] < lengths[1]):.3f}, tied "
          f"{np.mean(lengths[0] == lengths[1]):.3f})")  # fmt: skip
    summary = {"model": args.model, "config": args.config, "overrides": overrides,
               "rows": rows, "chosen": chosen, "length_rule": longer, "n_train": n_train,
               "n_test": n_test, "extract_seconds": extract_s}  # fmt: skip
    (args.out / f"probe-{tag}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
