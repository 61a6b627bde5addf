"""PEFT's `VeraConfig` (`peft.tuners.vera.config`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import (
    PeftConfig,
    PeftType,
    check_layers_and_saved,
    check_module_names,
    check_probability,
    check_rank,
    validated_init,
)
from .._constants import VERA_TARGET_MODULES


@validated_init
@dataclass
class VeraConfig(PeftConfig):
    """VeRA: `dW = (lambda_b * B) @ (lambda_d * A)` with A (r, in), B (out, r) frozen, random and shared.

    projection_prng_key seeds the shared A and B (kaiming-uniform, PEFT's draw); save_projection writes
    them into the adapter file. d_initial: the initial value of lambda_d (lambda_b starts at 0).
    """

    r: int = 256
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.VERA
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = VERA_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        check_probability(self, "vera_dropout")
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save vera_A and vera_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
