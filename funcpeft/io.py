"""PEFT's on-disk adapter format: `adapter_model.safetensors` + `adapter_config.json`, written atomically.

`save_adapter` writes what PEFT 0.21.2's `save_pretrained` writes (key names: funcpeft.keys). Both files
go to temporary files in the target directory first and are moved into place with `os.replace` only
once both are complete: a failure midway leaves any earlier adapter untouched and no temporary files.
Reading is safetensors-only: a pickled `adapter_model.bin` is never unpickled unless asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._plan import check_adapter_name
from .config import PEFT_VERSION, PeftConfig
from .keys import (
    KeyRules,
    base_file_key,
    bias_all_duplicates,
    embedding_is_targeted,
    is_saved_module,
    key_rules,
    shared_file_keys,
    tree_file_keys,
)
from .methods import CONFIG_CLASSES, Method, method_for

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> str:
    """PEFT's layout: the "default" adapter in `directory`, any other in `directory/<adapter_name>`."""
    check_adapter_name(adapter_name)  # one rule for adapter names (no path separators, no '..')
    return os.fspath(directory) if adapter_name == "default" else os.path.join(os.fspath(directory), adapter_name)


# -- config --------------------------------------------------------------------------------------------------
def config_dict(config: PeftConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """The dict PEFT writes: every field, `inference_mode` true, `auto_mapping` from the model when task_type is None."""
    out = config.to_dict()
    out["peft_version"] = out.get("peft_version") or PEFT_VERSION
    out["inference_mode"] = True
    if out.get("base_model_name_or_path") is None and model is not None:
        out["base_model_name_or_path"] = model.__dict__.get("name_or_path", None) or None
    if config.task_type is None and model is not None:
        cls = type(model)
        out["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return out


def config_from_dict(data: Any, source: str = CONFIG_NAME) -> PeftConfig:
    """A config from PEFT's JSON dict: unknown keys warn and are ignored; an unknown method raises."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    if "runtime_config" in data:  # PEFT's rule (PeftConfigMixin.from_json_file)
        warnings.warn(
            "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations are "
            "only valid at runtime.",
            stacklevel=3,
        )
        del data["runtime_config"]
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(f"{source} has no 'peft_type': it is not a PEFT adapter config (keys: {sorted(data)[:8]})")
    cls = CONFIG_CLASSES.get(str(peft_type))  # registered by funcpeft.methods
    if cls is None:
        raise NotImplementedError(
            f"{source} is a {peft_type} adapter (peft_type={peft_type!r}); funcpeft does not implement the PEFT method "
            f"{peft_type} (supported peft_type values: {sorted(CONFIG_CLASSES)})."
        )
    return cls.from_dict(data)


def read_config(directory: str | os.PathLike) -> PeftConfig:
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {os.fspath(directory)!r}: not a PEFT adapter directory")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    return config_from_dict(data, path)


# -- tensors -------------------------------------------------------------------------------------------------
def _pickle_message(directory: str) -> str:
    src, dst = os.path.join(directory, PICKLE_NAME), os.path.join(directory, WEIGHTS_NAME)
    return (
        f"{directory!r} has {PICKLE_NAME} (a pickle) but no {WEIGHTS_NAME}. funcpeft does not unpickle files by "
        "default (unpickling can run arbitrary code). If you trust it, convert it once:\n\n"
        "    import torch, safetensors.torch\n"
        f"    sd = torch.load({src!r}, map_location='cpu', weights_only=True)\n"
        f"    safetensors.torch.save_file({{k: v.contiguous() for k, v in sd.items()}}, {dst!r}, metadata={{'format': 'pt'}})\n\n"
        "or pass allow_pickle=True to load it with torch.load(weights_only=True)."
    )


def read_tensors(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's {key: CPU tensor}; safetensors only unless `allow_pickle` (then weights_only=True)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        return load_file(path)
    pickled = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(pickled):
        if not allow_pickle:
            raise ValueError(_pickle_message(directory))
        state = torch.load(pickled, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{pickled} does not hold a dict of tensors")
        return state
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r} (files: {sorted(os.listdir(directory))[:10]})")


def _for_file(key: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"adapter leaf for {key!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"adapter leaf for {key!r} is on the meta device: it has no values to save")
    return t.detach().contiguous()


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage with an earlier one (safetensors refuses them; PEFT does the same)."""
    seen: set[tuple[torch.device, int]] = set()
    for k, t in state.items():
        ptr = (t.device, t.untyped_storage().data_ptr())
        if ptr in seen and t.numel():
            state[k] = t.clone()
        seen.add(ptr)
    return state


def _vocab_resized(config: PeftConfig, model: nn.Module) -> bool:
    """PEFT's other "auto" trigger: the base model's saved config.json has another vocab_size (local paths only)."""
    model_id = config.base_model_name_or_path
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not (model_id and vocab and os.path.isfile(os.path.join(model_id, "config.json"))):
        return False
    return vocab != type(model.config).from_pretrained(model_id).vocab_size  # type: ignore[union-attr]


def _embedding_keys(
    config: PeftConfig, model: nn.Module, adapted: set[str], save_embedding_layers: bool | str
) -> dict[str, str]:
    """{checkpoint key: base param name} of the embedding layers PEFT saves along with the adapter."""
    names = {m: n for n, m in model.named_modules()}
    targeted = embedding_is_targeted(getattr(config, "target_modules", None), names.values())
    if save_embedding_layers == "auto":
        if targeted and getattr(config, "trainable_token_indices", None) is None:
            reason = "embedding layers found in `target_modules`."
        elif _vocab_resized(config, model):
            reason = "the embedding layer has been resized during finetuning."
        else:
            return {}
        warnings.warn(f"Setting `save_embedding_layers` to `True` as {reason}", stacklevel=4)
    elif not save_embedding_layers:
        return {}
    canonical = {id(p): n for n, p in model.named_parameters()}  # base dicts hold tied weights once
    out: dict[str, str] = {}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, get, lambda: None)()
        path = names.get(layer) if isinstance(layer, nn.Module) else None
        if layer is None or path is None or (targeted and path not in adapted):
            continue
        for pname, p in layer.named_parameters():
            out[base_file_key(f"{path}.{pname}", adapted)] = canonical[id(p)]
    return out


def checkpoint_state(
    adapter_params: Mapping[str, Mapping[str, Any]],
    config: PeftConfig,
    model: nn.Module | None = None,
    base_params: Mapping[str, torch.Tensor] | None = None,
    save_embedding_layers: bool | str = "auto",
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """The {key: tensor} PEFT's `save_pretrained` writes for this adapter tree (pure; tensors are not copied).

    Needs `model` (and its `base_params`, default the model's parameters) for what PEFT saves from the
    base model: embedding layers (`save_embedding_layers`, PEFT's "auto" rule) and bias="all" duplicates.
    """
    if not isinstance(adapter_params, Mapping) or not all(isinstance(e, Mapping) for e in adapter_params.values()):
        raise TypeError("adapter_params must be an adapter tree {module_path: {name: Tensor}} (see funcpeft.trees)")
    rules: KeyRules = key_rules(config)
    method = method_for(config)
    hook = method.file_params if isinstance(method, Method) else None
    if hook is not None:  # e.g. AdaLoRA writes only the ranks its rank_pattern keeps
        adapter_params = {p: hook(config, p, dict(e)) if any(rules.is_method_param(n) for n in e) else e
                          for p, e in adapter_params.items()}
    state = {k: _for_file(k, adapter_params[p][n]) for k, (p, n) in tree_file_keys(adapter_params, rules).items()}
    base: Mapping[str, torch.Tensor] | None = base_params
    if base is None and model is not None:
        base = dict(model.named_parameters())
    adapted = {p for p, e in adapter_params.items() if any(rules.is_method_param(n) for n in e)}
    if getattr(config, "bias", "none") == "all":
        mts = getattr(config, "modules_to_save", None)
        saved = {p: list(e) for p, e in adapter_params.items() if p not in adapted and is_saved_module(p, mts)}
        for key, (which, path, name) in bias_all_duplicates(saved, adapter_name).items():
            if which == "modules_to_save":
                state[key] = _for_file(key, adapter_params[path][name])
            elif base is not None:
                state[key] = _for_file(key, base[f"{path}.{name}"])
    for key, name in shared_file_keys(config, base or {}).items():
        state[key] = _for_file(key, base[name])  # type: ignore[index]
    if model is not None and base is not None:
        for key, name in _embedding_keys(config, model, adapted, save_embedding_layers).items():
            state[key] = _for_file(key, base[name])
    elif save_embedding_layers is True:
        raise ValueError("save_embedding_layers=True needs the model (pass model=...)")
    return _unshare(state)


# -- atomic writes -------------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files_atomically(writers: Mapping[str, Callable[[str], None]], fsync: bool = True) -> None:
    """Write each final path through `writer(temp_path)` in the same directory, then `os.replace` them all.

    If any writer fails, no final file is touched and every temporary file is removed.
    """
    temps: dict[str, str] = {}
    try:
        for final, write in writers.items():
            head, tail = os.path.split(final)
            temps[final] = os.path.join(head, f".{tail}.{uuid.uuid4().hex}.tmp")
            write(temps[final])
            if fsync:
                _fsync(temps[final])
        for final, temp in temps.items():
            os.replace(temp, final)
    finally:
        for temp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)


def _makedirs(path: str) -> list[str]:
    """Create `path` (and parents); return the directories created, innermost first."""
    created: list[str] = []
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"Provided path ({p}) should be a directory, not a file")
    os.makedirs(path, exist_ok=True)
    return created


