"""HiRA (`HiraConfig`): a Hadamard (element-wise) low-rank modulation of the frozen weight, PEFT 0.21.2's arithmetic.

    linear / Conv1D:  y = base(x) + F.linear(dropout(x), W0 * (B A))        A (r, in), B (out, r)
    embedding:        y = base(ids) + F.embedding(ids, W0 * (B A)^T)        A (r, num_embeddings), B (dim, r)
    conv (N-d):       y = base(x) + conv(dropout(x), W0 * BA, stride, padding, dilation)
                      A (r, in, *kernel), B (out, r, 1, ...); BA = B A composed as LoRA's conv delta

W0 is the layer's base weight (in nn.Linear layout for Conv1D), never the output of an adapter below: with several
HiRA adapters on one layer each adds its own `W0 * (B_i A_i)` term, as PEFT's loop does. The embedding term uses
a plain F.embedding (no padding_idx / max_norm) and no dropout, as PEFT's. Merging: `W0 + W0 * delta` (delta in
W's dtype); unmerging restores the pre-merge weight when known, else divides by `1 + delta` (inexact).

bitsandbytes 4-bit / 8-bit layers (LayerKind.QUANT_LINEAR, PEFT's hira.bnb Linear4bit / Linear8bitLt): the layer's
own kernel gives `result`, W0 is its weight dequantised on each call (as PEFT does), the term is
`F.linear(x, W0 * (B @ A))` cast to the result's dtype; merging dequantises, computes `W * (1 + B A)` against the
current weight (each adapter in turn, PEFT's bnb merge) and quantises again; unmerging divides by `1 + B A`.

Materialised per call, per adapted layer: B A (weight-sized) and W0 * (B A) (weight-sized), exactly what PEFT
builds in its forward; nothing more. Per-example routing (a different adapter per example) runs `forward` under
vmap and so builds these two per example (B x weight-sized), which PEFT has no equivalent of.
Init (PEFT draws randn A and randn B first, then re-initialises): init_weights=True: A kaiming-uniform, B zeros;
"gaussian" (linear / Conv1D): A ~ N(0, (1/r)^2), B zeros; False: A, B randn. Embedding: A zeros, B ~ N(0, 1)
unless init_weights is False. Conv: any truthy init_weights is True's. nn.Conv with groups > 1 is refused, as in
PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import HiraConfig
from ._layers import conv_op
from ._registry import register
from .base import WEIGHT_OP_KINDS, KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target

A, B = "hira_A", "hira_B"
EMB_A, EMB_B = "hira_embedding_A", "hira_embedding_B"


@dataclass(frozen=True)
class HiraHyper:
    r: int
    dropout: float  # hira_dropout (not on embeddings, like PEFT)
    init: bool | str | None  # init_weights, as given


Spec = LayerSpec[HiraHyper]


def hyper(config: Any, target: Target) -> HiraHyper:
    """PEFT's per-layer checks (r and rank_pattern are checked by HiraConfig)."""
    m = target.module
    if target.kind is LayerKind.CONV:
        if m.groups > 1:
            raise NotImplementedError(
                f"HiRA does not support {type(m).__name__} layers with groups > 1 (got groups={m.groups}). This "
                f"applies to both the forward pass and to merging. (module {target.name!r})"
            )
        if m.weight.dim() == 5 and tuple(m.weight.shape[2:4]) == (1, 1):
            # PEFT's get_delta_weight takes its 1x1 Conv2d path on these kernels and fails in a matmul there
            raise NotImplementedError(
                f"HiRA on the Conv3d {target.name!r} with kernel {tuple(m.weight.shape[2:])}: PEFT's delta for a "
                "kernel starting (1, 1) is only defined for Conv2d (its forward fails here), so funcpeft refuses it."
            )
    return HiraHyper(r=config.r, dropout=float(config.hira_dropout), init=config.init_weights)


def param_names(spec: Spec) -> tuple[str, ...]:
    return (EMB_A, EMB_B) if spec.kind is LayerKind.EMBEDDING else (A, B)


