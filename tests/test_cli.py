"""The command line, end to end on tiny models (and once on the real MiniLM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedtune.adapted import AdaptedModel
from fedtune.cli import app

runner = CliRunner()


@pytest.fixture
def table(tmp_path: Path) -> Path:
    rows = [("profit rose by percent", "positive"), ("net sales fell", "negative"),
            ("the company said", "neutral")] * 20  # fmt: skip
    rows = [(f"{t} {i}", y) for i, (t, y) in enumerate(rows)]
    path = tmp_path / "data.csv"
    pd.DataFrame(rows, columns=["sentence", "sentiment"]).to_csv(path, index=False)
    return path


def _train_args(model: str, table: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", "file", "--data-path", str(table),
            "--text-column", "sentence", "--label-column", "sentiment", "--max-steps", "3",
            "--batch-size", "8", "--output-dir", str(out), "--name", "r", *extra]  # fmt: skip


def test_methods_lists_all() -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("icl", "knn", "features", "head", "full", "lora", "ptuning", "prompt",
                 "prefix", "ia3"):  # fmt: skip
        assert name in result.output


def test_help_describes_positional_arguments() -> None:
    # click 8.5 dropped typer's help text of arguments (pinned below 8.5 in pyproject).
    result = runner.invoke(app, ["run", "--help"], terminal_width=100)
    assert result.exit_code == 0
    assert "TOML run config" in result.output


def test_sigterm_removes_the_staged_run_folder(tmp_path: Path) -> None:
    # `kill`/`timeout`/a scheduler send SIGTERM; Python's default would end the process
    # at once and leave `.<name>.partial` behind. The CLI turns it into SystemExit.
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import signal, sys, time
        from pathlib import Path
        from fedtune.cli import app
        from fedtune.runs import staged_run_dir
        app(["methods"], standalone_mode=False)  # the CLI's callback installs the handler
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with staged_run_dir(Path(sys.argv[1])) as staging:
            (staging / "metrics.jsonl").write_text("{}\\n")
            print("staged", flush=True)
            time.sleep(120)
    """)
    final = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", script, str(final)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "staged":
            break
    assert (tmp_path / ".run.partial").is_dir()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal 15" in err
    assert not (tmp_path / ".run.partial").exists() and not final.exists()


