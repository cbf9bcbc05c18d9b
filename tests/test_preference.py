"""The preference task: data layouts (TRL's, Anthropic HH's, chat messages), the reward
and DPO losses against TRL's trainers, the reference being the adapter-free base,
save/load and plain-PEFT interop, the three regimes."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedtune.adapted import AdaptedModel
from fedtune.cli import app
from fedtune.config import DataConfig, ModelConfig, load_config, method_config
from fedtune.data.sources import Example, load_examples
from fedtune.errors import ConfigError, DataError
from fedtune.preference import DPOPairs, RewardPairs


def _pairs(n: int = 60) -> list[dict[str, str]]:
    """A learnable preference: the chosen answer says "yes", the rejected one "no"."""
    return [{"prompt": f"Is {i % 7} a good number? ({i})", "chosen": f"yes {i % 7} profit rose",
             "rejected": f"no loss fell {i % 7}", "category": "even" if i % 2 == 0 else "odd",
             "site": f"s{i % 3}"} for i in range(n)]  # fmt: skip


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _pairs()))
    return path


def _cfg(path: Path, model: str, tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, [
        f"output_dir={tmp_path / 'runs'}", "data.task=preference", "data.source=file",
        f"data.path={path}", f"model.name={model}", "model.max_length=24", "train.epochs=2",
        "train.batch_size=8", "train.progress=false", *extra,
    ])  # fmt: skip


def _hh(chosen: str, rejected: str, prompt: str = "\n\nHuman: Hi\n\nAssistant: Hello\n\n"
        "Human: What is 2+2?") -> dict[str, str]:  # fmt: skip
    return {"chosen": f"{prompt}\n\nAssistant: {chosen}",
            "rejected": f"{prompt}\n\nAssistant: {rejected}"}


# --- data -------------------------------------------------------------------------------


def test_trl_hh_and_messages_layouts(tmp_path: Path) -> None:
    trl = tmp_path / "trl.jsonl"
    trl.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Name a color.", "chosen": "Red.", "rejected": "Seven."},
        {"prompt": "Same?", "chosen": "x", "rejected": "x"},  # no preference: dropped
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
    ]))  # fmt: skip
    ex = load_examples(DataConfig(task="preference", source="file", path=str(trl)))
    assert [(e.text, e.context, e.response, e.rejected, e.label) for e in ex] == [
        ("Name a color.", "", "Red.", "Seven.", "all"),
        ("2+2?", "system: Be brief.", "4", "5", "all")]
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps(_hh("4.", "Five.\n\nOr six.")) + "\n")
    (e,) = load_examples(DataConfig(task="preference", source="file", path=str(hh)))
    assert (e.text, e.context) == ("What is 2+2?", "Human: Hi\nAssistant: Hello")
    assert (e.response, e.rejected) == ("4.", "Five.\n\nOr six.")


def test_hh_folder_gives_each_subset_as_category_and_site(tmp_path: Path) -> None:
    folder = tmp_path / "hh-rlhf"
    folder.mkdir()
    for name, n in (("helpful-base-test", 3), ("harmless-base-test", 2)):
        rows = [_hh(f"good {i}", f"bad {i}", f"\n\nHuman: q{i} {name}") for i in range(n)]
        (folder / f"{name}.jsonl.gz").write_bytes(
            gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    ex = load_examples(DataConfig(task="preference", source="hh", path=str(folder)))
    assert [(e.label, e.site) for e in ex] == [("harmless-base", "harmless-base")] * 2 + [
        ("helpful-base", "helpful-base")] * 3
    assert ex[0].text == "q0 harmless-base-test" and ex[0].response == "good 0"


def test_preference_data_errors_name_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "good": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"no chosen column.*set data\.response_column"):
        load_examples(DataConfig(task="preference", source="file", path=str(bad)))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"record 1: without a prompt column.*HH transcripts"):
        load_examples(DataConfig(task="preference", source="file", path=str(plain)))
    with pytest.raises(DataError, match=r"preference pairs.*set data\.task=preference"):
        load_examples(DataConfig(source="hh", path=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.jsonl\.gz"):
        load_examples(DataConfig(task="preference", source="hh", path=str(tmp_path / "empty")))


# --- the losses -------------------------------------------------------------------------


def _perturbed(model: AdaptedModel) -> AdaptedModel:
    """Random trainable weights (LoRA's B starts at zero: policy == reference)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.module.eval()
    return model


def _examples(category: str = "all") -> list[Example]:
    return [Example(r["prompt"], category, response=r["chosen"], rejected=r["rejected"])
            for r in _pairs(4)]  # fmt: skip


@pytest.mark.parametrize("method", ["reward", "dpo"])
def test_a_long_dialogue_keeps_its_newest_turns(tiny_models: dict[str, str], method: str) -> None:
    """A preference prompt's context is the dialogue before the last human turn: cut to
    max_length, the oldest turns go and the ones the answers respond to stay."""
    old = "Human: oldest question\nAssistant: " + "filler " * 60
    dialogue = old + "\nHuman: newest question\nAssistant: newest reply"
    model = AdaptedModel.build(ModelConfig(name=tiny_models["llama"], max_length=24),
                               method_config(method), ("all",), task="preference")  # fmt: skip
    ex = Example("Thanks.", "all", context=dialogue, response="You're welcome.", rejected="No.")
    (f,) = model.formulation.encode_examples([ex])
    prompt = model.tokenizer.decode(f["chosen_ids"][: f["prompt_len"]])
    assert "newest reply" in prompt and "Thanks." in prompt and "oldest" not in prompt
    start = AdaptedModel.build(ModelConfig(name=tiny_models["llama"], max_length=24,
                                           context_keep="start"),
                               method_config(method), ("all",), task="preference")  # fmt: skip
    (f,) = start.formulation.encode_examples([ex])
    prompt = start.tokenizer.decode(f["chosen_ids"][: f["prompt_len"]])
    assert "oldest" in prompt and "newest" not in prompt and "Thanks." in prompt


def test_dpo_loss_equals_trl(tiny_models: dict[str, str], tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = _perturbed(AdaptedModel.build(ModelConfig(name=tiny_models["llama"]),
                                          method_config("dpo", {"beta": 2.0}), ("all",),
                                          task="preference"))  # fmt: skip
    form = model.formulation
    assert isinstance(form, DPOPairs)
    feats = form.encode_examples(_examples())
    ours = form.loss(model.module, form.collate(feats))
    trainer = DPOTrainer(model=model.module, processing_class=model.tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=2.0, report_to=[],
                                        use_cpu=True, max_length=None),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b",
                                                           "rejected": "c"}]))  # fmt: skip
    # TRL takes an adapter that is already trained as its own reference (a "ref" copy);
    # fedtune's reference is the base model, which is TRL's for a new adapter.
    if "ref" in model.module.peft_config:
        model.module.delete_adapter("ref")
    batch = trainer.data_collator([
        {"prompt_ids": f["chosen_ids"][: f["prompt_len"]],
         "chosen_ids": f["chosen_ids"][f["prompt_len"]:],
         "rejected_ids": f["rejected_ids"][f["prompt_len"]:]} for f in feats])  # fmt: skip
    theirs = trainer.compute_loss(model.module, batch)
    assert abs(ours.item() - math.log(2)) > 0.05  # the policy differs from the reference
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_reward_loss_equals_trl(tiny_models: dict[str, str], tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model = _perturbed(AdaptedModel.build(ModelConfig(name=tiny_models["llama"]),
                                          method_config("reward", {}), ("all",),
                                          task="preference"))  # fmt: skip
    form = model.formulation
    assert isinstance(form, RewardPairs)
    feats = form.encode_examples(_examples())
    ours = form.loss(model.module, form.collate(feats))
    trainer = RewardTrainer(model=model.module, processing_class=model.tokenizer,
                            args=RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[],
                                              use_cpu=True, max_length=None),
                            train_dataset=Dataset.from_list([{"chosen": "b",
                                                              "rejected": "c"}]))  # fmt: skip
    # TRL takes an adapter that is already trained as its own reference (a "ref" copy);
    # fedtune's reference is the base model, which is TRL's for a new adapter.
    if "ref" in model.module.peft_config:
        model.module.delete_adapter("ref")
    batch = trainer.data_collator([{"chosen_ids": f["chosen_ids"],
                                    "rejected_ids": f["rejected_ids"]} for f in feats])  # fmt: skip
    theirs = trainer.compute_loss(model.module, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dpo_reference_is_the_base_model(tiny_models: dict[str, str]) -> None:
    """A fresh LoRA adapter (B = 0) is the base model: every implicit reward is 0, the
    loss log 2, and ties count as wrong."""
    model = AdaptedModel.build(ModelConfig(name=tiny_models["llama"]), method_config("dpo", {}),
                               ("all",), task="preference")  # fmt: skip
    model.module.eval()
    form = model.formulation
    batch = form.collate(form.encode_examples(_examples()))
    (loss_sum, n), scores = form.evaluate(model.module, batch)
    assert torch.all(scores == 0) and n == 4
    assert math.isclose(float(loss_sum / n), math.log(2), rel_tol=1e-6)
    from fedtune.evaluate import evaluate_features

    assert evaluate_features(model, form.encode_examples(_examples())).values[
        "pair_accuracy"] == 0.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["reward", "dpo"])