def _shapes(spec: Spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    r = spec.hyper.r
    if spec.kind is LayerKind.CONV:
        kernel = spec.weight_shape[2:]
        return (r, spec.in_features, *kernel), (spec.out_features, r, *([1] * len(kernel)))
    return (r, spec.in_features), (spec.out_features, r)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws in its order: randn A, randn B, then the init_weights re-initialisation."""
    shape_a, shape_b = _shapes(spec)
    a, b = torch.randn(shape_a, generator=generator), torch.randn(shape_b, generator=generator)
    mode = spec.hyper.init
    if spec.kind is LayerKind.EMBEDDING:
        if mode is not False:
            a = torch.zeros(shape_a)
            b = torch.nn.init.normal_(torch.empty(shape_b), generator=generator)
    elif mode:
        if spec.kind is not LayerKind.CONV and mode == "gaussian":
            a = torch.nn.init.normal_(torch.empty(shape_a), std=1 / spec.hyper.r, generator=generator)
        else:
            a = torch.nn.init.kaiming_uniform_(torch.empty(shape_a), a=math.sqrt(5), generator=generator)
        b = torch.zeros(shape_b)
    names = param_names(spec)
    return {names[0]: a, names[1]: b}


def _modulation(spec: Spec, params: Params) -> torch.Tensor:
    """B A in the base weight's layout (PEFT's forward product), in the adapter's dtype."""
    if spec.kind is LayerKind.EMBEDDING:
        return torch.mm(params[EMB_B], params[EMB_A]).T
    a, b = params[A], params[B]
    if spec.kind is LayerKind.CONV:
        if len(spec.weight_shape) > 3 and tuple(spec.weight_shape[2:4]) == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        return conv_op(spec)(a.transpose(0, 1), b).transpose(0, 1)
    prod = torch.mm(a.T, b.T)  # (in, out), PEFT's `_prod_AB`
    return prod if spec.kind is LayerKind.CONV1D_HF else prod.T


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + op(x, W0 * BA)` in PEFT's order and dtypes; x is the base layer's input, W0 its plain weight."""
    assert result is not None
    out_dtype = result.dtype
    if spec.kind is LayerKind.EMBEDDING:
        return (result + F.embedding(x, ctx.weight * _modulation(spec, params))).to(out_dtype)
    a = params[A]
    x = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    if spec.kind is LayerKind.QUANT_LINEAR:  # PEFT's bnb layers: W0 dequantised, B @ A, the term in result's dtype
        term = F.linear(x, ctx.float_weight() * (params[B] @ a)).to(out_dtype)
        return (result + term).to(out_dtype)
    eff = ctx.weight * _modulation(spec, params)
    if spec.kind is LayerKind.CONV:
        g = spec.conv
        term = conv_op(spec)(x, eff, None, g.stride, g.padding, g.dilation, g.groups)
    else:
        term = F.linear(x, eff.T if spec.kind is LayerKind.CONV1D_HF else eff)
    return (result + term).to(out_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: B A in the base weight's layout (the multiplier of W0, not an additive delta);
    half-precision factors on CPU multiply in float32 and come back in their dtype."""
    names = param_names(spec)
    a, b = params[names[0]], params[names[1]]
    dtype = (b if spec.kind is LayerKind.LINEAR or spec.kind is LayerKind.CONV1D_HF else a).dtype
    half = a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if half:
        params = {names[0]: a.float(), names[1]: b.float()}
    if spec.kind is LayerKind.EMBEDDING:
        out = (params[EMB_B] @ params[EMB_A]).T
    elif spec.kind is LayerKind.CONV:
        out = _modulation(spec, params)
    else:
        w = params[B] @ params[A]
        out = w.T if spec.kind is LayerKind.CONV1D_HF else w
    return out.to(dtype) if half else out


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's `_merge`: `W + W0 * delta` (delta cast to W's dtype); W0: the pre-merge weight (default: `weight`).
    A quantised layer's (dequantised) weight: `W * (1 + delta)` on the current W, PEFT's bnb merge."""
    if spec.kind.module_level:
        return weight * (1 + delta_weight(spec, params).to(weight.device))
    w0 = weight if base_weight is None else base_weight
    delta = delta_weight(spec, params).to(device=weight.device, dtype=weight.dtype)
    return weight + w0 * delta


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT restores its saved pre-merge weight: `base_weight` when known, else `W / (1 + delta)` (inexact); its
    bnb layers always divide the (dequantised) merged weight."""
    if spec.kind.module_level:
        return weight / (1 + delta_weight(spec, params).to(weight.device))
    if base_weight is not None:
        return base_weight
    delta = delta_weight(spec, params).to(device=weight.device, dtype=weight.dtype)
    return (weight / (1 + delta)).to(weight.dtype)


HIRA = register(
    Method(
        name="hira",
        config=HiraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, from_base=True),
        keys=KeyRules(param_prefix="hira_", unsuffixed=frozenset({A, B, EMB_A, EMB_B})),
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
    )
)
