"""PEFT's `CartridgeConfig` (`peft.tuners.cartridge.config`): a trained KV-cache prefix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftType, validated_init
from .prompt_learning import PromptLearningConfig


@validated_init
@dataclass
class CartridgeConfig(PromptLearningConfig):
    """Cartridges: the prefix's keys and values themselves are the parameters (prefix tuning without a
    projection), (num_virtual_tokens, num_layers * 2 * token_dim), served as `past_key_values`. The first
    `num_frozen_tokens` virtual tokens are frozen (an attention sink, as the paper recommends)."""

    num_frozen_tokens: int = 1

    PEFT_TYPE: ClassVar[PeftType] = PeftType.CARTRIDGE

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        if self.num_frozen_tokens < 0:
            raise ValueError(f"`num_frozen_tokens` must be >= 0, got {self.num_frozen_tokens}.")
        if (self.num_virtual_tokens is not None) and (self.num_frozen_tokens > self.num_virtual_tokens):
            raise ValueError(
                f"`num_frozen_tokens` must be <= `num_virtual_tokens`, got num_frozen_tokens={self.num_frozen_tokens} "
                f"and num_virtual_tokens={self.num_virtual_tokens}."
            )
