"""PEFT's `GloraConfig` (`peft.tuners.glora.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from .._config import PeftConfig, PeftType, check_module_names, validated_init
from .._constants import DEFAULT_TARGET_MODULES
from ._checks import check_bias, check_positive_int, check_saved

_VALID = {
    "config_A_B": {"lora", "vector", "constant", "none"},
    "config_C": {"lora", "vector", "none"},
    "config_D_E": {"vector", "constant", "none"},
}


@validated_init
@dataclass
class GloraConfig(PeftConfig):
    """GLoRA: a plain nn.Linear's weight and bias become `W0 + W0 * A + B` and `b0 + b0 * D + E + W0 @ C`.

    Each of A and B (config_A_B), C (config_C), D and E (config_D_E) is "lora" (Xd @ Xu of rank r), "vector" (one
    value per output row; C: per input), "constant" (one scalar) or "none" (zeros, nothing trained). C, D and E
    exist only on layers with a bias. init_weights=True makes the adapter a no-op; False draws kaiming-uniform
    values (normal(0, 0.02) for constants).
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    config_A_B: Literal["lora", "vector", "constant", "none"] = "lora"
    config_C: Literal["lora", "vector", "none"] = "lora"
    config_D_E: Literal["vector", "constant", "none"] = "constant"
    init_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.GLORA
    # PEFT: TRANSFORMERS_MODELS_TO_GLORA_TARGET_MODULES_MAPPING is a copy of LoRA's
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        for name, valid in _VALID.items():  # PEFT's messages (before the generic type check would word them)
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"Invalid {name} value: {value!r}. Valid values are: {', '.join(sorted(valid))}.")
        super().__post_init__()
        check_module_names(self, "target_modules")
        check_saved(self)
        check_bias(self)
        # PEFT builds r = 0 "lora" paths (Xd @ Xu is then always zero) and fails in torch.zeros for r < 0
        if "lora" in (self.config_A_B, self.config_C):
            check_positive_int(self, "r")
