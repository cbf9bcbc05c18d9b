"""Learning from human preferences: a reward model (`reward`), RL against it (`rloo`,
`grpo`) and direct preference optimisation (`dpo`), all as LoRA adapters of a decoder, trained
on `data.task = "preference"` data (fedtune.preference has the pair losses,
fedtune.rlhf the RL one).

- `reward`: the survey's first RLHF stage. The decoder gets one scalar output on its
  last token (transformers' *ForSequenceClassification, PEFT's SEQ_CLS task: the new
  `score` head is trained in full next to the LoRA matrices, and crosses site
  boundaries with them). The saved adapter loads in plain PEFT
  (AutoPeftModelForSequenceClassification) and gives the same rewards.
- `rloo`: the survey's second RLHF stage: the policy samples answers to the data's
  prompts, a trained `reward` model scores them, REINFORCE leave-one-out (with a KL
  penalty to the adapter-free base) moves the policy towards higher reward. Only the
  policy's LoRA state is trained and exchanged; every site loads the same reward model.
- `grpo`: the same stage with GRPO's objective (group-normalised advantages, a
  per-token KL term in the loss instead of the reward), the RL method of DeepSeekMath
  and most recent recipes.
- `dpo`: the preference objective without a separate reward model; the reference is
  the base model, reached by switching the adapter off, so every site and the server
  share it without exchanging it.

Why methods and not options of `lora`: the objective decides the model's head
(reward) and needs the adapter switched off for its reference (DPO), which only these
methods guarantee. Both take every LoRA key (r, alpha, target_modules...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

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


@dataclass(frozen=True)
class RlooConfig(LoraConfig):
    """A LoRA policy trained by RL (RLOO) against a trained reward model."""

    lr: float = 1e-4
    reward_model: str = ""
    """A run directory (or its model/ folder) of method `reward`: it scores the
    policy's samples, frozen. Required."""
    judge_model: str = ""
    """A second run of method `reward` that judges evaluation (validation and test: the
    win rate over the base model) in place of `reward_model`: a judge the policy was not
    trained against, ideally trained on other pairs (`data.limit_skip`). Empty: the
    training reward model judges, and its win rate includes any reward hacking."""
    num_generations: int = 4
    """Completions sampled per prompt (k): each one's baseline is the mean reward of the
    other k - 1 (>= 2; TRL's default is 2, more gives a steadier baseline)."""
    beta: float = 0.05
    """KL penalty: each reward minus beta x log(pi/pi_ref) summed over the completion
    (TRL's RLOO default, 0.05; 0 switches it off)."""
    temperature: float = 1.0
    max_new_tokens: int = 64
    """Tokens sampled at most per completion (a completion ends at its end token)."""


@register
class RlooMethod(LoraMethod):
    name = "rloo"
    description = "RLHF: a LoRA policy trained with RLOO against a trained reward model."
    config_class = RlooConfig
    objective: ClassVar[str] = "rloo"


@dataclass(frozen=True)
class GrpoConfig(RlooConfig):
    """A LoRA policy trained by RL (GRPO) against a trained reward model."""

    beta: float = 0.04
    """Weight of the per-token KL to the reference in the loss (the GRPO paper's 0.04;
    TRL 1.x defaults to 0, which also skips the reference's forward pass)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide each advantage by its prompt's reward standard deviation (`group`, the
    paper), the batch's (`batch`), or not (`none`, Dr. GRPO: no bias towards prompts
    whose samples score alike)."""
    loss_type: Literal["dapo", "grpo"] = "dapo"
    """Average the per-token loss over all the batch's completion tokens (`dapo`, TRL's
    default: long completions count by their length) or per completion first (`grpo`)."""


@register
class GrpoMethod(LoraMethod):
    name = "grpo"
    description = "RLHF: a LoRA policy trained with GRPO against a trained reward model."
    config_class = GrpoConfig
    objective: ClassVar[str] = "grpo"
