"""VeRA (`VeraConfig`): `y = base(x) + lambda_b * B(lambda_d * A(dropout(x)))` with A, B frozen and shared.

A (r, max_in) and B (max_out, r) are drawn once per adapter from `projection_prng_key` (PEFT's
kaiming-uniform draw, A first) at the largest input/output size of the targeted layers; each layer uses
the slices A[:, :in], B[:out, :]. They are *frozen*: they live in `base` under reserved keys
(`funcpeft.trees.SHARED_PREFIX`, e.g. '<shared>.vera_A.prng0.256x64'), never in the adapter tree, and
are not counted as parameters (PEFT keeps them as buffers). Trainable, per layer:
  vera_lambda_b (out,)   init 0 (init_weights=True) or 1
  vera_lambda_d (r,)     init d_initial (init_weights=True) or randn
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..trees import shared_key
from .base import LayerSpec, OpContext, register


def hyper(config: Any, name: str, module: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    if kind not in ("linear", "conv1d_hf"):
        raise TypeError(
            f"Target module {name!r} ({type(module).__name__}) is not supported. Currently, only `torch.nn.Linear` "
            "(optionally quantized) and `transformers.pytorch_utils.Conv1D` are supported."
        )
    return (("d_initial", float(config.d_initial)), ("init_weights", bool(config.init_weights)),
            ("r", config.r), ("vera_dropout", float(config.vera_dropout)))


def common_hyper(config: Any, targets: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The shared projections' shapes, from PEFT's `_find_dim` (largest out and in over the targets)."""
    dims = [(m.weight.shape[1], m.weight.shape[0]) if isinstance(m, nn.Linear) else tuple(m.weight.shape)
            for m in targets.values() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if not dims:
        raise ValueError("No layers types compatible with VeRA were found. Please check `peft_config.target_modules`.")
    max_in, max_out = max(d[0] for d in dims), max(d[1] for d in dims)
    return (("prng_key", config.projection_prng_key), ("shape_A", (config.r, max_in)), ("shape_B", (max_out, config.r)))


def _key(spec: LayerSpec, name: str) -> str:
    shape = spec.h(f"shape_{name[-1]}")
    return shared_key(name, f"prng{spec.h('prng_key')}", "x".join(map(str, shape)))


def frozen_params(spec: LayerSpec) -> tuple[tuple[str, str], ...]:
    """(param name, base key) of the shared projections, e.g. ('vera_A', '<shared>.vera_A.prng0.256x64')."""
    return (("vera_A", _key(spec, "vera_A")), ("vera_B", _key(spec, "vera_B")))


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


def shared(spec: LayerSpec) -> dict[str, torch.Tensor]:
    """{base key: tensor} for vera_A (r, max_in) then vera_B (max_out, r), drawn from `projection_prng_key`."""
    generator = torch.Generator(device="cpu").manual_seed(spec.h("prng_key"))
    a = _kaiming(spec.h("shape_A"), generator)
    b = _kaiming(spec.h("shape_B"), generator)
    return {_key(spec, "vera_A"): a, _key(spec, "vera_B"): b}


_NAMES = ("vera_lambda_b", "vera_lambda_d")  # saved without `.weight`


def param_names(spec: LayerSpec) -> tuple[str, ...]:
    return _NAMES


def peft_shared_keys(config: Any, base_keys: list[str]) -> dict[str, str]:
    """{checkpoint key: base key}: PEFT saves the projections as `base_model.vera_A/B` when save_projection."""
    if not config.save_projection:
        return {}
    out = {}
    for name, lead in (("vera_A", f"{config.r}x"), ("vera_B", "")):
        prefix = shared_key(name, f"prng{config.projection_prng_key}", lead)
        found = [k for k in base_keys if k.startswith(prefix) and (lead or k.endswith(f"x{config.r}"))]
        if len(found) > 1:
            raise ValueError(f"several shared VeRA projections match this config: {found}; pass only this adapter's base")
        if found:
            out[f"base_model.{name}"] = found[0]
    return out


def init(spec: LayerSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    if spec.h("init_weights"):
        return {"vera_lambda_b": torch.zeros(spec.out_features), "vera_lambda_d": torch.full((spec.h("r"),), spec.h("d_initial"))}
    return {"vera_lambda_b": torch.ones(spec.out_features), "vera_lambda_d": torch.randn(spec.h("r"), generator=generator)}


def _sliced(spec: LayerSpec, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return params["vera_A"][:, : spec.in_features], params["vera_B"][: spec.out_features, :]


def forward(
    spec: LayerSpec, params: dict[str, torch.Tensor], x: torch.Tensor, result: torch.Tensor, ctx: OpContext
) -> torch.Tensor:
    lambda_b, lambda_d = params["vera_lambda_b"], params["vera_lambda_d"]
    a, b = _sliced(spec, params)
    out_dtype = result.dtype
    x = ctx.dropout(x.to(lambda_d.dtype), spec.h("vera_dropout"))
    a, b = a.to(x.device), b.to(x.device)
    return (result + lambda_b * F.linear(lambda_d * F.linear(x, a), b)).to(out_dtype)


def delta_weight(spec: LayerSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(lambda_b * B) @ (lambda_d * A) in W's layout; needs the frozen vera_A / vera_B in `params`."""
    a, b = _sliced(spec, params)
    lambda_b, lambda_d = params["vera_lambda_b"], params["vera_lambda_d"]
    dtype = lambda_d.dtype
    if lambda_d.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):  # PEFT: slow half matmuls on CPU
        a, b, lambda_b, lambda_d = a.float(), b.float(), lambda_b.float(), lambda_d.float()
    w = ((lambda_b.unsqueeze(-1) * b.to(lambda_d.device)) @ (lambda_d.unsqueeze(-1) * a.to(lambda_d.device))).to(dtype)
    return w.T if spec.kind == "conv1d_hf" else w


VERA = register(SimpleNamespace(
    name="vera", peft_type="VERA", peft_key_prefix="vera_lambda_", peft_unsuffixed=_NAMES,
    peft_shared_keys=peft_shared_keys, accepts=lambda config: True, hyper=hyper, common_hyper=common_hyper,
    frozen_params=frozen_params, shared=shared, param_names=param_names, init=init, forward=forward,
    delta_weight=delta_weight,
))
