"""PEFT's `SupertuningConfig` (`peft.tuners.supertuning.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init
from .._constants import DEFAULT_TARGET_MODULES


@validated_init
@dataclass
class SupertuningConfig(PeftConfig):
    """Super-Tuning: a sparse support of a layer's weight entries, chosen by magnitude, is trained.

    `y = F.linear(x, W + scatter(indices, values), b)`, plus with `r` set (the "Supra" hybrid) a LoRA term
    `lora_alpha / r * B A dropout(x)`. sparsity in [0, 1): a fraction `1 - sparsity` of each weight's entries is
    trained (`int(numel * (1 - sparsity))`); select_top: the largest-magnitude entries (True) or the smallest.
    lora_alpha: defaults to 2 * r when r is set, and must stay None without r. init_weights: True = zero values and
    B (a no-op adapter); False = randn values and a kaiming-uniform B. PEFT adapts nn.Linear only.
    save_precomputed_indices=False (indices recomputed from the base weight on load) is not implemented.
    """

    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.SUPERTUNING
    # PEFT: TRANSFORMERS_MODELS_TO_SUPERTUNING_TARGET_MODULES_MAPPING is a copy of LoRA's
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = DEFAULT_TARGET_MODULES
    _unimplemented: ClassVar[dict[str, Any]] = {"save_precomputed_indices": True}

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()  # field types; save_precomputed_indices=False is refused here
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
        # PEFT's checks and messages, in its order
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0.0, 1.0), got {self.sparsity}")
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
                raise ValueError(f"r must be a positive integer or None, got {self.r!r}")
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r
        elif self.lora_alpha is not None:
            raise ValueError("lora_alpha is set but r is None — Supra mode requires an explicit r.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0.0, 1.0), got {self.lora_dropout}")
