"""`get_peft_model`: a config and a model in, `(fn, base, adapter)` out; the model is never mutated."""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from . import methods  # noqa: F401  (registers the methods)
from .config import LoraConfig, PeftConfig
from .counting import count_parameters, format_trainable
from .functional import Plan, PeftFunction
from .methods.base import METHODS, LayerSpec
from .targeting import find_modules_to_save, find_targets, layer_kind, rank_and_alpha, resolve_config

_UPCAST = (torch.float16, torch.bfloat16)


def _check_adapter_name(name: Any) -> None:
    if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(
            f"adapter_name must be a non-empty str of letters, digits, '_' or '-' (it becomes a directory and a key "
            f"part), got {name!r}"
        )


def _layer_spec(name: str, module: nn.Module, config: LoraConfig) -> LayerSpec:
    kind = layer_kind(module)
    weight = module.weight
    shape = tuple(weight.shape)
    geometry: tuple = ()
    if kind == "linear":
        in_f, out_f = shape[1], shape[0]
    elif kind == "conv1d_hf":
        in_f, out_f = shape[0], shape[1]
    elif kind == "embedding":
        in_f, out_f = shape[0], shape[1]
        geometry = tuple(
            (k, getattr(module, k)) for k in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        )
    else:  # conv
        if module.padding_mode != "zeros":
            raise NotImplementedError(f"LoRA on {name!r}: conv padding_mode={module.padding_mode!r} is not supported")
        in_f, out_f = module.in_channels, module.out_channels
        geometry = (("groups", module.groups), ("padding", module.padding), ("stride", module.stride))
    r, alpha = rank_and_alpha(config, name)
    if kind == "conv" and r % module.groups != 0:
        raise ValueError(f"LoRA on {name!r}: rank {r} must be divisible by the conv's groups={module.groups}")
    scaling = alpha / (r**0.5) if config.use_rslora else alpha / r
    hyper = (
        ("init_lora_weights", config.init_lora_weights),
        ("lora_dropout", 0.0 if kind == "embedding" else float(config.lora_dropout)),
        ("r", r),
        ("scaling", scaling),
    )
    return LayerSpec("lora", kind, shape, in_f, out_f, hyper, geometry)  # type: ignore[arg-type]


def _fix_fan_in_fan_out(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """PEFT's dispatch: forced True for GPT-2 Conv1D, forced False for nn.Linear, in target order, with its warnings."""
    modules = dict(model.named_modules())
    for name in targets:
        kind = layer_kind(modules[name])
        if kind == "linear" and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.",
                stacklevel=4,
            )
            config.fan_in_fan_out = False
        elif kind == "conv1d_hf" and not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=4,
            )
            config.fan_in_fan_out = True


