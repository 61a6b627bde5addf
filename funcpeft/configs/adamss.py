"""PEFT's `AdamssConfig` (`peft.tuners.adamss.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init
from .._constants import DEFAULT_TARGET_MODULES
from ._checks import check_positive_int

# funcpeft names each subspace's leaves adamss_A_<i> / adamss_B_<i> (PEFT's ParameterList entries adamss_A.<i>)
MAX_SUBSPACES = 256


@validated_init
@dataclass
class AdamssConfig(PeftConfig):
    """AdaMSS: an SVD of [W | b] (rank r), its left singular vectors clustered (k-means) into subspaces, and one
    low-rank update B_i A_i per subspace (funcpeft.methods.adamss).

    r: the SVD rank (capped at min(out, in (+1 with a bias))); num_subspaces: the clusters (capped at out);
    subspace_rank: each subspace's rank (capped at its size), or, with use_dynamic_rank, the number of its Gram
    matrix's singular values above svd_threshold * the largest (at most subspace_rank). init_weights="orthogonal":
    B zeros (a no-op adapter); None / False: B ~ 0.01 N(0, 1). random_seed: seeds the SVD's random projection, so
    a saved adapter's layers are rebuilt the same. use_asa and the asa_* / warmup fields configure PEFT's adaptive
    subspace allocation (a training-loop callback, `update_and_allocate`), which funcpeft does not implement yet:
    they are validated and saved, and the adapter's forward is the same either way. Needs scikit-learn (k-means).
    r, num_subspaces and subspace_rank are checked to be positive ints (PEFT fails later, inside the SVD).
    """

    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    target_modules: list[str] | set[str] | str | None = None
    init_weights: str | bool | None = "orthogonal"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADAMSS
    # PEFT: TRANSFORMERS_MODELS_TO_ADAMSS_TARGET_MODULES_MAPPING is LoRA's with vit -> query, value
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = {
        **DEFAULT_TARGET_MODULES,
        "vit": ["query", "value"],
    }

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
        if self.init_weights is False:  # PEFT: False means None
            self.init_weights = None
        if self.init_weights not in ["orthogonal", None]:
            raise ValueError(f"init_weights must be 'orthogonal' or None, got {self.init_weights}")
        for name in ("r", "num_subspaces", "subspace_rank"):
            check_positive_int(self, name)
        if self.num_subspaces > MAX_SUBSPACES:
            raise NotImplementedError(
                f"AdamssConfig.num_subspaces={self.num_subspaces}: funcpeft supports at most {MAX_SUBSPACES} "
                "subspaces per layer (PEFT's typical values are 3-10)."
            )
        if self.use_asa:
            if self.mask_interval <= 0:
                raise ValueError(
                    f"`mask_interval` must be a positive integer when `use_asa=True`, got {self.mask_interval}."
                )
            if self.init_warmup >= self.final_warmup:
                raise ValueError(
                    "`init_warmup` must be smaller than `final_warmup` when `use_asa=True` so that ASA has a "
                    f"non-empty pruning ramp, got init_warmup={self.init_warmup} and "
                    f"final_warmup={self.final_warmup}."
                )
            if self.asa_target_subspaces <= 0:
                raise ValueError(
                    "`asa_target_subspaces` must be a positive integer when `use_asa=True`, got "
                    f"{self.asa_target_subspaces}."
                )
            if self.asa_schedule_exponent <= 0:
                raise ValueError(
                    "`asa_schedule_exponent` must be a positive number when `use_asa=True`, got "
                    f"{self.asa_schedule_exponent}."
                )
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise ImportError(
                "scikit-learn is required for AdaMSS. Please install it with: pip install scikit-learn"
            ) from None
