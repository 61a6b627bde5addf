"""PEFT's `BeftConfig` (`peft.tuners.beft.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init

# PEFT's TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING: the value projections
BEFT_TARGET_MODULES: dict[str, list[str] | str] = {
    **dict.fromkeys(("t5", "mt5"), ["v"]),
    **dict.fromkeys(("roberta", "bert"), ["value"]),
    "deberta-v2": ["value_proj"],
    **dict.fromkeys(
        (
            "opt",
            "gptj",
            "gpt_neo",
            "bart",
            "llama",
            "llama4",
            "mistral",
            "mixtral",
            "phi",
            "gemma",
            "gemma2",
            "gemma3_text",
            "qwen2",
            "qwen3",
        ),
        ["v_proj"],
    ),
}


@validated_init
@dataclass
class BeftConfig(PeftConfig):
    """BEFT: a learned bias added to a layer's output, `y = base(x) + b`, b `beft_bias` (1, out).

    init_weights: True = zeros (a no-op adapter), False = randn (PEFT draws randn in both cases, then zeroes it).
    Merging adds b to the layer's bias; a layer without a bias cannot be merged (PEFT's ValueError). PEFT adapts
    nn.Linear only; the default targets are the value projections.
    """

    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.BEFT
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = BEFT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules")
        check_layers_and_saved(self)