def test_method_contract(tiny_models: dict[str, str], family: str, method: str,
                         tmp_path: Path) -> None:  # fmt: skip
    """The conformance suite's checks (tests/test_methods_conformance.py) on pairs:
    trainable tensors change and frozen ones do not; the exchanged state is exactly the
    trainable tensors (the reward model's new head among them); save -> load gives the
    same rewards; a trainable state round-trips."""
    model = AdaptedModel.build(ModelConfig(name=tiny_models[family]), method_config(method, {}),
                               ("all",), task="preference")  # fmt: skip
    form = model.formulation
    batch = form.collate(form.encode_examples(_examples()))
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    state = model.trainable_state()
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert set(state) == trainable and model.trainable_parameters() < model.base_parameters
    assert (method == "reward") == any("score" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.module.parameters() if p.requires_grad], lr=1e-2)
    model.module.train()
    for _ in range(3):
        form.loss(model.module, batch).backward()
        opt.step()
        opt.zero_grad()
    model.module.eval()
    for name, p in model.module.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name
    with torch.no_grad():
        scores = form.evaluate(model.module, batch)[1]
    model.save(tmp_path / "model")
    loaded = AdaptedModel.load(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded.formulation.evaluate(loaded.module, batch)[1], scores)
    fresh = AdaptedModel.build(ModelConfig(name=tiny_models[family]), method_config(method, {}),
                               ("all",), seed=1, task="preference")  # fmt: skip
    fresh.load_trainable_state(model.trainable_state())
    fresh.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.formulation.evaluate(fresh.module, batch)[1], scores)


