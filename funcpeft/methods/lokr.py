"""LoKr (`LoKrConfig`): `dW = kron(w1, w2) * alpha / r`, reshaped to the base weight.

out = a*b and in = c*d are split by PEFT's `factorization` (near sqrt, or `decompose_factor`):
  w1 (a, c): `lokr_w1`, or `lokr_w1_a` (a, r) @ `lokr_w1_b` (r, c) when decompose_both and r < max(a, c)/2
  w2 (b, d): `lokr_w2` (convs: (b, d, *kernel)) when r >= max(b, d)/2, else `lokr_w2_a` (b, r) @
     `lokr_w2_b` (r, d * prod(kernel)), or with `effective_conv` the CP form `lokr_t2` (r, r, k1, k2 or 1),
     `lokr_w2_a` (r, b), `lokr_w2_b` (r, d)
Init (init_weights): True: w1 (or w1_a) = 0, the rest kaiming-uniform; False: all kaiming-uniform;
"lycoris": w2 (or w2_b) = 0, the rest kaiming-uniform.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch

from . import lycoris
from .base import LayerSpec, register
from .lora import kaiming_uniform

_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # saved without `.weight`


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS') split of `dimension` into m <= n with m * n = dimension."""
    if factor > 0 and (dimension % factor) == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def hyper(config: Any, name: str, module: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    """LyCORIS' hyper-parameters plus the factor shapes and which factors are low-rank."""
    common = dict(lycoris.hyper(config, name, module, kind))
    r = common["r"]
    in_dim = module.weight.shape[1] if kind == "conv" else module.in_features
    out_dim = module.out_channels if kind == "conv" else module.out_features
    (a, b), (c, d) = factorization(out_dim, config.decompose_factor), factorization(in_dim, config.decompose_factor)
    use_w1 = not (config.decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    return (*common.items(), ("factors", (a, b, c, d)), ("rank_dropout_scale", bool(config.rank_dropout_scale)),
            ("use_w1", use_w1), ("use_w2", use_w2))


def _shapes(spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    r, (a, b, c, d), k = spec.h("r"), spec.h("factors"), lycoris.kernel(spec)
    shapes: dict[str, tuple[int, ...]] = {"lokr_w1": (a, c)} if spec.h("use_w1") else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    if spec.h("use_w2"):
        shapes["lokr_w2"] = (b, d, *k)
    elif spec.h("effective_conv"):
        shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *k) if len(k) == 2 else (r, r, k[0], 1))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(k)))
    return shapes


def param_names(spec: LayerSpec) -> tuple[str, ...]:
    return tuple(_shapes(spec))


def init(spec: LayerSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    mode = spec.h("init_weights")
    zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(mode, ())
    return {
        name: torch.zeros(shape) if name in zero else kaiming_uniform(shape, generator)
        for name, shape in _shapes(spec).items()
    }


def delta_weight(spec: LayerSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(w1, w2) * alpha / r in W's shape (PEFT's `make_kron`)."""
    p = params
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        # einsum may give a size-1 dim an odd stride, which torch.kron cannot view (PEFT crashes there on Conv1d)
        w2 = w2.reshape(-1).view(w2.shape)
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return (torch.kron(w1, w2.contiguous()) * spec.h("scaling")).reshape(spec.weight_shape)


LOKR = register(SimpleNamespace(
    name="lokr", peft_type="LOKR", peft_key_prefix="lokr_", peft_unsuffixed=_NAMES, accepts=lambda config: True, hyper=hyper, param_names=param_names, init=init,
    forward=lycoris.forward_with(delta_weight, lambda spec: spec.h("rank_dropout_scale")), delta_weight=delta_weight,
))
