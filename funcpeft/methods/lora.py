"""LoRA: `y = base(x) + s * B(A(dropout(x)))`, with PEFT's parameter layout, init and arithmetic order.

Shapes (nn.Linear orientation even for GPT-2 Conv1D):
  linear / conv1d_hf:  lora_A (r, in), lora_B (out, r)
  embedding:           lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r)
  conv (N-d):          lora_A (r, in, *kernel), lora_B (out, r // groups, 1, ..., 1)
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ..targeting import rank_and_alpha
from .base import LayerSpec, OpContext, register

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def param_names(spec: LayerSpec) -> tuple[str, ...]:
    if spec.kind == "embedding":
        return ("lora_embedding_A", "lora_embedding_B")
    return ("lora_A", "lora_B")


def _shapes(spec: LayerSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    r = spec.h("r")
    if spec.kind == "conv":
        kernel = spec.weight_shape[2:]
        groups = spec.g("groups")
        return (r, spec.in_features, *kernel), (spec.out_features, r // groups, *([1] * len(kernel)))
    if spec.kind == "embedding":
        return (r, spec.in_features), (spec.out_features, r)
    return (r, spec.in_features), (spec.out_features, r)


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)), the default init of nn.Linear/nn.ConvNd: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    t = torch.empty(shape)
    return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def init(spec: LayerSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Fresh float32 CPU parameters following PEFT's `init_lora_weights` (True, False or "gaussian")."""
    shape_a, shape_b = _shapes(spec)
    mode = spec.h("init_lora_weights")
    names = param_names(spec)
    if spec.kind == "embedding":
        if mode is False:
            a = torch.randn(shape_a, generator=generator)
        else:
            a = torch.zeros(shape_a)
        b = torch.randn(shape_b, generator=generator)
        return dict(zip(names, (a, b)))
    if mode is False:
        a, b = kaiming_uniform(shape_a, generator), kaiming_uniform(shape_b, generator)
    elif mode == "gaussian":
        a, b = torch.randn(shape_a, generator=generator) / spec.h("r"), torch.zeros(shape_b)
    else:
        a, b = kaiming_uniform(shape_a, generator), torch.zeros(shape_b)
    return dict(zip(names, (a, b)))


def forward(
    spec: LayerSpec, params: dict[str, torch.Tensor], x: torch.Tensor, result: torch.Tensor, ctx: OpContext
) -> torch.Tensor:
    """`result + s * B(A(dropout(x)))` in PEFT's order and dtypes; x is the base layer's input."""
    s = spec.h("scaling")
    if spec.kind == "embedding":  # no dropout and no input cast, like PEFT
        a, b = params["lora_embedding_A"], params["lora_embedding_B"]
        g = dict(spec.geometry)
        after_a = F.embedding(x, a.T, g["padding_idx"], g["max_norm"], g["norm_type"], g["scale_grad_by_freq"], g["sparse"])
        return result + (after_a @ b.T) * s
    a, b = params["lora_A"], params["lora_B"]
    out_dtype = result.dtype
    x = ctx.dropout(x.to(a.dtype), spec.h("lora_dropout"))
    delta = low_rank(spec, a, b, x) * s  # rebinding frees the unscaled delta before the add: PEFT's peak memory
    return (result + delta).to(out_dtype)


def forward_per_example(
    spec: LayerSpec, params: dict[str, torch.Tensor], x: torch.Tensor, result: torch.Tensor, ctx: OpContext
) -> torch.Tensor | None:
    """`forward` with a different adapter per example (funcpeft.routing), as batched matmuls.

    params: lora_A (B, r, in), lora_B (B, out, r); x (B, ..., in); result (B, ..., out). None for the layer
    kinds left to the generic per-example path (vmap of `forward`).
    """
    if spec.kind not in ("linear", "conv1d_hf"):
        return None
    a, b = params["lora_A"], params["lora_B"]
    x = ctx.dropout(x.to(a.dtype), spec.h("lora_dropout"))
    h = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2))
    out = torch.baddbmm(result.reshape(h.shape[0], h.shape[1], -1).to(a.dtype), h, b.transpose(1, 2), alpha=spec.h("scaling"))
    return out.reshape(result.shape).to(result.dtype)


def low_rank(spec: LayerSpec, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`B(A(x))` for a linear / Conv1D / conv layer (PEFT's lora_A, lora_B modules), unscaled."""
    if spec.kind == "conv":
        conv = _CONV[len(spec.weight_shape)]
        return conv(conv(x, a, None, spec.g("stride"), spec.g("padding")), b, None, 1, 0, 1, spec.g("groups"))
    return F.linear(F.linear(x, a), b)


def delta_weight(spec: LayerSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """s * B @ A in the base weight's layout (transposed for Conv1D and Embedding; conv kernels composed)."""
    s = spec.h("scaling")
    if spec.kind == "embedding":
        return (params["lora_embedding_B"] @ params["lora_embedding_A"]).T * s
    a, b = params["lora_A"], params["lora_B"]
    if spec.kind == "conv":
        if all(k == 1 for k in spec.weight_shape[2:]):
            w = (b.flatten(1) @ a.flatten(1)).reshape(spec.weight_shape)
        else:
            conv = _CONV[len(spec.weight_shape)]
            w = conv(a.transpose(0, 1), b).transpose(0, 1)
        return w * s
    w = b @ a
    return (w.T if spec.kind == "conv1d_hf" else w) * s


def hyper(config: Any, name: str, module: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    """LayerSpec hyper-parameters of LoRA (and DoRA) for module `name`: rank/alpha patterns, rsLoRA scaling."""
    r, alpha = rank_and_alpha(config, name)
    if kind == "conv" and r % module.groups != 0:
        raise ValueError(f"LoRA on {name!r}: rank {r} must be divisible by the conv's groups={module.groups}")
    scaling = alpha / (r**0.5) if config.use_rslora else alpha / r
    return (
        ("init_lora_weights", config.init_lora_weights),
        ("lora_dropout", 0.0 if kind == "embedding" else float(config.lora_dropout)),
        ("r", r),
        ("scaling", scaling),
    )


LORA = register(SimpleNamespace(
    name="lora", peft_type="LORA", accepts=lambda config: not config.use_dora, hyper=hyper,
    param_names=param_names, init=init, forward=forward, delta_weight=delta_weight,
    forward_per_example=forward_per_example,
))
