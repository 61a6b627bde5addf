"""MiSS (`MissConfig`): one trainable shard shared by the column blocks of W (nn.Linear only, like PEFT).

Two registered methods share the config (PEFT switches on `init_weights` inside one layer class):

"miss" (init_weights True / False / "mini"), additive, nothing weight-sized per call:
    y = base(x) + sum_j x_j @ B          x_j = the j-th r-sized block of x (zero-padded to a multiple of r)
    miss_block B: (r, out); "mini": (r, mini_r), repeated out / mini_r times along out.
    dW[o, i] = B[i % r, o]               (merging adds B to every r-column block of W)

"miss_bat" (init_weights="bat"), not additive: each (r, r) block W_ij of W becomes W_ij + W_ij @ B_i + B_i,
    miss_block B: (out / r, r, r). Like PEFT, the forward builds this adapted weight on every call (the maths
    needs it: the update depends on W) and runs `F.linear` with it; unmerging inverts (I + B_i) in float32.
    miss_dropout does not apply to "bat" (PEFT's bat path has no dropout).

Quantised layers (bitsandbytes 4-bit / 8-bit, torchao, HQQ; PEFT's generic quantisation backend): "miss" / "mini"
add their term to the layer's own output; "bat" builds its weight from the dequantised one
(`OpContext.float_weight`, per call, as PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._quant import QUANT_BACKENDS
from ..configs.miss import MissConfig
from ._layers import UPCAST_DTYPES
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
from .lora import kaiming_uniform

NAME = "miss_block"


@dataclass(frozen=True)
class MissHyper:
    r: int
    variant: str  # "miss" (init_weights True / False), "mini" or "bat"
    random_init: bool  # init_weights=False: a kaiming-uniform block instead of zeros
    mini_r: int
    dropout: float  # miss_dropout (not used by "bat", like PEFT)


Spec = LayerSpec[MissHyper]


def hyper(config: Any, target: Target) -> MissHyper:
    """PEFT's checks in `MissLayer.update_layer`, naming the module."""
    if target.kind not in (LayerKind.LINEAR, LayerKind.QUANT_LINEAR):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only "
            "`torch.nn.Linear` (optionally quantized) is supported."
        )
    out_f, in_f = target.module.out_features, target.module.in_features  # a 4-bit weight's shape is packed data
    r, init = config.r, config.init_weights
    where = f" (module {target.name!r}: in_features={in_f}, out_features={out_f})"
    if r > in_f:
        raise ValueError(f"`r` ({r}) must be less than or equal to in_features ({in_f})" + where)
    if init == "bat" and (in_f % r != 0 or out_f % r != 0):
        raise ValueError(f"The weight matrix must be fully divisible into [r, r] blocks (r={r})" + where)
    if init == "mini" and out_f % config.mini_r != 0:
        raise ValueError(
            f"mini_r is divided along the out_features dimension: out_features must be divisible by mini_r "
            f"({config.mini_r})" + where
        )
    variant = init if init in ("bat", "mini") else "miss"
    return MissHyper(
        r=r, variant=variant, random_init=init is False, mini_r=int(config.mini_r), dropout=float(config.miss_dropout)
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (NAME,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's block: zeros, or kaiming-uniform (a=sqrt(5), fan_in = out) for init_weights=False."""
    r, h = spec.hyper.r, spec.hyper
    if h.variant == "bat":
        return {NAME: torch.zeros(spec.out_features // r, r, r)}
    if h.variant == "mini":
        return {NAME: torch.zeros(r, h.mini_r)}
    return {
        NAME: kaiming_uniform((r, spec.out_features), generator) if h.random_init else torch.zeros(r, spec.out_features)
    }


def _block(spec: Spec, params: Params) -> torch.Tensor:
    """B as (r, out): the "mini" block repeated along out (PEFT's `repeat`)."""
    block = params[NAME]
    return block.repeat(1, spec.out_features // spec.hyper.mini_r) if spec.hyper.variant == "mini" else block


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + (sum of x's r-blocks) @ B`, x zero-padded to a multiple of r; PEFT's casts."""
    assert result is not None
    previous_dtype = x.dtype
    block = _block(spec, params)
    r = block.shape[0]
    if x.shape[-1] % r != 0:
        x = F.pad(x, (0, (r - x.shape[-1] % r) % r))
    x = ctx.dropout(x.to(block.dtype), spec.hyper.dropout)
    return (result + torch.sum(x.reshape(*x.shape[:-1], x.shape[-1] // r, r), dim=-2) @ block).to(previous_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """dW (out, in): B^T tiled over the r-column blocks of W (the last, partial block gets B's first rows)."""
    block = _block(spec, params)
    r = block.shape[0]
    return block.T.repeat(1, -(-spec.in_features // r))[:, : spec.in_features]


# -- "bat" ---------------------------------------------------------------------------------------------------
def _bat(block: torch.Tensor, weight: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """PEFT's `get_delta_weight`: per (r, r) block, `W @ B + B` (reverse: `(W - B) @ (I + B)^-1`), in W's shape.

    On CPU, fp16/bf16 blocks are computed in float32 and cast back (PEFT: slow half matmuls on CPU).
    """
    dtype = block.dtype
    cast = block.device.type == "cpu" and dtype in UPCAST_DTYPES
    if cast:
        block = block.float()
    w = weight.to(block.dtype)
    r = block.shape[-1]
    blocks = w.reshape(w.shape[0] // r, r, w.shape[1] // r, r).permute(2, 0, 1, 3)
    if reverse:
        eye = torch.eye(r, device=block.device, dtype=torch.float32)
        out = (blocks - block) @ torch.inverse(eye + block.float()).to(block.dtype)
    else:
        out = blocks @ block + block
    out = out.permute(1, 2, 0, 3).reshape(w.shape)
    return out.to(dtype) if cast else out


def bat_forward(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor:
    """`F.linear(x, W + bat_delta(W), bias)` with the adapted weight built here (as PEFT does on every call)."""
    if ctx.inner_op is not ctx.base_op:
        raise NotImplementedError(
            "MiSS with init_weights='bat' rebuilds the layer's weight from the base weight; it cannot be stacked on "
            "another adapter active on the same layer (merge the other adapter first)."
        )
    previous_dtype = x.dtype
    base = ctx.float_weight()  # a quantised layer's weight dequantised (PEFT: `get_base_weight().clone()`)
    weight = base + _bat(params[NAME], base)
    bias = ctx.bias.to(weight.dtype) if ctx.bias is not None else None
    return F.linear(x.to(weight.dtype), weight, bias).to(previous_dtype)


def bat_merge(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """W' = W + (per block) W @ B + B (PEFT's `weight += get_delta_weight(weight)`)."""
    return (weight + _bat(params[NAME], weight)).to(weight.dtype)


def bat_unmerge(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """W = (W' - B) @ (I + B)^-1 per block (PEFT's reverse merge; exact up to the inverse's rounding)."""
    return _bat(params[NAME], weight, reverse=True).to(weight.dtype)


_KINDS = WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR}
_KEYS = KeyRules(param_prefix="miss_", unsuffixed=frozenset({NAME}))

MISS = register(
    Method(
        name="miss",
        config=MissConfig,
        accepts=lambda config: config.init_weights != "bat",
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        merge=MergeHooks(rounding_warning=False),  # PEFT's generic quantisation backend: no warning
        keys=_KEYS,
        kinds=_KINDS,
        quant_backends=QUANT_BACKENDS,  # PEFT's generic backend: bnb, torchao, HQQ
        torchao_needs_requantiser=True,
    )
)

MISS_BAT = register(
    Method(
        name="miss_bat",
        config=MissConfig,
        accepts=lambda config: config.init_weights == "bat",
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=bat_forward,
        uses_result=lambda spec: False,
        merge=MergeHooks(weight=bat_merge, unweight=bat_unmerge, rounding_warning=False),
        keys=_KEYS,
        kinds=_KINDS,
        quant_backends=QUANT_BACKENDS,  # PEFT's generic backend: bnb, torchao, HQQ
        torchao_needs_requantiser=True,
    )
)
