"""LoRA-GA's gradient estimation (PEFT's `peft.tuners.lora.loraga.preprocess_loraga`), functionally.

    grads = funcpeft.loraga.preprocess_loraga(model, config, train_step)   # init_lora_weights="lora_ga"
    pm = funcpeft.get_peft_model(model, config, init_data=grads)           # pm.base holds W - s B A

`train_step(forward)` gets `forward(*args, **kwargs)`, the model's own call in training mode, and runs its
forward and backward passes (e.g. `for batch in batches: forward(**batch).loss.backward()`), as PEFT's
`train_step()` does on the model. Only the targeted nn.Linear / GPT-2 Conv1D weights take gradients; each
layer's result is its accumulated gradient divided by the number of backward passes through it (PEFT's
rule), `None` for a layer no backward pass reached (PEFT then falls back to init_lora_weights=True there).
The model's parameters, `.grad`, requires_grad flags, mode and buffers are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._capture import hooked_forward, linear_targets
from ._config import LoraConfig


def estimate_gradients(
    model: nn.Module, lora_config: LoraConfig, train_step: Callable[[Callable[..., Any]], Any]
) -> dict[str, torch.Tensor | None]:
    """`{path: mean gradient of the layer's weight (weight's shape and layout) or None}` (PEFT's `estimate_gradients`)."""
    targets = linear_targets(model, lora_config)
    if not targets:
        raise ValueError(
            "No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear and Conv1D layers. "
            "Please ensure your model contains at least one of these layer types in target_modules."
        )
    # one leaf per parameter object: tied names share it, so their gradients add up as on PEFT's shared weight
    weights: dict[str, torch.Tensor] = {p: module.weight for p, module in targets.items()}  # type: ignore[misc]
    leaves = {p: w.detach().requires_grad_(True) for p, w in weights.items()}
    by_id = {id(w): leaves[p] for p, w in weights.items()}
    params = {n: by_id.get(id(t), t.detach()) for n, t in model.named_parameters(remove_duplicate=False)}
    counts = dict.fromkeys(targets, 0)

    def make_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            counts[path] += 1

        return hook

    with hooked_forward(model, params, training=True, backward_hooks={p: make_hook(p) for p in targets}) as forward:
        with torch.enable_grad():
            train_step(forward)
    out: dict[str, torch.Tensor | None] = {}
    for path, leaf in leaves.items():
        grad = leaf.grad
        out[path] = grad.detach() / counts[path] if counts[path] > 0 and grad is not None else None
    return out


def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[Callable[..., Any]], Any] | None = None,
    cache_file: str | None = None,
) -> dict[str, torch.Tensor | None]:
    """LoRA-GA's per-layer gradients, `{module path: gradient or None}`: pass it as get_peft_model's `init_data`.

    Args:
        model: the base model (never modified).
        lora_config: a LoraConfig with init_lora_weights="lora_ga" and a lora_ga_config.
        train_step: called once as `train_step(forward)`; runs forward and backward passes with `forward`.
            Needed unless `cache_file` exists.
        cache_file: PEFT's gradient cache (torch.save of `{f"{path}._peft_loraga_grad": grad}`): read when it
            exists, else written after the estimation.

    Returns:
        `{module path: gradient}` for every targeted nn.Linear / Conv1D layer: the mean gradient of its weight, in
        the weight's shape and layout ((out, in); (in, out) for Conv1D), or None for a layer no backward pass
        reached.
    """
    if not isinstance(lora_config, LoraConfig) or lora_config.lora_ga_config is None:
        raise ValueError(
            "If you want to use LoRA-GA, please initialize the LoraConfig with "
            "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...)."
        )
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        device = next(iter(model.parameters())).device
        cache = torch.load(cache_file, map_location=device, weights_only=True)
        return {p: cache.get(f"{p}._peft_loraga_grad") for p in linear_targets(model, lora_config)}
    if train_step is None:
        raise ValueError("preprocess_loraga needs train_step (no cache_file to read the gradients from).")
    grads = estimate_gradients(model, lora_config, train_step)
    if cache_file is not None:
        if os.path.dirname(cache_file):
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        torch.save({f"{p}._peft_loraga_grad": g for p, g in grads.items() if g is not None}, cache_file)
    return grads