# --- whole runs -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["reward", "dpo"])
def test_reward_and_dpo_learn_save_and_load(tiny_models: dict[str, str], pairs: Path,
                                            tmp_path: Path, method: str) -> None:  # fmt: skip
    from fedtune.evaluate import evaluate_features
    from fedtune.regimes import run_centralized

    summary = run_centralized(_cfg(pairs, tiny_models["llama"], tmp_path,
                                   f"method.name={method}", "method.lr=0.01"))  # fmt: skip
    assert summary["task"] == "preference" and summary["primary"] == "pair_accuracy"
    assert summary["pair_accuracy"] >= 0.9 and summary["reward_margin"] > 0
    assert set(summary["report"]) == {"even", "odd"}
    run = Path(summary["run_dir"])
    assert "| pair accuracy | reward margin | loss |" in (run / "report.md").read_text()
    loaded = AdaptedModel.load(run / "model")
    assert loaded.task == "preference"
    assert loaded.formulation.context_keep == "end"  # type: ignore[attr-defined]
    # A model saved before model.context_keep existed keeps cutting as it was trained.
    meta = json.loads((run / "model" / "fedtune.json").read_text())
    del meta["model"]["context_keep"]
    (run / "model" / "fedtune.json").write_text(json.dumps(meta))
    assert AdaptedModel.load(run / "model").formulation.context_keep == "start"  # type: ignore[attr-defined]
    again = evaluate_features(loaded, loaded.formulation.encode_examples(
        [Example(r["prompt"], r["category"], response=r["chosen"], rejected=r["rejected"])
         for r in _pairs()]))  # fmt: skip
    assert again.values["pair_accuracy"] >= 0.9


