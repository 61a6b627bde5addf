"""RoAd (`RoadConfig`): each pair of a layer's output elements is rotated by a learned angle and scaled.

    y = base(x) * c1 + rotate_half(base(x)) * c2          c1 = alpha * cos(theta), c2 = alpha * sin(theta)

Within each group of `group_size` outputs element i pairs with element i + group_size / 2; rotate_half maps a
group's halves (x1, x2) to (-x2, x1). theta `road_theta` and alpha `road_alpha` are 1-D: out / 2 (road_1, one
per pair, shared by both elements), out (road_2) or 2 * out (road_4: separate angles and scales for c1 and c2).
Materialised per call, as in PEFT's forward: nothing weight-sized, only the (out,) columns c1, c2 and the
output-sized rotated copy. The (out, out) rotation R is built only to merge, W' = R W and b' = R b (PEFT's
`_get_delta_weight`); unmerging applies R's inverse (float32 `torch.linalg.inv`, as PEFT).
Supported layers, as in PEFT: nn.Linear, and bitsandbytes 4-bit / 8-bit layers (LayerKind.QUANT_LINEAR, PEFT's
road.bnb): their own kernel gives the output that is rotated, and (PEFT's bnb forward) it stays in the adapter's
dtype; merging dequantises W, computes R W in R's dtype and quantises again (b' = R b on the plain bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configs.road import RoadConfig
from ._registry import register
from .base import (
    WEIGHT_OP_KINDS,
    KeyRules,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
    UnsupportedLayerError,
)

THETA, ALPHA = "road_theta", "road_alpha"
_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters per output element


@dataclass(frozen=True)
class RoadHyper:
    variant: str  # road_1 | road_2 | road_4
    group_size: int
    init: bool  # init_weights: the identity (theta 0, alpha 1) or random


Spec = LayerSpec[RoadHyper]


def hyper(config: Any, target: Target) -> RoadHyper:
    if target.kind not in (LayerKind.LINEAR, LayerKind.QUANT_LINEAR):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only the "
            "following modules are supported: `torch.nn.Linear`."
        )
    g, out = config.group_size, target.module.out_features
    if out % g != 0:
        raise ValueError(
            f"The out_features of the base layer must be divisible by group_size ({g}) when using RoadLayer "
            f"(module {target.name!r} has out_features={out})."
        )
    return RoadHyper(variant=config.variant, group_size=g, init=bool(config.init_weights))


def param_names(spec: Spec) -> tuple[str, ...]:
    return (THETA, ALPHA)


def _size(spec: Spec) -> int:
    return int(spec.out_features * _SIZE[spec.hyper.variant])


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's `reset_parameters`: zeros / ones, or theta ~ N(0, 0.5) then alpha ~ N(1, 0.5)."""
    n = _size(spec)
    if spec.hyper.init:
        return {THETA: torch.zeros(n), ALPHA: torch.ones(n)}
    theta = nn.init.normal_(torch.empty(n), mean=0.0, std=0.5, generator=generator)
    alpha = nn.init.normal_(torch.empty(n), mean=1.0, std=0.5, generator=generator)
    return {THETA: theta, ALPHA: alpha}


def columns(spec: Spec, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_prepare_cols`: (c1, c2), each (out,): R's diagonal and its rotated second column."""
    variant, g = spec.hyper.variant, spec.hyper.group_size
    theta, alpha = params[THETA], params[ALPHA]
    if variant == "road_1":  # each group's g / 2 values serve both halves of the group
        theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
    if variant in ("road_1", "road_2"):
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)  # road_4: first / second column halves
    return alpha[:, 0].flatten() * theta[:, 0].cos().flatten(), alpha[:, 1].flatten() * theta[:, 1].sin().flatten()


def _apply(spec: Spec, params: Params, y: torch.Tensor) -> torch.Tensor:
    """PEFT's `_apply_road` on y (..., out)."""
    c1, c2 = columns(spec, params)
    halves = y.reshape(-1, 2, spec.hyper.group_size // 2)
    rotated = torch.stack((-halves[:, 1], halves[:, 0]), dim=1).reshape(y.shape)
    return y * c1 + rotated * c2


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """The layer's output (..., out) rotated, computed in the adapter's dtype and cast back (PEFT's casts)."""
    assert result is not None
    rotated = _apply(spec, params, result.to(params[THETA].dtype))
    # PEFT's bnb layers cast x, not the result, back (`x = x.to(expected_dtype)`): the output keeps theta's dtype
    return rotated if spec.kind is LayerKind.QUANT_LINEAR else rotated.to(result.dtype)


def rotation(spec: Spec, params: Params) -> torch.Tensor:
    """R (out, out) with R @ y = the forward's rotation of y (PEFT's `_get_delta_weight`)."""
    c1, c2 = columns(spec, params)
    g, n = spec.hyper.group_size, c1.shape[0]
    swapped = c2.reshape(-1, 2, g // 2)[:, [1, 0], :].flatten()
    off = torch.diag(swapped).reshape(-1, 2, g // 2, n)[:, [1, 0], :, :]
    sign = torch.tensor([-1.0, 1.0], dtype=off.dtype, device=off.device).reshape(1, 2, 1, 1)
    return torch.diag(c1) + (off * sign).reshape(n, n)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """W' = R W (out, in), R cast to W's dtype first (PEFT's merge); a dequantised W: in R's dtype (PEFT's bnb)."""
    if spec.kind.module_level:
        r = rotation(spec, params)
        return r @ weight.to(r.dtype)
    return (rotation(spec, params).to(weight.dtype) @ weight).to(weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """W = R^-1 W' (R need not be orthogonal: PEFT inverts it in float32); a dequantised W' in R's dtype (bnb)."""
    r = rotation(spec, params)
    if spec.kind.module_level:
        return torch.linalg.inv(r.to(torch.float32)).to(r.dtype) @ weight.to(r.dtype)
    inv = torch.linalg.inv(r.to(torch.float32)).to(weight.dtype)
    return inv @ weight


def merge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    return (rotation(spec, params).to(bias.dtype) @ bias).to(bias.dtype)


def unmerge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(rotation(spec, params).to(torch.float32)).to(bias.dtype) @ bias


ROAD = register(
    Method(
        name="road",
        config=RoadConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, bias=merge_bias, unbias=unmerge_bias),
        keys=KeyRules(param_prefix="road_", unsuffixed=frozenset({THETA, ALPHA})),
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
    )
)
