"""OFT (`OFTConfig`): a block-diagonal orthogonal matrix rotates a layer's input, with PEFT 0.21.2's forward.

    linear, conv:  y = base(rotate(x))       rotate(v) = v @ blockdiag(R_1, ..., R_r) on the last dim
    embedding:     y = rotate(base(ids))     (the rotated dim is embedding_dim)

Parameters, per layer: `oft_R` (`oft_embedding_R` on an embedding), shape (r, b(b-1)/2), or (1, ...) with
block_share: the upper-triangle entries of r skew-symmetric b x b matrices Q_i (b = block size; r * b is
the rotated size n: in_features, embedding_dim, or in_channels * k * k for a k x k nn.Conv2d). Each block
is R_i = (I - Q_i)(I + Q_i)^-1 (Cayley), or with use_cayley_neumann its series I + 2Q + 2Q^2 + ... + Q^(t-1)
(t = num_cayley_neumann_terms, PEFT's exact truncation). Init: zeros (R = I, a no-op) or N(0, 0.1).

coft (constrained OFT): each Q_i is first scaled into the ball of radius eps / sqrt(rows). PEFT writes the
projected values back into its parameter on every call (in place, under no_grad); funcpeft never mutates
the adapter: the forward uses the projected values with an identity gradient, which gives PEFT's outputs
and gradients for the same stored values. To also store them as PEFT does (so that an optimizer steps
from the projected point: PEFT's training trajectory), apply `coft_project` to the tree before each update.

Conv layers (PEFT's `_unfold` / `_fold`): the input's k x k patches (stride 1, no padding) are rotated
and folded back by F.fold, which sums overlapping patches (and PEFT's reshape before it reorders them
when the output has more than one position). For k > 1 the layer is then not the identity at init unless
the input is exactly k x k, and merging changes the output: funcpeft follows PEFT and warns.

Several OFT adapters on one layer apply to the input in activation order, the first adapter's rotation
first (PEFT's loop; `Method.outermost_first`). PEFT merges them in the same order, which composes the
rotations the other way round, so its merged layer differs from its unmerged one unless they commute:
funcpeft's merge follows PEFT's merge.

module_dropout is saved but never applied: PEFT 0.21.2 builds its dropout layer and never calls it.

Per call: the r (or 1) blocks R_i and the rotated input (for a conv, the unfolded patches), as in PEFT;
nothing weight-sized. Merging builds the dense (n, n) block-diagonal matrix, as PEFT does. Per-example
routing runs this forward under vmap: one set of blocks per example, still nothing weight-sized.

A quantised layer (bitsandbytes 4-bit / 8-bit, torchao, HQQ) runs its own kernel on the rotated input (PEFT's
generic quantisation backend); merging dequantises, rotates and quantises again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._quant import QUANT_BACKENDS
from ..configs import OFTConfig
from ._orth import cpu_half_to_float, require_kind, square_kernel
from ._registry import register
from .base import WEIGHT_OP_KINDS, KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target


@dataclass(frozen=True)
class OFTHyper:
    r: int  # number of blocks (after PEFT's adjustment to a divisor of n)
    block_size: int
    n: int  # the rotated size: in_features, embedding_dim or in_channels * k * k
    kernel: int  # k of a k x k conv, 0 for other layers
    coft: bool
    eps: float
    block_share: bool
    neumann: bool  # use_cayley_neumann
    neumann_terms: int
    init: bool  # init_weights


Spec = LayerSpec[OFTHyper]


def adjust(n: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of n closest to `value` (the lower one on a tie)."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def hyper(config: Any, target: Target) -> OFTHyper:
    """Blocks and options for one layer; PEFT's warnings when r / oft_block_size does not divide n."""
    require_kind(
        target,
        "OFT",
        (LayerKind.LINEAR, LayerKind.EMBEDDING, LayerKind.CONV, LayerKind.QUANT_LINEAR),
        "`torch.nn.Linear`, `torch.nn.Conv2d`, `torch.nn.Embedding`",
    )
    m = target.module
    kernel = 0
    if target.kind is LayerKind.CONV:
        if m.dilation[0] > 1:
            raise ValueError("Conv2d with dilation > 1 is not supported by OFT.")
        kernel = square_kernel(target, "OFT")
        n = m.in_channels * kernel * kernel
        if kernel > 1:
            warnings.warn(
                f"OFT on {target.name!r} ({kernel}x{kernel} conv): PEFT 0.21.2 rotates the input's {kernel}x{kernel} "
                "patches and folds them back by summing overlapping patches, so unless the input is exactly "
                f"{kernel}x{kernel} the adapter is not the identity at init and merging changes the output. "
                "funcpeft follows PEFT.",
                stacklevel=2,
            )
    else:
        n = m.embedding_dim if target.kind is LayerKind.EMBEDDING else m.in_features
    r, size = config.r, config.oft_block_size
    if r == 0:
        if n % size != 0 or size > n:
            size, old = adjust(n, size), size
            warnings.warn(f"Invalid `oft_block_size` ({old})! Adjusted `oft_block_size` to ({size}).", stacklevel=2)
        r = n // size
    else:
        if n % r != 0 or r > n:
            r, old = adjust(n, r), r
            warnings.warn(f"Invalid `r` ({old})! Adjusted `r` to ({r}).", stacklevel=2)
        size = n // r
    return OFTHyper(
        r=r,
        block_size=size,
        n=n,
        kernel=kernel,
        coft=bool(config.coft),
        eps=float(config.eps),
        block_share=bool(config.block_share),
        neumann=bool(config.use_cayley_neumann),
        neumann_terms=int(config.num_cayley_neumann_terms),
        init=bool(config.init_weights),
    )


