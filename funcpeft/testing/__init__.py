"""Helpers for testing code that uses funcpeft: tiny models, random adapters, assertions, hypothesis strategies.

Tiny models are randomly initialised from configs (no downloads), in eval mode, seeded. The hypothesis
strategies live in `funcpeft.testing.strategies` (hypothesis is a test extra; they are also reachable here,
e.g. `funcpeft.testing.lora_configs`, imported on first use).
"""

from __future__ import annotations

from typing import Any

from ._asserts import assert_adapter_is_noop, assert_only_adapter_gets_grads, assert_trees_close, random_like
from ._models import (
    TINY_MODELS,
    TINY_MOE_MODELS,
    VOCAB,
    tiny_bert_seq_cls,
    tiny_gpt2,
    tiny_gpt_oss,
    tiny_llama,
    tiny_mistral,
    tiny_mixtral,
    tiny_qwen2,
    tiny_qwen2_moe,
    tiny_qwen3_moe,
    tiny_t5,
)
from ._peft import assert_matches_peft, copy_into_peft, peft_grads, peft_param_name

_STRATEGIES = (
    "tiny_models",
    "lora_config_kwargs",
    "lora_configs",
    "models_and_configs",
    "adapter_trees",
    "model_inputs",
)


def __getattr__(name: str) -> Any:
    """The hypothesis strategies of `funcpeft.testing.strategies`, re-exported lazily (hypothesis is a test dependency)."""
    if name in _STRATEGIES:
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TINY_MODELS",
    "TINY_MOE_MODELS",
    "VOCAB",
    "assert_adapter_is_noop",
    "assert_matches_peft",
    "assert_only_adapter_gets_grads",
    "assert_trees_close",
    "copy_into_peft",
    "peft_grads",
    "peft_param_name",
    "random_like",
    "tiny_bert_seq_cls",
    "tiny_gpt2",
    "tiny_gpt_oss",
    "tiny_llama",
    "tiny_mistral",
    "tiny_mixtral",
    "tiny_qwen2",
    "tiny_qwen2_moe",
    "tiny_qwen3_moe",
    "tiny_t5",
]
