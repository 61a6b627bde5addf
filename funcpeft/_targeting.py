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
from transformers.pytorch_utils import Conv1D as HFConv1D  # GPT-2 style Conv1D: weight (in, out)

from .config import TaskType
from .constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION, SEQ_CLS_HEAD_NAMES, TASK_MODULES_TO_SAVE
from .methods.base import LayerKind

_LINEAR_TYPES: tuple[type, ...] = (nn.Linear, HFConv1D)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The layer family of `module` (funcpeft.methods.base.LayerKind), None if funcpeft cannot adapt it."""
    if isinstance(module, nn.Embedding):
        return LayerKind.EMBEDDING
    if isinstance(module, _CONV_TYPES):
        return LayerKind.CONV
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, HFConv1D):
        return LayerKind.CONV1D_HF
    return None


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


def resolve_config(model: nn.Module, config: Any, revision: str | None = None) -> Any:
    """A new config with what PEFT fills in at `get_peft_model` time.

    task-type modules_to_save, default targets per model type, "all-linear" expanded to names
    (compressed to suffixes at >= 20 names), `base_model_name_or_path` and `revision`.
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
    targets = config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets is None:
        targets = config.default_targets(model)  # e.g. trainable tokens: the input embedding's name
    if targets is None:
        table = config.DEFAULT_TARGET_MODULES
        default = table.get(model_type) if model_type else None
        if default is None:
            raise ValueError(
                "Please specify `target_modules` in the config: there is no default for "
                f"model_type {model_type!r} (known: {sorted(table)[:8]}...)"
            )
        targets = default if isinstance(default, str) else set(default)
    resolved = dataclasses.replace(config, **changes)
    for name, value in config.model_defaults(model_type).items():  # e.g. IA3's feedforward_modules per model type
        setattr(resolved, name, value)  # set like PEFT's _prepare_adapter_config: no __post_init__ re-check
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, resolved)
    if config.COMPRESS_TARGET_MODULES and isinstance(targets, (set, list)) and len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        keys = [n for n, _ in model.named_modules()]
        suffixes = tuple("." + t for t in targets)
        others = [n for n in keys if n not in targets and not n.endswith(suffixes)]
        minimal = _minimal_suffixes(set(targets), others)
        if len(minimal) < len(targets):
            targets = minimal
    resolved.target_modules = targets
    return resolved


def find_targets(model: nn.Module, config: Any, any_module: bool = False) -> list[str]:
    """Names of the modules a resolved config targets, in `named_modules` order.

    Raises ValueError listing close module names when nothing matches, and TypeError naming the
    module and its type when a matched module is not a layer funcpeft can adapt (unless `any_module`: a
    method that copies whole modules, such as LN tuning, may target any module).
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    targets: list[str] = []
    excluded = 0
    for name, module in named:
        if is_target(config, name):
            if layer_kind(module) is None and not any_module:
                raise TypeError(
                    f"Target module {name!r} is a {type(module).__module__}.{type(module).__name__}, which "
                    "funcpeft cannot adapt. Supported: torch.nn.Linear, torch.nn.Embedding, "
                    "torch.nn.Conv1d/2d/3d and transformers.pytorch_utils.Conv1D."
                )
            targets.append(name)
        elif is_excluded(config, name):
            excluded += 1
    if targets:
        return targets
    if excluded and config.target_modules:
        raise ValueError(
            "All modules were excluded. This is likely unintended. "
            "Check your `target_modules`, `exclude_modules` and `modules_to_save` configuration."
        )
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
        + (f". Note: {'; '.join(hidden[:3])}: target that name (as in PEFT, only the first name counts)" if hidden else "")
    )


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


def find_modules_to_save(model: nn.Module, config: Any, targets: Any = ()) -> list[str]:
    """Modules wrapped by PEFT's ModulesToSaveWrapper: names ending with an entry (outermost match only).

    Raises TypeError, like PEFT, when such a module is a container or one of the adapter's `targets`.
    """
    names = getattr(config, "modules_to_save", None) or []
    found: list[str] = []
    for key, module in model.named_modules():
        if key and is_saved_module(key, names):
            if not any(key.startswith(f + ".") for f in found):
                if key in targets or isinstance(module, _CONTAINERS):
                    what = "a LoRA target" if key in targets else f"a {type(module).__name__}"
                    raise TypeError(
                        f"modules_to_save {names} matches {key!r}, which is {what}; modules_to_save cannot be "
                        "applied to containers or to modules the adapter itself targets."
                    )
                found.append(key)
    return found
