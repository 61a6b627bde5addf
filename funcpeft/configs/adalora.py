"""PEFT's `AdaLoraConfig` (`peft.tuners.adalora.config`): a `LoraConfig` with AdaLoRA's schedule fields."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._config import (
    LoraConfig,
    PeftConfig,
    PeftType,
    check_layers_and_saved,
    check_module_names,
    check_probability,
    validated_init,
)
from .._constants import ADALORA_TARGET_MODULES

RANK_PATTERN_SUFFIX = ".lora_E"


def rank_pattern_module(key: str) -> str:
    """The module path of a rank_pattern key: '<path>.lora_E' (PEFT's files) or '<path>.lora_E.<adapter>' (memory)."""
    if key.endswith(RANK_PATTERN_SUFFIX):
        return key[: -len(RANK_PATTERN_SUFFIX)]
    head, _, tail = key.rpartition(".")
    if head.endswith(RANK_PATTERN_SUFFIX) and tail:
        return head[: -len(RANK_PATTERN_SUFFIX)]
    raise ValueError(
        f"AdaLoraConfig.rank_pattern key {key!r} is not '<module path>.lora_E' or '<module path>.lora_E.<adapter "
        "name>' (AdaLoRA's rank_pattern is the rank allocator's output: module -> one bool per rank; it is not "
        "LoRA's regex -> rank dict)"
    )


def _normalise_rank_pattern(pattern: Any) -> dict[str, list[bool]] | None:
    """{'<path>.lora_E': [bool, ...]}: the keys PEFT writes (it drops the adapter name on save)."""
    if pattern is None:
        return None
    if not isinstance(pattern, Mapping):
        raise ValueError(
            f"AdaLoraConfig.rank_pattern must be None or a dict '<module>.lora_E' -> list of bool, got {pattern!r}"
        )
    out: dict[str, list[bool]] = {}
    for key, mask in pattern.items():
        if not isinstance(key, str):
            raise ValueError(f"AdaLoraConfig.rank_pattern keys must be str, got {key!r}")
        if not isinstance(mask, (list, tuple)) or not all(isinstance(b, bool) for b in mask):
            raise ValueError(
                f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of bool (which of the init_r ranks are kept), "
                f"got {mask!r}"
            )
        name = rank_pattern_module(key) + RANK_PATTERN_SUFFIX
        if name in out:
            raise ValueError(
                f"AdaLoraConfig.rank_pattern names module {name!r} twice (keys with and without an adapter name)"
            )
        out[name] = list(mask)
    return out


@validated_init
@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: an SVD-shaped LoRA, `dW = B @ (A * E) * lora_alpha / ranknum`, whose ranks a schedule prunes.

    Per layer: lora_A (init_r, in), lora_E (init_r, 1) (the singular values), lora_B (out, init_r), and
    ranknum = init_r (a constant). The rank allocator (`funcpeft.rank_allocator`) prunes the total rank from
    init_r per layer down to target_r per layer on average: warm-up until step `tinit`, a cubic budget
    schedule every `deltaT` steps until `total_step - tfinal`, then the final `rank_pattern` is fixed.
    beta1 / beta2: the EMAs of the sensitivity |p * grad| and of its uncertainty. orth_reg_weight: the
    weight of `funcpeft.orthogonal_regularizer` (add it to your loss; PEFT adds it inside its forward).
    rank_pattern: the allocator's result, '<module path>.lora_E' -> one bool per rank (None before any
    pruning); saving writes only the kept ranks and loading plans those shapes, like PEFT. `r`,
    `use_rslora`, `alpha_pattern` are ignored by AdaLoRA (as in PEFT).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]  # PEFT's type differs from LoRA's

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADALORA
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = ADALORA_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        PeftConfig.__post_init__(self)  # not LoraConfig's: its rank / rank_pattern rules are LoRA's
        check_probability(self, "lora_dropout")
        check_module_names(self, "target_modules", "exclude_modules")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise NotImplementedError(
                f"init_lora_weights={self.init_lora_weights!r} is not implemented for AdaLoRA in funcpeft "
                "(supported: True, False, 'gaussian', which PEFT's AdaLoRA initialises like True)."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.use_dora:
            raise ValueError(f"{self.peft_type} does not support DoRA.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
        if self.r != 8:  # 8 is LoraConfig's default
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored."
                "If you intended to set the initial rank, use `init_r` instead.",
                stacklevel=3,
            )
        for name in ("use_rslora", "alpha_pattern"):
            if getattr(self, name):
                warnings.warn(
                    f"AdaLoRA ignores `{name}` (as PEFT does): its scaling is lora_alpha / ranknum.", stacklevel=3
                )
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if self.orth_reg_weight < 0:
            raise ValueError(
                f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is {self.orth_reg_weight}"
            )
        if self.tinit >= (self.total_step - self.tfinal):
            raise ValueError(
                "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
                "increase `total_step`."
            )
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"AdaLoraConfig.{name} must be an int, got {value!r}")
        if self.init_r < 0:  # PEFT raises this when it builds the layers; r == 0 is allowed (PEFT #1539)
            raise ValueError(f"`r` should be a positive integer or 0, but the value passed is {self.init_r}")
        self.rank_pattern = _normalise_rank_pattern(self.rank_pattern)
