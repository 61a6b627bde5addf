"""PEFT's `HiraConfig` (`peft.tuners.hira.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init


@validated_init
@dataclass
class HiraConfig(PeftConfig):
    """HiRA: a Hadamard-modulated update, `W' = W0 + W0 * (B A)` (funcpeft.methods.hira).

    r: the rank of B A (per module via rank_pattern; PEFT checks `r > 0` when it builds each layer, so does
    funcpeft). init_weights: True: A kaiming-uniform, B zeros (a no-op); "gaussian": A ~ N(0, 1/r) on linear
    layers; False: both randn (embeddings too); None: like False on linear / conv layers, like True on embeddings
    (PEFT's `if init_weights:` vs `if init_weights is False:`).
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_weights: bool | Literal["gaussian"] | None = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)

    PEFT_TYPE: ClassVar[PeftType] = PeftType.HIRA
    WRITES_FAN_IN_FAN_OUT: ClassVar[bool] = False  # PEFT's dispatch_default only warns

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        if not 0.0 <= self.hira_dropout <= 1.0:  # nn.Dropout's check, which PEFT meets when it builds a layer
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.hira_dropout}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
