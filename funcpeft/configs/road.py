"""PEFT's `RoadConfig` (`peft.tuners.road.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init
from .._constants import DEFAULT_TARGET_MODULES

ROAD_VARIANTS = ("road_1", "road_2", "road_4")


@validated_init
@dataclass
class RoadConfig(PeftConfig):
    """RoAd: each pair of a layer's output elements is rotated and scaled, `y = R(alpha, theta) base(x)`.

    variant: "road_1" (one angle and scale per pair: out / 2 of each), "road_2" (per element: out) or "road_4"
    (two per element: 2 * out). group_size: elements i and i + group_size / 2 of each group of group_size outputs
    form a pair; even, and it must divide every targeted layer's out_features. init_weights: True = theta 0,
    alpha 1 (the identity); False = theta ~ N(0, 0.5), alpha ~ N(1, 0.5). PEFT adapts nn.Linear only.
    """

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ROAD
    # PEFT: TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING is a copy of LoRA's
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
        # PEFT's checks and messages
        if self.variant not in ROAD_VARIANTS:
            raise ValueError(f"Invalid variant {self.variant} specified. Please choose from road_1, road_2 or road_4")
        g = self.group_size
        if g <= 0 or g % 2 != 0:
            raise ValueError(f"The group_size must be divisible by 2 when using RoadLayer, but got {g}.")
