"""GraLoRA (`GraloraConfig`): LoRA cut into a k x k grid of blocks, each with its own rank-r/k factors, PEFT
0.21.2's arithmetic.

    x split into k input blocks x_n (in / k);  h_n = x_n A_n  (r = k * s, read as k pieces of s)
    y_j = sum_n h_n[j*s:(j+1)*s] B_j[n*s:(n+1)*s]          output block j (out / k)
    y = base(x) + scaling * y  (+ scaling * B_g A_g x with hybrid_r > 0)      scaling = alpha / (r + hybrid_r)

Parameters (PEFT's names and layouts): gralora_A (k, in / k, r), gralora_B (k, r, out / k); with hybrid_r > 0 also
gralora_A_general (hybrid_r, in) and gralora_B_general (out, hybrid_r) (PEFT's nn.Linear weights, saved with
`.weight`). nn.Linear and GPT-2 Conv1D only, like PEFT; in and out features must be divisible by gralora_k.
Per call nothing weight-sized is built (two einsums over the input, as PEFT). Merging adds PEFT's delta weight.
Inputs of any rank (..., in): PEFT takes (B, in) or (B, L, in); funcpeft flattens other leading dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import GraloraConfig
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, Method, OpContext, Params, Target
from .lora import kaiming_uniform

A, B = "gralora_A", "gralora_B"
A_GEN, B_GEN = "gralora_A_general", "gralora_B_general"


@dataclass(frozen=True)
class GraloraHyper:
    r: int
    k: int  # gralora_k
    hybrid_r: int
    scaling: float  # alpha / (r + hybrid_r)
    dropout: float
    init: bool


Spec = LayerSpec[GraloraHyper]


def hyper(config: Any, target: Target) -> GraloraHyper:
    """PEFT's per-layer checks: in and out features divisible by gralora_k (nn.Linear orientation)."""
    k = config.gralora_k
    w = target.module.weight
    in_f, out_f = (w.shape[0], w.shape[1]) if target.kind is LayerKind.CONV1D_HF else (w.shape[1], w.shape[0])
    if in_f % k != 0:
        raise ValueError(f"in_features should be divisible by gralora_k, but got {in_f} and {k} ({target.name!r})")
    if out_f % k != 0:
        raise ValueError(f"out_features should be divisible by gralora_k, but got {out_f} and {k} ({target.name!r})")
    return GraloraHyper(
        r=config.r,
        k=k,
        hybrid_r=config.hybrid_r,
        scaling=config.alpha / (config.r + config.hybrid_r),
        dropout=float(config.gralora_dropout),
        init=bool(config.init_weights),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (A, B, A_GEN, B_GEN) if spec.hyper.hybrid_r > 0 else (A, B)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws in its order: per block kaiming A_n (r, in/k) (and kaiming B_n (out/k, r) when init_weights is
    False); then the hybrid nn.Linear pair's own construction draws, then their re-initialisation."""
    h = spec.hyper
    sub_in, sub_out = spec.in_features // h.k, spec.out_features // h.k
    blocks_a, blocks_b = [], []
    for _ in range(h.k):
        blocks_a.append(kaiming_uniform((h.r, sub_in), generator))
        blocks_b.append(torch.zeros(sub_out, h.r) if h.init else kaiming_uniform((sub_out, h.r), generator))
    out = {
        A: torch.stack(blocks_a).transpose(1, 2).contiguous(),
        B: torch.stack(blocks_b).transpose(1, 2).contiguous(),
    }
    if h.hybrid_r > 0:
        shape_a, shape_b = (h.hybrid_r, spec.in_features), (spec.out_features, h.hybrid_r)
        kaiming_uniform(shape_a, generator)  # nn.Linear(in, hybrid_r)'s own init, then overwritten
        kaiming_uniform(shape_b, generator)  # nn.Linear(hybrid_r, out)'s
        out[A_GEN] = kaiming_uniform(shape_a, generator)
        out[B_GEN] = torch.zeros(shape_b) if h.init else kaiming_uniform(shape_b, generator)
    return out


def _blocks(spec: Spec, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PEFT's two einsums on x (B, L, in) -> (B, L, out)."""
    n = spec.hyper.k
    bsz, length, in_f = x.shape
    s = spec.hyper.r // n
    h = torch.einsum("blni, nir -> blnr", x.view(bsz, length, n, in_f // n), a)
    h = h.view(bsz, length, n, n, s).permute(0, 1, 3, 2, 4).reshape(bsz, length, n, n * s)
    return torch.einsum("bljr, jro -> bljo", h, b).reshape(bsz, length, -1)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + scaling * blocks(dropout(x))` (+ the hybrid LoRA, its own dropout draw) in PEFT's dtypes."""
    assert result is not None
    h = spec.hyper
    a, b = params[A], params[B]
    in_dtype, out_dtype = x.dtype, result.dtype
    x3 = x.reshape(-1, 1, x.shape[-1]) if x.dim() != 3 else x  # PEFT: (B, in) -> (B, 1, in)
    out = _blocks(spec, a, b, ctx.dropout(x3.to(a.dtype), h.dropout)).reshape(result.shape)
    result = result + h.scaling * out.to(out_dtype)
    if h.hybrid_r > 0:
        hybrid = F.linear(F.linear(ctx.dropout(x.to(a.dtype), h.dropout), params[A_GEN]), params[B_GEN])
        result = result + h.scaling * hybrid.to(out_dtype)
    return result.to(in_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: the block grid as one (out, in) matrix (+ B_g A_g), scaled, in the base layout;
    half-precision factors on CPU are multiplied in float32 and cast back."""
    h = spec.hyper
    a, b = params[A], params[B]
    dtype = a.dtype
    half = a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if half:
        a, b = a.float(), b.float()
    in_f, out_f, n, r = spec.in_features, spec.out_features, h.k, h.r
    rows = torch.arange(in_f, device=a.device)
    blk, pos = rows // (in_f // n), rows % (in_f // n)
    scattered = torch.zeros(in_f, n, r, device=a.device, dtype=a.dtype)
    scattered = scattered.scatter(1, blk.unsqueeze(1).unsqueeze(2).expand(-1, 1, r), a[blk, pos, :].unsqueeze(1))
    grid = scattered.view(in_f, n, n, r // n).permute(0, 2, 1, 3).reshape(in_f, n, r)
    delta = torch.einsum("ikr, kro -> iko", grid, b).reshape(in_f, out_f).T
    if h.hybrid_r > 0:
        ag, bg = params[A_GEN], params[B_GEN]
        delta = delta + (bg.float() @ ag.float() if half else bg @ ag)
    delta = (delta.T if spec.kind is LayerKind.CONV1D_HF else delta) * h.scaling
    return delta.to(dtype) if half else delta


GRALORA = register(
    Method(
        name="gralora",
        config=GraloraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        kinds=frozenset({LayerKind.LINEAR, LayerKind.CONV1D_HF}),
        keys=KeyRules(param_prefix="gralora_", unsuffixed=frozenset({A, B})),
    )
)
