"""PEFT's `AdaptionPromptConfig` (`peft.tuners.adaption_prompt.config`): Llama-Adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._config import PeftConfig, PeftType, validated_init
from .._constants import ADAPTION_PROMPT_TARGET_MODULES


@validated_init
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Llama-Adapter (https://huggingface.co/papers/2303.16199): the top `adapter_layers` attention modules
    (named `target_modules`, a module name such as "self_attn") also attend, through a zero-initialised gate, to
    `adapter_len` learned prompt vectors. PEFT supports model types llama, mistral and gpt2.

    PEFT checks nothing here; funcpeft checks adapter_len / adapter_layers when the config meets a model
    (get_peft_model), where PEFT would fail with an unclear TypeError.
    """

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADAPTION_PROMPT
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = ADAPTION_PROMPT_TARGET_MODULES
    COMPRESS_TARGET_MODULES: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()

    @property
    def is_adaption_prompt(self) -> bool:
        """True (PEFT's property)."""
        return True

    def default_targets(self, model: Any) -> Any:
        """PEFT's `prepare_config`: the model type's attention module name; ValueError for other model types."""
        return ADAPTION_PROMPT_TARGET_MODULES[check_model_type(model)]


def check_model_type(model: Any) -> str:
    """The model's `config.model_type`, one PEFT's AdaptionPrompt supports (else PEFT's ValueError)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTION_PROMPT_TARGET_MODULES:
        raise ValueError(
            f"Unsupported model type for adaption prompt: '{model_type}'. Supported (PEFT 0.21.2): "
            f"{sorted(ADAPTION_PROMPT_TARGET_MODULES)}."
        )
    return str(model_type)
