"""RL against a trained reward model (method rloo, fedtune.rlhf): RLOO's advantages by
hand, its loss and gradient against TRL 1.16's RLOOTrainer, the evaluation against the
base model, learning, save/load, the regimes, and the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_preference import _cfg, _examples, _pairs, _perturbed

from fedtune.adapted import AdaptedModel
from fedtune.config import ModelConfig, method_config
from fedtune.errors import ConfigError
from fedtune.rlhf import (
    GRPOPrompts,
    RLOOPrompts,
    before_stop,
    grpo_advantages,
    grpo_policy_loss,
    rloo_advantages,
    rloo_policy_loss,
)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rlhf-data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _pairs()))
    return path


@pytest.fixture(scope="module")
def reward_run(tiny_models: dict[str, str], pairs_file: Path,
               tmp_path_factory: pytest.TempPathFactory) -> str:  # fmt: skip
    """A reward model trained on the toy pairs (chosen answers say "yes")."""
    from fedtune.regimes import run_centralized

    tmp = tmp_path_factory.mktemp("reward")
    summary = run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp, "method.name=reward",
                                   "method.lr=0.01", "name=rm"))  # fmt: skip
    assert summary["pair_accuracy"] >= 0.9
    return str(summary["run_dir"])


def _policy(tiny_models: dict[str, str], reward_run: str, method: str = "rloo",
            **options: object) -> AdaptedModel:  # fmt: skip
    model = AdaptedModel.build(
        ModelConfig(name=tiny_models["llama"], max_target_length=8),
        method_config(method, {"reward_model": reward_run, "max_new_tokens": 6, **options}),
        ("all",), task="preference",
    )  # fmt: skip
    assert isinstance(model.formulation, RLOOPrompts)
    return model


def _sampled_with_stops(form: RLOOPrompts, model: AdaptedModel, batch: dict[str, torch.Tensor],
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Two completions per prompt, edited so that they end at different points: row 0
    at its third token, row 1 at once (empty), the others run to the length limit
    (the tiny model never samples its end token). -> (tokens, completion mask), the
    mask checked against TRL's rule (up to and including the first end token)."""
    torch.manual_seed(0)
    tokens, _ = form.complete(model.module, batch, 2, sample=True)
    eos = model.tokenizer.eos_token_id
    tokens = tokens.clone()
    tokens[0, 2], tokens[1, 0] = eos, eos
    cmask = form._with_stop(tokens, before_stop(tokens, [eos]))
    is_eos = tokens == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), tokens.shape[1])
    trl_mask = torch.arange(tokens.shape[1])[None, :] <= first[:, None]  # TRL's rule
    torch.testing.assert_close(cmask, trl_mask)
    assert cmask.sum(1).tolist()[:2] == [3, 1] and len(set(cmask.sum(1).tolist())) == 3
    return tokens, cmask


def test_leave_one_out_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    expected = torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0])
    torch.testing.assert_close(rloo_advantages(rewards, 3), expected)
    assert torch.allclose(rloo_advantages(rewards, 3).view(2, 3).sum(1), torch.zeros(2))
    with pytest.raises(ConfigError, match="at least 2"):
        rloo_advantages(rewards, 1)


