"""PEFT's on-disk adapter format: `adapter_model.safetensors` + `adapter_config.json`, saved as one unit.

`save_adapter` writes what PEFT 0.21.2's `save_pretrained` writes (key names: funcpeft._keys), and records
the sha256 of the `adapter_config.json` it writes in the safetensors header metadata (key
`funcpeft_config_sha256`, next to PEFT's `"format": "pt"`; PEFT ignores it). The digest is of the config's
canonical JSON (sorted keys, no whitespace), so line endings and indentation (git autocrlf, a formatter)
do not count, while any change of a key or value does. Both files go to temporary
files in the target directory first (fsync'd), then the weights and then the config are moved into
place with `os.replace`. A crash between the two moves leaves new weights beside the old config: loading
detects that from the digest and raises `InterruptedSaveError` naming both files and the leftover
temporary file that holds the complete new config, instead of mixing two adapters. Every other crash
point leaves the old adapter or the new one. The next successful save into the directory removes
temporary files left by interrupted saves. Files without the digest (written by PEFT) load as before.

| crash point (save of adapter NEW over OLD)         | the directory afterwards              | loading gives                |
|----------------------------------------------------|---------------------------------------|------------------------------|
| before the weights are moved into place            | OLD files (+ stale temporary files)   | OLD                          |
| after the weights are moved, before the config     | NEW weights, OLD config, NEW temp cfg | InterruptedSaveError (*)     |
| after the config is moved                          | NEW files (+ stale temporary files)   | NEW                          |

(*) unless the two configs are equal (periodic checkpoints of one run): then NEW.
Reading is safetensors-only: a pickled `adapter_model.bin` is never unpickled unless asked for.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ._checks import check_tree
from ._config import PEFT_VERSION, PeftConfig
from ._fsdp import model_class
from ._keys import (
    KeyRules,
    base_file_key,
    bias_all_duplicates,
    borrowed_file_keys,
    embedding_is_targeted,
    file_key,
    is_saved_module,
    key_rules,
    shared_file_keys,
    tied_paths,
    tree_file_keys,
)
from ._plan import check_adapter_name, input_entry, plan_adapter
from ._trees import PROMPT_PATH, SHARED_PATH, layer_frozen_key
from .methods import CONFIG_CLASSES, InputMethod, Method, method_for

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
DIGEST_KEY = "funcpeft_config_sha256"  # safetensors metadata: sha256 of the adapter_config.json saved alongside
_TEMP = re.compile(r"\.(adapter_model\.safetensors|adapter_config\.json)\.[0-9a-f]{32}\.tmp")


class InterruptedSaveError(ValueError):
    """adapter_model.safetensors and adapter_config.json in one directory come from two different saves."""


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
        cls = model_class(model)  # not the FSDP subclass fully_shard swaps in
        out["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return out


def _with_source(error: Exception, source: str) -> Exception:
    """The same exception (same type) with `source: ` in front of its message."""
    out = copy.copy(error)
    out.args = (f"{source}: {error}", *error.args[1:])
    return out


def config_from_dict(data: Any, source: str = CONFIG_NAME) -> PeftConfig:
    """A config from PEFT's JSON dict: unknown keys warn and are ignored; an unknown method raises.

    Invalid values raise the config class's error with `source` (the file) in front of the message.
    """
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
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise _with_source(e, source) from None


def _read_file(path: str) -> bytes | None:
    """The file's bytes; None if it does not exist; a clear error if it is a directory."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, but PEFT's adapter format needs a file of that name there")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _parse_json(raw: bytes, path: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bom = " (it starts with a UTF-16 byte-order mark)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ValueError(
            f"{path} is not UTF-8 text{bom}: {e.reason} at byte {e.start}. PEFT writes and reads {CONFIG_NAME} "
            "as UTF-8 JSON: save it again as UTF-8."
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (it contains NUL characters: UTF-16 text? PEFT's files are UTF-8)" if "\x00" in text else ""
        raise ValueError(f"{path} is not valid JSON{hint}: {e}") from None


def read_config(directory: str | os.PathLike) -> PeftConfig:
    """The directory's adapter config, after checking it is the one its weights were saved with (see module doc)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    raw = _read_file(path)
    data = None if raw is None else _parse_json(raw, path)
    _check_saved_together(directory, data)
    if raw is None:
        named = [n for n in adapters_in(directory) if n != "default"]
        hint = f" It holds adapters in subdirectories: {named} (pass adapter_name=...)." if named else ""
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory!r}: not a PEFT adapter directory.{hint}")
    return config_from_dict(data, path)


def adapters_in(directory: str) -> list[str]:
    """The adapters `directory` holds in PEFT's layout: 'default' (at its root), then subdirectories with one."""
    found = ["default"] if os.path.exists(os.path.join(directory, CONFIG_NAME)) else []
    with contextlib.suppress(OSError):
        found += sorted(
            n
            for n in os.listdir(directory)
            if n != "default" and os.path.exists(os.path.join(directory, n, CONFIG_NAME))
        )
    return found


# -- the digest that ties the two files together ----------------------------------------------------------------
def _digest(data: Any) -> str:
    """sha256 of a config's canonical JSON: sorted keys, no whitespace (line endings or indentation do not count)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _corrupt(path: str, error: Exception) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({os.path.getsize(path)} bytes; {error}). It is truncated or "
        "corrupt (an interrupted copy or download?): copy or save it again."
    )


def _open_safetensors(path: str) -> Any:
    """`safe_open(path)` (reads the header only), with an error naming the file when it is not safetensors."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as e:
        raise _corrupt(path, e) from None


def _temps(directory: str, final_name: str) -> list[str]:
    """Temporary files a save into `directory` made for `final_name` and did not move into place."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names if _TEMP.fullmatch(n) and n.startswith(f".{final_name}.")]


def _temp_with_digest(directory: str, digest: str) -> str | None:
    for temp in _temps(directory, CONFIG_NAME):
        with contextlib.suppress(OSError, ValueError):  # unreadable or half-written: not the one
            with open(temp, "rb") as f:
                if _digest(_parse_json(f.read(), temp)) == digest:
                    return temp
    return None


def _check_saved_together(directory: str, config: Any) -> None:
    """Raise InterruptedSaveError when the weights record a config digest that the config file does not have."""
    weights = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isdir(weights) or not os.path.exists(weights):
        return  # reported by read_tensors
    with _open_safetensors(weights) as f:
        recorded = (f.metadata() or {}).get(DIGEST_KEY)
    if recorded is None or (config is not None and _digest(config) == recorded):
        return  # not written by funcpeft (PEFT's files), or the two belong together
    config = os.path.join(directory, CONFIG_NAME)
    if config is None:
        what = f"{weights} was written by funcpeft.save_adapter, but there is no {config}"
    else:
        what = (
            f"{config} is not the config that {weights} was saved with (sha256 recorded in the weights' header: "
            f"{recorded[:16]}..., of the file: {_digest(config)[:16]}...); loading them together would mix two adapters"
        )
    temp = _temp_with_digest(directory, recorded)
    if temp is not None:
        raise InterruptedSaveError(
            f"{what}. A save into {directory!r} was interrupted after it replaced the weights and before it replaced "
            f"the config. The complete config saved with these weights is in {temp}: move it into place to load the "
            f"new adapter (os.replace({temp!r}, {config!r})), or save the adapter again."
        )
    raise InterruptedSaveError(
        f"{what}. Either a save was interrupted between writing the two files (and its temporary files were removed "
        f"since), or {CONFIG_NAME} was edited or rewritten by another program after saving. Save the adapter again; "
        f"or, if {config} is the right config for these weights, drop the recorded digest:\n\n"
        "    import safetensors.torch as st\n"
        f"    st.save_file(st.load_file({weights!r}), {weights!r}, metadata={{'format': 'pt'}})\n"
    )


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


def _weights_path(directory: str, allow_pickle: bool) -> str:
    """The checkpoint file to read: the safetensors file, or (only with allow_pickle) PEFT's pickle."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, but PEFT's adapter format needs a file of that name there")
    if os.path.isfile(path):
        return path
    pickled = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(pickled):
        if not allow_pickle:
            raise ValueError(_pickle_message(directory))
        return pickled
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r} (files: {sorted(os.listdir(directory))[:10]})")


def read_tensors(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's {key: CPU tensor}; safetensors only unless `allow_pickle` (then weights_only=True)."""
    path = _weights_path(os.fspath(directory), allow_pickle)
    if path.endswith(WEIGHTS_NAME):
        try:
            return load_file(path)
        except SafetensorError as e:
            raise _corrupt(path, e) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return state


def tensor_shapes(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the checkpoint, from the safetensors header alone (no tensor data is read)."""
    path = _weights_path(os.fspath(directory), allow_pickle)
    if not path.endswith(WEIGHTS_NAME):
        return {k: tuple(v.shape) for k, v in read_tensors(directory, allow_pickle).items()}
    with _open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


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
        if targeted and config.SAVES_TARGETED_EMBEDDINGS and getattr(config, "trainable_token_indices", None) is None:
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
    plan: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The {key: tensor} PEFT's `save_pretrained` writes for this adapter tree (pure; tensors are not copied).

    A prompt-learning adapter (`InputMethod`) needs its `plan` (FunctionalPeftModel.save_pretrained passes it) or
    the `model` to plan it on: PEFT saves the prompt encoder's output as `prompt_embeddings`.

    Needs `model` (and its `base_params`, default the model's parameters) for what PEFT saves from the
    base model: embedding layers (`save_embedding_layers`, PEFT's "auto" rule) and bias="all" duplicates;
    `base_params` for methods with per-layer frozen tensors PEFT saves (`LayerFrozen`: adapter `adapter_name`'s).
    """
    if not isinstance(adapter_params, Mapping) or not all(isinstance(e, Mapping) for e in adapter_params.values()):
        raise TypeError(
            "adapter_params must be an adapter tree {module_path: {name: Tensor}} (see funcpeft.AdapterTree)"
        )
    if isinstance(method_for(config), InputMethod):
        return _unshare(input_state(adapter_params, config, model, plan))
    rules: KeyRules = key_rules(config)
    mts = getattr(config, "modules_to_save", None)
    keys = tree_file_keys(adapter_params, rules, mts)
    state = {k: _for_file(k, adapter_params[p][n]) for k, (p, n) in keys.items()}
    method = method_for(config)
    if isinstance(method, Method) and method.shares is not None:  # PEFT saves shared tensors under each layer
        if plan is None and model is None:
            raise ValueError(
                f"saving a {method.peft_type} adapter needs the model it was made for (pass model=...): its layers "
                "share tensors, which PEFT's file holds under every layer that uses them"
            )
        with warnings.catch_warnings():  # planning again only to find the sharing layers: its warnings were given
            warnings.simplefilter("ignore")
            layout = plan if plan is not None else plan_adapter(model, config, None, adapter_name)[1]  # type: ignore[arg-type]
        for k, (p, n) in borrowed_file_keys(layout, rules).items():
            if p in adapter_params and n in adapter_params[p]:
                state[k] = _for_file(k, adapter_params[p][n])
    base: Mapping[str, torch.Tensor] | None = base_params
    if base is None and model is not None:
        base = dict(model.named_parameters())
    # an empty entry: a layer whose method tensors are all shared or frozen (TinyLoRA's), adapted all the same
    adapted = {p for p, e in adapter_params.items() if not e or any(rules.is_method_param(n) for n in e)}
    method = method_for(config)
    if isinstance(method, Method):
        state.update(_frozen_state(adapter_params, method, rules, adapted, base, adapter_name))
        ties = _tie_state(adapter_params, config, method, rules, adapted, model)
        adapted |= {p for p, _ in ties.values()}
        state.update({k: _for_file(k, t) for k, (_, t) in ties.items()})
    if getattr(config, "bias", "none") == "all":
        mts = getattr(config, "modules_to_save", None)
        saved = {p: list(e) for p, e in adapter_params.items() if p not in adapted and is_saved_module(p, mts)}
        for key, (which, path, name) in bias_all_duplicates(saved, adapter_name).items():
            if which == "modules_to_save":
                state[key] = _for_file(key, adapter_params[path][name])
            elif base is not None:
                state[key] = _for_file(key, base[f"{path}.{name}"])
    shared = shared_file_keys(config, base or {}, sorted(adapted))
    if not shared and isinstance(method, Method) and method.shared is not None and method.shared.saved(config):
        raise ValueError(
            f"{type(config).__name__}(save_projection=True): PEFT's file must hold the method's frozen shared "
            "projections (base_model.vera_A, base_model.vera_B), and they live in `base`, not in the adapter tree "
            "or the model. Pass base_params= (the `base` from funcpeft.get_peft_model), or save with "
            "pm.save_pretrained(directory, adapter). Nothing was written."
        )
    for key, name in shared.items():
        state[key] = _for_file(key, base[name])  # type: ignore[index]
    if model is not None and base is not None:
        for key, name in _embedding_keys(config, model, adapted, save_embedding_layers).items():
            state[key] = _for_file(key, base[name])
    elif save_embedding_layers is True:
        raise ValueError("save_embedding_layers=True needs the model (pass model=...)")
    method = method_for(config)
    if isinstance(method, Method) and method.codec is not None:
        state = method.codec.encode(config, state)
    return _unshare(state)


def input_state(
    tree: Mapping[str, Mapping[str, Any]],
    config: PeftConfig,
    model: nn.Module | None,
    plan: Mapping[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """PEFT's file state of a prompt-learning adapter: the method's (`prompt_embeddings`, ...) and modules_to_save
    copies under `base_model.{path}.{name}` (prompt learning's PeftModel wraps the transformers model directly)."""
    method = method_for(config)
    assert isinstance(method, InputMethod)
    entry = input_entry(dict(plan)) if plan is not None else None
    if entry is not None and entry.prompt is not None:
        spec = entry.prompt[1]
    elif model is not None:
        spec = method.plan(model, config)[1]
    else:
        raise ValueError(f"saving a {method.peft_type} adapter needs the model it was made for (pass model=...)")
    if PROMPT_PATH not in tree:
        raise ValueError(
            f"a {method.peft_type} adapter tree holds its parameters at {PROMPT_PATH!r}; got paths {sorted(tree)[:5]}"
        )
    want = dict(method.shapes(spec))
    got = {k: tuple(t.shape) for k, t in tree[PROMPT_PATH].items()}
    if got != want:
        raise ValueError(f"the {PROMPT_PATH!r} entry has leaves {got}, expected {want} for this config and model")
    state = {k: _for_file(k, t) for k, t in method.file_state(spec, dict(tree[PROMPT_PATH])).items()}
    for path, leaves in tree.items():
        if path != PROMPT_PATH:
            state.update({f"base_model.{path}.{n}": _for_file(n, t) for n, t in leaves.items()})
    return state


def _frozen_state(
    tree: Mapping[str, Mapping[str, Any]],
    method: Method,
    rules: KeyRules,
    adapted: set[str],
    base: Mapping[str, torch.Tensor] | None,
    adapter_name: str,
) -> dict[str, torch.Tensor]:
    """The frozen per-layer tensors PEFT saves with the adapter (`LayerFrozen.saved`: SHiRA's mask indices,
    MiCA's lora_B), from their `base` entries."""
    frozen = method.layer_frozen
    if frozen is None or not frozen.saved:
        return {}
    out: dict[str, torch.Tensor] = {}
    for path in sorted(adapted - {SHARED_PATH}):
        names = frozen.held(list(tree[path])) if frozen.held is not None else frozen.names
        if not names:
            continue
        keys = {n: layer_frozen_key(adapter_name, path, n) for n in names}
        found = {n: k for n, k in keys.items() if base is not None and k in base}
        if not found or (frozen.held is not None and len(found) < len(keys)):
            raise ValueError(
                f"{method.name}: PEFT's file holds the adapter's frozen {list(keys)} of {path!r}, which live "
                f"in `base` (key {next(iter(keys.values()))!r}), not in the adapter tree. Pass base_params= (the `base` "
                "from funcpeft.get_peft_model / from_pretrained) and the adapter's name, or save with "
                "pm.save_pretrained(directory, adapter). Nothing was written."
            )
        for n, k in found.items():
            key = file_key(path, n, rules, True, True, adapted)
            out[key] = _for_file(key, base[k])  # type: ignore[index]
    return out


def _tie_state(
    tree: Mapping[str, Mapping[str, Any]],
    config: PeftConfig,
    method: Method,
    rules: KeyRules,
    adapted: set[str],
    model: nn.Module | None,
) -> dict[str, tuple[str, torch.Tensor]]:
    """{checkpoint key: (tied path, tensor)} of the layers tied to an adapted input embedding (`Method.tie`):
    PEFT saves their params too (ensure_weight_tying: lm_head.lora_A.weight = the embedding's lora_embedding_B
    transposed; trainable tokens: lm_head's copy of the embedding's rows)."""
    if method.tie is None:
        return {}
    if model is None:
        if getattr(config, "ensure_weight_tying", False):
            raise ValueError(
                "ensure_weight_tying=True: PEFT's file holds the LoRA of the layers tied to the input embedding "
                "(lm_head), which only the model says: pass model=. Nothing was written."
            )
        return {}
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for source, tied in tied_paths(model, config, tree).items():
        wrapped = adapted | set(tied)
        params = method.tie.params(dict(tree[source]))
        out.update(
            {file_key(path, n, rules, True, True, wrapped): (path, t) for path in tied for n, t in params.items()}
        )
    return out


# -- atomic writes -------------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    """Make the renames in `directory` durable (POSIX; Windows cannot open a directory)."""
    if os.name == "posix":
        _fsync(directory)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def write_files_atomically(writers: Mapping[str, Callable[[str], None]], fsync: bool = True) -> None:
    """Write each final path through `writer(temp_path)` in its directory, then `os.replace` them in order.

    If a writer fails, no final file is touched and every temporary file is removed. If moving a file
    into place fails after an earlier one was moved, the temporary files not yet moved are kept (they
    complete the save; funcpeft's InterruptedSaveError names them) and the error says so. With `fsync`,
    each file is flushed before any is moved, and the directory after each move, so that the moves
    reach the disk in order too.
    """
    temps: dict[str, str] = {}
    moved: list[str] = []
    try:
        for final, write in writers.items():
            head, tail = os.path.split(final)
            temps[final] = os.path.join(head, f".{tail}.{uuid.uuid4().hex}.tmp")
            write(temps[final])
            if fsync:
                _fsync(temps[final])
        for final, temp in temps.items():
            os.replace(temp, final)
            moved.append(final)
            if fsync:
                _fsync_dir(os.path.dirname(final) or ".")
    except BaseException as e:
        left = [temps[f] for f in temps if f not in moved]
        if moved and len(moved) < len(temps) and hasattr(e, "add_note"):
            e.add_note(f"funcpeft: the save was interrupted after replacing {moved}; the rest is in {left}.")
        raise
    finally:
        if not moved:
            for temp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temp)


def remove_stale_temps(directory: str) -> list[str]:
    """Delete the temporary files that interrupted saves left in `directory`; returns their paths.

    Any save's temporary files match, so two saves into one directory at once are not supported (nor in PEFT).
    """
    removed = []
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for temp in _temps(directory, name):
            with contextlib.suppress(OSError):  # the save itself is complete: a file that stays is only clutter
                os.remove(temp)
                removed.append(temp)
    return removed


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

    The two files replace any earlier adapter as one unit (see the module docstring); a successful save
    then removes temporary files left in the directory by interrupted saves.

    Args:
        directory: where to write (created if needed).
        adapter_params: the adapter tree `{module path: {leaf name: Tensor}}`.
        peft_config: the adapter's config (written as adapter_config.json).
        adapter_name: "default" writes into `directory`, any other name into `directory/<adapter_name>`.
        model, base_params: make the files complete like PEFT's (`auto_mapping` for task_type None, embedding
            layers when an embedding is targeted); VeRA with save_projection=True needs `base_params` (the
            `base` holding its shared projections).
        plan: (what `FunctionalPeftModel.save_pretrained` passes) check the tree against the model first:
            missing, unexpected or mis-shaped leaves raise one `AdapterMismatchError` before anything is written.
        save_embedding_layers: PEFT's ("auto", True or False).
        safe_serialization: must be True (safetensors; pickled files are not written).
        fsync: flush both files to disk before they replace the old ones (durable across a power loss).

    Returns:
        The directory written.
    """
    out_dir, writers = adapter_files(
        directory,
        adapter_params,
        peft_config,
        adapter_name,
        model=model,
        base_params=base_params,
        plan=plan,
        save_embedding_layers=save_embedding_layers,
        safe_serialization=safe_serialization,
    )
    save_files(writers, fsync=fsync)
    return out_dir


def adapter_files(
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
) -> tuple[str, dict[str, Callable[[str], None]]]:
    """(the adapter's directory, {final path: writer}) of `save_adapter`, checked and serialised but not written:
    for a save of several adapters as one unit (X-LoRA's experts and classifier), through `save_files`."""
    if not safe_serialization:
        raise ValueError("funcpeft writes safetensors only (safe_serialization=False would write a pickle)")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a funcpeft config (e.g. funcpeft.LoraConfig), got {type(peft_config).__name__}"
        )
    out_dir = adapter_dir(directory, adapter_name)
    if plan is not None and model is not None and not isinstance(method_for(peft_config), InputMethod):
        check_tree(adapter_params, plan, model, peft_config)
    state = checkpoint_state(
        adapter_params, peft_config, model, base_params, save_embedding_layers, adapter_name, plan=plan
    )
    config_bytes = json.dumps(config_dict(peft_config, model), indent=2, sort_keys=True).encode("utf-8")
    metadata = {"format": "pt", DIGEST_KEY: _digest(json.loads(config_bytes))}  # exactly what a reader parses
    # weights first: they carry the digest, so weights newer than the config show
    return out_dir, {
        os.path.join(out_dir, WEIGHTS_NAME): lambda path: save_file(state, path, metadata=metadata),
        os.path.join(out_dir, CONFIG_NAME): lambda path: _write_bytes(path, config_bytes),
    }


def save_files(writers: Mapping[str, Callable[[str], None]], fsync: bool = True) -> None:
    """Write `writers` ({final path: writer(temp path)}) as one unit (`write_files_atomically`), creating their
    directories; a failure removes the directories this call created (if still empty). A success then removes
    temporary files left in those directories by interrupted saves."""
    dirs = list(dict.fromkeys(os.path.dirname(f) or "." for f in writers))
    created: list[str] = []
    try:
        for d in dirs:
            created = _makedirs(d) + created
        write_files_atomically(writers, fsync=fsync)
    except BaseException:
        for d in created:  # innermost first; only directories this call created, and only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    for d in dirs:
        remove_stale_temps(d)
