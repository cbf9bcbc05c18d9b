"""Parameter-efficient methods through Hugging Face PEFT: LoRA, P-tuning, prompt
tuning, prefix tuning and IA3. fedtune only maps its config dataclasses to PEFT
configs; PEFT builds the modules and writes the adapter (safetensors), which
plain `peft` code loads without fedtune.

Encoders get PEFT's SEQ_CLS task (the classification head is trained too, as a
`modules_to_save` copy); decoders get CAUSAL_LM (the generative classifier).
"""

from __future__ import annotations

import inspect
import types
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import peft as hf_peft
import torch
from peft.tuners.p_tuning import PromptEncoder
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_IA3_FEEDFORWARD,
)
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedtune.config import MethodConfig
from fedtune.errors import ModelError
from fedtune.methods import register
from fedtune.methods.base import BaseLoader, Method
from fedtune.models import Kind, Pooling, labelled_base, set_pooling


@dataclass(frozen=True)
class PeftMethodConfig(MethodConfig):
    modules_to_save: tuple[str, ...] = ()
    """Extra modules trained in full next to the adapter (e.g. `pooler`); the
    classification head of an encoder is always included by PEFT."""
    pooling: Pooling = "cls"
    """Encoders: what the classification head reads; `cls` = the model's own pooler
    (BERT: [CLS] token -> dense + tanh), `mean` = the mean of the last hidden states
    (how sentence-transformers models such as `minilm` were trained)."""


@dataclass(frozen=True)
class LoraConfig(PeftMethodConfig):
    """Defaults: every linear layer, rank 16 — on MiniLM/FPB all-agree 0.96 test
    accuracy vs 0.94 for PEFT's default (query/value, rank 8), which sends 9x
    fewer bytes per round (docs/benchmarks.md). For the small variant:
    `--set method.target_modules=[] --set method.r=8 --set method.alpha=16`."""

    lr: float = 2e-3
    r: int = 16
    """Rank of the low-rank update B @ A."""
    alpha: int = 32
    """Scaling: the update is multiplied by alpha / r."""
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("all-linear",)
    """Module names to adapt; `all-linear` = every linear layer but the output
    layer; empty = PEFT's default for the architecture (query/value for BERT,
    c_attn for GPT-2, q_proj/v_proj for Llama/Qwen)."""
    freeze_a: bool = False
    """Train B only, A frozen at its seeded initialisation (FFA-LoRA, Sun et al., ICLR
    2024). Federated, every site builds the same A from the run's seed, so FedAvg of B
    is FedAvg of the updates B @ A exactly (averaging A and B apart is not: the product
    of the averages is not the average of the products), and half the adapter crosses
    the boundary. The paper pairs it with a larger learning rate."""


@dataclass(frozen=True)
class PtuningConfig(PeftMethodConfig):
    lr: float = 1e-2
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    """Hidden size of the prompt encoder that predicts the virtual-token embeddings."""
    encoder_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0


@dataclass(frozen=True)
class PromptConfig(PeftMethodConfig):
    lr: float = 3e-2
    num_virtual_tokens: int = 20
    init_text: str = ""
    """Initialise the soft prompt from this text's token embeddings (empty = random)."""


@dataclass(frozen=True)
class PrefixConfig(PeftMethodConfig):
    lr: float = 1e-2
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    """Reparameterise the prefix through a two-layer MLP (more stable, more parameters)."""
    encoder_hidden_size: int = 128


@dataclass(frozen=True)
class IA3Config(PeftMethodConfig):
    lr: float = 5e-3
    target_modules: tuple[str, ...] = ()
    """Modules whose activations are rescaled; empty = PEFT's default."""
    feedforward_modules: tuple[str, ...] = ()
    """Subset of target_modules that are feed-forward (scaled on the input)."""


def _task_type(kind: Kind) -> hf_peft.TaskType:
    return hf_peft.TaskType.SEQ_CLS if kind == "encoder" else hf_peft.TaskType.CAUSAL_LM


