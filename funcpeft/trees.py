"""The adapter tree: plain nested dicts, and the few operations funcpeft needs on them.

    adapter = {
        "model.layers.0.self_attn.q_proj": {"lora_A": Tensor(r, in), "lora_B": Tensor(out, r)},
        "model.embed_tokens": {"lora_embedding_A": Tensor(r, vocab), "lora_embedding_B": Tensor(dim, r)},
        "score": {"weight": Tensor(labels, dim)},      # modules_to_save: a trainable copy of the module's params
        "model.layers.0.mlp.up_proj": {"lora_A": ..., "lora_B": ..., "bias": Tensor(out)},  # bias="lora_only"/"all"
    }

Keys are module paths (as in `model.named_modules()`); inside, a key is either a method parameter
(`lora_A`, ...) or the name of one of the module's own parameters (`weight`, `bias`), which the
adapter's copy replaces. Any optree / torch pytree function works on it; stacking K trees leaf-wise
gives a tree with a leading K dimension that `torch.func.vmap` maps over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch

SHARED_PREFIX = "<shared>."
"""Reserved `base` key prefix for frozen tensors an adapter's layers share (VeRA's vera_A / vera_B): they
belong to the frozen side, never to this tree; see funcpeft.functional."""


def shared_key(*parts: Any) -> str:
    """A reserved `base` key, e.g. shared_key("vera_A", "prng0", "256x64") -> '<shared>.vera_A.prng0.256x64'."""
    return SHARED_PREFIX + ".".join(map(str, parts))


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}"
    return type(x).__name__


def check_adapter_structure(tree: Any, plan: Mapping[str, Mapping[str, Any]], adapter_name: str = "default") -> None:
    """Raise ValueError naming the first path where `tree` differs from what adapter `adapter_name` expects."""
    if not isinstance(tree, Mapping):
        raise ValueError(f"adapter {adapter_name!r}: expected a dict keyed by module path, got {_describe(tree)}")
    if tree.keys() == plan.keys():
        bad = next((p for p in plan if not isinstance(tree[p], Mapping) or tree[p].keys() != plan[p]["keys"]), None)
        if bad is None:
            return
    for path in sorted(set(plan) | set(tree)):
        if path not in tree:
            raise ValueError(f"adapter {adapter_name!r}: path {path!r} is missing from the adapter tree")
        if path not in plan:
            raise ValueError(
                f"adapter {adapter_name!r}: path {path!r} is not a module this adapter targets "
                f"(expected paths like {sorted(plan)[:3]})"
            )
        entry, want = tree[path], plan[path]["keys"]
        if not isinstance(entry, Mapping):
            raise ValueError(f"adapter {adapter_name!r}: {path!r} should be a dict with keys {sorted(want)}, got {_describe(entry)}")
        for key in sorted(set(want) | set(entry)):
            if key not in entry:
                raise ValueError(f"adapter {adapter_name!r}: {path}.{key} is missing (expected keys {sorted(want)})")
            if key not in want:
                raise ValueError(f"adapter {adapter_name!r}: {path}.{key} is unexpected (expected keys {sorted(want)})")


def paths(tree: Any) -> list[str]:
    """Dotted leaf paths of a tree, e.g. 'model.layers.0.self_attn.q_proj.lora_A'."""
    return [".".join(map(str, p)) for p in optree.tree_paths(tree, none_is_leaf=False)]


def stack_adapters(trees: Sequence[Any]) -> Any:
    """K trees of the same structure -> one tree whose leaves have a leading dimension K."""
    if not trees:
        raise ValueError("stack_adapters needs at least one adapter tree")
    first = optree.tree_structure(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if optree.tree_structure(t) != first:
            raise ValueError(f"adapter {i} has a different structure from adapter 0")
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack_adapters(stacked: Any) -> list[Any]:
    """Inverse of `stack_adapters`: a list of K trees (views into the stacked leaves)."""
    leaves, spec = optree.tree_flatten(stacked)
    if not leaves:
        return []
    k = leaves[0].shape[0]
    return [optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(k)]


def tree_numel(tree: Any) -> int:
    return sum(int(t.numel()) for t in optree.tree_leaves(tree))
