"""PSOFT (`PsoftConfig`): an r x r transform R trained between the frozen principal-subspace factors of W.

    y = base(x) + s ((xa R^T) - xa) B^T,   xa = dropout(x) A^T        dW = s B (R - I) A,   s = psoft_alpha / r
    R = diag(vector_b) C diag(vector_a)     C = (I + Q)(I - Q)^-1 (Q skew, `psoft_orth`), its Neumann series
                                            I + 2Q + 2Q^2 + ... + Q^(t-1) (`use_cayley_neumann`), or a free matrix

Trainable, per layer: `psoft_R` (r(r-1)/2,) (the entries of Q above the diagonal) or (r, r) without psoft_orth,
`psoft_vector_b` / `psoft_vector_a` (r,) with psoft_mag_b / psoft_mag_a (PEFT: `psoft_R.weight`,
`psoft_R.vector_b`, `psoft_R.vector_a`). Init: zeros (orth) or I, vectors ones (R = I: a no-op); init_weights=False
draws N(0, 0.1) (orth) or I + 0.1 N(0, 1). A (r, in) and B (out, r) come from the float32 SVD of W = U S Vh
(full, or torch.svd_lowrank seeded by random_seed in a forked RNG): psoft_init A = Vh_r, B = U_r S_r / s;
pissa_init A = sqrt(S_r / s) Vh_r, B = U_r sqrt(S_r / s). They are frozen per-layer tensors in `base`
(`Method.layer_frozen`), neither saved nor counted: PEFT keeps them as non-persistent buffers and rebuilds them
from the base weight on load, and so does funcpeft.

Materialised per call, as in PEFT's forward: the r x r matrix R and the (..., r) projections; nothing
weight-sized (dW (out, in) is built only to merge, PEFT's `get_delta_weight`). Supported layers, as in PEFT:
nn.Linear only. Per-example routing and vmap run this forward per example (an r x r solve each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configs.psoft import PsoftConfig
from ._registry import register
from .base import KeyRules, LayerFrozen, LayerKind, LayerSpec, Method, OpContext, Params, Target, UnsupportedLayerError

R, VECTOR_B, VECTOR_A = "psoft_R", "psoft_vector_b", "psoft_vector_a"
A_CACHE, B_CACHE = "psoft_A", "psoft_B"  # frozen, in `base` (PEFT's _psoft_A_cache / _psoft_B_cache)


@dataclass(frozen=True)
class PsoftHyper:
    r: int
    scaling: float  # psoft_alpha / r
    dropout: float
    ab_svd_init: str
    svd: str  # "full" | "lowrank"
    niter: int
    random_seed: int
    orth: bool
    mag_b: bool
    mag_a: bool
    neumann: bool
    neumann_terms: int
    neumann_eps: float | None
    init: bool


Spec = LayerSpec[PsoftHyper]


def hyper(config: Any, target: Target) -> PsoftHyper:
    if target.kind is not LayerKind.LINEAR:
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported by minimal PSOFT. "
            "Only torch.nn.Linear is supported."
        )
    r = int(config.r)
    m = target.module
    if r > min(m.in_features, m.out_features):
        raise ValueError(
            f"`r` ({r}) must be less than or equal to min(in_features, out_features) "
            f"({m.in_features}, {m.out_features}) (module {target.name!r})"
        )
    eps = config.cayley_neumann_eps
    return PsoftHyper(
        r=r,
        scaling=config.psoft_alpha / r,
        dropout=float(config.psoft_dropout),
        ab_svd_init=config.ab_svd_init,
        svd=config.psoft_svd,
        niter=int(config.psoft_svd_lowrank_niter),
        random_seed=int(config.random_seed),
        orth=bool(config.psoft_orth),
        mag_b=bool(config.psoft_mag_b),
        mag_a=bool(config.psoft_mag_a),
        neumann=bool(config.use_cayley_neumann),
        neumann_terms=int(config.num_cayley_neumann_terms),
        neumann_eps=None if eps is None else float(eps),
        init=bool(config.init_weights),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    h = spec.hyper
    return (R,) + ((VECTOR_B,) if h.mag_b else ()) + ((VECTOR_A,) if h.mag_a else ())


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's `OrthLayer.reset_parameters` draws: only R is random, and only with init_weights=False."""
    h = spec.hyper
    if h.orth:
        size = h.r * (h.r - 1) // 2
        weight = torch.zeros(size) if h.init else torch.empty(size).normal_(0.0, 0.1, generator=generator)
    else:
        weight = torch.eye(h.r)
        if not h.init:
            weight = weight + torch.randn(h.r, h.r, generator=generator) * 0.1
    out = {R: weight}
    out.update({name: torch.ones(h.r) for name in param_names(spec)[1:]})
    return out


