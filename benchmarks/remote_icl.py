"""Remote ICL against a real OpenAI-compatible server (`transformers serve` on the
catalog decoder's dequantized weights, or llama-cpp-python's server on its GGUF file)
next to the local backend on the same sentences.

    python benchmarks/remote_icl.py --server transformers --model smollm2 --shots 0,4 --test 150
    python benchmarks/remote_icl.py --server llama-cpp --python /path/to/llama-venv/bin/python

The server is started by this script (`fedtune.serve`'s commands, the ones `fedtune
models serve` runs) on a free port and stopped at the end. Per shots: the
local backend (transformers, label words scored, the chat template) and the remote
one (the server's chat completion at temperature 0, parsed into a label; or, with
`--scoring logprobs`, its first token's top_logprobs scored as label words) on a
stratified, seeded subset of FPB all-agree's test sentences; accuracy, macro-F1, the
share of answers that named no label, requests (sentences) per second, and how often
the two backends predict the same label.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from fpb_test import fpb_test
from sklearn.metrics import f1_score

from fedtune.config import ModelConfig
from fedtune.methods.icl import ICL, IclConfig
from fedtune.serve import SERVERS, choose_server, gguf_of, server_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> float:
    """Seconds until GET {url}/models answers (the model is loaded)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def served(
    model: str, server: str, python: str, threads: int, batching: bool = False
) -> Iterator[tuple[str, str, str, float, Path]]:
    """Start `fedtune models serve`'s command for `model` on a free port; yields (base
    URL, the model's alias, the server chosen, seconds until it answered, its log) and
    stops it on leaving."""
    gguf, alias = gguf_of(model)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = Path(tempfile.mkdtemp(prefix="fedtune-serve-")) / "server.log"
    chosen = choose_server(server, python)
    cmd = server_command(chosen, python, gguf, alias, "127.0.0.1", port, 2048, threads,
                         batching)  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=cmd.environment(), stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield url, alias, f"{chosen} ({gguf.name})", wait_ready(url, proc), log
    finally:
        try:  # the server's peak memory, read before it stops
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = int(status.split("VmHWM:")[1].split()[0]) / 2**20
            print(f"\nserver peak RSS: {peak:.2f} GB", flush=True)
        except (OSError, IndexError, ValueError):
            pass
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--server", default="auto", choices=SERVERS)
    p.add_argument("--python", default=sys.executable, help="Python with the server installed")
    p.add_argument("--threads", type=int, default=0, help="server CPU threads")
    p.add_argument("--shots", default="0,4")
    p.add_argument("--selection", default="random", choices=("random", "similar"),
                   help="method.selection: which demonstrations")
    p.add_argument("--max-tokens", type=int, default=16,
                   help="method.max_tokens: the answer's length limit (remote)")
    p.add_argument("--scoring", default="text", choices=("text", "logprobs"),
                   help="method.remote_scoring: parse the answer, or score label words from "
                   "the first token's top_logprobs (a server that returns them: llama.cpp's)")
    p.add_argument("--calibrate", action="store_true",
                   help="method.calibrate on both backends (needs --scoring logprobs)")
    p.add_argument("--test", type=int, default=150)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    if args.calibrate and args.scoring != "logprobs":
        p.error("--calibrate needs --scoring logprobs (free-text answers give no label scores)")
    splits, _, y, texts = fpb_test(args.test, args.seed)
    labels = splits.labels
    with served(args.model, args.server, args.python, args.threads) as (url, alias, server,
                                                                         ready, log):
        print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"server: {server}, ready in {ready:.1f} s (log {log}); FPB all-agree, "
              f"{len(texts)} test sentences (stratified, seed {args.seed}); {args.selection} "
              "demonstrations; remote: " + (f"answers of at most {args.max_tokens} tokens"
              if args.scoring == "text" else "label words scored from top_logprobs")
              + ("; calibrated" if args.calibrate else ""))  # fmt: skip
        print()
        print("| shots | backend | accuracy | macro-F1 | no label | sentences/s | same as local |")
        print("|---|---|---|---|---|---|---|")
        for shots in (int(s) for s in args.shots.split(",")):
            preds = {}
            for backend in ("local", "remote"):
                extra = {"base_url": url, "api_model": alias, "retries": 1, "timeout": 120.0,
                         "max_tokens": args.max_tokens, "remote_scoring": args.scoring}
                cfg = IclConfig(shots=shots, backend=backend, model=args.model,
                                selection=args.selection, calibrate=args.calibrate,
                                **(extra if backend == "remote" else {}))  # fmt: skip
                method = ICL(cfg, ModelConfig(name=args.model), labels, seed=args.seed)
                method.fit(splits.train)
                start = time.perf_counter()
                scores = method.predict_scores(texts)
                secs = time.perf_counter() - start
                pred = scores.argmax(-1)
                top = np.sort(scores, axis=-1)
                decided = top[:, -1] > top[:, -2]  # a remote answer naming no label is a tie
                pred = np.where(decided, pred, -1)
                preds[backend] = pred
                acc = float((pred == y).mean())
                f1 = f1_score(y, pred, average="macro", labels=range(len(labels)))
                none = float((~decided).mean())
                same = "" if backend == "local" else f"{(pred == preds['local']).mean():.4f}"
                print(f"| {shots} | {backend} | {acc:.4f} | {f1:.4f} | {none:.4f} | "
                      f"{len(texts) / secs:.2f} | {same} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