def test_policy_loss_and_gradient_equal_trl(tiny_models: dict[str, str], reward_run: str,
                                            tmp_path: Path) -> None:  # fmt: skip
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    model = _perturbed(_policy(tiny_models, reward_run))
    form = model.formulation
    assert isinstance(form, RLOOPrompts)
    # Two prompts of one length: TRL left-pads without position ids.
    feats = form.encode_examples(_examples()[:2])
    assert len({len(f["prompt_ids"]) for f in feats}) == 1
    batch = form.collate(feats)
    tokens, cmask = _sampled_with_stops(form, model, batch)
    seq = form._sequences(batch, tokens, cmask, 2)
    advantages = torch.tensor([0.7, -0.7, -1.3, 1.3])
    params = [p for p in model.module.parameters() if p.requires_grad]
    logps = form.sequence_logprobs(model.module, seq)
    ours = rloo_policy_loss(logps, advantages)
    ours_grad = torch.autograd.grad(ours, params)

    trainer = RLOOTrainer(model=model.module, processing_class=model.tokenizer,
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=RLOOConfig(output_dir=str(tmp_path / "trl"), report_to=[],
                                          use_cpu=True, beta=0.0, num_generations=2,
                                          per_device_train_batch_size=2,
                                          bf16=False),  # TRL's default is bf16 autocast
                          train_dataset=Dataset.from_list([{"prompt": "a"}]))  # fmt: skip
    prompt_ids = batch["prompt_ids"].repeat_interleave(2, 0)
    prompt_mask = batch["prompt_mask"].repeat_interleave(2, 0)
    with torch.no_grad():  # TRL's own log-probs of the same completions (its fused head)
        per_token = trainer._get_per_token_logps_and_entropies(
            model.module, torch.cat([prompt_ids, tokens], 1),
            torch.cat([prompt_mask, cmask.long()], 1), tokens.shape[1])[0]  # fmt: skip
    theirs_logps = (per_token * cmask).sum(1)
    torch.testing.assert_close(theirs_logps, logps.detach(), rtol=1e-5, atol=1e-5)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": tokens,
              "completion_mask": cmask.long(), "old_logps": theirs_logps,
              "advantages": advantages}  # fmt: skip
    theirs = trainer._compute_loss(model.module, inputs)
    theirs_grad = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert abs(ours.item()) < 1e-6  # ratio 1: the value is -mean(A), here 0
    assert any(g.abs().sum() > 0 for g in ours_grad)
    mine = torch.cat([g.flatten() for g in ours_grad])
    trl = torch.cat([g.flatten() for g in theirs_grad])
    assert (mine - trl).norm() <= 1e-4 * mine.norm()  # equal to float32 noise (2e-5 seen)


def test_a_fresh_policy_ties_with_the_base_model(tiny_models: dict[str, str],
                                                 reward_run: str) -> None:  # fmt: skip
    """A new adapter (B = 0) is the base model: same answers, same rewards, KL 0; the
    loss is log 2 and ties count as losses."""
    from fedtune.evaluate import evaluate_features

    model = _policy(tiny_models, reward_run)
    form = model.formulation
    (loss_sum, n), scores = form.evaluate(model.module, form.collate(
        form.encode_examples(_examples())))  # fmt: skip
    assert scores.shape == (4, 3) and n == 4
    torch.testing.assert_close(scores[:, 0], scores[:, 1])
    torch.testing.assert_close(scores[:, 2], torch.zeros(4), atol=1e-5, rtol=0)
    assert math.isclose(float(loss_sum / n), math.log(2), rel_tol=1e-5)
    metrics = evaluate_features(model, form.encode_examples(_examples()))
    assert metrics.values["pair_accuracy"] == 0.0 and abs(metrics.values["kl"]) < 1e-5
    assert metrics.values["ties"] == 1.0
    assert metrics.values["reward"] == pytest.approx(float(scores[:, 0].mean().detach()), abs=1e-5)


def test_a_judge_scores_evaluation_and_the_reward_model_training(
        tiny_models: dict[str, str], reward_run: str, pairs_file: Path,
        tmp_path: Path) -> None:  # fmt: skip
    """method.judge_model: a second reward model, here trained on other pairs than the
    policy's reward model (data.limit_skip), scores the evaluation; the reward model
    still scores training samples."""
    from fedtune.regimes import run_centralized

    judge = run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp_path, "method.name=reward",
                                 "method.lr=0.01", "data.limit=20", "data.limit_skip=20",
                                 "name=judge"))  # fmt: skip
    assert judge["n_train"] == 20
    judged = _policy(tiny_models, reward_run, judge_model=str(judge["run_dir"]))
    plain = _policy(tiny_models, reward_run)
    form = judged.formulation
    assert isinstance(form, RLOOPrompts) and isinstance(plain.formulation, RLOOPrompts)
    batch = form.collate(form.encode_examples(_examples()))
    _, by_judge = form.evaluate(judged.module, batch)
    _, by_reward = plain.formulation.evaluate(plain.module, plain.formulation.collate(
        plain.formulation.encode_examples(_examples())))  # fmt: skip
    # Fresh adapters answer as the base model: the same answers, two different scorers.
    assert not torch.allclose(by_judge[:, 0], by_reward[:, 0])
    tokens, before = form.complete(judged.module, batch, 1, sample=False)
    torch.testing.assert_close(form.rewards_of(batch, tokens, before, 1), by_reward[:, 0])
    torch.testing.assert_close(form.rewards_of(batch, tokens, before, 1, judge=True),
                               by_judge[:, 0])  # fmt: skip
    assert form.judge is not form.scorer  # both stay loaded (two scorers at most)
    with pytest.raises(ConfigError, match=r"method\.judge_model = .* does not exist"):
        _ = _policy(tiny_models, reward_run, judge_model=str(tmp_path / "nope")).formulation.judge


