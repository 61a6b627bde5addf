"""Super-Tuning (`SupertuningConfig`): a sparse support of a layer's weight entries, chosen by magnitude, is trained.

    y = F.linear(x, W + S, b) [+ lora_alpha / r * B A dropout(x)]      S = scatter(indices, values) (out, in)

values `supertuning_values` (k,) with k = int(numel(W) * (1 - sparsity)); indices `supertuning_indices` (k,) int32
are the flat positions of W's top-k (or bottom-k, `select_top=False`) magnitudes when the adapter is made: a frozen
per-layer tensor in `base` that PEFT saves (a persistent buffer) and loading restores. With `r` set (the "Supra"
hybrid) LoRA's A `supertuning_lora_A` (r, in) and B `supertuning_lora_B` (out, r) are trained too, in float32.
Materialised per call, as in PEFT's forward: the adapted weight W + S (out, in), for one matmul; over another adapter
on the same layer, the dense S instead (`inner(x) + x S^T`). Merging adds S (+ the LoRA delta) to W.
Supported layers, as in PEFT: nn.Linear only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs.supertuning import SupertuningConfig
from ._registry import register
from .base import (
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    Method,
    OpContext,
    Params,
    Target,
    UnsupportedLayerError,
)

VALUES, INDICES = "supertuning_values", "supertuning_indices"
A, B = "supertuning_lora_A", "supertuning_lora_B"


@dataclass(frozen=True)
class SupertuningHyper:
    k: int  # trained entries: int(numel * (1 - sparsity))
    select_top: bool  # the largest magnitudes (True) or the smallest
    r: int  # Supra's LoRA rank; 0: none
    lora_alpha: float
    dropout: float  # lora_dropout: on the LoRA term's input
    init: bool  # init_weights: zero values and B, or random


Spec = LayerSpec[SupertuningHyper]


def hyper(config: Any, target: Target) -> SupertuningHyper:
    if target.kind is not LayerKind.LINEAR:
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only "
            "`torch.nn.Linear` is supported."
        )
    numel = target.module.weight.numel()
    k = int(numel * (1 - config.sparsity))  # PEFT's `_num_trainable`, the same float arithmetic
    if k < 1:
        raise ValueError(
            f"sparsity={config.sparsity} leaves no trainable entries for a weight with {numel} "
            "elements — no parameter would be adapted. Lower the sparsity so at least one entry is trainable. "
            f"(module {target.name!r})"
        )
    r = config.r or 0
    return SupertuningHyper(
        k=k,
        select_top=bool(config.select_top),
        r=r,
        lora_alpha=float(config.lora_alpha) if r else 0.0,
        dropout=float(config.lora_dropout),
        init=bool(config.init_weights),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (VALUES, A, B) if spec.hyper.r else (VALUES,)


def _kaiming(shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws in its order: values (randn unless init_weights), then Supra's two nn.Linear constructions
    (each a kaiming-uniform draw, discarded), A kaiming-uniform again, B zeros or kaiming-uniform again."""
    h = spec.hyper
    out: Params = {VALUES: torch.zeros(h.k) if h.init else torch.randn(h.k, generator=generator)}
    if h.r:
        a_shape, b_shape = (h.r, spec.in_features), (spec.out_features, h.r)
        _kaiming(a_shape, generator), _kaiming(b_shape, generator)  # nn.Linear's own init, overwritten below
        out[A] = _kaiming(a_shape, generator)
        out[B] = torch.zeros(b_shape) if h.init else _kaiming(b_shape, generator)
    return out


def make_indices(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """supertuning_indices (k,) int32: the flat positions of topk(|W|) (PEFT's `update_layer`)."""
    weight: Any = module.weight
    if weight.is_meta:
        return {INDICES: torch.empty(spec.hyper.k, dtype=torch.int32, device="meta")}
    _, idx = torch.topk(weight.detach().abs().flatten(), k=spec.hyper.k, largest=spec.hyper.select_top)
    return {INDICES: idx.to(torch.int32)}


def _lora(spec: Spec, params: Params, x: torch.Tensor, ctx: OpContext) -> torch.Tensor:
    a = params[A]
    x = ctx.dropout(x, spec.hyper.dropout).to(a.dtype)
    return (spec.hyper.lora_alpha / spec.hyper.r) * F.linear(F.linear(x, a), params[B])


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's `F.linear(x, W + S, bias)` (+ the LoRA term cast to the output's dtype); x (..., in) -> (..., out).

    Over another adapter on the same layer (several active adapters): `inner(x) + x @ S.T`."""
    w, idx = ctx.weight, params[INDICES].long()
    values = params[VALUES].to(w.dtype)
    inner = ctx.inner_op
    if inner is None or inner is ctx.base_op:
        out = F.linear(x, w.reshape(-1).scatter_add(0, idx, values).reshape_as(w), ctx.bias)
    else:
        below = inner(x)
        sparse = w.new_zeros(w.numel()).scatter_add(0, idx, values).reshape_as(w)
        out = (below + F.linear(x.to(w.dtype), sparse)).to(below.dtype)
    if spec.hyper.r:
        out = out + _lora(spec, params, x, ctx).to(out.dtype)
    return out


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """S (+ lora_alpha / r * B A) (out, in), float32 (PEFT's `get_delta_weight`)."""
    values = params[VALUES]
    flat = values.new_zeros(spec.out_features * spec.in_features)
    delta = flat.scatter_add(0, params[INDICES].to(values.device).long(), values).reshape(spec.weight_shape)
    if spec.hyper.r:
        delta = delta + (spec.hyper.lora_alpha / spec.hyper.r) * (params[B] @ params[A])
    return delta


SUPERTUNING = register(
    Method(
        name="supertuning",
        config=SupertuningConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        uses_result=lambda spec: False,  # the forward runs the layer's op on W + S itself
        layer_frozen=LayerFrozen(names=(INDICES,), make=make_indices),
        keys=KeyRules(param_prefix="supertuning_", unsuffixed=frozenset({VALUES, INDICES})),
    )
)
