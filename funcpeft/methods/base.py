"""What an adapter method is: static per-layer facts (`LayerSpec`) plus three pure functions.

A method file (e.g. `lora.py`) defines a `Method` with
- `init(spec, generator, dtype, device) -> dict[str, Tensor]`: fresh trainable parameters for one layer;
- `forward(spec, params, x, result, ctx) -> Tensor`: `result` (the base layer's output for input `x`)
  with the method applied; `ctx` (an `OpContext`) gives the plain base weight, the base op (to re-run it
  on a changed input, as IA3 on feed-forward layers does) and the dropout to use;
- `delta_weight(spec, params) -> Tensor`: the weight-shaped delta, only for merging and export;
- `peft_type` and `accepts(config) -> bool`: which configs it implements (`method_for` picks it);
- `hyper(config, name, module, kind) -> tuple of (name, value)`: its LayerSpec hyper-parameters for one
  targeted module (raising a clear TypeError for a layer kind it does not support).
Optional hooks (absent means the default): `finish_init(spec, params, weight) -> params` (init that needs
the base weight, e.g. DoRA's magnitude), `uses_result(spec) -> bool` (False: `forward` gets `result=None`
and calls `ctx.inner_op` itself, e.g. IA3 scaling a feed-forward layer's input), non-additive merges:
`merge_weight(spec, params, W, base_weight=None) -> W'` / `unmerge_weight(spec, params, W', base_weight)`
(DoRA's norm comes from the unmerged `base_weight`, default W; its unmerge needs it) and
`merge_bias(spec, params, bias) -> bias'` (IA3 scales the bias too); frozen tensors shared by all layers
(VeRA's projections, kept in `base`, see funcpeft.functional): `common_hyper(config, {name: module})`,
`frozen_params(spec) -> ((param, base key), ...)`, `shared(spec) -> {base key: Tensor}`; file keys (see
funcpeft.keys): `peft_key_prefix`, `peft_unsuffixed`, `peft_shared_keys`.
Targeting, injection, files, merging and counting are shared and know nothing about a method's maths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Dropout = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class OpContext:
    """What a method's forward may use besides its params: never mutate any of it.

    weight: the plain base weight (same storage as the model's); base_op: `x -> base layer output` with the
    plain weight and the layer's own bias/args; dropout: `(x, p) -> x` (identity unless training randomness
    was requested); bias: the base layer's bias (None if it has none); inner_op: `x -> output of the layer
    below this adapter` (the base op plus the adapters applied before this one, like PEFT's nested tuner
    layers; `base_op` when this adapter is the first).
    """

    weight: torch.Tensor
    base_op: Callable[[torch.Tensor], torch.Tensor]
    dropout: Dropout
    bias: torch.Tensor | None = None
    inner_op: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def training(self) -> bool:
        """True when `fn` was called with a dropout_rng (PEFT's `module.training`)."""
        return self.dropout is not no_dropout


@dataclass(frozen=True)
class LayerSpec:
    """Static facts about one adapted layer for one adapter (hashable; never a tensor).

    kind: 'linear' (weight (out, in)), 'conv1d_hf' (GPT-2 Conv1D, weight (in, out)),
          'embedding' (weight (num_embeddings, dim)) or 'conv' (weight (out, in/groups, *kernel)).
    weight_shape: the base weight's shape; in_features/out_features in nn.Linear orientation.
    hyper: method hyper-parameters (r, scaling, dropout, init, ...), as a sorted tuple of items.
    geometry: layer call facts the method needs (conv stride/padding/groups, embedding padding_idx).
    """

    method: str
    kind: str
    weight_shape: tuple[int, ...]
    in_features: int
    out_features: int
    hyper: tuple[tuple[str, Any], ...] = ()
    geometry: tuple[tuple[str, Any], ...] = field(default=())

    def h(self, name: str) -> Any:
        return dict(self.hyper)[name]

    def g(self, name: str) -> Any:
        return dict(self.geometry)[name]


class Method(Protocol):
    name: str
    param_names: Callable[[LayerSpec], tuple[str, ...]]
    init: Callable[..., dict[str, torch.Tensor]]
    forward: Callable[..., torch.Tensor]
    delta_weight: Callable[[LayerSpec, dict[str, torch.Tensor]], torch.Tensor]


METHODS: dict[str, Any] = {}


def register(method: Any) -> Any:
    METHODS[method.name] = method
    return method


def method_for(config: Any) -> Any:
    """The registered method implementing `config` (e.g. DoRA for `LoraConfig(use_dora=True)`)."""
    peft_type = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    for method in METHODS.values():
        if getattr(method, "peft_type", None) == peft_type and method.accepts(config):
            return method
    known = sorted({str(getattr(m, "peft_type", "?")) for m in METHODS.values()})
    raise TypeError(f"funcpeft has no method for {type(config).__name__} (peft_type={peft_type!r}); supported: {known}")


def no_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return x
