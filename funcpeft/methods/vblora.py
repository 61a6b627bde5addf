"""VB-LoRA (`VBLoRAConfig`): `y = base(x) + B(A(dropout(x)))`, A and B assembled from a shared vector bank.

Shapes (vl = vector_length, nv = num_vectors; nn.Linear orientation, also for GPT-2 Conv1D):
  vblora_vector_bank (nv, vl)          TRAINABLE, shared by all layers: adapter["<shared>"] (`Method.shared_trainable`),
                                       saved by PEFT as `base_model.vblora_vector_bank`
  vblora_logits_A    (r, in / vl, nv)  per layer
  vblora_logits_B    (out / vl, r, nv) per layer

Each logit row picks its `topk` bank vectors and mixes them with the softmax of their logits:
A (r, in) = mix(logits_A).reshape(r, in), B (out, r) = mix(logits_B).transpose(1, 2).reshape(out, r).
Init (PEFT's order, reproduced): for each layer, the bank ~ U(-b, b) is drawn again (the last draw is kept), then
logits_A, logits_B ~ N(0, init_logits_std). Per call, A and B are materialised (rank-sized, like PEFT), never
a weight-sized tensor. With `save_only_topk_weights`, files hold each row's top-k indices and k-1 weights
(`FileCodec`); loading turns them back into logits that are -inf off the top k, usable for inference and
merging only (training raises, like PEFT).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import VBLoRAConfig
from ._registry import register
from .base import (
    FileCodec,
    KeyRules,
    LayerKind,
    LayerSpec,
    Method,
    OpContext,
    Params,
    SharedParams,
    Target,
    UnsupportedLayerError,
)

BANK, LOGITS_A, LOGITS_B = "vblora_vector_bank", "vblora_logits_A", "vblora_logits_B"


@dataclass(frozen=True)
class VBLoRAHyper:
    r: int
    topk: int
    num_vectors: int
    vector_length: int
    dropout: float  # vblora_dropout, on the input of A
    logits_std: float  # init_logits_std
    bank_bound: float  # init_vector_bank_bound


Spec = LayerSpec[VBLoRAHyper]


def hyper(config: Any, target: Target) -> VBLoRAHyper:
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only the "
            "following modules are supported: `torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`."
        )
    shape = target.module.weight.shape
    in_f, out_f = (shape[1], shape[0]) if target.kind is LayerKind.LINEAR else (shape[0], shape[1])
    vl = config.vector_length
    if in_f % vl != 0:
        raise ValueError(f"`in_features` {in_f} must be divisible by `vector_length` {vl} (module {target.name!r})")
    if out_f % vl != 0:
        raise ValueError(f"`out_features` {out_f} must be divisible by `vector_length` {vl} (module {target.name!r})")
    return VBLoRAHyper(
        r=config.r,
        topk=config.topk,
        num_vectors=config.num_vectors,
        vector_length=vl,
        dropout=float(config.vblora_dropout),
        logits_std=float(config.init_logits_std),
        bank_bound=float(config.init_vector_bank_bound),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return (LOGITS_A, LOGITS_B)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """logits_A (r, in / vl, nv), logits_B (out / vl, r, nv) ~ N(0, init_logits_std), A drawn first."""
    h = spec.hyper
    a = torch.zeros(h.r, spec.in_features // h.vector_length, h.num_vectors)
    b = torch.zeros(spec.out_features // h.vector_length, h.r, h.num_vectors)
    torch.nn.init.normal_(a, 0, h.logits_std, generator=generator)
    torch.nn.init.normal_(b, 0, h.logits_std, generator=generator)
    return {LOGITS_A: a, LOGITS_B: b}


def init_bank(spec: Spec, generator: torch.Generator | None) -> Params:
    """The shared vector bank (nv, vl) ~ U(-init_vector_bank_bound, init_vector_bank_bound)."""
    h = spec.hyper
    bank = torch.zeros(h.num_vectors, h.vector_length)
    return {BANK: torch.nn.init.uniform_(bank, -h.bank_bound, h.bank_bound, generator=generator)}


def _mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., nv) logits -> (..., vl): the softmax-weighted sum of each row's top-k bank vectors."""
    top, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def _checking() -> bool:
    """Value checks need concrete tensors: skip them while compiling or inside a torch.func transform."""
    return not torch.compiler.is_dynamo_compiling() and torch._C._functorch.peek_interpreter_stack() is None


