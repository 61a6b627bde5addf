"""`add_weighted_adapter`: PEFT's weighted combination of LoRA adapters, as a pure function.

    tree, config = funcpeft.add_weighted_adapter(pm, {"a": tree_a, "b": tree_b}, [1.0, 0.5], combination_type="cat")
    out = pm.fn(base, {"ab": tree}, ...)   # after pm.add_adapter("ab", config), or pass adapter_name="ab"

Adapters are passed as registered adapter names with their trees (`{name: tree}` or a list of
`(name, tree)` pairs; a name may repeat, e.g. two trees trained from the same config): the registered
plans give each layer's kind and scaling. The result follows PEFT 0.21.2's `LoraModel.add_weighted_adapter`:

- config: the first adapter's config with `r = lora_alpha = new_rank`, no rank/alpha patterns, and the
  union of the target modules (regex strings are or-ed); new_rank is the common rank ("linear"), the sum
  ("cat") or `svd_rank` / the largest rank ("svd"); each adapter's rank is `max(r, *rank_pattern)`.
- "cat": `A = cat_i(A_i * w_i * s_i)`, `B = cat_i(B_i)`, zero-padded to new_rank.
- "linear": `A = sum_i sign_i sqrt(|w_i s_i|) A_i`, `B = sum_i sqrt(|w_i s_i|) B_i` (equal ranks only).
- "svd": truncated SVD of `sum_i w_i delta_i`: `B = U S`, `A = Vh` (optionally clamped at the
  `svd_clamp` quantile); conv deltas are flattened to (out, in * kernel).
- modules_to_save of the new adapter are fresh copies of the base modules (PEFT copies the original
  module); at most one input adapter may have modules_to_save on a module, and the first adapter may
  not train biases (PEFT allows only one adapter with bias).
Leaves of the returned tree are frozen (requires_grad=False), like PEFT's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

import torch

from ._names import Names
from ._plan import check_adapter_name, check_adapter_structure, plan_adapter
from .config import LoraConfig
from .functional import peft_function
from .methods import weight_method
from .methods._layers import adapter_dtype
from .methods.base import LayerKind, LayerSpec
from .methods.lora import LoraHyper

_SUPPORTED = ("svd", "linear", "cat")
_PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
              "magnitude_prune_svd")

Pairs = list[tuple[str, Mapping[str, Any]]]
Layer = tuple[float, LayerSpec[LoraHyper], dict[str, torch.Tensor]]  # (weight, spec, params) of one input adapter at one path


def _ab(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    a_key, b_key = weight_method(layer[1].method).param_names(layer[1])
    return layer[2][a_key], layer[2][b_key]


def _pairs(adapters: Any) -> Pairs:
    if isinstance(adapters, Mapping):
        return list(adapters.items())
    if isinstance(adapters, Sequence) and not isinstance(adapters, str) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in adapters
    ):
        return list(adapters)
    raise TypeError(
        "adapters must be {registered_adapter_name: tree} or a list of (registered_adapter_name, tree) pairs, "
        f"got {type(adapters).__name__}"
    )


def _rank(config: LoraConfig) -> int:
    return config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())


def _check(pm: Any, pairs: Pairs, weights: Sequence[float], combination_type: str, svd_rank: int | None) -> tuple[str, int, Any]:
    """PEFT's `_check_add_weighted_adapter`: (combination_type, new_rank, new_target_modules)."""
    if not pairs:
        raise ValueError("add_weighted_adapter needs at least one adapter")
    if len(weights) != len(pairs):
        raise ValueError(f"got {len(pairs)} adapters but {len(weights)} weights: pass one weight per adapter")
    for name, tree in pairs:
        if name not in pm.peft_config:
            raise ValueError(f"Adapter {name} does not exist (registered: {sorted(pm.peft_config)})")
        if not isinstance(pm.peft_config[name], LoraConfig):
            raise TypeError(f"add_weighted_adapter combines LoRA adapters; {name!r} is a {type(pm.peft_config[name]).__name__}")
        check_adapter_structure(tree, pm.plans[name], name)
    for name, _ in pairs:
        if pm.peft_config[name].target_parameters:
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{name}')")
    saved: dict[str, int] = {}
    for name, _ in pairs:
        for path, info in pm.plans[name].items():
            if info.overrides and not info.in_place:
                saved[path] = saved.get(path, 0) + 1
    problematic = [p for p, n in saved.items() if n > 1]
    if problematic:
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(problematic)} such instance(s)."
        )
    combination_type = "linear" if len(pairs) == 1 else combination_type
    configs = [pm.peft_config[name] for name, _ in pairs]
    ranks = [_rank(c) for c in configs]
    if combination_type in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"):
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                "dare_linear."
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type.endswith("svd"):
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    if combination_type not in _SUPPORTED:
        raise NotImplementedError(f"combination_type={combination_type!r} is not implemented in funcpeft (supported: {_SUPPORTED})")
    kinds = {type(c.target_modules) for c in configs}
    if len(kinds) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. "
            "Combining adapters with `target_modules` type being a mix of list/set and string is not supported."
        )
    if isinstance(configs[0].target_modules, str):
        targets: Any = "|".join(f"({c.target_modules})" for c in configs)
    elif isinstance(configs[0].target_modules, set):
        targets = reduce(set.__or__, (c.target_modules for c in configs))
    else:
        raise TypeError(f"Invalid type {type(configs[0].target_modules)} found in target_modules")
    if configs[0].bias != "none":
        raise ValueError(
            "LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all adapters."
        )
    return combination_type, new_rank, targets


