"""The one registry: `register(method)` records a method, its config class, PEFT type and mixed-compatibility."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from ..configs import PeftConfig
from .base import InputMethod, Method

AnyMethod = Method | InputMethod
M = TypeVar("M", Method, InputMethod)

METHODS: dict[str, AnyMethod] = {}
"""Every registered method by name ("lora", "dora", "ia3", ...)."""

CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}
"""Config class by PEFT type ("LORA" -> LoraConfig): what reading an adapter_config.json needs."""


def register(method: M) -> M:
    """Record `method` (call once, at the end of its file). Raises on a duplicate name or a config clash."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    known = CONFIG_CLASSES.get(method.peft_type)
    if known is not None and known is not method.config:
        raise ValueError(f"peft_type {method.peft_type!r} is already registered for {known.__name__}")
    METHODS[method.name] = method
    CONFIG_CLASSES[method.peft_type] = method.config
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register a throwaway method clean up with this)."""
    method = METHODS.pop(name)
    if not any(m.peft_type == method.peft_type for m in METHODS.values()):
        del CONFIG_CLASSES[method.peft_type]


def method_for(config: Any) -> AnyMethod:
    """The registered method implementing `config` (e.g. DoRA for `LoraConfig(use_dora=True)`)."""
    for method in METHODS.values():
        if isinstance(config, method.config) and type(config) is method.config and method.accepts(config):
            return method
    supported = sorted(c.__name__ for c in CONFIG_CLASSES.values())
    close = difflib.get_close_matches(type(config).__name__, supported, n=2)
    raise TypeError(
        f"funcpeft has no method for {type(config).__name__}; supported configs: {supported}"
        + (f" (did you mean {close}?)" if close else "")
    )


def weight_method(name: str) -> Method:
    """The weight-level method registered as `name` (what a LayerSpec's `method` names)."""
    method = METHODS[name]
    if not isinstance(method, Method):
        raise TypeError(f"{name!r} is an input-level method, not a weight-level one")
    return method


def mixed_compatible_types() -> tuple[str, ...]:
    """PEFT types a mixed model (`mixed=True`, PEFT's PeftMixedModel) accepts, among the registered ones."""
    return tuple(sorted({m.peft_type for m in METHODS.values() if m.mixed_compatible}))


MODEL_LEVEL: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}
"""PEFT types whose model is not a set of adapted layers but a facade of its own (X-LoRA: two passes and a
classifier around loaded LoRA experts), by peft_type: (build, load). `get_peft_model` and `from_pretrained` hand
such a config / directory over: build(model, config, adapter_name, autocast_adapter_dtype, generator, **rest),
load(model, directory, adapter_name, is_trainable, **kwargs)."""


def register_model_level(peft_type: str, build: Callable[..., Any], load: Callable[..., Any]) -> None:
    """Record the facade of a model-level PEFT type (see MODEL_LEVEL)."""
    MODEL_LEVEL[peft_type] = (build, load)
