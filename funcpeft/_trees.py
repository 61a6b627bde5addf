"""The adapter tree: plain nested dicts, and the few operations funcpeft needs on them.

    adapter = {
        "model.layers.0.self_attn.q_proj": {"lora_A": Tensor(r, in), "lora_B": Tensor(out, r)},
        "model.embed_tokens": {"lora_embedding_A": Tensor(r, vocab), "lora_embedding_B": Tensor(dim, r)},
        "score": {"weight": Tensor(labels, dim)},      # modules_to_save: a trainable copy of the module's params
        "model.layers.0.mlp.up_proj": {"lora_A": ..., "lora_B": ..., "bias": Tensor(out)},  # bias="lora_only"/"all"
    }

Keys are module paths (as in `model.named_modules()`); inside, a key is either a method parameter
(`lora_A`, ...) or the name of one of the module's own parameters (`weight`, `bias`), which the
adapter's copy replaces. The reserved path `SHARED_PATH` ('<shared>') holds trainable tensors all layers of a
method share (VB-LoRA's vector bank). Any optree / torch pytree function works on it; stacking K trees leaf-wise
gives a tree with a leading K dimension that `torch.func.vmap` maps over.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import optree
import torch

AdapterTree = dict[str, dict[str, torch.Tensor]]
"""`{module_path: {leaf name: Tensor}}`: one adapter's trainable values."""
BaseTree = dict[str, torch.Tensor]
"""`{parameter name: Tensor}`: the frozen side (the model's parameters, plus shared frozen tensors)."""

SHARED_PREFIX = "<shared>."
"""Reserved `base` key prefix for frozen tensors an adapter's layers share (VeRA's vera_A / vera_B): they
belong to the frozen side, never to this tree; see funcpeft._functional."""


SHARED_PATH = "<shared>"
"""Reserved adapter-tree path of the TRAINABLE tensors all of an adapter's layers share (VB-LoRA's vector bank,
`funcpeft.methods.base.SharedParams`): `adapter["<shared>"] = {"vblora_vector_bank": Tensor}`."""


PROMPT_PATH = "<prompt>"
"""Reserved adapter-tree path of an input-level (prompt-learning) adapter's parameters: `adapter["<prompt>"] =
{"embedding.weight": Tensor(num_virtual_tokens, token_dim), ...}` (PEFT's prompt encoder, by its names)."""


def shared_key(*parts: Any) -> str:
    """A reserved `base` key, e.g. shared_key("vera_A", "prng0", "256x64") -> '<shared>.vera_A.prng0.256x64'."""
    return SHARED_PREFIX + ".".join(map(str, parts))


def layer_frozen_key(adapter_name: str, path: str, name: str) -> str:
    """The `base` key of a layer's frozen adapter tensor (SHiRA's mask indices): '<shared>.{adapter}.{path}.{name}'."""
    return shared_key(adapter_name, path, name)


def stack_adapters(trees: Sequence[Any]) -> Any:
    """K trees of the same structure -> one tree whose leaves have a leading dimension K.

    Args:
        trees: K adapter trees with the same structure, leaf shapes and dtypes.

    Returns:
        One tree whose leaf at each position is `torch.stack` of the K leaves: shape (K, *leaf.shape).
    """
    if not trees:
        raise ValueError("stack_adapters needs at least one adapter tree")
    first = optree.tree_structure(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if optree.tree_structure(t) != first:
            raise ValueError(f"adapter {i} has a different structure from adapter 0")
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack_adapters(stacked: Any) -> list[Any]:
    """Inverse of `stack_adapters`: a list of K trees (views into the stacked leaves).

    Args:
        stacked: a tree whose leaves all have the same leading dimension K.

    Returns:
        K trees; tree k's leaf is `leaf[k]` (shape `leaf.shape[1:]`, a view: no copy).
    """
    leaves, spec = optree.tree_flatten(stacked)
    if not leaves:
        return []
    k = leaves[0].shape[0]
    return [optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(k)]


def tensor_leaves(tree: Any) -> Iterator[Any]:
    """The tensors of a nested `{name: Tensor | subtree}` dict, in insertion order (optree's leaves are sorted)."""
    for v in tree.values():
        if isinstance(v, torch.Tensor):
            yield v
        else:
            yield from tensor_leaves(v)


def tree_numel(tree: Any) -> int:
    return sum(int(t.numel()) for t in optree.tree_leaves(tree))
