"""Tiny randomly initialised transformers models (no downloads), seeded, in eval mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import (
        BertForSequenceClassification,
        GPT2LMHeadModel,
        GptOssForCausalLM,
        LlamaForCausalLM,
        MistralForCausalLM,
        MixtralForCausalLM,
        PreTrainedModel,
        Qwen2ForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3MoeForCausalLM,
        T5ForConditionalGeneration,
    )

VOCAB = 128
_M = TypeVar("_M", bound=nn.Module)


def _seeded(build: Callable[[], _M], seed: int) -> _M:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def _decoder(layers: int = 2, hidden: int = 64) -> dict[str, Any]:
    """The tiny decoder-only shape the Llama, Mistral and Qwen2 test models share (4 heads, 2 KV heads)."""
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
    }


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, tie: bool = False) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_decoder(layers, hidden), tie_word_embeddings=tie)
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**_decoder())
    return _seeded(lambda: MistralForCausalLM(cfg), seed)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**_decoder())
    return _seeded(lambda: Qwen2ForCausalLM(cfg), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed)


def tiny_bert_seq_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(  # type: ignore[call-arg]
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return _seeded(lambda: BertForSequenceClassification(cfg), seed)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(  # type: ignore[call-arg]
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return _seeded(lambda: T5ForConditionalGeneration(cfg), seed)


_MOE: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
}
_MOE_HEAD8: dict[str, Any] = {**_MOE, "head_dim": 8}


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    """Mixtral (transformers v5): 4 experts as stacked (E, out, in) parameters `experts.gate_up_proj` / `down_proj`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **_MOE)
    return _seeded(lambda: MixtralForCausalLM(cfg), seed)


def tiny_qwen2_moe(seed: int = 0) -> Qwen2MoeForCausalLM:
    """Qwen2-MoE: 4 stacked experts plus a shared expert of nn.Linear layers."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        intermediate_size=16,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        **_MOE,
    )
    return _seeded(lambda: Qwen2MoeForCausalLM(cfg), seed)


def tiny_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    """Qwen3-MoE: 4 stacked experts (PEFT rewrites v4 expert names in LoRA configs for it)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        intermediate_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, **_MOE_HEAD8
    )
    return _seeded(lambda: Qwen3MoeForCausalLM(cfg), seed)


def tiny_gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    """GPT-OSS: 4 experts stored transposed (E, in, out) (`is_transposed=True`), with per-expert biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"],
        **_MOE_HEAD8,
    )
    return _seeded(lambda: GptOssForCausalLM(cfg), seed)


TINY_MOE_MODELS: dict[str, Callable[..., PreTrainedModel]] = {
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "qwen3_moe": tiny_qwen3_moe,
    "gpt_oss": tiny_gpt_oss,
}
"""Tiny mixture-of-experts models whose experts are bare parameters (`LoraConfig(target_parameters=...)`)."""

TINY_MODELS: dict[str, Callable[..., PreTrainedModel]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "bert_seq_cls": tiny_bert_seq_cls,
    "t5": tiny_t5,
}
