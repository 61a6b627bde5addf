"""PEFT's `BOFTConfig` (`peft.tuners.boft.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._config import (
    PeftConfig,
    PeftType,
    check_layers_and_saved,
    check_module_names,
    check_probability,
    validated_init,
)


@validated_init
@dataclass
class BOFTConfig(PeftConfig):
    """BOFT: a block-diagonal orthogonal matrix rotates a layer's input and a learned vector scales its output
    (funcpeft.methods.boft).

    Exactly one of `boft_block_size` and `boft_block_num` is non-zero; their product is the layer's input
    size. boft_n_butterfly_factor: the number of butterfly factors. PEFT 0.21.2 uses them only through its
    CUDA extension; without it (its pure-torch fallback, whose numbers funcpeft reproduces) the factor is
    forced to 1, with a warning. boft_dropout: in training, a random fraction of the blocks is replaced by
    the identity.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.BOFT

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        check_layers_and_saved(self)
        check_probability(self, "boft_dropout")
        for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an int, got {value!r}")
        if self.boft_block_size < 0 or self.boft_block_num < 0:
            raise ValueError(
                f"`boft_block_size` and `boft_block_num` must be >= 0, got {self.boft_block_size} and "
                f"{self.boft_block_num}"
            )
        if self.bias not in ("none", "all", "boft_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'boft_only', got {self.bias!r}")
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ValueError(
                "Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, boft_block_size = "
                f"{self.boft_block_size} and boft_block_num = {self.boft_block_num}."
            )
        if not (self.boft_block_size != 0) ^ (self.boft_block_num != 0):
            raise ValueError(
                f"You can only specify either boft_block_size ({self.boft_block_size}) or boft_block_num "
                f"({self.boft_block_num}), but not both simultaneously, because boft_block_size x boft_block_num "
                "== in_features."
            )
