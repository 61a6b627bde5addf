"""Converting a PiSSA / OLoRA / CorDA / LoRA-GA adapter to a plain LoRA adapter of the original weights
(PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)` and `LoraModel.subtract_mutated_init`).

Those inits train on residual weights W_res = W - s B0 A0. After training (A, B):

    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]

so the plain LoRA adapter lora_A = [A ; A0] (2r, in), lora_B = [B, -B0] (out, 2r), with r and lora_alpha doubled
(same scaling; alpha * sqrt(2) under rsLoRA) and init_lora_weights=True, gives the trained model on top of the
original weights: it loads anywhere (PEFT's from_pretrained too) and mixes with other LoRA adapters.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._config import MUTATING_INITS, LoraConfig, init_mode
from ._loading import load_adapter
from .io import save_adapter

Tree = Mapping[str, Mapping[str, torch.Tensor]]


def converted_config(config: LoraConfig) -> LoraConfig:
    """The plain-LoRA config of a converted adapter: init True, r and rank_pattern doubled, alpha scaled to keep s."""
    factor = 2**0.5 if config.use_rslora else 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warnings were given when the config was made
        return dataclasses.replace(
            config,
            init_lora_weights=True,
            r=config.r * 2,
            lora_alpha=config.lora_alpha * factor,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        )


def subtract_mutated_init(trained: Tree, initial: Tree) -> dict[str, dict[str, torch.Tensor]]:
    """[A ; A0] (2r, in) and [B, -B0] (out, 2r) per layer: the plain LoRA equal to training on W - s B0 A0."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, leaves in trained.items():
        if path not in initial:
            raise ValueError(
                f"the initial adapter has no layer {path!r}: it is not the one this adapter was trained from"
            )
        a0, b0 = initial[path]["lora_A"], initial[path]["lora_B"]
        a, b = leaves["lora_A"].detach(), leaves["lora_B"].detach()
        if a.shape != a0.shape or b.shape != b0.shape:
            raise ValueError(
                f"{path}: the trained lora_A / lora_B {tuple(a.shape)} / {tuple(b.shape)} do not match the initial "
                f"adapter's {tuple(a0.shape)} / {tuple(b0.shape)}: it is not the one this adapter was trained from"
            )
        out[path] = {"lora_A": torch.cat([a, a0.to(a)], dim=0), "lora_B": torch.cat([b, -b0.to(b)], dim=1)}
    return out


def convert_mutated_init(
    adapter: Tree, config: Any, path_initial: str | os.PathLike[str], model: nn.Module
) -> tuple[dict[str, dict[str, torch.Tensor]], LoraConfig]:
    """(plain LoRA tree, its config) for a trained adapter whose init changed the base weights.

    path_initial: the directory holding the adapter as initialised, saved before training. As PEFT does, its
    config is rewritten with init_lora_weights=True (so that loading it no longer changes the base weights);
    funcpeft rewrites both files (they are saved as a unit).
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"path_initial_model_for_weight_conversion applies to LoRA adapters, not {type(config).__name__}"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
        )
    if init_mode(config.init_lora_weights) not in (*MUTATING_INITS, True):
        warnings.warn(
            "`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA adapter to "
            "a LoRA adapter",
            stacklevel=3,
        )
    other = sorted({f"{p}.{k}" for p, e in adapter.items() for k in e if k not in ("lora_A", "lora_B")})
    if other:
        raise ValueError(
            f"path_initial_model_for_weight_conversion: the adapter has leaves besides lora_A / lora_B ({other[:4]}): "
            "embedding LoRA, DoRA magnitudes, modules_to_save or trainable biases. PEFT's conversion silently drops "
            "them; funcpeft refuses. Convert an adapter of linear layers only."
        )
    initial, _ = load_adapter(path_initial, model=model)
    initial = {p: {k: v.detach() for k, v in e.items()} for p, e in initial.items()}
    converted = subtract_mutated_init(adapter, initial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_initial = dataclasses.replace(config, init_lora_weights=True)
    save_adapter(path_initial, initial, plain_initial, model=model)
    return converted, converted_config(config)
