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
from dataclasses import dataclass
from typing import Any

import torch

from ..configs import LoKrConfig
from . import lycoris
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, MergeHooks, Method, Params, Target
from .lora import kaiming_uniform
from .lycoris import LycorisHyper


@dataclass(frozen=True)
class LokrHyper(LycorisHyper):
    factors: tuple[int, int, int, int]  # (a, b, c, d): out = a * b, in = c * d
    rank_dropout_scale: bool
    use_w1: bool  # w1 full (else lokr_w1_a @ lokr_w1_b)
    use_w2: bool  # w2 full (else low-rank or CP)


Spec = LayerSpec[LokrHyper]

_NAMES = (
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
)  # saved without `.weight`


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


def hyper(config: Any, target: Target) -> LokrHyper:
    """LyCORIS' hyper-parameters plus the factor shapes and which factors are low-rank."""
    common = lycoris.lycoris_hyper(config, target)
    r, module = common.r, target.module
    conv = target.kind is LayerKind.CONV
    in_dim = module.weight.shape[1] if conv else module.in_features
    out_dim = module.out_channels if conv else module.out_features
    (a, b), (c, d) = factorization(out_dim, config.decompose_factor), factorization(in_dim, config.decompose_factor)
    return LokrHyper(
        **vars(common),
        factors=(a, b, c, d),
        rank_dropout_scale=bool(config.rank_dropout_scale),
        use_w1=not (config.decompose_both and r < max(a, c) / 2),
        use_w2=not (r < max(b, d) / 2),
    )


def _shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    r, (a, b, c, d), k = spec.hyper.r, spec.hyper.factors, lycoris.kernel(spec)
    shapes: dict[str, tuple[int, ...]] = (
        {"lokr_w1": (a, c)} if spec.hyper.use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    )
    if spec.hyper.use_w2:
        shapes["lokr_w2"] = (b, d, *k)
    elif spec.hyper.effective_conv:
        shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *k) if len(k) == 2 else (r, r, k[0], 1))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(k)))
    return shapes


def param_names(spec: Spec) -> tuple[str, ...]:
    return tuple(_shapes(spec))


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    mode = spec.hyper.init
    zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(mode, ())
    return {
        name: torch.zeros(shape) if name in zero else kaiming_uniform(shape, generator)
        for name, shape in _shapes(spec).items()
    }


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
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
    return (torch.kron(w1, w2.contiguous()) * spec.hyper.scaling).reshape(spec.weight_shape)


LOKR = register(
    Method(
        name="lokr",
        config=LoKrConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=lycoris.forward_with(delta_weight, lambda spec: spec.hyper.rank_dropout_scale),
        delta_weight=delta_weight,
        merge=MergeHooks(grouped_conv=True),  # the delta is a full grouped kernel: PEFT merges it
        keys=KeyRules(param_prefix="lokr_", unsuffixed=frozenset(_NAMES)),
        mixed_compatible=True,
    )
)
