"""PEFT's `C3AConfig` (`peft.tuners.c3a.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_module_names, validated_init
from .._constants import C3A_TARGET_MODULES
from ._checks import check_bias, check_int_pattern, check_positive_int, check_regex_targets, check_saved

C3A_INIT = ("gaussian", "kaiming_uniform", "xavier_uniform")


@validated_init
@dataclass
class C3AConfig(PeftConfig):
    """C3A: `dW` block-circulant, `c3a_kernel` (out / b, in / b, b) float32, applied by FFT (Linear layers only).

    block_size b must divide in_features and out_features of every target (block_size_pattern: per module).
    init_weights: True (zeros, a no-op), False or "xavier_uniform" (PEFT's default), "gaussian",
    "kaiming_uniform".
    """

    block_size: int = 256
    target_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    block_size_pattern: dict | None = field(default_factory=dict)
    init_weights: bool | str | None = "xavier_uniform"

    PEFT_TYPE: ClassVar[PeftType] = PeftType.C3A
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = C3A_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_positive_int(self, "block_size")
        check_int_pattern(self, "block_size_pattern")
        check_module_names(self, "target_modules")
        check_regex_targets(self)
        check_bias(self)
        check_saved(self)
        init = self.init_weights
        if not isinstance(init, bool) and init not in C3A_INIT:
            raise ValueError(f"Unknown init_weights: {init!r} (expected True, False or one of {list(C3A_INIT)})")
