"""Planning an adapter: which module of a model carries which leaves, and fresh values for them.

    resolved, plan = plan_adapter(model, config)     # plan: {module_path: PlanEntry}
    tree = init_adapter(model, plan)                 # the adapter tree (funcpeft.trees)
    base_extra = init_shared(model, plan)            # frozen shared tensors (VeRA's), extra `base` entries

A `PlanEntry` is static data about one module (hashable, no tensors). Every later stage — the call
(funcpeft._functional), files (funcpeft.io), merging, counting, routing — reads plans, never configs.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._targeting import (
    find_modules_to_save,
    find_parameter_targets,
    find_targets,
    layer_kind,
    match_targets,
    parameter_paths,
    resolve_config,
    tied_to_input_embedding,
)
from .config import PeftConfig
from .methods import method_for, weight_method
from .methods._layers import adapter_dtype
from .methods.base import (
    ConvGeometry,
    EmbeddingGeometry,
    LayerKind,
    LayerSpec,
    Method,
    ParameterGeometry,
    Params,
    Target,
    UnsupportedLayerError,
)
from .trees import SHARED_PATH, SHARED_PREFIX, layer_frozen_key


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """What one module carries for one adapter.

    spec: the adapted layer's facts (None: the module is not adapted, only some of its params are replaced).
    params: the method's trainable leaves at this module (e.g. ("lora_A", "lora_B")).
    overrides: the module's own parameters the adapter's copies replace (modules_to_save, trainable biases).
    in_place: the subset of `overrides` PEFT trains in place on the base layer (bias="all"/"lora_only"):
      counted once, never frozen by inference_mode, written through ties on merge.
    frozen: ((param name, base key), ...) of frozen tensors the forward reads from `base`: shared ones (VeRA's
      projections) and the layer's own (SHiRA's mask indices, `Method.layer_frozen`).
    shapes: ((leaf name, shape), ...) of every leaf (params and overrides): what `fn` checks trees against.
    shared: names of the trainable tensors shared by all layers (`Method.shared_trainable`) the forward reads
      from the adapter tree's `trees.SHARED_PATH` entry (VB-LoRA's vector bank).
    owner: on the `SHARED_PATH` entry only: a layer's spec, whose method draws the shared tensors.
    tied: ((module path, its spec), ...): layers whose weight is tied to this one's and that apply this entry's
      adapter parameters with their own op (`Method.follows_ties`: trainable tokens on a tied lm_head).
    copied_by: the method whose trainable copies `overrides` are (`Method.copies_modules`: LN tuning), None for
      modules_to_save copies and trainable biases.
    parameter: for a bare-parameter target (`target_parameters`, LayerKind.PARAMETER), the targeted parameter's
      model name (e.g. "model.layers.0.mlp.experts.gate_up_proj"); the entry's path is then PEFT's module path of
      its lora.ParamWrapper (the module's name, or `{module}.base_layer...` for a module with several targeted
      parameters), which is where PEFT's checkpoint keys live. None: the entry's path is the module's own.
    """

    spec: LayerSpec[Any] | None = None
    params: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    in_place: tuple[str, ...] = ()
    frozen: tuple[tuple[str, str], ...] = ()
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    shared: tuple[str, ...] = ()
    owner: LayerSpec[Any] | None = None
    tied: tuple[tuple[str, LayerSpec[Any]], ...] = ()
    copied_by: str | None = None
    parameter: str | None = None

    @property
    def keys(self) -> frozenset[str]:
        """Every key of the adapter tree's entry at this module."""
        return frozenset(self.params) | frozenset(self.overrides)

    def module(self, path: str) -> str:
        """The model's module this entry (at tree path `path`) belongs to."""
        return self.parameter.rpartition(".")[0] if self.parameter is not None else path

    def weight_key(self, path: str) -> str:
        """The base parameter the method adapts: the layer's `{path}.weight`, or the targeted bare parameter."""
        return self.parameter if self.parameter is not None else f"{path}.weight"

    def base_key(self, path: str, name: str) -> str:
        """The model parameter that override `name` (modules_to_save copy, trained bias) replaces."""
        return f"{self.module(path)}.{name}"

    @property
    def method(self) -> Method:
        """The weight-level method of an adapted module."""
        if self.spec is None:
            raise ValueError("this module is not adapted (it only carries overrides)")
        return weight_method(self.spec.method)


