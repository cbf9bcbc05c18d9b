"""An adapted model: base model + method + classifier formulation + tokenizer,
with the operations every regime needs (trainable state, predict, save, load).

A saved model directory holds what the Hugging Face ecosystem loads without
fedtune (a PEFT adapter or a full transformers model, plus the tokenizer) and
`fedtune.json`, which says how fedtune rebuilds the same classifier.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedtune.classify import Formulation, GenerativeClassifier, HeadClassifier, to_device
from fedtune.config import MethodConfig, ModelConfig, method_config
from fedtune.errors import ConfigError, ModelError
from fedtune.methods import build_method, method_name_of
from fedtune.methods.base import Method
from fedtune.models import Kind, detect_kind, load_base_model, load_config, load_tokenizer

META_FILE = "fedtune.json"


def make_formulation(
    kind: Kind, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], cfg: ModelConfig,
    task: str = "classification", method: Method | None = None,
) -> Formulation:  # fmt: skip
    """The task as this kind of model poses it: a classifier head or label words for
    classification, instruction -> response language modelling for generation, the
    method's objective (reward model or DPO) on preference pairs."""
    objective = method.objective if method is not None else ""
    name = method.name if method is not None else ""
    if task != "classification" and kind == "encoder":
        raise ConfigError(
            f"data.task={task} needs a decoder (a causal LM); {cfg.name!r} is an "
            "encoder. Use e.g. --model smollm2 (`fedtune models`)"
        )
    if task == "preference":
        from fedtune.preference import DPOPairs, RewardPairs

        if objective not in ("reward", "dpo", "rloo", "grpo"):
            raise ConfigError(
                f"data.task=preference trains with method reward (a reward model), rloo or "
                f"grpo (RL against one) or dpo; method {name or '?'} has no preference objective"
            )
        if objective in ("rloo", "grpo"):
            from fedtune.rlhf import GRPOPrompts, RLOOPrompts

            mc: Any = method.config if method is not None else None
            rl = dict(reward_model=mc.reward_model, judge_model=mc.judge_model,
                      num_generations=mc.num_generations, beta=mc.beta,
                      temperature=mc.temperature, max_new_tokens=mc.max_new_tokens)  # fmt: skip
            if objective == "grpo":
                rl.update(scale_rewards=mc.scale_rewards, loss_type=mc.loss_type)
            return (GRPOPrompts if objective == "grpo" else RLOOPrompts)(
                tokenizer, labels, cfg.max_length, cfg.prompt_template, cfg.chat,
                cfg.max_target_length, cfg.system_prompt, cfg.context_keep, **rl)  # fmt: skip
        if objective == "reward":
            return RewardPairs(tokenizer, labels, cfg.max_length, cfg.prompt_template,
                               cfg.chat, cfg.max_target_length, cfg.system_prompt,
                               cfg.context_keep)  # fmt: skip
        return DPOPairs(tokenizer, labels, cfg.max_length, cfg.prompt_template, cfg.chat,
                        cfg.max_target_length, cfg.system_prompt, cfg.context_keep,
                        beta=getattr(method.config if method else None, "beta", 0.1))  # fmt: skip
    if objective:
        raise ConfigError(
            f"method {name} learns from preference pairs (prompt, chosen, rejected); set "
            f"data.task=preference (this run's task is {task})"
        )
    if task == "generation":
        from fedtune.generate import InstructionLM

        return InstructionLM(tokenizer, labels, cfg.max_length, cfg.prompt_template, cfg.chat,
                             cfg.max_target_length, cfg.system_prompt,
                             cfg.context_keep)  # fmt: skip
    if kind == "encoder":
        return HeadClassifier(tokenizer, labels, cfg.max_length)
    return GenerativeClassifier(tokenizer, labels, cfg.max_length, cfg.template, cfg.label_words)


