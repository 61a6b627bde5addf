"""PEFT's `ShiraConfig` (`peft.tuners.shira.config`) and its default mask function (`mask_functions.random_mask`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, check_rank, validated_init
from .._constants import SHIRA_TARGET_MODULES


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs: Any) -> torch.Tensor:
    """PEFT's default SHiRA mask: r * (out + in) ones at `randperm` positions of an (out, in) bool mask.

    A fresh `torch.Generator` per layer (seeded with `random_seed` when given, else torch's fixed default
    seed), so the global RNG is untouched and same-shaped layers get the same mask.
    """
    weight: Any = base_layer.weight
    # (out, in): PEFT's `_get_in_out_features` (an nn.Linear's features: a quantised one's weight is packed data)
    if isinstance(base_layer, nn.Linear):
        shape = (int(base_layer.out_features), int(base_layer.in_features))
    else:
        shape = (int(weight.shape[0]), int(weight.shape[1]))
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    idx = torch.randperm(shape[0] * shape[1], generator=generator)[: r * (shape[0] + shape[1])].to(weight.device)
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=weight.device)
    return mask.scatter(0, idx, torch.ones_like(idx, dtype=torch.bool)).view(shape)


@validated_init
@dataclass
class ShiraConfig(PeftConfig):
    """SHiRA: a sparse high-rank delta `dW` with r * (out + in) trainable values at the positions of a frozen mask.

    mask_type: "random" uses `random_mask` (seeded by `random_seed`); any other value needs a mask function
    set as `config.mask_fn = fn` (PEFT's way) with `fn(base_layer, r) -> (out, in)` 0/1 mask holding exactly
    r * (out + in) ones. mask_fn is not written to adapter_config.json (a loaded adapter reads its mask indices
    from the checkpoint). init_weights: zeros (a no-op adapter) or randn.
    """

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: list[str] | None = None
    mask_fn: Callable[..., torch.Tensor] | None = field(default=None, repr=False, compare=False)

    PEFT_TYPE: ClassVar[PeftType] = PeftType.SHIRA
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = SHIRA_TARGET_MODULES
    _not_saved: ClassVar[frozenset[str]] = frozenset({"runtime_config", "mask_fn"})

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
        if self.mask_type == "random":
            self.mask_fn = random_mask
        elif self.mask_fn is None and not self.inference_mode:
            warnings.warn(
                f"Argument self.mask_type={self.mask_type!r} is not recognized, please supply your own masking "
                "function by calling `config.mask_fn = my_mask_fn`.",
                stacklevel=4,  # the user's call, past __post_init__, the dataclass __init__ and validated_init
            )
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise ValueError(f"ShiraConfig.mask_fn must be callable (base_layer, r) -> mask, got {self.mask_fn!r}")
