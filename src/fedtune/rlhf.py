"""RL from a reward model (the survey's RLHF stage two): RLOO or GRPO on the prompts
of preference data, scored online by a trained fedtune reward model.

Each step, for B prompts:

1. the policy (the LoRA-adapted LM, dropout off) samples k completions per prompt
   (`method.num_generations`, temperature `method.temperature`, up to
   `method.max_new_tokens` tokens, a completion ending at its first end token);
2. the frozen reward model (`method.reward_model`: a run of method `reward`) scores
   each (prompt, completion), through its own tokenizer and prompt rendering, so the
   policy and the reward model need not share a base;
3. each reward is penalised by beta x KL, KL being the completion's summed log-ratio
   log pi(y|x) - log pi_ref(y|x), the reference being the base model reached by
   switching the adapter off (as for DPO: no second copy, and in a federation every
   site holds the same reference);
4. the advantage of a completion is its penalised reward minus the mean of the other
   k-1 completions of the same prompt (REINFORCE leave-one-out, Ahmadian et al. 2024);
5. the loss is -mean(A x exp(log pi(y|x) - log pi(y|x).detach())), whose gradient is
   -mean(A x grad log pi(y|x)) with log pi summed over the completion's tokens.

Steps 3-5 are TRL 1.16's RLOOTrainer with one update per generation batch (its
`num_iterations` = 1, so its ratio clipping never acts) and unnormalised advantages,
its defaults; tests/test_rlhf.py checks the loss and its gradient against
`RLOOTrainer._compute_loss`. Written here rather than run through TRL because
fedtune's training loop (federated rounds, sites' optimizer state, checkpoints)
drives every method; RLOO is a loss over a batch like any other.

The loss *value* that training reports adds the step's mean penalised reward, negated
and detached (it does not change the gradient): the train loss falls as the policy
earns more reward, instead of RLOO's policy loss, which is zero by construction.

GRPO (method `grpo`, Shao et al. 2024, `GRPOPrompts`) shares steps 1-2 and differs
after: no KL in the reward; each completion's advantage is its reward minus the mean of
its prompt's k (all of them, itself included), divided by their standard deviation
(`method.scale_rewards = "group"`; "batch": the batch's; "none": not scaled); the loss
is per token, -A x ratio + beta x KL_t x ratio with KL_t = exp(r_t) - r_t - 1, r_t =
log pi_ref - log pi at token t (the k3 estimator; x ratio is TRL's bias correction,
value 1, gradient KL_t x grad log pi), averaged over all the batch's completion
tokens (`method.loss_type = "dapo"`, TRL's default) or over each completion's tokens
and then the completions ("grpo", the paper's). That is TRL 1.16's GRPOTrainer at one
update per generation batch (`num_iterations` = 1: the clipped and unclipped ratios are
both 1); tests/test_rlhf.py checks loss and gradient against `GRPOTrainer._compute_loss`
for both averagings on completions of unequal lengths (one of them empty). The value
reported adds the step's mean reward (unpenalised: the KL is in the loss), negated
and detached, as for RLOO; the policy part is beta x KL plus, under `dapo`, a small
-A term weighted by the completions' lengths.

Evaluation (validation between rounds, the test set) pits the policy against the
base model: both answer each prompt greedily, the judge scores both: a second reward
model (`method.judge_model`, trained on other pairs) when given, else the training one. Scores per
prompt are (reward of the policy's answer, reward of the base's answer, KL of the
policy's answer), so the preference metrics read as: pair_accuracy = the policy's
win rate over the base model, reward_margin = its mean reward gain, kl = how far it
has moved. The loss is -log sigmoid(gain), the Bradley-Terry probability that the
reward model prefers the policy's answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedtune.classify import Feature, pad_batch
from fedtune.errors import ConfigError
from fedtune.generate import _stop_ids
from fedtune.preference import PolicyLM

if TYPE_CHECKING:
    from fedtune.adapted import AdaptedModel
    from fedtune.data.sources import Example


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """Leave-one-out advantages of rewards [N * k] (k consecutive per prompt): each
    minus the mean of its prompt's other k - 1."""
    if k < 2:
        raise ConfigError(f"method.num_generations = {k}: RLOO needs at least 2 per prompt")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def rloo_policy_loss(logps: Tensor, advantages: Tensor) -> Tensor:
    """-mean(A x ratio) with ratio = exp(logp - logp.detach()) = 1: the value is
    -mean(A), the gradient -mean(A grad logp) (TRL's RLOO loss at one iteration)."""
    return -(torch.exp(logps - logps.detach()) * advantages).mean()


