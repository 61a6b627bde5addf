"""Merging adapters into base weights, as pure functions over parameter trees.

    merged = funcpeft.merge(pm, base, adapter)       # new base tree: W + delta, overrides applied
    base2 = funcpeft.unmerge(pm, merged, adapter, base=base)   # ~= base
    model = funcpeft.merge_and_unload(pm, adapter)   # a new plain nn.Module (PEFT's merge_and_unload)

`pm` is what `get_peft_model` returned (or its `fn`): it knows each registered adapter's plan. `adapter`
is anything `fn` accepts: one tree, `{adapter_name: tree, ...}` (merged in order, like PEFT's active
adapters) or None. Inputs are never modified, and only what changes is new: every other leaf of the
merged tree *is* the input's tensor (same storage).

How a layer merges is its method's business (funcpeft.methods.base.MergeHooks): `merge.weight(spec, params,
W, base_weight) -> W'` and `merge.unweight(...)` (IA3's scaling, DoRA's renormalisation; `base_weight` is the
pre-merge weight when known, i.e. when `unmerge` gets `base=`), and `merge.bias` / `merge.unbias` (IA3).
Without hooks the merge is additive, `W +/- delta_weight(spec, params)`, computed in the promoted dtype and
cast back to W's (PEFT's in-place `weight.data += delta`).

Tied weights follow PEFT, where a merge writes into the shared tensor: a delta merged into a tied
weight (e.g. LoRA on GPT-2's `wte`) changes every name that shares it (`lm_head` too, so the merged
model then differs from the unmerged one, exactly as in PEFT; a warning says so). A modules_to_save
copy replaces only its own module's weight: the tie breaks, the other names keep the original tensor
as explicit entries of the merged tree (`fn` reads a tied name's own entry when the tree has one).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import optree
import torch
from torch import nn

from ._functional import PeftFunction, peft_function
from ._names import Names
from ._plan import PlanEntry, check_adapter_structure, check_stack, input_entry, input_method, layer_params, with_shared
from ._quant import HQQ, base_tensor, check_packed, dequantize, hqq_layer, is_quantised, requantize, warn_rounding
from ._replicate import PEFT_MERGE_ERROR
from .methods import weight_method
from .methods._layers import FLOAT8_DTYPES, cast_delta, low_precision_add
from .methods.base import LayerKind, LayerSpec, Params

Tree = dict[str, torch.Tensor]


# -- per-layer hooks -----------------------------------------------------------------------------------------
def _check_mergeable(spec: LayerSpec[Any], what: str = "merge") -> None:
    refuse = weight_method(spec.method).merge.refuse
    if refuse is not None:  # a method no single weight represents (aLoRA, Arrow): PEFT's own error
        raise refuse(what)
    refuse = weight_method(spec.method).merge.refuse_quantised
    if refuse is not None and spec.kind.module_level:
        raise refuse(what)
    if spec.kind is LayerKind.CONV and spec.conv.groups > 1 and not weight_method(spec.method).merge.grouped_conv:
        raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")  # PEFT's message


def _delta(spec: LayerSpec[Any], params: Params) -> torch.Tensor:
    method = weight_method(spec.method)
    if method.delta_weight is None:
        raise NotImplementedError(f"method {spec.method!r} has neither a delta_weight nor merge hooks: it cannot merge")
    return method.delta_weight(spec, params)


def _quantised(
    spec: LayerSpec[Any],
    weight: torch.Tensor,
    base_weight: torch.Tensor | None,
    module: nn.Module | None,
    what: str,
    model: nn.Module | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A module-level (quantised) layer merges like PEFT's bnb layers: on the dequantised weight, re-quantised after."""
    if module is not None:
        check_packed(module, weight, model)
    if weight_method(spec.method).merge.rounding_warning:
        warn_rounding(what, weight_method(spec.method).peft_type.lower())
    dense_base = None if base_weight is None else dequantize(base_weight, module)
    return dequantize(weight, module), dense_base