Plan = dict[str, PlanEntry]


def check_adapter_name(name: Any) -> None:
    """Adapter names become directory names and key parts: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(
            f"adapter_name must be a non-empty str of letters, digits, '_' or '-' (it becomes a directory and a key "
            f"part), got {name!r}"
        )


def layer_spec(target: Target, config: PeftConfig, method: Method) -> LayerSpec[Any]:
    """Static facts of one targeted layer; the method adds its own hyper-parameters (`method.hyper`)."""
    module: Any = target.module
    kind = target.kind
    _check_plain_weight(target.name, module, config)
    weight: Any = module.weight
    shape = tuple(weight.shape)
    geometry: ConvGeometry | EmbeddingGeometry | None = None
    if kind is LayerKind.LINEAR:
        in_f, out_f = shape[1], shape[0]
    elif kind is LayerKind.CONV1D_HF or kind is LayerKind.EMBEDDING:
        in_f, out_f = shape[0], shape[1]
        if kind is LayerKind.EMBEDDING:
            geometry = EmbeddingGeometry(
                module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
            )
    else:
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"{type(config).__name__} on {target.name!r}: conv padding_mode={module.padding_mode!r} is not "
                "supported (only 'zeros')"
            )
        in_f, out_f = module.in_channels, module.out_channels
        geometry = ConvGeometry(tuple(module.stride), module.padding, tuple(module.dilation), module.groups)
    return LayerSpec(method.name, kind, shape, in_f, out_f, method.hyper(config, target), geometry)


def parameter_spec(target: Target, param_name: str, config: PeftConfig, method: Method) -> LayerSpec[Any]:
    """Static facts of a targeted bare parameter (`target.name` is its model name; `param_name` its name on
    `target.module`), read like PEFT's `lora.ParamWrapper._get_in_out_features` / `update_layer`."""
    _check_plain_weight(target.name, target.module, config, param_name)
    shape = tuple(getattr(target.module, param_name).shape)
    if len(shape) == 3:
        experts, in_f, out_f = shape
    elif len(shape) == 2:
        experts, in_f, out_f = 1, shape[1], shape[0]
    else:
        raise ValueError(
            f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter, but only 2d and 3d are "
            f"supported ({target.name!r} has shape {list(shape)})."
        )
    # a 3-D stack is (E, out, in) unless the module says it is transposed (E, in, out), e.g. GPT-OSS's experts
    swapped = len(shape) == 3 and not getattr(target.module, "is_transposed", False)
    if swapped:
        in_f, out_f = out_f, in_f
    geometry = ParameterGeometry(param_name, experts, swapped)
    hyper = method.hyper(config, target)  # raises PEFT's errors for options a parameter target cannot take
    if method.parameter_value is None:
        raise UnsupportedLayerError(
            f"{type(config).__name__}: method {method.name!r} cannot adapt a bare nn.Parameter ({target.name!r}, "
            "targeted by `target_parameters`); only plain LoRA can."
        )
    return LayerSpec(method.name, LayerKind.PARAMETER, shape, in_f, out_f, hyper, geometry)


def _check_plain_weight(name: str, module: nn.Module, config: PeftConfig, param: str = "weight") -> None:
    """funcpeft adapts layers whose weight is an ordinary floating-point parameter; anything else is refused clearly."""
    from torch.nn.utils import parametrize

    what = f"{type(config).__name__} on {name!r} ({type(module).__module__}.{type(module).__name__})"
    if parametrize.is_parametrized(module, param):
        kinds = [type(p).__name__ for p in module.parametrizations[param]]  # type: ignore[index,union-attr]
        raise NotImplementedError(
            f"{what}: its {param} is computed by a parametrization ({kinds}, e.g. weight_norm); funcpeft cannot adapt "
            "parametrized weights. Remove it first (torch.nn.utils.parametrize.remove_parametrizations) or do not "
            "target it."
        )
    weight: Any = getattr(module, param)
    if type(weight) not in (nn.Parameter, torch.Tensor) or not (weight.is_floating_point() or weight.is_meta):
        raise NotImplementedError(
            f"{what}: its weight is a {type(weight).__module__}.{type(weight).__name__} of dtype {weight.dtype}, not a "
            "plain floating-point tensor (a quantised or otherwise wrapped layer); funcpeft does not support such "
            "layers yet. Do not target this module, or load the model unquantised."
        )


