"""`create_arrow_model`: PEFT's Arrow setup (peft/tuners/lora/arrow.py), functionally.

    pm = funcpeft.create_arrow_model(model, ["experts/ts0", "experts/ts1"], funcpeft.ArrowConfig(top_k=1))
    fn, base, adapters = pm          # adapters: {"arrow_router": tree, "task_0": tree, "task_1": tree}
    out = fn(base, adapters, **inputs)   # only the router is applied; it mixes the experts per token

The experts are loaded as adapters "task_i" (and "gks_i", GenKnowSub's general experts), frozen unless
`is_trainable`; the router "arrow_router" is a LoRA adapter with `arrow_config` (its own lora_A / lora_B are
trainable, saved, and unused by its forward, as in PEFT). See funcpeft.methods.arrow for the routing.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ._config import ArrowConfig, LoraConfig
from ._model import FunctionalPeftModel, from_pretrained
from .methods.base import LayerKind

TASK_ADAPTER_PREFIX = "task_"
GKS_ADAPTER_PREFIX = "gks_"
ROUTER = "arrow_router"


def _check_compatible(pm: FunctionalPeftModel, names: Sequence[str]) -> tuple[list[str], int]:
    """PEFT's `check_loaded_lora_compatibility_arrow`: the experts share rank, shapes and target names."""
    reference: dict[str, Any] | None = None
    for name in names:
        entries = [(p, e) for p, e in pm.plans[name].items() if e.spec is not None]
        modules = {p.split(".")[-1] for p, _ in entries}
        last = entries[-1][1].spec if entries else None
        r = getattr(last.hyper, "r", None) if last is not None else None
        shapes = (
            (dict(entries[-1][1].shapes).get("lora_A"), dict(entries[-1][1].shapes).get("lora_B")) if entries else None
        )
        if reference is None:
            reference = {"r": r, "shapes": shapes, "modules": modules}
            continue
        if r != reference["r"]:
            raise ValueError(f"[{name}] rank mismatch: {r} != {reference['r']}")
        if shapes != reference["shapes"]:
            raise ValueError(f"[{name}] shape mismatch: {shapes} != {reference['shapes']}")
        if modules != reference["modules"]:
            raise ValueError(
                f"[{name}] target_modules mismatch:\n  this adapter -> {sorted(modules)}\n"
                f"  reference   -> {sorted(reference['modules'])}"
            )
    assert reference is not None
    return sorted(reference["modules"]), int(reference["r"])


def _check_linear_only(pm: FunctionalPeftModel, names: Sequence[str]) -> None:
    """PEFT's `ensure_adapters_target_linear_layers_only` (nn.Linear, nn.Conv1d, GPT-2 Conv1D)."""
    offenders = []
    modules = dict(pm.model.named_modules())
    for name in names:
        for path, e in pm.plans[name].items():
            if e.spec is None:
                continue
            module = modules[path]
            if e.spec.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF) and not isinstance(module, nn.Conv1d):
                offenders.append((name, path, type(module).__name__))
    if offenders:
        lines = [
            "LoRA adapters must only target Linear-like layers (nn.Linear, nn.Conv1d, HF Conv1D, or "
            "bitsandbytes.nn.Linear4bit). Found:"
        ]
        lines += [f"  - adapter '{n}' on module '{p}' of type {t}" for n, p, t in offenders]
        raise TypeError("\n".join(lines))


def create_arrow_model(
    base_model: nn.Module,
    task_specific_adapter_paths: Sequence[str | os.PathLike[str]],
    arrow_config: ArrowConfig,
    general_adapter_paths: Sequence[str | os.PathLike[str]] | None = None,
    **adapter_kwargs: Any,
) -> FunctionalPeftModel:
    """PEFT's `create_arrow_model`: load the task experts (and GenKnowSub's general ones), add the Arrow router.

    Args:
        base_model: the plain model (never mutated).
        task_specific_adapter_paths: local directories of trained LoRA adapters (PEFT's files), loaded as
            "task_0", "task_1", ...; they must share rank, shapes and target module names.
        arrow_config: an ArrowConfig (not modified: its task/gks adapter names are set on a copy).
        general_adapter_paths: GenKnowSub's general adapters ("gks_0", ...), needed when `use_gks`.
        adapter_kwargs: passed to the loading (`is_trainable`, `autocast_adapter_dtype`, `strict`, `allow_pickle`).

    Returns:
        A FunctionalPeftModel whose `adapter` is `{"arrow_router": tree, "task_0": tree, ...}` (what `fn` takes)
        and whose `adapter_name` is "arrow_router".
    """
    if not task_specific_adapter_paths:
        raise ValueError("`task_specific_adapter_paths` should contain at least one adapter path")
    if not isinstance(arrow_config, ArrowConfig):
        raise TypeError(f"arrow_config must be a funcpeft.ArrowConfig, got {type(arrow_config).__name__}")
    task_names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    pm = from_pretrained(base_model, task_specific_adapter_paths[0], task_names[0], **adapter_kwargs)
    trees = {task_names[0]: pm.adapter}
    for name, path in zip(task_names[1:], task_specific_adapter_paths[1:]):
        trees[name] = pm.load_adapter(path, name, **adapter_kwargs)
    config = copy.deepcopy(arrow_config)
    config.task_adapter_names = task_names
    gks_names: list[str] = []
    if config.use_gks:
        if not general_adapter_paths:
            raise ValueError("You should provide general LoRA paths if you want to use GenKnowSub.")
        gks_names = [f"{GKS_ADAPTER_PREFIX}{i}" for i in range(len(general_adapter_paths))]
        for name, path in zip(gks_names, general_adapter_paths):
            trees[name] = pm.load_adapter(path, name, **adapter_kwargs)
    config.gks_adapter_names = gks_names
    target_modules, r = _check_compatible(pm, task_names + gks_names)
    _check_linear_only(pm, task_names + gks_names)
    router = pm.add_adapter(ROUTER, LoraConfig(arrow_config=config, target_modules=target_modules, r=r))
    adapters: Any = {ROUTER: router, **trees}  # fn's {adapter name: tree} form
    pm.adapter = adapters
    pm.adapter_name = ROUTER
    pm.fn.default_adapter = ROUTER
    return pm
