"""PEFT's `XLoraConfig` (`peft.tuners.xlora.config`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, validated_init


@validated_init
@dataclass
class XLoraConfig(PeftConfig):
    """X-LoRA: a mixture of trained LoRA experts, mixed per token and layer by a trained classifier.

    hidden_size: the base model's hidden size (the classifier's input). adapters: {name: directory of a saved LoRA
    adapter}, loaded (in this order) as the frozen experts "0", "1", ... (PEFT's names). enable_softmax: softmax
    (with `softmax_temperature`) over the experts of the classifier's logits. enable_softmax_topk: softmax over the
    `top_k_lora` kept experts only. layerwise_scalings: one prediction per LoRA layer (else one, broadcast to all).
    xlora_depth / xlora_size / xlora_dropout_p: the classifier MLP (depth Linear layers, ReLU + Dropout between).
    use_trainable_adapters: the experts are trained too. scaling_pass_value: the experts' scaling in the first
    ("scaling") pass. global_scaling_weight: multiplies every expert's output in the real pass.
    PEFT's __post_init__ only warns (and fills hidden_size=4096, adapters={}); so does this one.
    """

    hidden_size: int | None = None  # PEFT: 4096 with a warning when not given
    adapters: dict[str, str] | None = None  # PEFT: {} with a warning when not given
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    PEFT_TYPE: ClassVar[PeftType] = PeftType.XLORA

    @property
    def target_modules(self) -> None:
        """X-LoRA has no targets of its own: what probes for them (getattr with a default) finds none, and what
        plans it as a layer adapter (add_adapter, load_adapter) gets this message."""
        raise AttributeError(
            "XLoraConfig has no target_modules: an X-LoRA model adapts the layers of its LoRA experts and is built by "
            "funcpeft.get_peft_model(model, XLoraConfig(...)) or loaded by funcpeft.from_pretrained(model, directory, "
            "adapters=...); it cannot be added to another model (add_adapter) or loaded with load_adapter"
        )

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        if self.hidden_size is None:
            warnings.warn(
                "No value was provided for `hidden_size`. This will be set to 4096 by default, please ensure that "
                "this is correct.",
                stacklevel=3,
            )
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn(
                "No value was provided for `adapters`. This will be set to empty, please ensure that this is correct.",
                stacklevel=3,
            )
            self.adapters = {}
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set", stacklevel=3)
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn(
                "`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse performance.",
                stacklevel=3,
            )
        if self.top_k_lora is not None and self.top_k_lora < 1:
            warnings.warn("`top_k_lora` value must be at least 1.", stacklevel=3)