def _fix_fan_in_fan_out(kinds: Mapping[str, LayerKind], config: Any) -> None:
    """PEFT's dispatch: forced True for GPT-2 Conv1D, forced False for nn.Linear, in target order, with its warnings."""
    for kind in kinds.values():
        if kind is LayerKind.LINEAR and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.",
                stacklevel=4,
            )
            config.fan_in_fan_out = False
        elif kind is LayerKind.CONV1D_HF and not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=4,
            )
            config.fan_in_fan_out = True


def plan_adapter(
    model: nn.Module, config: PeftConfig, revision: str | None = None, adapter_name: str = "default"
) -> tuple[PeftConfig, Plan]:
    """Resolve `config` against `model` (a new config) and lay out which module gets which leaves.

    adapter_name: names the `base` keys of the adapter's per-layer frozen tensors (`Method.layer_frozen`).
    """
    method = method_for(config)
    if not isinstance(method, Method):
        raise NotImplementedError(f"{type(config).__name__}: input-level methods are not planned per layer")
    resolved = resolve_config(model, config, revision)
    found = find_parameter_targets(model, resolved)
    if found:
        targets = _module_targets(model, resolved, found)
    else:
        targets = find_targets(model, resolved, any_module=method.copies_modules)
        if getattr(resolved, "target_parameters", None):
            wanted = resolved.target_parameters
            warnings.warn(f"target_parameters={wanted} were set but no parameter was matched.", RuntimeWarning, stacklevel=3)
    modules = dict(model.named_modules())
    plan: Plan = _copies_plan(method, targets, modules) if method.copies_modules else {}
    tied = tied_to_input_embedding(model, targets) if method.follows_ties else []
    layers = [n for n in targets if n not in tied] if not method.copies_modules else []
    kinds: dict[str, LayerKind] = {}
    for name in (*layers, *tied):
        kind = layer_kind(modules[name])
        assert kind is not None  # find_targets raised for anything else
        kinds[name] = kind
    if hasattr(resolved, "fan_in_fan_out"):
        _fix_fan_in_fan_out(kinds, resolved)
    common = method.shared.common_hyper(resolved, {n: modules[n] for n in layers}) if method.shared else None
    for name in layers:
        spec = layer_spec(Target(name, modules[name], kinds[name], common), resolved, method)
        frozen = method.shared.frozen_params(spec) if method.shared else ()
        if method.layer_frozen is not None:
            frozen += tuple((n, layer_frozen_key(adapter_name, name, n)) for n in method.layer_frozen.names)
        shapes = tuple((k, tuple(v)) for k, v in method_shapes(spec).items())
        plan[name] = PlanEntry(spec=spec, params=method.param_names(spec), frozen=frozen, shapes=shapes)
    owners: dict[str, str] = {}  # module -> its innermost ParamWrapper path (where PEFT keeps the module's bias)
    for path, (module_name, pname) in zip(parameter_paths(found), found):
        key = f"{module_name}.{pname}"
        spec = parameter_spec(Target(key, modules[module_name], LayerKind.PARAMETER, common), pname, resolved, method)
        shapes = tuple((k, tuple(v)) for k, v in method_shapes(spec).items())
        plan[path] = PlanEntry(spec=spec, params=method.param_names(spec), shapes=shapes, parameter=key)
        owners.setdefault(module_name, path)
    if method.shared_trainable is not None and layers:  # one tree entry for them; every layer reads it
        owner = plan[layers[0]].spec
        assert owner is not None
        own_shapes = tuple((k, tuple(v)) for k, v in shared_shapes(owner).items())
        names = tuple(k for k, _ in own_shapes)
        plan.update({n: dataclasses.replace(plan[n], shared=names) for n in layers})
        plan[SHARED_PATH] = PlanEntry(params=names, owner=owner, shapes=own_shapes)
    if tied:  # PEFT ties them to the input embedding's adapter (which is targeted: see tied_to_input_embedding)
        emb = next(n for n in layers if modules[n] is model.get_input_embeddings())  # type: ignore[operator]
        specs = tuple((n, layer_spec(Target(n, modules[n], kinds[n], common), resolved, method)) for n in tied)
        plan[emb] = dataclasses.replace(plan[emb], tied=specs)
    saved = find_modules_to_save(model, resolved, set(targets), set(owners))
    for name in saved:
        own = tuple((n, tuple(p.shape)) for n, p in modules[name].named_parameters())
        plan[name] = PlanEntry(overrides=tuple(n for n, _ in own), shapes=own)
    bias = getattr(resolved, "bias", "none")
    if bias != "none":
        for pname, _ in model.named_parameters():
            path, _, leaf = pname.rpartition(".")
            if leaf != "bias" or any(path == s or path.startswith(s + ".") for s in saved):
                continue
            path = owners.get(path, path)
            adapted = path in plan and plan[path].spec is not None
            if bias == "all" or adapted:
                entry = plan.get(path, PlanEntry())
                shape = tuple(model.get_parameter(pname).shape)
                plan[path] = dataclasses.replace(
                    entry, overrides=("bias",), in_place=("bias",), shapes=(*entry.shapes, ("bias", shape))
                )
    return resolved, plan