def test_reward_adapter_gives_the_same_rewards_in_plain_peft(
    tiny_models: dict[str, str], pairs: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForSequenceClassification

    from fedtune.regimes import run_centralized

    summary = run_centralized(_cfg(pairs, tiny_models["llama"], tmp_path, "method.name=reward",
                                   "method.lr=0.01"))  # fmt: skip
    model_dir = Path(summary["run_dir"]) / "model"
    ours = AdaptedModel.load(model_dir)
    plain = AutoPeftModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    form = ours.formulation
    batch = form.collate(form.encode_examples(_examples("odd")))
    with torch.no_grad():
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mine = torch.cat(form.rewards(ours.module, batch))  # type: ignore[attr-defined]
    torch.testing.assert_close(theirs.logits.squeeze(-1), mine)


def test_compare_runs_three_regimes_on_preference(
    tiny_models: dict[str, str], pairs: Path, tmp_path: Path,
    check_paired_findings: Callable[[Path, str], None],
) -> None:  # fmt: skip
    from fedtune.federated.compare import run_regimes

    cfg = _cfg(pairs, tiny_models["llama"], tmp_path, "method.name=dpo", "method.lr=0.01",
               "data.site_column=site", "federated.partition=column", "federated.rounds=2",
               "name=cmp")  # fmt: skip
    out = run_regimes(cfg)
    rows = json.loads((out / "comparison.json").read_text())
    assert {r["regime"] for r in rows} == {"centralized", "local", "federated"}
    assert {r["site"] for r in rows if r["regime"] == "local"} >= {"s0", "s1", "s2"}
    assert all(r["task"] == "preference" and 0 <= r["pair_accuracy"] <= 1 for r in rows)
    report = (out / "report.md").read_text()
    assert "pair accuracy" in report and "reward margin" in report
    lines = report.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| method | regime |"))
    # A Markdown table renders only when its delimiter row has the header's cell count.
    assert lines[head + 1].count("|---") == lines[head].count(" | ") + 1
    rounds = [json.loads(line) for line in
              (out / "dpo-federated" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("event") == "round"]
    assert len(rounds) == 2 and all("val_pair_accuracy" in r for r in rounds)
    check_paired_findings(out, "pair_accuracy")


def test_seeds_report_table_has_a_cell_per_column(tiny_models: dict[str, str], pairs: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    """Preference has two metrics (classification three): the seeds table's delimiter
    row must follow the header, or Markdown does not render the table."""
    from fedtune.federated.compare import run_seeds

    cfg = _cfg(pairs, tiny_models["llama"], tmp_path, "method.name=reward", "name=seeds")
    out = run_seeds(cfg, [1, 2], regimes=("centralized",))
    lines = (out / "report.md").read_text().splitlines()
    head = lines.index("| method | regime | site | seeds | pair accuracy | reward margin "
                       "| min–max pair accuracy |")  # fmt: skip
    assert lines[head + 1] == "|---" * 7 + "|"


def test_methods_and_tasks_that_do_not_fit_refuse(tiny_models: dict[str, str], pairs: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    from fedtune.regimes import run_centralized

    with pytest.raises(ConfigError, match=r"trains with method reward .* or dpo; method lora"):
        run_centralized(_cfg(pairs, tiny_models["llama"], tmp_path, "method.name=lora"))
    with pytest.raises(ConfigError, match=r"knn classifies; preference pairs"):
        run_centralized(_cfg(pairs, tiny_models["llama"], tmp_path, "method.name=knn"))
    with pytest.raises(ConfigError, match=r"needs a decoder.*is an encoder"):
        run_centralized(_cfg(pairs, tiny_models["bert"], tmp_path, "method.name=dpo"))
    with pytest.raises(ConfigError, match=r"method dpo learns from preference pairs.*set "
                                          r"data\.task=preference"):  # fmt: skip
        AdaptedModel.build(ModelConfig(name=tiny_models["llama"]), method_config("dpo", {}),
                           ("neg", "pos"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"method\.beta = 0"):
        AdaptedModel.build(ModelConfig(name=tiny_models["llama"]),
                           method_config("dpo", {"beta": 0}), ("all",), task="preference")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_trains_a_reward_model(tiny_models: dict[str, str], pairs: Path,
                                   tmp_path: Path) -> None:  # fmt: skip
    r = CliRunner().invoke(app, [
        "train", "--task", "preference", "--data", "file", "--data-path", str(pairs),
        "--model", tiny_models["llama"], "--method", "reward", "--epochs", "1",
        "--output-dir", str(tmp_path / "runs"), "--name", "rm",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "pair accuracy" in r.output
