"""`get_peft_model`: a config and a model in, `(fn, base, adapter)` out; the model is never mutated."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import methods  # noqa: F401  (registers the methods)
from .config import PeftConfig
from .constants import MIXED_COMPATIBLE_TYPES
from .counting import count_parameters, format_trainable
from .functional import PeftFunction, Plan
from .methods.base import METHODS, LayerSpec, method_for
from .targeting import find_modules_to_save, find_targets, layer_kind, resolve_config
from .trees import SHARED_PREFIX

_UPCAST = (torch.float16, torch.bfloat16)


def _check_adapter_name(name: Any) -> None:
    if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(
            f"adapter_name must be a non-empty str of letters, digits, '_' or '-' (it becomes a directory and a key "
            f"part), got {name!r}"
        )


def _layer_spec(name: str, module: nn.Module, config: PeftConfig, method: Any, common: tuple = ()) -> LayerSpec:
    """Static facts of one targeted layer; the method adds its own hyper-parameters (`method.hyper`)."""
    kind = layer_kind(module)
    weight: Any = module.weight
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
            raise NotImplementedError(
                f"{type(config).__name__} on {name!r}: conv padding_mode={module.padding_mode!r} is not supported"
            )
        in_f, out_f = module.in_channels, module.out_channels
        geometry = (
            ("dilation", module.dilation), ("groups", module.groups), ("padding", module.padding), ("stride", module.stride)
        )
    hyper = tuple(sorted(method.hyper(config, name, module, kind) + tuple(common)))
    return LayerSpec(method.name, kind, shape, in_f, out_f, hyper, geometry)  # type: ignore[arg-type]


def _fix_fan_in_fan_out(model: nn.Module, targets: list[str], config: Any) -> None:
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
    """Resolve `config` against `model` (a new config) and lay out which module gets which parameters.

    Plan entry keys: spec (LayerSpec or None), params (method param names), overrides / in_place (module
    params the adapter replaces), keys (all of the adapter tree's keys there) and, for methods with frozen
    shared tensors (VeRA), frozen: ((param name, base key), ...) read from `base` at call time.
    """
    method = method_for(config)
    resolved = resolve_config(model, config, revision)
    targets = find_targets(model, resolved)
    if hasattr(resolved, "fan_in_fan_out"):
        _fix_fan_in_fan_out(model, targets, resolved)
    modules = dict(model.named_modules())
    common = method.common_hyper(resolved, {n: modules[n] for n in targets}) if hasattr(method, "common_hyper") else ()
    plan: Plan = {}

    def entry(path: str) -> dict[str, Any]:
        return plan.setdefault(path, {"spec": None, "params": (), "overrides": (), "in_place": (), "keys": set()})

    for name in targets:
        spec = _layer_spec(name, modules[name], resolved, method, common)
        e = entry(name)
        e["spec"], e["params"] = spec, method.param_names(spec)
        if hasattr(method, "frozen_params"):
            e["frozen"] = method.frozen_params(spec)
    saved = find_modules_to_save(model, resolved, set(targets))
    for name in saved:
        entry(name)["overrides"] = tuple(n for n, _ in modules[name].named_parameters())
    bias = getattr(resolved, "bias", "none")
    if bias != "none":
        for pname, _ in model.named_parameters():
            path, _, leaf = pname.rpartition(".")
            if leaf != "bias" or any(path == s or path.startswith(s + ".") for s in saved):
                continue
            if bias == "all" or path in plan and plan[path]["spec"] is not None:
                entry(path)["overrides"] = entry(path)["in_place"] = ("bias",)
    for e in plan.values():
        e["keys"] = set(e["params"]) | set(e["overrides"])
    return resolved, plan


def init_adapter(
    model: nn.Module, plan: Plan, autocast_adapter_dtype: bool = True, generator: torch.Generator | None = None,
    trainable: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh adapter tree for `plan`: method params from their init, overrides cloned from the model.

    Each leaf is a new leaf tensor with requires_grad=`trainable` (False for a config with
    inference_mode=True, like PEFT; trainable biases stay trainable, as in PEFT), on its layer's device; fp16/bf16 method params
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
            method = METHODS[spec.method]
            if w.device.type == "meta":
                fresh = {k: torch.empty(v.shape, device="meta", dtype=dtype) for k, v in _meta_shapes(spec).items()}
            else:
                fresh = {k: v.to(w.device, dtype) for k, v in method.init(spec, generator).items()}
                if hasattr(method, "finish_init"):  # init that needs the base weight (DoRA's magnitude)
                    fresh = method.finish_init(spec, fresh, w.detach())
            out.update(fresh)
        for pname in e["overrides"]:
            out[pname] = params[f"{path}.{pname}"].detach().clone()
        # PEFT trains `bias` in place on the base layer, so inference_mode does not freeze it
        tree[path] = {k: v.requires_grad_(trainable or k in e["in_place"]) for k, v in out.items()}
    return tree


def _meta_shapes(spec: LayerSpec) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return METHODS[spec.method].init(spec, None)


def init_shared(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Frozen tensors shared by the plan's layers (VeRA's projections), as extra `base` entries.

    Keys start with `funcpeft.trees.SHARED_PREFIX`; values sit on the first target's device. Empty for
    methods without a `shared` hook.
    """
    specs = [(path, e["spec"]) for path, e in plan.items() if e["spec"] is not None]
    if not specs or not hasattr(METHODS[specs[0][1].method], "shared"):
        return {}
    device = dict(model.named_modules())[specs[0][0]].weight.device
    shared = METHODS[specs[0][1].method].shared(specs[0][1])
    assert all(k.startswith(SHARED_PREFIX) for k in shared), sorted(shared)
    return {k: v.to(device) for k, v in shared.items()}


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
    mixed: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.fn, self.base, self.adapter))

    @property
    def plans(self) -> dict[str, Plan]:
        return self.fn.plans

    def init_adapter(self, adapter_name: str | None = None, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A freshly initialised tree for a registered adapter (e.g. K of them for an ensemble)."""
        name = adapter_name or self.adapter_name
        trainable = not getattr(self.peft_config[name], "inference_mode", False)
        return init_adapter(self.model, self.plans[name], self.autocast_adapter_dtype, generator, trainable)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Register another adapter (PEFT's `add_adapter`) and return its fresh tree."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; registered: {sorted(self.peft_config)}")
        _check_combinable(peft_config, self.peft_config[self.adapter_name], self.mixed)
        resolved, plan = plan_adapter(self.model, peft_config)
        self.base.update(init_shared(self.model, plan))
        self.peft_config[adapter_name] = resolved
        self.plans[adapter_name] = plan
        return self.init_adapter(adapter_name, generator)

    def get_nb_trainable_parameters(self, adapter: Any = None) -> tuple[int, int]:
        """(trainable, all) counted like PEFT (tied weights once; modules_to_save original and copy).

        `adapter` may be `{adapter_name: tree, ...}` (several active adapters, e.g. a mixed model).
        """
        tree = self.adapter if adapter is None else adapter
        base_all = count_parameters(self.base, None, {})[1]
        counts = [count_parameters(self.base, t, self.plans[n]) for n, t in self.fn.split_adapters(tree)]
        return sum(c[0] for c in counts), base_all + sum(c[1] - base_all for c in counts)

    def print_trainable_parameters(self, adapter: Any = None) -> None:
        """Print PEFT's line: `trainable params: N || all params: M || trainable%: P` (4 decimals)."""
        print(format_trainable(*self.get_nb_trainable_parameters(adapter)))

    # -- thin delegations: the logic lives in its own module ------------------------------------------------
    def save_pretrained(self, directory: str, adapter_params: Any = None, **kwargs: Any) -> None:
        """Write `adapter_params` (the trained tree; required) in PEFT's on-disk format (see funcpeft.io.save_adapter).

        The tree is required because `self.adapter` is the tree as created (or loaded), not the one training
        produced: saving it by default would silently write the initial adapter.
        """
        from .io import save_adapter

        if adapter_params is None:
            raise TypeError(
                "save_pretrained(directory, adapter_params) needs the adapter tree to save: pass the trained tree, "
                "e.g. pm.save_pretrained(directory, adapter). funcpeft never updates pm.adapter, which still holds "
                "the initial (or loaded) adapter; to save that one, pass pm.adapter explicitly."
            )
        tree = adapter_params
        kwargs = {"model": self.model, "base_params": self.base, "plan": self.plans[self.adapter_name], **kwargs}
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

    mixed: PEFT's meaning (PeftMixedModel): `add_adapter` accepts other adapter types (LoRA/DoRA, LoHa,
    LoKr; PEFT's compatible types), and `fn(base, {name: tree, ...})` applies the adapters in the order
    they were added, whatever the dict's order, each wrapping the layer below it. Without `mixed`, adapters
    are applied in the dict's order (PEFT's `set_adapter([...])` order) and must share one peft_type.
    generator: optional `torch.Generator` for the adapter init (default: the global RNG, so
    `torch.manual_seed` makes it reproducible).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a funcpeft config (e.g. funcpeft.LoraConfig), got {type(peft_config).__name__}")
    _check_adapter_name(adapter_name)
    if mixed:
        _check_combinable(peft_config, None, mixed)
    resolved, plan = plan_adapter(model, peft_config, revision)
    adapter = init_adapter(model, plan, autocast_adapter_dtype, generator, not getattr(resolved, "inference_mode", False))
    base = {n: p.detach() for n, p in model.named_parameters()}
    base.update(init_shared(model, plan))
    fn = PeftFunction(model, {adapter_name: plan}, adapter_name)
    fn.mixed = mixed
    return FunctionalPeftModel(
        fn, base, adapter, {adapter_name: resolved}, adapter_name, model, autocast_adapter_dtype, mixed
    )


def _check_combinable(config: PeftConfig, first: PeftConfig | None, mixed: bool) -> None:
    """PEFT's rules: one peft_type per PeftModel; PeftMixedModel only takes its compatible types."""
    if mixed:
        if _type_value(config) not in MIXED_COMPATIBLE_TYPES:
            raise ValueError(
                f"The provided `peft_type` '{_type_value(config)}' is not compatible with the `PeftMixedModel`. "
                f"Compatible types are: {MIXED_COMPATIBLE_TYPES}"
            )
    elif first is not None and _type_value(config) != _type_value(first):
        raise ValueError(
            f"Cannot combine adapters with different peft types. Found {_type_value(first)} and {_type_value(config)}. "
            "Pass mixed=True to get_peft_model to mix adapter types."
        )


def _type_value(config: PeftConfig) -> str:
    return getattr(config.peft_type, "value", str(config.peft_type))