def before_stop(tokens: Tensor, stops: Sequence[int]) -> Tensor:
    """[N, L] True strictly before each row's first end token (everywhere when none
    came): the answer's own tokens; `RLOOPrompts._with_stop` adds the end token."""
    is_stop = torch.isin(tokens, torch.tensor(list(stops), device=tokens.device))
    return is_stop.long().cumsum(1) == 0


def grpo_advantages(rewards: Tensor, k: int, scale: str = "group") -> Tensor:
    """GRPO's advantages of rewards [N * k] (k consecutive per prompt): each minus its
    prompt's mean, divided by the prompt's (`group`) or the batch's (`batch`) standard
    deviation (Bessel-corrected, + 1e-4, as TRL), or not divided (`none`)."""
    if k < 2:
        raise ConfigError(f"method.num_generations = {k}: GRPO needs at least 2 per prompt")
    grouped = rewards.view(-1, k)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    elif scale != "none":
        raise ConfigError(f"method.scale_rewards = {scale!r}: choose group, batch or none")
    return advantages.reshape(-1)


def grpo_policy_loss(logps: Tensor, mask: Tensor, advantages: Tensor, beta: float = 0.0,
                     ref_logps: Tensor | None = None, loss_type: str = "dapo",
                     ) -> Tensor:  # fmt: skip
    """GRPO's loss from per-token log-probs [N, T] (mask [N, T]: the completion tokens),
    advantages [N] and, for beta > 0, the reference's per-token log-probs: -A x ratio
    (ratio = exp(logp - logp.detach()) = 1) + beta x (exp(d) - d - 1) x ratio, d = ref - logp,
    averaged over every completion token of the batch (`dapo`) or per completion first
    (`grpo`)."""
    ratio = torch.exp(logps - logps.detach())
    per_token = -ratio * advantages[:, None]
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        d = ref_logps - logps
        # x ratio (value 1): TRL's bias correction; its gradient adds KL_t x grad logp,
        # the score-function term the k3 estimator's own gradient leaves out.
        per_token = per_token + beta * (torch.exp(d) - d - 1) * ratio
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    raise ConfigError(f"method.loss_type = {loss_type!r}: choose dapo or grpo")


