"""Running a model with hooks on some of its layers, for data-driven inits (CorDA, LoRA-GA, EVA), without touching it.

PEFT registers hooks on the user's model, switches its mode and accumulates gradients into its weights. Here
the hooks live on a private deep copy of the module tree (`skeleton` below), the parameters are
passed functionally (detached: nothing reaches the model's `.grad`), and buffers are copies (a BatchNorm in
train mode updates the copies, not the model's running statistics).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._targeting import find_targets, layer_kind, resolve_config
from .methods.base import LayerKind

Hook = Callable[..., Any]


def skeleton(model: nn.Module, training: bool) -> nn.Module:
    """A copy of `model`'s module tree sharing every parameter and buffer (no weight is copied), in train or
    eval mode: hooks and mode changes on it never reach the model."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    skel = copy.deepcopy(model, memo)
    skel.train(training)
    return skel


@contextlib.contextmanager
def hooked_forward(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    *,
    training: bool,
    forward_hooks: Mapping[str, Hook] | None = None,
    backward_hooks: Mapping[str, Hook] | None = None,
) -> Iterator[Callable[..., Any]]:
    """Yield `forward(*args, **kwargs)`: the model's call on a hooked skeleton with `params` (every parameter
    name of the model, aliases included; buffers are copied). Hooks: `{module path: hook}` with PyTorch's
    forward-hook / full-backward-hook signatures, registered on the skeleton's modules only."""
    skel = skeleton(model, training)
    handles = []
    for path, hook in (forward_hooks or {}).items():
        handles.append(skel.get_submodule(path).register_forward_hook(hook))
    for path, hook in (backward_hooks or {}).items():
        handles.append(skel.get_submodule(path).register_full_backward_hook(hook))
    state = {**params, **{n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)}}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(skel, state, args, kwargs, tie_weights=False, strict=False)

    try:
        yield forward
    finally:
        for handle in handles:
            handle.remove()


def detached_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter name of `model` (tied names too) -> the parameter, detached (shared storage)."""
    return {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}


def linear_targets(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """`{path: module}` of the nn.Linear / GPT-2 Conv1D layers `config` targets in `model` (PEFT's CorDA and
    LoRA-GA preprocessing only handle those), in `named_modules` order, with get_peft_model's targeting rules."""
    modules = dict(model.named_modules())
    targets = find_targets(model, resolve_config(model, config))
    return {n: modules[n] for n in targets if layer_kind(modules[n]) in (LayerKind.LINEAR, LayerKind.CONV1D_HF)}
