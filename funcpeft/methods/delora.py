"""DeLoRA (`DeloraConfig`): a low-rank update whose norm is bounded by a trained lambda.

    s = lambda / r / (clamp(||A_i,:||, 1e-4) * clamp(||B_:,i||, 1e-4))     (r,)
    y = base(x) + B(s * A(dropout(x) * w_norm))          dW = B diag(s) A diag(w_norm)

A (r, in) `delora_A`, B (out, r) `delora_B`, lambda (1,) `delora_lambda` are trained; w_norm (in,)
`delora_w_norm` = ||W_:,j|| (the base weight's column norms when the adapter is made) is a frozen per-layer
tensor in `base` that PEFT saves (a persistent buffer) and loading restores.
Materialised per call, as in PEFT's forward: nothing weight-sized, only the (..., in) scaled input and the
(..., r) low-rank activations; dW (out, in) is built only to merge (PEFT's `get_delta_weight`).
Supported layers, as in PEFT: nn.Linear only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs.delora import DeloraConfig
from ._patterns import pattern_key
from ._registry import register
from .base import (
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    Method,
    OpContext,
    Params,
    Target,
    UnsupportedLayerError,
)

A, B, LAMBDA, W_NORM = "delora_A", "delora_B", "delora_lambda", "delora_w_norm"


@dataclass(frozen=True)
class DeloraHyper:
    r: int
    delora_lambda: float
    dropout: float  # module_dropout: on the adapter's input
    init: bool  # init_weights: B zeros (True) or kaiming-uniform


Spec = LayerSpec[DeloraHyper]


def _pattern(pattern: dict, name: str, default: Any) -> Any:
    key = pattern_key(pattern.keys(), name)  # PEFT's get_pattern_key, which falls back to the name itself
    return pattern.get(key if key is not None else name, default)


def hyper(config: Any, target: Target) -> DeloraHyper:
    if target.kind is not LayerKind.LINEAR:
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only "
            "`torch.nn.Linear` is supported."
        )
    r = _pattern(config.rank_pattern or {}, target.name, config.r)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r} (module {target.name!r})")
    lam = _pattern(config.lambda_pattern or {}, target.name, config.delora_lambda)
    return DeloraHyper(
        r=r, delora_lambda=float(lam), dropout=float(config.module_dropout), init=bool(config.init_weights)
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (A, B, LAMBDA)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws in its order: A kaiming-uniform(a=sqrt 5), then B (kaiming-uniform unless init_weights)."""
    h = spec.hyper
    a = nn.init.kaiming_uniform_(torch.empty(h.r, spec.in_features), a=math.sqrt(5), generator=generator)
    b = torch.empty(spec.out_features, h.r)
    b = nn.init.zeros_(b) if h.init else nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
    return {A: a, B: b, LAMBDA: torch.full((1,), h.delora_lambda)}


def make_w_norm(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> Params:
    """{delora_w_norm: (in,)}: the base weight's column norms, in its dtype and on its device (PEFT's buffer)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if weight.is_meta:
        return {W_NORM: torch.ones(weight.shape[1], device=weight.device)}  # PEFT's value for a meta weight
    with torch.no_grad():
        return {W_NORM: torch.norm(weight.detach(), dim=0)}


def _scale(spec: Spec, params: Params) -> torch.Tensor:
    """(r,): lambda / r / (||A_i||  ||B^i||), norms clamped at 1e-4 like PEFT's."""
    a_n = torch.clamp(params[A].norm(dim=1), min=1e-4)
    b_n = torch.clamp(params[B].norm(dim=0), min=1e-4)
    return (params[LAMBDA] / spec.hyper.r) / (a_n * b_n)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's decomposed forward: `base + (0 + B(s * A(dropout(x) * w_norm))).to(base dtype)`."""
    assert result is not None
    previous_dtype = x.dtype
    h = F.linear(ctx.dropout(x, spec.hyper.dropout) * params[W_NORM], params[A])
    h = F.linear(h * _scale(spec, params), params[B])
    return (result + h.to(result.dtype)).to(previous_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `_compute_delta`: (out, in) = B @ diag(s) @ A * w_norm."""
    delta = params[B] @ torch.diag_embed(_scale(spec, params)) @ params[A]
    return delta * params[W_NORM].unsqueeze(0)


DELORA = register(
    Method(
        name="delora",
        config=DeloraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        layer_frozen=LayerFrozen(names=(W_NORM,), make=make_w_norm, autocast=True),
        keys=KeyRules(param_prefix="delora_", unsuffixed=frozenset({A, B, LAMBDA, W_NORM})),
    )
)
