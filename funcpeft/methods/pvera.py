"""PVeRA (`PveraConfig`): probabilistic VeRA (peft/tuners/pvera).

    mu, logvar = split(lambda_d * A(dropout(x)), 2)          # A (2r, in), lambda_d (2r,)
    y = base(x) + lambda_b * B(z),  z = mu (eval) | mu + eps * exp(logvar / 2) (training)

A (2r, max_in) and B (max_out, r) are VeRA's frozen shared projections (funcpeft.methods.vera's functions: drawn
once per adapter from `projection_prng_key` at the largest targeted dims, kept in `base` under reserved keys,
sliced per layer, not counted). Trainable per layer: pvera_lambda_b (out,) (0 with init_weights, else 1) and
pvera_lambda_d (2r,) (d_initial with init_weights, else N(0, 1)).

eps ~ N(0, 1) is drawn in a training call (`dropout_rng`) from the call's randomness (`OpContext.generator`), one
per element of mu, like PEFT's `randn_like` (PEFT draws it from the global RNG, or from a per-layer generator
seeded with `generator_seed`, which funcpeft keeps for the file only). With `sample_at_inference` PEFT also samples
in eval mode; funcpeft's eval call has no randomness, so such a call raises NotImplementedError (a training call
samples). Merging uses the mean, as PEFT: dW = (lambda_b * B) @ (lambda_d[:r] * A[:r]).

bitsandbytes 4-bit / 8-bit layers (LayerKind.QUANT_LINEAR, PEFT's pvera.bnb): the layer's own kernel gives `result`;
the term is cast to its dtype before the add and the sum to the adapter's dtype, as there. Merging dequantises,
adds dW and quantises again. PEFT 0.21.2's 4-bit merge re-creates the weight with `bnb_quantized=True` copied from
the old one, so its values are never quantised and the merged layer fails in its next forward; funcpeft quantises
them (the same merge as its 8-bit layers').
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import PveraConfig
from . import vera
from ._registry import register
from .base import (
    WEIGHT_OP_KINDS,
    KeyRules,
    LayerKind,
    LayerSpec,
    Method,
    OpContext,
    Params,
    SharedTensors,
    Target,
)

_PROJECTIONS = ("pvera_A", "pvera_B")
_NAMES = ("pvera_lambda_b", "pvera_lambda_d")  # saved without `.weight`


@dataclass(frozen=True)
class PveraHyper(vera.VeraHyper):
    sample_at_inference: bool = False


Spec = LayerSpec[PveraHyper]


def hyper(config: Any, target: Target) -> PveraHyper:
    vera.check_target(
        target, "the following modules are supported: `torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`."
    )
    return PveraHyper(
        r=config.r,
        d_initial=float(config.d_initial),
        init=bool(config.init_weights),
        dropout=float(config.pvera_dropout),
        shared=target.common,
        sample_at_inference=bool(config.sample_at_inference),
    )


def common_hyper(config: Any, targets: Mapping[str, nn.Module]) -> vera.VeraShapes:
    """A is (2r, largest in_features): its rows give the mean and the log-variance; B is (largest out, r)."""
    max_in, max_out = vera.largest_dims(targets, "PVeRA")
    return vera.VeraShapes(config.projection_prng_key, (2 * config.r, max_in), (max_out, config.r))


def param_names(spec: Spec) -> tuple[str, ...]:
    return _NAMES


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    # PEFT draws lambda_d ~ N(0, 1) before resetting it with init_weights: draw it either way (same random stream)
    lambda_d = torch.randn(2 * spec.hyper.r, generator=generator)
    if spec.hyper.init:
        return {
            "pvera_lambda_b": torch.zeros(spec.out_features),
            "pvera_lambda_d": torch.full((2 * spec.hyper.r,), spec.hyper.d_initial),
        }
    return {"pvera_lambda_b": torch.ones(spec.out_features), "pvera_lambda_d": lambda_d}


def _forward(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext, batched: bool
) -> torch.Tensor:
    """`forward`; batched: lambda_b (B, out), lambda_d (B, 2r) and x (B, ..., in) hold one example's adapter each."""
    assert result is not None
    if not ctx.training and spec.hyper.sample_at_inference:
        raise NotImplementedError(
            f"PVeRA at {ctx.path!r}: sample_at_inference=True samples in eval mode, but funcpeft's eval call (no "
            "dropout_rng) has no randomness; call fn(..., dropout_rng=<seed or Generator>) to sample (training mode, "
            "dropout on), or use sample_at_inference=False for the mean"
        )
    lambda_b, lambda_d = params["pvera_lambda_b"], params["pvera_lambda_d"]
    if batched:  # (B, n) -> (B, 1, ..., 1, n) against x's (B, ..., in)
        view = (x.shape[0], *[1] * (x.dim() - 2), -1)
        lambda_b, lambda_d = lambda_b.reshape(view), lambda_d.reshape(view)
    a = params["pvera_A"][:, : spec.in_features].to(x.device)
    b = params["pvera_B"][: spec.out_features, :].to(x.device)
    out_dtype = result.dtype
    x = ctx.dropout(x.to(lambda_d.dtype), spec.hyper.dropout)
    mu, logvar = (lambda_d * F.linear(x, a)).chunk(2, dim=-1)
    z = mu
    if ctx.training:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn(std.shape, generator=ctx.generator(std.device), device=std.device, dtype=std.dtype)
        z = mu + eps * std
    if spec.kind is LayerKind.QUANT_LINEAR:  # PEFT's bnb layers: the term in result's dtype, the sum in x's (cast)
        return (result + (lambda_b * F.linear(z, b)).to(out_dtype)).to(x.dtype)
    return (result + lambda_b * F.linear(z, b)).to(out_dtype)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    return _forward(spec, params, x, result, ctx, batched=False)


def forward_per_example(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor:
    return _forward(spec, params, x, result, ctx, batched=True)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """(lambda_b * B) @ (lambda_d[:r] * A[:r]) in W's layout: the mean's half only (PEFT's merge)."""
    r = spec.hyper.r
    dtype = params["pvera_B"].dtype  # PEFT: the fp32 detour on CPU is keyed on the projections' dtype
    a, b = params["pvera_A"][:r, : spec.in_features], params["pvera_B"][: spec.out_features, :]
    lambda_b, lambda_d = params["pvera_lambda_b"], params["pvera_lambda_d"][:r]
    cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if cast:
        a, b, lambda_b, lambda_d = a.float(), b.float(), lambda_b.float(), lambda_d.float()
    a, b = a.to(lambda_d.device), b.to(lambda_d.device)
    w = (lambda_b.unsqueeze(-1) * b) @ (lambda_d.unsqueeze(-1) * a)
    w = w.to(dtype) if cast else w
    return w.T if spec.kind is LayerKind.CONV1D_HF else w


PVERA = register(
    Method(
        name="pvera",
        config=PveraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        forward_per_example=forward_per_example,
        delta_weight=delta_weight,
        shared=SharedTensors(
            common_hyper=common_hyper,
            frozen_params=functools.partial(vera.frozen_params, names=_PROJECTIONS),
            make=functools.partial(vera.make_shared, names=_PROJECTIONS),
            file_keys=functools.partial(vera.peft_shared_keys, names=_PROJECTIONS, rows_a=2),
            saved=lambda config: bool(config.save_projection),
        ),
        keys=KeyRules(param_prefix="pvera_lambda_", unsuffixed=frozenset(_NAMES)),
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
    )
)
