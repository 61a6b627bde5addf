"""VeRA (`VeraConfig`): `y = base(x) + lambda_b * B(lambda_d * A(dropout(x)))` with A, B frozen and shared.

A (r, max_in) and B (max_out, r) are drawn once per adapter from `projection_prng_key` (PEFT's
kaiming-uniform draw, A first) at the largest input/output size of the targeted layers; each layer uses
the slices A[:, :in], B[:out, :]. They are *frozen*: they live in `base` under reserved keys
(`funcpeft._trees.SHARED_PREFIX`, e.g. '<shared>.vera_A.prng0.256x64'), never in the adapter tree, and
are not counted as parameters (PEFT keeps them as buffers). Trainable, per layer:
  vera_lambda_b (out,)   init 0 (init_weights=True) or 1
  vera_lambda_d (r,)     init d_initial (init_weights=True) or randn

A quantised layer (`LayerKind.QUANT_LINEAR`: bitsandbytes 4-bit / 8-bit, torchao, HQQ) runs its own kernel and the
term is added to its output, as PEFT's generic quantisation backend does; merging dequantises, adds and quantises
again (no warning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._quant import QUANT_BACKENDS, is_quant_linear
from .._trees import shared_key
from ..configs import VeraConfig
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
    SharedTensors,
    Target,
    UnsupportedLayerError,
)


@dataclass(frozen=True)
class VeraShapes:
    """The shared projections' key and shapes, common to all layers (PEFT's `_find_dim`)."""

    prng_key: int
    shape_A: tuple[int, int]  # (r, largest in_features)
    shape_B: tuple[int, int]  # (largest out_features, r)


@dataclass(frozen=True)
class VeraHyper:
    r: int
    d_initial: float
    init: bool  # init_weights
    dropout: float  # vera_dropout
    shared: VeraShapes


Spec = LayerSpec[VeraHyper]


def check_target(target: Target, supported: str) -> None:
    """VeRA-style methods adapt linear layers (plain, quantised, GPT-2 Conv1D) only; `supported`: the tail of the
    method's own PEFT message, naming what it takes."""
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.QUANT_LINEAR):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only "
            f"{supported}"
        )


def hyper(config: Any, target: Target) -> VeraHyper:
    check_target(
        target, "`torch.nn.Linear` (optionally quantized) and `transformers.pytorch_utils.Conv1D` are supported."
    )
    return VeraHyper(
        r=config.r,
        d_initial=float(config.d_initial),
        init=bool(config.init_weights),
        dropout=float(config.vera_dropout),
        shared=target.common,
    )


def largest_dims(targets: Mapping[str, nn.Module], label: str = "VeRA") -> tuple[int, int]:
    """(largest in_features, largest out_features) over the Linear / GPT-2 Conv1D targets (PEFT's `_find_dim`)."""
    dims: list[tuple[int, int]] = []  # (in, out) of each Linear / GPT-2 Conv1D target
    for module in targets.values():
        m: Any = module
        # in / out features, not the weight's shape (a quantised layer's is packed data; HQQLinear has no `weight`)
        if isinstance(m, nn.Linear) or is_quant_linear(m):
            dims.append((int(m.in_features), int(m.out_features)))
        elif type(m).__name__ == "Conv1D":
            shape: Any = m.weight.shape
            dims.append((int(shape[0]), int(shape[1])))
    if not dims:
        raise ValueError(
            f"No layers types compatible with {label} were found. Please check `peft_config.target_modules`."
        )
    return max(d[0] for d in dims), max(d[1] for d in dims)


def common_hyper(config: Any, targets: Mapping[str, nn.Module]) -> VeraShapes:
    """The shared projections' shapes, from PEFT's `_find_dim` (largest out and in over the targets)."""
    max_in, max_out = largest_dims(targets)
    return VeraShapes(config.projection_prng_key, (config.r, max_in), (max_out, config.r))


def _key(spec: Spec, name: str) -> str:
    shared = spec.hyper.shared
    shape = shared.shape_A if name.endswith("_A") else shared.shape_B
    return shared_key(name, f"prng{shared.prng_key}", "x".join(map(str, shape)))