def _common(cfg: PeftMethodConfig, kind: Kind) -> dict[str, Any]:
    out: dict[str, Any] = {"task_type": _task_type(kind)}
    if cfg.modules_to_save:
        out["modules_to_save"] = list(cfg.modules_to_save)
    return out


def _targets(names: tuple[str, ...]) -> Any:
    if names == ("all-linear",):
        return "all-linear"
    return list(names) or None


# PEFT's default target modules per model type (peft.utils.constants) lack some
# encoders fedtune's catalog has; fedtune's follow PEFT's pattern for BERT (LoRA: the
# attention's query/value; IA3: keys, values and the feed-forward output).
_LORA_DEFAULTS = {"mpnet": ["attn.q", "attn.v"]}
_IA3_DEFAULTS = {"mpnet": (["attn.k", "attn.v", "output.dense"], ["output.dense"])}


def _default_targets(model: PreTrainedModel, method: str, peft_defaults: dict[str, Any]) -> None:
    """Refuse, with the choices, a model type that neither PEFT nor fedtune has
    defaults for (PEFT's own error names no module)."""
    model_type = model.config.model_type
    if model_type in peft_defaults:
        return
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = sorted({".".join(n.split(".")[-2:]) for n in linear})
    raise ModelError(
        f"{method}: PEFT has no default target modules for model type {model_type!r}; set "
        f"method.target_modules, e.g. --set 'method.target_modules=[...]' with names from "
        f"this model's linear layers: {', '.join(names)}"
    )


class _PeftMethod(Method[PeftMethodConfig]):
    """Shared by every PEFT method: only `peft_config` differs."""

    @abstractmethod
    def peft_config(self, model: PreTrainedModel, kind: Kind) -> hf_peft.PeftConfig:
        """Map this method's config dataclass to the PEFT config."""

    def pooled(self, model: PreTrainedModel, kind: Kind) -> PreTrainedModel:
        assert isinstance(self.config, PeftMethodConfig)
        return set_pooling(model, self.config.pooling, kind)

    def apply(self, model: PreTrainedModel, kind: Kind) -> nn.Module:
        config = self.peft_config(model, kind)
        try:
            return hf_peft.get_peft_model(self.pooled(model, kind), config)
        except ValueError as e:  # PEFT's refusals of a config (module names, sizes)
            raise ModelError(
                f"{self.name} on {type(model).__name__}: PEFT refused the config ({e}); check "
                f"the method's keys (`fedtune config --method {self.name}`)"
            ) from e

    def save(self, module: nn.Module, directory: Path) -> None:
        assert isinstance(module, hf_peft.PeftModel)
        config = module.active_peft_config
        original = config.base_model_name_or_path
        if config.task_type == hf_peft.TaskType.SEQ_CLS:
            # The base as a folder that carries the labels (models.labelled_base), so
            # that plain AutoPeftModelForSequenceClassification gets the task's labels.
            base = module.get_base_model()
            assert isinstance(base, PreTrainedModel)
            config.base_model_name_or_path = str(labelled_base(base))
        try:
            module.save_pretrained(str(directory))
        finally:
            config.base_model_name_or_path = original

    def load(self, directory: Path, kind: Kind, base: BaseLoader, trainable: bool) -> nn.Module:
        if trainable and self.name in ("ptuning", "prompt", "prefix"):
            # PEFT saves prompt-learning adapters for inference only (P-tuning keeps
            # the encoder's output embeddings, not the encoder) and refuses to make
            # them trainable again.
            raise ModelError(
                f"a saved {self.name} adapter ({directory}) loads for prediction only; to "
                "continue training, build the model again (AdaptedModel.build) and load "
                "a trainable state with load_trainable_state()"
            )
        model = self.pooled(base(), kind)
        return hf_peft.PeftModel.from_pretrained(model, directory, is_trainable=trainable)


