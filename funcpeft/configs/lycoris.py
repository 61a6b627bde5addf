"""PEFT's `LoHaConfig` and `LoKrConfig` (`peft.tuners.loha.config`, `peft.tuners.lokr.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share (PEFT's `LycorisConfig`); scaling is `alpha / r`."""

    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    r: int = 8
    alpha: float = 8  # PEFT annotates int but only divides by it: a float alpha works there too
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def _check(self) -> None:
        check_rank(self)
        check_probability(self, "rank_dropout", "module_dropout")
        check_module_names(self, "target_modules", "exclude_modules")
        check_layers_and_saved(self)


@validated_init
@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: `dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r` (Hadamard product of two low-rank terms)."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LOHA

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        self._check()


@validated_init
@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr: `dW = kron(w1, w2) * alpha / r`, each factor full or low-rank (see funcpeft.methods.lokr).

    init_weights: True (w1 = 0), False (all random) or "lycoris" (w2 = 0, LyCORIS' way).
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LOKR
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True  # type: ignore[assignment]  # LoKr also takes "lycoris"

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        self._check()
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"`init_weights` must be True, False or 'lycoris', got {self.init_weights!r}")
