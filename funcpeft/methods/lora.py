"""LoRA: `y = base(x) + s * B(A(dropout(x)))`, with PEFT's parameter layout, init and arithmetic order.

Shapes (nn.Linear orientation even for GPT-2 Conv1D):
  linear / conv1d_hf:  lora_A (r, in), lora_B (out, r)
  embedding:           lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r)
  conv (N-d):          lora_A (r, in, *kernel), lora_B (out, r // groups, 1, ..., 1)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import init_mode
from ..configs import LoraConfig
from . import lora_init
from ._layers import conv_op, embed
from ._patterns import rank_and_alpha
from ._registry import register
from .base import LayerKind, LayerSpec, Method, OpContext, Params, Target


@dataclass(frozen=True)
class LoraHyper:
    r: int
    scaling: float  # alpha / r, or alpha / sqrt(r) with use_rslora
    dropout: float  # on the input of lora_A (never on embeddings, like PEFT)
    init: bool | str  # init_lora_weights
    init_args: tuple[Any, ...] = ()  # the init's own settings (funcpeft.methods.lora_init.init_args)


Spec = LayerSpec[LoraHyper]


def hyper(config: Any, target: Target) -> LoraHyper:
    """LoRA's (and DoRA's) hyper-parameters for one module: rank/alpha patterns, rsLoRA scaling."""
    r, alpha = rank_and_alpha(config, target.name)
    if target.kind is LayerKind.CONV and target.module.groups > 1:
        groups = target.module.groups
        warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.", stacklevel=2)
        if r % groups != 0:
            raise ValueError(
                f"Targeting a {type(target.module).__name__} ({target.name!r}) with groups={groups} and rank {r}. "
                "Currently, support is limited to conv layers where the rank is divisible by groups. Either choose a "
                "different rank or do not target this specific layer."
            )
    lora_init.check_target(config.init_lora_weights, r, target)
    scaling = alpha / (r**0.5) if config.use_rslora else alpha / r
    dropout = 0.0 if target.kind is LayerKind.EMBEDDING else float(config.lora_dropout)
    init = config.init_lora_weights
    return LoraHyper(r=r, scaling=scaling, dropout=dropout, init=init, init_args=lora_init.init_args(config))


def param_names(spec: LayerSpec[Any]) -> tuple[str, ...]:
    if spec.kind is LayerKind.EMBEDDING:
        return ("lora_embedding_A", "lora_embedding_B")
    return ("lora_A", "lora_B")


def _shapes(spec: Spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    r = spec.hyper.r
    if spec.kind is LayerKind.CONV:
        kernel = spec.weight_shape[2:]
        return (r, spec.in_features, *kernel), (spec.out_features, r // spec.conv.groups, *([1] * len(kernel)))
    return (r, spec.in_features), (spec.out_features, r)


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)), the default init of nn.Linear/nn.ConvNd: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    t = torch.empty(shape)
    return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """Fresh float32 CPU parameters following PEFT's `init_lora_weights` (see funcpeft.methods.lora_init for the
    inits beyond True, False and "gaussian"; those that read the base weight finish in `init_from_weight`)."""
    shape_a, shape_b = _shapes(spec)
    mode = spec.hyper.init
    if spec.kind in (LayerKind.LINEAR, LayerKind.CONV1D_HF) and init_mode(mode) in lora_init.WEIGHT_INITS:
        return lora_init.init(spec, generator)
    names = param_names(spec)
    if spec.kind is LayerKind.EMBEDDING:
        a = torch.randn(shape_a, generator=generator) if mode is False else torch.zeros(shape_a)
        b = torch.randn(shape_b, generator=generator)
        return dict(zip(names, (a, b)))
    if mode is False:
        a, b = kaiming_uniform(shape_a, generator), kaiming_uniform(shape_b, generator)
    elif init_mode(mode) == "gaussian":
        a, b = torch.randn(shape_a, generator=generator) / spec.hyper.r, torch.zeros(shape_b)
    else:
        a, b = kaiming_uniform(shape_a, generator), torch.zeros(shape_b)
    return dict(zip(names, (a, b)))


def embedding_term(spec: Spec, params: Params, ids: torch.Tensor) -> torch.Tensor:
    """`B(A[ids])`, unscaled: the embedding LoRA's term for token ids (no dropout, no input cast, like PEFT)."""
    return embed(spec, ids, params["lora_embedding_A"].T) @ params["lora_embedding_B"].T


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + s * B(A(dropout(x)))` in PEFT's order and dtypes; x is the base layer's input."""
    assert result is not None
    s = spec.hyper.scaling
    if spec.kind is LayerKind.EMBEDDING:
        return result + embedding_term(spec, params, x) * s
    a, b = params["lora_A"], params["lora_B"]
    out_dtype = result.dtype
    x = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    delta = low_rank(spec, a, b, x) * s  # rebinding frees the unscaled delta before the add: PEFT's peak memory
    return (result + delta).to(out_dtype)


def forward_per_example(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor | None:
    """`forward` with a different adapter per example (funcpeft.routing), as batched matmuls.

    params: lora_A (B, r, in), lora_B (B, out, r); x (B, ..., in); result (B, ..., out). None for the layer
    kinds left to the generic per-example path (vmap of `forward`).
    """
    if spec.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        return None
    assert result is not None
    a, b = params["lora_A"], params["lora_B"]
    x = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    h = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2))
    out = torch.baddbmm(result.reshape(h.shape[0], h.shape[1], -1).to(a.dtype), h, b.transpose(1, 2), alpha=spec.hyper.scaling)
    return out.reshape(result.shape).to(result.dtype)


def low_rank(spec: Spec, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`B(A(x))` for a linear / Conv1D / conv layer (PEFT's lora_A, lora_B modules), unscaled."""
    if spec.kind is LayerKind.CONV:
        conv = conv_op(spec)
        # PEFT's lora_A conv copies kernel, stride and padding but not dilation; lora_B is 1x1 with the groups
        return conv(conv(x, a, None, spec.conv.stride, spec.conv.padding), b, None, 1, 0, 1, spec.conv.groups)
    return F.linear(F.linear(x, a), b)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """s * B @ A in the base weight's layout (transposed for Conv1D and Embedding; conv kernels composed)."""
    s = spec.hyper.scaling
    if spec.kind is LayerKind.EMBEDDING:
        return (params["lora_embedding_B"] @ params["lora_embedding_A"]).T * s
    a, b = params["lora_A"], params["lora_B"]
    if spec.kind is LayerKind.CONV:
        if all(k == 1 for k in spec.weight_shape[2:]):
            w = (b.flatten(1) @ a.flatten(1)).reshape(spec.weight_shape)
        else:
            w = conv_op(spec)(a.transpose(0, 1), b).transpose(0, 1)
        return w * s
    w = b @ a
    return (w.T if spec.kind is LayerKind.CONV1D_HF else w) * s


LORA = register(
    Method(
        name="lora",
        config=LoraConfig,
        accepts=lambda config: not config.use_dora,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        forward_per_example=forward_per_example,
        init_from_weight=lora_init.init_from_weight,
        mixed_compatible=True,
    )
)