def _check_tree_requantisable(spec: LayerSpec[Any], module: nn.Module | None) -> None:
    """HQQ keeps a layer's scales and zeros on the module (`meta`), not in its packed `W_q`: a merged weight needs a
    new module, which a base tree cannot hold (swapping `W_q` alone would pair new codes with the old scales)."""
    if spec.quant.backend == HQQ:
        name = "" if module is None else f" ({type(module).__name__})"
        raise NotImplementedError(
            f"merging into an HQQ-quantised layer{name} changes its scales and zeros, which HQQ keeps on the module "
            "(`meta`), not in the base tree's `W_q`: funcpeft.merge / unmerge cannot return such a tree. Use "
            "funcpeft.merge_and_unload (a new model with new HQQLinear layers, as PEFT's merge makes)."
        )


def merge_weight(
    spec: LayerSpec[Any],
    params: Params,
    weight: torch.Tensor,
    safe_merge: bool = False,
    base_weight: torch.Tensor | None = None,
    module: nn.Module | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """`weight` (base layout) with one layer's adapter merged in; `weight` itself is left as it is.

    A quantised layer's weight (`LayerKind.module_level`) is dequantised, merged and quantised again like it
    (PEFT's merge; `module`: the layer, where bitsandbytes keeps an 8-bit weight's scales and HQQ its meta;
    `model`: the transformers model, whose torchao config re-quantises)."""
    if spec.kind.module_level:
        _check_mergeable(spec)
        _check_tree_requantisable(spec, module)
        dense, dense_base = _quantised(spec, weight, base_weight, module, "merge", model)
        return requantize(weight, _merge_plain(spec, params, dense, safe_merge, dense_base), module, model)
    _check_mergeable(spec)
    return _merge_plain(spec, params, weight, safe_merge, base_weight)


def _merge_plain(
    spec: LayerSpec[Any], params: Params, weight: torch.Tensor, safe_merge: bool, base_weight: torch.Tensor | None
) -> torch.Tensor:
    hook = weight_method(spec.method).merge.weight
    if hook is not None:
        out = hook(spec, params, weight, base_weight)
    elif spec.kind is LayerKind.PARAMETER:
        out = _merge_parameter(spec, params, weight)
    else:
        delta = _delta(spec, params).to(weight.device)
        # PEFT: `w.data += delta` (promoted add, cast back); safe_merge: `w.clone() += delta.to(w.dtype)`
        out = weight + delta.to(weight.dtype) if safe_merge else (weight + delta).to(weight.dtype)
    if safe_merge and not torch.isfinite(out).all():
        raise ValueError(
            f"NaNs detected in the merged weights. The adapter on a {spec.kind.value} layer seems to be broken"
        )
    return out


def unmerge_weight(
    spec: LayerSpec[Any],
    params: Params,
    merged: torch.Tensor,
    base_weight: torch.Tensor | None = None,
    module: nn.Module | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Inverse of `merge_weight` (PEFT's unmerge: `w.data -= delta`); `base_weight`: the weight before the
    merge when known (a method like DoRA needs it)."""
    if spec.kind.module_level:
        _check_mergeable(spec, "unmerge")
        _check_tree_requantisable(spec, module)
        dense, dense_base = _quantised(spec, merged, base_weight, module, "unmerge", model)
        return requantize(merged, _unmerge_plain(spec, params, dense, dense_base), module, model)
    _check_mergeable(spec, "unmerge")
    return _unmerge_plain(spec, params, merged, base_weight)


def _unmerge_plain(
    spec: LayerSpec[Any], params: Params, merged: torch.Tensor, base_weight: torch.Tensor | None
) -> torch.Tensor:
    hooks = weight_method(spec.method).merge
    if hooks.unweight is not None:
        return hooks.unweight(spec, params, merged, base_weight)
    if hooks.weight is not None:
        raise NotImplementedError(
            f"method {spec.method!r} has a merge.weight hook but no merge.unweight: cannot unmerge"
        )
    if spec.kind is LayerKind.PARAMETER:
        return _merge_parameter(spec, params, merged, sign=-1)
    delta = _delta(spec, params).to(merged.device)
    return (merged - delta).to(merged.dtype)


def _merge_parameter(spec: LayerSpec[Any], params: Params, weight: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """PEFT's `ParamWrapper.merge` / `unmerge`: `W +/- delta`, delta already in W's dtype; a float8 W adds in the
    adapter's precision, clamped (like the forward; PEFT's own float8 merge raises a dtype-promotion error)."""
    delta = sign * _delta(spec, params)
    if weight.dtype in FLOAT8_DTYPES:
        return low_precision_add(weight, delta.to(weight.device))
    return weight + cast_delta(delta, weight)


def unmerge_bias(
    spec: LayerSpec[Any], params: Params, merged: torch.Tensor, base_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of a method's `merge.bias` (its `merge.unbias` hook, else the bias before the merge)."""
    hook = weight_method(spec.method).merge.unbias
    if hook is not None:
        return hook(spec, params, merged)
    if base_bias is None:
        raise NotImplementedError(
            f"method {spec.method!r} merges into the bias but has no unbias hook: pass the original base tree as `base=`"
        )
    return base_bias


Entry = tuple[str, str, PlanEntry, Mapping[str, torch.Tensor]]  # (adapter name, module path, plan entry, leaves)


def _entries(fn: PeftFunction, adapter: Any, base: Mapping[str, torch.Tensor] | None = None) -> list[Entry]:
    """[(adapter_name, module_path, plan_entry, tree_entry)] in merge order; the trees are checked first
    (structure, and with `base` every leaf's shape, dtype and device)."""
    if fn.layer_replication:
        raise ValueError(PEFT_MERGE_ERROR)  # PEFT's LoraModel._check_merge_allowed: the layers share their weights
    out: list[Entry] = []
    names = Names(fn.aliases)
    for name, tree in fn.split_adapters(adapter):
        plan = fn.plans.get(name)
        if plan is None:
            raise KeyError(f"Unknown adapter name {name!r}; registered: {sorted(fn.plans)}")
        prompt = input_entry(plan)
        if prompt is not None:
            raise TypeError(
                f"adapter {name!r} is a {input_method(prompt).peft_type} adapter: prompt learning adds virtual tokens to "
                "the input, which no merged weight can represent (PEFT's prompt-learning models have no merge either); "
                "keep calling fn / funcpeft.generate with the adapter"
            )
        if base is None:
            check_adapter_structure(tree, plan, name)
        else:
            fn.check_tree(name, tree, {alias: names.read(base, alias) for alias, _ in fn.aliases})
        out += [(name, path, plan[path], with_shared(tree, path, plan[path])) for path in tree]
    by_layer: dict[str, list[LayerSpec[Any]]] = {}
    for _, path, entry, _ in out:
        if entry.spec is not None:
            by_layer.setdefault(path, []).append(entry.spec)
    for specs in by_layer.values():
        check_stack(tuple(specs))
    return out


# -- tree merge / unmerge ------------------------------------------------------------------------------------
def _bias_name(names: Names, spec: LayerSpec[Any], path: str) -> str | None:
    """The layer's bias name if its method also merges into the bias (IA3, LoRA's lora_B bias) and the layer has one."""
    hooks = weight_method(spec.method).merge
    if hooks.bias is None and hooks.bias_from_base is None:
        return None
    if f"{path}.bias" in names.canon:
        return f"{path}.bias"
    if hooks.needs_bias(spec):
        if hooks.missing_bias is not None:
            raise hooks.missing_bias(path)
        raise RuntimeError(
            f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias ({path!r})."
        )  # PEFT's message
    return None


def _layers(path: str, entry: PlanEntry, params: Params) -> list[tuple[str, LayerSpec[Any], Params]]:
    """(module path, spec, params) of the layer an entry adapts and of the layers tied to it (`PlanEntry.tied`)."""
    assert entry.spec is not None
    out = [(path, entry.spec, params)]
    if entry.tied:
        tie = entry.method.tie
        assert tie is not None
        out += [(t.path, t.spec, tie.params(params)) for t in entry.tied]
    return out


def _merge_entries(
    names: Names,
    base: Mapping[str, torch.Tensor],
    entries: list[Entry],
    safe_merge: bool,
    before: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    model: nn.Module | None = None,
    new_modules: dict[str, nn.Module] | None = None,
) -> Tree:
    """Merge `entries` in order into a copy of `base`; `before` collects each layer's pre-merge (weight, bias).

    new_modules: collects, by module path, the new layers of merged HQQ layers (a merge into one makes a new
    module: see `_check_tree_requantisable`); their tree entries stay as they are. None: such layers raise."""
    out = dict(base)
    first_bias: dict[str, torch.Tensor] = {}  # each layer's bias before the first `bias_from_base` merge into it
    for _, path, entry, leaves in entries:
        for pname in entry.overrides:
            write = names.write_shared if pname in entry.in_place else names.write_own
            write(out, entry.base_key(path, pname), leaves[pname])
        if entry.spec is None:
            continue
        for where, spec, params in _layers(path, entry, layer_params(entry, leaves, base)):
            wname = entry.weight_key(path) if where == path else f"{where}.{spec.weight_name}"
            bname = _bias_name(names, spec, where)
            weight, bias = names.read(out, wname), names.read(out, bname) if bname else None
            if before is not None:
                before.append((weight, bias))
            module = model.get_submodule(where) if model is not None and spec.kind.module_level else None
            pre = names.read(base, wname) if entry.method.merge.from_base else None
            if new_modules is not None and spec.kind.module_level and spec.quant.backend == HQQ:
                assert module is not None
                new_modules[where] = _merge_hqq(spec, params, weight, new_modules.get(where), module, pre, safe_merge)
                continue
            names.write_shared(out, wname, merge_weight(spec, params, weight, safe_merge, pre, module, model))
            merge_bias, from_base = entry.method.merge.bias, entry.method.merge.bias_from_base
            if bname and bias is not None and merge_bias is not None:
                names.write_shared(out, bname, merge_bias(spec, params, bias))
            elif bname and bias is not None and from_base is not None:
                pre_bias = first_bias.setdefault(bname, bias)  # (a trained bias="all" copy is already in place)
                names.write_shared(out, bname, from_base(spec, params, bias, names.read(base, wname), pre_bias))
    return out


def _merge_hqq(
    spec: LayerSpec[Any],
    params: Params,
    w_q: torch.Tensor,
    merged: nn.Module | None,
    module: nn.Module,
    base_w_q: torch.Tensor | None,
    safe_merge: bool,
) -> nn.Module:
    """PEFT's HQQ merge: dequantise, merge, quantise into a new HQQLinear with the layer's settings. A layer merged
    before (`merged`, an earlier adapter's new layer) is merged again from its own codes, as PEFT's second merge
    reads the layer its first one made."""
    _check_mergeable(spec)
    if weight_method(spec.method).merge.rounding_warning:  # PEFT's HqqLoraLinear warns, its generic backend does not
        warn_rounding("merge", weight_method(spec.method).peft_type.lower())
    dense = dequantize(w_q, module) if merged is None else dequantize(merged._parameters["W_q"], merged)  # type: ignore[arg-type]
    dense_base = None if base_w_q is None else dequantize(base_w_q, module)
    return hqq_layer(module, _merge_plain(spec, params, dense, safe_merge, dense_base))


def merge(pm: Any, base: Mapping[str, torch.Tensor], adapter: Any, *, safe_merge: bool = False) -> Tree:
    """A new base tree with `adapter` merged in: `fn(merge(pm, base, a), None, ...) == fn(base, a, ...)`.

    Differentiable; nothing is modified in place.

    Args:
        pm: a FunctionalPeftModel or its PeftFunction.
        base: `{param_name: Tensor}` (pm's `base` or a merged / modified copy with the same keys).
        adapter: a tree, `{adapter_name: tree}` or None.
        safe_merge: raise ValueError naming the layer if a merged weight is not finite.

    Returns:
        A new base tree: adapted weights (and biases, for a method with a bias merge) are new tensors of their
        base shapes and dtypes; overridden parameters (modules_to_save copies, trainable biases) are the
        adapter's tensors; every other entry is the same tensor as in `base`.
    """
    fn = peft_function(pm)
    return _merge_entries(Names(fn.aliases), base, _entries(fn, adapter, base), safe_merge, model=fn.model)


def unmerge(
    pm: Any, merged: Mapping[str, torch.Tensor], adapter: Any, *, base: Mapping[str, torch.Tensor] | None = None
) -> Tree:
    """Inverse of `merge` (within float tolerance for the adapted weights), in reverse order.

    Overridden parameters (modules_to_save, trainable biases) cannot be recovered from `merged`: pass
    the original `base` to restore them; without it, an adapter that has overrides raises ValueError.
    With `base`, each layer's unmerge also gets its exact pre-merge weight (DoRA's unmerge needs it).

    Args:
        pm: a FunctionalPeftModel or its PeftFunction.
        merged: a base tree `merge(pm, base, adapter)` returned.
        adapter: the same adapter value that was merged.
        base: the original base tree (optional; see above).

    Returns:
        A new base tree equal to the original within float tolerance for the adapted weights.
    """
    fn = peft_function(pm)
    names = Names(fn.aliases)
    entries = _entries(fn, adapter, merged)
    overridden = [entry.base_key(path, p) for _, path, entry, _ in entries for p in entry.overrides]
    if overridden and base is None:
        raise ValueError(
            f"unmerge: the adapter replaces {overridden[:3]}{' ...' if len(overridden) > 3 else ''} "
            "(modules_to_save / trainable bias), whose original values are not in the merged tree: "
            "pass the original base tree as `base=`."
        )
    before: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    if base is not None:
        _merge_entries(names, base, entries, False, before, fn.model)
    layers = iter(reversed(before))
    out = dict(merged)
    for _, path, entry, leaves in reversed(entries):
        if entry.spec is not None:
            for where, spec, params in reversed(_layers(path, entry, layer_params(entry, leaves, merged))):
                wname = entry.weight_key(path) if where == path else f"{where}.{spec.weight_name}"
                bname = _bias_name(names, spec, where)
                pre_weight, pre_bias = next(layers, (None, None))
                module = fn.model.get_submodule(where) if spec.kind.module_level else None
                unmerged = unmerge_weight(spec, params, names.read(out, wname), pre_weight, module, fn.model)
                names.write_shared(out, wname, unmerged)
                if bname:
                    names.write_shared(out, bname, unmerge_bias(spec, params, names.read(out, bname), pre_bias))
        for pname in entry.overrides:
            assert base is not None
            key = entry.base_key(path, pname)
            if pname in entry.in_place:
                names.write_shared(out, key, names.read(base, key))
            else:
                names.restore(out, base, key)
    return out


# -- a new plain model ---------------------------------------------------------------------------------------
def _warn_tied_merges(fn: PeftFunction, adapter: Any) -> None:
    names = Names(fn.aliases)
    for _, path, entry, _ in _entries(fn, adapter):
        wname = entry.weight_key(path)
        # tied layers the adapter covers (PlanEntry.tied)
        applied = {wname, *(f"{t.path}.{t.spec.weight_name}" for t in entry.tied)}
        tied = [n for n in names.group.get(names.canon.get(wname, wname), []) if n not in applied]
        if entry.spec is not None and tied:
            warnings.warn(
                f"Merging the adapter on {path!r} changes its weight, which is tied to {tied}: like PEFT, the "
                "merged model uses the merged weight for all of them, so its outputs differ from the unmerged "
                "model's. Untie the weights before training to avoid this.",
                UserWarning,
                stacklevel=3,
            )


def build_model(pm: Any, tree: Mapping[str, torch.Tensor], *, share_storage: bool = True) -> nn.Module:
    """A new module of the same class as pm's model, with its parameters taken from base tree `tree`.

    share_storage=True: parameters are new `nn.Parameter`s on `tree`'s tensors (no copy): in-place
    changes to the new model (e.g. an optimizer step) would show in whatever else holds those tensors,
    such as the original model. False: every parameter is cloned. Buffers and config are copied.
    """
    fn = peft_function(pm)
    names = Names(fn.aliases)
    model = fn.model

    def param(name: str, like: torch.Tensor) -> nn.Parameter:
        value = names.read(tree, name)
        if is_quantised(value):  # a frozen Params4bit / Int8Params: its quantisation state lives on the object
            return value if share_storage else copy.deepcopy(value)  # type: ignore[return-value]
        value = value.detach()
        return nn.Parameter(value if share_storage else value.clone(), requires_grad=like.requires_grad)

    originals = dict(model.named_parameters(remove_duplicate=False))
    memo: dict[int, Any] = {id(p): param(n, p) for n, p in model.named_parameters()}
    new = copy.deepcopy(model, memo)
    for alias, canon in fn.aliases:
        if alias != canon and alias in tree:  # a broken tie: this name gets its own parameter
            owner, _, leaf = alias.rpartition(".")
            setattr(new.get_submodule(owner), leaf, param(alias, originals[alias]))
    _untie_config(new)
    return new


def _untie_config(model: nn.Module) -> None:
    """PEFT: if embeddings were tied and no longer share storage, set `tie_word_embeddings=False`."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
    except (NotImplementedError, AttributeError):
        return
    out_w, in_w = getattr(out_emb, "weight", None), getattr(in_emb, "weight", None)
    if out_w is not None and in_w is not None and out_w.data_ptr() != in_w.data_ptr():
        config.tie_word_embeddings = False  # type: ignore[union-attr]
        warnings.warn(
            "Input and output embeddings are no longer tied after merging. Setting `tie_word_embeddings=False` "
            "in the model config.",
            UserWarning,
            stacklevel=3,
        )


def merge_and_unload(
    pm: Any,
    adapter: Any,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    safe_merge: bool = False,
    share_storage: bool = True,
) -> nn.Module:
    """PEFT's `merge_and_unload`, without touching the original: a NEW plain model with `adapter` merged.

    The original model and `base` are never modified. The result's forward equals `fn(base, adapter, ...)`
    (and PEFT's merged model), except where a merged weight is tied (see the module docstring).

    Args:
        pm: what get_peft_model returned (or its `fn`).
        adapter: the trained tree (or `{adapter_name: tree}`) to merge.
        base: the base tree to merge into (default: pm's `base`, i.e. the model's own weights).
        safe_merge: raise if a merged weight is not finite.
        share_storage: weights the adapter does not change share storage with `base` (False: copies; see
            `build_model`).

    Returns:
        A new plain `nn.Module` of the model's class, no adapter layers, merged weights in place.
    """
    fn = peft_function(pm)
    if base is None:
        base = getattr(pm, "base", None)
        if base is None:
            base = {n: base_tensor(p) for n, p in fn.model.named_parameters()}
    _warn_tied_merges(fn, adapter)
    hqq: dict[str, nn.Module] = {}  # merged HQQ layers: new modules (PEFT's merge replaces the layer too)
    with torch.no_grad():
        names = Names(fn.aliases)
        merged = _merge_entries(names, base, _entries(fn, adapter, base), safe_merge, model=fn.model, new_modules=hqq)
        # overrides are the adapter's own tensors: the new model must not change when the adapter trains on
        from_adapter = {id(t) for t in optree.tree_leaves(adapter)}
        merged = {k: v.detach().clone() if id(v) in from_adapter else v for k, v in merged.items()}
    model = build_model(fn, merged, share_storage=share_storage)
    for path, layer in hqq.items():
        model.set_submodule(path, layer)
    return model
