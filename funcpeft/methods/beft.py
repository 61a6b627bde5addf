"""BEFT (`BeftConfig`): a learned bias added to a layer's output.

    y = base(x) + b          b = `beft_bias` (1, out), added as (out,)

Materialised per call, as in PEFT's forward: nothing but the sum. Merging adds b to the layer's bias and leaves
the weight alone; a layer without a bias cannot be merged (PEFT's ValueError; PEFT warns when such a layer is
adapted, and so does funcpeft). Supported layers, as in PEFT: nn.Linear only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..configs.beft import BeftConfig
from ._registry import register
from .base import (
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

BIAS = "beft_bias"


@dataclass(frozen=True)
class BeftHyper:
    init: bool  # init_weights: zeros (a no-op) or randn


Spec = LayerSpec[BeftHyper]


def hyper(config: Any, target: Target) -> BeftHyper:
    if target.kind is not LayerKind.LINEAR:
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only "
            "`torch.nn.Linear` is supported."
        )
    if target.module.bias is None:
        warnings.warn(
            f"Detected that the base layer {target.name!r} has no bias term. "
            "Note you cannot merge the BEFT adapter into the base layer.",
            stacklevel=2,
        )
    return BeftHyper(init=bool(config.init_weights))


def param_names(spec: Spec) -> tuple[str, ...]:
    return (BIAS,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT draws randn (1, out) whatever init_weights says, then zeroes it for init_weights=True."""
    bias = torch.randn((1, spec.out_features), generator=generator)
    return {BIAS: torch.zeros_like(bias) if spec.hyper.init else bias}


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """The layer's output (..., out) plus b, in the output's dtype (PEFT's cast)."""
    assert result is not None
    return (result + params[BIAS].flatten()).to(result.dtype)


def _same_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    return weight


def merge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    return (bias + params[BIAS].squeeze().to(bias.dtype)).to(bias.dtype)


def unmerge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    return (bias - params[BIAS].squeeze()).to(bias.dtype)


def _no_bias(path: str) -> Exception:
    return ValueError(f"Base layer has no bias, cannot merge bias adapter (module {path!r})")


BEFT = register(
    Method(
        name="beft",
        config=BeftConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        merge=MergeHooks(
            weight=_same_weight,
            unweight=_same_weight,
            bias=merge_bias,
            unbias=unmerge_bias,
            needs_bias=lambda spec: True,
            missing_bias=_no_bias,
        ),
        keys=KeyRules(param_prefix="beft_", unsuffixed=frozenset({BIAS})),
    )
)
