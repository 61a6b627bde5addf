"""Which modules an adapter touches: PEFT's matching rules, reproduced exactly.

Pure functions over module names (and, for "all-linear" and layer kinds, module types). Nothing here
mutates a model or a config: `resolve_config` returns a new config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
from transformers.pytorch_utils import Conv1D as HFConv1D  # GPT-2 style Conv1D: weight (in, out)

from ._config import TaskType
from ._constants import (
    EMBEDDING_LAYER_NAMES,
    MIN_TARGET_MODULES_FOR_OPTIMIZATION,
    SEQ_CLS_HEAD_NAMES,
    TASK_MODULES_TO_SAVE,
)
from ._modules import module_name, tied_to_embedding
from ._quant import is_quant_linear, quant_backend
from .methods.base import LayerKind

_LINEAR_TYPES: tuple[type, ...] = (nn.Linear, HFConv1D)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The layer family of `module` (funcpeft.methods.base.LayerKind), None if funcpeft cannot adapt it."""
    if isinstance(module, nn.Embedding):
        return LayerKind.EMBEDDING
    if isinstance(module, _CONV_TYPES):
        return LayerKind.CONV
    if is_quant_linear(module):  # an nn.Linear subclass whose weight only its own kernel reads
        return LayerKind.QUANT_LINEAR
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, HFConv1D):
        return LayerKind.CONV1D_HF
    if isinstance(module, nn.MultiheadAttention):
        return LayerKind.MHA
    return None


# -- weight tying (LoraConfig.ensure_weight_tying) ------------------------------------------------------------
def _embedding_in(names: Any) -> bool:
    """PEFT's `_check_tied_modules` test: a list entry, or a str pattern, naming an embedding layer."""
    if isinstance(names, str):
        return any(re.fullmatch(names, m) for m in EMBEDDING_LAYER_NAMES)
    return any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in names or ())


def _tie_targets(model: nn.Module, config: Any, warn: bool) -> tuple[Any, list[str]] | None:
    """PEFT's `_check_tied_modules` + `LoraModel._add_targets_to_tie`: (target_modules with the input embedding
    added and the tied layers removed, the tied layers' names), or None when nothing is tied."""
    ensure = bool(getattr(config, "ensure_weight_tying", False))
    # TrainableTokensConfig has no modules_to_save (and ties by its own rule: tied_to_input_embedding)
    to_save = _embedding_in(getattr(config, "modules_to_save", None) or [])
    targeted = _embedding_in(getattr(config, "target_modules", None))
    tied = tied_to_embedding(model) if ensure or to_save or targeted else []
    if not ensure:
        if warn and tied and (to_save or targeted):
            what = (
                "`ensure_weight_tying` is not set to True"
                if hasattr(config, "ensure_weight_tying")
                else ("no implementation exists to tie the adapters")
            )
            warnings.warn(
                f"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but {what}. This can "
                "lead to complications, for example when merging the adapter or converting your model to formats "
                "other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777",
                stacklevel=4,
            )
        return None
    if not tied:
        if warn:
            warnings.warn(
                "You have requested `ensure_weight_tying`, but no tied modules were found in the model", stacklevel=4
            )
        return None
    if to_save:
        raise NotImplementedError(
            "ensure_weight_tying=True with an embedding layer in modules_to_save (PEFT ties the tied layers' copies to "
            "the embedding's) is not implemented in funcpeft; target the embedding with LoRA instead, or untie."
        )
    if not targeted:
        if warn:
            warnings.warn(
                "You have requested `ensure_weight_tying`, but no tied modules are added in either `modules_to_save` "
                "or `target_modules`",
                stacklevel=4,
            )
        return None
    embedding = module_name(model, model.get_input_embeddings()) or ""  # type: ignore[operator]
    raw = config.target_modules
    if isinstance(raw, str):  # adapters go on the input embedding, never on the tied output layer
        return rf"(?:{raw}|^{re.escape(embedding)}$)", tied
    targets = set(raw or []) | {embedding}
    for key in tied:
        match = next((m for m in sorted(targets) if re.match(rf"(^|.*\.){m}($|\..*)", key)), None)
        if match is not None:
            targets.discard(match)
    return targets, tied


