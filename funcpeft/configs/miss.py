"""PEFT's `MissConfig` (`peft.tuners.miss.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_module_names, check_probability, check_rank, validated_init
from ._checks import check_bias, check_regex_targets, check_saved


@validated_init
@dataclass
class MissConfig(PeftConfig):
    """MiSS: a shard `miss_block` shared by the column blocks of W (Linear layers only).

    init_weights: True (the balanced MiSS, block (r, out), zeros), False (the same, kaiming-uniform),
    "bat" (block (out / r, r, r), zeros: W' = W + W_blocks @ B + B, nonlinear across shards) or "mini"
    (block (r, mini_r), zeros, repeated over out_features; out_features % mini_r == 0).
    r must not exceed in_features; "bat" needs in_features and out_features divisible by r.
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.MISS

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        check_probability(self, "miss_dropout")
        check_module_names(self, "target_modules", "exclude_modules")
        check_regex_targets(self)
        check_bias(self)
        check_saved(self)
        init = self.init_weights
        if not (isinstance(init, bool) or init in ("bat", "mini")):
            raise ValueError(f"`init_weights` must be True, False, 'bat' or 'mini', got {init!r}")
        if self.init_weights == "mini" and (
            isinstance(self.mini_r, bool) or not isinstance(self.mini_r, int) or self.mini_r <= 0
        ):
            raise ValueError(f"`mini_r` must be a positive integer with init_weights='mini', got {self.mini_r!r}")
