"""Adaptation methods, selected by name. Each has a config dataclass (its
`[method]` TOML table and `--set method.*` keys) and a `Method` implementation."""

from __future__ import annotations

from typing import TypeVar

from fedtune.config import MethodConfig
from fedtune.errors import ConfigError
from fedtune.methods.base import Method
from fedtune.methods.frozen import FrozenMethod

AnyMethod = type[Method] | type[FrozenMethod]
M = TypeVar("M", type[Method], type[FrozenMethod])
_REGISTRY: dict[str, AnyMethod] = {}
# Listing order of the built-in methods: the frozen-model ones first (no weight
# updates), then from least to most of the model adapted, then the prompt-style
# PEFT methods, then those that learn from preference pairs.
_ORDER = ("icl", "knn", "features", "head", "full", "lora", "ptuning", "prompt", "prefix", "ia3",
          "reward", "dpo")


def register(cls: M) -> M:
    """Class decorator; refuses a duplicate name or config class."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered")
    if any(c.config_class is cls.config_class for c in _REGISTRY.values()):
        raise ValueError(f"config class {cls.config_class.__name__} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, AnyMethod]:
    _load_builtin()
    names = sorted(_REGISTRY, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))
    return {n: _REGISTRY[n] for n in names}


def get_method(name: str) -> AnyMethod:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(methods)}")
    return methods[name]


def method_name_of(config: MethodConfig) -> str:
    for name, cls in available_methods().items():
        if type(config) is cls.config_class:
            return name
    raise ConfigError(f"{type(config).__name__} is not the config of a registered method")


def is_frozen(name: str) -> bool:
    """True for methods that leave the model's weights alone (features, knn, icl)."""
    return issubclass(get_method(name), FrozenMethod)


def trainable_methods() -> dict[str, type[Method]]:
    return {n: c for n, c in available_methods().items() if issubclass(c, Method)}


def build_method(config: MethodConfig) -> Method:
    cls = get_method(method_name_of(config))
    if not issubclass(cls, Method):
        raise ConfigError(f"method {cls.name} leaves the model frozen; it has no adapter to apply")
    return cls(config)


def _load_builtin() -> None:
    # Imported for their @register side effect, late to avoid import cycles.
    from fedtune.methods import features, finetune, icl, peft, preference, retrieval  # noqa: F401


__all__ = [
    "FrozenMethod",
    "Method",
    "available_methods",
    "build_method",
    "get_method",
    "is_frozen",
    "method_name_of",
    "register",
    "trainable_methods",
]
