"""BOFT (`BOFTConfig`): an orthogonal block-diagonal rotation of the input and a learned output scale, with
the numbers of PEFT 0.21.2's pure-torch path.

    linear:  y = (base(x @ B) - b) * s + b        (b: the layer's bias)
    conv:    y = conv(x, (W B^T) * s, b)          (W viewed (out, in * k * k); the kernel is rebuilt)

B = blockdiag(Q_1, ..., Q_D), Q_i = (I - S_i)(I + S_i)^-1 with S_i = (R_i - R_i^T) / 2 (PEFT's Cayley). Parameters:
`boft_R` (1, D, b, b) (b = block size, D * b = in_features, or in_channels * k * k for a k x k nn.Conv2d),
`boft_s` (out, 1) for linear, (1, out) for conv. Init: R = 0 and s = 1 (a no-op), or N(0, 0.1) and N(1, 0.1).

Butterfly factors: PEFT multiplies `boft_n_butterfly_factor` block-diagonal factors through permutations
only when its CUDA extension (fbd_cuda) builds; otherwise (a CPU-only torch, no ninja or nvcc) it forces the
factor to 1, with a warning, and its permutation is the identity. funcpeft reproduces that fallback: one
factor whatever boft_n_butterfly_factor is (> 1 warns; < 1 raises, as PEFT's CUDA path does), no permutation.
PEFT's CUDA path with several factors is not reproduced.

boft_dropout (training only, `fn(..., dropout_rng=...)`): int(p * D) blocks, chosen uniformly at random, are
replaced by the identity (PEFT's MultiplicativeDropoutLayer; the random choice comes from funcpeft's dropout
RNG, so it is not PEFT's draw).

Per call: the D blocks Q_i; for a linear layer the input is rotated block by block. PEFT builds the dense
(n, n) block-diagonal matrix and multiplies it by its (identity) permutation twice; funcpeft skips both,
which only changes the rounding order. For a conv the rotated, scaled kernel (weight-sized) is built per call,
as in PEFT (the rotation acts on the kernel's flattened input side). Several BOFT adapters on one linear layer
nest (PEFT multiplies their rotations and scales); on a conv they are refused (see funcpeft.methods._orth).

A quantised layer (bitsandbytes 4-bit / 8-bit, torchao, HQQ) runs its own kernel on the rotated input, then is
rescaled like a linear one (PEFT's generic quantisation backend); merging dequantises, rotates and scales, and
quantises again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._quant import QUANT_BACKENDS
from ..configs import BOFTConfig
from ._orth import check_plain_conv_geometry, refuse_stacked_conv, require_kind, square_kernel
from ._registry import register
from .base import WEIGHT_OP_KINDS, KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target


@dataclass(frozen=True)
class BOFTHyper:
    block_size: int
    block_num: int
    n: int  # the rotated size: in_features or in_channels * k * k
    kernel: int  # k of a k x k conv, 0 for a linear layer
    dropout: float  # boft_dropout
    init: bool  # init_weights


Spec = LayerSpec[BOFTHyper]


def hyper(config: Any, target: Target) -> BOFTHyper:
    """Block size and count for one layer (PEFT's checks on its CPU path, where the butterfly factor is 1)."""
    require_kind(
        target,
        "BOFT",
        (LayerKind.LINEAR, LayerKind.CONV, LayerKind.QUANT_LINEAR),
        "`torch.nn.Linear` and `torch.nn.Conv2d`",
    )
    factor = config.boft_n_butterfly_factor
    if factor < 1:
        raise ValueError(f"You can only specify boft_n_butterfly_factor {factor} to be a positive integer number.")
    if factor > 1:
        warnings.warn(
            f"BOFT on {target.name!r}: boft_n_butterfly_factor={factor} is used by PEFT 0.21.2 only through its CUDA "
            "extension; without it PEFT sets boft_n_butterfly_factor to 1, and funcpeft follows that path (one "
            "block-diagonal factor).",
            stacklevel=2,
        )
    m = target.module
    kernel = 0
    if target.kind is LayerKind.CONV:
        if m.groups > 1:
            raise NotImplementedError(
                f"BOFT does not support {type(m).__name__} layers with groups > 1 (got groups={m.groups})."
            )
        kernel = square_kernel(target, "BOFT")
        check_plain_conv_geometry(target, "BOFT")
        n, what = m.in_channels * kernel * kernel, "Convolutional kernel dimension"
    else:
        n, what = m.in_features, "in_features"
    size, num = config.boft_block_size, config.boft_block_num
    if size == 0:
        if n % num != 0:
            raise ValueError(f"{what} ({n}) must be divisible by boft_block_num ({num})!")
        size = n // num
    else:
        if n % size != 0:
            raise ValueError(f"{what} ({n}) must be divisible by boft_block_size ({size})!")
        num = n // size
    return BOFTHyper(size, num, n, kernel, float(config.boft_dropout), bool(config.init_weights))


_NAMES = ("boft_R", "boft_s")  # saved without `.weight`


def param_names(spec: Spec) -> tuple[str, ...]:
    return _NAMES


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    h = spec.hyper
    shape_r = (1, h.block_num, h.block_size, h.block_size)
    shape_s = (1, spec.out_features) if spec.kind is LayerKind.CONV else (spec.out_features, 1)
    if h.init:
        return {"boft_R": torch.zeros(shape_r), "boft_s": torch.ones(shape_s)}
    r = torch.empty(shape_r).normal_(0.0, 0.1, generator=generator)
    return {"boft_R": r, "boft_s": torch.empty(shape_s).normal_(1.0, 0.1, generator=generator)}


def cayley(data: torch.Tensor) -> torch.Tensor:
    """PEFT's `cayley_batch`: (m, b, b) -> (I - S)(I + S)^-1 with S the skew part of data, in data's dtype."""
    b, r, c = data.shape
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(r, device=data.device).unsqueeze(0).expand(b, r, c)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(data.dtype)


def _blocks(spec: Spec, boft_r: torch.Tensor) -> torch.Tensor:
    """The D orthogonal blocks (D, b, b) of the single butterfly factor."""
    n, d, b, _ = boft_r.shape
    return cayley(boft_r.reshape(n * d, b, b)).reshape(d, b, b)


def _block_dropout(spec: Spec, blocks: torch.Tensor, ctx: OpContext) -> torch.Tensor:
    """Training: int(p * D) blocks, chosen uniformly, become the identity (PEFT's MultiplicativeDropoutLayer)."""
    p = spec.hyper.dropout
    if p == 0.0 or not ctx.training:
        return blocks
    d, b = blocks.shape[0], blocks.shape[-1]
    # a uniform random order of the D blocks from fair coins of the dropout RNG: 52 random bits per block
    coins = (ctx.dropout(torch.ones(d, 52, device=blocks.device, dtype=torch.float64), 0.5) != 0).double()
    scores = coins @ torch.pow(2.0, -torch.arange(1, 53, device=blocks.device, dtype=torch.float64))
    mask = (scores.argsort().argsort() < int(p * d)).to(torch.float32).view(d, 1, 1)
    eye = torch.eye(b, device=blocks.device).repeat(d, 1, 1)
    return (1 - mask) * blocks + mask * eye


def _rotate(spec: Spec, blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (..., n) @ blockdiag(blocks), block by block."""
    d, b = spec.hyper.block_num, spec.hyper.block_size
    return torch.einsum("...dk,dkc->...dc", x.reshape(*x.shape[:-1], d, b), blocks).reshape(x.shape)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's BOFT forward and casts (the rotation in x's dtype; the scale in the adapter's)."""
    previous = x.dtype
    blocks = _block_dropout(spec, _blocks(spec, params["boft_R"]), ctx).to(previous)
    if spec.kind is LayerKind.CONV:
        return _conv_forward(spec, params, blocks, x, ctx).to(previous)
    assert ctx.inner_op is not None
    out = ctx.inner_op(_rotate(spec, blocks, x))
    scale = params["boft_s"].squeeze(-1)
    bias = ctx.bias
    out = out * scale if bias is None else (out - bias) * scale + bias
    return out.to(previous)


def _conv_forward(spec: Spec, params: Params, blocks: torch.Tensor, x: torch.Tensor, ctx: OpContext) -> torch.Tensor:
    """PEFT's conv path: `conv2d(x, (W B^T) * s, b, padding[0], stride[0])` (hyper() refused other geometries)."""
    refuse_stacked_conv("BOFT", ctx)
    weight = ctx.weight
    x = x.to(weight.dtype)
    scaled = _rotate_rows(spec, blocks, weight.reshape(spec.out_features, spec.hyper.n)) * _scale(spec, params)
    scaled = scaled.reshape(weight.shape)
    bias = ctx.bias.to(scaled.dtype) if ctx.bias is not None else None
    g = spec.conv
    assert isinstance(g.padding, tuple)
    return F.conv2d(x.to(scaled.dtype), scaled, bias, padding=g.padding[0], stride=g.stride[0])


def _rotate_rows(spec: Spec, blocks: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """flat (out, n) @ blockdiag(blocks)^T: PEFT's `(B @ W^T)^T`, block by block."""
    d, b = spec.hyper.block_num, spec.hyper.block_size
    return torch.einsum("odk,dck->odc", flat.reshape(-1, d, b), blocks).reshape(flat.shape)


# -- merging --------------------------------------------------------------------------------------------------
def rotation_matrix(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight` rotation: the dense (n, n) block-diagonal matrix, in the adapter's dtype."""
    return torch.block_diag(*_blocks(spec, params["boft_R"]).unbind(0))


def _scale(spec: Spec, params: Params) -> torch.Tensor:
    """boft_s as (out, 1), broadcasting over W's rows."""
    s = params["boft_s"]
    return s.t() if spec.kind is LayerKind.CONV else s


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's merge: `(B @ W^T)^T * s` with W viewed (out, n), back in W's dtype."""
    rot = rotation_matrix(spec, params)
    flat = weight.reshape(spec.out_features, spec.hyper.n)
    merged = torch.mm(rot, flat.t().to(rot.dtype)).t() * _scale(spec, params)
    return merged.reshape(weight.shape).to(weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's unmerge: `(B^T @ W'^T)^T * (1 / s)`."""
    rot = rotation_matrix(spec, params)
    flat = weight.reshape(spec.out_features, spec.hyper.n)
    restored = torch.mm(rot.t(), flat.t().to(rot.dtype)).t() * (1 / _scale(spec, params))
    return restored.reshape(weight.shape).to(weight.dtype)


BOFT = register(
    Method(
        name="boft",
        config=BOFTConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        uses_result=lambda spec: False,  # the layer below runs on the rotated input
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, rounding_warning=False),
        keys=KeyRules(param_prefix="boft_", unsuffixed=frozenset(_NAMES)),
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
        quant_backends=QUANT_BACKENDS,  # PEFT's generic backend: bnb, torchao, HQQ
        torchao_needs_requantiser=True,
    )
)