def save_adapter(
    directory: str | os.PathLike,
    adapter_params: Mapping[str, Mapping[str, Any]],
    peft_config: PeftConfig,
    adapter_name: str = "default",
    *,
    model: nn.Module | None = None,
    base_params: Mapping[str, torch.Tensor] | None = None,
    plan: Mapping[str, Any] | None = None,
    save_embedding_layers: bool | str = "auto",
    safe_serialization: bool = True,
    fsync: bool = True,
) -> str:
    """Write `adapter_params` in PEFT's format to `directory` (`directory/<adapter_name>` unless "default").

    Returns the directory written. `model` (and `base_params`) make the files complete like PEFT's:
    `auto_mapping` (task_type None), embedding layers when an embedding is targeted. With `plan` (what
    `FunctionalPeftModel.save_pretrained` passes) the tree is first checked against the model: missing,
    unexpected or mis-shaped leaves raise one `AdapterMismatchError` before anything is written.
    fsync: flush both files to disk before they replace the old ones (durable across a power loss).
    """
    if not safe_serialization:
        raise ValueError("funcpeft writes safetensors only (safe_serialization=False would write a pickle)")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a funcpeft config (e.g. funcpeft.LoraConfig), got {type(peft_config).__name__}")
    out_dir = adapter_dir(directory, adapter_name)
    if plan is not None and model is not None:
        from .loading import check_tree

        check_tree(adapter_params, plan, model, peft_config)
    state = checkpoint_state(adapter_params, peft_config, model, base_params, save_embedding_layers, adapter_name)
    text = json.dumps(config_dict(peft_config, model), indent=2, sort_keys=True)

    def write_config(path: str) -> None:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)

    created = _makedirs(out_dir)
    try:
        write_files_atomically(
            {
                os.path.join(out_dir, WEIGHTS_NAME): lambda path: save_file(state, path, metadata={"format": "pt"}),
                os.path.join(out_dir, CONFIG_NAME): write_config,
            },
            fsync=fsync,
        )
    except BaseException:
        for d in created:  # innermost first; only directories this call created, and only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return out_dir
