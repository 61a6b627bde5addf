"""`layer_replication` (LoraConfig): a deeper model whose repeated decoder layers share the base weights.

PEFT (`replicate_layers` in peft/tuners/tuners_utils.py) replaces the model's decoder layer list in place by
clones that share every parameter with the original layers (buffers are copied), so `[[0, 4], [2, 5]]` turns
layers `[0, 1, 2, 3, 4]` into `[0, 1, 2, 3, 2, 3, 4]`; each clone then gets its own LoRA adapter. funcpeft
never mutates the model: `replicated(model, layer_map)` builds a new module tree, a structural copy that
shares every parameter and buffer of the model except the layer list, which holds PEFT's clones (their
parameters are the original layers' tensors, their buffers copies, `layer_idx` renumbered) and a copy of the
model config with `num_hidden_layers` updated. Targeting, the private skeletons of `fn` and `base` all follow
that structure: `base` names a shared weight once, by its first position (`model.layers.6.*` for original
layer 4 above, as PEFT's `named_parameters` does), and the other positions read the same tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

PEFT_MERGE_ERROR = "Cannot merge LORA layers when base model layers are replicated"


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(the module owning the layer list, its attribute path, PEFT's model family), as PEFT finds them."""
    inner = _inner(model)  # some BERT variants nest the main model under `bert`
    if hasattr(inner, "layers") and isinstance(inner.layers, nn.ModuleList):
        return inner, "layers", "llama"
    encoder = getattr(inner, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder, "layer", "bert"
    if isinstance(getattr(inner, "h", None), nn.ModuleList):
        return inner, "h", "falcon"
    raise ValueError(
        f"layer_replication: could not locate the layers attribute in the model ({type(model).__name__}). "
        "Expected Llama, Bert or Falcon compatible architectures (a ModuleList at model[.model]*.layers, "
        ".encoder.layer or .h), like PEFT."
    )


def _clone_sharing_parameters(layer: nn.Module) -> nn.Module:
    """PEFT's `clone_module(share_weights=True)`: a deep copy whose parameters are the original's tensors."""
    memo: dict[int, Any] = {id(p): p for p in layer.parameters()}
    return copy.deepcopy(layer, memo)


def replicated(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> nn.Module:
    """A new module tree: `model` with its decoder layers stacked per `layer_map` ([start, end) ranges).

    Shares every parameter with `model` (and every buffer outside the layer list); `model` is not modified.
    """
    owner, attr, _ = _layer_list(model)
    layers = getattr(owner, attr)
    n = len(layers)
    bad = [list(p) for p in layer_map if not 0 <= p[0] < p[1] <= n]
    if bad:
        raise ValueError(
            f"layer_replication: the ranges {bad} are out of the model's {n} layers (each [start, end) "
            f"must satisfy 0 <= start < end <= {n})"
        )
    # the structural copy: every tensor shared, the layer list left out (it is rebuilt below)
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo[id(layers)] = nn.ModuleList()
    out = copy.deepcopy(model, memo)
    new_layers: list[nn.Module] = []
    for start, end in layer_map:
        for i in range(start, end):
            clone = _clone_sharing_parameters(layers[i])
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):  # PEFT's fix for transformers' per-layer cache index
                    setattr(sub, "layer_idx", len(new_layers))  # noqa: B010 - a plain attribute, typed loosely
            new_layers.append(clone)
    new_owner, _, _ = _layer_list(out)
    setattr(new_owner, attr, nn.ModuleList(new_layers))
    config = getattr(_inner(out), "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)  # a copy of the model's config (deep-copied with `out`)
    return out


def _inner(model: nn.Module) -> Any:
    inner: Any = model
    while hasattr(inner, "model"):
        inner = inner.model
    return inner.bert if hasattr(inner, "bert") else inner


def prepared(model: nn.Module, config: Any) -> nn.Module:
    """The module tree an adapter with `config` is planned on: `model`, or its replicated copy (PEFT's
    `_prepare_model`)."""
    layer_map = getattr(config, "layer_replication", None)
    return replicated(model, layer_map) if layer_map else model