def lora_matrices(
    spec: Spec, params: Params, training: bool = False, fp32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r), PEFT's `_get_lora_matrices` (fp32: computed in float32, for CPU half merges)."""
    logits_a, logits_b = params[LOGITS_A], params[LOGITS_B]
    if training and _checking() and logits_a[0, 0].isinf().any():
        raise RuntimeError(
            "Found infinity values in VB-LoRA logits. Ensure training was not resumed from a `save_only_topk_weights` model."
        )
    bank = params[BANK].to(logits_a.device)
    if fp32:
        logits_a, logits_b, bank = logits_a.float(), logits_b.float(), bank.float()
    topk = spec.hyper.topk
    a = _mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = _mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + B(A(dropout(x)))` in PEFT's dtypes (x cast to the bank's dtype; output in x's dtype)."""
    assert result is not None
    previous = x.dtype
    a, b = lora_matrices(spec, params, training=ctx.training)
    x = ctx.dropout(x.to(params[BANK].dtype), spec.hyper.dropout)
    return (result + F.linear(F.linear(x, a), b)).to(previous)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """B @ A in the base weight's layout (transposed for Conv1D); float32 maths for CPU half tensors, like PEFT."""
    logits = params[LOGITS_A]
    fp32 = logits.device.type == "cpu" and logits.dtype in (torch.float16, torch.bfloat16)
    a, b = lora_matrices(spec, params, fp32=fp32)
    w = b @ a
    return w.T if spec.kind is LayerKind.CONV1D_HF else w


def _index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's smallest integer dtype for top-k indices."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32 if num_vectors < 2**31 else torch.int64


def encode(config: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """save_only_topk_weights: each logits tensor -> `{key}_topk_indices` and `{key}_topk_weights` (k-1 of k)."""
    if not config.save_only_topk_weights:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if "vblora_logits" not in key:
            out[key] = t
            continue
        logits, indices = t.topk(config.topk)
        out[key + "_topk_indices"] = indices.to(_index_dtype(config.num_vectors))
        out[key + "_topk_weights"] = torch.softmax(logits, dim=-1)[:, :, :-1].contiguous()
    return out


def decode(config: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's `_remap_adapter_state_dict_for_load`: top-k indices and weights back to logits (-inf elsewhere)."""
    if not config.save_only_topk_weights:
        return dict(tensors)
    out = dict(tensors)
    for key in [k for k in tensors if "_topk_indices" in k]:
        weights_key = key.replace("_topk_indices", "_topk_weights")
        if weights_key not in out:
            raise ValueError(f"VB-LoRA checkpoint: {key} has no matching {weights_key}")
        indices, weights = out.pop(key).to(torch.long), out.pop(weights_key)
        weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
        logits = torch.log(weights)
        full = torch.full((*logits.shape[:-1], config.num_vectors), float("-inf"), device=logits.device)
        out[key.replace("_topk_indices", "")] = full.scatter(-1, indices, logits.to(full.dtype))
    return out


VBLORA = register(
    Method(
        name="vblora",
        config=VBLoRAConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        shared_trainable=SharedParams(init=init_bank, per_layer_draw=True),
        codec=FileCodec(encode=encode, decode=decode),
        keys=KeyRules(param_prefix="vblora_", unsuffixed=frozenset({LOGITS_A, LOGITS_B, BANK})),
    )
)
