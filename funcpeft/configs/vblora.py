"""PEFT's `VBLoRAConfig` (`peft.tuners.vblora.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, check_rank, validated_init
from .._constants import VBLORA_TARGET_MODULES


@validated_init
@dataclass
class VBLoRAConfig(PeftConfig):
    """VB-LoRA: LoRA's A (r, in) and B (out, r) assembled from a trainable bank of `num_vectors` vectors of
    length `vector_length` shared by all layers; each sub-vector is a softmax mix of the `topk` bank vectors
    its logits rank highest. vector_length must divide every target's in and out features.

    save_only_topk_weights: files keep only each logit row's top-k indices and k-1 weights (inference and
    merging only, like PEFT). init_vector_bank_bound: bank ~ U(-b, b); init_logits_std: logits ~ N(0, std).
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.VBLORA
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = VBLORA_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        for name in ("topk", "num_vectors", "vector_length"):  # PEFT fails later (or not at all) on these
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` {value!r} should be a positive integer value")
        if self.topk > self.num_vectors:
            raise ValueError(f"`topk` {self.topk} cannot exceed `num_vectors` {self.num_vectors}")
        p = self.vblora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p!r} (`vblora_dropout`)")
        check_module_names(self, "target_modules", "exclude_modules")
        check_layers_and_saved(self)
        if self.bias not in ("none", "all", "vblora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'vblora_only', got {self.bias!r}")
