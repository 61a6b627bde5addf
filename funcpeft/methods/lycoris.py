"""What LoHa and LoKr share (PEFT's `LycorisLayer`): hyper-parameters, rank/module dropout, the forward.

Both build a weight-shaped delta `dW` from their parameters (times `alpha / r`) and add `layer_op(x, dW)`
to the layer's output: `F.linear` for nn.Linear, `F.conv1d/2d` with the base conv's stride, padding,
dilation and groups. Supported layers, as in PEFT: nn.Linear, nn.Conv1d, nn.Conv2d (not GPT-2 Conv1D).
In training (`fn(..., dropout_rng=...)`), `rank_dropout` zeroes random output rows of dW and
`module_dropout` drops the whole term, drawn from the same RNG as the other dropouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..targeting import rank_and_alpha
from .base import LayerSpec, OpContext

_CONV = {3: F.conv1d, 4: F.conv2d}


def hyper(config: Any, name: str, module: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    """r, alpha, scaling and the dropouts; `effective_conv` is use_effective_conv2d on a conv with kernel > 1."""
    if kind != "linear" and not (kind == "conv" and module.weight.dim() in (3, 4)):
        raise TypeError(
            f"Target module {name!r} of type {type(module)} not supported, "
            "currently only adapters for Conv2d, Conv1d, Linear are supported"
        )
    r, alpha = rank_and_alpha(config, name, alpha_field="alpha")
    kernel = tuple(module.weight.shape[2:])
    return (
        ("alpha", alpha),
        ("effective_conv", bool(config.use_effective_conv2d) and kind == "conv" and any(k != 1 for k in kernel)),
        ("init_weights", config.init_weights),
        ("module_dropout", float(config.module_dropout)),
        ("r", r),
        ("rank_dropout", float(config.rank_dropout)),
        ("scaling", alpha / r),
    )


def conv_in(spec: LayerSpec) -> int:
    """Input channels per group (the base conv weight's second dim); in_features for linear."""
    return spec.weight_shape[1] if spec.kind == "conv" else spec.in_features


def kernel(spec: LayerSpec) -> tuple[int, ...]:
    return tuple(spec.weight_shape[2:])


def _keep(ctx: OpContext, n: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """A (n,) 0/1 mask keeping each entry with probability 1 - p (PEFT: `torch.rand(n) > p`)."""
    ones = torch.ones(n, device=like.device, dtype=like.dtype)
    return (ctx.dropout(ones, p) != 0).to(like.dtype)


def rank_dropped(spec: LayerSpec, weight: torch.Tensor, ctx: OpContext, rescale: bool) -> torch.Tensor:
    """dW with random output rows zeroed in training (divided by the kept fraction when `rescale`)."""
    p = spec.h("rank_dropout")
    if p == 0.0 or not ctx.training:
        return weight
    drop = _keep(ctx, weight.shape[0], p, weight)
    if rescale:
        drop = drop / drop.mean()
    return weight * drop.view(-1, *[1] * (weight.dim() - 1))


def forward_with(
    delta: Callable[[LayerSpec, dict[str, torch.Tensor]], torch.Tensor], rescale_rank_dropout: Callable[[LayerSpec], bool]
) -> Callable[..., torch.Tensor]:
    """A method's `forward` from its `delta_weight`: `result + layer_op(x, dW)`, PEFT's casts and dropouts."""

    def forward(
        spec: LayerSpec, params: dict[str, torch.Tensor], x: torch.Tensor, result: torch.Tensor, ctx: OpContext
    ) -> torch.Tensor:
        w = rank_dropped(spec, delta(spec, params), ctx, rescale_rank_dropout(spec))
        x_in = x.to(w.dtype)
        if spec.kind == "conv":
            g = dict(spec.geometry)
            term = _CONV[len(spec.weight_shape)](x_in, w, None, g["stride"], g["padding"], g["dilation"], g["groups"])
        else:
            term = F.linear(x_in, w)
        p = spec.h("module_dropout")
        if p > 0.0 and ctx.training:
            term = term * _keep(ctx, 1, p, term)
        return (result + term).to(x.dtype)

    return forward
