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
- "ties", "dare_linear", "dare_ties", "magnitude_prune": the same weights, but the A_i (and separately the
  B_i) are first pruned to a fraction `density` of their entries (PEFT's peft/utils/merge_utils.py):
  magnitude pruning keeps the `int(density * numel)` largest |entries|; DARE keeps each entry with
  probability `density` (a Bernoulli mask) and rescales by 1/density; the *ties variants then keep, per
  entry, only the adapters agreeing with the majority sign (`majority_sign_method` "total": sign of the
  sum, "frequency": the commoner sign) and average those (a disjoint merge) instead of summing.
- "svd": truncated SVD of `sum_i w_i delta_i`: `B = U S`, `A = Vh` (optionally clamped at the
  `svd_clamp` quantile); conv deltas are flattened to (out, in * kernel). "ties_svd", "dare_linear_svd",
  "dare_ties_svd", "magnitude_prune_svd": the same, with the deltas combined by that rule first.
- DARE's masks come from `generator` (a torch.Generator, or an int seed for a new one; default: the global
  RNG, like PEFT), drawn in PEFT's order: layers in module order; per layer, for the A/B types each adapter's
  A, then each adapter's B, for the *_svd types each adapter's delta. So a generator seeded like PEFT's global
  RNG at its first draw gives PEFT's masks (PEFT first initialises the new adapter's layers, which draws from
  the global RNG too). The global RNG is never reseeded.
- modules_to_save of the new adapter are fresh copies of the base modules (PEFT copies the original
  module); at most one input adapter may have modules_to_save on a module, and the first adapter may
  not train biases (PEFT allows only one adapter with bias).
Leaves of the returned tree are frozen (requires_grad=False), like PEFT's.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

import torch

from ._config import LoraConfig
from ._functional import peft_function
from ._names import Names
from ._plan import check_adapter_name, check_adapter_structure, plan_adapter
from .methods import weight_method
from .methods._layers import adapter_dtype
from .methods.base import LayerKind, LayerSpec
from .methods.lora import LoraHyper

_PRUNED = (
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)  # the types that need `density`
_SUPPORTED = ("svd", "linear", "cat", *_PRUNED)
_SIGN_METHODS = ("total", "frequency")

Pairs = list[tuple[str, Mapping[str, Any]]]
Layer = tuple[
    float, LayerSpec[LoraHyper], dict[str, torch.Tensor]
]  # (weight, spec, params) of one input adapter at one path


def _ab(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    a_key, b_key = weight_method(layer[1].method).param_names(layer[1])
    return layer[2][a_key], layer[2][b_key]


def _pairs(adapters: Any) -> Pairs:
    if isinstance(adapters, Mapping):
        return list(adapters.items())
    if (
        isinstance(adapters, Sequence)
        and not isinstance(adapters, str)
        and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in adapters)
    ):
        return list(adapters)
    raise TypeError(
        "adapters must be {registered_adapter_name: tree} or a list of (registered_adapter_name, tree) pairs, "
        f"got {type(adapters).__name__}"
    )


def _rank(config: LoraConfig) -> int:
    return config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())


