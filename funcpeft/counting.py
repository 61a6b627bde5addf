"""Parameter counting exactly as PEFT's `get_nb_trainable_parameters` / `print_trainable_parameters`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
import torch

from .methods import weight_method
from .trees import SHARED_PREFIX


def _numel(t: torch.Tensor) -> int:
    n = int(t.numel())
    return n if n else int(getattr(t, "ds_numel", 0))  # DeepSpeed ZeRO-3 placeholders, like PEFT


def count_parameters(base: Mapping[str, torch.Tensor], adapter: Any, plan: Mapping[str, Any]) -> tuple[int, int]:
    """(trainable, all).

    all = base (tied weights once) + adapter, minus trainable-bias copies (PEFT trains those biases in
    place, so it counts them once) but plus modules_to_save copies (PEFT counts original and copy).
    """
    leaves = optree.tree_leaves(adapter) if adapter is not None else []
    trainable = sum(_numel(t) for t in leaves if t.requires_grad)  # PEFT: trainable means requires_grad
    in_place = 0
    if adapter is not None:
        for path, entry in adapter.items():
            in_place += sum(int(entry[k].numel()) for k in plan[path].in_place if k in entry)
    frozen = sum(_numel(t) for k, t in base.items() if not k.startswith(SHARED_PREFIX))  # PEFT: shared = buffers
    if adapter is not None:  # frozen per-layer parameters PEFT registers and funcpeft keeps in the spec
        frozen += sum(weight_method(e.spec.method).frozen_count(e.spec) for e in plan.values() if e.spec is not None)
    total = frozen + sum(_numel(t) for t in leaves) - in_place
    return trainable, total


def format_trainable(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