def plan_adapter(model: nn.Module, config: PeftConfig, revision: str | None = None) -> tuple[PeftConfig, Plan]:
    """Resolve `config` against `model` (a new config) and lay out which module gets which parameters."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"funcpeft supports LoraConfig; got {type(config).__name__}")
    resolved = resolve_config(model, config, revision)
    targets = find_targets(model, resolved)
    _fix_fan_in_fan_out(model, targets, resolved)
    modules = dict(model.named_modules())
    plan: Plan = {}

    def entry(path: str) -> dict[str, Any]:
        return plan.setdefault(path, {"spec": None, "params": (), "overrides": (), "in_place": (), "keys": set()})

    for name in targets:
        spec = _layer_spec(name, modules[name], resolved)
        e = entry(name)
        e["spec"], e["params"] = spec, METHODS[spec.method].param_names(spec)
    for name in find_modules_to_save(model, resolved):
        entry(name)["overrides"] = tuple(n for n, _ in modules[name].named_parameters())
    saved = set(find_modules_to_save(model, resolved))
    if resolved.bias != "none":
        for pname, _ in model.named_parameters():
            path, _, leaf = pname.rpartition(".")
            if leaf != "bias" or any(path == s or path.startswith(s + ".") for s in saved):
                continue
            if resolved.bias == "all" or path in plan and plan[path]["spec"] is not None:
                entry(path)["overrides"] = entry(path)["in_place"] = ("bias",)
    for e in plan.values():
        e["keys"] = set(e["params"]) | set(e["overrides"])
    return resolved, plan


def init_adapter(
    model: nn.Module, plan: Plan, autocast_adapter_dtype: bool = True, generator: torch.Generator | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh adapter tree for `plan`: method params from their init, overrides cloned from the model.

    Each leaf is a new leaf tensor with requires_grad=True, on its layer's device; fp16/bf16 method params
    are float32 when `autocast_adapter_dtype` (PEFT's rule). On a meta-device model leaves are meta tensors.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    tree: dict[str, dict[str, torch.Tensor]] = {}
    for path, e in plan.items():
        out: dict[str, torch.Tensor] = {}
        spec: LayerSpec | None = e["spec"]
        if spec is not None:
            w = modules[path].weight
            dtype = torch.float32 if autocast_adapter_dtype and w.dtype in _UPCAST else w.dtype
            if w.device.type == "meta":
                fresh = {k: torch.empty(v.shape, device="meta", dtype=dtype) for k, v in _meta_shapes(spec).items()}
            else:
                fresh = {k: v.to(w.device, dtype) for k, v in METHODS[spec.method].init(spec, generator).items()}
            out.update(fresh)
        for pname in e["overrides"]:
            out[pname] = params[f"{path}.{pname}"].detach().clone()
        tree[path] = {k: v.requires_grad_(True) for k, v in out.items()}
    return tree


def _meta_shapes(spec: LayerSpec) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return METHODS[spec.method].init(spec, None)


@dataclasses.dataclass
class FunctionalPeftModel:
    """What `get_peft_model` returns. Unpacks to `(fn, base, adapter)`.

    fn: `PeftFunction`, pure `fn(base, adapter, *args, **kwargs)`.
    base: `{param_name: Tensor}`, the model's parameters (detached, shared storage, requires_grad=False).
    adapter: the trainable tree of `adapter_name` (see funcpeft.trees).
    peft_config: `{adapter_name: resolved config}`, like PEFT's `PeftModel.peft_config`.
    """

    fn: PeftFunction
    base: dict[str, torch.Tensor]
    adapter: dict[str, dict[str, torch.Tensor]]
    peft_config: dict[str, PeftConfig]
    adapter_name: str
    model: nn.Module
    autocast_adapter_dtype: bool = True

    def __iter__(self) -> Iterator[Any]:
        return iter((self.fn, self.base, self.adapter))

    @property
    def plans(self) -> dict[str, Plan]:
        return self.fn.plans

    def init_adapter(self, adapter_name: str | None = None, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A freshly initialised tree for a registered adapter (e.g. K of them for an ensemble)."""
        name = adapter_name or self.adapter_name
        return init_adapter(self.model, self.plans[name], self.autocast_adapter_dtype, generator)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Register another adapter (PEFT's `add_adapter`) and return its fresh tree."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; registered: {sorted(self.peft_config)}")
        resolved, plan = plan_adapter(self.model, peft_config)
        self.peft_config[adapter_name] = resolved
        self.plans[adapter_name] = plan
        return self.init_adapter(adapter_name, generator)

    def get_nb_trainable_parameters(self, adapter: Any = None) -> tuple[int, int]:
        """(trainable, all) counted like PEFT (tied weights once; modules_to_save original and copy)."""
        tree = self.adapter if adapter is None else adapter
        return count_parameters(self.base, tree, self.plans[self.adapter_name])

    def print_trainable_parameters(self, adapter: Any = None) -> None:
        print(format_trainable(*self.get_nb_trainable_parameters(adapter)))

    # -- thin delegations: the logic lives in its own module ------------------------------------------------
    def save_pretrained(self, directory: str, adapter_params: Any = None, **kwargs: Any) -> None:
        """Write PEFT's on-disk format (see funcpeft.io.save_adapter); None = the tree this object holds."""
        from .io import save_adapter

        tree = self.adapter if adapter_params is None else adapter_params
        save_adapter(directory, tree, self.peft_config[self.adapter_name], self.adapter_name, **kwargs)

    def merge_and_unload(self, adapter_params: Any = None) -> nn.Module:
        """A new plain model with the adapter merged in (see funcpeft.merge); the original model is untouched."""
        from .merge import merge_and_unload

        return merge_and_unload(self, self.adapter if adapter_params is None else adapter_params)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    *,
    generator: torch.Generator | None = None,
) -> FunctionalPeftModel:
    """PEFT's `get_peft_model`, functionally: returns `(fn, base, adapter)` (as a FunctionalPeftModel).

    mixed: PEFT's meaning, "allow adapters of different types to be mixed" (PeftMixedModel); funcpeft's
    `fn` always accepts several registered adapters at once, so this only records the intent.
    generator: optional `torch.Generator` for the adapter init (default: the global RNG, so
    `torch.manual_seed` makes it reproducible).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a funcpeft config (e.g. funcpeft.LoraConfig), got {type(peft_config).__name__}")
    _check_adapter_name(adapter_name)
    resolved, plan = plan_adapter(model, peft_config, revision)
    adapter = init_adapter(model, plan, autocast_adapter_dtype, generator)
    base = {n: p.detach() for n, p in model.named_parameters()}
    fn = PeftFunction(model, {adapter_name: plan}, adapter_name)
    return FunctionalPeftModel(fn, base, adapter, {adapter_name: resolved}, adapter_name, model, autocast_adapter_dtype)
