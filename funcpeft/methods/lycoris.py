"""What LoHa and LoKr share (PEFT's `LycorisLayer`): hyper-parameters, rank/module dropout, the forward.

Both build a weight-shaped delta `dW` from their parameters (times `alpha / r`) and add `layer_op(x, dW)`
to the layer's output: `F.linear` for nn.Linear, `F.conv1d/2d` with the base conv's stride, padding,
dilation and groups. Supported layers, as in PEFT: nn.Linear, nn.Conv1d, nn.Conv2d (not GPT-2 Conv1D).
In training (`fn(..., dropout_rng=...)`), `rank_dropout` zeroes random output rows of dW and
`module_dropout` drops the whole term, drawn from the same RNG as the other dropouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._layers import kernel, layer_op
from ._patterns import rank_and_alpha
from .base import ForwardFn, LayerKind, LayerSpec, OpContext, Params, Target, UnsupportedLayerError


@dataclass(frozen=True)
class LycorisHyper:
    r: int
    alpha: float
    scaling: float  # alpha / r
    rank_dropout: float
    module_dropout: float
    init: bool | str  # init_weights
    effective_conv: bool  # use_effective_conv2d on a conv with a kernel > 1 (CP decomposition)


def lycoris_hyper(config: Any, target: Target) -> LycorisHyper:
    """r, alpha, scaling and the dropouts; `effective_conv` is use_effective_conv2d on a conv with kernel > 1."""
    module = target.module
    if target.kind is not LayerKind.LINEAR and not (target.kind is LayerKind.CONV and module.weight.dim() in (3, 4)):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} of type {type(module)} not supported, "
            "currently only adapters for Conv2d, Conv1d, Linear are supported"
        )
    r, alpha = rank_and_alpha(config, target.name, alpha_field="alpha")
    effective = (
        bool(config.use_effective_conv2d)
        and target.kind is LayerKind.CONV
        and any(k != 1 for k in module.weight.shape[2:])
    )
    return LycorisHyper(
        r=r,
        alpha=alpha,
        scaling=alpha / r,
        rank_dropout=float(config.rank_dropout),
        module_dropout=float(config.module_dropout),
        init=config.init_weights,
        effective_conv=effective,
    )


def conv_in(spec: LayerSpec[Any]) -> int:
    """Input channels per group (the base conv weight's second dim); in_features for linear."""
    return spec.weight_shape[1] if spec.kind is LayerKind.CONV else spec.in_features


def _keep(ctx: OpContext, n: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """A (n,) 0/1 mask keeping each entry with probability 1 - p (PEFT: `torch.rand(n) > p`)."""
    ones = torch.ones(n, device=like.device, dtype=like.dtype)
    return (ctx.dropout(ones, p) != 0).to(like.dtype)


def rank_dropped(spec: LayerSpec[LycorisHyper], weight: torch.Tensor, ctx: OpContext, rescale: bool) -> torch.Tensor:
    """dW with random output rows zeroed in training (divided by the kept fraction when `rescale`)."""
    p = spec.hyper.rank_dropout
    if p == 0.0 or not ctx.training:
        return weight
    drop = _keep(ctx, weight.shape[0], p, weight)
    if rescale:
        drop = drop / drop.mean()
    return weight * drop.view(-1, *[1] * (weight.dim() - 1))


def forward_with(
    delta: Callable[[Any, Params], torch.Tensor], rescale_rank_dropout: Callable[[Any], bool]
) -> ForwardFn:
    """A method's `forward` from its `delta_weight`: `result + layer_op(x, dW)`, PEFT's casts and dropouts."""

    def forward(
        spec: LayerSpec[LycorisHyper], params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
    ) -> torch.Tensor:
        assert result is not None
        w = rank_dropped(spec, delta(spec, params), ctx, rescale_rank_dropout(spec))
        term = layer_op(spec, x.to(w.dtype), w)
        p = spec.hyper.module_dropout
        if p > 0.0 and ctx.training:
            term = term * _keep(ctx, 1, p, term)
        return (result + term).to(x.dtype)

    return forward


__all__ = ["LycorisHyper", "conv_in", "forward_with", "kernel", "lycoris_hyper", "rank_dropped"]
