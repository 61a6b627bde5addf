"""Checking an adapter tree against what a model's plan expects (shapes, keys), in checkpoint-key terms.

Shared by saving (funcpeft.io: a tree is checked before anything is written) and loading (funcpeft._loading).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ._config import PeftConfig
from ._keys import Leaf, key_rules, plan_file_keys, tree_file_keys
from ._plan import PlanEntry, layer_dtype
from .methods._layers import adapter_dtype


class AdapterMismatchError(ValueError):
    """An adapter checkpoint (or tree) does not fit the model: lists every missing, unexpected and mis-shaped key."""


class LeafSpec(NamedTuple):
    shape: tuple[int, ...] | None  # None: not known up front (accepted as found)
    dtype: torch.dtype
    device: torch.device


@dataclasses.dataclass
class Problems:
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def message(self, what: str, model: nn.Module) -> str:
        lines = [f"{what} does not match the adapter layout of this {type(model).__name__}:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s) (expected by the model, absent from the checkpoint):")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) (in the checkpoint, not expected by the model):")
            for k in self.unexpected:
                close = difflib.get_close_matches(k, self.missing, n=1, cutoff=0.8)
                lines.append(f"    {k}" + (f"  (did you mean {close[0]}?)" if close else ""))
        if self.shapes:
            lines.append(f"  {len(self.shapes)} shape mismatch(es):")
            lines += [f"    {k}: checkpoint {list(got)}, model expects {list(want)}" for k, got, want in self.shapes]
        return "\n".join(lines)


# -- what the model expects ----------------------------------------------------------------------------------
def device_of(t: torch.Tensor) -> torch.device:
    """Where a leaf for this tensor lives (CPU for a meta tensor: what a loaded tensor becomes)."""
    return torch.device("cpu") if t.is_meta else t.device


def expected_leaves(
    model: nn.Module, plan: Mapping[str, PlanEntry], autocast_adapter_dtype: bool = True
) -> dict[Leaf, LeafSpec]:
    """Shape, dtype and device of every leaf `plan` expects: what PEFT's layers would hold for this model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[Leaf, LeafSpec] = {}
    for path, e in plan.items():
        if e.owner is not None:  # the shared trainable tensors: on the first layer's device, in its adapter dtype
            w = next(params[f.weight_key(p)] for p, f in plan.items() if f.shared)
            shapes = dict(e.shapes)
            for n in e.params:
                out[(path, n)] = LeafSpec(shapes[n], adapter_dtype(w.dtype, autocast_adapter_dtype), device_of(w))
        if e.spec is not None:
            w = params[e.weight_key(path)]
            module = model.get_submodule(path) if e.spec.kind.module_level else None  # a 4-bit layer's compute dtype
            dtype = adapter_dtype(layer_dtype(w, module), autocast_adapter_dtype and e.method.autocast)
            shapes = dict(e.shapes)
            for n in e.params:
                out[(path, n)] = LeafSpec(shapes[n], dtype, device_of(w))
        for n in e.overrides:
            p = params[e.base_key(path, n)]
            out[(path, n)] = LeafSpec(tuple(p.shape), p.dtype, device_of(p))
    return out


def check_tree(tree: Mapping[str, Any], plan: Mapping[str, PlanEntry], model: nn.Module, config: PeftConfig) -> None:
    """Raise one AdapterMismatchError listing every leaf of `tree` that is missing, unexpected or mis-shaped."""
    rules = key_rules(config)
    expected = plan_file_keys(plan, rules)
    leaves = expected_leaves(model, plan)
    mts = getattr(config, "modules_to_save", None)
    found = {k: tuple(tree[p][n].shape) for k, (p, n) in tree_file_keys(tree, rules, mts).items()}
    problems = Problems(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        shapes=[
            (k, s, w) for k, s in found.items() if k in expected and (w := leaves[expected[k]].shape) not in (None, s)
        ],
    )
    if problems:
        raise AdapterMismatchError(problems.message("The adapter tree", model))
