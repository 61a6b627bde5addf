"""PEFT's `FrodConfig` (`peft.tuners.frod.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init
from .._constants import VERA_TARGET_MODULES
from ._checks import check_bias

FROD_TARGET_MODULES: dict[str, list[str] | str] = {**VERA_TARGET_MODULES, "vit": ["query", "value"]}


@validated_init
@dataclass
class FrodConfig(PeftConfig):
    """FRoD: the adapted weight reparameterised as `U (S + diag(lambda_l)) V^T` over a basis V shared by the layers
    of one role (funcpeft.methods.frod).

    projection_prng_key: seeds the sparse pattern of S; sparse_rate: the fraction of S's off-diagonal entries that
    are trainable; regularization_alpha: the ridge term of the shared-basis decomposition; save_projection: PEFT's
    files hold V and S's pattern. init_weights: True: S zero (the base weight, up to rounding); False: S ~ N(0,
    0.1^2) and lambda_l + N(0, 0.1^2). progressbar and runtime_offload_base_weight only concern PEFT's progress
    output and device placement: kept for files, without effect here (funcpeft never moves base weights).
    """

    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    PEFT_TYPE: ClassVar[PeftType] = PeftType.FROD
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = FROD_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
        check_bias(self)
        if self.sparse_rate < 0 or self.sparse_rate > 1:
            raise ValueError(f"`sparse_rate` should be between 0 and 1, got {self.sparse_rate}.")
        if not 0.0 <= self.frod_dropout <= 1.0:  # nn.Dropout's check, which PEFT meets when it builds a layer
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.frod_dropout}")

    def check_new_adapter_config(self, others: Mapping[str, PeftConfig]) -> None:
        """PEFT's `FrodModel._check_new_adapter_config`: one projection key, save_projection and offload setting."""
        for other in others.values():
            if isinstance(other, FrodConfig) and other.projection_prng_key != self.projection_prng_key:
                raise ValueError(
                    "FRoD projection initialization key must be the same for all adapters. Got "
                    f"config.projection_prng_key={self.projection_prng_key!r} but previous config had "
                    f"{other.projection_prng_key}."
                )
        frod = [c for c in (*others.values(), self) if isinstance(c, FrodConfig)]
        saves = sorted({c.save_projection for c in frod})
        if len(saves) > 1:
            raise ValueError(
                "FRoD projection weights must be saved for all adapters or none, but got multiple different values: "
                f"{saves}"
            )
        offloads = sorted({c.runtime_offload_base_weight for c in frod})
        if len(offloads) > 1:
            raise ValueError(
                "FRoD runtime base-weight offloading must be enabled for all adapters or none, but got multiple "
                f"different values: {offloads}"
            )
