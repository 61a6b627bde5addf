"""PEANuT (`PeanutConfig`): a weight-aware update computed by a small network of the frozen weight, PEFT 0.21.2's
arithmetic.

    h = act(W^T A^T)                          W (out, in) the base weight, A (r, out): h (in, r)
    depth d: residuals h_0..h_{d-1}; h = act(E_i h) for i < d, then h = act(D_i h) + h_{d-1-i}
    delta = scaling * (h B^T)^T               B (out, r): delta (out, in)
    y = base(x) + x delta^T

Parameters (PEFT's nn.Linear weights, saved with `.weight`): peanut_A (r, out), peanut_B (out, r),
peanut_encoders.{i} / peanut_decoders.{i} (r, r) for i < depth (PEFT's ModuleLists). nn.Linear only, like PEFT.

Materialised per call, per adapted layer: the weight-sized `delta` (and the (in, r) activations), exactly what
PEFT's forward builds (its `get_delta_weight` runs in every forward). W is the layer's plain base weight, never the
output of an adapter below: with several PEANuT adapters on one layer each adds its own `x delta_i(W)^T`, as PEFT's
loop does. Per-example routing runs `forward` under vmap and so builds one delta per example.
Merging: `W + delta(W0)`, W0 the weight before the merge (PEFT keeps it and computes every adapter's delta from it);
unmerging restores W0, so funcpeft needs it: `funcpeft.unmerge(..., base=...)`.
Init (PEFT builds the nn.Linear modules, each drawing its default init, then re-draws): A, encoders, decoders
kaiming-uniform; B zeros (init_weights=True) or kaiming-uniform (False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ..configs.peanut import PeanutConfig
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target
from .lora import kaiming_uniform

A, B = "peanut_A", "peanut_B"
ENC, DEC = "peanut_encoders", "peanut_decoders"


@dataclass(frozen=True)
class PeanutHyper:
    r: int
    depth: int
    act_fn: str  # a transformers ACT2FN key
    scaling: float
    init: bool  # init_weights


Spec = LayerSpec[PeanutHyper]


def hyper(config: Any, target: Target) -> PeanutHyper:
    return PeanutHyper(
        r=config.r,
        depth=config.depth,
        act_fn=config.act_fn,
        scaling=float(config.scaling),
        init=bool(config.init_weights),
    )


def _hidden(spec: Spec, prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(spec.hyper.depth))


def param_names(spec: Spec) -> tuple[str, ...]:
    return (A, *_hidden(spec, ENC), *_hidden(spec, DEC), B)


def _shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    r, out = spec.hyper.r, spec.out_features
    square = {name: (r, r) for name in (*_hidden(spec, ENC), *_hidden(spec, DEC))}
    return {A: (r, out), **square, B: (out, r)}


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws in its order: each nn.Linear's default init as it is built (A, encoders, decoders, B), then
    `reset_peanut_parameters` (A, encoders, decoders kaiming-uniform; B zeros or kaiming-uniform)."""
    shapes = _shapes(spec)
    for shape in shapes.values():  # the modules' construction draws, overwritten below
        kaiming_uniform(shape, generator)
    out = {name: kaiming_uniform(shape, generator) for name, shape in shapes.items() if name != B}
    out[B] = torch.zeros(shapes[B]) if spec.hyper.init else kaiming_uniform(shapes[B], generator)
    return out


def delta_from(spec: Spec, params: Params, weight: torch.Tensor) -> torch.Tensor:
    """PEFT's `_compute_delta_weight`: the (out, in) delta of base weight `weight` (out, in), in the adapter's dtype."""
    act = ACT2FN[spec.hyper.act_fn]
    h = act(weight.transpose(0, 1).to(params[A].dtype) @ params[A].t())  # (in, r)
    residuals = []
    for name in _hidden(spec, ENC):
        residuals.append(h)
        h = act(F.linear(h, params[name]))
    for i, name in enumerate(_hidden(spec, DEC)):
        h = act(F.linear(h, params[name])) + residuals[-1 - i]
    return (F.linear(h, params[B]) * spec.hyper.scaling).transpose(0, 1)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + x delta(W)^T` in PEFT's dtypes; W is the layer's plain base weight."""
    assert result is not None
    delta = delta_from(spec, params, ctx.weight)
    return result + torch.matmul(x.to(delta.dtype), delta.transpose(0, 1)).to(result.dtype)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's merge: `W + delta(W0)` (delta cast to W's dtype); W0: the pre-merge weight (default: `weight`)."""
    w0 = weight if base_weight is None else base_weight.to(weight.dtype)
    return weight + delta_from(spec, params, w0).to(device=weight.device, dtype=weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT restores its saved pre-merge weight; the delta is a nonlinear function of it, so W0 cannot be
    recovered from the merged weight alone."""
    if base_weight is None:
        raise ValueError(
            "PEANuT cannot unmerge without the pre-merge weight: its delta is a nonlinear function of the base "
            "weight W0 (PEFT keeps W0 on the layer when it merges). Pass the unmerged weights: "
            "funcpeft.unmerge(..., base=<the base tree before merging>)."
        )
    return base_weight.to(weight.dtype)


PEANUT = register(
    Method(
        name="peanut",
        config=PeanutConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, from_base=True),
        keys=KeyRules(param_prefix="peanut_", unsuffixed=frozenset(), indexed=frozenset({ENC, DEC})),
        kinds=frozenset({LayerKind.LINEAR}),
    )
)