@register
class LoraMethod(_PeftMethod):
    name = "lora"
    description = "LoRA: low-rank updates B@A added to chosen weight matrices (PEFT)."
    config_class = LoraConfig

    def apply(self, model: PreTrainedModel, kind: Kind) -> nn.Module:
        return self._freeze_a(super().apply(model, kind))

    def load(self, directory: Path, kind: Kind, base: BaseLoader, trainable: bool) -> nn.Module:
        module = super().load(directory, kind, base, trainable)
        return self._freeze_a(module) if trainable else module

    def _freeze_a(self, module: nn.Module) -> nn.Module:
        assert isinstance(self.config, LoraConfig)
        if self.config.freeze_a:
            for name, p in module.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        return module

    def peft_config(self, model: PreTrainedModel, kind: Kind) -> hf_peft.PeftConfig:
        c = self.config
        assert isinstance(c, LoraConfig)
        targets = _targets(c.target_modules)
        if targets is None:
            targets = _LORA_DEFAULTS.get(model.config.model_type)
        if targets is None:
            _default_targets(model, "lora", TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
        return hf_peft.LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=targets,
            **_common(c, kind),
        )


class _Fp32PromptEncoder(PromptEncoder):
    """PEFT's prompt encoder, computed in fp32 even under bf16 autocast.

    Under `train.bf16` the encoder's MLP ran in bf16 like the rest of the forward pass
    (its matrix products, their gradients, and its output: every virtual-token
    embedding rounded to bf16). On the demo's P-tuning over 8 seeds, computing it in
    fp32 moved federated - centralized by +1.1 +- 0.4 points, paired by seed (-1.6 +-
    0.5 with the encoder in bf16, -0.4 +- 0.4 in fp32, -0.5 +- 0.4 with no autocast at
    all; docs/benchmarks.md). The encoder is a few small matrix products on
    num_virtual_tokens rows, so fp32 costs nothing measurable."""

    def forward(self, indices: Tensor) -> Tensor:
        with torch.autocast(indices.device.type, enabled=False):
            return super().forward(indices)


@register
class PtuningMethod(_PeftMethod):
    name = "ptuning"
    description = "P-tuning: a prompt encoder (MLP/LSTM) predicts virtual-token embeddings (PEFT)."
    config_class = PtuningConfig

    def apply(self, model: PreTrainedModel, kind: Kind) -> nn.Module:
        module = super().apply(model, kind)
        # Every encoder PEFT built for this model (fedtune adds no adapter later; one
        # added with PeftModel.add_adapter would get PEFT's plain encoder).
        for encoder in module.modules():
            if type(encoder) is PromptEncoder:
                encoder.__class__ = _Fp32PromptEncoder  # same weights and state dict keys
        return module

    def peft_config(self, model: PreTrainedModel, kind: Kind) -> hf_peft.PeftConfig:
        c = self.config
        assert isinstance(c, PtuningConfig)
        return hf_peft.PromptEncoderConfig(
            num_virtual_tokens=c.num_virtual_tokens,
            encoder_hidden_size=c.encoder_hidden_size,
            encoder_reparameterization_type=c.encoder_type,
            encoder_num_layers=c.encoder_num_layers,
            encoder_dropout=c.encoder_dropout,
            **_common(c, kind),
        )


@register
class PromptMethod(_PeftMethod):
    name = "prompt"
    description = "Prompt tuning: trainable soft-prompt embeddings prepended to the input (PEFT)."
    config_class = PromptConfig

    def peft_config(self, model: PreTrainedModel, kind: Kind) -> hf_peft.PeftConfig:
        c = self.config
        assert isinstance(c, PromptConfig)
        init: dict[str, Any] = {}
        if c.init_text:
            init = {
                "prompt_tuning_init": hf_peft.PromptTuningInit.TEXT,
                "prompt_tuning_init_text": c.init_text,
                "tokenizer_name_or_path": model.name_or_path,
            }
        return hf_peft.PromptTuningConfig(
            num_virtual_tokens=c.num_virtual_tokens, **init, **_common(c, kind)
        )


