"""PEFT's checkpoint key names for adapter-tree leaves, both ways (pure functions over strings).

A leaf `adapter[path][name]` is saved by PEFT 0.21.2 as

    method parameter (lora_A, ...)        base_model.model.{path}.{name}.weight
    ... in the method's `unsuffixed` set  base_model.model.{path}.{name}        (lora_embedding_A/B, DoRA magnitude)
    own param of an adapted layer         base_model.model.{path}.base_layer.{name}   (bias="lora_only"/"all")
    own param of any other module         base_model.model.{path}.{name}   (modules_to_save copies, bias="all")
    copy of a targeted module's param     base_model.model.{path}.{copies_part}.{name}   (LN tuning)
    shared trainable (path '<shared>')    base_model.{name}                 (VB-LoRA's vector bank)

plus, from `base`, a method's per-layer frozen tensors (`LayerFrozen`: base_model.model.{path}.{name}, with the
method's tail) and, for a method that ties (`Method.tie`), the params of each tied layer under its own path
(lm_head's LoRA with ensure_weight_tying, trainable tokens' lm_head).

A method declares its rules in its contract (funcpeft.methods.base): `Method.keys` (a `KeyRules`: the prefix
PEFT gives its parameter names, the names saved without `.weight`, names saved under another tail such as
`lora_B.bias`) and `SharedTensors.file_keys` (frozen shared tensors PEFT saves, e.g. VeRA's projections).
A module inside an adapted module sits under its `base_layer` in PEFT's names (an nn.MultiheadAttention's
out_proj: `mha.base_layer.out_proj.lora_A.weight`). Nothing here is specific to one method.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ._constants import EMBEDDING_LAYER_NAMES
from ._plan import PlanEntry
from ._targeting import is_saved_module, module_name, tied_layers, tied_to_input_embedding
from ._trees import SHARED_PATH, SHARED_PREFIX
from .methods import method_for
from .methods.base import KeyRules, Method

PREFIX = "base_model.model."
BIAS_ALL_WRAPPER_PARTS = ("modules_to_save", "original_module")  # see `bias_all_duplicates`

Leaf = tuple[str, str]  # (module path, name inside the entry)


def key_rules(config: Any) -> KeyRules:
    """The file key rules of the registered method implementing `config`, with its auxiliary parts' keys
    (`PeftConfig.auxiliary_keys`)."""
    rules: KeyRules = method_for(config).keys
    extra = config.auxiliary_keys() if hasattr(config, "auxiliary_keys") else ()
    return dataclasses.replace(rules, renamed=rules.renamed + extra) if extra else rules


def shared_file_keys(config: Any, base_keys: Iterable[str], adapted: Iterable[str] = ()) -> dict[str, str]:
    """{checkpoint key: base key} of a method's frozen shared tensors that PEFT saves (e.g. VeRA's projections).

    Shared base keys start with funcpeft._trees.SHARED_PREFIX (see `SharedTensors.file_keys`); `adapted`: the
    adapted module paths, for copies PEFT writes under each layer (`SharedTensors.layer_file_keys`).
    """
    method = method_for(config)
    if not isinstance(method, Method) or method.shared is None:
        return {}
    shared = [k for k in base_keys if k.startswith(SHARED_PREFIX)]
    return {**method.shared.file_keys(config, shared), **method.shared.layer_file_keys(config, shared, list(adapted))}


def peft_path(path: str, adapted: Iterable[str] = ()) -> str:
    """`path` as PEFT names it: `.base_layer` after each adapted module it lies in (PEFT wraps those modules)."""
    wrapped = set(adapted)
    parts = path.split(".")
    out: list[str] = []
    for i, part in enumerate(parts):
        out.append(part)
        # a path already in PEFT's form (a target_parameters wrapper path `experts.base_layer`) keeps its own
        if i < len(parts) - 1 and parts[i + 1] != "base_layer" and ".".join(parts[: i + 1]) in wrapped:
            out.append("base_layer")
    return ".".join(out)


def file_key(
    path: str, name: str, rules: KeyRules, adapted: bool, method_param: bool | None = None, wrapped: Iterable[str] = ()
) -> str:
    """The checkpoint key of leaf `adapter[path][name]`; `adapted`: the module carries method parameters;
    `wrapped`: the adapted module paths (a module inside one is under its `base_layer`).

    Tensors shared by all layers (path `SHARED_PATH`) are PEFT's tuner-level `base_model.{name}`; an adapted
    module's own parameters go under `base_layer` (trainable biases) or the method's `copies_part` (LN tuning).
    """
    if path == SHARED_PATH:
        return f"base_model.{name}"
    where = peft_path(path, wrapped)
    if rules.is_method_param(name) if method_param is None else method_param:
        return f"{PREFIX}{where}.{rules.tail(name)}"
    return f"{PREFIX}{where}.{rules.copies_part or 'base_layer'}.{name}" if adapted else f"{PREFIX}{where}.{name}"


def tree_entry_adapted(path: str, entry: Iterable[str], rules: KeyRules, modules_to_save: Iterable[str]) -> bool:
    """Whether a tree entry belongs to an adapted module (else it is a modules_to_save copy or a plain bias)."""
    if rules.copies_part is not None:  # LN tuning: every entry but modules_to_save copies is the method's
        return not is_saved_module(path, modules_to_save)
    return any(rules.is_method_param(n) for n in entry)


def tree_file_keys(
    tree: Mapping[str, Mapping[str, Any]], rules: KeyRules, modules_to_save: Iterable[str] | None = None
) -> dict[str, Leaf]:
    """{checkpoint key: (path, name)} for every leaf of an adapter tree (what `save_adapter` writes, but for the
    params of tied layers: `tie_file_keys`).

    modules_to_save: the config's (tells LN tuning's copies from modules_to_save ones).
    """
    mts = list(modules_to_save or [])
    adapted = {p for p, entry in tree.items() if p != SHARED_PATH and tree_entry_adapted(p, entry, rules, mts)}
    out: dict[str, Leaf] = {}
    for path, entry in tree.items():
        for name in entry:
            out[file_key(path, name, rules, path in adapted, wrapped=adapted)] = (path, name)
    return out


def plan_file_keys(plan: Mapping[str, PlanEntry], rules: KeyRules) -> dict[str, Leaf]:
    """{checkpoint key: (path, name)} for every leaf an adapter plan expects (see funcpeft._plan; the params of
    tied layers: `tie_file_keys`)."""
    wrapped = {p for p, e in plan.items() if e.spec is not None}
    out: dict[str, Leaf] = {}
    for path, e in plan.items():
        adapted = e.spec is not None or e.copied_by is not None
        for name in (*e.params, *e.overrides):
            out[file_key(path, name, rules, adapted, name in e.params, wrapped)] = (path, name)
    return out


def frozen_file_keys(plan: Mapping[str, PlanEntry], rules: KeyRules) -> dict[str, str]:
    """{checkpoint key: base key} of the frozen per-layer tensors PEFT saves (`LayerFrozen.saved`: SHiRA's mask
    indices as `base_model.model.{path}.shira_indices`, MiCA's lora_B)."""
    adapted = {p for p, e in plan.items() if e.spec is not None}
    out: dict[str, str] = {}
    for path, e in plan.items():
        frozen = e.method.layer_frozen if e.spec is not None else None
        if frozen is None or not frozen.saved:
            continue
        for name, key in e.frozen:
            if name in frozen.names:
                out[file_key(path, name, rules, True, True, adapted)] = key
    return out


def borrowed_file_keys(plan: Mapping[str, PlanEntry], rules: KeyRules) -> dict[str, Leaf]:
    """{checkpoint key: (holding path, name)} of the params layers read from another layer (`PlanEntry.borrowed`,
    `Method.shares`): PEFT's state dict holds the shared tensor under every layer's path."""
    wrapped = {p for p, e in plan.items() if e.spec is not None}
    return {
        file_key(path, name, rules, True, True, wrapped): (source, name)
        for path, e in plan.items()
        for name, source in e.borrowed
    }


def tie_file_keys(plan: Mapping[str, PlanEntry], rules: KeyRules) -> dict[str, tuple[str, str, str]]:
    """{checkpoint key: (source path, tied path, name)} of the params PEFT saves for layers tied to an adapted
    layer (`PlanEntry.tied`: with ensure_weight_tying `lm_head.lora_A.weight`, the embedding's lora_embedding_B
    transposed; trainable tokens' lm_head rows)."""
    adapted = {p for p, e in plan.items() if e.spec is not None} | {t.path for e in plan.values() for t in e.tied}
    return {
        file_key(t.path, name, rules, True, True, adapted): (path, t.path, name)
        for path, e in plan.items()
        for t in e.tied
        if t.saved
        for name, _ in t.shapes
    }


def tied_paths(model: nn.Module | None, config: Any, paths: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{adapted input embedding's path: layers tied to it} without a plan: the layers whose params PEFT saves
    too (`Method.tie`; PEFT's rule: the config's `target_modules_to_tie`, or the model's tied weights)."""
    method = method_for(config)
    if model is None or not isinstance(method, Method) or method.tie is None:
        return {}
    paths = [p for p in paths if p != SHARED_PATH]
    tied = tied_layers(model, config) if method.tie.on_request else tied_to_input_embedding(model, paths)
    source = module_name(model, model.get_input_embeddings()) if tied else None  # type: ignore[operator]
    if not tied or source is None or source not in paths:
        return {}
    return {source: tuple(tied)}


def base_file_key(param_name: str, adapted_paths: Iterable[str] | set[str]) -> str:
    """Checkpoint key of a base-model parameter PEFT saves (embeddings): under `base_layer` if adapted."""
    path, _, leaf = param_name.rpartition(".")
    return f"{PREFIX}{path}.base_layer.{leaf}" if path in adapted_paths else f"{PREFIX}{param_name}"


def saved_module_split(path: str, modules_to_save: Iterable[str]) -> tuple[str, str] | None:
    """(module, rest) when `path` lies in a modules_to_save module (outermost match, funcpeft.targeting's rule)."""
    names = list(modules_to_save)
    parts = path.split(".")
    for i in range(1, len(parts)):
        head = ".".join(parts[:i])
        if is_saved_module(head, names):
            return head, ".".join(parts[i:])
    return None


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT's `_remove_adapter_name_from_state_dict_key`: drop `.{adapter_name}` at the end or before the last part."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    head, _, suffix = key.rpartition(".")
    return f"{re.sub(re.escape(f'.{adapter_name}') + '$', '', head)}.{suffix}"


def bias_all_duplicates(saved: Mapping[str, Iterable[str]], adapter_name: str) -> dict[str, tuple[str, str, str]]:
    """PEFT's extra keys for bias="all" with modules_to_save: {key: (which, module path, param name)}.

    PEFT's bias="all" selection takes every state-dict key ending in `.bias`, which includes the
    ModulesToSaveWrapper's `{m}.modules_to_save.{adapter}.{name}` (the trained copy) and
    `{m}.original_module.{name}` (the base's), then strips the adapter name its usual way.
    saved: {modules_to_save module path: names of its parameters}.
    """
    out: dict[str, tuple[str, str, str]] = {}
    for path, names in saved.items():
        for n in names:
            if n == "bias" or n.endswith(".bias"):
                copy = remove_adapter_name(f"{PREFIX}{path}.modules_to_save.{adapter_name}.{n}", adapter_name)
                out[copy] = ("modules_to_save", path, n)
                out[f"{PREFIX}{path}.original_module.{n}"] = ("original_module", path, n)
    return out


def is_wrapper_duplicate(key: str, saved_paths: Iterable[str]) -> bool:
    """A `bias_all_duplicates` key (whatever the adapter name was): ignored on load."""
    return any(key.startswith(f"{PREFIX}{m}.{w}.") for m in saved_paths for w in BIAS_ALL_WRAPPER_PARTS)


def parse_file_key(key: str, rules: KeyRules, modules_to_save: Iterable[str], bias: str) -> tuple[str, Leaf] | None:
    """Inverse of `file_key` without a model: ("adapter" | "base" | "duplicate", (path, name)), None if foreign.

    "base": a base-model parameter PEFT saved (e.g. the embedding under `base_layer`), as (param name, "").
    """
    if not key.startswith(PREFIX):  # tuner-level tensors: trainable shared ones (VB-LoRA's bank) or VeRA's frozen
        if not key.startswith("base_model."):
            return None
        name = key[len("base_model.") :]
        return ("adapter", (SHARED_PATH, name)) if rules.is_method_param(name) else ("base", (key, ""))
    rest = key[len(PREFIX) :]
    for leaf, tail in rules.renamed:
        if rest.endswith(f".{tail}"):
            return "adapter", (_unwrapped(rest.removesuffix(f".{tail}")), leaf)
    parts = key[len(PREFIX) :].split(".")
    if len(parts) < 2:
        return None
    for name in rules.unsuffixed:  # dotted names (a sub-module's parameter, e.g. MonteCLoRA's)
        if "." in name and key.endswith(f".{name}") and len(key) > len(PREFIX) + len(name) + 1:
            return "adapter", (key[len(PREFIX) : -len(name) - 1], name)
    if rules.copies_part is not None and rules.copies_part in parts[1:-1]:  # LN tuning's copies
        at = parts.index(rules.copies_part, 1)
        return "adapter", (".".join(parts[:at]), ".".join(parts[at + 1 :]))
    last, prev = parts[-1], parts[-2]
    if last == "weight" and len(parts) > 3 and prev.isdigit() and parts[-3] in rules.indexed:  # ModuleList parts
        return "adapter", (_unwrapped(".".join(parts[:-3])), f"{parts[-3]}.{prev}")
    if last in rules.unsuffixed or (last.startswith(rules.param_prefix) and last not in ("weight", "bias")):
        return "adapter", (_unwrapped(".".join(parts[:-1])), last)
    if last == "weight" and rules.is_method_param(prev) and prev not in rules.unsuffixed and len(parts) > 2:
        return "adapter", (_unwrapped(".".join(parts[:-2])), prev)
    mts = list(modules_to_save)
    split = saved_module_split(".".join(parts), mts)
    if split is not None:
        module, rest = split
        if rest.split(".", 1)[0] in BIAS_ALL_WRAPPER_PARTS:
            return "duplicate", (module, rest)
        return "adapter", split
    if prev == "base_layer":
        path = ".".join(parts[:-2])
        if last == "bias" and bias != "none":
            return "adapter", (path, last)
        return "base", (f"{path}.{last}", "")
    if last == "bias" and bias == "all":
        return "adapter", (".".join(parts[:-1]), last)
    return "base", (".".join(parts), "")


def _unwrapped(path: str) -> str:
    """Inverse of `peft_path` for a module path: a `base_layer` before a child module's name is PEFT's wrapper
    (an attention's `mha.base_layer.out_proj`) and goes; trailing ones are target_parameters wrapper paths
    (`experts.base_layer`, funcpeft's tree path too) and stay."""
    parts = path.split(".")
    keep = [p for i, p in enumerate(parts) if p != "base_layer" or all(q == "base_layer" for q in parts[i + 1 :])]
    return ".".join(keep)


def embedding_is_targeted(target_modules: Any, module_names: Iterable[str]) -> bool:
    """PEFT's `save_embedding_layers="auto"` test (utils/save_and_load.get_peft_model_state_dict)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return False
        return any(
            re.fullmatch(target_modules, k)
            for k in module_names
            if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES)
        )
    return bool(target_modules) and any(k in target_modules for k in EMBEDDING_LAYER_NAMES)
