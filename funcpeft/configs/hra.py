"""PEFT's `HRAConfig` (`peft.tuners.hra.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, check_rank, validated_init


@validated_init
@dataclass
class HRAConfig(PeftConfig):
    """HRA: the weight times a product of `r` Householder reflections, `W' = W H` (funcpeft.methods.hra).

    apply_GS: Gram-Schmidt-orthogonalise the reflection vectors first (then `H = I - 2 U U^T`).
    init_weights: True pairs identical vectors (H = I at init; needs an even r, else PEFT warns and draws
    them all), False draws them all (kaiming-uniform).
    """

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.HRA

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        check_module_names(self, "target_modules", "exclude_modules")
        if self.bias not in ("none", "all", "hra_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'hra_only', got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
