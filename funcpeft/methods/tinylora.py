"""TinyLoRA (`TinyLoraConfig`): LoRA-XS with a tiny trainable vector, PEFT 0.21.2's arithmetic.

    W = U S V^T (float32 SVD, truncated to r' = min(r, out, in)):  A = sqrt(S) V^T (r', in), B = U sqrt(S) (out, r')
    R = sum_i v_i P_i (r', r')        P (u, r', r') ~ N(0, 1/r'), seeded projection_seed + the layer's index
    linear / Conv1D:   y = base(x) + B R A dropout(x)         (three F.linear, no weight-sized tensor)
    embedding:         y = base(ids) + dropout(B[ids]) R A    (in the output's dtype)

A, B and P are frozen per-layer tensors (`LayerFrozen`, in `base`, saved as PEFT's buffers `tinylora_A` /
`tinylora_B` / `tinylora_P`). The trainable vectors v (u,) are shared: the n targeted layers (in module order)
fall into max(1, round(n * (1 - weight_tying))) groups, each with its own v, kept at `adapter["<shared>"]` as
`tinylora_v.<group>` (PEFT's `base_model.tinylora_v.<group>`). nn.Linear, GPT-2 Conv1D and nn.Embedding only.
Merging adds `B R A` (transposed for Conv1D).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import TinyLoraConfig
from ._registry import register
from .base import (
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    Method,
    OpContext,
    Params,
    SharedParams,
    SharedTensors,
    Target,
)

A, B, P = "tinylora_A", "tinylora_B", "tinylora_P"
V = "tinylora_v"


@dataclass(frozen=True)
class TinyLoraHyper:
    r: int  # min(config.r, out, in)
    u: int
    index: int  # the layer's position among the targeted layers (PEFT's layer_idx)
    group: int  # which shared v it reads
    groups: int
    seed: int  # projection_seed + index
    dropout: float
    init: bool | str
    bound: float  # init_v_bound


Spec = LayerSpec[TinyLoraHyper]


def v_name(group: int) -> str:
    return f"{V}.{group}"


def _indices(config: Any, modules: Mapping[str, nn.Module]) -> dict[str, int]:
    """PEFT's `_build_target_key_mapping`: each targeted layer's index, in module order."""
    return {name: i for i, name in enumerate(modules)}


def hyper(config: Any, target: Target) -> TinyLoraHyper:
    index = target.common[target.name]
    n = len(target.common)
    groups = max(1, round(n * (1.0 - config.weight_tying)))
    size = max(1, n // groups)
    w = target.module.weight
    return TinyLoraHyper(
        r=min(config.r, w.shape[0], w.shape[1]),
        u=config.u,
        index=index,
        group=min(index // size, groups - 1),
        groups=groups,
        seed=config.projection_seed + index,
        dropout=float(config.tinylora_dropout),
        init=config.init_weights,
        bound=float(config.init_v_bound),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return ()


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    return {}


def init_v(spec: Spec, generator: torch.Generator | None) -> Params:
    """Every group's v, in group order (PEFT draws them as it meets each group's first layer; nothing else draws
    in between): zeros, U(-bound, bound) or uninitialised."""
    h = spec.hyper
    out = {}
    for g in range(h.groups):
        v = torch.empty(h.u)
        if h.init is True:
            v = torch.zeros(h.u)
        elif h.init == "uniform":
            v = torch.nn.init.uniform_(v, -h.bound, h.bound, generator=generator)
        out[v_name(g)] = v
    return out


def make_frozen(
    spec: Spec, module: nn.Module, generator: torch.Generator | None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's `_init_svd` (float32 SVD of W in nn.Linear layout, factors in W's dtype) and `_init_projection`."""
    weight = module.get_parameter("weight").detach()
    weight = weight.T if spec.kind is LayerKind.CONV1D_HF else weight
    dtype, r = weight.dtype, spec.hyper.r
    if weight.device.type == "meta":
        return {
            A: torch.empty(r, weight.shape[1], dtype=dtype, device="meta"),
            B: torch.empty(weight.shape[0], r, dtype=dtype, device="meta"),
            P: torch.empty(spec.hyper.u, r, r, dtype=dtype, device="meta"),
        }
    u_, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    sqrt_s = torch.sqrt(s[:r].to(dtype))
    a = (sqrt_s.unsqueeze(1) * vh[:r, :].to(dtype)).contiguous()
    b = (u_[:, :r].to(dtype) * sqrt_s.unsqueeze(0)).contiguous()
    gen = torch.Generator().manual_seed(spec.hyper.seed)
    p = torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(spec.hyper.u, r, r), generator=gen)
    # PEFT moves P (drawn in float32) to the weight's dtype with the layer's other buffers: rounded on a half model
    return {A: a, B: b, P: p.to(weight.device, dtype)}


def _r_matrix(spec: Spec, params: Params) -> torch.Tensor:
    v = params[v_name(spec.hyper.group)]
    return torch.einsum("i,ijk->jk", v, params[P].to(device=v.device, dtype=v.dtype))


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's forward and dtypes (linear: in A's dtype, back to x's; embedding: in the output's dtype)."""
    assert result is not None
    a, b, r = params[A], params[B], _r_matrix(spec, params)
    if spec.kind is LayerKind.EMBEDDING:
        dtype = result.dtype
        a, b, r = a.to(dtype), b.to(dtype), r.to(dtype)
        after_b = ctx.dropout(F.embedding(x, b), spec.hyper.dropout)
        return result + (after_b @ r) @ a
    h = F.linear(ctx.dropout(x, spec.hyper.dropout).to(a.dtype), a)
    return (result + F.linear(F.linear(h, r), b)).to(x.dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """B R A in the base weight's layout; half-precision factors on CPU multiply in float32 and come back."""
    a = params[A]
    dtype = a.dtype
    b, r = params[B].to(a.device, dtype), _r_matrix(spec, params).to(a.device, dtype)
    half = a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if half:
        a, b, r = a.float(), b.float(), r.float()
    delta = b @ r @ a
    delta = delta.T if spec.kind is LayerKind.CONV1D_HF else delta
    return delta.to(dtype) if half else delta


TINYLORA = register(
    Method(
        name="tinylora",
        config=TinyLoraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        kinds=frozenset({LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.EMBEDDING}),
        shared=SharedTensors(common_hyper=_indices, frozen_params=lambda spec: (), make=lambda spec: {}),
        shared_trainable=SharedParams(init=init_v),
        layer_frozen=LayerFrozen(names=(A, B, P), make=make_frozen, autocast=True),
        keys=KeyRules(param_prefix="tinylora_", unsuffixed=frozenset({A, B, P})),
    )
)
