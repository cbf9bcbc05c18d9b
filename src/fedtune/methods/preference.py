"""Learning from human preferences: a reward model (`reward`) and direct preference
optimisation (`dpo`), both as LoRA adapters of a decoder, trained on
`data.task = "preference"` pairs (fedtune.preference has the two losses).

- `reward`: the survey's first RLHF stage. The decoder gets one scalar output on its
  last token (transformers' *ForSequenceClassification, PEFT's SEQ_CLS task: the new
  `score` head is trained in full next to the LoRA matrices, and crosses site
  boundaries with them). The saved adapter loads in plain PEFT
  (AutoPeftModelForSequenceClassification) and gives the same rewards.
- `dpo`: the preference objective without a separate reward model; the reference is
  the base model, reached by switching the adapter off, so every site and the server
  share it without exchanging it.

Why methods and not options of `lora`: the objective decides the model's head
(reward) and needs the adapter switched off for its reference (DPO), which only these
methods guarantee. Both take every LoRA key (r, alpha, target_modules...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import peft as hf_peft
from transformers import PreTrainedModel

from fedtune.methods import register
from fedtune.methods.peft import LoraConfig, LoraMethod
from fedtune.models import Kind


@dataclass(frozen=True)
class RewardConfig(LoraConfig):
    """A LoRA adapter plus a scalar head, trained with the Bradley-Terry pair loss."""

    lr: float = 5e-4


@dataclass(frozen=True)
class DpoConfig(LoraConfig):
    """A LoRA adapter trained with DPO's loss against the adapter-free base model."""

    lr: float = 5e-4
    beta: float = 0.1
    """DPO's temperature: how far the policy may move from the reference (the paper's
    and TRL's default, 0.1; smaller lets it move further)."""


@register
class RewardMethod(LoraMethod):
    name = "reward"
    description = "Reward model: LoRA + a scalar head, Bradley-Terry loss on preference pairs."
    config_class = RewardConfig
    objective: ClassVar[str] = "reward"
    head: ClassVar[str] = "score"

    def peft_config(self, model: PreTrainedModel, kind: Kind) -> hf_peft.PeftConfig:
        config = super().peft_config(model, kind)
        # SEQ_CLS: PEFT trains (and saves) the new scalar head `score` next to LoRA.
        config.task_type = hf_peft.TaskType.SEQ_CLS
        return config


@register
class DpoMethod(LoraMethod):
    name = "dpo"
    description = "DPO: a LoRA policy trained on preference pairs against the frozen base model."
    config_class = DpoConfig
    objective: ClassVar[str] = "dpo"
