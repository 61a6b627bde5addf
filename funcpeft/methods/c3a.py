"""C3A (`C3AConfig`): a block-circulant weight update applied by FFT (nn.Linear only, like PEFT).

    c3a_kernel K: (out / b, in / b, b), float32 at init
    y = base(x) + BCC(x, K) / in        BCC: y_m = Re(fft(sum_n ifft(x_n) * fft(K_mn))), x_n the n-th b-block of x
    dW = circulant(K) / in              (out, in): BCC applied to the identity, transposed

The forward never builds dW: it runs the FFTs on the input, in float32 (PEFT's casts). BCC is a hand-written
autograd Function like PEFT's (saving only x and K, PEFT's memory), with a vmap rule and a jvp, and a backward
of plain torch ops (double backward); tests/test_method_c3a.py checks it against autograd and PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fft import fft, ifft

from ..configs.c3a import C3AConfig
from ._layers import SavesInputs
from ._patterns import dotted_pattern_value
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target, UnsupportedLayerError

NAME = "c3a_kernel"


@dataclass(frozen=True)
class C3AHyper:
    block_size: int
    init: bool | str  # init_weights


Spec = LayerSpec[C3AHyper]


def hyper(config: Any, target: Target) -> C3AHyper:
    """block_size after block_size_pattern; it must divide the layer's in and out features (PEFT's messages)."""
    if target.kind is not LayerKind.LINEAR:
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only "
            "`torch.nn.Linear` is supported."
        )
    b = dotted_pattern_value(config.block_size_pattern or {}, target.name, config.block_size)
    out_f, in_f = target.module.weight.shape
    if b <= 0:
        raise ValueError(f"`block_size` should be a positive integer value but the value passed is {b}")
    if in_f % b != 0:
        raise ValueError(
            f"The block size should be a factor of the input size. However, the input size is {in_f} and the block "
            f"size is {b} (module {target.name!r})"
        )
    if out_f % b != 0:
        raise ValueError(
            f"The block size should be a factor of the output size. However, the output size is {out_f} and the "
            f"block size is {b} (module {target.name!r})"
        )
    return C3AHyper(block_size=b, init=config.init_weights)


def param_names(spec: Spec) -> tuple[str, ...]:
    return (NAME,)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's `reset_c3a_parameters`: zeros (True), normal (gaussian), or uniform (xavier / kaiming bounds)."""
    b = spec.hyper.block_size
    kernel = torch.zeros(spec.out_features // b, spec.in_features // b, b, dtype=torch.float32)
    mode = spec.hyper.init
    if mode is True:
        return {NAME: kernel}
    if mode == "gaussian":
        return {NAME: kernel.normal_(generator=generator)}
    if mode in ("xavier_uniform", False):
        bound = math.sqrt(3.0) * math.sqrt(2.0 / float(spec.in_features + spec.out_features))
    else:  # "kaiming_uniform" (the config rejects anything else)
        bound = math.sqrt(1.0 / float(spec.in_features))
    return {NAME: kernel.uniform_(-bound, bound, generator=generator)}


def _bcc(*pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """sum over (x, kernel) pairs of BCC(x, kernel), summed before the last fft (one real view of one result:
    forward AD wants a tangent laid out like its primal)."""
    spectra = []
    for x, kernel in pairs:
        _, n, b = kernel.shape
        spectra.append(torch.einsum("...nb,mnb->...mb", ifft(x.reshape(*x.shape[:-1], n, b)), fft(kernel)))
    y = fft(sum(spectra[1:], spectra[0])).real
    return y.reshape(*y.shape[:-2], -1)


class _BlockCircular(SavesInputs):
    """BCC saving only x and the kernel (PEFT's `BlockCircularConvolution`, its backward corrected). Plain autograd
    would keep `ifft(x)` (complex: twice x's bytes) until backward, 1.38x PEFT's training peak on the benchmark
    Llama. BCC is bilinear, so `jvp` is BCC of the tangents."""

    @staticmethod
    def forward(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return _bcc((x, kernel))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, kernel = ctx.saved_tensors
        m, n, b = kernel.shape
        grad_fft = fft(grad.reshape(*grad.shape[:-1], m, b))
        # the adjoint of x -> BCC(x, K) is fft(conj(G) ifft(K)).real = ifft(G fft(K)).real for real K (no conj of
        # the large G); PEFT computes fft(G ifft(K)).real, its known bug (see the tests). The kernel's is PEFT's.
        grad_x = ifft(torch.einsum("...mb,mnb->...nb", grad_fft, fft(kernel))).real
        xs = x.reshape(*x.shape[:-1], n, b)
        grad_kernel = fft(torch.einsum("...mb,...nb->mnb", grad_fft, ifft(xs))).real
        return grad_x.reshape(x.shape), grad_kernel

    @staticmethod
    def jvp(ctx: Any, tx: Any, tkernel: Any) -> torch.Tensor:
        x, kernel = ctx.saved_tensors
        return _bcc(*([(tx, kernel)] if tx is not None else []), *([(x, tkernel)] if tkernel is not None else []))


def block_circular(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """PEFT's `BlockCircularConvolution`: x (..., n * b), kernel (m, n, b) -> (..., m * b), real."""
    out: torch.Tensor = _BlockCircular.run(x, kernel)
    return out


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + BCC(x, K) / in` computed in float32, added in the result's dtype (PEFT's casts)."""
    assert result is not None
    previous_dtype = x.dtype
    x = x.to(torch.float32)
    term = block_circular(x, params[NAME].to(torch.float32)) / x.size(-1)
    return (result + term.to(result.dtype)).to(previous_dtype)


def _circulant(kernel: torch.Tensor) -> torch.Tensor:
    """PEFT's `get_circulant_fast`: the (out, in) matrix of BCC with this kernel, float32."""
    _, n, b = kernel.shape
    eye = torch.eye(n * b, dtype=kernel.dtype, device=kernel.device)
    return block_circular(eye, kernel).T


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """dW (out, in) = circulant(K) / in, float32."""
    return _circulant(params[NAME].to(torch.float32)) / spec.in_features


def _delta_like(spec: Spec, params: Params, weight: torch.Tensor) -> torch.Tensor:
    # PEFT casts the circulant to the weight's dtype before dividing by in_features
    return _circulant(params[NAME].to(torch.float32)).to(weight.dtype) / weight.size(-1)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    return weight + _delta_like(spec, params, weight).to(weight.device)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    return weight - _delta_like(spec, params, weight).to(weight.device)


C3A = register(
    Method(
        name="c3a",
        config=C3AConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight),
        keys=KeyRules(param_prefix="c3a_", unsuffixed=frozenset({NAME})),
    )
)
