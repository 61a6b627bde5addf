"""Loading PEFT adapters: `load_adapter` (files -> tree) and `from_pretrained` (PEFT's `PeftModel.from_pretrained`).

Every tensor of the checkpoint is checked against the model before anything is returned: missing keys,
unexpected keys and shape mismatches are collected and raised as one `AdapterMismatchError` (or warned
about with `strict=False`, which then keeps a fresh init for what is missing or mis-shaped, like PEFT).
Leaves get PEFT's dtype (the layer's, upcast to float32 for fp16/bf16 layers when
`autocast_adapter_dtype`) and live on their layer's device. The model is never modified.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ._checks import AdapterMismatchError, LeafSpec, Problems, device_of, expected_leaves
from ._config import PeftConfig
from ._keys import (
    PREFIX,
    Leaf,
    base_file_key,
    borrowed_file_keys,
    file_key,
    frozen_file_keys,
    is_saved_module,
    is_wrapper_duplicate,
    key_rules,
    parse_file_key,
    plan_file_keys,
    shared_file_keys,
    tie_file_keys,
    tree_entry_adapted,
)
from ._plan import PlanEntry, init_adapter, init_shared, method_shapes, plan_adapter
from ._replicate import prepared
from ._trees import PROMPT_PATH
from .io import CONFIG_NAME, WEIGHTS_NAME, adapter_dir, adapters_in, read_config, read_tensors
from .methods import InputMethod, Method, method_for
from .methods._patterns import pattern_key
from .methods.base import LayerSpec

# -- sizes the config implies, checked before anything is allocated ---------------------------------------------
RANK_FACTOR, RANK_FLOOR = 4, 4096  # a loaded config may give a layer a rank up to max(4 * min(in, out), 4096)


def _with_rank(spec: LayerSpec[Any], r: int) -> LayerSpec[Any]:
    return dataclasses.replace(spec, hyper=dataclasses.replace(spec.hyper, r=r))


def _rank_field(config: PeftConfig, path: str) -> str:
    """The config field that sets the rank of layer `path`: `r`, or the rank_pattern entry that matches."""
    k = pattern_key(getattr(config, "rank_pattern", None) or {}, path)
    return "r" if k is None else f"rank_pattern[{k!r}]"


def check_sizes(
    shapes: Mapping[str, tuple[int, ...]],
    plan: Mapping[str, PlanEntry],
    config: PeftConfig,
    leaves: Mapping[Leaf, LeafSpec],
    where: str,
) -> None:
    """The layer ranks the config sets, against the checkpoint's tensor shapes (`shapes`, read from the file
    header) and against a sane limit, before any fresh init or shared tensor is allocated.

    A rank that differs from the checkpoint's means the config does not describe these weights: an error even
    with strict=False (PEFT cannot load such a pair either). A layer the checkpoint does not hold in full gets
    a fresh init sized by the config alone: there a rank above max(RANK_FACTOR * min(in, out), RANK_FLOOR) is
    refused (a rank above min(in, out) adds nothing; a corrupt one would allocate gigabytes before any error).
    """
    config_file, weights_file = os.path.join(where, CONFIG_NAME), os.path.join(where, WEIGHTS_NAME)
    by_path: dict[str, list[tuple[str, str]]] = {}
    for key, (path, name) in plan_file_keys(plan, key_rules(config)).items():
        if plan[path].spec is not None and name in plan[path].params:
            by_path.setdefault(path, []).append((key, name))
    for path, keys in by_path.items():
        spec = plan[path].spec
        assert spec is not None
        r = getattr(spec.hyper, "r", None)  # a method's hyper-parameters name their rank `r` when they have one
        if not isinstance(r, int):
            continue  # no rank (IA3): every size follows from the model
        field, fresh = _rank_field(config, path), []
        for key, name in keys:
            want, got = leaves[(path, name)].shape, shapes.get(key)
            if want is None or got == want:
                continue
            fresh.append((key, want))
            for w, g in zip(want, got or ()):
                if (
                    w == r != g and tuple(method_shapes(_with_rank(spec, g)).get(name, ())) == got
                ):  # exactly rank g's shape
                    raise ValueError(
                        f"{config_file} sets `{field}` = {r} for {path}, which makes {key} {list(want)}, but "
                        f"{weights_file} holds it as {list(got or ())} (rank {g}): the config does not describe these "
                        f"weights. Fix `{field}` in the config or save the adapter again."
                    )
        limit = max(RANK_FACTOR * min(spec.in_features, spec.out_features), RANK_FLOOR)
        if fresh and r > limit:
            key, want = fresh[0]
            raise ValueError(
                f"{config_file} sets `{field}` = {r} for {path} (in_features {spec.in_features}, out_features "
                f"{spec.out_features}), above the largest rank funcpeft initialises for it ({limit} = max({RANK_FACTOR} "
                f"* min(in, out), {RANK_FLOOR})): {key} would be {list(want)}"
                + (f" (the checkpoint holds {list(shapes[key])})" if key in shapes else f" ({weights_file} lacks it)")
                + ". The config is corrupt or not this adapter's."
            )


# -- checkpoint vs model -------------------------------------------------------------------------------------
class Matched(NamedTuple):
    adapter: dict[Leaf, torch.Tensor]
    base: dict[str, torch.Tensor]  # base-model parameters PEFT saved too (embeddings), by canonical name
    problems: Problems
    tied: dict[str, torch.Tensor]  # params PEFT saved for layers tied to another (`PlanEntry.tied`), by key


def match_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    plan: Mapping[str, Any],
    model: nn.Module,
    config: PeftConfig,
    leaves: Mapping[Leaf, LeafSpec],
    shared: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
) -> Matched:
    """Sort checkpoint tensors into adapter leaves and base entries; collect every problem.

    shared: the method's frozen base entries (funcpeft._plan.init_shared), which it may save.
    """
    rules = key_rules(config)
    expected = plan_file_keys(plan, rules)
    borrowed = borrowed_file_keys(plan, rules)
    copies: dict[str, torch.Tensor] = {}
    ties = tie_file_keys(plan, rules)
    tie_shapes = {t.path: dict(t.shapes) for e in plan.values() for t in e.tied}
    adapted = {p for p, e in plan.items() if e.spec is not None} | set(tie_shapes)
    mts = getattr(config, "modules_to_save", None)
    saved = [p for p, e in plan.items() if e.spec is None and is_saved_module(p, mts)]
    canon = {id(p): n for n, p in model.named_parameters()}
    named = dict(model.named_parameters(remove_duplicate=False))
    base_keys = {base_file_key(n, adapted): canon[id(p)] for n, p in named.items()}
    shared_keys = {**shared_file_keys(config, shared, sorted(adapted)), **frozen_file_keys(plan, rules)}
    base_keys.update(shared_keys)
    reference = {**named, **shared}
    found: dict[Leaf, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    tied: dict[str, torch.Tensor] = {}
    problems = Problems()
    for key, t in tensors.items():
        if key in borrowed:  # another layer's tensor, saved under this layer too (Method.shares): checked below
            copies[key] = t
        elif key in ties:
            want = tie_shapes[ties[key][1]][ties[key][2]]
            if tuple(t.shape) != want:
                problems.shapes.append((key, tuple(t.shape), want))
            else:
                tied[key] = t
        elif key in expected:
            want = leaves[expected[key]].shape
            if want is not None and tuple(t.shape) != want:
                problems.shapes.append((key, tuple(t.shape), want))
            else:
                found[expected[key]] = t
        elif key in base_keys:
            name = base_keys[key]
            if tuple(t.shape) != tuple(reference[name].shape):
                problems.shapes.append((key, tuple(t.shape), tuple(reference[name].shape)))
            else:
                base[name] = t
        elif not is_wrapper_duplicate(key, saved):
            problems.unexpected.append(key)
    for key, t in copies.items():  # funcpeft keeps a shared tensor once: every copy must be the holder's
        holder = found.get(borrowed[key])
        if holder is not None and (t.shape != holder.shape or not torch.equal(t, holder)):
            problems.unexpected.append(f"{key} (differs from the tensor it shares, at {borrowed[key][0]!r})")
    mis_shaped = {k for k, _, _ in problems.shapes}
    problems.missing = [k for k, leaf in expected.items() if leaf not in found and k not in mis_shaped]
    problems.missing += [k for k, name in shared_keys.items() if name not in base and k not in mis_shaped]
    problems.missing += [k for k in ties if k not in tied and k not in mis_shaped]
    return Matched(found, base, problems, tied)


def check_ties(
    tied: Mapping[str, torch.Tensor],
    tree: Mapping[str, Mapping[str, torch.Tensor]],
    plan: Mapping[str, Any],
    config: PeftConfig,
    where: str,
    strict: bool,
) -> None:
    """The params a checkpoint holds for tied layers must be the ones the tie gives (funcpeft keeps them once)."""
    ties = tie_file_keys(plan, key_rules(config))
    differ = []
    for key, t in tied.items():
        source, _, name = ties[key]
        tie = plan[source].method.tie
        assert tie is not None
        want = tie.params(dict(tree[source]))[name]
        if not torch.equal(t.to(device=want.device, dtype=want.dtype), want.detach()):
            differ.append(f"{key} (tied to {source})")
    if differ:
        msg = (
            f"The adapter checkpoint in {where!r} holds values for layers tied to the input embedding "
            f"that differ from what the embedding's adapter gives them: {differ}. funcpeft keeps tied adapters once "
            "(the embedding's)"
        )
        if strict:
            raise AdapterMismatchError(msg + "; pass strict=False to load the embedding's values for them.")
        warnings.warn(msg + "; using the embedding's values (strict=False).", stacklevel=4)


def _report(problems: Problems, what: str, model: nn.Module, strict: bool) -> None:
    if not problems:
        return
    msg = problems.message(what, model)
    if strict:
        raise AdapterMismatchError(
            msg + "\nPass strict=False to load anyway (missing or mis-shaped leaves keep a fresh init)."
        )
    warnings.warn(
        msg + "\nLoading anyway (strict=False): missing or mis-shaped leaves keep a fresh init.", stacklevel=4
    )


def build_tree(
    found: Mapping[Leaf, torch.Tensor],
    plan: Mapping[str, Any],
    model: nn.Module,
    leaves: Mapping[Leaf, LeafSpec],
    autocast_adapter_dtype: bool,
    is_trainable: bool,
    shared: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter tree in plan order; leaves absent from `found` get a fresh init (PEFT's non-strict load).

    shared: the adapter's frozen shared tensors (a fresh init of some layers reads them: FRoD's bases)."""
    absent = {p for p, e in plan.items() if any((p, n) not in found for n in (*e.params, *e.overrides))}
    fresh: dict[str, dict[str, torch.Tensor]] = {}
    if absent:
        fresh = init_adapter(model, {p: plan[p] for p in absent}, autocast_adapter_dtype, frozen_shared=shared)
    tree: dict[str, dict[str, torch.Tensor]] = {}
    for path, e in plan.items():
        entry: dict[str, torch.Tensor] = {}
        for n in (*e.params, *e.overrides):
            spec = leaves[(path, n)]
            t = found[(path, n)] if (path, n) in found else fresh[path][n].detach()
            # PEFT's freeze for is_trainable=False skips the biases bias="lora_only"/"all" trains in place
            entry[n] = t.to(device=spec.device, dtype=spec.dtype).requires_grad_(is_trainable or n in e.in_place)
        tree[path] = entry
    return tree