# -- one layer ---------------------------------------------------------------------------------------------
def _cat(layers: list[Layer], new_rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([_ab(layer)[0] * layer[0] * layer[1].hyper.scaling for layer in layers], dim=0)
    b = torch.cat([_ab(layer)[1] for layer in layers], dim=1)
    new_a = a.new_zeros((new_rank, *a.shape[1:]), dtype=dtype)
    new_b = b.new_zeros((b.shape[0], new_rank, *b.shape[2:]), dtype=dtype)
    new_a[: a.shape[0]] = a
    new_b[:, : b.shape[1]] = b
    return new_a, new_b


def _linear(layers: list[Layer]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(_ab(layer)[0].shape) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(f"combination_type='linear' needs equal LoRA shapes per layer, got lora_A shapes {sorted(shapes)}")
    signed, plain = [], []
    for w, spec, _ in layers:
        ws = w * spec.hyper.scaling
        signed.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        plain.append(math.sqrt(abs(ws)))
    out = []
    for i, ws_list in ((0, signed), (1, plain)):
        tensors = torch.stack([_ab(layer)[i] for layer in layers])
        ws_t = torch.tensor(ws_list).to(tensors.device)
        out.append((tensors * ws_t.view(-1, *[1] * (tensors.ndim - 1))).sum(dim=0))
    dtype = _ab(layers[0])[0].dtype
    return out[0].to(dtype), out[1].to(dtype)


def _svd(
    layers: list[Layer], new_rank: int, clamp: float | None, full_matrices: bool, driver: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    spec0 = layers[0][1]
    deltas = torch.stack([_lora_delta(spec, p) for _, spec, p in layers])
    ws = torch.tensor([w for w, _, _ in layers]).to(deltas.device)
    delta = (deltas * ws.view(-1, *[1] * (deltas.ndim - 1))).sum(dim=0)
    if spec0.kind is LayerKind.CONV:
        delta = delta.flatten(start_dim=1)
    if spec0.kind in (LayerKind.CONV1D_HF, LayerKind.EMBEDDING):  # to (out, in): B @ A orientation
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    if spec0.kind is LayerKind.CONV:
        a0, b0 = _ab(layers[0])
        u = u.reshape(b0.shape[0], u.shape[1], *b0.shape[2:])
        vh = vh.reshape(vh.shape[0], *a0.shape[1:])
    return vh, u


# -- the function --------------------------------------------------------------------------------------------
def add_weighted_adapter(
    pm: Any,
    adapters: Mapping[str, Any] | Sequence[tuple[str, Any]],
    weights: Sequence[float],
    adapter_name: str | None = None,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], LoraConfig]:
    """Combine registered LoRA adapters into one: `(adapter_tree, config)` (see the module docstring).

    pm: what `get_peft_model` returned. adapter_name: if given, the new adapter is registered in `pm`
    under that name (PEFT's side effect), so `pm.fn(base, {adapter_name: tree}, ...)` runs it; otherwise
    register it yourself with `pm.add_adapter(name, config)`. Nothing passed in is modified otherwise.
    """
    fn = peft_function(pm)
    if not hasattr(pm, "peft_config"):
        raise TypeError("add_weighted_adapter needs what funcpeft.get_peft_model returned (its configs and base), not its fn")
    pairs = _pairs(adapters)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
        if adapter_name in pm.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; registered: {sorted(pm.peft_config)}")
    combination_type, new_rank, targets = _check(pm, pairs, weights, combination_type, svd_rank)
    first = pm.peft_config[pairs[0][0]]
    config = dataclasses.replace(
        first, r=new_rank, lora_alpha=new_rank, target_modules=targets, alpha_pattern={}, rank_pattern={}
    )
    planned, plan = plan_adapter(pm.model, config)
    assert isinstance(planned, LoraConfig)
    resolved = dataclasses.replace(planned, modules_to_save=config.modules_to_save)  # no task-type re-append
    names = Names(fn.aliases)
    tree: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for path, info in plan.items():
            entry = {k: names.read(pm.base, info.base_key(path, k)).detach().clone() for k in info.overrides}
            spec = info.spec
            if spec is not None:
                entry.update(_combine(pm, pairs, weights, path, spec, combination_type, new_rank,
                                      svd_clamp, svd_full_matrices, svd_driver))
            tree[path] = entry
    if adapter_name is not None:
        pm.peft_config[adapter_name] = resolved
        pm.plans[adapter_name] = plan
    return tree, resolved


def _combine(
    pm: Any, pairs: Pairs, weights: Sequence[float], path: str, spec: LayerSpec, combination_type: str,
    new_rank: int, clamp: float | None, full_matrices: bool, driver: str | None,
) -> dict[str, torch.Tensor]:
    """The new adapter's method parameters at `path` (e.g. {"lora_A": ..., "lora_B": ...})."""
    layers: list[Layer] = []
    for (name, tree), w in zip(pairs, weights):
        info = pm.plans[name].get(path)
        if info is None or info.spec is None or path not in tree:
            continue
        s: LayerSpec[LoraHyper] = info.spec
        if s.method != "lora":
            raise NotImplementedError(f"add_weighted_adapter combines plain LoRA layers; {name!r} at {path!r} is {s.method!r}")
        layers.append((float(w), s, {k: tree[path][k].detach() for k in info.params}))
    if not layers:
        raise ValueError(f"No matching LoRAs found for {path!r}: none of the adapters targets it.")
    if combination_type == "cat":
        base_w = Names(peft_function(pm).aliases).read(pm.base, f"{path}.weight")
        dtype = adapter_dtype(base_w.dtype, pm.autocast_adapter_dtype)
        a, b = _cat(layers, new_rank, dtype)
    elif combination_type == "linear":
        a, b = _linear(layers)
    else:
        a, b = _svd(layers, new_rank, clamp, full_matrices, driver)
    a_name, b_name = weight_method(spec.method).param_names(spec)
    return {a_name: a, b_name: b}


def _lora_delta(spec: LayerSpec[LoraHyper], params: dict[str, torch.Tensor]) -> torch.Tensor:
    delta = weight_method(spec.method).delta_weight
    assert delta is not None  # plain LoRA (checked in _combine)
    return delta(spec, params)
