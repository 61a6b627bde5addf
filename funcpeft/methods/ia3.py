"""(IA)^3 (`IA3Config`): a learned vector scales a layer's output, or, on feed-forward layers, its input.

    y = base(x) * l          l = `ia3_l` (out, 1)  [conv: (1, out, 1, ...)]
    y = base(x * l)          feed-forward layers: l (1, in)  [conv: (1, in, 1, ...)]

Init: ones (`init_ia3_weights=True`, a no-op) or randn. Supported layers, as in PEFT: nn.Linear, GPT-2
Conv1D, nn.Conv2d, nn.Conv3d. Merging multiplies W (and, for output scaling, the bias) by l.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..configs import IA3Config
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

NAME = "ia3_l"


@dataclass(frozen=True)
class IA3Hyper:
    init: bool  # init_ia3_weights: ones (a no-op) or randn
    is_feedforward: bool  # scale the input (feed-forward layers) instead of the output


Spec = LayerSpec[IA3Hyper]


def is_feedforward(config: Any, name: str) -> bool:
    """PEFT's `_check_target_module_feedforward`: regex fullmatch, or a plain `endswith` (no dot boundary)."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(t) for t in ff or ())


def hyper(config: Any, target: Target) -> IA3Hyper:
    kind = target.kind
    if kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.QUANT_LINEAR) and not (
        kind is LayerKind.CONV and target.module.weight.dim() in (4, 5)
    ):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported by IA3. Currently, "
            "only `torch.nn.Linear`, `torch.nn.Conv2d`, `torch.nn.Conv3d` and `Conv1D` are supported."
        )
    return IA3Hyper(init=bool(config.init_ia3_weights), is_feedforward=is_feedforward(config, target.name))


def param_names(spec: Spec) -> tuple[str, ...]:
    return (NAME,)


def _shape(spec: Spec) -> tuple[int, ...]:
    ff = spec.hyper.is_feedforward
    if spec.kind is LayerKind.CONV:
        n = spec.in_features if ff else spec.out_features
        return (1, n, *([1] * (len(spec.weight_shape) - 2)))
    return (1, spec.in_features) if ff else (spec.out_features, 1)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    if spec.hyper.init:
        return {NAME: torch.ones(_shape(spec))}
    return {NAME: torch.randn(_shape(spec), generator=generator)}


def uses_result(spec: Spec) -> bool:
    return not spec.hyper.is_feedforward  # feed-forward: the layer below runs on the scaled input instead


def _vector(spec: Spec, scale: torch.Tensor) -> torch.Tensor:
    return scale if spec.kind is LayerKind.CONV else scale.flatten()


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's IA3 forward and casts: scale the output, or run the layer below on `x * scale`."""
    scale = params[NAME]
    if spec.hyper.is_feedforward:
        scaled = x.to(scale.dtype) * _vector(spec, scale)
        out_dtype = ctx.weight.dtype if spec.kind is LayerKind.CONV else x.dtype
        assert ctx.inner_op is not None
        return ctx.inner_op(scaled.to(out_dtype)).to(x.dtype)
    assert result is not None
    if spec.kind is LayerKind.CONV:
        return (result.to(scale.dtype) * scale).to(x.dtype)
    return (result * _vector(spec, scale)).to(result.dtype).to(x.dtype)


def _weight_scale(spec: Spec, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """scale laid out to broadcast over the base weight (PEFT's transpose / `_get_ia3_scaling_for_weight`)."""
    if spec.kind is LayerKind.CONV:
        if not spec.hyper.is_feedforward:
            return scale.transpose(0, 1)
        if groups == 1:
            return scale
        out_per, in_per = spec.out_features // groups, spec.in_features // groups
        scale = scale.reshape(groups, 1, in_per, *scale.shape[2:]).expand(groups, out_per, in_per, *scale.shape[3:])
        return scale.reshape(spec.out_features, in_per, *scale.shape[3:])
    return scale.T if spec.kind is LayerKind.CONV1D_HF else scale


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """`W * scale` (rows for output scaling, columns for feed-forward), in W's dtype."""
    groups = spec.conv.groups if spec.kind is LayerKind.CONV else 1
    return (weight * _weight_scale(spec, params[NAME], groups)).to(weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's inexact inverse: `W / (scale + 1e-8)`."""
    groups = spec.conv.groups if spec.kind is LayerKind.CONV else 1
    return (weight / (_weight_scale(spec, params[NAME], groups) + 1e-8)).to(weight.dtype)


def merge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    """Output scaling also scales the bias; feed-forward scaling leaves it alone."""
    if spec.hyper.is_feedforward:
        return bias
    return (bias * params[NAME].reshape(bias.shape)).to(bias.dtype)


def unmerge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    """PEFT's inexact inverse: `b / (scale + 1e-8)` for output scaling."""
    if spec.hyper.is_feedforward:
        return bias
    return (bias / (params[NAME].reshape(bias.shape) + 1e-8)).to(bias.dtype)


IA3 = register(
    Method(
        name="ia3",
        config=IA3Config,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        uses_result=uses_result,
        merge=MergeHooks(
            weight=merge_weight,
            unweight=unmerge_weight,
            bias=merge_bias,
            unbias=unmerge_bias,
            grouped_conv=True,
            refuse_quantised=lambda what: ValueError(
                f"Cannot {what} ia3 layers when the model is loaded in 4-bit / 8-bit mode"
            ),
        ),
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
        keys=KeyRules(param_prefix="ia3_", unsuffixed=frozenset({NAME})),
    )
)
