"""PEFT's `HiraConfig` (`peft.tuners.hira.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, check_rank, validated_init


@validated_init
@dataclass
class HiraConfig(PeftConfig):
    """HiRA: a Hadamard-modulated update, `W' = W0 + W0 * (B A)` (funcpeft.methods.hira).

    r: the rank of B A (PEFT checks `r > 0` when it builds a layer; funcpeft here, with PEFT's message).
    rank_pattern: refused when not empty: PEFT 0.21.2's `dispatch_default` builds every newly adapted layer with
    `config.r` and ignores it (it only reaches a second adapter added to a layer HiRA already wraps), so no
    single reading reproduces PEFT; see docs/usage.md "Limits". init_weights: True: A kaiming-uniform, B zeros (a no-op); "gaussian": A ~ N(0, 1/r) on linear
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
        check_rank(self)
        if self.rank_pattern:
            raise NotImplementedError(
                f"HiraConfig.rank_pattern={self.rank_pattern!r}: PEFT 0.21.2's HiRA ignores rank_pattern for the "
                "layers it adapts (its dispatch_default builds them with `r`) and applies it only to a second adapter "
                "on an already adapted layer; funcpeft refuses it rather than reproduce that. Use `r` (one rank for "
                "all layers) or separate adapters."
            )
        check_module_names(self, "target_modules", "exclude_modules")
        if not 0.0 <= self.hira_dropout <= 1.0:  # nn.Dropout's check, which PEFT meets when it builds a layer
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.hira_dropout}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
