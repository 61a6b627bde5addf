"""DoRA (`LoraConfig(use_dora=True)`): LoRA plus a learned per-output magnitude, with PEFT's arithmetic.

    y = b + f * (W x + s B A x),   f = m / ||W + s B A||_row   (the norm is detached, DoRA paper sec. 4.3)

Parameters: LoRA's (lora_A, lora_B or lora_embedding_A/B, same shapes) plus `lora_magnitude_vector`:
(out,) for linear / Conv1D, (dim,) for embeddings, (1, out, 1, ..., 1) for convs; at init it is the
row norm of `W + s B A` (just `||W||_row` when B = 0). The norm is recomputed from the current A, B on
every call without keeping anything weight-sized alive: the `W + s B A` it needs is a no-grad temporary.
"""

from __future__ import annotations

import torch

from .._quant import QUANT_BACKENDS
from ..configs import LoraConfig
from . import lora, lora_init
from ._layers import layer_op
from ._registry import register
from .base import WEIGHT_OP_KINDS, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params
from .lora import LoraHyper

MAGNITUDE = "lora_magnitude_vector"
Spec = LayerSpec[LoraHyper]


def param_names(spec: Spec) -> tuple[str, ...]:
    return (*lora.param_names(spec), MAGNITUDE)


def _magnitude_shape(spec: Spec) -> tuple[int, ...]:
    if spec.kind is LayerKind.CONV:
        return (1, spec.out_features, *([1] * (len(spec.weight_shape) - 2)))
    return (spec.out_features,)


def _lora_params(params: Params) -> Params:
    return {k: v for k, v in params.items() if k != MAGNITUDE}


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """LoRA's init plus a placeholder magnitude; `finish_init` sets it from the base weight."""
    return {**lora.init(spec, generator), MAGNITUDE: torch.ones(_magnitude_shape(spec))}


def finish_init(spec: Spec, params: Params, weight: torch.Tensor, shared: Params) -> Params:
    """magnitude = ||W + s B A||_row in float32 (PEFT's DoRA init), in the magnitude's dtype."""
    lora_params = {k: v.detach().float() for k, v in _lora_params(params).items()}
    norm = _norm(spec, weight.float(), lora_params)
    return {**params, MAGNITUDE: norm.reshape(_magnitude_shape(spec)).to(params[MAGNITUDE].dtype)}


def _norm(spec: Spec, weight: torch.Tensor, params: Params) -> torch.Tensor:
    """||W + s B A|| per output feature, shape (out,), with no autograd graph (the norm is a constant)."""
    s = spec.hyper.scaling
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        if spec.kind is LayerKind.CONV:
            # PEFT's DoRA conv norm: (B viewed (-1, r)) @ (A viewed (r, -1)), reshaped to W. For groups == 1 that is
            # s B A; for grouped convs it is PEFT's own definition, followed exactly
            a, b = params["lora_A"], params["lora_B"]
            r = a.shape[0]
            merged = weight + s * (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(weight.shape)
        else:  # one fused W + s * B @ A (transposed for Conv1D / Embedding layouts), no separate delta
            a, b = (params[k] for k in lora.param_names(spec))
            if spec.kind in (LayerKind.LINEAR, LayerKind.QUANT_LINEAR):
                merged = torch.addmm(weight, b, a, alpha=s)
            else:
                merged = torch.addmm(weight, a.T, b.T, alpha=s)
        dims = [d for d in range(merged.dim()) if d != spec.kind.out_dim]
        return torch.linalg.vector_norm(merged, dim=dims)


def _factor(spec: Spec, params: Params, weight: torch.Tensor) -> torch.Tensor:
    """f = m / ||W + s B A|| shaped like the magnitude (broadcasts over the layer's output)."""
    m = params[MAGNITUDE]
    return m / _norm(spec, weight.to(m.dtype), _lora_params(params)).reshape(m.shape)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result` (base + earlier adapters) rescaled by f, plus f * s * B(A(x)); PEFT's DoRA variants."""
    assert result is not None
    s = spec.hyper.scaling
    if spec.kind is LayerKind.EMBEDDING:
        f = _factor(spec, params, ctx.weight)
        return f * result + f * lora.embedding_term(spec, params, x) * s
    a, b = params["lora_A"], params["lora_B"]
    out_dtype = result.dtype
    x = x.to(a.dtype)
    weight = ctx.float_weight()  # a quantised layer's is dequantised here, as PEFT's DoRA does on every call
    f = _factor(spec, params, weight)
    if spec.kind is not LayerKind.CONV:
        f = f.view(1, -1)
    bias = ctx.bias
    if bias is not None and spec.kind is LayerKind.CONV:
        bias = bias.view(1, -1, *([1] * (result.dim() - 2)))
    p = spec.hyper.dropout
    if p == 0.0 or not ctx.training:
        # result + (f - 1) * (result - bias) + f * s * BAx  ==  f * (result - bias + s * BAx) + bias
        inner = result if bias is None else result - bias
        inner = inner + lora.low_rank(spec, a, b, x) * s
        out = f * inner
        return (out if bias is None else out + bias).to(out_dtype)
    x = ctx.dropout(x, p)
    base_result = layer_op(spec, x, weight.to(x.dtype))  # PEFT's dropout-training branch: W(drop(x)), no bias
    return (result + (f - 1) * base_result + f * lora.low_rank(spec, a, b, x) * s).to(out_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """LoRA's `s B A` (DoRA's merge is not additive: see `merge_weight`)."""
    return lora.delta_weight(spec, _lora_params(params))


def _weight_factor(spec: Spec, params: Params, base_weight: torch.Tensor) -> torch.Tensor:
    """f in the base weight's layout (broadcasts over W)."""
    f = _factor(spec, params, base_weight).flatten()
    shape = [1] * len(spec.weight_shape)
    shape[spec.kind.out_dim] = -1
    return f.view(shape)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's DoRA merge: `f * (W + s B A)`, f from the unmerged `base_weight` (default: `weight`)."""
    f = _weight_factor(spec, params, weight if base_weight is None else base_weight)
    return (f * (weight + delta_weight(spec, params).to(weight.dtype))).to(weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `merge_weight`: `W'/f - s B A`; f needs the unmerged `base_weight` (PEFT caches its norm)."""
    if base_weight is None:
        raise ValueError(
            "DoRA's unmerge needs the unmerged base weight: the norm ||W + s B A|| it divides by cannot be "
            "recovered from the merged weight (PEFT caches it at merge time). Pass base=."
        )
    f = _weight_factor(spec, params, base_weight)
    return (weight / f - delta_weight(spec, params)).to(weight.dtype)


DORA = register(
    Method(
        name="dora",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "use_dora",
        hyper=lora.hyper,
        param_names=param_names,
        init=init,
        finish_init=finish_init,
        init_from_weight=lora_init.init_from_weight,  # PiSSA & co. change W first; the magnitude sees the new W
        forward=forward,
        delta_weight=delta_weight,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight),
        mixed_compatible=True,
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
        quant_backends=QUANT_BACKENDS,  # PEFT's torchao / HQQ LoRA layers take use_dora like its bnb ones
    )
)
