"""What the LoRA variants of PEFT's `lora.Linear` share (VeLoRA, MonteCLoRA, aLoRA, Arrow): they exist only on
linear layers (nn.Linear and GPT-2's Conv1D, both PEFT `lora.Linear`), with LoRA's own hyper-parameters."""

from __future__ import annotations

from typing import Any

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
    return lora.hyper(config, target)
