"""WaveFT (`WaveFTConfig`): a weight update learned as a few coefficients of its 2-D wavelet transform.

    use_idwt=True:  S (H, W) zeros but S[indices + offset] = waveft_spectrum (n,), H = out + red (+1 if odd),
                    W = in + red (+1 if odd), offset = ((H - out) // 2, (W - in) // 2), red from the wavelet;
                    dW = centre crop to (out, in) of IDWT2(S[:H/2, :W/2], (S[:H/2, W/2:], S[H/2:, :W/2],
                    S[H/2:, W/2:])) * scaling
    use_idwt=False: dW = S * scaling, S (out, in) zeros but S[indices] = waveft_spectrum
    y = base(x) + x @ dW^T

indices (2, n), int64: the rows / columns of PEFT's draw `randperm(out * in, seed=random_loc_seed)[:n]`, frozen
in `base` (funcpeft.methods._spectrum, shared with FourierFT: the places, the supported layers, the dense update).
Materialised per call, exactly as PEFT's `get_delta_weight`: the dense (H, W) coefficient matrix and the dense
(out, in) dW, in the spectrum's dtype (the inverse transform needs every coefficient; x is cast to that dtype).
The transform is PEFT's own torch code (funcpeft._wavelets), so no wavelet package is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._wavelets import waverec2d_one_level
from ..configs.waveft import WAVELET_REDUCTIONS, WaveFTConfig
from . import _spectrum
from ._patterns import pattern_key
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, Method, Params, Target

NAME = "waveft_spectrum"


@dataclass(frozen=True)
class WaveHyper(_spectrum.SpectrumHyper):  # init: zeros (True) or randn * 0.01
    wavelet: str
    use_idwt: bool


Spec = LayerSpec[WaveHyper]


def _in_out(module: Any, kind: LayerKind) -> tuple[int, int]:
    shape: tuple[int, int] = tuple(module.weight.shape)  # Linear (out, in); GPT-2 Conv1D (in, out)
    return (shape[0], shape[1]) if kind is LayerKind.CONV1D_HF else (shape[1], shape[0])


def common_hyper(config: Any, targets: Mapping[str, nn.Module]) -> dict[str, int] | None:
    """proportional_parameters: PEFT's `_calculate_proportional_parameters` over the targeted Linear / Conv1D
    layers: {name: max(1, round(in * out / sum(in * out) * n_frequency * layers))}; else None."""
    if not config.proportional_parameters:
        return None
    dims = {}
    for name, module in targets.items():  # PEFT's isinstance checks
        if isinstance(module, nn.Linear):
            dims[name] = _in_out(module, LayerKind.LINEAR)
        elif isinstance(module, Conv1D):
            dims[name] = _in_out(module, LayerKind.CONV1D_HF)
    if not dims:
        raise ValueError("No target modules found for proportional parameter allocation.")
    total = sum(i * o for i, o in dims.values())
    budget = config.n_frequency * len(dims)
    return {name: max(1, round((i * o) / total * budget)) for name, (i, o) in dims.items()}


def hyper(config: Any, target: Target) -> WaveHyper:
    _spectrum.check_layer(target)
    n = target.common.get(target.name) if target.common is not None else None
    if n is None:
        pattern = config.n_frequency_pattern or {}
        key = pattern_key(pattern.keys(), target.name)
        n = pattern.get(key if key is not None else target.name, config.n_frequency)
    if n <= 0:
        raise ValueError(
            f"`n_frequency` should be a positive integer value but the value passed is {n} (module {target.name!r})"
        )
    _spectrum.check_n_frequency(n, target)
    return WaveHyper(
        n_frequency=n,
        scaling=float(config.scaling),
        seed=config.random_loc_seed,
        wavelet=config.wavelet_family,
        use_idwt=bool(config.use_idwt),
        init=bool(config.init_weights),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (NAME,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT: zeros (`torch.empty` then zeroed: no draw) or `randn(n) * 0.01` from the RNG."""
    n = spec.hyper.n_frequency
    if spec.hyper.init:
        return {NAME: torch.zeros(n)}
    return {NAME: torch.randn(n, generator=generator) * 0.01}


def _dense_delta(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: dW (out, in) in the spectrum's dtype."""
    h, out_f, in_f = spec.hyper, spec.out_features, spec.in_features
    spectrum = params[NAME]
    if not h.use_idwt:
        return _spectrum.scatter(spectrum, params, (out_f, in_f)) * h.scaling
    red_rows, red_cols = WAVELET_REDUCTIONS[h.wavelet]
    rows, cols = out_f + red_rows, in_f + red_cols
    rows, cols = rows + rows % 2, cols + cols % 2
    # PEFT drops entries outside the padded matrix; an index < out (in) plus the centring offset never is
    row_off, col_off = (rows - out_f) // 2, (cols - in_f) // 2
    dense = _spectrum.scatter(spectrum, params, (rows, cols), (row_off, col_off))
    r2, c2 = rows // 2, cols // 2
    delta = (
        waverec2d_one_level(dense[:r2, :c2], dense[:r2, c2:], dense[r2:, :c2], dense[r2:, c2:], h.wavelet) * h.scaling
    )
    if delta.shape[0] != out_f or delta.shape[1] != in_f:
        r0, c0 = (delta.shape[0] - out_f) // 2, (delta.shape[1] - in_f) // 2
        delta = delta[r0 : r0 + out_f, c0 : c0 + in_f]
    return delta


WAVEFT = register(
    Method(
        name="waveft",
        config=WaveFTConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=partial(_spectrum.add_update, _dense_delta),
        delta_weight=partial(_spectrum.update_weight, _dense_delta),
        shared=_spectrum.spectral_places("waveft", common_hyper),
        keys=KeyRules(param_prefix="waveft_", unsuffixed=frozenset({NAME})),
    )
)
