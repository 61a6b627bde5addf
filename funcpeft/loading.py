"""Loading PEFT adapters: `load_adapter` (files -> tree) and `from_pretrained` (PEFT's `PeftModel.from_pretrained`).

Every tensor of the checkpoint is checked against the model before anything is returned: missing keys,
unexpected keys and shape mismatches are collected and raised as one `AdapterMismatchError` (or warned
about with `strict=False`, which then keeps a fresh init for what is missing or mis-shaped, like PEFT).
Leaves get PEFT's dtype (the layer's, upcast to float32 for fp16/bf16 layers when
`autocast_adapter_dtype`) and live on their layer's device. The model is never modified.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ._plan import init_adapter, init_shared, method_shapes, plan_adapter
from .config import PeftConfig
from .io import CONFIG_NAME, adapter_dir, read_config, read_tensors
from .keys import (
    PREFIX,
    Leaf,
    base_file_key,
    file_key,
    is_saved_module,
    is_wrapper_duplicate,
    key_rules,
    parse_file_key,
    plan_file_keys,
    shared_file_keys,
    tree_file_keys,
)
from .methods._layers import adapter_dtype


class AdapterMismatchError(ValueError):
    """An adapter checkpoint (or tree) does not fit the model: lists every missing, unexpected and mis-shaped key."""


class LeafSpec(NamedTuple):
    shape: tuple[int, ...] | None  # None: not known up front (accepted as found)
    dtype: torch.dtype
    device: torch.device


@dataclasses.dataclass
class Problems:
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def message(self, what: str, model: nn.Module) -> str:
        lines = [f"{what} does not match the adapter layout of this {type(model).__name__}:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s) (expected by the model, absent from the checkpoint):")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) (in the checkpoint, not expected by the model):")
            for k in self.unexpected:
                close = difflib.get_close_matches(k, self.missing, n=1, cutoff=0.8)
                lines.append(f"    {k}" + (f"  (did you mean {close[0]}?)" if close else ""))
        if self.shapes:
            lines.append(f"  {len(self.shapes)} shape mismatch(es):")
            lines += [f"    {k}: checkpoint {list(got)}, model expects {list(want)}" for k, got, want in self.shapes]
        return "\n".join(lines)


# -- what the model expects ----------------------------------------------------------------------------------
def _device(t: torch.Tensor) -> torch.device:
    return torch.device("cpu") if t.is_meta else t.device


def expected_leaves(model: nn.Module, plan: Mapping[str, Any], autocast_adapter_dtype: bool = True) -> dict[Leaf, LeafSpec]:
    """Shape, dtype and device of every leaf `plan` expects: what PEFT's layers would hold for this model."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[Leaf, LeafSpec] = {}
    for path, e in plan.items():
        if e.spec is not None:
            w = modules[path].weight
            dtype = adapter_dtype(w.dtype, autocast_adapter_dtype)
            shapes = method_shapes(e.spec)
            for n in e.params:
                out[(path, n)] = LeafSpec(tuple(shapes[n]), dtype, _device(w))
        for n in e.overrides:
            p = params[f"{path}.{n}"]
            out[(path, n)] = LeafSpec(tuple(p.shape), p.dtype, _device(p))
    return out


def check_tree(tree: Mapping[str, Any], plan: Mapping[str, Any], model: nn.Module, config: PeftConfig) -> None:
    """Raise one AdapterMismatchError listing every leaf of `tree` that is missing, unexpected or mis-shaped."""
    rules = key_rules(config)
    expected = plan_file_keys(plan, rules)
    leaves = expected_leaves(model, plan)
    found = {k: tuple(tree[p][n].shape) for k, (p, n) in tree_file_keys(tree, rules).items()}
    problems = Problems(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        shapes=[(k, s, w) for k, s in found.items() if k in expected and (w := leaves[expected[k]].shape) not in (None, s)],
    )
    if problems:
        raise AdapterMismatchError(problems.message("The adapter tree", model))


# -- checkpoint vs model -------------------------------------------------------------------------------------
class Matched(NamedTuple):
    adapter: dict[Leaf, torch.Tensor]
    base: dict[str, torch.Tensor]  # base-model parameters PEFT saved too (embeddings), by canonical name
    problems: Problems


