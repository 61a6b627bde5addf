"""PEFT's `TinyLoraConfig` (`peft.tuners.tinylora.config`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_module_names, validated_init


@validated_init
@dataclass
class TinyLoraConfig(PeftConfig):
    """TinyLoRA: `dW = B (sum_i v_i P_i) A` with A, B the frozen rank-r SVD factors of W and P_i fixed random
    (r, r) projections; only v (u,) trains, shared by groups of layers (`weight_tying`) (funcpeft.methods.tinylora).

    init_weights: True: v = 0 (a no-op); "uniform": v ~ U(-init_v_bound, init_v_bound); False: uninitialised
    (torch.empty, as PEFT). save_projection=False is refused (see docs/usage.md "Limits").
    """

    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    target_modules: list[str] | set[str] | str | None = None
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.TINYLORA

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save projection tensors P within the state dictionary. They will be restored "
                "using the PRNG key stored in `config.projection_seed`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if self.u <= 0:
            raise ValueError(f"`u` should be a positive integer value but the value passed is {self.u}")
        if not (0.0 <= self.weight_tying <= 1.0):
            raise ValueError(
                f"`weight_tying` should be a float between 0.0 and 1.0 but the value passed is {self.weight_tying}"
            )
        if self.init_weights not in (True, False, "uniform"):
            # PEFT leaves v uninitialised for any other value; funcpeft names the accepted ones
            raise ValueError(f"`init_weights` must be True, False or 'uniform', got {self.init_weights!r}")
        if not 0.0 <= self.tinylora_dropout <= 1.0:  # nn.Dropout's check, which PEFT meets when it builds a layer
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.tinylora_dropout}")
        if self.bias not in ("none", "all", "tinylora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'tinylora_only', got {self.bias!r}")
        if not self.save_projection:
            raise NotImplementedError(
                "TinyLoraConfig.save_projection=False is not implemented in funcpeft: its files always hold the "
                "projections tinylora_P (they are made from projection_seed, so the values are the same)."
            )
