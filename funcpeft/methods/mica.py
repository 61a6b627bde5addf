"""MiCA (`LoraConfig(init_lora_weights="mica")`, PEFT's MiCALinearVariant / MiCAEmbeddingVariant).

LoRA whose B is frozen at the base weight's minor left singular vectors and whose A starts at zero:

    W = U S Vh (W in nn.Linear layout (out, in), GPT-2 Conv1D transposed; an embedding's W^T (dim, vocab))
    lora_B = U[:, -r:]  (frozen)      lora_A = 0  (trained)      y = base(x) + s * B A x   (LoRA's forward)

Trainable, per layer: lora_A (r, in) or lora_embedding_A (r, num_embeddings). lora_B (out, r) / lora_embedding_B
(dim, r) is a frozen per-layer tensor (`Method.layer_frozen`): it lives in `base` (trees.layer_frozen_key), is saved
in and loaded from PEFT's files like PEFT's frozen nn.Parameter, and is counted among all (not trainable)
parameters. Forward, merge and files are LoRA's otherwise. Layers: nn.Linear, GPT-2 Conv1D, nn.Embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..configs import LoraConfig
from . import lora
from ._layers import adapter_dtype
from ._registry import register
from .base import LayerFrozen, LayerKind, LayerSpec, Method, Params, Target, UnsupportedLayerError
from .lora import LoraHyper

Spec = LayerSpec[LoraHyper]


def hyper(config: Any, target: Target) -> LoraHyper:
    """LoRA's hyper-parameters, for the layers PEFT's MiCA variants exist for, with PEFT's rank check."""
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.EMBEDDING):
        raise UnsupportedLayerError(
            f"Invalid or unsupported variant combination: ('mica',) for {target.name!r} "
            f"({type(target.module).__name__}): MiCA exists for nn.Linear, Conv1D and nn.Embedding layers (PEFT's error)."
        )
    out = lora.hyper(config, target)
    shape = tuple(target.module.weight.shape)
    if out.r > min(shape):
        what = "num_embeddings, embedding_dim" if target.kind is LayerKind.EMBEDDING else "in_features, out_features"
        raise ValueError(
            f"MiCA requires `r` <= min({what}) but got r={out.r} for {target.name!r} with weight shape {shape} "
            f"(max usable r is {min(shape)})."
        )
    return out


def _b_name(spec: Spec) -> str:
    return "lora_embedding_B" if spec.kind is LayerKind.EMBEDDING else "lora_B"


def param_names(spec: Spec) -> tuple[str, ...]:
    return ("lora_embedding_A",) if spec.kind is LayerKind.EMBEDDING else ("lora_A",)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """A = 0 (PEFT's `mica_init`): the adapter is a no-op until A is trained."""
    return {param_names(spec)[0]: torch.zeros(spec.hyper.r, spec.in_features)}


def make_b(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> dict[str, torch.Tensor]:
    """B = the last r left singular vectors of W (out, in) (fp32 SVD), in the adapter dtype."""
    weight: Any = module.weight
    weight = weight.detach()
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("Please initialize MiCA under float32, float16, or bfloat16.")
    dtype = adapter_dtype(weight.dtype)
    if weight.is_meta:
        return {_b_name(spec): torch.empty(spec.out_features, spec.hyper.r, dtype=dtype, device="meta")}
    w = weight.to(torch.float32)
    if spec.kind is not LayerKind.LINEAR:  # Conv1D (in, out) and embeddings (vocab, dim): the projection is W^T
        w = w.T
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    # PEFT stores it in the base dtype; its autocast then upcasts fp16/bf16 adapter params to float32
    return {_b_name(spec): u[:, -spec.hyper.r :].contiguous().to(weight.dtype).to(dtype)}


MICA = register(
    Method(
        name="mica",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "mica",
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=lora.forward,
        delta_weight=lora.delta_weight,
        layer_frozen=LayerFrozen(
            names=("lora_B", "lora_embedding_B"), make=make_b, counted=True, select=lambda spec: (_b_name(spec),)
        ),
        mixed_compatible=True,
    )
)