def test_compare_resume_refuses_new_settings_and_unknown_folders(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", "--resume", str(tmp_path / "cmp"), "--set",
                                 "seed=3", "--methods", "lora"])  # fmt: skip
    assert result.exit_code == 2
    assert "continues the comparison as it was started; drop --methods, --set" in result.output
    result = runner.invoke(app, ["compare", "--resume", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "no interrupted comparison there" in result.output
    assert not list(tmp_path.iterdir())


def test_config_prints_valid_toml() -> None:
    import tomllib

    result = runner.invoke(app, ["config", "--method", "ptuning"])
    assert result.exit_code == 0
    data = tomllib.loads(result.output)
    assert data["method"]["name"] == "ptuning" and "num_virtual_tokens" in data["method"]


def test_train_takes_its_config_as_an_argument_or_an_option(tmp_path: Path) -> None:
    """`fedtune train CONFIG` like `federate` and `compare`; --config still works;
    both at once is an error that names both, and nothing is written."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('name = "x"\n[method]\nname = "lora"\n')
    other = tmp_path / "other.toml"
    other.write_text('name = "y"\n')
    result = runner.invoke(app, ["train", str(cfg), "--config", str(other)])
    assert result.exit_code == 2
    assert "run.toml" in result.output and "other.toml" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.toml", "run.toml"]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_train_then_predict(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, family: str
) -> None:
    out = tmp_path / "runs"
    result = runner.invoke(app, _train_args(tiny_models[family], table, out, "--method", "lora"))
    assert result.exit_code == 0, result.output
    run = out / "r"
    expected = ["config.json", "metrics.jsonl", "labels.json", "report.md", "curves.png"]
    expected += ["confusion.png", "model/adapter_model.safetensors", "model/fedtune.json"]
    for name in expected:
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"]["name"] == "lora" and cfg["train"]["max_steps"] == 3
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "test" and 0 <= records[-1]["accuracy"] <= 1
    assert json.loads((run / "labels.json").read_text())["labels"] == [
        "negative",
        "neutral",
        "positive",
    ]

    texts = ["profit rose", "sales fell [/note] [bold]"]  # markup-like text is just text
    result = runner.invoke(app, ["predict", str(run), "--text", texts[0], "--text", texts[1]])
    assert result.exit_code == 0, result.output
    expected = AdaptedModel.load(run / "model").predict(texts)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines] == expected
    assert lines[1].endswith(texts[1])

    inp, outp = tmp_path / "in.csv", tmp_path / "out.csv"
    frame = pd.DataFrame({"id": [7, 8, 9], "sentence": ["profit rose", "NA", "the company"]})
    frame.to_csv(inp, index=False)
    result = runner.invoke(app, ["predict", str(run), "--input", str(inp), "--output", str(outp),
                                 "--text-column", "sentence"])  # fmt: skip
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(outp, keep_default_na=False)
    assert list(pred.columns) == ["id", "sentence", "text", "label", "p_negative", "p_neutral",
                                  "p_positive"]  # fmt: skip
    assert pred["id"].tolist() == [7, 8, 9] and pred["text"][1] == "NA"
    assert set(pred["label"]) <= {"negative", "neutral", "positive"}
    assert pred[["p_negative", "p_neutral", "p_positive"]].sum(axis=1).round(4).eq(1).all()


def test_run_toml_with_set(tiny_models: dict[str, str], table: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'name = "t"\noutput_dir = "{tmp_path / "runs"}"\n'
        f'[model]\nname = "{tiny_models["llama"]}"\n'
        f'[data]\nsource = "file"\npath = "{table}"\ntext_column = "sentence"\n'
        'label_column = "sentiment"\n[method]\nname = "prompt"\n[train]\nmax_steps = 2\n'
    )
    result = runner.invoke(app, ["run", str(cfg), "--set", "method.num_virtual_tokens=4",
                                 "--set", "train.batch_size=16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "runs" / "t" / "config.json").read_text())
    assert saved["method"]["num_virtual_tokens"] == 4 and saved["train"]["batch_size"] == 16


def test_errors_are_clear_and_write_nothing(
    tiny_models: dict[str, str], table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    bad_key = runner.invoke(
        app, _train_args(tiny_models["bert"], table, out, "--set", "train.epoc=1")
    )
    assert bad_key.exit_code == 2 and "valid keys" in bad_key.output
    bad_col = runner.invoke(app, _train_args(tiny_models["bert"], table, out, "--text-column", "x"))
    assert bad_col.exit_code == 2 and "'x'" in bad_col.output
    bad_method = runner.invoke(
        app, _train_args(tiny_models["bert"], table, out, "--method", "nope")
    )
    assert bad_method.exit_code == 2 and "choose one of" in bad_method.output
    assert not out.exists() or not any(out.iterdir())

    ok = runner.invoke(app, _train_args(tiny_models["bert"], table, out))
    assert ok.exit_code == 0
    again = runner.invoke(app, _train_args(tiny_models["bert"], table, out))
    assert again.exit_code == 2 and "already exists" in again.output

    not_run = runner.invoke(app, ["predict", str(tmp_path), "--text", "x"])
    assert not_run.exit_code == 2 and "not a fedtune run directory" in not_run.output
    missing_out = runner.invoke(app, ["predict", str(out / "r"), "--input", str(table)])
    assert missing_out.exit_code == 2 and "--output" in missing_out.output


def test_failed_training_leaves_no_run_dir(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedtune.regimes

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fedtune.regimes, "train", boom)
    out = tmp_path / "runs"
    result = runner.invoke(app, _train_args(tiny_models["bert"], table, out))
    assert result.exit_code != 0
    assert list(out.iterdir()) == []


def test_minilm_end_to_end_on_real_data(fpb_dir: Path, tmp_path: Path) -> None:
    """The real bundled MiniLM on a small FPB subset, through the CLI (< 60 s)."""
    out = tmp_path / "runs"
    args = ["train", "--method", "lora", "--data-path", str(fpb_dir), "--limit", "96",
            "--max-steps", "6", "--batch-size", "16", "--output-dir", str(out), "--name", "m",
            "--set", "train.progress=false"]  # fmt: skip
    result = runner.invoke(app, args, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["n_test"] == 452 and summary["trainable_parameters"] == 676_995
    assert summary["model"] == "minilm" and summary["kind"] == "encoder"
    result = runner.invoke(app, ["predict", str(out / "m"), "--text", "Operating profit rose."])
    assert result.exit_code == 0 and "Operating profit rose." in result.output


def test_demo_quick_on_real_data(
    fpb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedtune demo --quick` end to end: all three regimes, both figures (LoRA
    only and one round, to keep CI short)."""
    import fedtune.demo

    full = fedtune.demo.DEMO_PLAN
    plan = {"lora": {**full["lora"], "rounds": 1}, "features": full["features"],
            "knn": full["knn"]}  # fmt: skip
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fedtune.demo, "DEMO_PLAN", plan)
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(fpb_dir.parent))
    result = runner.invoke(app, ["demo", "--quick", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (out,) = [p for p in tmp_path.iterdir() if p.name != "cache"]
    report = (out / "report.md").read_text()
    assert "| lora | centralized |" in report and "| lora | federated |" in report
    assert "| knn | federated |" in report and "![quality versus cost](ranking.png)" in report
    assert (out / "fig_a_centralized_vs_federated.png").is_file()
    assert (out / "fig_b_local_vs_federated.png").is_file()
    assert (out / "lora-federated" / "model" / "fedtune.json").is_file()
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["n_train"] for r in rows] == [150, 50, 50, 50, 150] * 3
    assert "report at" in result.output


def test_predict_labels_that_are_not_identifiers(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    rows = [(f"profit rose {i}", "very-good") for i in range(10)]
    rows += [(f"sales fell {i}", "very bad") for i in range(10)]
    table = tmp_path / "d.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(table, index=False)
    args = ["train", "--model", tiny_models["bert"], "--data", "file", "--data-path", str(table),
            "--max-steps", "2", "--output-dir", str(tmp_path / "runs"), "--name", "r"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["predict", str(tmp_path / "runs" / "r"), "--text", "profit"])
    assert result.exit_code == 0, result.output
    assert "very-good" in result.output and "very bad" in result.output
    bad_out = runner.invoke(app, ["predict", str(tmp_path / "runs" / "r"), "--input", str(table),
                                  "--output", str(tmp_path / "p.xlsx")])  # fmt: skip
    assert bad_out.exit_code == 2 and "unsupported file type" in bad_out.output
    assert not (tmp_path / "p.xlsx").exists()


def test_federate_command_and_resume_flags(tiny_models: dict[str, str], tmp_path: Path) -> None:
    rows = [(f"profit rose {i}", "up") for i in range(12)] + [
        (f"sales fell {i}", "down") for i in range(12)
    ]
    table = tmp_path / "d.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(table, index=False)
    args = ["federate", "--set", "data.source=file", "--set", f"data.path={table}",
            "--set", f"model.name={tiny_models['bert']}", "--set", "federated.sites=2",
            "--set", "federated.rounds=2", "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", "name=f", "--set", "train.progress=false"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "round   2/2" in result.output and (tmp_path / "runs" / "f" / "report.md").is_file()
    result = runner.invoke(app, ["federate", "x.toml", "--resume", str(tmp_path / "runs" / "f")])
    assert result.exit_code == 2 and "drop CONFIG" in result.output
    result = runner.invoke(app, ["federate", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not an interrupted federated run" in result.output
    result = runner.invoke(app, ["federate", "--resume", str(tmp_path / "runs" / "f")])
    assert result.exit_code == 2 and "finished run" in result.output


@pytest.mark.parametrize("method", ["features", "knn"])
def test_frozen_methods_train_and_predict_from_the_cli(
    tiny_models: dict[str, str], table: Path, tmp_path: Path, method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    args = _train_args(tiny_models["bert"], table, tmp_path / "runs", "--method", method)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "runs" / "r" / "report.md").read_text()
    assert "embeddings: 0 read from the cache" in report
    result = runner.invoke(app, ["predict", str(tmp_path / "runs" / "r"), "--text", "profit rose"])
    assert result.exit_code == 0 and "profit rose" in result.output
    # Tested again, a frozen method gives what the run recorded.
    result = runner.invoke(app, ["evaluate", str(tmp_path / "runs" / "r"),
                                 "--output", str(tmp_path / "again.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["scores"] == summary["test_scores"] and again["accuracy"] == summary["accuracy"]


def test_index_and_ask_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Acme revenue grew 12 percent in 2024.")
    (docs / "b.md").write_text("It rains often in Bergen.")
    idx = tmp_path / "idx"
    result = runner.invoke(app, ["index", str(docs), "--output", str(idx)])
    assert result.exit_code == 0 and "2 passages from 2 documents" in result.output
    result = runner.invoke(app, ["ask", "Where does it rain?", "--index", str(idx), "-k", "1"])
    assert result.exit_code == 0, result.output
    assert "[1]" in result.output and "b.md" in result.output and "passages only" in result.output
    result = runner.invoke(app, ["ask", "Where?", "--index", str(tmp_path / "none")])
    assert result.exit_code == 2 and "fedtune index" in result.output
    result = runner.invoke(app, ["index", str(tmp_path / "nodocs"), "--output", str(idx)])
    assert result.exit_code == 2 and (idx / "index.json").is_file()  # the old index stays



def test_compare_applies_method_sets_to_the_compared_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--methods ptuning --set method.lr=...` on a LoRA config used to run P-tuning at
    # its default lr without a word: the override went to the config's (LoRA) method.
    import fedtune.federated.compare

    seen: list[tuple[object, object]] = []
    monkeypatch.setattr(fedtune.federated.compare, "run_regimes",
                        lambda cfg, names, *a: seen.append((cfg, names)))  # fmt: skip
    config = tmp_path / "c.toml"
    config.write_text('[method]\nname = "lora"\n')
    ok = runner.invoke(app, ["compare", str(config), "--methods", "ptuning",
                             "--set", "method.lr=0.03"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    cfg, names = seen[0]
    assert names == ["ptuning"]
    assert cfg.method_name == "ptuning" and cfg.method.lr == 0.03  # type: ignore[attr-defined]

    # The config's method compared too: the override stays with it, others use defaults.
    both = runner.invoke(app, ["compare", str(config), "--methods", "ptuning,lora",
                               "--set", "method.lr=0.03"])  # fmt: skip
    assert both.exit_code == 0 and seen[1][0].method.lr == 0.03  # type: ignore[attr-defined]

    # Several methods, none of them the config's: say so instead of ignoring it.
    bad = runner.invoke(app, ["compare", str(config), "--methods", "ptuning,prompt",
                              "--set", "method.lr=0.03"])  # fmt: skip
    assert bad.exit_code == 2 and "method.lr" in bad.output and "--methods" in bad.output
    assert len(seen) == 2

    # A key only the compared method has (the config's LoRA has no virtual tokens).
    own = runner.invoke(app, ["compare", str(config), "--methods", "ptuning",
                              "--set", "method.num_virtual_tokens=8"])  # fmt: skip
    assert own.exit_code == 0, own.output
    assert seen[-1][0].method.num_virtual_tokens == 8  # type: ignore[attr-defined]
    # The config's own method alone keeps the config's settings for it.
    config.write_text('[method]\nname = "lora"\nr = 4\n')
    same = runner.invoke(app, ["compare", str(config), "--methods", "lora",
                               "--set", "method.lr=0.03"])  # fmt: skip
    assert same.exit_code == 0, same.output
    assert (seen[-1][0].method.r, seen[-1][0].method.lr) == (4, 0.03)  # type: ignore[attr-defined]


def test_evaluate_tests_a_saved_run_again(tiny_models: dict[str, str], table: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    from safetensors.torch import load_file, save_file

    out = tmp_path / "runs"
    args = ["federate", "--set", "data.source=file", "--set", f"data.path={table}",
            "--set", "data.text_column=sentence", "--set", "data.label_column=sentiment",
            "--set", f"model.name={tiny_models['gpt2']}", "--set", "method.name=ptuning",
            "--set", "federated.sites=2", "--set", "federated.rounds=2",
            "--set", f"output_dir={out}", "--set", "name=f",
            "--set", "train.progress=false"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = out / "f"
    summary = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])

    # The kept model, tested again, gives what the run recorded, example by example.
    result = runner.invoke(app, ["evaluate", str(run), "--output", str(tmp_path / "kept.json")])
    assert result.exit_code == 0, result.output
    assert f"the kept model (round {summary['best_round']})" in _flat(result.output)
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert kept["n"] == summary["n_test"] == len(kept["scores"])
    assert kept["scores"] == summary["test_scores"]
    assert kept["loss"] == pytest.approx(summary["loss"], rel=1e-4)

    # --checkpoint last tests checkpoint/global.safetensors (the last round's model):
    # with the kept state in its place it gives the kept results, with another it does not.
    ckpt = run / "checkpoint"
    save_file(load_file(str(ckpt / "best.safetensors")), str(ckpt / "global.safetensors"))
    result = runner.invoke(app, ["evaluate", str(run / "model"), "--checkpoint", "last",
                                 "--output", str(tmp_path / "last.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the last round's model (round 2)" in _flat(result.output)
    assert "last - kept: +0.0 points" in _flat(result.output)
    last = json.loads((tmp_path / "last.json").read_text())
    assert last["scores"] == kept["scores"] and last["loss"] == pytest.approx(kept["loss"])
    moved = {k: v + 0.5 for k, v in load_file(str(ckpt / "best.safetensors")).items()}
    save_file(moved, str(ckpt / "global.safetensors"))
    result = runner.invoke(app, ["evaluate", str(run), "--checkpoint", "last",
                                 "--output", str(tmp_path / "moved.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "moved.json").read_text())["loss"] != pytest.approx(kept["loss"])

    result = runner.invoke(app, ["evaluate", str(run), "--split", "validation"])
    assert result.exit_code == 0, result.output
    assert f"on {summary['n_validation']} validation examples" in _flat(result.output)

    # Errors name the bad input and the fix, and write nothing.
    for bad, message in [
        ([str(out)], "no config.json"),
        ([str(tmp_path / "nowhere")], "no config.json"),
        ([str(run), "--split", "train"], "use one of test, validation"),
        ([str(run), "--checkpoint", "best"], "use one of kept, last"),
        ([str(run), "--output", str(tmp_path / "e.csv")], "name a .json file"),
    ]:
        result = runner.invoke(app, ["evaluate", *bad])
        assert result.exit_code != 0 and message in _flat(result.output), bad
    assert not (tmp_path / "e.csv").exists()
    result = runner.invoke(app, _train_args(tiny_models["bert"], table, out, "--method", "lora"))
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(out / "r"), "--checkpoint", "last"])
    assert result.exit_code != 0 and "Use --checkpoint kept" in _flat(result.output)


def _flat(output: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(output.split())