def _name(spec: Spec) -> str:
    return "oft_embedding_R" if spec.kind is LayerKind.EMBEDDING else "oft_R"


def param_names(spec: Spec) -> tuple[str, ...]:
    return (_name(spec),)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    h = spec.hyper
    shape = (1 if h.block_share else h.r, h.block_size * (h.block_size - 1) // 2)
    if h.init:
        return {_name(spec): torch.zeros(shape)}
    return {_name(spec): torch.empty(shape).normal_(0.0, 0.1, generator=generator)}


# -- the rotation ---------------------------------------------------------------------------------------------
def _triu(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(size, size, 1, device=device)
    return rows, cols


def _skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(rows, b(b-1)/2) -> (rows, b, b): the entries above the diagonal, minus the transpose (PEFT's layout)."""
    rows, cols = _triu(size, vec.device)
    flat = vec.new_zeros(vec.shape[0], size * size).index_copy(1, rows * size + cols, vec)
    m = flat.reshape(vec.shape[0], size, size)
    return m - m.transpose(-2, -1)


def _projected(spec: Spec, vec: torch.Tensor) -> torch.Tensor:
    """PEFT's `_project_batch` (COFT), without gradient: each Q_i scaled into the ball of radius eps/sqrt(rows)."""
    size = spec.hyper.block_size
    q = _skew(vec.detach(), size)
    eps = spec.hyper.eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= eps, q, eps * (q / norm))
    rows, cols = _triu(size, vec.device)
    return out[:, rows, cols]


def coft_project(spec: Spec, params: Params) -> Params:
    """The layer's params with `oft_R` replaced by its COFT projection (what PEFT stores after each call).

    A no-op (the same dict) unless the layer's config has coft=True. PEFT's optimizer steps from the projected
    values (its forward stored them); to follow the same trajectory, project every adapted layer before each
    update (the gradients do not change): `tree = {p: oft.coft_project(plan[p].spec, e) if plan[p].spec else e
    for p, e in tree.items()}` with `plan = pm.plans[adapter_name]`.
    """
    if not spec.hyper.coft:
        return params
    name = _name(spec)
    return {**params, name: _projected(spec, params[name])}


def _cayley(spec: Spec, q: torch.Tensor) -> torch.Tensor:
    """PEFT's `_cayley_batch` on skew matrices (rows, b, b), in q's dtype."""
    h = spec.hyper
    b, size = q.shape[0], q.shape[-1]
    if h.neumann:
        r = torch.eye(size, device=q.device, dtype=q.dtype).repeat(b, 1, 1)
        t = h.neumann_terms
        if t > 1:
            r = torch.add(r, q, alpha=2.0)
            if t > 2:
                power = torch.bmm(q, q)
                r = torch.add(r, power, alpha=2.0)
                for _ in range(3, t - 1):
                    power = torch.bmm(power, q)
                    r = torch.add(r, power, alpha=2.0)
                r = r + torch.bmm(power, q)
        return r.to(q.dtype)
    eye = torch.eye(size, device=q.device).unsqueeze(0).expand(b, size, size)
    return torch.linalg.solve(eye + q, eye - q, left=False).to(q.dtype)


def rotation_blocks(spec: Spec, vec: torch.Tensor) -> torch.Tensor:
    """The blocks R_i, (r, b, b) or (1, b, b) with block_share, in vec's dtype (COFT: straight-through)."""
    if spec.hyper.coft:  # the projected values, with the gradient of the stored ones (PEFT's in-place copy)
        vec = _projected(spec, vec) + (vec - vec.detach())
    return _cayley(spec, _skew(vec, spec.hyper.block_size))


def _rotate(spec: Spec, blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (..., n) @ blockdiag(blocks): PEFT's `einsum("...rk,rkc->...rc")` on x viewed (..., r, b)."""
    h = spec.hyper
    rank = h.n // h.block_size if h.block_share else h.r
    if h.block_share:
        blocks = blocks.repeat(rank, 1, 1)
    rotated = torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], rank, h.block_size), blocks)
    return rotated.reshape(x.shape)


