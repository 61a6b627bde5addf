"""BD-LoRA (`LoraConfig(use_bdlora=BdLoraConfig(...))`, PEFT's BdLoraLinearVariant): block-diagonal A or B.

A target whose full name contains an entry of `target_modules_bd_a` gets a block-diagonal lora_A, one matching
`target_modules_bd_b` a block-diagonal lora_B (PEFT's substring rule), each of `nblocks` blocks stored stacked
(PEFT's BlockDiagonalLinear): the blocks of an (out, in) factor are rows `[i*out/n, (i+1)*out/n)` of a stored
(out, in / n) weight, acting on inputs `[i*in/n, (i+1)*in/n)`. Other targets are plain LoRA.

    block-diagonal lora_A: (r, in / nblocks), init kaiming-uniform (a=0)     lora_B: LoRA's (out, r)
    block-diagonal lora_B: (out, r / nblocks), init 0                       lora_A: LoRA's (r, in)
    y = base(x) + s * B(A(dropout(x)))          delta = s * block_diag(B) @ block_diag(A)

Layers: nn.Linear (GPT-2 Conv1D only where no pattern matches: PEFT's BlockDiagonalLinear needs the layer's
`in_features`, which Conv1D lacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import LoraConfig
from . import lora
from ._registry import register
from .base import LayerKind, LayerSpec, Method, OpContext, Params, Target, UnsupportedLayerError
from .lora import LoraHyper


@dataclass(frozen=True)
class BdLoraHyper(LoraHyper):
    block_a: bool = False  # lora_A is block-diagonal
    block_b: bool = False  # lora_B is block-diagonal
    nblocks: int = 1


Spec = LayerSpec[BdLoraHyper]


def hyper(config: Any, target: Target) -> BdLoraHyper:
    """LoRA's hyper-parameters plus which factor is block-diagonal, with PEFT's checks."""
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        raise UnsupportedLayerError(
            f"Invalid or unsupported variant combination: ('use_bdlora',) for {target.name!r} "
            f"({type(target.module).__name__}): BD-LoRA exists for linear layers only (PEFT's error)."
        )
    if config.lora_bias:
        raise NotImplementedError(
            "lora_bias=True with use_bdlora: PEFT replaces a block-diagonal lora_B by a layer without bias (and cannot "
            "merge the bias then); funcpeft does not reproduce that combination."
        )
    bd = config.use_bdlora
    name = target.name
    block_a = any(p in name for p in bd["target_modules_bd_a"] or [])
    block_b = any(p in name for p in bd["target_modules_bd_b"] or [])
    if block_a and block_b:
        raise ValueError(f"Target {name} matches both A and B block-diagonal patterns")
    if bd["match_strict"] and not (block_a or block_b):
        raise ValueError(
            f"Target {name} matches neither A nor B block-diagonal patterns."
            "If this is intentional, set match_strict=False in BdLoraConfig during initialization. "
        )
    if (block_a or block_b) and target.kind is LayerKind.CONV1D_HF:
        raise UnsupportedLayerError(
            f"BD-LoRA on {name!r}, a transformers Conv1D: PEFT's BlockDiagonalLinear reads the base layer's "
            "in_features / out_features, which Conv1D lacks (PEFT raises AttributeError). Target nn.Linear layers."
        )
    base = lora.hyper(config, target)
    n = bd["nblocks"]
    if block_a or block_b:
        weight = target.module.weight
        in_f, out_f = (weight.shape[1], base.r) if block_a else (base.r, weight.shape[0])
        if in_f % n != 0 or out_f % n != 0:
            raise ValueError(
                f"self.in_features={in_f} or self.out_features={out_f} not divisible by {n} (BD-LoRA's block-diagonal "
                f"lora_{'A' if block_a else 'B'} of {name!r})"
            )
    return BdLoraHyper(**vars(base), block_a=block_a, block_b=block_b, nblocks=n)


def param_names(spec: Spec) -> tuple[str, ...]:
    return ("lora_A", "lora_B")


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """LoRA's init, then PEFT's BlockDiagonalLinear init for the block-diagonal factor (A: kaiming, B: zeros)."""
    h, n = spec.hyper, spec.hyper.nblocks
    plain: LayerSpec[Any] = spec  # a BdLoraHyper is a LoraHyper
    out = lora.init(plain, generator)
    if h.block_a:
        a = torch.empty(h.r, spec.in_features // n)
        out["lora_A"] = torch.nn.init.kaiming_uniform_(a, generator=generator)  # a=0, unlike LoRA's a=sqrt(5)
    if h.block_b:
        out["lora_B"] = torch.zeros(spec.out_features, h.r // n)
    return out


def _apply(weight: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """PEFT's BlockDiagonalLinear.forward: x (..., in) with an (out, in / n) stored weight -> (..., out)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, n, x.shape[-1] // n)  # (B, n, in / n)
    w = weight.view(n, weight.shape[0] // n, weight.shape[1])  # (n, out / n, in / n)
    return torch.einsum("bim,inm->bin", x, w).reshape(*lead, -1)


def _factor(weight: torch.Tensor, x: torch.Tensor, block: bool, n: int) -> torch.Tensor:
    return _apply(weight, x, n) if block else F.linear(x, weight)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + s * B(A(dropout(x)))` with block-diagonal factors (PEFT: dropout, then the cast to A's dtype)."""
    assert result is not None
    h = spec.hyper
    a, b = params["lora_A"], params["lora_B"]
    x = ctx.dropout(x, h.dropout).to(a.dtype)
    term = _factor(b, _factor(a, x, h.block_a, h.nblocks), h.block_b, h.nblocks) * h.scaling
    return (result + term).to(result.dtype)


def _full(weight: torch.Tensor, block: bool, n: int) -> torch.Tensor:
    """The factor as a dense matrix: PEFT's `weight_as_blockdiagonal_matrix` (block_diag of the stacked blocks)."""
    return torch.block_diag(*torch.chunk(weight, n, dim=0)) if block else weight


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """s * block_diag(B) @ block_diag(A), transposed for Conv1D."""
    h = spec.hyper
    w = _full(params["lora_B"], h.block_b, h.nblocks) @ _full(params["lora_A"], h.block_a, h.nblocks) * h.scaling
    return w.T if spec.kind is LayerKind.CONV1D_HF else w


BDLORA = register(
    Method(
        name="bdlora",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "use_bdlora",
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        mixed_compatible=True,
    )
)
