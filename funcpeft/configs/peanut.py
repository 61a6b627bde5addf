"""PEFT's `PeanutConfig` (`peft.tuners.peanut.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transformers.activations import ACT2FN

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init


@validated_init
@dataclass
class PeanutConfig(PeftConfig):
    """PEANuT: a weight-aware update `delta = scaling * (B o net o A)(W^T)^T`, a small network of the base weight
    (funcpeft.methods.peanut).

    r: the network's width; depth: hidden encoder / decoder pairs between A (out -> r) and B (r -> out), with
    residual connections; act_fn: a `transformers.activations.ACT2FN` key; scaling: a plain multiplier.
    init_weights: True: every weight kaiming-uniform but B zeros (a no-op); False: B kaiming-uniform too.
    """

    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PEANUT

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        check_layers_and_saved(self)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"`depth` can only be a non-negative integer, got {self.depth!r}.")
        if self.act_fn not in ACT2FN:
            raise ValueError(f"Unsupported `act_fn`: {self.act_fn}. Must be one of {sorted(ACT2FN.keys())}.")