def _rotate_conv(spec: Spec, blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PEFT's `_unfold` -> rotate -> `_fold` on x (B, C, H, W); an unbatched (C, H, W) input is a batch of one."""
    if x.dim() == 3:
        return _rotate_conv(spec, blocks, x.unsqueeze(0)).squeeze(0)
    k = spec.hyper.kernel
    b, c, height, width = x.shape
    ho, wo = height - k + 1, width - k + 1
    patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, -1)
    patches = _rotate(spec, blocks, patches)
    # PEFT's exact reshape (it regroups the patches when ho * wo > 1), then F.fold sums overlapping ones
    patches = patches.reshape(b, ho, wo, c, k, k).permute(0, 3, 1, 2, 4, 5).reshape(b, c * k * k, ho * wo)
    return F.fold(patches, output_size=(height, width), kernel_size=(k, k), stride=(1, 1))


def uses_result(spec: Spec) -> bool:
    return spec.kind is LayerKind.EMBEDDING  # other layers: the layer below runs on the rotated input


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's OFT forward and casts: rotate the input in the adapter's dtype, run the layer below on it."""
    vec = params[_name(spec)]
    blocks = rotation_blocks(spec, vec)
    if spec.kind is LayerKind.EMBEDDING:
        assert result is not None
        return _rotate(spec, blocks, result.to(vec.dtype)).to(result.dtype)
    previous = x.dtype
    x = x.to(vec.dtype)
    rotated = _rotate_conv(spec, blocks, x) if spec.kind is LayerKind.CONV else _rotate(spec, blocks, x)
    assert ctx.inner_op is not None
    return ctx.inner_op(rotated.to(previous)).to(previous)


# -- merging --------------------------------------------------------------------------------------------------
def rotation_matrix(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: the dense block-diagonal rotation (n, n), in the adapter's dtype."""
    vec = params[_name(spec)]
    blocks = rotation_blocks(spec, cpu_half_to_float(vec))
    rank = spec.hyper.n // spec.hyper.block_size if spec.hyper.block_share else spec.hyper.r
    parts = [blocks[0]] * rank if blocks.shape[0] == 1 else list(blocks.unbind(0))
    return torch.block_diag(*parts).to(vec.dtype)


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """W R^T (linear; a conv's W viewed (out, n)), or W R for an embedding's (num, dim) table."""
    rot = rotation_matrix(spec, params)
    if spec.kind is LayerKind.EMBEDDING:
        return torch.mm(weight.to(rot.dtype), rot).to(weight.dtype)
    flat = weight.reshape(spec.out_features, spec.hyper.n)
    return torch.mm(rot, flat.t().to(rot.dtype)).t().reshape(weight.shape).to(weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's unmerge: multiply by the inverse rotation, inverted in float32."""
    rot = rotation_matrix(spec, params)
    previous = rot.dtype
    inverse = torch.linalg.inv(rot.float())
    if spec.kind is LayerKind.EMBEDDING:
        return torch.mm(weight.to(inverse.dtype), inverse).to(weight.dtype)
    flat = weight.reshape(spec.out_features, spec.hyper.n)
    return torch.mm(inverse.to(previous), flat.t().to(previous)).t().reshape(weight.shape).to(weight.dtype)


OFT = register(
    Method(
        name="oft",
        config=OFTConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        uses_result=uses_result,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, rounding_warning=False),
        keys=KeyRules(param_prefix="oft_", unsuffixed=frozenset()),
        mixed_compatible=True,
        outermost_first=True,
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
        quant_backends=QUANT_BACKENDS,  # PEFT's generic backend: bnb, torchao, HQQ
        torchao_needs_requantiser=True,
    )
)
