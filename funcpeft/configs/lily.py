"""PEFT's `LilyConfig` (`peft.tuners.lily.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init


@validated_init
@dataclass
class LilyConfig(PeftConfig):
    """Lily: low-rank adapters interconnected across layers (funcpeft.methods.lily).

    r: the rank; stride_A: consecutive layers of one target (same target suffix and weight shape) sharing one
    A (r, in); num_B (>= 2): the B experts (num_B * r, out) all layers of a target share, mixed by each layer's router
    from the batch's mean routing probabilities; scaling: a plain multiplier. init_weights: True: A and the router
    kaiming-uniform, B zeros (a no-op); False: B kaiming-uniform too. PEFT checks `r > 0` when it builds a layer;
    funcpeft here, with PEFT's message.
    """

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LILY

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        check_layers_and_saved(self)
        if self.stride_A < 1:
            raise ValueError("`stride_A` must be at least 1.")
        if self.num_B < 2:
            raise ValueError("`num_B` must be at least 2 for the router to be trained.")
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
