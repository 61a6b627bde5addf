"""Uni-LoRA (`UniLoraConfig`): LoRA whose factors are gathered from one shared trainable vector (peft/tuners/unilora).

    A = theta_d[idx_A] * scale_A  (r, in)      B = theta_d[idx_B] * scale_B  (out, r)
    y = base(x) + B(A(dropout(x)))             dW = B @ A (transposed for GPT-2 Conv1D)

theta_d (theta_d_length,) is TRAINABLE and shared by all layers: `adapter["<shared>"]["unilora_theta_d"]`
(`Method.shared_trainable`; PEFT's `base_model.unilora_theta_d`), U(-init_theta_d_bound, bound) with init_weights,
else N(0, 1), drawn before any layer (PEFT's `_pre_injection_hook`). A layer has no parameters of its own.

The indices and scales are frozen (`SharedTensors`, in `base` under reserved keys, not counted): PEFT's
`generate_index` assigns the N = sum over layers of (r * in + out * r) entries, in module order and A before B in
each layer, to theta_d indices (each used floor or ceil of N / theta_d_length times, numpy's `default_rng(proj_seed)`
shuffle); scale = 1 / sqrt(uses of that index), float32 rounded to the layer weight's dtype (PEFT's
`update_scaling` and its upcast; theta_d is rounded likewise). The assignment depends on every adapted layer, so
`common_hyper` lays out each layer's offset. With save_indices PEFT saves them under each layer (`unilora_indices_A` / `_B`, `unilora_scales_A` / `_B`); so does funcpeft.
A and B are materialised per call (rank-sized, as PEFT), never a weight-sized tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._trees import shared_key
from ..configs import UniLoraConfig
from ._registry import register
from .base import (
    KeyRules,
    LayerKind,
    LayerSpec,
    Method,
    OpContext,
    Params,
    SharedParams,
    SharedTensors,
    Target,
    UnsupportedLayerError,
)

THETA = "unilora_theta_d"
FROZEN = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


@dataclass(frozen=True)
class UniloraHyper:
    r: int
    dropout: float
    length: int  # theta_d_length
    seed: int  # proj_seed
    total: int  # N: the entries of every adapted layer's A and B
    offset: int  # where this layer's A starts among them (its B follows)
    weight_dtype: torch.dtype  # PEFT rounds theta_d and the scales through it (see `_rounded`)
    init: bool
    bound: float
    path: str  # the layer's module path: the key of its indices in PEFT's files


Spec = LayerSpec[UniloraHyper]


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    shape: Any = module.weight.shape
    if isinstance(module, nn.Linear):
        return int(shape[1]), int(shape[0])
    if type(module).__name__ == "Conv1D":
        return int(shape[0]), int(shape[1])
    return None


def layout(config: Any, targets: Mapping[str, nn.Module]) -> tuple[int, dict[str, int]]:
    """(N, {layer path: offset of its A}) over the Linear / Conv1D targets in module order (PEFT's
    `_assign_unilora_indices_and_scales`); other targets are refused by `hyper`."""
    offsets, n = {}, 0
    for name, module in targets.items():
        dims = _in_out(module)
        if dims is not None:
            offsets[name] = n
            n += config.r * dims[0] + dims[1] * config.r
    return n, offsets


def hyper(config: Any, target: Target) -> UniloraHyper:
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only the "
            "following modules are supported: `torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`."
        )
    total, offsets = target.common
    return UniloraHyper(
        r=config.r,
        dropout=float(config.unilora_dropout),
        length=config.theta_d_length,
        seed=config.proj_seed,
        total=total,
        offset=offsets[target.name],
        weight_dtype=target.module.weight.dtype,
        init=bool(config.init_weights),
        bound=float(config.init_theta_d_bound),
        path=target.name,
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return ()


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """No parameters of its own; PEFT draws (and then replaces) random indices per layer: the same draws."""
    h = spec.hyper
    torch.randint(0, h.length, (h.r, spec.in_features), generator=generator)
    torch.randint(0, h.length, (spec.out_features, h.r), generator=generator)
    return {}


def _rounded(t: torch.Tensor, spec: Spec) -> torch.Tensor:
    """PEFT moves theta_d and the scales to the layer weight's dtype and then upcasts them to float32
    (`autocast_adapter_dtype`): on an fp16 / bf16 model their float32 values are rounded to that dtype."""
    return t.to(spec.hyper.weight_dtype).float()


def init_theta(spec: Spec, generator: torch.Generator | None) -> Params:
    h = spec.hyper
    if h.init:
        theta = torch.empty(h.length).uniform_(-h.bound, h.bound, generator=generator)
    else:
        theta = torch.randn(h.length, generator=generator)
    return {THETA: _rounded(theta, spec)}


@functools.lru_cache(maxsize=8)
def generate_index(total: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `UniLoraModel.generate_index` (N indices, balanced, numpy-shuffled) and 1 / sqrt(uses) per index."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), total // length)
    if total % length:
        data = np.concatenate([data, rng.choice(length, size=total % length, replace=False)])
    rng.shuffle(data)
    indices = torch.as_tensor(data, dtype=torch.long)
    counts = torch.bincount(indices, minlength=length)
    inv_sqrt = torch.zeros(length, dtype=torch.float32)
    inv_sqrt[counts > 0] = counts[counts > 0].float().rsqrt()
    return indices, inv_sqrt


def _keys(spec: Spec) -> dict[str, str]:
    h = spec.hyper
    where = (f"seed{h.seed}", f"d{h.length}", f"r{h.r}", f"n{h.total}", f"at{h.offset}")
    dtype = str(h.weight_dtype).removeprefix("torch.")
    return {name: shared_key(name, *where, *((dtype,) if "scales" in name else ()), f"@{h.path}") for name in FROZEN}


def frozen_params(spec: Spec) -> tuple[tuple[str, str], ...]:
    return tuple(_keys(spec).items())


def make_frozen(spec: Spec) -> dict[str, torch.Tensor]:
    """The layer's slice of the assignment: indices A (r, in), B (out, r) and their float32 scales (rounded to the
    layer weight's dtype, and upcast under autocast_adapter_dtype, by `SharedTensors.layer_dtype`, like PEFT's)."""
    h = spec.hyper
    indices, inv_sqrt = generate_index(h.total, h.length, h.seed)
    n_a = h.r * spec.in_features
    idx_a = indices[h.offset : h.offset + n_a].view(h.r, spec.in_features).clone()
    idx_b = indices[h.offset + n_a : h.offset + n_a + spec.out_features * h.r].view(spec.out_features, h.r).clone()
    keys = _keys(spec)
    return {
        keys["unilora_indices_A"]: idx_a,
        keys["unilora_indices_B"]: idx_b,
        keys["unilora_scales_A"]: inv_sqrt[idx_a],
        keys["unilora_scales_B"]: inv_sqrt[idx_b],
    }


def peft_layer_keys(config: Any, base_keys: list[str], paths: list[str]) -> dict[str, str]:
    """{`base_model.model.{path}.unilora_indices_A`, ...: base key} when save_indices (PEFT's per-layer buffers)."""
    if not config.save_indices:
        return {}
    out = {}
    for path in paths:
        for name in FROZEN:
            lead = shared_key(name, f"seed{config.proj_seed}", f"d{config.theta_d_length}", f"r{config.r}", "")
            found = [k for k in base_keys if k.startswith(lead) and k.endswith(f".@{path}")]
            if len(found) > 1:
                raise ValueError(
                    f"several UniLoRA index sets match this config at {path!r}: {found}; pass only this adapter's base"
                )
            if found:
                out[f"base_model.model.{path}.{name}"] = found[0]
    return out


def factors(spec: Spec, params: Params, cast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_get_lora_matrices`: A (r, in) and B (out, r) gathered from theta_d (leading batch dims kept)."""
    idx_a, idx_b = params["unilora_indices_A"], params["unilora_indices_B"]
    theta = params[THETA].to(idx_a.device)
    # the scales hold values of the weight's dtype: in theta_d's dtype, as PEFT's (float32, or the model's dtype
    # without autocast_adapter_dtype), exactly
    scale_a = params["unilora_scales_A"].to(idx_a.device, theta.dtype)
    scale_b = params["unilora_scales_B"].to(idx_b.device, theta.dtype)
    if cast:
        theta, scale_a, scale_b = theta.float(), scale_a.float(), scale_b.float()
    return theta[..., idx_a] * scale_a, theta[..., idx_b] * scale_b


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    assert result is not None
    a, b = factors(spec, params)
    out_dtype = result.dtype
    x = ctx.dropout(x.to(params[THETA].dtype), spec.hyper.dropout)
    return (result + F.linear(F.linear(x, a), b)).to(out_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    dtype = params[THETA].dtype
    cast = params["unilora_indices_A"].device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    a, b = factors(spec, params, cast)
    w = b @ a
    w = w.to(dtype) if cast else w
    return w.T if spec.kind is LayerKind.CONV1D_HF else w


UNILORA = register(
    Method(
        name="unilora",
        config=UniLoraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        shared_trainable=SharedParams(init=init_theta),
        shared=SharedTensors(
            common_hyper=layout,
            frozen_params=frozen_params,
            make=make_frozen,
            layer_file_keys=peft_layer_keys,
            saved=lambda config: bool(config.save_indices),
        ),
        keys=KeyRules(param_prefix="unilora_", unsuffixed=frozenset({THETA, *FROZEN})),
    )
)