def _module_targets(model: nn.Module, config: Any, found: list[tuple[str, str]]) -> list[str]:
    """The modules `target_modules` matches when `target_parameters` matched too (then none is fine: PEFT's rules).

    A module holding a targeted parameter cannot also be a LoRA layer (PEFT's ValueError).
    """
    targets, _ = match_targets(model, config)
    if config.target_modules and not targets:
        warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning, stacklevel=4)
    clash = next((m for m, _ in found if m in targets), None)
    if clash is not None:
        raise ValueError(
            f"Trying to wrap an `nn.Parameter` of layer '{clash}' of type {type(model.get_submodule(clash)).__name__}, "
            "which is not a valid target. Make sure that this layer is not also targeted with `target_modules`. For "
            "some models, PEFT will do this automatically, try setting `target_modules=[]` to prevent it."
        )
    return targets


def _copies_plan(method: Method, targets: list[str], modules: Mapping[str, nn.Module]) -> Plan:
    """LN tuning's plan: each target carries trainable copies of its own parameters (PEFT deep-copies it)."""
    for outer in targets:
        inner = next((t for t in targets if t.startswith(outer + ".")), None)
        if inner is not None:
            raise ValueError(
                f"{method.config.__name__}: target {inner!r} lies inside target {outer!r}; the method copies each "
                "targeted module whole, so nested targets are ambiguous. Target one of them."
            )
    plan: Plan = {}
    for n in targets:
        own = tuple((p, tuple(t.shape)) for p, t in modules[n].named_parameters())
        plan[n] = PlanEntry(overrides=tuple(p for p, _ in own), copied_by=method.name, shapes=own)
    return plan


def fresh_method_params(
    entry: PlanEntry, weight: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype
) -> Params:
    """A layer's fresh method parameters on the weight's device (meta tensors for a meta-device weight)."""
    assert entry.spec is not None
    method = entry.method
    if weight.device.type == "meta":
        return {k: torch.empty(shape, device="meta", dtype=dtype) for k, shape in method_shapes(entry.spec).items()}
    # PEFT moves a fresh adapter to its layer's dtype before upcasting fp16/bf16 ones to float32: round through it
    via = weight.dtype if weight.dtype.is_floating_point else dtype
    fresh = {k: v.to(weight.device, via).to(dtype) for k, v in method.init(entry.spec, generator).items()}
    if method.finish_init is not None:  # init that needs the base weight (DoRA's magnitude)
        fresh = method.finish_init(entry.spec, fresh, weight.detach())
    return fresh


def method_shapes(spec: LayerSpec[Any]) -> dict[str, torch.Size]:
    """{param name: shape} of one layer's method parameters, from a meta-device init (no memory)."""
    method = weight_method(spec.method)
    with torch.device("meta"):
        params = method.init(spec, None)
        if method.finish_init is not None:
            params = method.finish_init(spec, params, torch.empty(spec.weight_shape))
    return {k: v.shape for k, v in params.items()}


def shared_shapes(owner: LayerSpec[Any]) -> dict[str, torch.Size]:
    """{name: shape} of the trainable tensors shared by the layers of `owner`'s method, from a meta-device draw."""
    draw = weight_method(owner.method).shared_trainable
    assert draw is not None
    with torch.device("meta"):
        return {k: v.shape for k, v in draw.init(owner, None).items()}


