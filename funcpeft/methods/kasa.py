"""KaSA (`LoraConfig(kasa_config=KasaConfig(...))`, PEFT's KasaLinearVariant), functionally.

PEFT truncates each targeted nn.Linear's frozen weight once, dropping its r smallest singular components
(`W = U S Vh`, `W_trunc = (U_p S_p) Vh_p` over the kept ones), and adds a LoRA with a learned diagonal:

    y = W_trunc x + b + s * B (lora_diag * A(dropout(x)))

funcpeft never changes the model: `base` keeps W, and W_trunc (computed exactly as PEFT does, in the weight's
dtype) is a frozen per-layer tensor in `base` (`Method.layer_frozen`; neither saved nor counted: in PEFT it *is* the
layer's weight). So, unlike PEFT, which overwrites its weight, funcpeft holds one extra weight-sized tensor per
adapted layer (made once, not per call); the forward runs the layer's op on W_trunc itself (`uses_result` is
False). A low-rank correction of W x would be smaller but differs from PEFT's W_trunc by the SVD's
reconstruction error (~1e-6 relative, visible in outputs). "No adapter" is funcpeft's untruncated model
(fn(base, None)), so routing an example to no adapter is refused (`Method.changes_base`), and a KaSA adapter
cannot share a model with other adapters (LoraConfig.check_new_adapter_config).

Trainable, per layer: lora_A (r, in), lora_B (out, r), lora_diag (r,) (init randn; PEFT's file key
`...lora_diag`, no `.weight`). Layers: nn.Linear only (PEFT refuses GPT-2 Conv1D, embeddings and convs).
`kasa_loss` is PEFT's `LoraModel._get_kasa_loss`, the paper's regularisers to add to the task loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import LoraConfig
from . import lora
from ._registry import register
from .base import (
    LORA_UNSUFFIXED,
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
    UnsupportedLayerError,
)
from .lora import LoraHyper

DIAG = "lora_diag"
TRUNCATED = "kasa_truncated_weight"  # W_trunc (out, in), frozen, in `base`
Spec = LayerSpec[LoraHyper]


def hyper(config: Any, target: Target) -> LoraHyper:
    """LoRA's hyper-parameters on an nn.Linear, with PEFT's KaSA checks."""
    if target.kind is LayerKind.CONV1D_HF:
        raise UnsupportedLayerError(
            f"KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target nn.Linear layers "
            f"({target.name!r} is a {type(target.module).__name__})."
        )
    if target.kind is not LayerKind.LINEAR:
        raise UnsupportedLayerError(
            f"Invalid or unsupported variant combination: ('kasa_config',) for {target.name!r} "
            f"({type(target.module).__name__}): KaSA exists for nn.Linear layers only (PEFT's error)."
        )
    out = lora.hyper(config, target)
    k = min(target.module.weight.shape)
    if out.r >= k:
        raise ValueError(
            f"KaSA requires `r` ({out.r}) to be smaller than min(in_features, out_features) ({k}) so that at least one "
            f"singular component of the base weight is preserved after truncation ({target.name!r})."
        )
    return out


def param_names(spec: Spec) -> tuple[str, ...]:
    return ("lora_A", "lora_B", DIAG)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """LoRA's init (B = 0 by default, so the update starts at zero), then lora_diag ~ N(0, 1) like PEFT."""
    return {**lora.init(spec, generator), DIAG: torch.randn(spec.hyper.r, generator=generator)}


def make_truncated(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's `_truncate_base_weight`: float32 SVD, the r smallest components dropped, back in W's dtype."""
    weight: Any = module.weight
    weight = weight.detach()
    if weight.is_meta:
        return {TRUNCATED: torch.empty(spec.weight_shape, dtype=weight.dtype, device="meta")}
    u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    keep = min(weight.shape) - spec.hyper.r
    return {TRUNCATED: ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype)}


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`W_trunc x + b + s * B(diag * A(dropout(x)))` (result is None: the layer's op runs here, on W_trunc)."""
    base = F.linear(x, params[TRUNCATED], ctx.bias)
    a = params["lora_A"]
    h = F.linear(ctx.dropout(x.to(a.dtype), spec.hyper.dropout), a) * params[DIAG]
    return (base + F.linear(h, params["lora_B"]) * spec.hyper.scaling).to(base.dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """s * (B * diag) @ A (out, in): KaSA's update (the truncation is `merge_weight`'s business)."""
    return (params["lora_B"] * params[DIAG]) @ params["lora_A"] * spec.hyper.scaling


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's merged weight: `W_trunc + s B diag A` (in place of whatever `weight` is)."""
    truncated = params[TRUNCATED].to(weight.device, weight.dtype)
    return truncated + delta_weight(spec, params).to(weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `merge_weight`: funcpeft's untruncated base W (PEFT's unmerge leaves W_trunc); needs it as `base=`."""
    if base_weight is None:
        raise ValueError(
            "KaSA's unmerge needs the unmerged base weight: the merged weight holds the truncated one, and the "
            "dropped singular components cannot be recovered from it. Pass base=."
        )
    return base_weight


def kasa_loss(adapter: Mapping[str, Mapping[str, torch.Tensor]], config: Any) -> torch.Tensor:
    """PEFT's `LoraModel._get_kasa_loss` for one KaSA adapter tree: the paper's regularisers (Eq. 9-11).

    sum over layers of `beta * sum(lora_diag ** 2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)`, in float32,
    with beta / gamma from `config.kasa_config`. Add it to the task loss; a scalar tensor (0.0 with no layer).
    """
    kasa = getattr(config, "kasa_config", None)
    if kasa is None:
        raise ValueError(f"kasa_loss needs a LoraConfig with kasa_config, got {type(config).__name__} without one")
    total = torch.zeros(())
    for leaves in adapter.values():
        if DIAG not in leaves:
            continue
        diag, a, b = leaves[DIAG].float(), leaves["lora_A"].float(), leaves["lora_B"].float()
        eye = torch.eye(diag.shape[-1], device=diag.device)
        l3 = torch.linalg.norm(b.transpose(-1, -2) @ b - eye) + torch.linalg.norm(a @ a.transpose(-1, -2) - eye)
        total = total.to(diag.device) + kasa["beta"] * (diag**2).sum() + kasa["gamma"] * l3
    return total


KASA = register(
    Method(
        name="kasa",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "kasa_config",
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight),
        uses_result=lambda spec: False,
        layer_frozen=LayerFrozen(names=(TRUNCATED,), make=make_truncated, saved=False),
        keys=KeyRules(unsuffixed=LORA_UNSUFFIXED | {DIAG}),
        mixed_compatible=True,
        changes_base=True,
    )
)
