"""PEFT's `DeloraConfig` (`peft.tuners.delora.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init
from .._constants import DEFAULT_TARGET_MODULES
from ._checks import check_bias


@validated_init
@dataclass
class DeloraConfig(PeftConfig):
    """DeLoRA: `dW = B diag(lambda / r / (||A_i|| ||B^i||)) A diag(||W_:,j||)`, A (r, in), B (out, r), lambda (1,).

    The update's Frobenius norm is bounded by lambda times the base weight's column norms (frozen when the
    adapter is made, saved as `delora_w_norm`). init_weights=True: A kaiming-uniform, B zeros (PEFT's default);
    False: both kaiming-uniform. module_dropout: dropout on the adapter's input (PEFT's nn.Dropout) in training.
    rank_pattern / lambda_pattern: {module regex: r / lambda}. PEFT adapts nn.Linear only.
    """

    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict | None = field(default_factory=dict)
    lambda_pattern: dict | None = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.DELORA
    # PEFT: TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING is a copy of LoRA's
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        # PEFT's checks, in its order (a regex target_modules with layers_pattern fails the second one)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
        if self.r <= 0:
            raise ValueError(f"`r` must be a positive integer; got {self.r}.")
        check_bias(self)
        p = self.module_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"`module_dropout` must be a probability in [0, 1] (PEFT's nn.Dropout), got {p!r}")
        for name in ("rank_pattern", "lambda_pattern"):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
            elif not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
                raise ValueError(f"`{name}` must be a dict of module name regex -> value, got {pattern!r}")