# -- public API ----------------------------------------------------------------------------------------------
def _locate(directory: str | os.PathLike, adapter_name: str, root_fallback: bool = False) -> str:
    """Where `adapter_name` lives in PEFT's layout: `directory` for "default", else `directory/<adapter_name>`.

    root_fallback (from_pretrained): a non-default name with no such subdirectory names the adapter in
    `directory` itself, as in PEFT's `PeftModel.from_pretrained(model, path, adapter_name=...)`.
    """
    here = os.fspath(directory)
    where = adapter_dir(here, adapter_name)  # validates the name
    if adapter_name == "default" or os.path.exists(os.path.join(where, CONFIG_NAME)):
        return where
    found = adapters_in(here)
    if root_fallback and "default" in found:
        return here
    listing = ", ".join(
        repr(n) + (f" (in {here!r} itself)" if n == "default" else f" (in {os.path.join(here, n)!r})") for n in found
    )
    hint = " Leave adapter_name out (or pass 'default') to load the adapter at its root." if "default" in found else ""
    raise FileNotFoundError(
        f"No adapter {adapter_name!r} in {here!r}: PEFT's layout keeps it in {where!r}, which has no {CONFIG_NAME}. "
        f"Adapters there: {listing or 'none'}.{hint}"
    )


class Loaded(NamedTuple):
    config: PeftConfig  # resolved against the model, like FunctionalPeftModel.peft_config
    plan: dict[str, Any]
    tree: dict[str, dict[str, torch.Tensor]]
    # shared method tensors, per-layer frozen tensors + base parameters the checkpoint carries (model's dtype/device)
    base: dict[str, torch.Tensor]
    model: nn.Module  # what the plan is for: the model, or its replicated structure (layer_replication)


