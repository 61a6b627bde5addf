"""GLoRA (`GloraConfig`): generalized LoRA on a plain nn.Linear (peft/tuners/glora).

    W' = W0 + W0 * A + B          b' = b0 + b0 * D + E + W0 @ C          y = x W'^T + b'

Each path is a small parameter set of its own (PEFT's GloraPath modules; leaves named as PEFT's, e.g.
`glora_A.Xd`):
  "lora"      Xd (rows, r), Xu (r, cols): the path is Xd @ Xu   A, B: (out, in)   C: Xd (in, r), Xu (r, 1)
  "vector"    X (out, 1) for A / B, (in, 1) for C, (out,) for D / E
  "constant"  X (1,): the scalar X[0]
  "none"      nothing trained: PEFT keeps (and saves) a zero buffer `glora_<P>.zeros` of the path's shape, a
              frozen per-layer tensor here (`LayerFrozen`, in `base`); C, D and E are "none" on a layer without bias.
Init (PEFT's draws, in path order A, B, C, D, E): Xu kaiming-uniform(a=sqrt(5)) always, Xd zeros (init_weights)
or kaiming-uniform; vectors zeros or kaiming-uniform; constants zeros or N(0, 0.02).

The forward adds `x (W0 * A + B)^T + (b0 * D + E + W0 @ C)` to the layer below's output. `W0 * A` is a Hadamard
product with the base weight, so each call builds one weight-sized (out, in) tensor, as PEFT's forward does (it
builds W0 + W0 * A + B). Paths set to "none" are skipped (PEFT adds their zeros). Merging is not additive: W' as
above against the layer's weight before the first merged adapter (PEFT re-merges every adapter against W0), and the
bias likewise (`MergeHooks.bias_from_base`); unmerging needs that original base (`unmerge(..., base=)`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import GloraConfig
from ._registry import register
from .base import (
    KeyRules,
    LayerFrozen,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
    UnsupportedLayerError,
)

PATHS = ("A", "B", "C", "D", "E")
ZEROS = tuple(f"glora_{p}.zeros" for p in PATHS)
_LEAVES = {"lora": ("Xd", "Xu"), "vector": ("X",), "constant": ("X",), "none": ()}


@dataclass(frozen=True)
class GloraHyper:
    r: int
    kinds: tuple[str, str, str, str, str]  # the parametrisation of A, B, C, D, E ("none" on a bias-less layer's C-E)
    init: bool


Spec = LayerSpec[GloraHyper]


def hyper(config: Any, target: Target) -> GloraHyper:
    if type(target.module) is not nn.Linear:
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not a plain torch.nn.Linear (after "
            "unwrapping); GLoRA does not support this layer type."
        )
    bias = target.module.bias is not None
    c, de = (config.config_C, config.config_D_E) if bias else ("none", "none")
    return GloraHyper(r=config.r, kinds=(config.config_A_B, config.config_A_B, c, de, de), init=config.init_weights)


def _kind(spec: Spec, path: str) -> str:
    return spec.hyper.kinds[PATHS.index(path)]


def _shape(spec: Spec, path: str) -> tuple[int, ...]:
    """The path's value shape (PEFT's GloraEmptyPath buffer shape)."""
    out, inp = spec.out_features, spec.in_features
    return {"A": (out, inp), "B": (out, inp), "C": (inp, 1), "D": (out,), "E": (out,)}[path]


def param_names(spec: Spec) -> tuple[str, ...]:
    return tuple(f"glora_{p}.{leaf}" for p in PATHS for leaf in _LEAVES[_kind(spec, p)])


def _kaiming(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.zeros(shape), a=math.sqrt(5), generator=generator)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's GloraLoraPath / GloraVectorPath / GloraScalarPath draws, path by path."""
    out: Params = {}
    for p in PATHS:
        kind, shape = _kind(spec, p), _shape(spec, p)
        if kind == "lora":
            rows, cols = (shape[0], shape[1])
            xu = _kaiming((spec.hyper.r, cols), generator)
            xd = torch.zeros(rows, spec.hyper.r) if spec.hyper.init else _kaiming((rows, spec.hyper.r), generator)
            out[f"glora_{p}.Xd"], out[f"glora_{p}.Xu"] = xd, xu
        elif kind == "vector":
            column = (shape[0], 1)  # A, B, C: a column; D, E: a row vector, drawn as (1, out) like PEFT's unsqueeze
            if spec.hyper.init:
                x = torch.zeros(column if p in "ABC" else shape)
            else:
                x = _kaiming(column, generator) if p in "ABC" else _kaiming((1, shape[0]), generator)[0]
            out[f"glora_{p}.X"] = x
        elif kind == "constant":
            out[f"glora_{p}.X"] = (
                torch.zeros(1) if spec.hyper.init else torch.zeros(1).normal_(0.0, 0.02, generator=generator)
            )
    return out


