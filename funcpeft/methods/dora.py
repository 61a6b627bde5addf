"""DoRA (`LoraConfig(use_dora=True)`): LoRA plus a learned per-output magnitude, with PEFT's arithmetic.

    y = b + f * (W x + s B A x),   f = m / ||W + s B A||_row   (the norm is detached, DoRA paper sec. 4.3)

Parameters: LoRA's (lora_A, lora_B or lora_embedding_A/B, same shapes) plus `lora_magnitude_vector`:
(out,) for linear / Conv1D, (dim,) for embeddings, (1, out, 1, ..., 1) for convs; at init it is the
row norm of `W + s B A` (just `||W||_row` when B = 0). The norm is recomputed from the current A, B on
every call without keeping anything weight-sized alive: the `W + s B A` it needs is a no-grad temporary.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import lora
from .base import LayerSpec, OpContext, register

MAGNITUDE = "lora_magnitude_vector"
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def param_names(spec: LayerSpec) -> tuple[str, ...]:
    return (*lora.param_names(spec), MAGNITUDE)


def _magnitude_shape(spec: LayerSpec) -> tuple[int, ...]:
    if spec.kind == "conv":
        return (1, spec.out_features, *([1] * (len(spec.weight_shape) - 2)))
    return (spec.out_features,)


def init(spec: LayerSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """LoRA's init plus a placeholder magnitude; `finish_init` sets it from the base weight."""
    return {**lora.init(spec, generator), MAGNITUDE: torch.ones(_magnitude_shape(spec))}


def finish_init(spec: LayerSpec, params: dict[str, torch.Tensor], weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """magnitude = ||W + s B A||_row in float32 (PEFT's DoRA init), in the magnitude's dtype."""
    lora_params = {k: v.detach().float() for k, v in params.items() if k != MAGNITUDE}
    norm = _norm(spec, weight.float(), lora_params)
    out = dict(params)
    out[MAGNITUDE] = norm.reshape(_magnitude_shape(spec)).to(params[MAGNITUDE].dtype)
    return out


def _out_dim(spec: LayerSpec) -> int:
    """Where the output features sit in the base weight: (out, in) Linear/conv, (in, out) Conv1D, (num, dim) Embedding."""
    return 1 if spec.kind in ("conv1d_hf", "embedding") else 0


def _norm(spec: LayerSpec, weight: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """||W + s B A|| per output feature, shape (out,), with no autograd graph (the norm is a constant)."""
    s = spec.h("scaling")
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        if spec.kind == "conv":
            merged = weight + lora.delta_weight(spec, params)
        else:  # one fused W + s * B @ A (transposed for Conv1D / Embedding layouts), no separate delta
            a, b = (params[k] for k in lora.param_names(spec))
            merged = torch.addmm(weight, b, a, alpha=s) if spec.kind == "linear" else torch.addmm(weight, a.T, b.T, alpha=s)
        dims = [d for d in range(merged.dim()) if d != _out_dim(spec)]
        return torch.linalg.vector_norm(merged, dim=dims)


def _factor(spec: LayerSpec, params: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """f = m / ||W + s B A|| shaped like the magnitude (broadcasts over the layer's output)."""
    m = params[MAGNITUDE]
    norm = _norm(spec, weight.to(m.dtype), {k: v for k, v in params.items() if k != MAGNITUDE})
    return m / norm.reshape(m.shape)


def _plain_op(spec: LayerSpec, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base layer without its bias, weight cast to x's dtype (PEFT's dropout-training branch)."""
    w = weight.to(x.dtype)
    if spec.kind == "conv":
        g = dict(spec.geometry)
        return _CONV[len(spec.weight_shape)](x, w, None, g["stride"], g["padding"], g["dilation"], g["groups"])
    return F.linear(x, w.T if spec.kind == "conv1d_hf" else w)


def forward(
    spec: LayerSpec, params: dict[str, torch.Tensor], x: torch.Tensor, result: torch.Tensor, ctx: OpContext
) -> torch.Tensor:
    """`result` (base + earlier adapters) rescaled by f, plus f * s * B(A(x)); PEFT's DoRA variants."""
    s = spec.h("scaling")
    if spec.kind == "embedding":
        f = _factor(spec, params, ctx.weight)
        a, b = params["lora_embedding_A"], params["lora_embedding_B"]
        g = dict(spec.geometry)
        after_a = F.embedding(x, a.T, g["padding_idx"], g["max_norm"], g["norm_type"], g["scale_grad_by_freq"], g["sparse"])
        return f * result + f * (after_a @ b.T) * s
    a, b = params["lora_A"], params["lora_B"]
    out_dtype = result.dtype
    x = x.to(a.dtype)
    f = _factor(spec, params, ctx.weight)
    if spec.kind != "conv":
        f = f.view(1, -1)
    bias = ctx.bias
    if bias is not None and spec.kind == "conv":
        bias = bias.view(1, -1, *([1] * (result.dim() - 2)))
    p = spec.h("lora_dropout")
    if p == 0.0 or not ctx.training:
        # result + (f - 1) * (result - bias) + f * s * BAx  ==  f * (result - bias + s * BAx) + bias
        inner = result if bias is None else result - bias
        inner = inner + lora.low_rank(spec, a, b, x) * s
        out = f * inner
        return (out if bias is None else out + bias).to(out_dtype)
    x = ctx.dropout(x, p)
    base_result = _plain_op(spec, ctx.weight, x)
    return (result + (f - 1) * base_result + f * lora.low_rank(spec, a, b, x) * s).to(out_dtype)


def delta_weight(spec: LayerSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """LoRA's `s B A` (DoRA's merge is not additive: see `merge_weight`)."""
    return lora.delta_weight(spec, {k: v for k, v in params.items() if k != MAGNITUDE})


def _weight_factor(spec: LayerSpec, params: dict[str, torch.Tensor], base_weight: torch.Tensor) -> torch.Tensor:
    """f in the base weight's layout (broadcasts over W)."""
    f = _factor(spec, params, base_weight).flatten()
    shape = [1] * len(spec.weight_shape)
    shape[_out_dim(spec)] = -1
    return f.view(shape)


def merge_weight(
    spec: LayerSpec, params: dict[str, torch.Tensor], weight: torch.Tensor, base_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """PEFT's DoRA merge: `f * (W + s B A)`, f from the unmerged `base_weight` (default: `weight`)."""
    base = weight if base_weight is None else base_weight
    f = _weight_factor(spec, params, base)
    return (f * (weight + delta_weight(spec, params).to(weight.dtype))).to(weight.dtype)


def unmerge_weight(
    spec: LayerSpec, params: dict[str, torch.Tensor], weight: torch.Tensor, base_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of `merge_weight`: `W'/f - s B A`; f needs the unmerged `base_weight` (PEFT caches its norm)."""
    if base_weight is None:
        raise ValueError(
            "DoRA's unmerge needs the unmerged base weight: the norm ||W + s B A|| it divides by cannot be "
            "recovered from the merged weight (PEFT caches it at merge time). Pass base_weight."
        )
    f = _weight_factor(spec, params, base_weight)
    return (weight / f - delta_weight(spec, params)).to(weight.dtype)


DORA = register(SimpleNamespace(
    name="dora", peft_type="LORA", accepts=lambda config: bool(config.use_dora), hyper=lora.hyper,
    param_names=param_names, init=init, finish_init=finish_init, forward=forward, delta_weight=delta_weight,
    merge_weight=merge_weight, unmerge_weight=unmerge_weight,
))
