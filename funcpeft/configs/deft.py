"""PEFT's `DeftConfig` (`peft.tuners.deft.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, check_rank, validated_init
from .._constants import DEFAULT_TARGET_MODULES
from ._checks import check_bias, check_regex_targets

DECOMPOSITION_METHODS = ("qr", "relu")


@validated_init
@dataclass
class DeftConfig(PeftConfig):
    """DeFT: a residual-projection update, `W' = (I - P_proj) W + Q_P (s R)` (funcpeft.methods.deft).

    P (out, r) `deft_P` and R (r, in) `deft_R` are trained; r is capped at the layer's out_features (PEFT).
    decomposition_method: "relu": Q_P = P, P_proj = P relu(P)^T; "qr": Q_P = qr(P).Q, P_proj = Q_P Q_P^T.
    alpha: the injection's scaling s = alpha / r (None or 0: s = 1, PEFT's `if alpha`). para: PaRa, pure subspace
    removal `W' = (I - P_proj) W` (no R). init_weights=True: R = right(P)^T W / s, so W' == W at init;
    False: R ~ N(0, (0.02 init_scale)^2). deft_dropout: dropout on the injection's input. PEFT adapts nn.Linear
    and GPT-2's Conv1D only. r, deft_dropout and bias are checked here (PEFT: when it builds a layer / marks
    the trainable parameters), with PEFT's messages.
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: float | None = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.DEFT
    # PEFT: TRANSFORMERS_MODELS_TO_DEFT_TARGET_MODULES_MAPPING is a copy of LoRA's
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        if self.decomposition_method not in DECOMPOSITION_METHODS:
            raise ValueError(
                f"Unknown decomposition_method '{self.decomposition_method}', must be one of "
                f"{sorted(DECOMPOSITION_METHODS)}."
            )
        check_regex_targets(self)
        check_layers_and_saved(self)
        check_rank(self)
        if not 0.0 <= self.deft_dropout <= 1.0:  # nn.Dropout's check, which PEFT meets when it builds a layer
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.deft_dropout}")
        check_bias(self)
