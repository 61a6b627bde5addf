"""PEFT's `GraloraConfig` (`peft.tuners.gralora.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, check_rank, validated_init


@validated_init
@dataclass
class GraloraConfig(PeftConfig):
    """GraLoRA: LoRA split into gralora_k x gralora_k blocks with their own rank-r/k factors (funcpeft.methods.gralora).

    r: the rank (divisible by gralora_k); hybrid_r > 0 adds a plain LoRA of that rank; scaling alpha / (r + hybrid_r).
    init_weights: True: A kaiming-uniform, B zeros (a no-op); False: both kaiming-uniform. PEFT checks `r > 0` and
    `hybrid_r >= 0` when it builds a layer; funcpeft here, with PEFT's messages. PEFT's config has no exclude_modules.
    """

    r: int = 32
    hybrid_r: int = 0
    target_modules: list[str] | set[str] | str | None = None
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.GRALORA

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules")
        if self.gralora_k <= 0:
            raise ValueError(f"`gralora_k` should be a positive integer value but the value passed is {self.gralora_k}")
        if self.r % self.gralora_k != 0:
            raise ValueError(f"r should be divisible by gralora_k, but got {self.r} and {self.gralora_k}")
        check_rank(self)
        if self.hybrid_r < 0:
            raise ValueError(
                f"`hybrid_r` should be a non-negative integer value but the value passed is {self.hybrid_r}"
            )
        if not 0.0 <= self.gralora_dropout <= 1.0:  # nn.Dropout's check, which PEFT meets when it builds a layer
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.gralora_dropout}")
        if self.bias not in ("none", "all", "gralora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'gralora_only', got {self.bias!r}")
        check_layers_and_saved(self)