def tied_layers(model: nn.Module, config: Any) -> list[str]:
    """Modules that get the input embedding's adapter, tied (LoraConfig(ensure_weight_tying=True)), in
    `named_modules` order: those matching the config's `target_modules_to_tie` (PEFT's attribute, set by
    `resolve_config`; recomputed for a config that was not resolved against a model)."""
    to_tie = getattr(config, "target_modules_to_tie", None)
    if to_tie is None:
        tie = _tie_targets(model, config, warn=False) if getattr(config, "ensure_weight_tying", False) else None
        to_tie = tie[1] if tie else []
    return [n for n, _ in model.named_modules() if n and _matches_list(to_tie, n)]


def _matches_list(names: Any, key: str) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def is_saved_module(path: str, modules_to_save: Any) -> bool:
    """PEFT's ModulesToSaveWrapper rule (`_set_trainable`): the module name ends with an entry (no dot boundary)."""
    return any(path.endswith(t) for t in modules_to_save or ())


def overlaps_saved_module(key: str, modules_to_save: Any) -> bool:
    """PEFT's exclusion rule in `check_target_module_exists`: `key` is, or lies inside, a modules_to_save entry."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save or ())


def is_excluded(config: Any, key: str) -> bool:
    """exclude_modules first, then modules_to_save (never LoRA targets): PEFT's `check_target_module_exists`."""
    ex = getattr(config, "exclude_modules", None)  # VeraConfig has none
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return True
        elif _matches_list(ex, key):
            return True
    return overlaps_saved_module(key, getattr(config, "modules_to_save", None))  # TrainableTokensConfig has none


def layer_index(key: str, layers_pattern: Any) -> int | None:
    """The first numbered segment of `key` (PEFT's rule), optionally after one of `layers_pattern`."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(config: Any, key: str) -> bool:
    """Does module `key` match the (resolved) config? PEFT's `check_target_module_exists`."""
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = getattr(config, "layers_to_transform", None)  # IA3Config has no layer selection
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if found and using_layers:
        idx = layer_index(key, getattr(config, "layers_pattern", None))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers  # type: ignore[operator]
    return found


def output_embedding_name(model: nn.Module) -> str | None:
    """The module name of the model's output embedding (lm_head), None if it has none."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def _all_linear(model: nn.Module, config: Any) -> set[str]:
    names = {n for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES)}
    head = output_embedding_name(model)
    if head is not None:
        names.discard(head)
    elif config.task_type == TaskType.SEQ_CLS:
        for attr in SEQ_CLS_HEAD_NAMES:
            cls_head = getattr(model, attr, None)
            if cls_head is not None:
                names.discard(next(n for n, m in model.named_modules() if m is cls_head))
                break
    return names


def _minimal_suffixes(targets: set[str], others: list[str]) -> set[str]:
    """PEFT's `_find_minimal_target_modules`: the fewest suffixes that separate targets from others."""

    def suffixes(s: str) -> list[str]:
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {suf for item in others for suf in suffixes(item)}
    required: set[str] = set()
    for item, sufs in sorted(((t, suffixes(t)) for t in targets), key=lambda tup: tup[1]):
        for suf in sufs:
            if suf in required or suf in other_suffixes:
                continue
            if not any(item.endswith("." + req) for req in required):
                required.add(suf)
                break
    return required or set(targets)