@dataclass
class AdaptedModel:
    module: nn.Module
    tokenizer: PreTrainedTokenizerBase
    formulation: Formulation
    method: Method
    model_config: ModelConfig
    kind: Kind
    labels: tuple[str, ...]
    base_parameters: int
    """Parameter count of the base model (with its head) before adaptation."""

    @classmethod
    def build(
        cls,
        model_cfg: ModelConfig,
        method_cfg: MethodConfig,
        labels: tuple[str, ...],
        seed: int = 0,
        task: str = "classification",
    ) -> AdaptedModel:
        """Load the base model and apply the method. `seed` fixes the random
        initialisation of new heads and adapters."""
        kind: Kind = (
            detect_kind(load_config(model_cfg.name)) if model_cfg.kind == "auto" else model_cfg.kind
        )
        tokenizer = load_tokenizer(model_cfg.name, kind)
        method = build_method(method_cfg)
        formulation = make_formulation(kind, tokenizer, labels, model_cfg, task, method)
        torch.manual_seed(seed)
        base = _base(model_cfg.name, kind, labels, method, tokenizer)
        n_base = sum(p.numel() for p in base.parameters())
        module = method.apply(base, kind)
        return cls(module, tokenizer, formulation, method, model_cfg, kind, labels, n_base)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> AdaptedModel:
        """Move the model; `auto` = the GPU when there is one, else the CPU."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.module.to(device)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ConfigError(
                f"device {device!r} is not usable here ({e}); use `auto` or `cpu`"
            ) from e
        return self

    # --- what crosses a site boundary -----------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        return self.method.trainable_state(self.module)

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        self.method.load_trainable_state(self.module, state)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    # --- inference ------------------------------------------------------------

    @torch.no_grad()
    def predict_scores(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Log-probability of each label for each text -> [N, K]."""
        feats = self.formulation.encode(list(texts))
        order = np.argsort([f["length"] for f in feats], kind="stable")  # less padding
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        was_training = self.module.training
        self.module.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = to_device(self.formulation.collate([feats[i] for i in idx]), self.device)
                out[idx] = self.formulation.scores(self.module, batch).float().cpu().numpy()
        finally:
            self.module.train(was_training)
        return out

    def predict(self, texts: list[str], batch_size: int = 64) -> list[str]:
        """Classification: the label of each text; generation: the generated answer to
        each instruction (see `generate` for contexts)."""
        if self.task == "generation":
            return self.generate(texts, batch_size=batch_size)
        scores = self.predict_scores(texts, batch_size)
        return [self.labels[i] for i in scores.argmax(-1)]

    @property
    def task(self) -> str:
        return self.formulation.task

    def generate(
        self, instructions: list[str], contexts: list[str] | None = None, batch_size: int = 16,
        bf16: bool = False, max_new_tokens: int = 0,
    ) -> list[str]:  # fmt: skip
        """Greedy answers of a generation model (`model.max_new_tokens` tokens at most)."""
        from fedtune.generate import InstructionLM, generate_texts

        form = self.formulation
        if not isinstance(form, InstructionLM):
            raise ConfigError("this model classifies; it was not trained to generate answers")
        prompts = form.prompt_ids(instructions, contexts or [""] * len(instructions))
        return generate_texts(self.module, self.tokenizer, prompts,
                              max_new_tokens or self.model_config.max_new_tokens, batch_size,
                              bf16, stop_texts=form.stop_texts)  # fmt: skip

    # --- save / load ------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.method.save(self.module, out)
        self.tokenizer.save_pretrained(out)
        meta: dict[str, Any] = {
            "format": 1,
            "task": self.task,
            "kind": self.kind,
            "labels": list(self.labels),
            "model": asdict(self.model_config),
            "method": {"name": method_name_of(self.method.config), **asdict(self.method.config)},
            "base_parameters": self.base_parameters,
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out

    @classmethod
    def load(cls, directory: str | Path, trainable: bool = False) -> AdaptedModel:
        src = Path(directory)
        meta_path = src / META_FILE
        if not meta_path.is_file():
            raise ModelError(
                f"{src} is not a saved fedtune model (no {META_FILE}); pass a run directory's "
                "`model/` folder or the run directory itself"
            )
        meta = json.loads(meta_path.read_text())
        labels = tuple(meta["labels"])
        kind: Kind = meta["kind"]
        # Saved before model.context_keep (2026-12-05): those models cut contexts keeping
        # their start, and go on doing so.
        model_cfg = ModelConfig(**{"context_keep": "start",
                                   **{k: _untuple(v) for k, v in meta["model"].items()}})
        mcfg = dict(meta["method"])
        method = build_method(method_config(mcfg.pop("name"), mcfg))
        tokenizer = load_tokenizer(str(src), kind)
        module = method.load(
            src, kind, lambda: _base(model_cfg.name, kind, labels, method, tokenizer), trainable
        )
        module.eval()
        formulation = make_formulation(kind, tokenizer, labels, model_cfg,
                                       meta.get("task", "classification"), method)  # fmt: skip
        return cls(
            module, tokenizer, formulation, method, model_cfg, kind, labels, meta["base_parameters"]
        )


def _base(name: str, kind: Kind, labels: tuple[str, ...], method: Method,
          tokenizer: PreTrainedTokenizerBase) -> Any:  # fmt: skip
    """The base model with the head the method asks for. A scalar (reward) head reads
    each sequence's last token that is not the pad token, so the model's pad id must be
    the one batches are padded with."""
    base = load_base_model(name, kind, labels, head=method.head)
    if method.head == "score":
        base.config.pad_token_id = tokenizer.pad_token_id
    return base


def _untuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v
