"""PEFT's `PsoftConfig` (`peft.tuners.psoft.config`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init

AB_SVD_INITS = ("pissa_init", "psoft_init")
SVD_BACKENDS = ("full", "lowrank")


def _default(config: Any, name: str) -> Any:
    return next(f.default for f in fields(config) if f.name == name)


@validated_init
@dataclass
class PsoftConfig(PeftConfig):
    """PSOFT: an r x r transform R between the frozen principal-subspace factors of W: dW = s B (R - I) A.

    A (r, in) and B (out, r) come from the SVD of the base weight when the adapter is made (never saved:
    PEFT rebuilds them from the base weight on load); s = psoft_alpha / r. R = diag(vector_b) C diag(vector_a)
    with C the Cayley transform (I + Q)(I - Q)^-1 of a skew Q (psoft_orth; its Neumann series with
    use_cayley_neumann) or a free r x r matrix. ab_svd_init: "psoft_init" (A = Vh_r, B = U_r S_r / s) or
    "pissa_init" (sqrt(S_r / s) on both sides). psoft_svd: "full" (torch.linalg.svd) or "lowrank"
    (torch.svd_lowrank seeded by random_seed). PEFT adapts nn.Linear only.
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    psoft_alpha: int = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    # PEFT's Literal["psoft_init", "pissa_init"] / Literal["full", "lowrank"]: typed str so that __post_init__
    # raises PEFT's own messages for other values
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PSOFT

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        # PEFT's checks, in its order
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
        if self.r <= 0:
            raise ValueError(f"`r` must be a positive integer; got {self.r}.")
        if self.ab_svd_init not in AB_SVD_INITS:
            raise ValueError(f"`ab_svd_init` must be one of {list(AB_SVD_INITS)}; got {self.ab_svd_init!r}.")
        if self.psoft_svd not in SVD_BACKENDS:
            raise ValueError(f"`psoft_svd` must be one of {list(SVD_BACKENDS)}; got {self.psoft_svd!r}.")
        p = self.psoft_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"`psoft_dropout` must be a probability in [0, 1] (PEFT's nn.Dropout), got {p!r}")
        niter = _default(self, "psoft_svd_lowrank_niter")
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != niter:
            warnings.warn(
                "`psoft_svd_lowrank_niter` is only used when `psoft_svd='lowrank'`. "
                f"Got psoft_svd={self.psoft_svd!r}, so psoft_svd_lowrank_niter="
                f"{self.psoft_svd_lowrank_niter} will be ignored.",
                UserWarning,
                stacklevel=3,
            )
        terms = _default(self, "num_cayley_neumann_terms")
        if self.use_cayley_neumann:
            if self.num_cayley_neumann_terms <= 0:
                raise ValueError(
                    f"`num_cayley_neumann_terms` must be a positive integer; got {self.num_cayley_neumann_terms}."
                )
            if self.cayley_neumann_eps is not None and not (0.0 < self.cayley_neumann_eps < 1.0):
                raise ValueError(f"`cayley_neumann_eps` must be in (0, 1) when set; got {self.cayley_neumann_eps}.")
        else:
            if self.num_cayley_neumann_terms != terms:
                warnings.warn(
                    "`num_cayley_neumann_terms` is only used when `use_cayley_neumann=True`. "
                    f"Since `use_cayley_neumann=False`, `num_cayley_neumann_terms={self.num_cayley_neumann_terms}` "
                    "will be ignored.",
                    UserWarning,
                    stacklevel=3,
                )
            if self.cayley_neumann_eps is not None:
                warnings.warn(
                    "`cayley_neumann_eps` is only used when `use_cayley_neumann=True`. "
                    f"Since `use_cayley_neumann=False`, `cayley_neumann_eps={self.cayley_neumann_eps}` will be ignored.",
                    UserWarning,
                    stacklevel=3,
                )