# -- the frozen factors ---------------------------------------------------------------------------------------
def _svd(spec: Spec, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (out, r), S_r (r,), Vh_r (r, in)) of w (out, in) float32 (PEFT's `_compute_svd_factors`)."""
    h = spec.hyper
    if h.svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, : h.r], s[: h.r], vh[: h.r, :]
    # svd_lowrank draws from the global RNG: PEFT seeds a fork of it, which leaves the caller's stream untouched
    fork: dict[str, Any] = (
        {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
    )
    with torch.random.fork_rng(**fork):
        torch.manual_seed(h.random_seed)
        u, s, v = torch.svd_lowrank(w, q=h.r, niter=h.niter)
    return u[:, : h.r], s[: h.r], v[:, : h.r].t()


def make_ab(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """{psoft_A: (r, in), psoft_B: (out, r)} float32, on the weight's device, from the SVD of the base weight."""
    weight: Any = module.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("PSOFT init requires float32/float16/bfloat16. Re-quantize after init if needed.")
    h = spec.hyper
    if weight.is_meta:
        return {
            A_CACHE: torch.empty(h.r, spec.in_features, device="meta"),
            B_CACHE: torch.empty(spec.out_features, h.r, device="meta"),
        }
    with torch.no_grad():
        u, s, vh = _svd(spec, weight.detach().to(torch.float32))
        s = s / h.scaling
        if h.ab_svd_init == "psoft_init":
            a, b = vh, u @ torch.diag(s)
        else:  # pissa_init
            root = torch.sqrt(s)
            a, b = torch.diag(root) @ vh, u @ torch.diag(root)
    return {A_CACHE: a.contiguous(), B_CACHE: b.contiguous()}


# -- R --------------------------------------------------------------------------------------------------------
def _skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(size(size-1)/2,) -> (size, size): Q with vec above the diagonal, Q - Q^T (PEFT's `_skew_symmetric`)."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    q = vec.new_zeros(size * size).index_copy(0, rows * size + cols, vec).reshape(size, size)
    return q - q.transpose(0, 1)


def matrix(spec: Spec, params: Params) -> torch.Tensor:
    """R (r, r), in psoft_R's dtype (PEFT's `OrthLayer.get_matrix`)."""
    h = spec.hyper
    weight = params[R]
    if not h.orth:
        r = weight
    else:
        q = _skew(weight, h.r)
        dtype = q.dtype
        eye = torch.eye(h.r, device=q.device, dtype=dtype)
        if h.neumann:
            if h.neumann_eps is not None:  # PEFT's `_project_Q`, without its data-dependent branch
                norm = torch.linalg.norm(q, ord="fro")
                q = torch.where(torch.isfinite(norm) & (norm > h.neumann_eps), q * (h.neumann_eps / (norm + 1e-12)), q)
            t = h.neumann_terms
            r = eye
            if t > 1:
                r = torch.add(r, q, alpha=2.0)
                if t > 2:
                    power = q @ q
                    r = torch.add(r, power, alpha=2.0)
                    for _ in range(3, t - 1):
                        power = power @ q
                        r = torch.add(r, power, alpha=2.0)
                    r = r + power @ q
        else:
            half = dtype in (torch.float16, torch.bfloat16)  # the solver needs float32
            if half:
                q, eye = q.float(), eye.float()
            r = torch.linalg.solve(eye - q, eye + q, left=False)
    if h.mag_b:
        r = params[VECTOR_B][:, None] * r
    if h.mag_a:
        r = r * params[VECTOR_A][None, :]
    return r.to(weight.dtype)


def _cpu_half(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's forward and casts: x in A's dtype, R applied in float32 for CPU half inputs, result's dtype kept."""
    assert result is not None
    a, b = params[A_CACHE], params[B_CACHE]
    previous = result.dtype
    xd = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    xa = xd @ a.to(xd.dtype).t()
    compute = _cpu_half(xa)
    xr = (xa.to(compute) @ matrix(spec, params).to(compute).t()).to(xa.dtype)
    delta = (xr - xa) @ b.to(xd.dtype).t()
    return (result + delta * spec.hyper.scaling).to(previous)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: s B (R - I) A (out, in), in float32 for CPU half weights, in R's dtype."""
    r = matrix(spec, params)
    compute = _cpu_half(r)
    a, b = params[A_CACHE].to(compute), params[B_CACHE].to(compute)
    eye = torch.eye(spec.hyper.r, device=r.device, dtype=compute)
    return (b @ (r.to(compute) - eye) @ a) * spec.hyper.scaling


PSOFT = register(
    Method(
        name="psoft",
        config=PsoftConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        layer_frozen=LayerFrozen(names=(A_CACHE, B_CACHE), make=make_ab, saved=False),
        keys=KeyRules(
            param_prefix="psoft_",
            unsuffixed=frozenset(),
            renamed=((VECTOR_B, "psoft_R.vector_b"), (VECTOR_A, "psoft_R.vector_a")),
        ),
    )
)
