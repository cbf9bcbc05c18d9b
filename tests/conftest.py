"""Shared fixtures: tiny random models (built once per session, offline) and the
real-data folder (skipped when FEDTUNE_DATA_DIR is unset)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import transformers

from fedtune.models import build_tiny_model

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
# Tiny models gain nothing from threads, and a busy machine makes them slow.
torch.set_num_threads(1)

FAMILIES = ("bert", "gpt2", "llama", "qwen2")
LABELS = ("negative", "neutral", "positive")
TEXTS = [
    "the company said its net sales rose by percent",
    "operating loss increased in the quarter",
    "the group will be stable",
    "profit fell compared to the same period last year",
    "new contract order growth expected",
    "shares of the bank",
]
Y = [2, 0, 1, 0, 2, 1]


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """fedtune's cache (embeddings, labelled bases of saved adapters) in a temporary
    folder, never the user's ~/.cache/fedtune; tests that need their own set it."""
    if "FEDTUNE_CACHE_DIR" not in os.environ:
        os.environ["FEDTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedtune-cache"))


@pytest.fixture
def check_paired_findings() -> Callable[[Path, str], None]:
    """check(comparison folder, primary metric): every run kept its per-example test
    scores (one per test example, their mean the run's score) and the report's findings
    carry paired intervals built from them, for any task."""

    def check(out: Path, metric: str) -> None:
        rows = json.loads((out / "comparison.json").read_text())
        for r in rows:
            summary = json.loads((out / r["name"] / "metrics.jsonl").read_text().splitlines()[-1])
            assert len(summary["test_scores"]) == r["n_test"] > 0
            assert sum(summary["test_scores"]) / r["n_test"] == pytest.approx(r[metric])
            # Each test example's group when the data has groups (resampled whole).
            assert summary["test_groups"] == [] or len(summary["test_groups"]) == r["n_test"]
        report = (out / "report.md").read_text()
        findings = report.split("## The source post's two findings")[1]
        assert any(line.startswith("| ") and " [" in line for line in findings.splitlines())

    return check


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny_model(root / fam, fam) for fam in FAMILIES}


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the tiny Llama whose tokenizer has a ChatML chat template (as
    instruction-tuned models such as SmolLM2-Instruct do)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path_factory.mktemp("chat-llama")
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tok.chat_template = CHATML
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(dest)
    tok.save_pretrained(dest)
    return str(dest)


@pytest.fixture
def fpb_dir() -> Path:
    """The real Financial PhraseBank folder, or skip: the files are not in the repo."""
    root = os.environ.get("FEDTUNE_DATA_DIR", "")
    folder = Path(root) / "financial_phrasebank"
    if not root or not folder.is_dir():
        pytest.skip("set FEDTUNE_DATA_DIR to a folder holding financial_phrasebank/")
    return folder


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """90 rows of the six TEXTS, a label each and a `site` column (org-0..2)."""
    rows = [
        {"text": f"{TEXTS[i % 6]} {i}", "label": LABELS[Y[i % 6]], "site": f"org-{i % 3}"}
        for i in range(90)
    ]
    path = tmp_path / "d.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's Flower app staged with only what its bundle needs: `flwr run`
    packs every *.py file of the folder it is given, so a stray folder in a checkout
    (staged wheels, a second environment) could exceed Flower's 10 MB FAB limit."""
    from fedtune.deploy import find_app_dir, stage_app

    return stage_app(find_app_dir(), tmp_path_factory.mktemp("staged") / "app")


def benchmark_script(name: str) -> tuple[Path, Any]:
    """benchmarks/<name>.py: its path and the script imported as a module (its own
    functions, tested directly)."""
    import importlib

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        return folder / f"{name}.py", importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def script_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                script: Path, *argv: str | Path) -> tuple[int, str, str]:  # fmt: skip
    """A benchmarks/ script's main() in this process: (exit status, stdout, stderr).
    Tests run each script once as a subprocess; further calls here save a Python and
    PyTorch start-up each (~8 s on 2 cores)."""
    import importlib

    monkeypatch.syspath_prepend(str(script.parent))
    module = importlib.import_module(script.stem)
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv)])
    capsys.readouterr()
    try:
        module.main()
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # sys.exit(message): the interpreter would print it
        return 1, out, err + code
    return code or 0, out, err
