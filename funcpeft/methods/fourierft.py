"""FourierFT (`FourierFTConfig`): a weight update learned as a few entries of its 2-D Fourier spectrum.

    dW = Re(ifft2(S)) * scaling      S (out, in): zeros except S[indices] = fourierft_spectrum (n,)
    y = base(x) + x @ dW^T

indices (2, n), int64: the rows / columns of PEFT's draw `randperm(out * in, seed=random_loc_seed)[:n]`.
They are frozen and rebuilt from the config (PEFT keeps them as a plain attribute and never saves them):
they live in `base` under a reserved key per (seed, shape, n), e.g. '<shared>.fourierft_indices.seed777.20x10.n10'.
Like PEFT, every call builds the dense (out, in) dW (the inverse FFT needs the whole spectrum), in float32.
Supported layers, as in PEFT: nn.Linear and GPT-2 Conv1D.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._trees import shared_key
from ..configs.fourierft import FourierFTConfig
from ._patterns import dotted_pattern_value
from ._registry import register
from .base import (
    KeyRules,
    LayerKind,
    LayerSpec,
    Method,
    OpContext,
    Params,
    SharedTensors,
    Target,
    UnsupportedLayerError,
)

NAME = "fourierft_spectrum"
INDICES = "indices"


@dataclass(frozen=True)
class FourierHyper:
    n_frequency: int
    scaling: float
    seed: int  # random_loc_seed
    init: bool  # init_weights: zeros (True) or randn


Spec = LayerSpec[FourierHyper]


def hyper(config: Any, target: Target) -> FourierHyper:
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only the "
            "following modules are supported: `torch.nn.Linear` (and transformers' GPT-2 style `Conv1D`)."
        )
    n = dotted_pattern_value(config.n_frequency_pattern or {}, target.name, config.n_frequency)
    shape = target.module.weight.shape
    if n > shape[0] * shape[1]:
        raise ValueError(
            f"`n_frequency` should be less than or equal to the product of the input and output dimensions "
            f"but the value passed is {n} and the product is {shape[0] * shape[1]} (module {target.name!r})"
        )
    return FourierHyper(
        n_frequency=n, scaling=float(config.scaling), seed=config.random_loc_seed, init=bool(config.init_weights)
    )


def _key(spec: Spec) -> str:
    h = spec.hyper
    return shared_key(
        "fourierft_indices", f"seed{h.seed}", f"{spec.out_features}x{spec.in_features}", f"n{h.n_frequency}"
    )


def frozen_params(spec: Spec) -> tuple[tuple[str, str], ...]:
    return ((INDICES, _key(spec)),)


def make_indices(spec: Spec) -> Params:
    """{base key: (2, n) int64}: rows and columns of PEFT's `randperm(out * in)[:n]` seeded with random_loc_seed."""
    flat = torch.randperm(
        spec.out_features * spec.in_features, generator=torch.Generator().manual_seed(spec.hyper.seed)
    )[: spec.hyper.n_frequency]
    return {_key(spec): torch.stack([flat // spec.in_features, flat % spec.in_features], dim=0)}


def param_names(spec: Spec) -> tuple[str, ...]:
    return (NAME,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT draws randn(n) in every case (then zeroes it for init_weights=True): the same RNG use."""
    spectrum = torch.randn(spec.hyper.n_frequency, generator=generator)
    return {NAME: torch.zeros_like(spectrum) if spec.hyper.init else spectrum}


def _dense_delta(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: dW (out, in) in the spectrum's dtype (the FFT runs in float32)."""
    spectrum = params[NAME]
    indices = params[INDICES].to(spectrum.device)
    dense = torch.zeros(spec.out_features, spec.in_features, device=spectrum.device)
    dense = dense.index_put((indices[0], indices[1]), spectrum.float())
    return (torch.fft.ifft2(dense).real * spec.hyper.scaling).to(spectrum.dtype)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    assert result is not None
    previous_dtype = x.dtype
    delta = _dense_delta(spec, params)
    return (result + F.linear(x.to(delta.dtype), delta)).to(previous_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """dW in the base weight's layout ((in, out) for GPT-2 Conv1D)."""
    delta = _dense_delta(spec, params)
    return delta.T if spec.kind is LayerKind.CONV1D_HF else delta


def _no_common(config: Any, targets: Mapping[str, nn.Module]) -> None:
    return None


FOURIERFT = register(
    Method(
        name="fourierft",
        config=FourierFTConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        shared=SharedTensors(common_hyper=_no_common, frozen_params=frozen_params, make=make_indices),
        keys=KeyRules(param_prefix="fourierft_", unsuffixed=frozenset({NAME})),
    )
)