# -- transformers v5 MoE models: PEFT's config conversion ---------------------------------------------------------
# transformers v5 fuses each MoE layer's experts into stacked parameters (`experts.gate_up_proj` (E, 2I, H),
# `experts.down_proj` (E, H, I)) and makes the router `gate` a module with a bare `weight`. PEFT 0.21.2 rewrites a
# LoRA config for these model types at get_peft_model / load time (peft/utils/transformers_weight_conversion.py,
# `_convert_peft_config_moe`): v4 expert names in `target_modules` (w1/w3/w2, gate_proj/up_proj/down_proj, gate)
# move to `target_parameters`, a fused pair gets twice the rank and alpha (rank/alpha patterns), and both fields
# become sets. funcpeft rewrites its resolved copy the same way (the user's config is never touched).
# PEFT's copies (peft/utils/transformers_weight_conversion.py): part of its behaviour
_CONVERSION_PATTERN = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}
_MOE_TARGET_MODULE_MAPPING: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
_MOE_FUSED_TARGETS: dict[str, dict[str, list[str]]] = {
    "mixtral": {"gate_up_proj": ["w1", "w3"]},
    "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]},
}


def _resolve_string_targets(config: Any, model: nn.Module, mapping: dict[str, str]) -> set[str]:
    """PEFT's `_resolve_string_target_modules`: a regex or "all-linear" `target_modules` as the leaf names it targets.

    The v4 expert and router names (mapping keys) no longer exist as keys on v5: "all-linear" adds them all (they
    were nn.Linear in v4); a regex gets each one whose reconstructed v4 key (`{container}.{old name}`) it matches.
    """
    if config.target_modules.lower() == "all-linear":
        return {name.rsplit(".", 1)[-1] for name in _all_linear(model, config)} | mapping.keys()
    module_keys = [name for name, _ in model.named_modules()]
    param_keys = [name for name, _ in model.named_parameters()]
    matched = {key.rsplit(".", 1)[-1] for key in (*module_keys, *param_keys) if is_target(config, key)}
    containers: dict[str, set[str]] = {}
    for name in param_keys:
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in mapping.items():
        if old not in matched and any(is_target(config, f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return matched


def convert_moe_targets(config: Any, model: nn.Module) -> None:
    """Rewrite `config` (funcpeft's resolved copy; its pattern dicts are copied first) like PEFT for v5 MoE models.

    No-op unless the model's `config.model_type` has a transformers checkpoint conversion of the Mixtral or
    Qwen2-MoE kind. Raises PEFT's ValueError when only part of a fused pair is targeted (e.g. `w1` without `w3`).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or get_checkpoint_conversion_mapping(model_type) is None:
        return
    kind = _CONVERSION_PATTERN.get(model_type)
    mapping = _MOE_TARGET_MODULE_MAPPING.get(kind or "")
    fused = _MOE_FUSED_TARGETS.get(kind or "", {})
    if not mapping or not fused:
        return
    if isinstance(config.target_modules, str):
        resolved = _resolve_string_targets(config, model, mapping)
        if not resolved:
            return  # nothing matched: the usual not-found error follows
        config.target_modules = resolved
    config.rank_pattern = dict(config.rank_pattern or {})
    config.alpha_pattern = dict(config.alpha_pattern or {})
    parameters = set(config.target_parameters or [])
    remaining: set[str] = set()
    matched: dict[str, set[str]] = {new: set() for new in fused}
    for target in set(config.target_modules or []):
        hit = next(((old, new) for old, new in mapping.items() if target == old or target.endswith(f".{old}")), None)
        if hit is None:
            remaining.add(target)
            continue
        old, new = hit
        parameters.add(new)
        if new in fused:
            matched.setdefault(new, set()).add(old)
    for new, required in fused.items():
        present = matched.get(new, set())
        if 0 < len(present) < len(required):
            raise ValueError(
                f"Cannot convert PEFT target(s) {', '.join(sorted(present))} without also targeting "
                f"{', '.join(sorted(set(required) - present))} because they are fused into {new}."
            )
        if len(present) == len(required) > 1:
            key = rf".*\.{re.escape(new)}"
            config.rank_pattern[key] = config.r * len(required)
            config.alpha_pattern[key] = config.lora_alpha * len(required)
    config.target_parameters = parameters
    config.target_modules = remaining


def resolve_config(model: nn.Module, config: Any, revision: str | None = None) -> Any:
    """A new config with what PEFT fills in at `get_peft_model` time.

    task-type modules_to_save, ensure_weight_tying (the input embedding targeted, the layers tied to it in
    `target_modules_to_tie` instead), PEFT's transformers-v5 MoE rewrite (`convert_moe_targets`), default targets
    per model type, "all-linear" expanded to names (compressed to suffixes at >= 20 names),
    `base_model_name_or_path` and `revision`.
    """
    changes: dict[str, Any] = {}
    extra = TASK_MODULES_TO_SAVE.get(config.task_type.value if config.task_type else None, [])
    if extra and hasattr(config, "modules_to_save"):
        changes["modules_to_save"] = list(config.modules_to_save or []) + list(extra)
    new_name = model.__dict__.get("name_or_path", None) or None
    old_name = config.base_model_name_or_path
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
            "Please ensure that the correct base model is loaded when loading this checkpoint.",
            stacklevel=3,
        )
    changes["base_model_name_or_path"] = new_name
    if revision is not None:
        if config.revision is not None and config.revision != revision:
            warnings.warn(
                f"peft config has already set base model revision to {config.revision}, "
                f"overwriting with revision {revision}",
                stacklevel=3,
            )
        changes["revision"] = revision
    resolved = dataclasses.replace(config, **changes)
    if config.CONVERTS_MOE_TARGETS:
        convert_moe_targets(resolved, model)
    targets = resolved.target_modules
    tie = _tie_targets(model, resolved, warn=True)  # before defaults and all-linear, like PEFT
    if tie is not None:
        targets = tie[0]
        resolved.target_modules_to_tie = set(tie[1])  # type: ignore[attr-defined]  # PEFT's attribute (not saved)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets is None:
        targets = config.default_targets(model)  # e.g. trainable tokens: the input embedding's name
    if targets is None:
        table = config.DEFAULT_TARGET_MODULES
        default = table.get(model_type) if model_type else None
        if default is None and not getattr(resolved, "target_parameters", None):
            raise ValueError(
                "Please specify `target_modules` (or `target_parameters`) in the config: there is no default for "
                f"model_type {model_type!r} (known: {sorted(table)[:8]}...)"
            )
        targets = default if default is None or isinstance(default, str) else set(default)
    for name, value in config.model_defaults(model_type).items():  # e.g. IA3's feedforward_modules per model type
        setattr(resolved, name, value)  # set like PEFT's _prepare_adapter_config: no __post_init__ re-check
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, resolved)
    if (
        config.COMPRESS_TARGET_MODULES
        and isinstance(targets, (set, list))
        and len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION
    ):
        keys = [n for n, _ in model.named_modules()]
        suffixes = tuple("." + t for t in targets)
        others = [n for n in keys if n not in targets and not n.endswith(suffixes)]
        minimal = _minimal_suffixes(set(targets), others)
        if len(minimal) < len(targets):
            targets = minimal
    resolved.target_modules = targets
    return resolved


def match_targets(model: nn.Module, config: Any, any_module: bool = False) -> tuple[list[str], int]:
    """(names of the modules a resolved config targets, in `named_modules` order; how many were excluded).

    Raises TypeError naming the module and its type when a matched module is not a layer funcpeft can adapt
    (unless `any_module`: see find_targets).
    """
    targets: list[str] = []
    excluded = 0
    tied = set(tied_layers(model, config))  # they get the embedding's adapter instead (PEFT skips them here)
    for name, module in model.named_modules():
        if not name or name in tied:
            continue
        if is_target(config, name):
            if layer_kind(module) is None and not any_module:
                raise TypeError(
                    f"Target module {name!r} is a {type(module).__module__}.{type(module).__name__}, which "
                    "funcpeft cannot adapt. Supported: torch.nn.Linear, torch.nn.Embedding, "
                    "torch.nn.Conv1d/2d/3d, torch.nn.MultiheadAttention and transformers.pytorch_utils.Conv1D"
                    + (
                        " (or target its parameters with `target_parameters`)."
                        if hasattr(config, "target_parameters")
                        else "."
                    )
                )
            targets.append(name)
        elif is_excluded(config, name):
            excluded += 1
    return targets, excluded


def find_targets(model: nn.Module, config: Any, any_module: bool = False) -> list[str]:
    """Names of the modules a resolved config targets, in `named_modules` order.

    Raises ValueError listing close module names when nothing matches, and TypeError naming the
    module and its type when a matched module is not a layer funcpeft can adapt (unless `any_module`: a
    method that copies whole modules, such as LN tuning, may target any module).
    """
    targets, excluded = match_targets(model, config, any_module)
    if targets:
        return targets
    if excluded and config.target_modules:
        raise ValueError(
            "All modules were excluded. This is likely unintended. "
            "Check your `target_modules`, `exclude_modules` and `modules_to_save` configuration."
        )
    if not excluded and not config.target_modules:
        raise ValueError(
            "No `target_modules` passed but also no `target_parameters` found. Please check the values for these "
            "arguments."
        )
    named = [(n, m) for n, m in model.named_modules() if n]
    spec = config.target_modules
    wanted = [spec] if isinstance(spec, str) else sorted(spec or [])
    adaptable = [n for n, m in named if any_module or layer_kind(m) is not None]
    short = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(w.rsplit(".", 1)[-1], short, n=3, cutoff=0.5)
        close += difflib.get_close_matches(w, adaptable, n=3, cutoff=0.6)
    close = list(dict.fromkeys(close))
    # a module registered under several names is listed once, under its first (as in PEFT's named_modules())
    first = {id(m): n for n, m in named}
    hidden = [
        f"{n!r} is the module {first[id(m)]!r} under a second name"
        for n, m in model.named_modules(remove_duplicate=False)
        if first.get(id(m), n) != n and any(n == w or n.endswith("." + w) for w in wanted)
    ]
    raise ValueError(
        f"Target modules {wanted} not found in the base model. Close module names: {close or 'none'}. "
        f"Adaptable module names in this model (suffixes): {short[:20]}"
        + (
            f". Note: {'; '.join(hidden[:3])}: target that name (as in PEFT, only the first name counts)"
            if hidden
            else ""
        )
    )


def find_parameter_targets(model: nn.Module, config: Any) -> list[tuple[str, str]]:
    """PEFT's `_inject_parameters` matching for `target_parameters`: [(module name, parameter name)].

    A parameter `{module}.{name}` (each module's own parameters, `named_modules` order, then the module's
    registration order) matches an entry that equals it or is a dot-suffix of it; exclude_modules and layer
    selection do not apply (as in PEFT). Empty when the config has no target_parameters.
    """
    names = list(getattr(config, "target_parameters", None) or ())
    if not names:
        return []
    found: list[tuple[str, str]] = []
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{mname}.{pname}"
            if key in names or any(key.endswith(f".{t}") for t in names):
                if mname == "":
                    raise ValueError(
                        f"Targeting an nn.Parameter on the top-level module is not supported (parameter '{pname}'). "
                    )
                found.append((mname, pname))
    return found


def parameter_paths(found: list[tuple[str, str]]) -> list[str]:
    """PEFT's module path of each targeted parameter's `lora.ParamWrapper` (its checkpoint keys live there).

    PEFT wraps a module once per targeted parameter, in order, each wrapper around the previous one: the last
    parameter's wrapper takes the module's name, and each earlier one sits one `.base_layer` deeper.
    """
    count: dict[str, int] = {}
    for mname, _ in found:
        count[mname] = count.get(mname, 0) + 1
    seen: dict[str, int] = {}
    paths = []
    for mname, _ in found:
        seen[mname] = seen.get(mname, 0) + 1
        paths.append(mname + ".base_layer" * (count[mname] - seen[mname]))
    return paths


def tied_to_input_embedding(model: nn.Module, targets: list[str]) -> list[str]:
    """Modules whose weight is tied to the input embedding, when that embedding is among `targets` (else []).

    PEFT's rule (`TrainableTokensModel.inject_adapter` with `_get_module_names_tied_with_embedding`): only with
    `config.tie_word_embeddings`; the tied names come from the model's `_tied_weights_keys` (tied to the input
    embedding's parameters), and every module whose name ends with one of them is tied.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_input_embeddings"):
        return []
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    if not any(model.get_submodule(t) is embedding for t in targets):
        return []
    keys = getattr(model, "_tied_weights_keys", None)
    if not keys:
        return []
    if isinstance(keys, Mapping):
        table: dict[str, str] = {}
        for name, module in model.named_modules():
            sub = getattr(module, "_tied_weights_keys", None)
            if isinstance(sub, Mapping) and sub:
                table.update({f"{name}.{k}" if name else k: f"{name}.{v}" if name else v for k, v in sub.items()})
        own = {id(p) for p in embedding.parameters()}
        candidates = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in own}
        tied_params = [k for k, v in table.items() if v in candidates]
    else:
        tied_params = list(keys)
    tied_modules = sorted({k.rpartition(".")[0] for k in tied_params})
    found = [n for n, _ in model.named_modules(remove_duplicate=False) if any(n.endswith(t) for t in tied_modules)]
    return list(dict.fromkeys(found))


_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def find_modules_to_save(model: nn.Module, config: Any, targets: Any = (), parameter_owners: Any = ()) -> list[str]:
    """Modules wrapped by PEFT's ModulesToSaveWrapper: names ending with an entry (outermost match only).

    Raises TypeError, like PEFT, when such a module is a container, one of the adapter's `targets`, or holds a
    parameter the adapter targets (`parameter_owners`: PEFT's lora.ParamWrapper cannot be saved whole), and when it
    holds a quantised layer (PEFT fails on it, or on torchao silently trains nothing).
    """
    names = getattr(config, "modules_to_save", None) or []
    found: list[str] = []
    for key, module in model.named_modules():
        if key and is_saved_module(key, names):
            if not any(key.startswith(f + ".") for f in found):
                if key in parameter_owners:
                    raise TypeError(
                        f"modules_to_save {names} matches {key!r}, which holds a parameter the adapter targets with "
                        "`target_parameters`; PEFT refuses this too (modules_to_save cannot be applied to modules of "
                        "type lora.ParamWrapper)."
                    )
                if key in targets or isinstance(module, _CONTAINERS):
                    what = "a LoRA target" if key in targets else f"a {type(module).__name__}"
                    raise TypeError(
                        f"modules_to_save {names} matches {key!r}, which is {what}; modules_to_save cannot be "
                        "applied to containers or to modules the adapter itself targets."
                    )
                quantised = next(((n, m) for n, m in module.named_modules() if is_quant_linear(m)), None)
                if quantised is not None:
                    sub, layer = quantised
                    raise TypeError(
                        f"modules_to_save {names} matches {key!r}, which holds a {quant_backend(layer)}-quantised "
                        f"layer ({key + ('.' + sub if sub else '')!r}, {type(layer).__name__}): its packed weight "
                        "cannot be trained as a full copy (PEFT fails on it: 'only Tensors of floating point dtype "
                        "can require gradients'; on torchao layers it trains nothing, the gradient is None). Adapt "
                        "it with the adapter's target_modules instead, or load that module unquantised "
                        "(e.g. BitsAndBytesConfig(llm_int8_skip_modules=[...]))."
                    )
                found.append(key)
    return found
