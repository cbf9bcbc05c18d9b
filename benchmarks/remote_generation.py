"""Generation ICL against a real OpenAI-compatible server, next to the local LM, on the
same questions: closed QA on TAT-QA (examples/tatqa-lora.toml's split), SmolLM2.

    python benchmarks/remote_generation.py --test 40 --concurrency 1,4
    python benchmarks/remote_generation.py --test 40 --concurrency 1,4,8 --batching

The server (`transformers serve` on the catalog decoder's weights, the command `fedtune
models serve --server transformers` runs; `--server llama-cpp` for llama-cpp-python's)
is started on a free port and stopped at the end. Rows: the local backend (the LM
loaded here, greedy, batched) and the remote one (`method.backend = "remote"`: one chat
completion per question at temperature 0) for each `--concurrency` (requests in flight
at once); SQuAD exact match and token F1, ROUGE-L, answers per second, and the share
of answers identical to the local backend's. Both see the same conversation (the
chat template, demonstrations as earlier turns); the remote prompt is cut to the
local one's budget (`method.max_context` = model.max_length + max_new_tokens, counted
with the model's tokenizer), so the two differ in where a long context is cut and in
the server's own decoding.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from remote_icl import served

from fedtune.config import load_config, method_config
from fedtune.data import make_splits
from fedtune.generate import score_texts
from fedtune.methods.icl_generate import GenerationICL
from fedtune.serve import SERVERS

ROOT = Path(__file__).resolve().parent.parent
TATQA = ROOT / "examples" / "tatqa-lora.toml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--server", default="transformers", choices=SERVERS)
    p.add_argument("--python", default=sys.executable, help="Python with the server installed")
    p.add_argument("--batching", action="store_true",
                   help="transformers serve --continuous-batching (= fedtune models serve "
                   "--batching)")
    p.add_argument("--threads", type=int, default=0, help="server CPU threads")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--test", type=int, default=40, help="test questions (the split's first N)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    cfg = load_config(TATQA, ["method.name=icl", f"method.shots={args.shots}",
                              f"model.name={args.model}", f"seed={args.seed}"])  # fmt: skip
    splits = make_splits(cfg.data)
    test = splits.test[: args.test]
    mc = cfg.model
    with served(args.model, args.server, args.python, args.threads,
                args.batching) as (url, alias, server, ready, log):  # fmt: skip
        print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"server: {server}{' with continuous batching' if args.batching else ''}, "
              f"ready in {ready:.1f} s (log {log}); TAT-QA, the first {len(test)} test "
              f"questions of {TATQA.name}'s split; {args.shots}-shot; answers of at most "
              f"{mc.max_new_tokens} tokens")  # fmt: skip
        print()
        print("| backend | requests at once | EM | F1 | ROUGE-L | answers/s "
              "| same answer as local |")
        print("|---|---|---|---|---|---|---|")
        refs = [e.response for e in test]
        local: list[str] = []
        runs = [("local", 1)] + [("remote", int(c)) for c in args.concurrency.split(",")]
        for backend, concurrency in runs:
            values = {"shots": args.shots, "model": args.model, "backend": backend}
            if backend == "remote":
                values.update(base_url=url, api_model=alias, retries=1, timeout=300.0,
                              concurrency=concurrency,
                              max_context=mc.max_length + mc.max_new_tokens)  # fmt: skip
            method = GenerationICL(method_config("icl", values), mc, splits.labels,
                                   seed=args.seed)  # fmt: skip
            method.bf16 = False  # the server runs fp32 weights: compare like with like
            method.fit(splits.train)
            if backend == "local":
                method._load()  # the weights are loaded before the clock starts
            start = time.perf_counter()
            answers = method.answer(test)
            secs = time.perf_counter() - start
            scores = score_texts(answers, refs)
            mean = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
            if backend == "local":
                local = answers
            same = "" if backend == "local" else (
                f"{sum(a == b for a, b in zip(answers, local, strict=True)) / len(test):.4f}")
            print(f"| {backend} | {concurrency if backend == 'remote' else ''} | "
                  f"{mean['exact_match']:.4f} | {mean['f1']:.4f} | {mean['rougeL']:.4f} | "
                  f"{len(test) / secs:.3f} | {same} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
