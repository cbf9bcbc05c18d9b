"""The preference task: a prompt, a chosen and a rejected response.

Two formulations, one per stage of learning from human preferences (the `reward` and
`dpo` methods pick theirs, fedtune.methods.preference):

- `RewardPairs`: a reward model, the causal LM with one scalar head on its last token
  (transformers' *ForSequenceClassification with one output). Bradley-Terry loss on
  each pair, -log sigmoid(r(chosen) - r(rejected)), as TRL's RewardTrainer computes it.
- `DPOPairs`: direct preference optimisation (Rafailov et al. 2023). The policy is the
  adapted LM, the reference the same LM with its adapter switched off (PEFT's
  `disable_adapter`), so no second copy of the model is held. The implicit reward of a
  response is beta * (log pi(y|x) - log pi_ref(y|x)), summed over its tokens; the loss
  is -log sigmoid(reward(chosen) - reward(rejected)), TRL's DPOTrainer "sigmoid" loss.

Both encode a pair as two sequences, prompt + chosen and prompt + rejected (each
response cut to `model.max_target_length` tokens and closed by the end-of-sequence
token when it is whole), rendered with the same prompt code as the generation task
(the chat template when the model has one). A batch of B pairs is [2B, T]: the B
chosen rows, then the B rejected rows. Scores are [B, 2]: the reward of the chosen and
of the rejected response; the metrics (fedtune.evaluate) count how often the chosen
one scores higher. tests/test_preference.py checks both losses against TRL's trainers.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedtune.classify import Feature
from fedtune.errors import ConfigError
from fedtune.generate import InstructionLM

if TYPE_CHECKING:
    from fedtune.data.sources import Example
    from fedtune.evaluate import Metrics

PREFERENCE_METRICS = ("pair_accuracy", "reward_margin")
"""Share of pairs whose chosen response gets the higher reward (ties count as wrong),
and the mean reward(chosen) - reward(rejected)."""


class PreferencePairs(InstructionLM):
    """What both formulations share: pair encoding, the pairwise loss, the scores."""

    task: ClassVar[str] = "preference"
    # A preference prompt's context is the dialogue's earlier turns: the newest stay.
    CONTEXT_KEEP: ClassVar[str] = "end"

    def encode_examples(self, examples: Sequence[Example]) -> list[Feature]:
        if any(not e.response and not e.rejected for e in examples):
            raise ConfigError(
                "this data holds prompts without answers (no chosen/rejected columns): a "
                "reward model and DPO learn from pairs; give data.response_column and "
                "data.rejected_column, or train a policy on the prompts with method rloo "
                "or grpo (method.reward_model = a trained reward run)"
            )
        categories = self.category_ids(examples)
        prompts = self.prompt_ids([e.text for e in examples], [e.context for e in examples])
        tok = self.tokenizer
        chosen = tok([e.response for e in examples], add_special_tokens=False)["input_ids"]
        rejected = tok([e.rejected for e in examples], add_special_tokens=False)["input_ids"]
        feats = []
        for cat, prompt, good, bad in zip(categories, prompts, chosen, rejected, strict=True):
            c, r = prompt + self._target(good), prompt + self._target(bad)
            feats.append({"chosen_ids": c, "rejected_ids": r, "prompt_len": len(prompt),
                          "length": max(len(c), len(r)), "labels": cat})  # fmt: skip
        return feats

    def _target(self, ids: list[int]) -> list[int]:
        """A response's tokens: cut to max_target_length, EOS only when it is whole."""
        if len(ids) > self.max_target_length:
            return ids[: self.max_target_length]
        return [*ids, self.tokenizer.eos_token_id]

    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Feature]:
        raise ConfigError(
            "a preference model scores (prompt, chosen, rejected) pairs, not single texts; "
            "evaluate it on preference data (fedtune run/compare with data.task=preference)"
        )

    def collate(self, features: list[Feature]) -> dict[str, Tensor]:
        """B pairs -> [2B, T]: the chosen rows, then the rejected rows (right padded)."""
        seqs = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        ids, mask = self._pad(seqs)
        plen = torch.tensor([f["prompt_len"] for f in features] * 2)
        return {"input_ids": ids, "attention_mask": mask, "prompt_len": plen,
                "labels": torch.tensor([f["labels"] for f in features])}  # fmt: skip

    @abstractmethod
    def rewards(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(reward of each chosen response [B], of each rejected response [B])."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        chosen, rejected = self.rewards(model, batch)
        return -F.logsigmoid(chosen - rejected).mean()

    def evaluate(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(summed pair loss, pairs) and scores [B, 2] = (reward chosen, reward rejected)."""
        chosen, rejected = self.rewards(model, batch)
        loss_sum = -F.logsigmoid(chosen - rejected).sum()
        units = torch.tensor(float(len(chosen)), device=chosen.device)
        return torch.stack([loss_sum, units]), torch.stack([chosen, rejected], dim=1)


class RewardPairs(PreferencePairs):
    """A reward model: the scalar head's output on each sequence's last real token."""

    def rewards(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        # transformers' *ForSequenceClassification reads the last token that is not the
        # pad token; fedtune pads on the right, so that is each sequence's end, or, where
        # the pad token is the end token (SmolLM2), the last token before a closing one.
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        scores = out.logits.squeeze(-1).float()  # [2B]
        chosen, rejected = scores.chunk(2)
        return chosen, rejected


class PolicyLM(InstructionLM):
    """A policy: the adapted LM's log-probabilities of responses, and the reference's
    (the same LM with its adapter switched off). DPO, RLOO and GRPO (fedtune.rlhf) share it."""

    CONTEXT_KEEP: ClassVar[str] = "end"  # preference prompts: the dialogue's newest turns

    def token_logprobs(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """log p(next token | earlier ones) at every response position -> ([rows, T-1]
        with zeros elsewhere, the response mask [rows, T-1])."""
        tmask = self._target_mask(batch)  # [rows, T-1]
        per_token = torch.zeros(tmask.shape, device=tmask.device)
        per_token[tmask] = self._target_logprobs(model, batch["input_ids"],
                                                 batch["attention_mask"], tmask)  # fmt: skip
        return per_token, tmask

    def sequence_logprobs(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Sum of log p(response tokens | prompt) of every row -> [rows]."""
        return self.token_logprobs(model, batch)[0].sum(-1)

    def reference_logprobs(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The same sums under the base model: the adapter switched off, no gradient."""
        return self.reference_token_logprobs(model, batch).sum(-1)

    def reference_token_logprobs(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """`token_logprobs` under the base model: the adapter switched off, no gradient."""
        disable = getattr(model, "disable_adapter", None)
        if disable is None:
            raise ConfigError(
                "the reference policy is the base model with the adapter switched off; this "
                "model has no adapter (use method dpo, rloo or grpo, which train a LoRA adapter)"
            )
        with torch.no_grad(), disable():
            return self.token_logprobs(model, batch)[0]


class DPOPairs(PreferencePairs, PolicyLM):
    """DPO: implicit rewards of the policy against the adapter-free reference."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], max_length: int,
        template: str, chat: str = "auto", max_target_length: int = 128,
        system_prompt: str = "", context_keep: str = "auto", beta: float = 0.1,
    ):  # fmt: skip
        super().__init__(tokenizer, labels, max_length, template, chat, max_target_length,
                         system_prompt, context_keep)  # fmt: skip
        if beta <= 0:
            raise ConfigError(f"method.beta = {beta} must be > 0 (DPO's usual value: 0.1)")
        self.beta = beta

    def rewards(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        ratios = self.sequence_logprobs(model, batch) - self.reference_logprobs(model, batch)
        chosen, rejected = (self.beta * ratios).chunk(2)
        return chosen, rejected


def preference_metrics(
    scores: np.ndarray, categories: Sequence[int], labels: Sequence[str], loss: float
) -> Metrics:
    """Pair accuracy and mean reward margin of scores [N, 2], overall and per category.
    A third column (an RLOO policy's answers, fedtune.rlhf: policy vs base model) is the
    KL of the first answer from the reference; its mean is reported as `kl`, the first
    column's mean as `reward`, and the share of equal rewards (the same answer, as a
    barely trained policy gives) as `ties`: pair_accuracy counts them as losses."""
    from fedtune.evaluate import Metrics

    def summary(s: np.ndarray) -> dict[str, float]:
        margin = s[:, 0] - s[:, 1]
        out = {"pair_accuracy": float((margin > 0).mean()), "reward_margin": float(margin.mean())}
        if s.shape[1] > 2:
            out.update(reward=float(s[:, 0].mean()), kl=float(s[:, 2].mean()),
                       ties=float((np.abs(margin) < 1e-4).mean()))
        return out

    cats = np.asarray(categories)
    per = {label: {**summary(scores[cats == i]), "n": int((cats == i).sum())}
           for i, label in enumerate(labels) if (cats == i).any()}  # fmt: skip
    won = (scores[:, 0] > scores[:, 1]).astype(float)  # [N]: the chosen answer scored higher
    return Metrics(loss=loss, n=len(scores), values=summary(scores), primary="pair_accuracy",
                   report=per, per_example=won.tolist())  # fmt: skip
