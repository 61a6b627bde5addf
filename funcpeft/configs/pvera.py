"""PEFT's `PveraConfig` (`peft.tuners.pvera.config`)."""

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
from ._checks import check_bias

# PEFT: TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING (VeRA's, with dinov2 -> query, value)
PVERA_TARGET_MODULES: dict[str, list[str] | str] = {**VERA_TARGET_MODULES, "dinov2": ["query", "value"]}


@validated_init
@dataclass
class PveraConfig(PeftConfig):
    """PVeRA (probabilistic VeRA): VeRA whose down-projection gives a mean and a log-variance.

    h = lambda_d * (A @ x) with A (2r, in) frozen and shared, split into (mu, logvar) of r each;
    y = base(x) + lambda_b * (B @ z), B (out, r) frozen and shared, z = mu at inference (unless
    sample_at_inference) and z = mu + eps * exp(logvar / 2), eps ~ N(0, 1), in training.
    projection_prng_key seeds A and B (kaiming-uniform, PEFT's draw); save_projection writes them into the
    adapter file. generator_seed: PEFT seeds a per-layer sampling generator with it; funcpeft samples from
    the call's randomness (`dropout_rng`) instead, so the field is kept for the file only.
    """

    r: int = 256
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    sample_at_inference: bool = False
    generator_seed: int | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PVERA
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = PVERA_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        # PEFT checks r at get_peft_model (update_layer), the others not at all: funcpeft checks them up front
        check_rank(self)
        check_probability(self, "pvera_dropout")
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
        check_bias(self)
        if not self.save_projection:
            warnings.warn(
                "Specified to not save pvera_A and pvera_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
