"""PEFT's `WaveFTConfig` (`peft.tuners.waveft.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .._config import PeftConfig, PeftType, validated_init
from .._constants import DEFAULT_TARGET_MODULES
from .._wavelets import WAVELETS, filter_length  # the filters live with the transform
from ._checks import check_sparse_spectrum

# PEFT: TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING (LoRA's without btlm / rwkv / rwkv7; GPT-2 style
# models target mlp.c_proj)
WAVEFT_TARGET_MODULES: dict[str, list[str] | str] = {
    **{k: v for k, v in DEFAULT_TARGET_MODULES.items() if k not in ("btlm", "rwkv", "rwkv7")},
    "gpt_bigcode": ["mlp.c_proj"],
    "gpt2": ["mlp.c_proj"],
}

# PEFT's WAVELET_REDUCTIONS (peft/tuners/waveft/constants.py): the rows / columns a single-level reconstruction
# loses to the filter, padded back before it: 2 * (filter length / 2 - 1) for db<n>, sym<n> (length 2n) and
# coif<n> (length 6n)
WAVELET_REDUCTIONS: dict[str, tuple[int, int]] = {
    **{f"db{n}": (2 * n - 2, 2 * n - 2) for n in range(1, 39)},
    **{f"sym{n}": (2 * n - 2, 2 * n - 2) for n in range(2, 21)},
    **{f"coif{n}": (6 * n - 2, 6 * n - 2) for n in range(1, 18)},
}


@validated_init
@dataclass
class WaveFTConfig(PeftConfig):
    """WaveFT: `dW = IDWT2(S) * scaling`, S zero but at `n_frequency` random entries (the trained coefficients).

    The entries' locations are PEFT's draw `randperm(out * in, seed=random_loc_seed)[:n]` per layer (frozen,
    rebuilt from the seed, never saved); their values `waveft_spectrum` (n,) are trained: zeros
    (init_weights=True, PEFT's default) or randn * 0.01. use_idwt=False: dW = S * scaling (no transform).
    wavelet_family: a key of PEFT's WAVELET_REDUCTIONS; with use_idwt, one PEFT's transform knows (db1-db10,
    sym2-sym10, coif1-coif4: PEFT's coif5 filter does not fit its padding; see funcpeft._wavelets.WAVELETS). n_frequency_pattern: {module regex: n}.
    proportional_parameters: each layer gets max(1, round(out * in / sum(out * in) * n_frequency * layers)).
    """

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict | None = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.WAVEFT
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = WAVEFT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_sparse_spectrum(self)
        if self.wavelet_family not in WAVELET_REDUCTIONS:
            raise ValueError(
                f"Wavelet family {self.wavelet_family} not supported. Supported wavelet families are: "
                f"{list(WAVELET_REDUCTIONS.keys())}"
            )

        if self.use_idwt and self.wavelet_family not in WAVELETS:
            # PEFT accepts these and fails at the first forward (its Wavelet class has no filters for them)
            raise ValueError(
                f"Wavelet family {self.wavelet_family!r} has no filters in PEFT's WaveFT transform (it accepts the "
                f"config and fails at the first forward with 'Unknown wavelet name'); with use_idwt=True use one of "
                f"{[w for w in WAVELETS if w in WAVELET_REDUCTIONS and filter_length(w) - 2 == WAVELET_REDUCTIONS[w][0]]}"
                ", or use_idwt=False"
            )
        if self.use_idwt and filter_length(self.wavelet_family) - 2 != WAVELET_REDUCTIONS[self.wavelet_family][0]:
            # PEFT's coif5 table has 48 taps where its padding assumes 30: dW comes out too small and its forward
            # fails with a shape error
            length, reduction = filter_length(self.wavelet_family), WAVELET_REDUCTIONS[self.wavelet_family][0]
            raise ValueError(
                f"Wavelet family {self.wavelet_family!r}: PEFT's filter has {length} taps but its padding "
                f"(WAVELET_REDUCTIONS) assumes {reduction + 2}, so the reconstructed update is {length - 2 - reduction} "
                f"rows and columns short of the weight and PEFT's forward fails; use another wavelet or use_idwt=False"
            )