def test_sampling_ends_at_the_end_token_and_the_loss_reports_reward(
    tiny_models: dict[str, str], reward_run: str
) -> None:
    model = _policy(tiny_models, reward_run, num_generations=3)
    form = model.formulation
    assert isinstance(form, RLOOPrompts)
    batch = form.collate(form.encode_examples(_examples()))
    torch.manual_seed(1)
    tokens, before = form.complete(model.module, batch, 3, sample=True)
    assert tokens.shape[0] == 12 and tokens.shape[1] <= 6
    stops = torch.tensor([model.tokenizer.eos_token_id])
    for row, keep in zip(tokens, before, strict=True):
        kept = row[keep]
        assert not torch.isin(kept, stops).any()  # nothing at or after the end token
    # The reported value is -(mean penalised reward): RLOO's own term is 0.
    torch.manual_seed(2)
    loss = form.loss(model.module, batch)
    torch.manual_seed(2)
    tokens, before = form.complete(model.module, batch, 3, sample=True)
    rewards = form.rewards_of(batch, tokens, before, 3)  # KL is 0 for a fresh adapter
    assert loss.item() == pytest.approx(-rewards.mean().item(), abs=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.module.parameters() if p.requires_grad)  # fmt: skip


class LetterJudge:
    """A dense stand-in reward: the share of a response's characters that are a-z."""

    def prompt_ids(self, instructions: list[str], contexts: list[str]) -> list[list[int]]:
        return [[0] for _ in instructions]

    def to(self, device: torch.device) -> LetterJudge:
        return self

    def score(self, prompts: object, responses: list[str], whole: object,
              batch_size: int = 16) -> torch.Tensor:  # fmt: skip
        return torch.tensor([sum(c in "abcdefghijklmnopqrstuvwxyz" for c in r) / max(len(r), 1)
                             for r in responses])  # fmt: skip


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_rl_raises_reward_saves_loads_and_federates(
    tiny_models: dict[str, str], pairs_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, method: str,
) -> None:  # fmt: skip
    """RLOO and GRPO move the policy towards what the judge rewards. The tiny random Llama's
    output barely responds to LoRA on its inner layers (supervised training cannot move
    it either), so the adapter sits on the LM head here; the sparse toy reward model is
    replaced by a dense judge so that a few steps have signal."""
    import fedtune.rlhf
    from fedtune.evaluate import evaluate_features
    from fedtune.federated.compare import run_regimes
    from fedtune.regimes import run_centralized

    monkeypatch.setattr(fedtune.rlhf, "reward_scorer", lambda path: LetterJudge())
    extra = (f"method.name={method}", "method.reward_model=judge", "method.lr=0.05",
             "method.target_modules=lm_head", "method.dropout=0", "method.max_new_tokens=4",
             "method.beta=0.01", "model.max_target_length=6", "train.epochs=3",
             "train.batch_size=6", "data.limit=36", "train.warmup_ratio=0")  # fmt: skip
    summary = run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp_path, *extra,
                                   "name=rl"))  # fmt: skip
    assert summary["task"] == "preference" and summary["method"] == method
    # The trained policy's greedy answers beat the base model's, as judged.
    assert summary["pair_accuracy"] > 0.9 and summary["reward_margin"] > 0.1
    assert summary["reward"] > 0.9 and summary["kl"] > 0 and summary["ties"] < 0.1
    run = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in records if r.get("event") == "eval"]
    assert train_losses[-1] < train_losses[0] - 0.1  # -(mean reward of the samples) fell
    loaded = AdaptedModel.load(run / "model")
    again = evaluate_features(loaded, loaded.formulation.encode_examples(_examples("odd")))
    assert again.values["pair_accuracy"] > 0.9
    out = run_regimes(_cfg(pairs_file, tiny_models["llama"], tmp_path, *extra,
                           "federated.rounds=2", "federated.sites=2", "name=rlfed"),
                      regimes=("federated",))  # fmt: skip
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["regime"] for r in rows] == ["federated"] and rows[0]["reward_margin"] > 0


