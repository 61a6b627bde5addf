"""OSF (`OSFConfig`): orthogonal subspace fine-tuning of the minor singular directions of W.

    W = U S Vh (float32 SVD),  k = effective_rank,  m = min(out, in),  n = m - k
    trained: U_low (out, n), S_low (n,), V_low (n, in)      frozen: their values at init U0, S0, V0 (the bottom n
    singular triplets of W) and the top-k vectors U_high (out, k) / V_high (k, in) where they are needed
    y = base(x) + (x [V; V0]^T) [U S, -U0 S0]^T        dW = U diag(S) V - U0 diag(S0) V0

Trainable, per layer: `osf_U_low`, `osf_S_low`, `osf_V_low` (PEFT: `osf_svd_params.U_low`, ...). Init: the SVD's
bottom n triplets (dW = 0), or N(0, 1) draws with init_weights=False (PEFT's test mode). U0, S0, V0 and U_high
(out > in) / V_high (out < in) are frozen per-layer tensors in `base` (`Method.layer_frozen`), neither saved nor
counted: PEFT keeps them as non-persistent buffers, rebuilt from the base weight when an adapter is loaded; for
fp16 / bf16 models they and the trainable factors are upcast to float32 (autocast_adapter_dtype) after being
computed in the model's dtype, as in PEFT.

Gradients: PEFT's OSF registers gradient hooks that project the gradients of U_low and V_low orthogonally to the
frozen top-k subspace: dU -> dU - U_high U_high^T dU (dU -> U0 U0^T dU when U is square, the same projection) and
dV -> dV - dV V_high^T V_high (dV V0^T V0). funcpeft has no hooks: the forward reads U and V through an autograd
Function whose value is the parameter itself (nothing computed or kept per call, like PEFT's hooks) and whose
gradient (and forward-mode tangent) is the projection, so `funcpeft.grad` gives PEFT's training gradients (not the
plain derivative of the forward, by design of the method); vmap and per-example routing apply (a generated vmap
rule). Under torch.compile, which cannot trace the Function's jvp, the same gradient comes from the
straight-through `U + (P(U) - P(U).detach())` (P computed in the forward there).

Materialised per call, as in PEFT's factored forward: the (out, 2n) and (2n, in) concatenated factors; nothing
(out, in). PEFT's forward applies only the first active OSF adapter of a layer: funcpeft refuses several on one
layer rather than silently drop one.
Supported layers, as in PEFT: nn.Linear (PEFT silently leaves other targeted layers unadapted; funcpeft raises).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs.osf import OSFConfig
from ._registry import register
from .base import KeyRules, LayerFrozen, LayerKind, LayerSpec, Method, OpContext, Params, Target, UnsupportedLayerError

U, S, V = "osf_U_low", "osf_S_low", "osf_V_low"
U0, S0, V0, U_HIGH, V_HIGH = "osf_U_low_init", "osf_S_low_init", "osf_V_low_init", "osf_U_high", "osf_V_high"


@dataclass(frozen=True)
class OSFHyper:
    k: int  # effective_rank: the frozen top singular directions
    n: int  # trained directions: min(out, in) - k
    u_square: bool  # out <= in: U0 spans the complement of U_high (PEFT stores no U_high)
    v_square: bool  # out >= in
    init: bool  # init_weights


Spec = LayerSpec[OSFHyper]


def _resolve_rank(value: Any, min_dim: int) -> int:
    """PEFT's `_resolve_rank`: None -> m // 2, a float in (0, 1] -> that fraction of m, else int(value); in [0, m]."""
    if value is None:
        return max(min_dim // 2, 0)
    r = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, r), 0)


