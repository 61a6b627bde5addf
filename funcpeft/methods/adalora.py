"""AdaLoRA (`AdaLoraConfig`): `y = base(x) + (dropout(x) @ (A * E).T @ B.T) * s / (ranknum + 1e-5)`.

PEFT's SVDLinear / SVDConv2d, with the same parameters, init draws and arithmetic order. Shapes, per layer
(nn.Linear orientation even for GPT-2 Conv1D; for a Conv2d, in = in_channels * kh * kw):
  lora_A (r, in)    right singular vectors
  lora_E (r, 1)     singular values (the rank allocator zeroes the pruned ones: funcpeft.rank_allocator)
  lora_B (out, r)   left singular vectors
r is `init_r`, except when loading a checkpoint whose config has a `rank_pattern`: PEFT saves only the
kept ranks and resizes its layers on load, so funcpeft plans those shapes (`Target.for_checkpoint`).
`s` is lora_alpha (float(r) when lora_alpha <= 0) and `ranknum` is PEFT's frozen (1,) parameter, always
init_r (0 for a layer that kept no rank): a constant of the spec here, counted like PEFT's in "all params".

On a bitsandbytes 4-bit / 8-bit layer (LayerKind.QUANT_LINEAR, PEFT's adalora.bnb SVDLinear4bit /
SVDLinear8bitLt) the layer's own kernel gives `result` and the term is cast to its dtype before the scaling, as
there; PEFT has no merge for these layers (NotImplementedError), nor does funcpeft.

PEFT's SVDConv2d materialises the conv's full delta kernel (out, in, kh, kw) on every call and convolves the
input with it; funcpeft does the same (a low-rank conv factorisation would change the arithmetic). Linear
layers never build a weight-sized tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import AdaLoraConfig
from ..configs.adalora import RANK_PATTERN_SUFFIX
from ._registry import register
from .base import (
    WEIGHT_OP_KINDS,
    FileCodec,
    KeyRules,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
    UnsupportedLayerError,
)

NAMES = ("lora_A", "lora_B", "lora_E")  # PEFT keeps them in ParameterDicts: saved without `.weight`
FILE_PREFIX = "base_model.model."  # PEFT's checkpoint keys: base_model.model.{path}.lora_A


@dataclass(frozen=True)
class AdaLoraHyper:
    r: int  # this layer's rank (init_r, or the ranks rank_pattern kept when loading a checkpoint)
    ranknum: float  # PEFT's `ranknum`: init_r (kept through a load-time resize), 0.0 for a rank-0 layer
    scaling: float  # lora_alpha, or float(r) when lora_alpha <= 0 (PEFT's rule)
    dropout: float
    init: bool  # init_lora_weights: True/"gaussian" -> E = 0, A, B ~ N(0, 0.02); False -> all randn


Spec = LayerSpec[AdaLoraHyper]


def _layer_rank(config: Any, target: Target) -> int:
    """init_r, or (loading a checkpoint) the number of ranks `rank_pattern` keeps at this module."""
    pattern = config.rank_pattern
    if not target.for_checkpoint or not pattern:
        return int(config.init_r)
    mask = pattern.get(target.name + RANK_PATTERN_SUFFIX)
    if mask is None:
        return int(config.init_r)
    if len(mask) != config.init_r:
        raise ValueError(
            f"AdaLoraConfig.rank_pattern[{target.name + RANK_PATTERN_SUFFIX!r}] has {len(mask)} entries; it needs one "
            f"per initial rank (init_r={config.init_r})"
        )
    return sum(mask)


def hyper(config: Any, target: Target) -> AdaLoraHyper:
    """AdaLoRA's per-layer facts; Linear (bitsandbytes ones too), GPT-2 Conv1D and Conv2d (groups=1) only, like PEFT."""
    module = target.module
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.QUANT_LINEAR) and not isinstance(
        module, torch.nn.Conv2d
    ):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(module).__name__}) is not supported by AdaLoRA. Currently, only "
            "`torch.nn.Linear`, `Conv1D`, and `torch.nn.Conv2d` are supported."
        )
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        raise ValueError(
            f"AdaLoRA on {target.name!r} (Conv2d with groups={module.groups}): PEFT's SVDConv2d builds a "
            "(out, in * kh * kw) delta that cannot take the grouped kernel's shape; only groups=1 is supported."
        )
    r = _layer_rank(config, target)
    alpha = config.lora_alpha
    return AdaLoraHyper(
        r=r,
        ranknum=float(config.init_r) if r > 0 else 0.0,
        scaling=alpha if alpha > 0 else float(r),
        dropout=float(config.lora_dropout),
        init=bool(config.init_lora_weights),
    )


def param_names(spec: LayerSpec[Any]) -> tuple[str, ...]:
    return NAMES


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws, in its order: randn A, E, B and ranknum's randn(1); then E = 0, A, B ~ N(0, 0.02) if init."""
    r = spec.hyper.r
    width = spec.in_features * math.prod(spec.weight_shape[2:])  # Conv2d: in_channels * kh * kw
    a = torch.randn(r, width, generator=generator)
    e = torch.randn(r, 1, generator=generator)
    b = torch.randn(spec.out_features, r, generator=generator)
    torch.randn(1, generator=generator)  # PEFT draws ranknum's initial value before filling it with r
    if spec.hyper.init:
        e = torch.zeros_like(e)
        a = a.normal_(0.0, 0.02, generator=generator)
        b = b.normal_(0.0, 0.02, generator=generator)
    return {"lora_A": a, "lora_B": b, "lora_E": e}