def _check(
    pm: Any, pairs: Pairs, weights: Sequence[float], combination_type: str, svd_rank: int | None
) -> tuple[str, int, Any]:
    """PEFT's `_check_add_weighted_adapter`: (combination_type, new_rank, new_target_modules)."""
    if not pairs:
        raise ValueError("add_weighted_adapter needs at least one adapter")
    if len(weights) != len(pairs):
        raise ValueError(f"got {len(pairs)} adapters but {len(weights)} weights: pass one weight per adapter")
    for name, tree in pairs:
        if name not in pm.peft_config:
            raise ValueError(f"Adapter {name} does not exist (registered: {sorted(pm.peft_config)})")
        if type(pm.peft_config[name]) is not LoraConfig:  # subclasses (AdaLoraConfig) are other methods, as in PEFT
            raise TypeError(
                f"add_weighted_adapter combines LoRA adapters; {name!r} is a {type(pm.peft_config[name]).__name__}"
            )
        check_adapter_structure(tree, pm.plans[name], name)
    for name, _ in pairs:
        if pm.peft_config[name].target_parameters:
            raise ValueError(
                f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{name}')"
            )
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


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the weighted task tensors (A's, B's or deltas) of one layer are combined: PEFT's merge_utils."""

    kind: str  # "linear" / "ties" / "dare_linear" / "dare_ties" / "magnitude_prune" (the *_svd type's A/B-level name)
    density: float = 1.0
    majority_sign_method: str = "total"
    generator: torch.Generator | None = None

    def combine(self, tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_i t_i after pruning (`ties`: a disjoint merge over the majority sign instead of the sum).

        tensors: K tensors of one shape; weights: (K,). PEFT's task_arithmetic / ties / dare_* / magnitude_prune.
        """
        if self.kind in ("ties", "magnitude_prune"):
            tensors = [magnitude_prune(t, self.density) for t in tensors]
        elif self.kind.startswith("dare"):
            tensors = [random_prune(t, self.density, self.generator) for t in tensors]
        stacked = torch.stack(tensors, dim=0)
        weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
        if self.kind not in ("ties", "dare_ties"):
            return weighted.sum(dim=0)
        mask = majority_sign_mask(stacked, self.majority_sign_method)
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's `magnitude_based_pruning`: keep the int(density * numel) largest |entries| (density >= 1: all)."""
    if density >= 1:
        return t
    flat = t.reshape(-1)
    top = torch.topk(flat.abs(), k=int(density * t.numel()), largest=True).indices
    mask = torch.zeros_like(flat).scatter(0, top, 1.0)
    return t * mask.reshape(t.shape)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """PEFT's `random_pruning(rescale=True)` (DARE): keep each entry with probability density, divide by density.

    The Bernoulli mask is drawn from `generator` (None: the global RNG, like PEFT); density >= 1 draws nothing.
    """
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """PEFT's `calculate_majority_sign_mask` over dim 0: where each task tensor agrees with the elected sign."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _task_arithmetic(layers: list[Layer], rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """The A/B-level types (linear, ties, dare_*, magnitude_prune): A's with signed sqrt(|w s|), B's with sqrt(|w s|)."""
    shapes = {tuple(_ab(layer)[0].shape) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(
            f"combination_type={rule.kind!r} needs equal LoRA shapes per layer, got lora_A shapes {sorted(shapes)}"
        )
    signed, plain = [], []
    for w, spec, _ in layers:
        ws = w * spec.hyper.scaling
        signed.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on one side only
        plain.append(math.sqrt(abs(ws)))
    out = []
    for i, ws_list in ((0, signed), (1, plain)):  # every A first, then every B: PEFT's draw order
        tensors = [_ab(layer)[i] for layer in layers]
        out.append(rule.combine(tensors, torch.tensor(ws_list).to(tensors[0].device)))
    dtype = _ab(layers[0])[0].dtype
    return out[0].to(dtype), out[1].to(dtype)


def _svd(
    layers: list[Layer],
    new_rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
    rule: Rule,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec0 = layers[0][1]
    deltas = [_lora_delta(spec, p) for _, spec, p in layers]
    delta = rule.combine(deltas, torch.tensor([w for w, _, _ in layers]).to(deltas[0].device))
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


def _rule(
    combination_type: str,
    density: float | None,
    majority_sign_method: str,
    generator: torch.Generator | int | None,
    device: torch.device,
) -> Rule:
    """The checked combination rule (PEFT checks density only when it prunes; funcpeft before anything runs)."""
    if majority_sign_method not in _SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {_SIGN_METHODS}, got {majority_sign_method!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        if isinstance(generator, bool) or not isinstance(generator, int):
            raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
        generator = torch.Generator(device).manual_seed(generator)
    if combination_type not in _SUPPORTED:  # an unknown "*_svd" passes PEFT's rank check; PEFT raises this later
        raise ValueError(f"Invalid value passed to combination type: {combination_type}")
    kind = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
    if combination_type not in _PRUNED:
        return Rule(kind, majority_sign_method=majority_sign_method, generator=generator)
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(
            f"combination_type={combination_type!r} prunes the adapters: pass density, the fraction of values kept "
            f"(a float in [0, 1]), got {density!r}"
        )
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if density == 0 and combination_type.startswith("dare"):
        raise ValueError(
            f"combination_type={combination_type!r} rescales what it keeps by 1 / density: density 0 would give NaN "
            "(as in PEFT); pass a density > 0"
        )
    if density >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=3
        )
    return Rule(kind, float(density), majority_sign_method, generator)


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
    density: float | None = None,
    majority_sign_method: str = "total",
    *,
    generator: torch.Generator | int | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], LoraConfig]:
    """Combine registered LoRA adapters into one: `(adapter_tree, config)` (see the module docstring).

    Nothing passed in is modified (except registering the result in `pm` when `adapter_name` is given).

    Args:
        pm: what `get_peft_model` returned.
        adapters: `{registered adapter name: tree}` (or (name, tree) pairs) of plain LoRA adapters.
        weights: one float per adapter.
        adapter_name: if given, the new adapter is registered in `pm` under that name (PEFT's side effect), so
            `pm.fn(base, {adapter_name: tree}, ...)` runs it; otherwise register it with `pm.add_adapter`.
        combination_type: PEFT's: "svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties",
            "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd".
        svd_rank, svd_clamp, svd_full_matrices, svd_driver: PEFT's, for the *svd types.
        density, majority_sign_method: PEFT's, for the pruning types.
        generator: where DARE's random masks come from (a torch.Generator or an int seed; None: the global RNG,
            as PEFT); a generator is advanced, never reseeded.

    Returns:
        (tree, config): the new adapter's tree (lora_A (r', in), lora_B (out, r') per layer, r' as PEFT picks
        it for the combination type) and its LoraConfig.
    """
    fn = peft_function(pm)
    if not hasattr(pm, "peft_config"):
        raise TypeError(
            "add_weighted_adapter needs what funcpeft.get_peft_model returned (its configs and base), not its fn"
        )
    pairs = _pairs(adapters)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
        if adapter_name in pm.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; registered: {sorted(pm.peft_config)}")
    combination_type, new_rank, targets = _check(pm, pairs, weights, combination_type, svd_rank)
    device = next((t.device for _, tree in pairs for e in tree.values() for t in e.values()), torch.device("cpu"))
    rule = _rule(combination_type, density, majority_sign_method, generator, device)
    first = pm.peft_config[pairs[0][0]]
    config = dataclasses.replace(
        first, r=new_rank, lora_alpha=new_rank, target_modules=targets, alpha_pattern={}, rank_pattern={}
    )
    planned, plan = plan_adapter(pm.model, config, None, adapter_name or "default")
    assert isinstance(planned, LoraConfig)
    resolved = dataclasses.replace(planned, modules_to_save=config.modules_to_save)  # no task-type re-append
    names = Names(fn.aliases)
    tree: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for path, info in plan.items():
            entry = {k: names.read(pm.base, info.base_key(path, k)).detach().clone() for k in info.overrides}
            spec = info.spec
            if spec is not None:
                entry.update(
                    _combine(
                        pm,
                        pairs,
                        weights,
                        path,
                        spec,
                        combination_type,
                        new_rank,
                        svd_clamp,
                        svd_full_matrices,
                        svd_driver,
                        rule,
                    )
                )
            tree[path] = entry
    if adapter_name is not None:
        pm.peft_config[adapter_name] = resolved
        pm.plans[adapter_name] = plan
    return tree, resolved


def _combine(
    pm: Any,
    pairs: Pairs,
    weights: Sequence[float],
    path: str,
    spec: LayerSpec,
    combination_type: str,
    new_rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
    rule: Rule,
) -> dict[str, torch.Tensor]:
    """The new adapter's method parameters at `path` (e.g. {"lora_A": ..., "lora_B": ...})."""
    layers: list[Layer] = []
    weight_key = f"{path}.weight"
    for (name, tree), w in zip(pairs, weights):
        info = pm.plans[name].get(path)
        if info is None or info.spec is None or path not in tree:
            continue
        weight_key = info.weight_key(path)  # the targeted bare parameter for a target_parameters entry
        s: LayerSpec[LoraHyper] = info.spec
        if s.method != "lora":
            raise NotImplementedError(
                f"add_weighted_adapter combines plain LoRA layers; {name!r} at {path!r} is {s.method!r}"
            )
        if s.hyper.lora_bias or s.hyper.mha_out_proj or s.kind is LayerKind.MHA or info.tied:
            raise NotImplementedError(
                f"add_weighted_adapter: {name!r} at {path!r} has a lora_B bias, adapts an nn.MultiheadAttention or is "
                "tied (ensure_weight_tying); funcpeft combines plain LoRA layers only"
            )
        layers.append((float(w), s, {k: tree[path][k].detach() for k in info.params}))
    if not layers:
        raise ValueError(f"No matching LoRAs found for {path!r}: none of the adapters targets it.")
    if combination_type == "cat":
        base_w = Names(peft_function(pm).aliases).read(pm.base, weight_key)
        dtype = adapter_dtype(base_w.dtype, pm.autocast_adapter_dtype)
        a, b = _cat(layers, new_rank, dtype)
    elif combination_type.endswith("svd"):
        a, b = _svd(layers, new_rank, clamp, full_matrices, driver, rule)
    else:
        a, b = _task_arithmetic(layers, rule)
    a_name, b_name = weight_method(spec.method).param_names(spec)
    return {a_name: a, b_name: b}


def _lora_delta(spec: LayerSpec[LoraHyper], params: dict[str, torch.Tensor]) -> torch.Tensor:
    delta = weight_method(spec.method).delta_weight
    assert delta is not None  # plain LoRA (checked in _combine)
    return delta(spec, params)