def _params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def _prefix_ready_encoder(model: PreTrainedModel) -> PreTrainedModel:
    """Let PEFT's prefix tuning reach an encoder's key/value cache.

    PEFT (<= 0.21.2) passes the prefixes as `past_key_values=` and first checks
    that name in the signature of the model's `forward`, then of its backbone's
    (BertModel), raising "Model does not support past key values" otherwise.
    transformers 5.24 renamed that argument `cache` in 323 model files (the old name
    still works through a deprecation shim), so the check fails although the model
    still takes the prefixes: BERT's attention concatenates them with its keys and
    values exactly as before. Here the model gets a `forward` that declares the old
    name and hands the prefixes on as `cache` through the head's `**kwargs` (the
    head passes them to the backbone). Nothing changes on older transformers, and
    no weight changes: a saved adapter is the same file either way.

    Encoders whose attention takes no cache at all (MPNet, DistilBERT…) cannot
    carry prefixes: refused here with the methods that do work."""
    backbone_params: dict[str, inspect.Parameter] = _params(model.base_model.forward)
    if "past_key_values" in _params(model.forward) or "past_key_values" in backbone_params:
        return model  # transformers < 5.24: PEFT finds the old name itself
    head_params = _params(model.forward)
    passes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in head_params.values())
    if "cache" not in backbone_params or not passes_kwargs:
        raise ModelError(
            f"prefix tuning needs an encoder whose attention layers take a key/value cache "
            f"(BERT, RoBERTa, ELECTRA…); {type(model).__name__} has none. Use `ptuning` or "
            "`prompt` (virtual tokens in the input) or `lora` with this model."
        )
    # Bound to this model as a method (not a closure over its forward), so that
    # copy.deepcopy gives a copy that runs its own weights (pickling the whole module
    # does not carry it: save state dicts, as fedtune does); an instance
    # attribute, so that nn.Module.__call__ and PEFT's signature check both see it
    # while the class and every other model stay as they are.
    model.forward = types.MethodType(_forward_with_prefixes, model)
    return model


def _forward_with_prefixes(
    self: nn.Module, *args: Any, past_key_values: Any = None, **kwargs: Any
) -> Any:
    """The model class's own forward, with PEFT's prefixes passed as `cache`."""
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    return type(self).forward(self, *args, **kwargs)


@register
class PrefixMethod(_PeftMethod):
    name = "prefix"
    description = "Prefix tuning: trainable key/value prefixes in every attention layer (PEFT)."
    config_class = PrefixConfig

    def pooled(self, model: PreTrainedModel, kind: Kind) -> PreTrainedModel:
        model = super().pooled(model, kind)
        return _prefix_ready_encoder(model) if kind == "encoder" else model

    def peft_config(self, model: PreTrainedModel, kind: Kind) -> hf_peft.PeftConfig:
        c = self.config
        assert isinstance(c, PrefixConfig)
        return hf_peft.PrefixTuningConfig(
            num_virtual_tokens=c.num_virtual_tokens,
            prefix_projection=c.prefix_projection,
            encoder_hidden_size=c.encoder_hidden_size,
            **_common(c, kind),
        )


@register
class IA3Method(_PeftMethod):
    name = "ia3"
    description = (
        "IA3: learned vectors that rescale attention keys/values and FFN activations (PEFT)."
    )
    config_class = IA3Config

    def peft_config(self, model: PreTrainedModel, kind: Kind) -> hf_peft.PeftConfig:
        c = self.config
        assert isinstance(c, IA3Config)
        targets, feedforward = _targets(c.target_modules), _targets(c.feedforward_modules)
        model_type = model.config.model_type
        if targets is None and model_type in _IA3_DEFAULTS:
            targets, feedforward = _IA3_DEFAULTS[model_type]
        elif targets is None:
            _default_targets(model, "ia3", TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)
        elif feedforward is None and model_type not in PEFT_IA3_FEEDFORWARD:
            # PEFT wants the feed-forward subset named for types it has no table for:
            # fedtune's defaults that were chosen, else none (all scaled on the output).
            ff_defaults = _IA3_DEFAULTS.get(model_type, ([], []))[1]
            feedforward = [m for m in ff_defaults if m in targets]
        return hf_peft.IA3Config(
            target_modules=targets,
            feedforward_modules=feedforward,
            **_common(c, kind),
        )