def init_adapter(
    model: nn.Module, plan: Plan, autocast_adapter_dtype: bool = True, generator: torch.Generator | None = None,
    trainable: bool = True,
) -> dict[str, Params]:
    """A fresh adapter tree for `plan`: method params from their init, overrides cloned from the model.

    Each leaf is a new leaf tensor with requires_grad=`trainable` (False for a config with
    inference_mode=True, like PEFT; trainable biases stay trainable, as in PEFT), on its layer's device;
    fp16/bf16 method params are float32 when `autocast_adapter_dtype` (PEFT's rule). On a meta-device
    model leaves are meta tensors.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    tree: dict[str, Params] = {}
    shared: Params | None = None  # the shared trainable tensors (VB-LoRA's bank), drawn in PEFT's order
    for path, entry in plan.items():
        out: Params = {}
        if entry.spec is not None:
            w = params[entry.weight_key(path)]
            dtype = adapter_dtype(w.dtype, autocast_adapter_dtype)
            draw = entry.method.shared_trainable
            if entry.shared and draw is not None and (shared is None or draw.per_layer_draw):
                shared = _fresh(draw.init, entry.spec, w, generator, dtype)
            out.update(fresh_method_params(entry, w, generator, dtype))
        for pname in entry.overrides:
            out[pname] = params[entry.base_key(path, pname)].detach().clone()
        # PEFT trains `bias` in place on the base layer, so inference_mode does not freeze it
        tree[path] = {k: v.requires_grad_(trainable or k in entry.in_place) for k, v in out.items()}
    owner = plan[SHARED_PATH].owner if SHARED_PATH in plan else None
    if owner is not None:
        if shared is None:  # a plan holding only the shared entry (a partial re-init): CPU float32
            draw = weight_method(owner.method).shared_trainable
            assert draw is not None
            shared = _fresh(draw.init, owner, torch.empty(()), generator, torch.float32)
        tree[SHARED_PATH] = {k: v.requires_grad_(trainable) for k, v in shared.items()}
    return tree


def _fresh(
    init: Any, spec: LayerSpec[Any], weight: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype
) -> Params:
    """`init(spec, generator)` on the weight's device in `dtype` (meta tensors, and no draw, for a meta weight)."""
    if weight.device.type == "meta":
        with torch.device("meta"):
            return {k: v.to(dtype) for k, v in init(spec, None).items()}
    return {k: v.to(weight.device, dtype) for k, v in init(spec, generator).items()}


