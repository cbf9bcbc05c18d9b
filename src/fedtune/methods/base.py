"""The Method contract: how a base model is adapted, what is trainable, how the
adapted model is saved in the Hugging Face format and loaded back.

A method never knows which regime (centralized, local-only, federated) runs it;
a regime only sees `trainable_state()` / `load_trainable_state()` — exactly the
tensors that would cross a site boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedtune.config import MethodConfig
from fedtune.errors import ModelError
from fedtune.models import Kind

C = TypeVar("C", bound=MethodConfig)

# Builds the base model again (same name, kind and labels) when loading a saved
# adapter that stores only the trainable part.
BaseLoader = Callable[[], PreTrainedModel]


class Method(ABC, Generic[C]):
    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    objective: ClassVar[str] = ""
    """What the method learns from preference pairs (`reward`, `dpo`); '' = it trains
    with the task's own loss and does not take preference data."""
    head: ClassVar[str] = "auto"
    """The base model's output: `auto` = the task's (a classifier head for encoders, the
    LM head for decoders); `score` = one scalar per sequence (a reward model)."""

    def __init__(self, config: C):
        self.config = config

    @abstractmethod
    def apply(self, model: PreTrainedModel, kind: Kind) -> nn.Module:
        """Adapt `model` in place or wrap it; set requires_grad on exactly the
        trainable parameters; return the module to train."""

    @abstractmethod
    def save(self, module: nn.Module, directory: Path) -> None:
        """Write the adapted model in the format its ecosystem loads without fedtune."""

    @abstractmethod
    def load(self, directory: Path, kind: Kind, base: BaseLoader, trainable: bool) -> nn.Module:
        """Read back what `save` wrote."""

    # --- the exchanged state: the same for every method -----------------------

    @staticmethod
    def trainable_state(module: nn.Module) -> dict[str, Tensor]:
        """name -> detached copy of every trainable tensor (what leaves a site)."""
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @staticmethod
    def load_trainable_state(module: nn.Module, state: dict[str, Tensor]) -> None:
        """Copy `state` into the trainable parameters; the keys must match exactly."""
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ModelError(
                "trainable state does not fit this model: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}; "
                "it was made by another method or base model"
            )
        with torch.no_grad():
            for n, p in params.items():
                if state[n].shape != p.shape:
                    raise ModelError(
                        f"trainable state {n}: shape {tuple(state[n].shape)} != {tuple(p.shape)}"
                    )
                p.copy_(state[n])
