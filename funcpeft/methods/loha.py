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
from types import SimpleNamespace

import torch

from . import lycoris
from .base import LayerSpec, register
from .lora import kaiming_uniform

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")  # saved without `.weight`


def param_names(spec: LayerSpec) -> tuple[str, ...]:
    return _NAMES if spec.h("effective_conv") else _NAMES[:4]


def _shapes(spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    r, out, in_ = spec.h("r"), spec.out_features, lycoris.conv_in(spec)
    k = lycoris.kernel(spec)
    if spec.h("effective_conv"):
        t = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
        return {"hada_w1_a": (r, out), "hada_w1_b": (r, in_), "hada_w2_a": (r, out), "hada_w2_b": (r, in_),
                "hada_t1": t, "hada_t2": t}
    flat_in = in_ * math.prod(k)
    return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat_in), "hada_w2_a": (out, r), "hada_w2_b": (r, flat_in)}


def init(spec: LayerSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    zero = "hada_w2_b" if spec.h("init_weights") else None
    return {
        name: torch.zeros(shape) if name == zero else kaiming_uniform(shape, generator)
        for name, shape in _shapes(spec).items()
    }


def delta_weight(spec: LayerSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The Hadamard product of the two low-rank (or CP) factors, times alpha / r, in W's shape."""
    p = params
    scale = spec.h("scaling")
    if spec.h("effective_conv"):
        one = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
        two = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        w = one * two * scale
    else:
        w = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])) * scale
    return w.reshape(spec.weight_shape)


LOHA = register(SimpleNamespace(
    name="loha", peft_type="LOHA", peft_key_prefix="hada_", peft_unsuffixed=_NAMES, accepts=lambda config: True, hyper=lycoris.hyper, param_names=param_names,
    init=init, forward=lycoris.forward_with(delta_weight, lambda spec: True), delta_weight=delta_weight,
))
