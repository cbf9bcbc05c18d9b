"""Adaptation methods, selected by name. Each has a config dataclass (its
`[method]` TOML table and `--set method.*` keys) and a `Method` implementation."""

from __future__ import annotations

from fedtune.config import MethodConfig
from fedtune.errors import ConfigError
from fedtune.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
# Listing order of the built-in methods: from least to most of the model adapted
# by weight updates, then the prompt-style PEFT methods.
_ORDER = ("head", "full", "lora", "ptuning", "prompt", "prefix", "ia3")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator; refuses a duplicate name or config class."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered")
    if any(c.config_class is cls.config_class for c in _REGISTRY.values()):
        raise ValueError(f"config class {cls.config_class.__name__} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    _load_builtin()
    names = sorted(_REGISTRY, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))
    return {n: _REGISTRY[n] for n in names}


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(methods)}")
    return methods[name]


def method_name_of(config: MethodConfig) -> str:
    for name, cls in available_methods().items():
        if type(config) is cls.config_class:
            return name
    raise ConfigError(f"{type(config).__name__} is not the config of a registered method")


def build_method(config: MethodConfig) -> Method:
    return get_method(method_name_of(config))(config)


def _load_builtin() -> None:
    # Imported for their @register side effect, late to avoid import cycles.
    from fedtune.methods import finetune, peft  # noqa: F401


__all__ = [
    "Method",
    "available_methods",
    "build_method",
    "get_method",
    "method_name_of",
    "register",
]
