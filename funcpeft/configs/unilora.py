"""PEFT's `UniLoraConfig` (`peft.tuners.unilora.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_module_names, validated_init
from .._constants import DEFAULT_TARGET_MODULES
from ._checks import check_regex_targets, check_saved


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@validated_init
@dataclass
class UniLoraConfig(PeftConfig):
    """Uni-LoRA: every entry of every layer's LoRA factors A (r, in) and B (out, r) is one entry of a single shared
    trainable vector theta_d (theta_d_length,), scaled by 1 / sqrt(how many entries share it).

    The assignment of entries to theta_d is fixed and balanced (each index used floor or ceil of
    #entries / theta_d_length times), shuffled with proj_seed over all adapted layers in module order;
    save_indices writes the indices and scales into the adapter file. theta_d ~ U(-init_theta_d_bound, bound)
    (init_weights) or N(0, 1).
    """

    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    target_modules: list[str] | set[str] | str | None = None
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.UNILORA
    # PEFT: TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING is a copy of LoRA's
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules")
        check_saved(self)
        # PEFT's checks and messages (r, theta_d_length: also refused when not ints)
        if not _positive_int(self.r):
            raise ValueError(f"`r` should be a positive integer, got {self.r}.")
        if not _positive_int(self.theta_d_length):
            raise ValueError(f"`theta_d_length` should be a positive integer, got {self.theta_d_length}.")
        if not 0.0 <= self.unilora_dropout <= 1.0:
            raise ValueError(f"`unilora_dropout` should be between 0.0 and 1.0, got {self.unilora_dropout}.")
        if self.init_theta_d_bound <= 0:
            raise ValueError(f"`init_theta_d_bound` should be a positive float, got {self.init_theta_d_bound}.")
        if self.bias not in {"none", "all", "unilora_only"}:
            raise ValueError(f"`bias` should be 'none', 'all', or 'unilora_only', got {self.bias}.")
        check_regex_targets(self)
