"""Sparse-spectrum updates (FourierFT, WaveFT): n trained coefficients at frozen random places of a dense matrix
that the method's inverse transform turns into dW (out, in); y = base(x) + x @ dW^T.

The places, (2, n) int64 rows / columns, are PEFT's draw `randperm(out * in, seed=random_loc_seed)[:n]` per layer.
PEFT keeps them as a plain attribute and never saves them: here they are frozen tensors in `base` under a reserved
key per (method, seed, shape, n), e.g. '<shared>.fourierft_indices.seed777.20x10.n10', rebuilt from the config
(`spectral_places`). dW is built dense on every call, as PEFT does (the inverse transform needs every coefficient).
Supported layers, as in PEFT: nn.Linear and GPT-2 Conv1D.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._trees import shared_key
from .base import LayerKind, LayerSpec, OpContext, Params, SharedTensors, Target, UnsupportedLayerError

PLACES = "indices"  # the frozen places' name in a layer's params (PEFT's attribute `indices`)


@dataclass(frozen=True)
class SpectrumHyper:
    """One layer's hyper-parameters common to both methods (FourierFT's whole hyper; WaveFT's adds the transform)."""

    n_frequency: int
    scaling: float
    seed: int  # random_loc_seed
    init: bool  # init_weights: zeros (True) or a random draw


DenseDeltaFn = Callable[[LayerSpec[Any], Params], torch.Tensor]


def check_layer(target: Target) -> None:
    """PEFT's rule: only nn.Linear and GPT-2 Conv1D layers."""
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only the "
            "following modules are supported: `torch.nn.Linear` (and transformers' GPT-2 style `Conv1D`)."
        )


def check_n_frequency(n: int, target: Target) -> None:
    """PEFT's rule: at most one coefficient per weight entry (the places are drawn without replacement)."""
    shape = target.module.weight.shape
    if n > shape[0] * shape[1]:
        raise ValueError(
            f"`n_frequency` should be less than or equal to the product of the input and output dimensions "
            f"but the value passed is {n} and the product is {shape[0] * shape[1]} (module {target.name!r})"
        )


def places_key(method: str, spec: LayerSpec[SpectrumHyper]) -> str:
    h = spec.hyper
    return shared_key(
        f"{method}_indices", f"seed{h.seed}", f"{spec.out_features}x{spec.in_features}", f"n{h.n_frequency}"
    )


def frozen_places(method: str, spec: LayerSpec[SpectrumHyper]) -> tuple[tuple[str, str], ...]:
    return ((PLACES, places_key(method, spec)),)


def make_places(method: str, spec: LayerSpec[SpectrumHyper]) -> Params:
    """{base key: (2, n) int64}: rows and columns of PEFT's `randperm(out * in)[:n]` seeded with random_loc_seed."""
    flat = torch.randperm(
        spec.out_features * spec.in_features, generator=torch.Generator().manual_seed(spec.hyper.seed)
    )[: spec.hyper.n_frequency]
    return {places_key(method, spec): torch.stack([flat // spec.in_features, flat % spec.in_features], dim=0)}


def no_common_hyper(config: Any, targets: Mapping[str, nn.Module]) -> None:
    return None


def spectral_places(
    method: str, common_hyper: Callable[[Any, Mapping[str, nn.Module]], Any] = no_common_hyper
) -> SharedTensors:
    """The method's places as frozen shared tensors (`Method.shared`); method: 'fourierft', 'waveft'."""
    return SharedTensors(
        common_hyper=common_hyper, frozen_params=partial(frozen_places, method), make=partial(make_places, method)
    )


def scatter(
    values: torch.Tensor, params: Params, shape: tuple[int, int], offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """The dense coefficients: zeros of `shape` in values' dtype and device, but values (n,) at the places + offset."""
    places = params[PLACES].to(values.device)
    return values.new_zeros(shape).index_put((places[0] + offset[0], places[1] + offset[1]), values)


def add_update(
    dense_delta: DenseDeltaFn,
    spec: LayerSpec[Any],
    params: Params,
    x: torch.Tensor,
    result: torch.Tensor | None,
    ctx: OpContext,
) -> torch.Tensor:
    """`Method.forward` for `partial(add_update, dense_delta)`: result + x @ dW^T, x cast to dW's dtype, back to x's."""
    assert result is not None
    previous_dtype = x.dtype
    delta = dense_delta(spec, params)
    return (result + F.linear(x.to(delta.dtype), delta)).to(previous_dtype)


def update_weight(dense_delta: DenseDeltaFn, spec: LayerSpec[Any], params: Params) -> torch.Tensor:
    """`Method.delta_weight` for `partial(update_weight, dense_delta)`: dW in the base weight's layout ((in, out)
    for GPT-2 Conv1D)."""
    delta = dense_delta(spec, params)
    return delta.T if spec.kind is LayerKind.CONV1D_HF else delta