def load_for_model(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
    strict: bool = True,
    allow_pickle: bool = False,
    root_fallback: bool = False,
) -> Loaded:
    """Read, resolve, check and convert a saved adapter for `model` (shared by load_adapter and from_pretrained)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    where = _locate(directory, adapter_name, root_fallback)
    config = read_config(where)
    if isinstance(method_for(config), InputMethod):
        return _load_input(model, config, read_tensors(where, allow_pickle), where, adapter_name, is_trainable, strict)
    tensors = _decoded(config, read_tensors(where, allow_pickle))
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    # PEFT keeps the saved base_model_name_or_path on load (no rename warning): resolve with the model's, restore
    name = model.__dict__.get("name_or_path", None) or None
    model = prepared(model, config)  # layer_replication: plan on the replicated structure, like PEFT
    config_for_plan = dataclasses.replace(config, base_model_name_or_path=name)
    resolved, plan = plan_adapter(model, config_for_plan, None, adapter_name, for_checkpoint=True)
    resolved.base_model_name_or_path = config.base_model_name_or_path
    resolved.inference_mode = not is_trainable
    leaves = expected_leaves(model, plan, autocast_adapter_dtype)
    check_sizes(shapes, plan, resolved, leaves, where)
    shared = init_shared(model, plan, None, autocast_adapter_dtype)
    matched = match_checkpoint(tensors, plan, model, resolved, leaves, shared, adapter_name)
    _report(matched.problems, f"The adapter checkpoint in {where!r}", model, strict)
    tree = build_tree(matched.adapter, plan, model, leaves, autocast_adapter_dtype, is_trainable, shared)
    # frozen tensors the file lacks (strict=False) keep their fresh values, like PEFT's layers
    check_ties(matched.tied, tree, plan, resolved, where, strict)
    ref = {**dict(model.named_parameters()), **shared}
    loaded = {n: t.to(device=device_of(ref[n]), dtype=ref[n].dtype) for n, t in matched.base.items()}
    return Loaded(resolved, plan, tree, {**shared, **loaded}, model)


def _load_input(
    model: nn.Module,
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    where: str,
    adapter_name: str,
    is_trainable: bool,
    strict: bool,
) -> Loaded:
    """A saved prompt-learning adapter (PEFT's `prompt_embeddings`, ...), in inference mode as PEFT loads it."""
    if is_trainable:  # PEFT's rule
        raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
    method = method_for(config)
    assert isinstance(method, InputMethod)
    name = model.__dict__.get("name_or_path", None) or None
    for_plan = dataclasses.replace(config, base_model_name_or_path=name, inference_mode=True)
    resolved, plan = plan_adapter(model, for_plan, None, adapter_name)
    resolved.base_model_name_or_path = config.base_model_name_or_path
    entry = plan[PROMPT_PATH]
    assert entry.prompt is not None
    fresh = dict(init_adapter(model, {PROMPT_PATH: entry}, trainable=False)[PROMPT_PATH])
    try:
        prompt = method.load_state(entry.prompt[1], tensors, fresh)
    except (KeyError, ValueError) as error:
        raise type(error)(f"The adapter checkpoint in {where!r}: {error}") from None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # PEFT's loaded prompt encoder keeps requires_grad=True (its inference-mode freeze covers only the base model's
    # adapter layers), and its counts say so: the same here, but for the parameters its encoder freezes itself
    frozen = method.frozen(entry.prompt[1])
    tree: dict[str, dict[str, torch.Tensor]] = {
        PROMPT_PATH: {
            k: t.to(device=device, dtype=torch.float32).requires_grad_(k not in frozen) for k, t in prompt.items()
        }
    }
    used = {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    params = dict(model.named_parameters())
    missing = []
    for path, saved in plan.items():
        if path == PROMPT_PATH:
            continue
        tree[path] = {}
        for n in saved.overrides:
            key = f"base_model.{path}.{n}"
            own = params[f"{path}.{n}"]
            if key not in tensors:
                missing.append(key)
                t = own.detach().clone()
            else:
                t = tensors[key]
                used.add(key)
            tree[path][n] = t.to(device=own.device, dtype=own.dtype).requires_grad_(False)
    unexpected = sorted(k for k in tensors if k not in used)
    if strict and (missing or unexpected):
        raise AdapterMismatchError(
            f"The adapter checkpoint in {where!r} does not fit {type(model).__name__} with its config: missing keys "
            f"{missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    return Loaded(resolved, plan, tree, {}, model)


def _decoded(config: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint as the method's leaves are keyed (`FileCodec.decode`, e.g. VB-LoRA's top-k logits)."""
    method = method_for(config)
    return method.codec.decode(config, tensors) if isinstance(method, Method) and method.codec else tensors


def _load_without_model(where: str, strict: bool, is_trainable: bool, allow_pickle: bool) -> tuple[dict, PeftConfig]:
    config = read_config(where)
    tensors = _decoded(config, read_tensors(where, allow_pickle))
    rules = key_rules(config)
    mts, bias = getattr(config, "modules_to_save", None) or [], getattr(config, "bias", "none")
    method = method_for(config)
    if isinstance(method, Method) and method.shares is not None:
        raise ValueError(
            f"loading the {method.peft_type} adapter in {where!r} needs the model it was made for (pass model=...): "
            "its layers share tensors, and which layer reads which depends on the model's modules"
        )
    frozen = method.layer_frozen.names if isinstance(method, Method) and method.layer_frozen else ()
    tails = {rules.tail(n) for n in frozen}
    tree: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[Leaf, str] = {}
    unexpected: list[str] = []
    for key, t in tensors.items():
        if key.startswith(PREFIX) and any(key.endswith(f".{t}") for t in tails):
            continue  # a layer's frozen tensor (SHiRA's mask indices, MiCA's lora_B): the base side, needs the model
        parsed = parse_file_key(key, rules, mts, bias)
        if parsed is None:
            unexpected.append(key)
        elif parsed[0] == "adapter":
            (path, name) = parsed[1]
            tree.setdefault(path, {})[name] = t.requires_grad_(is_trainable)
            keys[(path, name)] = key
    wrapped = {p for p, e in tree.items() if any(rules.is_method_param(n) for n in e)}
    for (path, name), key in keys.items():  # the key must be exactly what saving this leaf would write
        adapted = tree_entry_adapted(path, tree[path], rules, mts)
        if file_key(path, name, rules, adapted, wrapped=wrapped) != key:
            unexpected.append(key)
            del tree[path][name]
    tree = {p: e for p, e in tree.items() if e}
    if unexpected:
        msg = f"The adapter checkpoint in {where!r} has keys funcpeft cannot place: {sorted(unexpected)}"
        if strict:
            raise AdapterMismatchError(msg + f" (expected keys like {PREFIX}<module path>.lora_A.weight)")
        warnings.warn(msg + "; they are ignored (strict=False).", stacklevel=3)
    return tree, config


def load_adapter(
    directory: str | os.PathLike,
    adapter_name: str = "default",
    model: nn.Module | None = None,
    *,
    strict: bool = True,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
    allow_pickle: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], PeftConfig]:
    """Read a PEFT adapter directory: `(adapter_params, peft_config)`.

    Base-model tensors PEFT saves along (embedding layers) are not part of the tree: `from_pretrained` applies them.

    Args:
        directory: a local directory in PEFT's layout.
        adapter_name: "default" reads `directory`, any other name `directory/<adapter_name>/` (where saving puts
            it; FileNotFoundError listing the adapters there if it is absent).
        model: if given, the tree is checked against it (one AdapterMismatchError listing every missing,
            unexpected and mis-shaped key), has PEFT's dtypes, lives on each layer's device, and the config is
            resolved against it. Without: the tree is read from the key names alone (CPU, the file's dtypes).
        strict: False warns about mismatches instead of raising (mismatched leaves keep a fresh init).
        is_trainable: leaves require grad.
        autocast_adapter_dtype: PEFT's rule: fp16/bf16 adapter leaves become float32.
        allow_pickle: read a pickled `adapter_model.bin` (refused by default).

    Returns:
        (adapter tree `{module path: {leaf name: Tensor}}`, the PeftConfig).
    """
    if model is None:
        return _load_without_model(_locate(directory, adapter_name), strict, is_trainable, allow_pickle)
    loaded = load_for_model(
        model,
        directory,
        adapter_name,
        is_trainable=is_trainable,
        autocast_adapter_dtype=autocast_adapter_dtype,
        strict=strict,
        allow_pickle=allow_pickle,
    )
    params = dict(loaded.model.named_parameters())
    differing = [n for n, t in loaded.base.items() if n in params and not torch.equal(t, params[n])]
    # frozen adapter tensors as the config and model alone give them (SHiRA's mask, MiCA's lora_B)
    fresh = init_shared(loaded.model, loaded.plan, None, autocast_adapter_dtype)
    differing += [n for n, t in fresh.items() if n in loaded.base and (t.is_meta or not torch.equal(t, loaded.base[n]))]
    if differing:
        warnings.warn(
            f"The checkpoint also carries base-model weights that differ from the model's (or frozen adapter tensors "
            f"its config alone does not give): {differing}. load_adapter ignores them; funcpeft.from_pretrained uses "
            "them (in `base`), like PEFT.",
            stacklevel=2,
        )
    return loaded.tree, loaded.config
