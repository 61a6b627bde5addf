"""SHiRA (`ShiraConfig`): a sparse high-rank delta, `y = base(x) + x @ dW.T` on nn.Linear layers.

dW (out, in) is zero except at the N = r * (out + in) positions of a frozen mask, where it holds the trainable
values `shira_weight` (N,) (init zeros, or randn with init_weights=False). The mask is the config's
`mask_fn(base_layer, r)` (PEFT's `random_mask` seeded by `random_seed` by default), stored as
`shira_indices` (2, N) int32 (rows, then columns, in the mask's row-major order): frozen, it lives in `base`
under a reserved key (`Method.layer_frozen`), not in the adapter tree, and PEFT saves it as
`base_model.model.{path}.shira_indices`; a checkpoint's indices replace the computed ones.

Materialised per call: the dense dW (out, in) and W + dW, weight-sized, like PEFT (whose forward clones W and
adds the sparse delta on every call), then one `F.linear(x, W + dW, bias)` as in PEFT (adding `x @ dW.T` to the
base output instead costs a second full-size matmul forward and two more backward: 1.49x PEFT's training step).
dW is built with `index_add` (duplicates sum, as in PEFT's sparse COO delta), so vmap, per-example routing and
torch.compile work.

On a quantised layer (bitsandbytes 4-bit / 8-bit, torchao; not HQQ, where PEFT's mask_fn fails) W is the dequantised
weight (`OpContext.float_weight`, per call, as PEFT's generic quantisation backend does: the layer's own kernel does
not run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._quant import BITSANDBYTES, TORCHAO
from ..configs import ShiraConfig
from ._registry import register
from .base import (
    WEIGHT_OP_KINDS,
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
    UnsupportedLayerError,
)

WEIGHT, INDICES = "shira_weight", "shira_indices"


@dataclass(frozen=True)
class ShiraHyper:
    r: int
    init: bool  # init_weights: zeros (a no-op adapter) or randn
    mask_fn: Callable[..., torch.Tensor] | None  # None: the indices can only come from a checkpoint
    mask_kwargs: tuple[tuple[str, Any], ...]  # PEFT passes random_seed to the "random" mask only


Spec = LayerSpec[ShiraHyper]


def _count(spec: LayerSpec[Any]) -> int:
    return int(spec.hyper.r * (spec.in_features + spec.out_features))


def hyper(config: Any, target: Target) -> ShiraHyper:
    if target.kind not in (LayerKind.LINEAR, LayerKind.QUANT_LINEAR):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only the "
            "following modules are supported: `torch.nn.Linear`."
        )
    out_f, in_f = target.module.out_features, target.module.in_features  # a 4-bit weight's shape is packed data
    if config.r * (in_f + out_f) > in_f * out_f:
        raise ValueError(
            f"The set rank {config.r} results in more shira params than the total number of params in the base layer "
            f"{in_f * out_f} and this is not allowed (module {target.name!r})."
        )
    kwargs = (("random_seed", config.random_seed),) if config.mask_type == "random" else ()
    return ShiraHyper(r=config.r, init=bool(config.init_weights), mask_fn=config.mask_fn, mask_kwargs=kwargs)


def param_names(spec: Spec) -> tuple[str, ...]:
    return (WEIGHT,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    n = _count(spec)
    return {WEIGHT: torch.zeros(n) if spec.hyper.init else torch.randn(n, generator=generator)}


def make_indices(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """shira_indices (2, N) int32 from the mask function (PEFT's `torch.where(mask == 1)` order).

    A meta tensor when there is no mask function (mask_type other than "random" without `config.mask_fn`):
    then only a checkpoint can provide the indices.
    """
    weight: Any = module.weight
    n, shape = _count(spec), (spec.out_features, spec.in_features)
    if spec.hyper.mask_fn is None or weight.is_meta:
        return {INDICES: torch.empty((2, n), dtype=torch.int32, device="meta")}
    mask = spec.hyper.mask_fn(module, spec.hyper.r, **dict(spec.hyper.mask_kwargs))
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"SHiRA mask_fn must return a {shape} tensor (the layer's weight shape), got {got}")
    rows, cols = torch.where(mask == 1.0)
    if rows.numel() != n:
        raise ValueError(
            f"The SHiRA indices and weights are not the same dimensions: the mask has {rows.numel()} ones, the layer "
            f"needs r * (in + out) = {n} (SHiRA mask_fn of a {shape[0]}x{shape[1]} layer)"
        )
    return {INDICES: torch.stack([rows, cols]).to(torch.int32)}


def _dense(spec: Spec, params: Params) -> torch.Tensor:
    """dW (out, in): the values at their mask positions (duplicates sum, like PEFT's sparse COO tensor)."""
    values, idx = params[WEIGHT], params[INDICES]
    if idx.is_meta and not values.is_meta:
        raise ValueError(
            "SHiRA: this layer's mask indices are unknown (a mask_type other than 'random' and no config.mask_fn): "
            "set config.mask_fn before get_peft_model, or load the adapter with funcpeft.from_pretrained (its file "
            "holds the indices)"
        )
    idx = idx.to(values.device).long()
    flat = idx[0] * spec.in_features + idx[1]
    zeros = values.new_zeros(spec.out_features * spec.in_features)
    return zeros.index_add(0, flat, values).view(spec.out_features, spec.in_features)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's `F.linear(x, W + dW, bias)`: one matmul (forward and backward) instead of the base op's plus dW's.

    Over another adapter on the same layer (several active adapters, mixed models): `inner(x) + x @ dW.T`.
    """
    delta = _dense(spec, params)
    inner = ctx.inner_op
    if inner is None or inner is ctx.base_op:
        w = ctx.float_weight()  # PEFT: `W.clone() += dW` (promoted, stored in W's dtype); quantised: dequantised
        return F.linear(x, (w.to(torch.promote_types(w.dtype, delta.dtype)) + delta).to(w.dtype), ctx.bias)
    below = inner(x)
    return (below + F.linear(x.to(delta.dtype), delta)).to(below.dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """dW (out, in), the dense form of PEFT's sparse delta."""
    return _dense(spec, params)


SHIRA = register(
    Method(
        name="shira",
        config=ShiraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        layer_frozen=LayerFrozen(names=(INDICES,), make=make_indices),
        keys=KeyRules(param_prefix="shira_", unsuffixed=frozenset({WEIGHT, INDICES})),
        uses_result=lambda spec: False,  # the forward runs the layer's op on W + dW itself
        mixed_compatible=True,
        nests=False,
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
        quant_backends=frozenset({BITSANDBYTES, TORCHAO}),  # PEFT's mask_fn reads `weight`: HQQLinear has none
        torchao_needs_requantiser=True,
        merge=MergeHooks(rounding_warning=False),  # PEFT's generic quantisation backend: no warning
    )
)