def frozen_params(spec: Spec, names: tuple[str, str] = ("vera_A", "vera_B")) -> tuple[tuple[str, str], ...]:
    """(param name, base key) of the shared projections, e.g. ('vera_A', '<shared>.vera_A.prng0.256x64')."""
    return tuple((name, _key(spec, name)) for name in names)


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


def make_shared(spec: Spec, names: tuple[str, str] = ("vera_A", "vera_B")) -> Params:
    """{base key: tensor} for A (r, max_in) then B (max_out, r), drawn from `projection_prng_key`."""
    shared = spec.hyper.shared
    generator = torch.Generator(device="cpu").manual_seed(shared.prng_key)
    a = _kaiming(shared.shape_A, generator)
    b = _kaiming(shared.shape_B, generator)
    return {_key(spec, names[0]): a, _key(spec, names[1]): b}


_NAMES = ("vera_lambda_b", "vera_lambda_d")  # saved without `.weight`


def param_names(spec: Spec) -> tuple[str, ...]:
    return _NAMES


def peft_shared_keys(
    config: Any, base_keys: list[str], names: tuple[str, str] = ("vera_A", "vera_B"), rows_a: int = 1
) -> dict[str, str]:
    """{checkpoint key: base key}: PEFT saves the projections as `base_model.vera_A/B` when save_projection.

    rows_a: A's rows per unit of r (PVeRA's A has 2r)."""
    if not config.save_projection:
        return {}
    out = {}
    for name, lead in ((names[0], f"{rows_a * config.r}x"), (names[1], "")):
        prefix = shared_key(name, f"prng{config.projection_prng_key}", lead)
        found = [k for k in base_keys if k.startswith(prefix) and (lead or k.endswith(f"x{config.r}"))]
        if len(found) > 1:
            raise ValueError(
                f"several shared {names[0][:-2]} projections match this config: {found}; pass only this adapter's base"
            )
        if found:
            out[f"base_model.{name}"] = found[0]
    return out


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    if spec.hyper.init:
        return {
            "vera_lambda_b": torch.zeros(spec.out_features),
            "vera_lambda_d": torch.full((spec.hyper.r,), spec.hyper.d_initial),
        }
    return {
        "vera_lambda_b": torch.ones(spec.out_features),
        "vera_lambda_d": torch.randn(spec.hyper.r, generator=generator),
    }


def _sliced(spec: Spec, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    return params["vera_A"][:, : spec.in_features], params["vera_B"][: spec.out_features, :]


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    assert result is not None
    lambda_b, lambda_d = params["vera_lambda_b"], params["vera_lambda_d"]
    a, b = _sliced(spec, params)
    out_dtype = result.dtype
    x = ctx.dropout(x.to(lambda_d.dtype), spec.hyper.dropout)
    a, b = a.to(x.device), b.to(x.device)
    return (result + lambda_b * F.linear(lambda_d * F.linear(x, a), b)).to(out_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """(lambda_b * B) @ (lambda_d * A) in W's layout; needs the frozen vera_A / vera_B in `params`."""
    a, b = _sliced(spec, params)
    lambda_b, lambda_d = params["vera_lambda_b"], params["vera_lambda_d"]
    dtype = lambda_d.dtype
    if lambda_d.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):  # PEFT: slow half matmuls on CPU
        a, b, lambda_b, lambda_d = a.float(), b.float(), lambda_b.float(), lambda_d.float()
    w = ((lambda_b.unsqueeze(-1) * b.to(lambda_d.device)) @ (lambda_d.unsqueeze(-1) * a.to(lambda_d.device))).to(dtype)
    return w.T if spec.kind is LayerKind.CONV1D_HF else w


VERA = register(
    Method(
        name="vera",
        config=VeraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        shared=SharedTensors(
            common_hyper=common_hyper,
            frozen_params=frozen_params,
            make=make_shared,
            file_keys=peft_shared_keys,
            saved=lambda config: bool(config.save_projection),
        ),
        keys=KeyRules(param_prefix="vera_lambda_", unsuffixed=frozenset(_NAMES)),
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
        quant_backends=QUANT_BACKENDS,  # PEFT's generic backend: bnb, torchao, HQQ
        torchao_needs_requantiser=True,
        merge=MergeHooks(rounding_warning=False),  # PEFT's generic quantisation backend: no warning
    )
)
