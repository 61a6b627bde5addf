"""HRA (`HRAConfig`): the weight times a product of r Householder reflections, with PEFT 0.21.2's forward.

    linear:  y = F.linear(x, W H, b)            H = (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T),  u_i = hra_u[:, i] / |.|
    conv:    y = conv2d(x, W H, b)              (W viewed (out, in * k * k) for a k x k nn.Conv2d)

apply_GS: the u_i are Gram-Schmidt-orthogonalised first and H = I - 2 U U^T. Parameters: `hra_u` (n, r),
n = in_features or in_channels * k * k. Init (init_weights=True, even r): kaiming-uniform columns in identical
pairs, so H = I (a no-op); odd r (PEFT warns) or init_weights=False: all columns kaiming-uniform.

Per call: H (n, n) and the adapted weight W H (weight-sized), both as PEFT builds them (in the adapter's
dtype, with W, x and b cast to it). That is the first (innermost) adapter of a layer. Several HRA adapters
on one linear layer: PEFT uses W H_1 H_2 ...; an outer adapter here maps the input to x H_2^T (the same
product, another rounding order) and hands it to the adapter below. On a conv layer they are refused (see
funcpeft.methods._orth). Per-example routing on a linear layer rotates each example's input (batched
matmuls), so no per-example weight is built; on a conv it runs the forward under vmap, which builds one
adapted kernel per example.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import HRAConfig
from ._orth import check_plain_conv_geometry, refuse_stacked_conv, require_kind, square_kernel
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target
from .lora import kaiming_uniform

NAME = "hra_u"  # saved without `.weight`


@dataclass(frozen=True)
class HRAHyper:
    r: int
    apply_gs: bool
    n: int  # in_features or in_channels * k * k
    init: bool  # init_weights


Spec = LayerSpec[HRAHyper]


def hyper(config: Any, target: Target) -> HRAHyper:
    require_kind(target, "HRA", (LayerKind.LINEAR, LayerKind.CONV), "`torch.nn.Linear` and `torch.nn.Conv2d`")
    m = target.module
    if target.kind is LayerKind.CONV:
        if m.groups > 1:
            raise NotImplementedError(
                f"HRA does not support {type(m).__name__} layers with groups > 1 (got groups={m.groups})."
            )
        kernel = square_kernel(target, "HRA")
        check_plain_conv_geometry(target, "HRA")
        n = m.in_channels * kernel * kernel
    else:
        n = m.in_features
    if config.init_weights and config.r % 2 != 0:
        warnings.warn("The symmetric initialization can NOT be performed when r is odd!", stacklevel=2)
    return HRAHyper(r=config.r, apply_gs=bool(config.apply_GS), n=n, init=bool(config.init_weights))


def param_names(spec: Spec) -> tuple[str, ...]:
    return (NAME,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws: (n, r / 2) kaiming-uniform columns, each repeated (even r, init_weights), else (n, r)."""
    n, r = spec.hyper.n, spec.hyper.r
    if spec.hyper.init and r % 2 == 0:
        return {NAME: torch.repeat_interleave(kaiming_uniform((n, r // 2), generator), 2, dim=1)}
    return {NAME: kaiming_uniform((n, r), generator)}


def householder(spec: Spec, u: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """PEFT's `get_delta_weight`: H (n, n) from hra_u (n, r), in u's dtype; `reverse`: the inverse product."""
    n, r = u.shape
    eye = torch.eye(n, device=u.device, dtype=u.dtype)
    if spec.hyper.apply_gs:
        cols = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
        for i in range(1, r):
            ui = u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (cols[j].t() @ ui) * cols[j]
            cols.append((ui / ui.norm()).view(-1, 1))
        w = torch.cat(cols, dim=1)
        return eye - 2 * w @ w.t()
    u = u / u.norm(dim=0)
    weight = eye
    for i in range(r - 1, -1, -1) if reverse else range(r):
        ui = u[:, i].view(-1, 1)
        weight = weight - 2 * weight @ ui @ ui.t()
    return weight


def _flat(spec: Spec, weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(spec.out_features, spec.hyper.n)


def uses_result(spec: Spec) -> bool:
    return False  # the layer's output is recomputed from W H (or the layer below runs on a rotated input)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's HRA forward and casts: F.linear / conv2d with W H, everything in the adapter's dtype."""
    h = householder(spec, params[NAME])
    if spec.kind is LayerKind.LINEAR and ctx.inner_op is not ctx.base_op:
        assert ctx.inner_op is not None  # the adapter below multiplies its own H into W
        return ctx.inner_op(x.to(h.dtype) @ h.t()).to(x.dtype)
    return _adapted(spec, ctx, torch.mm(_flat(spec, ctx.weight).to(h.dtype), h), x)


def _adapted(spec: Spec, ctx: OpContext, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's op with the adapted weight (out, n), x and the bias cast to its dtype; output in x's dtype."""
    bias = ctx.bias.to(weight.dtype) if ctx.bias is not None else None
    if spec.kind is LayerKind.CONV:
        refuse_stacked_conv("HRA", ctx)
        g = spec.conv
        assert isinstance(g.padding, tuple)
        out = F.conv2d(
            x.to(weight.dtype), weight.reshape(spec.weight_shape), bias, padding=g.padding[0], stride=g.stride[0]
        )
    else:
        out = F.linear(x.to(weight.dtype), weight, bias)
    return out.to(x.dtype)


def forward_per_example(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor | None:
    """A different hra_u per example on a linear layer: x_i H_i^T (batched), then the layer with W (no W H_i).

    params: hra_u (B, n, r); x (B, ..., n). None on a conv (the generic path: vmap of `forward`).
    """
    if spec.kind is not LayerKind.LINEAR:
        return None
    h = torch.func.vmap(lambda u: householder(spec, u))(params[NAME])
    rotated = torch.bmm(x.to(h.dtype).reshape(x.shape[0], -1, x.shape[-1]), h.transpose(1, 2)).reshape(x.shape)
    if ctx.inner_op is not ctx.base_op:
        assert ctx.inner_op is not None
        return ctx.inner_op(rotated).to(x.dtype)
    return _adapted(spec, ctx, ctx.weight.to(h.dtype), rotated).to(x.dtype)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's merge: W H (W viewed (out, n)), back in W's dtype."""
    h = householder(spec, params[NAME])
    return torch.mm(_flat(spec, weight).to(h.dtype), h).reshape(weight.shape).to(weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's unmerge: W' H^-1 (the reflections in reverse order; Gram-Schmidt's H is its own inverse)."""
    h = householder(spec, params[NAME], reverse=True)
    return torch.mm(_flat(spec, weight).to(h.dtype), h).reshape(weight.shape).to(weight.dtype)


HRA = register(
    Method(
        name="hra",
        config=HRAConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        uses_result=uses_result,
        forward_per_example=forward_per_example,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight),
        keys=KeyRules(param_prefix="hra_", unsuffixed=frozenset({NAME})),
    )
)
