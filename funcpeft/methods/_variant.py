"""What the LoRA variants of PEFT's `lora.Linear` share (VeLoRA, MonteCLoRA, aLoRA, Arrow): they exist only on
linear layers (nn.Linear and GPT-2's Conv1D, both PEFT `lora.Linear`), with LoRA's own hyper-parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

from .._config import init_mode
from . import lora
from .base import LayerKind, Target, UnsupportedLayerError

LINEAR_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_HF)


def linear_lora_hyper(config: Any, target: Target, field: str) -> lora.LoraHyper:
    """LoRA's hyper-parameters for `target`; PEFT's error for a layer whose LoRA class lacks the variant `field`."""
    if target.kind not in LINEAR_KINDS:
        raise UnsupportedLayerError(
            f"LoraConfig.{field} is a LoRA variant of linear layers only (nn.Linear, GPT-2 Conv1D); target "
            f"{target.name!r} is a {type(target.module).__name__}. PEFT: Invalid or unsupported variant "
            f"combination: ('{field}',)"
        )
    if config.lora_bias:
        raise NotImplementedError(
            f"LoraConfig.{field} with lora_bias=True (target {target.name!r}): funcpeft's {field} layers have no "
            "lora_B bias; use lora_bias=False"
        )
    if init_mode(config.init_lora_weights) not in (True, False, "gaussian"):
        raise NotImplementedError(
            f"LoraConfig.{field} with init_lora_weights={config.init_lora_weights!r} (target {target.name!r}): "
            "funcpeft's LoRA variant layers start from True / False / 'gaussian' only; PEFT's weight-changing "
            "inits are not combined with them here"
        )
    return lora.hyper(config, target)


def base_fields(hyper: lora.LoraHyper) -> dict[str, Any]:
    """LoRA's fields of `hyper`, to build a variant's hyper (a LoraHyper subclass) from it."""
    return {f.name: getattr(hyper, f.name) for f in dataclasses.fields(lora.LoraHyper)}