def test_rloo_errors_name_the_fix(tiny_models: dict[str, str], reward_run: str,
                                  pairs_file: Path, tmp_path: Path) -> None:  # fmt: skip
    from fedtune.regimes import run_centralized

    with pytest.raises(ConfigError, match=r"set method\.reward_model"):
        run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp_path, "method.name=rloo"))
    with pytest.raises(ConfigError, match=r"does not exist"):
        run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp_path, "method.name=rloo",
                             f"method.reward_model={tmp_path / 'nope'}"))  # fmt: skip
    dpo = run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp_path, "method.name=dpo",
                               "train.epochs=1", "name=d"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"is a dpo model, not a reward model"):
        run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp_path, "method.name=rloo",
                             f"method.reward_model={dpo['run_dir']}"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"num_generations = 1 must be >= 2"):
        _policy(tiny_models, reward_run, num_generations=1)
    with pytest.raises(ConfigError, match=r"set data\.task=preference"):
        run_centralized(_cfg(pairs_file, tiny_models["llama"], tmp_path, "method.name=rloo",
                             "data.task=generation", "data.response_column=chosen"))  # fmt: skip


# --- GRPO ---------------------------------------------------------------------------


def test_grpo_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    std2 = math.sqrt((4 + 4 + 16) / 2)  # Bessel-corrected, as TRL's nanstd
    s2 = std2 + 1e-4
    expected = torch.tensor([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), -2 / s2, -2 / s2, 4 / s2])
    torch.testing.assert_close(grpo_advantages(rewards, 3), expected)
    torch.testing.assert_close(grpo_advantages(rewards, 3, "none"),
                               torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))  # fmt: skip
    torch.testing.assert_close(grpo_advantages(rewards, 3, "batch"),
                               torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
                               / (rewards.std() + 1e-4))  # fmt: skip
    with pytest.raises(ConfigError, match="at least 2"):
        grpo_advantages(rewards, 1)
    with pytest.raises(ConfigError, match=r"scale_rewards = 'x'"):
        grpo_advantages(rewards, 3, "x")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_loss_and_gradient_equal_trl(tiny_models: dict[str, str], reward_run: str,
                                          tmp_path: Path, loss_type: str) -> None:  # fmt: skip
    """fedtune's GRPO loss (KL term on) against TRL's GRPOTrainer._compute_loss on the
    same sampled completions, advantages and reference log-probs."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model = _perturbed(_policy(tiny_models, reward_run, method="grpo", loss_type=loss_type,
                               beta=0.2))  # fmt: skip
    form = model.formulation
    assert isinstance(form, GRPOPrompts)
    feats = form.encode_examples(_examples()[:2])
    assert len({len(f["prompt_ids"]) for f in feats}) == 1  # TRL: no position ids
    batch = form.collate(feats)
    tokens, cmask = _sampled_with_stops(form, model, batch)
    seq = form._sequences(batch, tokens, cmask, 2)
    model.module.eval()  # TRL normalises by its accumulation steps in training mode
    advantages = torch.tensor([0.7, -0.7, -1.3, 1.3])
    params = [p for p in model.module.parameters() if p.requires_grad]
    logps, mask = form.token_logprobs(model.module, seq)
    ref = form.reference_token_logprobs(model.module, seq)
    assert (logps - ref).abs().max() > 1e-3  # the perturbed adapter moved the policy
    ours = grpo_policy_loss(logps, mask, advantages, 0.2, ref, loss_type)
    ours_grad = torch.autograd.grad(ours, params, retain_graph=True)
    # Completions of 3, 1 and 6 tokens: the two averagings differ, as does the KL term.
    other = {"dapo": "grpo", "grpo": "dapo"}[loss_type]
    averaged_otherwise = grpo_policy_loss(logps, mask, advantages, 0.2, ref, other)
    assert abs(ours.item() - averaged_otherwise.item()) > 1e-3
    assert abs(ours.item() - grpo_policy_loss(logps, mask, advantages, 0.0).item()) > 1e-3

    trainer = GRPOTrainer(model=model.module, processing_class=model.tokenizer,
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[],
                                          use_cpu=True, beta=0.2, loss_type=loss_type,
                                          num_generations=2, per_device_train_batch_size=2,
                                          bf16=False),
                          train_dataset=Dataset.from_list([{"prompt": "a"}]))  # fmt: skip
    # TRL's per-token log-probs [N, L] of the completions: ours sit at the same tokens.
    width = tokens.shape[1]
    starts = seq["prompt_len"] - 1
    pick = starts[:, None] + torch.arange(width)[None, :]
    ours_tok = logps.gather(1, pick.clamp(max=logps.shape[1] - 1)) * cmask
    prompt_ids = batch["prompt_ids"].repeat_interleave(2, 0)
    prompt_mask = batch["prompt_mask"].repeat_interleave(2, 0)
    with torch.no_grad():
        theirs_tok = trainer._get_per_token_logps_and_entropies(
            model.module, torch.cat([prompt_ids, tokens], 1),
            torch.cat([prompt_mask, cmask.long()], 1), width)[0] * cmask  # fmt: skip
    torch.testing.assert_close(theirs_tok, ours_tok.detach(), rtol=1e-5, atol=1e-5)
    ref_tok = ref.gather(1, pick.clamp(max=ref.shape[1] - 1)) * cmask
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": tokens,
              "completion_mask": cmask.long(), "advantages": advantages,
              "ref_per_token_logps": ref_tok, "num_items_in_batch": cmask.sum()}  # fmt: skip
    theirs = trainer._compute_loss(model.module, inputs)
    theirs_grad = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    mine = torch.cat([g.flatten() for g in ours_grad])
    trl = torch.cat([g.flatten() for g in theirs_grad])
    assert mine.norm() > 0 and (mine - trl).norm() <= 1e-4 * mine.norm()


def test_rl_trains_on_prompts_alone_and_pair_methods_refuse_them(
    tiny_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of prompts without answers (Alpaca-like: `instruction`, an `output` that
    is not a preference) trains an RL policy; reward and DPO say what they need."""
    import fedtune.rlhf
    from fedtune.data import load_examples
    from fedtune.regimes import run_centralized

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Is {i % 7} a good number? ({i})",
                                          "output": "yes", "category": "even" if i % 2 else "odd"})
                              for i in range(48)))  # fmt: skip
    examples = load_examples(_cfg(path, tiny_models["llama"], tmp_path).data)
    assert len(examples) == 48 and all(not e.response and not e.rejected for e in examples)
    assert examples[0].text == "Is 0 a good number? (0)"
    monkeypatch.setattr(fedtune.rlhf, "reward_scorer", lambda path: LetterJudge())
    summary = run_centralized(_cfg(
        path, tiny_models["llama"], tmp_path, "method.name=grpo", "method.reward_model=judge",
        "method.lr=0.05", "method.target_modules=lm_head", "method.dropout=0",
        "method.max_new_tokens=4", "model.max_target_length=6", "train.epochs=3",
        "train.batch_size=6", "train.warmup_ratio=0", "name=prompts"))  # fmt: skip
    assert summary["method"] == "grpo" and summary["n_train"] > 30
    assert summary["pair_accuracy"] > 0.9  # the policy beats the base model, as judged
    for method in ("reward", "dpo"):
        with pytest.raises(ConfigError, match=r"prompts without answers.*method rloo or grpo"):
            run_centralized(_cfg(path, tiny_models["llama"], tmp_path, f"method.name={method}",
                                 f"name={method}"))  # fmt: skip
        assert not (tmp_path / "runs" / method).exists()  # nothing half-written left
