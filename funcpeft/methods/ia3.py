"""(IA)^3 (`IA3Config`): a learned vector scales a layer's output, or, on feed-forward layers, its input.

    y = base(x) * l          l = `ia3_l` (out, 1)  [conv: (1, out, 1, ...)]
    y = base(x * l)          feed-forward layers: l (1, in)  [conv: (1, in, 1, ...)]

Init: ones (`init_ia3_weights=True`, a no-op) or randn. Supported layers, as in PEFT: nn.Linear, GPT-2
Conv1D, nn.Conv2d, nn.Conv3d. Merging multiplies W (and, for output scaling, the bias) by l.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import torch

from .base import LayerSpec, OpContext, register

NAME = "ia3_l"


def is_feedforward(config: Any, name: str) -> bool:
    """PEFT's `_check_target_module_feedforward`: regex fullmatch, or a plain `endswith` (no dot boundary)."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(t) for t in ff or ())


def hyper(config: Any, name: str, module: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    if kind not in ("linear", "conv1d_hf") and not (kind == "conv" and module.weight.dim() in (4, 5)):
        raise ValueError(
            f"Target module {name!r} ({type(module).__name__}) is not supported by IA3. Currently, only "
            "`torch.nn.Linear`, `torch.nn.Conv2d`, `torch.nn.Conv3d` and `Conv1D` are supported."
        )
    return (("init_ia3_weights", config.init_ia3_weights), ("is_feedforward", is_feedforward(config, name)))


def param_names(spec: LayerSpec) -> tuple[str, ...]:
    return (NAME,)


def _shape(spec: LayerSpec) -> tuple[int, ...]:
    ff = spec.h("is_feedforward")
    if spec.kind == "conv":
        n = spec.in_features if ff else spec.out_features
        return (1, n, *([1] * (len(spec.weight_shape) - 2)))
    return (1, spec.in_features) if ff else (spec.out_features, 1)


def init(spec: LayerSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    if spec.h("init_ia3_weights"):
        return {NAME: torch.ones(_shape(spec))}
    return {NAME: torch.randn(_shape(spec), generator=generator)}


def uses_result(spec: LayerSpec) -> bool:
    return not spec.h("is_feedforward")  # feed-forward: the layer below runs on the scaled input instead


def _vector(spec: LayerSpec, scale: torch.Tensor) -> torch.Tensor:
    return scale if spec.kind == "conv" else scale.flatten()


def forward(
    spec: LayerSpec, params: dict[str, torch.Tensor], x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor:
    """PEFT's IA3 forward and casts: scale the output, or run the layer below on `x * scale`."""
    scale = params[NAME]
    if spec.h("is_feedforward"):
        scaled = x.to(scale.dtype) * _vector(spec, scale)
        out_dtype = ctx.weight.dtype if spec.kind == "conv" else x.dtype
        assert ctx.inner_op is not None
        return ctx.inner_op(scaled.to(out_dtype)).to(x.dtype)
    assert result is not None
    if spec.kind == "conv":
        return (result.to(scale.dtype) * scale).to(x.dtype)
    return (result * _vector(spec, scale)).to(result.dtype).to(x.dtype)


def _weight_scale(spec: LayerSpec, scale: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """scale laid out to broadcast over the base weight (PEFT's transpose / `_get_ia3_scaling_for_weight`)."""
    if spec.kind == "conv":
        if not spec.h("is_feedforward"):
            return scale.transpose(0, 1)
        if groups == 1:
            return scale
        out_per, in_per = spec.out_features // groups, spec.in_features // groups
        scale = scale.reshape(groups, 1, in_per, *scale.shape[2:]).expand(groups, out_per, in_per, *scale.shape[3:])
        return scale.reshape(spec.out_features, in_per, *scale.shape[3:])
    return scale.T if spec.kind == "conv1d_hf" else scale


def merge_weight(
    spec: LayerSpec, params: dict[str, torch.Tensor], weight: torch.Tensor, base_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """`W * scale` (rows for output scaling, columns for feed-forward), in W's dtype."""
    groups = dict(spec.geometry).get("groups", 1)
    return (weight * _weight_scale(spec, params[NAME], groups)).to(weight.dtype)


def unmerge_weight(
    spec: LayerSpec, params: dict[str, torch.Tensor], weight: torch.Tensor, base_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """PEFT's inexact inverse: `W / (scale + 1e-8)`."""
    groups = dict(spec.geometry).get("groups", 1)
    return (weight / (_weight_scale(spec, params[NAME], groups) + 1e-8)).to(weight.dtype)


def merge_bias(spec: LayerSpec, params: dict[str, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """Output scaling also scales the bias; feed-forward scaling leaves it alone."""
    if spec.h("is_feedforward"):
        return bias
    return (bias * params[NAME].reshape(bias.shape)).to(bias.dtype)


def unmerge_bias(spec: LayerSpec, params: dict[str, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """PEFT's inexact inverse: `b / (scale + 1e-8)` for output scaling."""
    if spec.h("is_feedforward"):
        return bias
    return (bias / (params[NAME].reshape(bias.shape) + 1e-8)).to(bias.dtype)


def delta_weight(spec: LayerSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    raise NotImplementedError("IA3 is multiplicative, it has no additive delta; merge with `merge_weight`/`merge_bias`")


IA3 = register(SimpleNamespace(
    name="ia3", peft_type="IA3", peft_key_prefix="ia3_", peft_unsuffixed=(NAME,), accepts=lambda config: True, hyper=hyper, param_names=param_names, init=init,
    uses_result=uses_result, forward=forward, delta_weight=delta_weight,
    merge_weight=merge_weight, unmerge_weight=unmerge_weight, merge_bias=merge_bias, unmerge_bias=unmerge_bias,
))
