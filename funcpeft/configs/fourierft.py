"""PEFT's `FourierFTConfig` (`peft.tuners.fourierft.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .._config import PeftConfig, PeftType, validated_init
from .._constants import FOURIERFT_TARGET_MODULES
from ._checks import check_sparse_spectrum


@validated_init
@dataclass
class FourierFTConfig(PeftConfig):
    """FourierFT: `dW = Re(ifft2(S)) * scaling`, S (out, in) zero but at `n_frequency` random spectral entries.

    The entries' locations are drawn like PEFT's, `randperm(out * in, seed=random_loc_seed)[:n]`, per layer
    (frozen; rebuilt from the seed, never saved); their values `fourierft_spectrum` (n,) are trained:
    randn (init_weights=False, PEFT's default) or zeros (True). n_frequency_pattern: {module regex: n}.
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int | None = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict | None = field(default_factory=dict)
    init_weights: bool = False

    PEFT_TYPE: ClassVar[PeftType] = PeftType.FOURIERFT
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = FOURIERFT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_sparse_spectrum(self)
        seed = self.random_loc_seed
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(
                f"`random_loc_seed` must be an int (the spectral entries are drawn from "
                f"torch.Generator().manual_seed(random_loc_seed)), got {seed!r}"
            )
