"""Trainable tokens (`TrainableTokensConfig`): only the rows `token_indices` of an embedding are trained.

    trainable_tokens_delta (n, dim)      the n chosen rows' new values (PEFT's name; they replace the rows)
    trainable_tokens_original (n, dim)   their original values: frozen, in `base` (`Method.layer_frozen`),
                                         not saved (PEFT's buffer), used to unmerge

On an nn.Embedding, tokens in `token_indices` look up their row of trainable_tokens_delta and every other
token keeps the layer's output: the forward builds tensors of the output's size and (n + 1, dim), never an
embedding-sized one (PEFT's forward copies the whole embedding with the rows replaced on every call). With
`tie_word_embeddings`, layers whose weight is tied to the targeted input embedding (the lm_head: an
nn.Linear) use the same rows (`Method.tie`): their output columns for those tokens become
`x @ delta.T`. Init: the current rows (a no-op adapter) or randn. Merging writes the rows into the weight
(tied layers share it).

The pure functions here (`hyper`, `init`, `finish_init`, `forward`, `merge_weight`, ...) only read a
`TrainableTokensHyper`, so `LoraConfig(trainable_token_indices=...)` can apply them next to LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import TrainableTokensConfig
from ._registry import register
from .base import (
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
    Tying,
    UnsupportedLayerError,
)

DELTA, ORIGINAL = "trainable_tokens_delta", "trainable_tokens_original"


@dataclass(frozen=True)
class TrainableTokensHyper:
    token_indices: tuple[int, ...]
    init: bool  # init_weights: start from the current rows, else randn


Spec = LayerSpec[TrainableTokensHyper]


def make_hyper(token_indices: Any, init_weights: bool, target: Target) -> TrainableTokensHyper:
    """The hyper for `token_indices` on `target` (an nn.Embedding, or an nn.Linear without bias: its output rows)."""
    if target.kind not in (LayerKind.EMBEDDING, LayerKind.LINEAR):
        raise UnsupportedLayerError(
            f"TrainableTokensLayer wraps an unknown layer type, maybe you are targeting the wrong layer? "
            f"{target.name!r} is a {type(target.module).__name__}; supported: torch.nn.Embedding and torch.nn.Linear"
        )
    if target.kind is LayerKind.LINEAR and target.module.bias is not None:
        raise NotImplementedError(
            f"trainable tokens on {target.name!r}: PEFT computes an nn.Linear's output without its bias there; "
            "funcpeft refuses a Linear with a bias rather than silently dropping it"
        )
    rows = int(target.module.weight.shape[0])
    outside = [i for i in token_indices if i >= rows]
    if outside:
        raise ValueError(f"token_indices {outside} are out of range for {target.name!r}, which has {rows} rows")
    return TrainableTokensHyper(token_indices=tuple(token_indices), init=bool(init_weights))


def hyper(config: Any, target: Target) -> TrainableTokensHyper:
    return make_hyper(config.token_indices, config.init_weights, target)


def _dim(spec: LayerSpec[Any]) -> int:
    """The row length: an embedding's dim, a Linear's in_features (PEFT's `embed_dim`)."""
    return spec.out_features if spec.kind is LayerKind.EMBEDDING else spec.in_features


def param_names(spec: Spec) -> tuple[str, ...]:
    return (DELTA,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """randn (n, dim) for init_weights=False; else a placeholder `finish_init` fills with the current rows."""
    shape = (len(spec.hyper.token_indices), _dim(spec))
    return {DELTA: torch.zeros(shape) if spec.hyper.init else torch.randn(shape, generator=generator)}


def _index(spec: Spec, device: torch.device) -> torch.Tensor:
    return torch.tensor(spec.hyper.token_indices, dtype=torch.long, device=device)


def finish_init(spec: Spec, params: Params, weight: torch.Tensor, shared: Params) -> Params:
    """init_weights=True: the rows as they are (PEFT clones them)."""
    if not spec.hyper.init:
        return params
    return {DELTA: weight[_index(spec, weight.device)].to(params[DELTA].dtype).clone()}


def make_original(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    weight: Any = module.weight
    weight = weight.detach()
    if hasattr(weight, "full_tensor"):  # an FSDP2 shard (DTensor): the rows may live on other ranks (a collective)
        weight = weight.full_tensor()
    return {ORIGINAL: weight[_index(spec, weight.device)].clone()}


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """The layer's output with the chosen tokens' rows (embedding) or output columns (tied Linear) replaced."""
    assert result is not None
    delta, n = params[DELTA], len(spec.hyper.token_indices)
    if n == 0:
        return result
    index = _index(spec, x.device)
    if spec.kind is LayerKind.LINEAR:  # PEFT: F.linear(x, W with the rows replaced), no bias
        return result.index_copy(result.dim() - 1, index, F.linear(x, delta.to(ctx.weight.dtype)))
    hit = x.unsqueeze(-1) == index  # (..., n)
    found = hit.any(-1)
    slot = torch.where(found, hit.to(torch.int8).argmax(-1), n)  # n: a zero row for the other tokens
    table = torch.cat([delta.to(ctx.weight.dtype), delta.new_zeros(1, delta.shape[-1], dtype=ctx.weight.dtype)])
    g = spec.embedding
    pad = spec.hyper.token_indices.index(g.padding_idx) if g.padding_idx in spec.hyper.token_indices else None
    # PEFT's F.embedding(x, W') gives the padding row no gradient and scales by token frequency: so does this
    rows = F.embedding(slot, table, pad, None, g.norm_type, g.scale_grad_by_freq)
    return torch.where(found.unsqueeze(-1), rows, result)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """The weight with the chosen rows replaced (PEFT's `index_copy`)."""
    return weight.index_copy(0, _index(spec, weight.device), params[DELTA].to(weight))


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """The rows put back from trainable_tokens_original."""
    return weight.index_copy(0, _index(spec, weight.device), params[ORIGINAL].to(weight))


def check_stack(specs: tuple[Spec, ...]) -> None:
    """PEFT's `_check_overlapping_tokens`: adapters applied together must train disjoint tokens."""
    seen: set[int] = set()
    for spec in specs:
        overlap = sorted(seen & set(spec.hyper.token_indices))
        if overlap:
            raise ValueError(
                f"Token indices {overlap} are trained by more than one active adapter and would result in undefined "
                "merging behavior. Only disjunct token indices are currently supported."
            )
        seen.update(spec.hyper.token_indices)


TRAINABLE_TOKENS = register(
    Method(
        name="trainable_tokens",
        config=TrainableTokensConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        finish_init=finish_init,
        forward=forward,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight),
        layer_frozen=LayerFrozen(names=(ORIGINAL,), make=make_original, saved=False),
        keys=KeyRules(param_prefix="trainable_tokens_", unsuffixed=frozenset({DELTA})),
        tie=Tying(params=dict),  # the tied layer uses the embedding's rows as they are
        check_stack=check_stack,
    )
)
