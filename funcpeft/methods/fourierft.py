"""FourierFT (`FourierFTConfig`): a weight update learned as a few entries of its 2-D Fourier spectrum.

    dW = Re(ifft2(S)) * scaling      S (out, in): zeros except S[indices] = fourierft_spectrum (n,)
    y = base(x) + x @ dW^T

indices (2, n), int64: the rows / columns of PEFT's draw `randperm(out * in, seed=random_loc_seed)[:n]`, frozen
in `base` (funcpeft.methods._spectrum, shared with WaveFT: the places, the supported layers, the dense update).
Like PEFT, every call builds the dense (out, in) dW (the inverse FFT needs the whole spectrum), in float32.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..configs.fourierft import FourierFTConfig
from . import _spectrum
from ._patterns import dotted_pattern_value
from ._registry import register
from .base import KeyRules, LayerSpec, Method, Params, Target

NAME = "fourierft_spectrum"
Spec = LayerSpec[_spectrum.SpectrumHyper]


def hyper(config: Any, target: Target) -> _spectrum.SpectrumHyper:
    _spectrum.check_layer(target)
    n = dotted_pattern_value(config.n_frequency_pattern or {}, target.name, config.n_frequency)
    _spectrum.check_n_frequency(n, target)
    return _spectrum.SpectrumHyper(
        n_frequency=n, scaling=float(config.scaling), seed=config.random_loc_seed, init=bool(config.init_weights)
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (NAME,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT draws randn(n) in every case (then zeroes it for init_weights=True): the same RNG use."""
    spectrum = torch.randn(spec.hyper.n_frequency, generator=generator)
    return {NAME: torch.zeros_like(spectrum) if spec.hyper.init else spectrum}


def _dense_delta(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: dW (out, in) in the spectrum's dtype (the FFT runs in float32)."""
    spectrum = params[NAME]
    dense = _spectrum.scatter(spectrum.float(), params, (spec.out_features, spec.in_features))
    return (torch.fft.ifft2(dense).real * spec.hyper.scaling).to(spectrum.dtype)


FOURIERFT = register(
    Method(
        name="fourierft",
        config=FourierFTConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=partial(_spectrum.add_update, _dense_delta),
        delta_weight=partial(_spectrum.update_weight, _dense_delta),
        shared=_spectrum.spectral_places("fourierft"),
        keys=KeyRules(param_prefix="fourierft_", unsuffixed=frozenset({NAME})),
    )
)
