"""Cartridges (`CartridgeConfig`): a trained KV-cache prefix (peft/tuners/cartridge/).

The adapter tree's `'<prompt>'` entry holds PEFT's `CartridgeEncoder` parameters: `frozen_embedding`
(num_frozen_tokens, num_layers * 2 * token_dim; absent when num_frozen_tokens is 0), never trained (PEFT's
requires_grad=False), and `trainable_embedding` (num_virtual_tokens - num_frozen_tokens, same width), both drawn
N(0, 1) in that order as in PEFT. A call serves their concatenation as the keys and values of a prefix cache,
exactly like prefix tuning without a projection (funcpeft.methods.prompt_learning: `past_key_values`, the attention
mask extended, position_ids shifted); on a grouped-query model token_dim is the key/value heads' width. PEFT saves
the concatenation as `prompt_embeddings` and splits it again on load. `prefix_from_past_key_values` builds the
flattened prefix from a cache (PEFT's `initialize_kv_prefix_from_past_key_values`), e.g. from a no-grad prefill of
the base model on a text (the paper's initialisation from the first tokens of a corpus).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..configs.cartridge import CartridgeConfig
from . import prompt_learning as pl
from ._registry import register
from .base import InputContext, InputMethod, ModelCall, Params


@dataclasses.dataclass(frozen=True)
class CartridgeSpec:
    """prompt: the prefix's prompt-learning spec; frozen: num_frozen_tokens."""

    prompt: pl.PromptSpec
    frozen: int

    @property
    def width(self) -> int:
        return self.prompt.num_layers * 2 * self.prompt.token_dim


def plan(model: nn.Module, config: Any) -> tuple[CartridgeConfig, CartridgeSpec]:
    resolved, prompt = pl.plan(model, config)
    assert isinstance(resolved, CartridgeConfig)
    return resolved, CartridgeSpec(prompt, int(resolved.num_frozen_tokens))


def shapes(spec: CartridgeSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    trainable = (("trainable_embedding", (spec.prompt.n - spec.frozen, spec.width)),)
    return ((("frozen_embedding", (spec.frozen, spec.width)),) if spec.frozen else ()) + trainable


def init(spec: CartridgeSpec, model: nn.Module, generator: torch.Generator | None) -> Params:
    """PEFT's `reset_parameters`: N(0, 1), the frozen tokens first."""
    return {name: torch.empty(shape).normal_(generator=generator) for name, shape in shapes(spec)}


def _weight(spec: CartridgeSpec, params: Params) -> torch.Tensor:
    """PEFT's `CartridgeEncoder.weight`: (num_virtual_tokens, num_layers * 2 * token_dim)."""
    if not spec.frozen:
        return params["trainable_embedding"]
    return torch.cat([params["frozen_embedding"].detach(), params["trainable_embedding"]], dim=0)


def encode(spec: CartridgeSpec, params: Params, call: ModelCall, ctx: InputContext) -> torch.Tensor:
    """The prefix for the batch: (B, num_virtual_tokens, num_layers * 2 * token_dim)."""
    b = pl.batch_size(ModelCall((), pl.bind(spec.prompt, call)))
    if b is None:
        raise ValueError("CARTRIDGE: the call needs input_ids or inputs_embeds (to know the batch size)")
    x = _weight(spec, params)
    return x.expand(b, *x.shape)


def prepare(spec: CartridgeSpec, prompts: torch.Tensor, call: ModelCall, ctx: InputContext) -> ModelCall:
    return pl.prepare(spec.prompt, prompts, call, ctx)


def prepare_generate(spec: CartridgeSpec, prompts: torch.Tensor, call: ModelCall, ctx: InputContext) -> ModelCall:
    """Prefix tuning's generate: the prefix cache goes in once with the prompt (funcpeft.methods.prompt_learning)."""
    return pl.prepare_generate(spec.prompt, prompts, call, ctx)


def finish_generate(spec: CartridgeSpec, call: ModelCall, output: Any) -> Any:
    return pl.finish_generate(spec.prompt, call, output)


def file_state(spec: CartridgeSpec, params: Params) -> dict[str, torch.Tensor]:
    return {"prompt_embeddings": _weight(spec, params).detach().cpu()}


def load_state(spec: CartridgeSpec, tensors: Mapping[str, torch.Tensor], fresh: Params) -> Params:
    """PEFT's `load_prompt_embeddings`: the saved prefix split into its frozen and trainable tokens."""
    emb = tensors.get("prompt_embeddings")
    if emb is None:
        raise KeyError(f"the checkpoint has no 'prompt_embeddings' (keys: {sorted(tensors)[:5]})")
    if emb.ndim != 2 or emb.shape[0] != spec.prompt.n or emb.shape[1] != spec.width:
        raise ValueError(
            f"Invalid `prompt_embeddings` shape. Expected ({spec.prompt.n}, {spec.width}) (num_virtual_tokens x "
            f"num_layers * 2 * token_dim), got {tuple(emb.shape)}."
        )
    out = {"trainable_embedding": emb[spec.frozen :]}
    if spec.frozen:
        out["frozen_embedding"] = emb[: spec.frozen]
    return {**fresh, **out}


def prefix_from_past_key_values(past_key_values: Any, num_virtual_tokens: int) -> torch.Tensor:
    """PEFT's `prompt_embeddings_from_past_key_values`: the first `num_virtual_tokens` cached keys and values of a
    batch-1 cache (a transformers Cache or legacy ((key, value), ...) with (1, heads, seq, head_dim) tensors) as
    the flattened prefix (num_virtual_tokens, num_layers * 2 * heads * head_dim); load it into a tree with
    `load_state` (it is what PEFT's files hold)."""
    layers = [
        (layer[0], layer[1])
        for layer in (
            past_key_values.to_legacy_cache() if hasattr(past_key_values, "to_legacy_cache") else past_key_values
        )
    ]
    if not layers:
        raise ValueError("Empty `past_key_values`.")
    key0 = layers[0][0]
    if key0.ndim != 4 or key0.shape[0] != 1:
        raise ValueError(f"expected (1, heads, seq, head_dim) keys from a batch-1 prefill, got {tuple(key0.shape)}")
    if key0.shape[2] < num_virtual_tokens:
        raise ValueError(f"Need at least {num_virtual_tokens} cached tokens, got {key0.shape[2]}.")
    kv = [t[0, :, :num_virtual_tokens, :].transpose(0, 1) for k, v in layers for t in (k, v)]  # (n, heads, d) each
    return torch.stack(kv, dim=1).reshape(num_virtual_tokens, -1)


def frozen(spec: CartridgeSpec) -> frozenset[str]:
    """PEFT's requires_grad=False parameters: the frozen tokens, and in inference mode the trainable ones too."""
    return frozenset({"frozen_embedding", *(("trainable_embedding",) if spec.prompt.inference_mode else ())})


CARTRIDGE = register(
    InputMethod(
        name="cartridge",
        config=CartridgeConfig,
        plan=plan,
        shapes=shapes,
        init=init,
        encode=encode,
        prepare=prepare,
        file_state=file_state,
        load_state=load_state,
        prepare_generate=prepare_generate,
        finish_generate=finish_generate,
        frozen=frozen,
    )
)