def init_shared(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """The plan's frozen tensors, as extra `base` entries: those its layers read in common (VeRA's projections,
    FourierFT's indices; `SharedTensors.make` runs for each layer whose keys are not made yet, on its device)
    and each layer's own (`Method.layer_frozen`: SHiRA's mask indices).

    Keys start with `funcpeft.trees.SHARED_PREFIX`. Empty for methods without frozen tensors.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for path, entry in plan.items():
        if entry.spec is None:
            continue
        method = entry.method
        if method.shared is not None and not all(k in out for _, k in method.shared.frozen_params(entry.spec)):
            device = params[entry.weight_key(path)].device
            out.update({k: v.to(device) for k, v in method.shared.make(entry.spec).items() if k not in out})
        if method.layer_frozen is not None:
            made = method.layer_frozen.make(entry.spec, modules[path])
            keys = dict(entry.frozen)
            out.update({keys[n]: made[n] for n in method.layer_frozen.names})
    assert all(k.startswith(SHARED_PREFIX) for k in out), sorted(out)
    return out


def shared_params(entry: PlanEntry, base: Mapping[str, torch.Tensor]) -> Params:
    """The frozen shared tensors a layer's forward reads (VeRA's vera_A / vera_B), from their `base` keys."""
    params = {}
    for pname, key in entry.frozen:
        if key not in base:
            raise KeyError(
                f"base has no entry {key!r} (the adapter's frozen shared {pname!r}); pass the `base` that "
                f"get_peft_model returned: it holds such tensors under keys starting with {SHARED_PREFIX!r}"
            )
        params[pname] = base[key]
    return params


def layer_params(entry: PlanEntry, leaves: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Params:
    """A layer's method params: its own and the shared trainable ones (`leaves`: the adapter tree's entry plus
    its `SHARED_PATH` tensors, see `with_shared`) plus frozen ones (from `base`)."""
    return {**{k: leaves[k] for k in (*entry.params, *entry.shared)}, **shared_params(entry, base)}


def with_shared(tree: Mapping[str, Mapping[str, Any]], path: str, entry: PlanEntry) -> dict[str, Any]:
    """Adapter tree entry `path` plus the shared trainable tensors its layer reads (`PlanEntry.shared`)."""
    return {**tree[path], **{k: tree[SHARED_PATH][k] for k in entry.shared}}


def check_stack(specs: tuple[LayerSpec[Any], ...]) -> None:
    """Let each method refuse how its adapters stack on one layer (`Method.check_stack`, innermost first)."""
    for name in dict.fromkeys(s.method for s in specs):
        own = tuple(s for s in specs if s.method == name)
        hook = weight_method(name).check_stack
        if hook is not None and len(own) > 1:
            hook(own)


# -- checking a tree against a plan -------------------------------------------------------------------------
def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}"
    return type(x).__name__


def check_adapter_structure(tree: Any, plan: Mapping[str, PlanEntry], adapter_name: str = "default") -> None:
    """Raise ValueError naming the first path where `tree` differs from what adapter `adapter_name` expects."""
    if not isinstance(tree, Mapping):
        raise ValueError(f"adapter {adapter_name!r}: expected a dict keyed by module path, got {_describe(tree)}")
    if tree.keys() == plan.keys():
        bad = next((p for p in plan if not isinstance(tree[p], Mapping) or tree[p].keys() != plan[p].keys), None)
        if bad is None:
            return
    for path in sorted(set(plan) | set(tree)):
        if path not in tree:
            raise ValueError(f"adapter {adapter_name!r}: path {path!r} is missing from the adapter tree")
        if path not in plan:
            raise ValueError(
                f"adapter {adapter_name!r}: path {path!r} is not a module this adapter targets "
                f"(expected paths like {sorted(plan)[:3]})"
            )
        entry, want = tree[path], plan[path].keys
        if not isinstance(entry, Mapping):
            raise ValueError(f"adapter {adapter_name!r}: {path!r} should be a dict with keys {sorted(want)}, got {_describe(entry)}")
        for key in sorted(set(want) | set(entry)):
            if key not in entry:
                raise ValueError(f"adapter {adapter_name!r}: {path}.{key} is missing (expected keys {sorted(want)})")
            if key not in want:
                raise ValueError(f"adapter {adapter_name!r}: {path}.{key} is unexpected (expected keys {sorted(want)})")


LeafShapes = dict[tuple[str, str], tuple[int, ...]]


def leaf_shapes(plan: Plan) -> LeafShapes:
    """{(module path, leaf name): shape} of every leaf `plan` expects."""
    return {(path, name): shape for path, entry in plan.items() for name, shape in entry.shapes}


def check_leaves(
    tree: Mapping[str, Mapping[str, Any]], shapes: LeafShapes, devices: Mapping[str, torch.device],
    adapter_name: str, lead: tuple[int, ...] = (),
) -> None:
    """Every leaf is a floating-point tensor of the expected shape on its layer's device (O(leaves), metadata only).

    A wrong shape that broadcasts, integer leaves or a meta-device leaf would otherwise run and be silently wrong.
    devices: {module path: device of the layer's weight}; lead: extra leading dims (K for per-example routing).
    """
    for path, leaves in tree.items():
        for name, t in leaves.items():
            where = f"adapter {adapter_name!r}: {path}.{name}"
            want = lead + shapes[(path, name)]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} is a {type(t).__name__}, expected a Tensor of shape {want}")
            if tuple(t.shape) != want:
                raise ValueError(f"{where} has shape {tuple(t.shape)}, expected {want}")
            if not (t.is_floating_point() or t.is_complex()):
                raise TypeError(f"{where} has dtype {t.dtype}, expected a floating-point tensor")
            device = devices.get(path)
            if device is not None and t.device != device:
                raise ValueError(
                    f"{where} is on device {t.device}, but the layer's weight is on {device}: move the adapter "
                    "there (e.g. optree.tree_map(lambda t: t.to(device), adapter))"
                )
