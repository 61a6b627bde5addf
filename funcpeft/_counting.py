"""Parameter counting exactly as PEFT's `get_nb_trainable_parameters` / `print_trainable_parameters`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optree
import torch

from ._quant import counted_numel
from ._trees import SHARED_PREFIX


def _numel(t: torch.Tensor) -> int:
    n = counted_numel(t)  # a 4-bit weight counts its packed values, like PEFT
    return n if n else int(getattr(t, "ds_numel", 0))  # DeepSpeed ZeRO-3 placeholders, like PEFT


def count_parameters(base: Mapping[str, torch.Tensor], adapter: Any, plan: Mapping[str, Any]) -> tuple[int, int]:
    """(trainable, all).

    all = base (tied weights once) + adapter, minus trainable-bias copies (PEFT trains those biases in
    place, so it counts them once) but plus modules_to_save copies (PEFT counts original and copy), plus
    the frozen per-layer tensors PEFT keeps as parameters (`LayerFrozen.counted`: MiCA's lora_B) and, for
    layers tied to another (`Tying.counted`: LoRA's ensure_weight_tying), their params again (PEFT's are
    separate nn.Parameters on shared storage).
    """
    leaves = optree.tree_leaves(adapter) if adapter is not None else []
    trainable = sum(_numel(t) for t in leaves if t.requires_grad)  # PEFT: trainable means requires_grad
    in_place, extra = 0, 0
    if adapter is not None:
        for path, entry in adapter.items():
            info = plan[path]
            in_place += sum(int(entry[k].numel()) for k in info.in_place if k in entry)
            if info.spec is None:
                continue
            method = info.method
            extra += method.frozen_count(info.spec)  # frozen per-layer parameters PEFT registers (AdaLoRA's ranknum)
            frozen = method.layer_frozen
            if frozen is not None and frozen.counted:
                extra += sum(_numel(base[key]) for name, key in info.frozen if name in frozen.names and key in base)
            if method.tie is not None and method.tie.counted:
                for tie in info.tied:
                    n = sum(math.prod(shape) for _, shape in tie.shapes)
                    extra += n
                    trainable += n if any(entry[k].requires_grad for k in info.params) else 0
    frozen_base = sum(_numel(t) for k, t in base.items() if not k.startswith(SHARED_PREFIX))  # PEFT: shared = buffers
    total = frozen_base + sum(_numel(t) for t in leaves) - in_place + extra
    return trainable, total


def format_trainable(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