def _ranknum(spec: Spec, like: torch.Tensor) -> torch.Tensor:
    """PEFT's `ranknum + 1e-5`: a (1,) tensor in the adapter's dtype (dividing by it, not by a Python float,
    keeps PEFT's rounding)."""
    return like.new_full((1,), spec.hyper.ranknum) + 1e-5


def _conv_delta(spec: Spec, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return (b @ (a * e) * spec.hyper.scaling / _ranknum(spec, a)).reshape(spec.weight_shape)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + (dropout(x) @ (A * E).T @ B.T) * s / (ranknum + 1e-5)`, in PEFT's order and dtypes.

    x: the layer input (..., in) or (N, C, H, W); result: the output of the layer below.
    """
    assert result is not None
    a, b, e = params["lora_A"], params["lora_B"], params["lora_E"]
    x = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    if spec.kind is LayerKind.QUANT_LINEAR:  # PEFT's bnb layers: the term in the result's dtype, then scaled
        term = (x @ (a * e).T @ b.T).to(result.dtype) * spec.hyper.scaling / _ranknum(spec, a)
        return (result + term).to(result.dtype)
    if spec.kind is LayerKind.CONV:
        g = spec.conv
        delta = F.conv2d(
            x, _conv_delta(spec, a, b, e), stride=g.stride, padding=g.padding, dilation=g.dilation, groups=g.groups
        )
    else:
        delta = (x @ (a * e).T @ b.T) * spec.hyper.scaling / _ranknum(spec, a)
    return (result + delta).to(result.dtype)  # PEFT: `result += delta` keeps the base output's dtype


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """`B @ (A * E) * s / (ranknum + 1e-5)` in the base weight's layout (transposed for Conv1D, a Conv2d kernel)."""
    a, b, e = params["lora_A"], params["lora_B"], params["lora_E"]
    if spec.kind is LayerKind.CONV:
        return _conv_delta(spec, a, b, e)
    w = b @ (a * e)
    return (w.T if spec.kind is LayerKind.CONV1D_HF else w) * spec.hyper.scaling / _ranknum(spec, a)


def _encode(config: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's `resize_state_dict_by_rank_pattern`: with a `rank_pattern`, the file holds only the kept ranks.

    state: {checkpoint key: Tensor}; lora_A (r, in) / lora_E (r, 1) keep the rows, lora_B (out, r) the
    columns where the module's mask is True. A tensor already of the kept size (an adapter loaded from such
    a file) is written as it is. Keys of other modules are left alone.
    """
    out = dict(state)
    for key, mask in (config.rank_pattern or {}).items():
        path = key[: -len(RANK_PATTERN_SUFFIX)]
        rank = sum(mask)
        for name, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
            file_key = f"{FILE_PREFIX}{path}.{name}"
            t = state.get(file_key)
            if t is None:
                raise ValueError(
                    f"AdaLoraConfig.rank_pattern names {key!r}, but the adapter has no {path}.{name} to prune "
                    f"(adapted AdaLoRA layers: {_adapted(state)}); the rank_pattern belongs to another adapter"
                )
            if t.shape[dim] == rank:
                continue
            if t.shape[dim] != len(mask):
                raise ValueError(
                    f"{path}.{name} has {t.shape[dim]} ranks but rank_pattern[{key!r}] has {len(mask)} entries "
                    f"({rank} kept): the adapter does not belong to this config"
                )
            keep = torch.tensor(mask, dtype=torch.bool, device=t.device)
            out[file_key] = t[keep] if dim == 0 else t[:, keep]
    return out


def _adapted(state: Mapping[str, torch.Tensor]) -> list[str]:
    tail = ".lora_E"
    return sorted(k[len(FILE_PREFIX) : -len(tail)] for k in state if k.startswith(FILE_PREFIX) and k.endswith(tail))


def _decode(config: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors as they are: loading plans the pruned shapes instead (`hyper`, Target.for_checkpoint)."""
    return dict(tensors)


def _refuse_quantised(what: str) -> Exception:
    """PEFT's adalora.bnb layers have no merge / unmerge (BaseTunerLayer's bare NotImplementedError)."""
    return NotImplementedError(
        f"AdaLoRA cannot {what} into a bitsandbytes 4-bit / 8-bit layer: PEFT's adalora.bnb layers (SVDLinear4bit, "
        "SVDLinear8bitLt) do not support merging (NotImplementedError). Keep the adapter separate, or load the base "
        "unquantised to merge."
    )


def frozen_count(spec: LayerSpec[Any]) -> int:
    return 1  # PEFT's `ranknum` parameter (requires_grad=False)


ADALORA = register(
    Method(
        name="adalora",
        config=AdaLoraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        keys=KeyRules(param_prefix="lora_", unsuffixed=frozenset(NAMES)),
        codec=FileCodec(_encode, _decode),
        frozen_count=frozen_count,
        mixed_compatible=True,
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
        merge=MergeHooks(refuse_quantised=_refuse_quantised),
    )
)