class RewardScorer:
    """A trained fedtune reward model, frozen: rewards of (prompt, response) texts."""

    def __init__(self, path: str, key: str = "method.reward_model"):
        from fedtune.adapted import AdaptedModel
        from fedtune.preference import RewardPairs
        from fedtune.runs import find_model_dir

        if not path:
            raise ConfigError(
                f"method rloo or grpo needs a reward model: set {key} to a run of method "
                "reward (fedtune train --task preference --method reward ...)"
            )
        if not Path(path).exists():
            raise ConfigError(
                f"{key} = {path!r} does not exist; train one with fedtune train "
                "--task preference --method reward, and give its run directory"
            )
        model = AdaptedModel.load(find_model_dir(path))
        if not isinstance(model.formulation, RewardPairs):
            raise ConfigError(
                f"{key} = {path!r} is a {model.method.name} model, not a reward "
                "model; give a run of method reward"
            )
        for p in model.module.parameters():
            p.requires_grad_(False)
        model.module.eval()
        self.model: AdaptedModel = model
        self.formulation: RewardPairs = model.formulation

    def prompt_ids(self, instructions: Sequence[str], contexts: Sequence[str]) -> list[list[int]]:
        return self.formulation.prompt_ids(instructions, contexts)

    def to(self, device: torch.device) -> RewardScorer:
        """Onto the policy's device (a no-op once there)."""
        self.model.module.to(device)
        return self

    @torch.no_grad()
    def score(self, prompts: Sequence[list[int]], responses: Sequence[str],
              whole: Sequence[bool], batch_size: int = 16) -> Tensor:  # fmt: skip
        """Reward [N] of each prompt (the reward model's ids) + response text; a whole
        response (it ended at an end token) gets the end token it was trained with."""
        form, tok = self.formulation, self.formulation.tokenizer
        ids = tok(list(responses), add_special_tokens=False)["input_ids"] if responses else []
        seqs = [list(p) + (form._target(r) if w else r[: form.max_target_length])
                for p, r, w in zip(prompts, ids, whole, strict=True)]  # fmt: skip
        module = self.model.module
        device = next(module.parameters()).device
        out = []
        for start in range(0, len(seqs), batch_size):
            tokens, mask = form._pad(seqs[start : start + batch_size])
            logits = module(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits
            out.append(logits.squeeze(-1).float())
        return torch.cat(out) if out else torch.zeros(0)


_SCORERS: dict[tuple[str, float], RewardScorer] = {}
"""Loaded reward models by (resolved path, mtime): sites in one process share them."""


def reward_scorer(path: str, key: str = "method.reward_model") -> RewardScorer:
    """The reward model of run `path`, loaded once. At most two stay loaded (the
    training reward model and a judge): each is a whole LM."""
    name = str(Path(path).resolve()) if path else ""
    stamp = Path(name).stat().st_mtime if name and Path(name).exists() else 0.0
    if (name, stamp) in _SCORERS:  # least recently used first
        _SCORERS[(name, stamp)] = _SCORERS.pop((name, stamp))
    else:
        while len(_SCORERS) >= 2:  # evict before loading: two LMs at most in memory
            _SCORERS.pop(next(iter(_SCORERS)))
        _SCORERS[(name, stamp)] = RewardScorer(path, key)
    return _SCORERS[(name, stamp)]


class RLOOPrompts(PolicyLM):
    """Prompts in, RLOO's loss out (see the module docstring)."""

    task: ClassVar[str] = "preference"

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], max_length: int,
        template: str, chat: str = "auto", max_target_length: int = 128,
        system_prompt: str = "", context_keep: str = "auto", reward_model: str = "",
        judge_model: str = "", num_generations: int = 4,
        beta: float = 0.05, temperature: float = 1.0, max_new_tokens: int = 64,
    ):  # fmt: skip
        super().__init__(tokenizer, labels, max_length, template, chat, max_target_length,
                         system_prompt, context_keep)  # fmt: skip
        problems = []
        if num_generations < 2:
            problems.append(f"method.num_generations = {num_generations} must be >= 2 "
                            "(the leave-one-out baseline needs another sample)")  # fmt: skip
        if beta < 0:
            problems.append(f"method.beta = {beta} must be >= 0 (0: no KL penalty)")
        if temperature <= 0:
            problems.append(f"method.temperature = {temperature} must be > 0 (1.0 samples "
                            "the policy as it is)")  # fmt: skip
        if max_new_tokens < 1:
            problems.append(f"method.max_new_tokens = {max_new_tokens} must be >= 1")
        if problems:
            raise ConfigError("; ".join(problems))
        self.reward_model = reward_model
        self.judge_model = judge_model
        self.k = num_generations
        self.beta = beta
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens

    @property
    def scorer(self) -> RewardScorer:
        """The reward model, loaded on first use (building or loading the policy does
        not need it)."""
        return reward_scorer(self.reward_model)

    @property
    def judge(self) -> RewardScorer:
        """The reward model that scores evaluation: `judge_model` if given, else the
        training one."""
        if self.judge_model:
            return reward_scorer(self.judge_model, "method.judge_model")
        return self.scorer

    # --- the Formulation contract -----------------------------------------------------

    def encode_examples(self, examples: Sequence[Example]) -> list[Feature]:
        """Only the prompts of preference examples (their chosen/rejected answers are
        what the reward model learnt from, not used here)."""
        cats = self.category_ids(examples)
        texts, contexts = [e.text for e in examples], [e.context for e in examples]
        prompts = self.prompt_ids(texts, contexts)
        judged = self.scorer.prompt_ids(texts, contexts)
        # The judge's own prompt rendering (its tokenizer may differ from the reward model's).
        by_judge = self.judge.prompt_ids(texts, contexts) if self.judge_model else judged
        return [{"prompt_ids": p, "reward_prompt_ids": r, "judge_prompt_ids": j,
                 "length": len(p), "labels": c}
                for p, r, j, c in zip(prompts, judged, by_judge, cats, strict=True)]  # fmt: skip

    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Feature]:
        raise ConfigError(
            "an RL policy (rloo, grpo) is trained and evaluated on prompts of preference data "
            "(data.task=preference); to answer instructions, load it for generation"
        )

    def collate(self, features: list[Feature]) -> dict[str, Tensor]:
        """Prompts left padded (generation appends on the right); the reward model's
        prompts right padded, with their lengths."""
        ids, mask = pad_batch([f["prompt_ids"] for f in features], self.tokenizer.pad_token_id,
                              left=True)  # fmt: skip
        out = {"prompt_ids": ids, "prompt_mask": mask,
               "labels": torch.tensor([f["labels"] for f in features])}  # fmt: skip
        for key in ("reward", "judge") if self.judge_model else ("reward",):
            rows = [f[f"{key}_prompt_ids"] for f in features]
            out[f"{key}_prompt_ids"], _ = self._pad(rows)
            out[f"{key}_prompt_len"] = torch.tensor([len(r) for r in rows])
        if not self.judge_model:  # the reward model judges: its prompts, padded once
            out["judge_prompt_ids"] = out["reward_prompt_ids"]
            out["judge_prompt_len"] = out["reward_prompt_len"]
        return out

    # --- sampling, scoring ------------------------------------------------------------

    @torch.no_grad()
    def complete(self, model: nn.Module, batch: dict[str, Tensor], k: int, sample: bool,
                 reference: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
        """k completions per prompt -> (token ids [B*k, L], mask [B*k, L] up to and
        including each one's first end token). `sample`: the policy's distribution at
        `temperature`; else greedy. `reference`: the base model (adapter off)."""
        from contextlib import nullcontext

        from transformers import GenerationConfig

        ids = batch["prompt_ids"].repeat_interleave(k, 0)
        mask = batch["prompt_mask"].repeat_interleave(k, 0)
        stops = _stop_ids(model, self.tokenizer)
        options: dict[str, Any] = (
            {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
            if sample else {"do_sample": False}
        )  # fmt: skip
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, num_beams=1,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=stops, **options)  # fmt: skip
        was_training = model.training
        model.eval()  # no dropout while sampling: the policy as it would answer
        try:
            with self._reference(model) if reference else nullcontext():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # type: ignore[operator]
        finally:
            model.train(was_training)
        tokens = out[:, ids.shape[1] :]
        return tokens, before_stop(tokens, stops)

    def _reference(self, model: nn.Module) -> Any:
        disable = getattr(model, "disable_adapter", None)
        if disable is None:
            raise ConfigError(
                "the RL reference is the base model with the adapter switched off; this model "
                "has no adapter (use method rloo or grpo, which train a LoRA adapter)"
            )
        return disable()

    def _sequences(self, batch: dict[str, Tensor], tokens: Tensor, cmask: Tensor,
                   k: int) -> dict[str, Tensor]:  # fmt: skip
        """Prompt (unpadded) + completion rows, right padded, as the log-prob code reads."""
        prompts = [row[m.bool()].tolist() for row, m in
                   zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)]  # fmt: skip
        seqs, plens = [], []
        for i, (row, m) in enumerate(zip(tokens, cmask, strict=True)):
            prompt = prompts[i // k]
            seqs.append(prompt + row[m].tolist())
            plens.append(len(prompt))
        ids, mask = self._pad(seqs)
        device = tokens.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "prompt_len": torch.tensor(plens, device=device)}  # fmt: skip

    def rewards_of(self, batch: dict[str, Tensor], tokens: Tensor, cmask: Tensor,
                   k: int, judge: bool = False) -> Tensor:  # fmt: skip
        """The reward model's (`judge`: the judge's) reward [B*k] of each completion
        (decoded to text, re-read through that model's tokenizer)."""
        tok = self.tokenizer
        whole = (cmask.sum(1) < cmask.shape[1]).tolist()  # an end token came
        ends = cmask.sum(1).tolist()
        texts = [str(tok.decode(row[:end].tolist(), skip_special_tokens=True))
                 for row, end in zip(tokens, ends, strict=True)]  # fmt: skip
        key, scorer = ("judge", self.judge) if judge else ("reward", self.scorer)
        lens = batch[f"{key}_prompt_len"].tolist()
        rows = batch[f"{key}_prompt_ids"]
        prompts = [row[:n].tolist() for row, n in zip(rows, lens, strict=True)]
        judged = [prompts[i // k] for i in range(len(texts))]
        return scorer.to(tokens.device).score(judged, texts, whole).to(tokens.device)

    # --- objective and evaluation -----------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        k = self.k
        tokens, before = self.complete(model, batch, k, sample=True)
        seq = self._sequences(batch, tokens, self._with_stop(tokens, before), k)
        logps = self.sequence_logprobs(model, seq)
        kl = logps.detach() - self.reference_logprobs(model, seq)
        rewards = self.rewards_of(batch, tokens, before, k) - self.beta * kl
        advantages = rloo_advantages(rewards, k)
        return rloo_policy_loss(logps, advantages) - rewards.mean()

    @staticmethod
    def _with_stop(tokens: Tensor, before: Tensor) -> Tensor:
        """The completion mask with its end token: it is a choice the policy made."""
        first_stop = before.sum(1)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        return before | (pos == first_stop[:, None])

    def evaluate(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The policy's greedy answer against the base model's, scored by the judge
        (`judge_model`, else the reward model): (summed -log sigmoid(gain), prompts)
        and [B, 3] = (reward of the policy's answer, of the base's, KL of the policy's
        answer)."""
        tokens, before = self.complete(model, batch, 1, sample=False)
        base_tokens, base_before = self.complete(model, batch, 1, sample=False, reference=True)
        seq = self._sequences(batch, tokens, self._with_stop(tokens, before), 1)
        kl = self.sequence_logprobs(model, seq) - self.reference_logprobs(model, seq)
        policy = self.rewards_of(batch, tokens, before, 1, judge=True)
        base = self.rewards_of(batch, base_tokens, base_before, 1, judge=True)
        loss_sum = -F.logsigmoid(policy - base).sum()
        units = torch.tensor(float(len(policy)), device=policy.device)
        return torch.stack([loss_sum, units]), torch.stack([policy, base, kl.float()], dim=1)



class GRPOPrompts(RLOOPrompts):
    """Prompts in, GRPO's loss out (see the module docstring); sampling, scoring,
    evaluation and the judge are RLOO's."""

    def __init__(self, *args: Any, scale_rewards: str = "group", loss_type: str = "dapo",
                 **kwargs: Any):  # fmt: skip
        super().__init__(*args, **kwargs)  # the config checked both choices
        self.scale_rewards = scale_rewards
        self.loss_type = loss_type

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        k = self.k
        tokens, before = self.complete(model, batch, k, sample=True)
        seq = self._sequences(batch, tokens, self._with_stop(tokens, before), k)
        logps, mask = self.token_logprobs(model, seq)
        ref = self.reference_token_logprobs(model, seq) if self.beta else None
        rewards = self.rewards_of(batch, tokens, before, k)
        advantages = grpo_advantages(rewards, k, self.scale_rewards)
        policy = grpo_policy_loss(logps, mask, advantages, self.beta, ref, self.loss_type)
        return policy - rewards.mean()  # the value reported falls as reward rises
