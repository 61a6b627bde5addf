"""PEFT's `OFTConfig` (`peft.tuners.oft.config`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from packaging.version import Version  # transformers' dependency, as in PEFT

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
class OFTConfig(PeftConfig):
    """OFT: a block-diagonal orthogonal matrix R rotates a layer's input, `y = W (R x) + b` (funcpeft.methods.oft).

    Exactly one of `r` (number of blocks) and `oft_block_size` is non-zero; the other follows from the layer's
    input size (PEFT adjusts a size that does not divide it, with a warning). Each block is the Cayley
    transform of a skew-symmetric matrix (`use_cayley_neumann`: its Neumann series with
    `num_cayley_neumann_terms` terms). coft / eps: constrained OFT (the skew matrices are projected onto a
    ball of radius eps). block_share: one block shared by all blocks of a layer. module_dropout: accepted and
    saved, but PEFT 0.21.2 never applies it (neither does funcpeft).
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    PEFT_TYPE: ClassVar[PeftType] = PeftType.OFT

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        check_layers_and_saved(self)
        check_probability(self, "module_dropout")
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
        if self.bias not in ("none", "all", "oft_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'oft_only', got {self.bias!r}")
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError(
                f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and oft_block_size = "
                f"{self.oft_block_size}."
            )
        if not (self.r != 0) ^ (self.oft_block_size != 0):
            raise ValueError(
                f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), but not both "
                "simultaneously, because r x oft_block_size == in_features."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """PEFT's `OFTConfig.check_kwargs`: OFT files from before PEFT 0.14 are refused, Cayley-Neumann ones
        from before 0.18 warned about (their parameterisation changed)."""
        if "oft_block_size" not in data:
            raise ValueError(
                "OFT has been updated since PEFT 0.14.0. Your trained adapter weights are incompatible "
                "with the latest version of OFT. Please retrain your adapter weights with newer PEFT versions. "
                "Alternatively, downgrade PEFT to version 0.13.0 to use the old adapter weights."
            )
        version = Version(str(data.get("peft_version") or "0.0.0").partition("@")[0])
        if data.get("use_cayley_neumann", False) and version < Version("0.18.0"):
            warnings.warn(
                "The cayley-neumann parameterization has been slightly changed to be more numerically stable in "
                "PEFT 0.18.0. Please retrain your adapter weights with newer PEFT versions. Alternatively, "
                "downgrade PEFT to version 0.17.0 to use the old parameterization.",
                stacklevel=3,
            )
        return super().from_dict(data)
