"""X-LoRA's layer (PEFT's XLoraLinearLayer / XLoraEmbeddingLayer, peft/tuners/xlora/layer.py): at every layer some
LoRA expert adapts, the experts' terms are mixed with per-token scalings.

The layer is an adapter of its own ("xlora", built by funcpeft's X-LoRA model, funcpeft._xlora) with no
parameters: it reads the experts' layers (`Method.reads_adapters`: experts "0", "1", ..., PEFT's names) and gets
the scalings (B, T, n_layers, n_experts) of the call as `ctx.call` (`Method.call_kwargs`: `xlora_scalings`). Per
layer number l (PEFT's order: the model's modules in order, every LoRA layer of any expert counted once), with
s = scalings[:, :, l, :] (B, T, E):

1. top_k_lora: entries outside each token's top k set to 0; enable_softmax_topk: softmax over the nonzero ones.
2. result += B_e(A_e(dropout_e(x * s_e))) * scaling_e * global_scaling_weight for each expert e adapting the layer
   (embedding: (A_e[ids] * s_e) @ B_e^T * scaling_e * global_scaling_weight), in expert order and PEFT's dtypes.

Merging is refused (the mixture is per token). Routing per example is refused (the layer reads other adapters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs.xlora import XLoraConfig
from ._layers import embed
from ._registry import register
from .base import CallInputs, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target

SCALINGS_KWARG = "xlora_scalings"


@dataclass(frozen=True)
class XLoraHyper:
    layer: int  # PEFT's layer_number: the position among all X-LoRA layers, in module order
    experts: tuple[str, ...]  # every expert, in order (the scalings' last axis); not all adapt every layer
    present: tuple[str, ...]  # the experts that adapt this layer (the ones it reads)
    top_k: int | None
    softmax_topk: bool
    global_scaling_weight: float


Spec = LayerSpec[XLoraHyper]


@dataclass(frozen=True)
class XLoraLayers:
    """What `Target.common` holds for X-LoRA's planning: the layers in PEFT's order and the expert names."""

    paths: tuple[str, ...]
    experts: tuple[str, ...]
    present: tuple[tuple[str, ...], ...]  # per path, the experts adapting it


def hyper(config: Any, target: Target) -> XLoraHyper:
    common = target.common
    if not isinstance(common, XLoraLayers):
        raise ValueError(
            "XLoraConfig is planned by funcpeft.get_peft_model(model, XLoraConfig(...)), which loads the LoRA experts "
            "named in `adapters`; it has no target_modules of its own"
        )
    layer = common.paths.index(target.name)
    return XLoraHyper(
        layer=layer,
        experts=common.experts,
        present=common.present[layer],
        top_k=config.top_k_lora,
        softmax_topk=config.enable_softmax_topk,
        global_scaling_weight=float(config.global_scaling_weight),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return ()


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    return {}


def reads_adapters(spec: LayerSpec[Any]) -> tuple[str, ...]:
    return spec.hyper.present


def prepare_call(layers: Mapping[str, tuple[LayerSpec[Any], Params]], call: CallInputs) -> Mapping[str, Any]:
    """Each layer gets the call's scalings (B, T, n_layers, n_experts); it picks its own layer."""
    scalings = call.kwargs.get(SCALINGS_KWARG)
    if scalings is None:
        raise ValueError(
            f"the X-LoRA layers need `{SCALINGS_KWARG}` (B, T, n_layers, n_experts); call the X-LoRA model's fn, "
            "which computes them in its scaling pass"
        )
    return {path: scalings for path in layers}


def layer_scalings(h: XLoraHyper, scalings: torch.Tensor) -> torch.Tensor:
    """PEFT's `get_maybe_topk_scalings`: this layer's (B, T, E) scalings, top-k masked and softmaxed as configured."""
    s = scalings[:, :, h.layer, :]
    if h.top_k is not None:
        _, idx = torch.topk(s, k=h.top_k, dim=-1)
        mask = torch.zeros_like(s, dtype=torch.bool).scatter(-1, idx, True)
        s = s * mask.to(s.dtype)
    if h.softmax_topk:
        nonzero = s != 0
        s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return s


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result` + the scaled experts' LoRA terms (see the module docstring); x (B, T, in) or token ids (B, T)."""
    assert result is not None
    h = spec.hyper
    s = layer_scalings(h, ctx.call)
    lead = x.shape if spec.kind is LayerKind.EMBEDDING else x.shape[:-1]
    if tuple(lead) != tuple(s.shape[:-1]):
        # an op seeing the tokens flattened (GPT-2's Conv1D runs addmm on (B * T, in)): the same tokens in order
        if math.prod(lead) != math.prod(s.shape[:-1]):
            raise ValueError(
                f"X-LoRA layer {ctx.path}: its input has token dims {tuple(lead)}, the scalings {tuple(s.shape[:-1])}; "
                "X-LoRA mixes per token of (B, T) inputs"
            )
        s = s.reshape(*lead, s.shape[-1])
    out_dtype = result.dtype
    for e, name in enumerate(h.experts):
        if name not in ctx.peers:  # PEFT: an expert that does not adapt this layer is skipped, its index kept
            continue
        espec, p = ctx.peers[name]
        se = s[..., e].unsqueeze(-1)
        if spec.kind is LayerKind.EMBEDDING:
            after_a = embed(espec, x, p["lora_embedding_A"].T)
            term = ((after_a * se) @ p["lora_embedding_B"].T) * espec.hyper.scaling * h.global_scaling_weight
            result = (result + term).to(out_dtype)  # PEFT's in-place `result +=`: rounded to result's dtype each time
            continue
        a, b = p["lora_A"], p["lora_B"]
        x = x.to(a.dtype)
        xe = ctx.dropout(x * se, espec.hyper.dropout)
        result = (result + F.linear(F.linear(xe, a), b) * espec.hyper.scaling * h.global_scaling_weight).to(out_dtype)
    return result


def _refuse(what: str) -> Exception:
    return NotImplementedError(
        f"Cannot {what} an X-LoRA model: its experts are mixed per token by the classifier, so no single weight "
        "holds them (PEFT's XLoraModel has no merge either)"
    )


XLORA = register(
    Method(
        name="xlora",
        config=XLoraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        merge=MergeHooks(refuse=_refuse),
        reads_adapters=reads_adapters,
        prepare_call=prepare_call,
        call_kwargs=frozenset({SCALINGS_KWARG}),
        kinds=frozenset({LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.EMBEDDING}),
    )
)