def make_zeros(
    spec: Spec, module: nn.Module, generator: torch.Generator | None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """The zero buffers of the "none" paths (float32, PEFT's; they hold zeros only)."""
    device = module.get_parameter("weight").device
    return {f"glora_{p}.zeros": torch.zeros(_shape(spec, p), device=device) for p in PATHS if _kind(spec, p) == "none"}


def _zero_names(spec: Spec) -> tuple[str, ...]:
    return tuple(f"glora_{p}.zeros" for p in PATHS if _kind(spec, p) == "none")


def _zeros_held(leaves: Collection[str]) -> tuple[str, ...]:
    """From a layer's leaf names: a path without leaves is "none" (also C, D, E on a layer without bias)."""
    return tuple(f"glora_{p}.zeros" for p in PATHS if not any(n.startswith(f"glora_{p}.") for n in leaves))


def _path(spec: Spec, params: Params, p: str, like: torch.Tensor) -> torch.Tensor | None:
    """The path's value in `like`'s dtype and device (PEFT's `.to(device, dtype)` of the weight); None for "none"."""
    kind = _kind(spec, p)
    if kind == "none":
        return None
    if kind == "lora":
        value = params[f"glora_{p}.Xd"] @ params[f"glora_{p}.Xu"]
    else:
        value = params[f"glora_{p}.X"]
        value = value[..., 0] if kind == "constant" else value
    return value.to(like.device, like.dtype)


def _weight_term(spec: Spec, params: Params, w0: torch.Tensor) -> torch.Tensor | None:
    """W0 * A + B (out, in), or None when both are "none"."""
    a, b = _path(spec, params, "A", w0), _path(spec, params, "B", w0)
    if a is None or b is None:
        return None
    return w0 * a + b


def _bias_term(spec: Spec, params: Params, w0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor | None:
    """b0 * D + E + W0 @ C (out,), or None when C, D and E are all "none"."""
    c, d, e = (_path(spec, params, p, w0) for p in "CDE")
    terms = []
    if d is not None and e is not None:
        terms.append(b0 * d + e)
    if c is not None:
        terms.append(torch.matmul(w0, c).squeeze(-1))
    return sum(terms[1:], terms[0]) if terms else None


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    assert result is not None
    w0 = ctx.weight
    weight, bias = _weight_term(spec, params, w0), None
    if ctx.bias is not None:
        bias = _bias_term(spec, params, w0, ctx.bias.to(w0.dtype))
    if weight is None and bias is None:
        return result
    if weight is None:
        delta = bias.expand(*x.shape[:-1], -1) if bias is not None else None
    else:
        delta = F.linear(x, weight, bias)
    assert delta is not None
    return (result + delta).to(result.dtype)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """weight + W0 * A + B, W0 the weight before the first adapter of this merge (PEFT's re-merge against W0)."""
    w0 = weight if base_weight is None else base_weight.to(weight.device)
    term = _weight_term(spec, params, w0)
    return weight if term is None else weight + term


def unmerge_weight(spec: Spec, params: Params, merged: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """The weight before the merge. Without it no per-adapter inverse exists: every adapter merged in one call
    scaled the same W0 (PEFT inverts the sum over all of them from its own record of what it merged)."""
    if base_weight is None:
        raise NotImplementedError(
            "GLoRA: unmerging needs the original base (funcpeft.unmerge(..., base=)): W' = W + W0 * A + B is applied "
            "against the weight before the first adapter of the merge, which the merged weight alone does not give"
        )
    return base_weight.to(merged.device)


def merge_bias(
    spec: Spec, params: Params, bias: torch.Tensor, base_weight: torch.Tensor, base_bias: torch.Tensor
) -> torch.Tensor:
    """bias + b0 * D + E + W0 @ C (PEFT's merge, in the weight's dtype)."""
    w0 = base_weight.to(bias.device)
    term = _bias_term(spec, params, w0, base_bias.to(w0.device, w0.dtype))
    return bias if term is None else (bias + term).to(bias.dtype)


GLORA = register(
    Method(
        name="glora",
        config=GloraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, from_base=True, bias_from_base=merge_bias),
        layer_frozen=LayerFrozen(names=ZEROS, make=make_zeros, select=_zero_names, held=_zeros_held, autocast=True),
        keys=KeyRules(
            param_prefix="glora_",
            unsuffixed=frozenset({f"glora_{p}.{leaf}" for p in PATHS for leaf in ("Xd", "Xu", "X")} | set(ZEROS)),
        ),
    )
)
