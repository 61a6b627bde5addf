"""PEFT's `RandLoraConfig` (`peft.tuners.randlora.config`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_module_names, check_probability, check_rank, validated_init
from ._checks import check_bias, check_saved


@validated_init
@dataclass
class RandLoraConfig(PeftConfig):
    """RandLoRA: `dW = (alpha / r) * B_flat @ (lambda * A * gamma)_flat`, full rank from frozen random bases.

    randlora_A (r, 1, min_dim) and randlora_B (max_dim, n_bases, r) are drawn once per adapter from
    `projection_prng_key` at the largest target dims (kaiming-uniform in bfloat16, std-normalised; or
    ternary with `sparse` / `very_sparse`) and shared by every layer; save_projection writes them into
    the adapter file. Trainable per layer: randlora_lambda (r, n) and randlora_gamma (n, min(in, out)),
    n = ceil(min(in, out) / r).
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.RANDLORA

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        check_probability(self, "randlora_dropout")
        check_module_names(self, "target_modules")
        check_bias(self)
        check_saved(self)
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int):
            raise ValueError(f"`projection_prng_key` must be an int (it seeds the shared random bases), got {key!r}")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save basis_A and basis_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
