"""Methods that train the model's own weights: `head` (output layer only) and
`full` (all layers). Saved as a complete transformers model directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from fedtune.config import MethodConfig
from fedtune.errors import ModelError
from fedtune.methods import register
from fedtune.methods.base import BaseLoader, Method
from fedtune.models import Kind, Pooling, set_pooling

# Attribute names transformers uses for a sequence-classification output layer.
_HEAD_NAMES = ("classifier", "score", "classification_head", "logits_proj")


@dataclass(frozen=True)
class HeadConfig(MethodConfig):
    lr: float = 5e-3
    pooling: Pooling = "cls"
    """Encoders: what the classification head reads; `cls` = the model's own pooler
    (BERT: [CLS] token -> dense + tanh), `mean` = the mean of the last hidden states
    (how sentence-transformers models such as `minilm` were trained)."""


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    lr: float = 5e-5
    pooling: Pooling = "cls"
    """Encoders: what the classification head reads; `cls` = the model's own pooler
    (BERT: [CLS] token -> dense + tanh), `mean` = the mean of the last hidden states
    (how sentence-transformers models such as `minilm` were trained)."""


def output_layer(model: PreTrainedModel, kind: Kind) -> nn.Module:
    """The layer that maps hidden states to outputs: the classification head of an
    encoder, the LM head of a decoder (untied from the input embeddings first, so
    training it leaves the embeddings frozen)."""
    if kind == "decoder":
        head = model.get_output_embeddings()
        emb = model.get_input_embeddings()
        if head is None:
            raise ModelError(f"{type(model).__name__} has no output layer to train")
        if emb is not None and head.weight is emb.weight:
            head.weight = nn.Parameter(emb.weight.detach().clone())
            model.config.tie_word_embeddings = False
            text_cfg = model.config.get_text_config()
            text_cfg.tie_word_embeddings = False
        return head
    for name in _HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ModelError(
        f"{type(model).__name__} has no classification head named {', '.join(_HEAD_NAMES)}"
    )


class _WholeModelMethod(Method[MethodConfig]):
    def pooled(self, model: PreTrainedModel, kind: Kind) -> PreTrainedModel:
        return set_pooling(model, getattr(self.config, "pooling", "cls"), kind)

    def save(self, module: nn.Module, directory: Path) -> None:
        assert isinstance(module, PreTrainedModel)
        module.save_pretrained(directory)

    def load(self, directory: Path, kind: Kind, base: BaseLoader, trainable: bool) -> nn.Module:
        cls = AutoModelForSequenceClassification if kind == "encoder" else AutoModelForCausalLM
        model = cls.from_pretrained(directory)
        if trainable:
            return self.apply(model, kind)
        return self.pooled(model, kind).requires_grad_(False)


@register
class HeadMethod(_WholeModelMethod):
    name = "head"
    description = "Train only the output layer (classification head or LM head); rest frozen."
    config_class = HeadConfig

    def apply(self, model: PreTrainedModel, kind: Kind) -> nn.Module:
        model = self.pooled(model, kind).requires_grad_(False)
        output_layer(model, kind).requires_grad_(True)
        return model


@register
class FullMethod(_WholeModelMethod):
    name = "full"
    description = "Full fine-tuning: every weight of the model is trained."
    config_class = FullConfig

    def apply(self, model: PreTrainedModel, kind: Kind) -> nn.Module:
        return self.pooled(model, kind).requires_grad_(True)
