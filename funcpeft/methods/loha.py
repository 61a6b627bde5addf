"""LoHa (`LoHaConfig`): `dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r`, reshaped to the base weight.

Shapes (nn.Linear (out, in); convs use in' = in/groups * prod(kernel) unless `effective_conv`):
  hada_w1_a, hada_w2_a (out, r);  hada_w1_b, hada_w2_b (r, in')
  effective conv (use_effective_conv2d, kernel > 1): hada_t1, hada_t2 (r, r, k1, k2 or 1),
  hada_w1_a, hada_w2_a (r, out), hada_w1_b, hada_w2_b (r, in/groups)
Init (init_weights=True): w2_b = 0, the rest kaiming-uniform, so the adapter starts as a no-op;
init_weights=False: all kaiming-uniform.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..configs import LoHaConfig
from . import lycoris
from ._layers import SavesInputs
from ._registry import register
from .base import KeyRules, LayerSpec, MergeHooks, Method, Params
from .lora import kaiming_uniform
from .lycoris import LycorisHyper

Spec = LayerSpec[LycorisHyper]

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")  # saved without `.weight`


def param_names(spec: Spec) -> tuple[str, ...]:
    return _NAMES if spec.hyper.effective_conv else _NAMES[:4]


def _shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    r, out, in_ = spec.hyper.r, spec.out_features, lycoris.conv_in(spec)
    k = lycoris.kernel(spec)
    if spec.hyper.effective_conv:
        t = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
        return {
            "hada_w1_a": (r, out),
            "hada_w1_b": (r, in_),
            "hada_w2_a": (r, out),
            "hada_w2_b": (r, in_),
            "hada_t1": t,
            "hada_t2": t,
        }
    flat_in = in_ * math.prod(k)
    return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat_in), "hada_w2_a": (out, r), "hada_w2_b": (r, flat_in)}


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    zero = "hada_w2_b" if spec.hyper.init else None
    return {
        name: torch.zeros(shape) if name == zero else kaiming_uniform(shape, generator)
        for name, shape in _shapes(spec).items()
    }


class _Hadamard(SavesInputs):
    """`(w1a @ w1b) * (w2a @ w2b) * scale` saving only the four factors (PEFT's `HadaWeight`).

    Plain autograd would keep both (out, in) products alive until backward (1.67x PEFT's training peak on the
    benchmark Llama); recomputing them in backward matches PEFT's memory and arithmetic.
    """

    @staticmethod
    def forward(
        w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g = grad_out * ctx.consts[0]
        temp = g * (w2a @ w2b)
        grad_w1a, grad_w1b = temp @ w1b.T, w1a.T @ temp
        temp = g * (w1a @ w1b)
        return grad_w1a, grad_w1b, temp @ w2b.T, w2a.T @ temp, None

    @staticmethod
    def jvp(ctx: Any, t1a: Any, t1b: Any, t2a: Any, t2b: Any, _: Any) -> torch.Tensor:
        w1a, w1b, w2a, w2b = ctx.saved_tensors

        def tangent(a: torch.Tensor, b: torch.Tensor, ta: Any, tb: Any) -> torch.Tensor | None:
            parts = ([ta @ b] if ta is not None else []) + ([a @ tb] if tb is not None else [])
            return sum(parts[1:], parts[0]) if parts else None

        d1, d2 = tangent(w1a, w1b, t1a, t1b), tangent(w2a, w2b, t2a, t2b)
        out = torch.zeros((w1a.shape[0], w1b.shape[1]), dtype=w1a.dtype, device=w1a.device)
        if d1 is not None:
            out = out + d1 * (w2a @ w2b)
        if d2 is not None:
            out = out + (w1a @ w1b) * d2
        return out * ctx.consts[0]


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """The Hadamard product of the two low-rank (or CP) factors, times alpha / r, in W's shape."""
    p = params
    scale = spec.hyper.scaling
    if spec.hyper.effective_conv:
        one = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
        two = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        w = one * two * scale
    else:
        w = _Hadamard.run(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], scale)
    return w.reshape(spec.weight_shape)


LOHA = register(
    Method(
        name="loha",
        config=LoHaConfig,
        hyper=lycoris.lycoris_hyper,
        param_names=param_names,
        init=init,
        forward=lycoris.forward_with(delta_weight, lambda spec: True),
        delta_weight=delta_weight,
        merge=MergeHooks(grouped_conv=True),  # the delta is a full grouped kernel: PEFT merges it
        keys=KeyRules(param_prefix="hada_", unsuffixed=frozenset(_NAMES)),
        mixed_compatible=True,
    )
)