def match_checkpoint(
    tensors: Mapping[str, torch.Tensor], plan: Mapping[str, Any], model: nn.Module, config: PeftConfig,
    leaves: Mapping[Leaf, LeafSpec], shared: Mapping[str, torch.Tensor],
) -> Matched:
    """Sort checkpoint tensors into adapter leaves and base entries; collect every problem.

    shared: the method's frozen shared base entries (funcpeft.mapping.init_shared), which it may save.
    """
    rules = key_rules(config)
    expected = plan_file_keys(plan, rules)
    adapted = {p for p, e in plan.items() if e.spec is not None}
    mts = getattr(config, "modules_to_save", None)
    saved = [p for p, e in plan.items() if e.spec is None and is_saved_module(p, mts)]
    canon = {id(p): n for n, p in model.named_parameters()}
    named = dict(model.named_parameters(remove_duplicate=False))
    base_keys = {base_file_key(n, adapted): canon[id(p)] for n, p in named.items()}
    shared_keys = shared_file_keys(config, shared)
    base_keys.update(shared_keys)
    reference = {**named, **shared}
    found: dict[Leaf, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    problems = Problems()
    for key, t in tensors.items():
        if key in expected:
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
    mis_shaped = {k for k, _, _ in problems.shapes}
    problems.missing = [k for k, leaf in expected.items() if leaf not in found and k not in mis_shaped]
    problems.missing += [k for k, name in shared_keys.items() if name not in base and k not in mis_shaped]
    return Matched(found, base, problems)


def _report(problems: Problems, what: str, model: nn.Module, strict: bool) -> None:
    if not problems:
        return
    msg = problems.message(what, model)
    if strict:
        raise AdapterMismatchError(msg + "\nPass strict=False to load anyway (missing or mis-shaped leaves keep a fresh init).")
    warnings.warn(msg + "\nLoading anyway (strict=False): missing or mis-shaped leaves keep a fresh init.", stacklevel=4)


def build_tree(
    found: Mapping[Leaf, torch.Tensor], plan: Mapping[str, Any], model: nn.Module,
    leaves: Mapping[Leaf, LeafSpec], autocast_adapter_dtype: bool, is_trainable: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter tree in plan order; leaves absent from `found` get a fresh init (PEFT's non-strict load)."""
    absent = {p for p, e in plan.items() if any((p, n) not in found for n in (*e.params, *e.overrides))}
    fresh: dict[str, dict[str, torch.Tensor]] = {}
    if absent:
        fresh = init_adapter(model, {p: plan[p] for p in absent}, autocast_adapter_dtype)
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
def _locate(directory: str | os.PathLike, adapter_name: str) -> str:
    """`directory` itself, or `directory/<adapter_name>` (where save_adapter puts a non-default adapter)."""
    here = os.fspath(directory)
    sub = adapter_dir(here, adapter_name)  # validates the name
    if not os.path.isfile(os.path.join(here, CONFIG_NAME)) and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    return here


class Loaded(NamedTuple):
    config: PeftConfig  # resolved against the model, like FunctionalPeftModel.peft_config
    plan: dict[str, Any]
    tree: dict[str, dict[str, torch.Tensor]]
    base: dict[str, torch.Tensor]  # shared method tensors + base parameters the checkpoint carries (model's dtype/device)


def load_for_model(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *, is_trainable: bool = False,
    autocast_adapter_dtype: bool = True, strict: bool = True, allow_pickle: bool = False,
) -> Loaded:
    """Read, resolve, check and convert a saved adapter for `model` (shared by load_adapter and from_pretrained)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    where = _locate(directory, adapter_name)
    config = read_config(where)
    tensors = read_tensors(where, allow_pickle)
    # PEFT keeps the saved base_model_name_or_path on load (no rename warning): resolve with the model's, restore
    name = model.__dict__.get("name_or_path", None) or None
    resolved, plan = plan_adapter(model, dataclasses.replace(config, base_model_name_or_path=name), for_checkpoint=True)
    resolved.base_model_name_or_path = config.base_model_name_or_path
    resolved.inference_mode = not is_trainable
    leaves = expected_leaves(model, plan, autocast_adapter_dtype)
    shared = init_shared(model, plan)
    matched = match_checkpoint(tensors, plan, model, resolved, leaves, shared)
    _report(matched.problems, f"The adapter checkpoint in {where!r}", model, strict)
    tree = build_tree(matched.adapter, plan, model, leaves, autocast_adapter_dtype, is_trainable)
    ref = {**dict(model.named_parameters()), **shared}
    loaded = {n: t.to(device=_device(ref[n]), dtype=ref[n].dtype) for n, t in matched.base.items()}
    return Loaded(resolved, plan, tree, {**shared, **loaded})


def _load_without_model(where: str, strict: bool, is_trainable: bool, allow_pickle: bool) -> tuple[dict, PeftConfig]:
    config = read_config(where)
    tensors = read_tensors(where, allow_pickle)
    rules = key_rules(config)
    mts, bias = getattr(config, "modules_to_save", None) or [], getattr(config, "bias", "none")
    tree: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[Leaf, str] = {}
    unexpected: list[str] = []
    for key, t in tensors.items():
        parsed = parse_file_key(key, rules, mts, bias)
        if parsed is None:
            unexpected.append(key)
        elif parsed[0] == "adapter":
            (path, name) = parsed[1]
            tree.setdefault(path, {})[name] = t.requires_grad_(is_trainable)
            keys[(path, name)] = key
    for (path, name), key in keys.items():  # the key must be exactly what saving this leaf would write
        adapted = any(rules.is_method_param(n) for n in tree[path])
        if file_key(path, name, rules, adapted) != key:
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
    directory: str | os.PathLike, adapter_name: str = "default", model: nn.Module | None = None, *,
    strict: bool = True, is_trainable: bool = False, autocast_adapter_dtype: bool = True, allow_pickle: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], PeftConfig]:
    """Read a PEFT adapter directory: `(adapter_params, peft_config)`.

    With `model`: the tree is checked against the model (one AdapterMismatchError listing every missing,
    unexpected and mis-shaped key; `strict=False` warns instead), has PEFT's dtypes, lives on each layer's
    device, and the config is resolved against the model. Without: the tree is read from the key names
    alone (CPU, the file's dtypes) and the config is the file's. `adapter_name` also finds an adapter saved
    under `directory/<adapter_name>/`. Base-model tensors PEFT saves along (embedding layers) are not part
    of the tree: `from_pretrained` applies them.
    """
    if model is None:
        return _load_without_model(_locate(directory, adapter_name), strict, is_trainable, allow_pickle)
    loaded = load_for_model(
        model, directory, adapter_name, is_trainable=is_trainable, autocast_adapter_dtype=autocast_adapter_dtype,
        strict=strict, allow_pickle=allow_pickle,
    )
    params = dict(model.named_parameters())
    differing = [n for n, t in loaded.base.items() if n in params and not torch.equal(t, params[n])]
    if differing:
        warnings.warn(
            f"The checkpoint also carries base-model weights that differ from the model's: {differing}. "
            "load_adapter ignores them; funcpeft.from_pretrained uses them (in `base`), like PEFT.",
            stacklevel=2,
        )
    return loaded.tree, loaded.config