def hyper(config: Any, target: Target) -> OSFHyper:
    if target.kind is not LayerKind.LINEAR:
        raise UnsupportedLayerError(
            f"OSF adapts torch.nn.Linear layers only, not {target.name!r} ({type(target.module).__name__}): PEFT "
            "0.21.2 silently leaves such a targeted layer unadapted; remove it from target_modules."
        )
    out_f, in_f = target.module.weight.shape
    min_dim = min(out_f, in_f)
    k = _resolve_rank(config.effective_rank, min_dim)
    for pattern, rank in (config.rank_pattern or {}).items():
        if re.search(pattern, target.name):
            k = _resolve_rank(rank, min_dim)
            break
    if k <= 0:
        raise ValueError(
            f"`effective_rank` should be a positive integer value but the value passed is {k} (module {target.name!r})"
        )
    return OSFHyper(
        k=k, n=min_dim - k, u_square=out_f <= in_f, v_square=out_f >= in_f, init=config.init_weights is not False
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (U, S, V)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """init_weights=False: PEFT's randn_like draws, U then S then V; else placeholders `finish_init` replaces."""
    n, out_f, in_f = spec.hyper.n, spec.out_features, spec.in_features
    if spec.hyper.init:
        return {U: torch.zeros(out_f, n), S: torch.zeros(n), V: torch.zeros(n, in_f)}
    return {
        U: torch.randn(out_f, n, generator=generator),
        S: torch.randn(n, generator=generator),
        V: torch.randn(n, in_f, generator=generator),
    }


def _decompose(spec: Spec, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's `decompose_weight_matrix`: the float32 SVD's parts, in the weight's dtype and on its device."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    k = spec.hyper.k
    parts = {U: u[:, k:], S: s[k:], V: vh[k:, :], U_HIGH: u[:, :k], V_HIGH: vh[:k, :]}
    return {name: t.contiguous().to(weight.dtype) for name, t in parts.items()}


def finish_init(spec: Spec, params: Params, weight: torch.Tensor, shared: Params) -> Params:
    """init_weights=True: the SVD's bottom n triplets (the adapter starts as the identity)."""
    if not spec.hyper.init or weight.is_meta:
        return params
    parts = _decompose(spec, weight)
    return {name: parts[name].to(params[name].dtype) for name in (U, S, V)}


def frozen_names(spec: Spec) -> tuple[str, ...]:
    h = spec.hyper
    return (U0, S0, V0) + (() if h.u_square else (U_HIGH,)) + (() if h.v_square else (V_HIGH,))


def make_frozen(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """The layer's frozen SVD parts (PEFT's BufferDicts), in the weight's dtype."""
    weight: Any = module.weight
    names = frozen_names(spec)
    if weight.is_meta:
        shapes = {U0: (spec.out_features, spec.hyper.n), S0: (spec.hyper.n,), V0: (spec.hyper.n, spec.in_features)}
        shapes |= {U_HIGH: (spec.out_features, spec.hyper.k), V_HIGH: (spec.hyper.k, spec.in_features)}
        return {name: torch.empty(shapes[name], dtype=weight.dtype, device="meta") for name in names}
    with torch.no_grad():
        parts = _decompose(spec, weight)
    renamed = {U0: U, S0: S, V0: V, U_HIGH: U_HIGH, V_HIGH: V_HIGH}
    return {name: parts[renamed[name]] for name in names}


# -- PEFT's gradient hooks, as a gradient projection -------------------------------------------------------------
def _project(grad: torch.Tensor, basis: torch.Tensor, square: bool, left: bool) -> torch.Tensor:
    """PEFT's hook on a gradient of U (`left`: (out, n), projected on the column side) or of V ((n, in), row side):
    onto `basis`'s span when the factor is square (basis U0 / V0), else off it (basis U_high / V_high)."""
    g = grad.to(basis.dtype)
    if left:
        along = basis @ (basis.transpose(0, 1) @ g)
    else:
        along = (g @ basis.transpose(0, 1)) @ basis
    return (along if square else g - along).to(grad.dtype)


class _Projected(torch.autograd.Function):
    """`value` itself, whose gradient (and tangent) is `_project`ed: PEFT's hooks, without computing anything in
    the forward (a straight-through `value + (P(value) - P(value).detach())` computes and keeps P(value) per call:
    1.06x PEFT's training peak on the benchmark Llama). vmap applies (`generate_vmap_rule`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: torch.Tensor, basis: torch.Tensor, square: bool, left: bool) -> torch.Tensor:
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, basis, ctx.square, ctx.left = inputs
        ctx.save_for_backward(basis)
        ctx.save_for_forward(basis)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (basis,) = ctx.saved_tensors
        return _project(grad, basis, ctx.square, ctx.left), None, None, None

    @staticmethod
    def jvp(ctx: Any, tvalue: Any, tbasis: Any, tsquare: Any, tleft: Any) -> torch.Tensor:
        (basis,) = ctx.saved_tensors
        return _project(tvalue, basis, ctx.square, ctx.left)


def _projected(value: torch.Tensor, basis: torch.Tensor, square: bool, left: bool) -> torch.Tensor:
    """`_Projected`; under torch.compile (which cannot trace a custom jvp) the straight-through form, whose value
    is `value` and whose gradient is the projected one: `_project` is linear, so P(value) - P(value).detach() is
    zero and differentiates to P."""
    if torch.compiler.is_compiling():
        projected = _project(value, basis, square, left)
        return value.detach() + (projected - projected.detach())
    out: torch.Tensor = _Projected.apply(value, basis, square, left)
    return out


def projected_u(spec: Spec, params: Params) -> torch.Tensor:
    """U_low; its gradient dU - U_high (U_high^T dU), or U0 (U0^T dU) when U is square (PEFT's hook)."""
    square = spec.hyper.u_square
    return _projected(params[U], params[U0] if square else params[U_HIGH], square, True)


def projected_v(spec: Spec, params: Params) -> torch.Tensor:
    """V_low; its gradient dV - (dV V_high^T) V_high, or (dV V0^T) V0 when V is square (PEFT's hook)."""
    square = spec.hyper.v_square
    return _projected(params[V], params[V0] if square else params[V_HIGH], square, False)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's factored forward: dW x as ((x [V; V0]^T) [U S, -U0 S0]^T), added in x's dtype."""
    assert result is not None
    u, v = projected_u(spec, params), projected_v(spec, params)
    a = torch.cat([u * params[S].unsqueeze(0), -(params[U0] * params[S0].unsqueeze(0))], dim=1)
    b = torch.cat([v, params[V0]], dim=0)
    delta = F.linear(F.linear(x.to(a.dtype), b), a)
    return result + delta.to(x.dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: U diag(S) V - U0 diag(S0) V0 (out, in)."""
    current = torch.mm(params[U] * params[S].unsqueeze(0), params[V])
    return current - torch.mm(params[U0] * params[S0].unsqueeze(0), params[V0])


def check_stack(specs: tuple[LayerSpec[Any], ...]) -> None:
    if len(specs) > 1:
        raise NotImplementedError(
            f"{len(specs)} OSF adapters on one layer: PEFT 0.21.2's OSF forward applies only the first active adapter "
            "of a layer and ignores the others. Activate one OSF adapter per layer (or merge the others first)."
        )


OSF = register(
    Method(
        name="osf",
        config=OSFConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        finish_init=finish_init,
        forward=forward,
        delta_weight=delta_weight,
        layer_frozen=LayerFrozen(
            names=(U0, S0, V0, U_HIGH, V_HIGH), make=make_frozen, saved=False, autocast=True, select=frozen_names
        ),
        keys=KeyRules(
            param_prefix="osf_",
            unsuffixed=frozenset(),
            renamed=((U, "osf_svd_params.U_low"), (S, "osf_svd_params.S_low"), (V, "osf_svd_params.V_low")),
        ),
        check_stack=check_stack,
    )
)
