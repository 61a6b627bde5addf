"""DeFT (`DeftConfig`): a residual-projection update of the frozen weight, PEFT 0.21.2's arithmetic.

    W' = (I - P_proj) W + Q_P (s R) = W + Q_P (s R - right^T W)         P (out, r) `deft_P`, R (r, in) `deft_R`
    relu: Q_P = P, right = relu(P)          qr: Q_P = qr(P).Q, right = Q_P          P_proj = Q_P right^T
    y = base(x) - ((x W^T) right) Q_P^T + (dropout(x) (s R)^T) Q_P^T     (PaRa, para=True: no R term)

s = alpha / r (1 without alpha). Everything after the base op runs in float32, as PEFT's forward (QR is unreliable
in half precision), and the output comes back in the input's dtype. `x W^T` is the bias-free base product: the
layer's output minus its bias when this adapter is the first on its layer, else the base op again (PEFT's
`base_layer(x)`, which every adapter of a layer reads, not the output of the adapters below).
Materialised per call, as in PEFT's forward: nothing weight-sized, only (..., r) activations and Q_P (out, r)
(a QR of P for "qr"). The delta depends on W, so DeFT has no `delta_weight`: merging (PEFT's `merge`) builds
`W + Q_P (s R - right^T W0)` with W0 the weight before the merge call's first adapter (PEFT caches right^T W0);
unmerging restores the pre-merge weight, so `funcpeft.unmerge` needs `base=` (the merged weight has lost W0's
part in span(P); PEFT's cache-less fallback is far off).
Init, in PEFT's draw order: P ~ N(0, 0.02^2), then R ~ N(0, (0.02 init_scale)^2) when init_weights is False;
init_weights=True sets R = right^T W / s in float32 from the base weight (a no-op adapter), before the fresh
adapter is rounded through a half-precision model's dtype, as PEFT's `update_layer` (`finish_init_first`).
Supported layers, as in PEFT: nn.Linear and GPT-2's Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs.deft import DeftConfig
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target

P, R = "deft_P", "deft_R"
F32 = torch.float32


@dataclass(frozen=True)
class DeftHyper:
    r: int  # min(config.r, out_features), PEFT's cap
    decomposition: str  # "relu" | "qr"
    scaling: float  # alpha / r, or 1.0
    para: bool  # PaRa: no injection term, no R
    dropout: float  # deft_dropout, on the injection's input
    init: bool  # init_weights: the identity init of R
    init_scale: float


Spec = LayerSpec[DeftHyper]


def hyper(config: Any, target: Target) -> DeftHyper:
    """PEFT's `update_layer` facts (the config has checked r, dropout and the decomposition)."""
    out = target.module.weight.shape[1 if target.kind is LayerKind.CONV1D_HF else 0]
    r = min(config.r, out)
    return DeftHyper(
        r=r,
        decomposition=config.decomposition_method,
        scaling=config.alpha / r if config.alpha else 1.0,
        para=config.para,
        dropout=float(config.deft_dropout),
        init=bool(config.init_weights),
        init_scale=float(config.init_scale),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (P,) if spec.hyper.para else (P, R)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """P ~ N(0, 0.02^2); R random (init_weights=False) or a zero placeholder that `finish_init` fills."""
    h = spec.hyper
    out = {P: torch.nn.init.normal_(torch.empty(spec.out_features, h.r), std=0.02, generator=generator)}
    if h.para:
        return out
    r = torch.empty(h.r, spec.in_features)
    out[R] = torch.zeros_like(r) if h.init else torch.nn.init.normal_(r, std=0.02 * h.init_scale, generator=generator)
    return out


def project(spec: Spec, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_P, right), both (out, r) float32, with P_proj = Q_P right^T (PEFT's `_project`)."""
    p = p.to(F32)
    if spec.hyper.decomposition == "qr":
        q, _ = torch.linalg.qr(p)
        return q, q
    return p, torch.relu(p)


def _logical(spec: Spec, weight: torch.Tensor) -> torch.Tensor:
    """The weight in float32 as (out, in) (GPT-2's Conv1D stores (in, out))."""
    weight = weight.to(F32)
    return weight.T if spec.kind is LayerKind.CONV1D_HF else weight


def finish_init(spec: Spec, params: Params, weight: torch.Tensor, shared: Params) -> Params:
    """init_weights=True: R = right^T W / s (float32, stored in R's dtype), so that W' == W."""
    h = spec.hyper
    if h.para or not h.init or weight.is_meta:
        return params
    _, right = project(spec, params[P].detach())
    r_init = (right.T @ _logical(spec, weight.detach())) / h.scaling
    return {**params, R: r_init.to(dtype=params[R].dtype, device=params[R].device)}


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's `DeftLinear.forward` for one adapter: the removal and injection terms on the activations."""
    assert result is not None
    h = spec.hyper
    previous_dtype = x.dtype
    out = result.to(F32)
    base = out if ctx.inner_op is ctx.base_op else ctx.base_op(x).to(F32)
    if ctx.bias is not None:
        base = base - ctx.bias.to(F32)
    q, right = project(spec, params[P])
    out = out - (base @ right) @ q.T
    if not h.para:
        x = ctx.dropout(x.to(F32), h.dropout)
        out = out + F.linear(x, params[R].to(F32) * h.scaling) @ q.T
    return out.to(previous_dtype)


def _delta(spec: Spec, params: Params, w0: torch.Tensor) -> torch.Tensor:
    """Q_P (s R - right^T W0) (PaRa: -Q_P right^T W0) in W0's layout and dtype (PEFT's `_delta_from_factor`)."""
    q, right = project(spec, params[P])
    factor = right.T @ _logical(spec, w0)
    inner = -factor if spec.hyper.para else params[R].to(F32) * spec.hyper.scaling - factor
    delta = q @ inner
    return (delta.T if spec.kind is LayerKind.CONV1D_HF else delta).to(w0.dtype)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's `merge`: `W + delta(W0)`, W0 the weight before the merge call's first adapter (default: W)."""
    w0 = weight if base_weight is None else base_weight
    return weight + _delta(spec, params, w0).to(weight.device, weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """The pre-merge weight (PEFT's unmerge is exact too: it caches right^T W0 at merge time). Without it there is
    no answer: (I - P_proj) W0 loses W0's part in span(P) (for "qr" exactly), and PEFT's cache-less fallback
    `W - delta(W)` is far off, so funcpeft refuses instead of returning a wrong weight."""
    if base_weight is None:
        raise ValueError(
            "DeFT cannot be unmerged from the merged weight alone: its update (I - P_proj) W + Q_P R removes part "
            "of W, which the merged weight no longer holds (PEFT keeps a cache of it from the merge). Pass the "
            "original base tree: funcpeft.unmerge(pm, merged, adapter, base=base)."
        )
    return base_weight


DEFT = register(
    Method(
        name="deft",
        config=DeftConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        finish_init=finish_init,
        finish_init_first=True,
        forward=forward,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, from_base=True),
        keys=KeyRules(param_prefix="deft_", unsuffixed=frozenset({P, R})),
        kinds=frozenset({LayerKind.LINEAR, LayerKind.CONV1D_HF}),
    )
)
