"""Planning an adapter: which module of a model carries which leaves, and fresh values for them.

    resolved, plan = plan_adapter(model, config)     # plan: {module_path: PlanEntry}
    shared = shared_tensors(model, plan)             # frozen shared tensors (VeRA's, FRoD's bases), made first
    tree = init_adapter(model, plan, frozen_shared=shared)  # the adapter tree (funcpeft._trees)
    base_extra = init_shared(model, plan, shared=shared)  # shared + per-layer frozen tensors, extra `base` entries

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

from ._config import PeftConfig
from ._quant import (
    TORCHAO,
    check_quant_layer,
    check_sharded_quant,
    dequantize,
    is_dtensor,
    packed_name,
    quant_backend,
    torchao_requantizer,
)
from ._targeting import (
    find_modules_to_save,
    find_parameter_targets,
    find_targets,
    layer_kind,
    match_targets,
    module_name,
    parameter_paths,
    resolve_config,
    tied_layers,
    tied_to_input_embedding,
)
from ._trees import PROMPT_PATH, SHARED_PATH, SHARED_PREFIX, layer_frozen_key
from .methods import METHODS, method_for, weight_method
from .methods._layers import adapter_dtype
from .methods.base import (
    NO_INIT_DATA,
    ConvGeometry,
    EmbeddingGeometry,
    InputMethod,
    LayerKind,
    LayerSpec,
    Method,
    ModuleGeometry,
    ParameterGeometry,
    Params,
    QuantGeometry,
    Target,
    UnsupportedLayerError,
    WeightInit,
)


@dataclasses.dataclass(frozen=True)
class Tie:
    """A layer whose weight is tied to an adapted input embedding and that applies the embedding's adapter
    (`Method.tie`: lm_head gets the embedding's LoRA transposed with ensure_weight_tying, or trainable tokens'
    rows). It has no leaves of its own in the adapter tree.

    path: the tied module; spec: its layer facts (its own op); shapes: ((param name, shape), ...) of its params.
    saved: PEFT saves the tied layer's params under its own path (False for an auxiliary part's ties, see
      `PeftConfig.auxiliary_configs`: PEFT's TrainableTokensWrapper leaves tied layers out of the file).
    """

    path: str
    spec: LayerSpec[Any]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    saved: bool = True


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """What one module carries for one adapter.

    spec: the adapted layer's facts (None: the module is not adapted, only some of its params are replaced).
    params: the method's trainable leaves at this module (e.g. ("lora_A", "lora_B")).
    overrides: the module's own parameters the adapter's copies replace (modules_to_save, trainable biases).
    in_place: the subset of `overrides` PEFT trains in place on the base layer (bias="all"/"lora_only"):
      counted once, never frozen by inference_mode, written through ties on merge.
    frozen: ((param name, base key), ...) of frozen tensors the forward reads from `base`: shared ones (VeRA's
      projections) and the layer's own (`Method.layer_frozen`: SHiRA's mask indices, MiCA's lora_B, under
      `trees.layer_frozen_key` keys).
    shapes: ((leaf name, shape), ...) of every leaf (params and overrides): what `fn` checks trees against.
    shared: names of the trainable tensors shared by all layers (`Method.shared_trainable`) the forward reads
      from the adapter tree's `trees.SHARED_PATH` entry (VB-LoRA's vector bank).
    owner: on the `SHARED_PATH` entry only: a layer's spec, whose method draws the shared tensors.
    tied: layers whose weight is tied to this one's and that apply this entry's adapter parameters, passed
      through `Method.tie`, with their own op (`Tie`: lm_head with LoRA's ensure_weight_tying, trainable tokens).
    copied_by: the method whose trainable copies `overrides` are (`Method.copies_modules`: LN tuning), None for
      modules_to_save copies and trainable biases.
    applies_in: the module whose forward uses this layer's weight, when it is not the layer itself (`Target.owner`:
      a targeted nn.MultiheadAttention's forward reads its out_proj's weight); the adapter applies only there.
    parameter: for a bare-parameter target (`target_parameters`, LayerKind.PARAMETER), the targeted parameter's
      model name (e.g. "model.layers.0.mlp.experts.gate_up_proj"); the entry's path is then PEFT's module path of
      its lora.ParamWrapper (the module's name, or `{module}.base_layer...` for a module with several targeted
      parameters), which is where PEFT's checkpoint keys live. None: the entry's path is the module's own.
    key_part: for an auxiliary part's entry (`PeftConfig.auxiliary_configs`), the attribute PEFT's wrapper keeps
      the method's layer under (LoRA's trainable tokens: "token_adapter"); its params are `{path}.{key_part}.{name}`.
    prompt: on the `trees.PROMPT_PATH` entry of an input-level adapter (prompt learning): (its InputMethod's
      name, the method's spec); `params` are then the prompt encoder's leaves.
    borrowed: ((param name, tree path holding it), ...): method params this layer reads from another layer's tree
      entry (`Method.shares`: Lily's shared A and B); not in `params` nor `shapes`.
    """

    spec: LayerSpec[Any] | None = None
    params: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    in_place: tuple[str, ...] = ()
    frozen: tuple[tuple[str, str], ...] = ()
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    shared: tuple[str, ...] = ()
    owner: LayerSpec[Any] | None = None
    tied: tuple[Tie, ...] = ()
    copied_by: str | None = None
    applies_in: str | None = None
    parameter: str | None = None
    key_part: str | None = None
    borrowed: tuple[tuple[str, str], ...] = ()

    @property
    def auxiliary(self) -> bool:
        """The entry belongs to an auxiliary part (`PeftConfig.auxiliary_configs`), not the config's own method."""
        return self.key_part is not None

    prompt: tuple[str, Any] | None = None

    @property
    def keys(self) -> frozenset[str]:
        """Every key of the adapter tree's entry at this module."""
        return frozenset(self.params) | frozenset(self.overrides)

    def module(self, path: str) -> str:
        """The model's module this entry (at tree path `path`) belongs to."""
        return self.parameter.rpartition(".")[0] if self.parameter is not None else path

    def weight_key(self, path: str) -> str:
        """The base parameter the method adapts: the layer's weight (`{path}.weight`, an attention's
        `{path}.in_proj_weight`), or the targeted bare parameter."""
        if self.parameter is not None:
            return self.parameter
        if self.spec is not None and self.spec.kind is LayerKind.MODULE:
            return f"{path}.{self.spec.module.weight}"
        return f"{path}.{self.spec.weight_name if self.spec is not None else 'weight'}"

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
    if kind is LayerKind.MODULE:  # a whole module (Method.module_forward): its parameters stay as they are
        first = next((n for n, _ in module.named_parameters()), None)
        if first is None:
            raise UnsupportedLayerError(
                f"{type(config).__name__} ({method.name}) cannot adapt {target.name!r} "
                f"({type(module).__name__}): the module has no parameters to place the adapter's next to"
            )
        return LayerSpec(method.name, kind, (), 0, 0, method.hyper(config, target), ModuleGeometry(first))
    backend = quant_backend(module) if kind.module_level else None
    if kind.module_level and (kind not in method.kinds or backend not in method.quant_backends):
        able = sorted(
            m.name
            for m in METHODS.values()
            if isinstance(m, Method) and kind in m.kinds and backend in m.quant_backends
        )
        raise NotImplementedError(
            f"{type(config).__name__} ({method.name}) on {target.name!r}, a quantised "
            f"{type(module).__module__}.{type(module).__name__} ({backend} {kind.value} layer): funcpeft adapts such "
            f"layers with {able} only (PEFT's dispatchers). Do not target this module, or load the model unquantised."
        )
    if kind not in method.kinds:
        raise UnsupportedLayerError(
            f"{type(config).__name__} ({method.name}) cannot adapt {target.name!r}, a "
            f"{type(module).__module__}.{type(module).__name__} ({kind.value} layer); it adapts "
            f"{sorted(k.value for k in method.kinds)} layers. Do not target this module."
        )
    if kind is LayerKind.MHA and not module._qkv_same_embed_dim:
        raise ValueError(
            f"Only same embed for query/key/value is supported as of now for MultiheadAttention ({target.name!r}: "
            "kdim / vdim differ from embed_dim, so it has no single in_proj_weight)."
        )
    geometry: ConvGeometry | EmbeddingGeometry | QuantGeometry | None = None
    if kind.module_level:  # packed weight data: the logical (out, in) shape is the module's
        assert backend is not None
        check_sharded_quant(target.name, module)
        check_quant_layer(target.name, module, type(config).__name__, bool(getattr(config, "lora_bias", False)))
        shape: tuple[int, ...] = (module.out_features, module.in_features)
        geometry = QuantGeometry(backend, packed_name(module))
    else:
        _check_plain_weight(target.name, module, config, kind.weight_name)
        shape = tuple(getattr(module, kind.weight_name).shape)
    if kind in (LayerKind.LINEAR, LayerKind.MHA, LayerKind.QUANT_LINEAR):
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
    if is_dtensor(weight):  # an FSDP2 shard: fn runs the sharded model (funcpeft._fsdp), which checks the rest
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                f"{what}: its weight is a DTensor shard (FSDP2 fully_shard), but torch.distributed has no initialized "
                "process group: call torch.distributed.init_process_group first (see docs/distributed.md)"
            )
        weight = weight.to_local()
    if type(weight) not in (nn.Parameter, torch.Tensor) or not (weight.is_floating_point() or weight.is_meta):
        raise NotImplementedError(
            f"{what}: its weight is a {type(weight).__module__}.{type(weight).__name__} of dtype {weight.dtype}, not a "
            "plain floating-point tensor (a quantised or otherwise wrapped layer); funcpeft does not support such "
            "layers yet. Do not target this module, or load the model unquantised."
        )


def _whole(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard gathered whole (a collective: every rank plans the same modules in the same order); else `t`."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _fix_fan_in_fan_out(kinds: Mapping[str, LayerKind], config: Any) -> None:
    """PEFT's dispatch: forced True for GPT-2 Conv1D, forced False for nn.Linear, in target order, with its warnings
    (only the warnings, one per layer, for a config whose PEFT dispatch leaves the field alone)."""
    writes = type(config).WRITES_FAN_IN_FAN_OUT
    for kind in kinds.values():
        if kind is LayerKind.LINEAR and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.",
                stacklevel=4,
            )
            config.fan_in_fan_out = not writes
        elif kind is LayerKind.CONV1D_HF and not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=4,
            )
            config.fan_in_fan_out = writes


def _targets(
    names: list[str], modules: Mapping[str, nn.Module], common: Any, for_checkpoint: bool = False, whole: bool = False
) -> list[Target]:
    """Each target, followed by the layers PEFT adapts along with it (an nn.MultiheadAttention's out_proj).

    whole: the targets are whole modules (LayerKind.MODULE, `Method.module_forward`), whatever their type."""
    out: list[Target] = []
    for name in names:
        kind = LayerKind.MODULE if whole else layer_kind(modules[name])
        assert kind is not None  # find_targets raised for anything else
        parent, _, leaf = name.rpartition(".")
        if leaf == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention) and parent not in names:
            raise NotImplementedError(
                f"{name!r}: an adapter on an nn.MultiheadAttention's out_proj alone would have no effect: the attention "
                "reads out_proj.weight directly and never calls out_proj (PEFT silently ignores such an adapter). "
                f"Target the MultiheadAttention {parent!r} itself (PEFT adapts its in_proj_weight and out_proj together)."
            )
        target = Target(name, modules[name], kind, common, for_checkpoint=for_checkpoint, root=modules.get(""))
        out.append(target)
        if kind is LayerKind.MHA:
            out_proj = getattr(modules[name], "out_proj", None)
            if not isinstance(out_proj, nn.Linear):
                raise TypeError(f"out_proj must be an instance of nn.Linear for MultiheadAttention ({name!r}).")
            if f"{name}.out_proj" in names:
                raise ValueError(
                    f"{name!r} (an nn.MultiheadAttention) and its out_proj are both targeted: PEFT adapts the out_proj "
                    "of a targeted MultiheadAttention itself (and ignores an adapter on out_proj alone, whose forward "
                    "the attention never calls). Target only the MultiheadAttention."
                )
            out.append(
                Target(
                    f"{name}.out_proj", out_proj, LayerKind.LINEAR, common, owner=target, for_checkpoint=for_checkpoint
                )
            )
    return out


def _tied_paths(model: nn.Module, config: PeftConfig, method: Method, targets: list[str]) -> list[str]:
    """The layers tied to the input embedding that take its adapter (`Method.tie`), in `named_modules` order."""
    requested = tied_layers(model, config)  # LoraConfig(ensure_weight_tying=True)
    if method.tie is None:
        if requested:
            raise NotImplementedError(
                f"ensure_weight_tying=True with {type(config).__name__} ({method.name}): funcpeft ties only plain "
                f"LoRA adapters (the layers tied to the input embedding: {requested})."
            )
        return []
    return requested if method.tie.on_request else tied_to_input_embedding(model, targets)


def _ties(model: nn.Module, config: PeftConfig, method: Method, plan: Plan, tied: list[str], common: Any) -> None:
    """Record the layers tied to the input embedding (`_tied_paths`) on the embedding's plan entry."""
    if not tied:
        return
    assert method.tie is not None
    source = module_name(model, model.get_input_embeddings())  # type: ignore[operator]
    entry = plan.get(source or "")
    if entry is None or entry.spec is None:
        raise ValueError(
            f"{type(config).__name__}: {tied} would share the adapter of the input embedding {source!r}, which this "
            "config does not adapt (excluded?)."
        )
    modules = dict(model.named_modules())
    ties = []
    for path in tied:
        kind = layer_kind(modules[path])
        if kind is None:
            raise TypeError(
                f"the tied module {path!r} is a {type(modules[path]).__name__}, not a layer funcpeft adapts"
            )
        spec = layer_spec(Target(path, modules[path], kind, common), config, method)
        with torch.device("meta"):
            tied_params = method.tie.params({k: torch.empty(shape) for k, shape in entry.shapes if k in entry.params})
        shapes = tuple((k, tuple(v.shape)) for k, v in tied_params.items())
        want = tuple((k, tuple(v)) for k, v in method_shapes(spec).items())
        if sorted(shapes) != sorted(want):
            raise ValueError(
                f"{path!r} would take the adapter of {source!r} tied, shaped {dict(shapes)}, but its "
                f"own rank / layout needs {dict(want)} (a rank_pattern giving them different ranks?)"
            )
        ties.append(Tie(path, spec, shapes))
    assert source is not None
    plan[source] = dataclasses.replace(entry, tied=tuple(ties))


def plan_adapter(
    model: nn.Module,
    config: PeftConfig,
    revision: str | None = None,
    adapter_name: str = "default",
    *,
    for_checkpoint: bool = False,
) -> tuple[PeftConfig, Plan]:
    """Resolve `config` against `model` (a new config) and lay out which module gets which leaves.

    adapter_name: names the `base` keys of the adapter's per-layer frozen tensors (`Method.layer_frozen`).
    for_checkpoint: plan the shapes of a saved adapter (see `Target.for_checkpoint`), for loading.
    """
    method = method_for(config)
    if isinstance(method, InputMethod):
        return _plan_input(model, config, method, revision)
    resolved = resolve_config(model, config, revision)
    found = find_parameter_targets(model, resolved)
    if method.module_targets is not None:  # whole modules, by the method's own rule (AdaptionPrompt's top layers)
        names = method.module_targets(model, resolved, lambda: find_targets(model, resolved, any_module=True))
    elif found:
        names = _module_targets(model, resolved, found)
    else:
        names = find_targets(model, resolved, any_module=method.copies_modules)
        if getattr(resolved, "target_parameters", None):
            wanted = resolved.target_parameters
            warnings.warn(
                f"target_parameters={wanted} were set but no parameter was matched.", RuntimeWarning, stacklevel=3
            )
    modules = dict(model.named_modules())
    plan: Plan = _copies_plan(method, names, modules) if method.copies_modules else {}
    tied = _tied_paths(model, resolved, method, names) if not method.copies_modules else []
    layers = [n for n in names if n not in tied] if not method.copies_modules else []
    common = method.shared.common_hyper(resolved, {n: modules[n] for n in layers}) if method.shared else None
    targets = _targets(layers, modules, common, for_checkpoint, whole=method.wraps_modules)
    if hasattr(resolved, "fan_in_fan_out"):
        kinds = {t.name: t.kind for t in targets} | {n: k for n in tied if (k := layer_kind(modules[n])) is not None}
        _fix_fan_in_fan_out(kinds, resolved)
    for target in targets:
        spec = layer_spec(target, resolved, method)
        torchao = spec.kind.module_level and spec.quant.backend == TORCHAO
        if method.torchao_needs_requantiser and torchao and torchao_requantizer(model) is None:
            raise ValueError(  # PEFT's resolve_quantization_backend, with the module named
                "torchao quantized layer detected but 'get_apply_tensor_subclass' was not provided. This is required "
                f"for merge/unmerge support ({type(resolved).__name__} on {target.name!r}: the model has no "
                "`hf_quantizer.quantization_config.get_apply_tensor_subclass`; load it with transformers and "
                "quantization_config=TorchAoConfig(...), or do not target this module)."
            )
        frozen = method.shared.frozen_params(spec) if method.shared else ()
        if method.layer_frozen is not None:
            frozen += tuple((n, layer_frozen_key(adapter_name, target.name, n)) for n in method.layer_frozen.of(spec))
        shapes = tuple((k, tuple(v)) for k, v in method_shapes(spec).items())
        plan[target.name] = PlanEntry(
            spec=spec,
            params=method.param_names(spec),
            frozen=frozen,
            shapes=shapes,
            applies_in=target.owner.name if target.owner is not None else None,
        )
    if method.shares is not None:
        in_order = [(t.name, s) for t in targets if (s := plan[t.name].spec) is not None]
        for path, borrowed in method.shares(resolved, in_order).items():
            read = {n for n, _ in borrowed}
            e = plan[path]
            plan[path] = dataclasses.replace(
                e,
                params=tuple(n for n in e.params if n not in read),
                shapes=tuple((n, shape) for n, shape in e.shapes if n not in read),
                borrowed=tuple(borrowed),
            )
    owners: dict[str, str] = {}  # module -> its innermost ParamWrapper path (where PEFT keeps the module's bias)
    for path, (module_name_, pname) in zip(parameter_paths(found), found):
        key = f"{module_name_}.{pname}"
        target = Target(key, modules[module_name_], LayerKind.PARAMETER, common, for_checkpoint=for_checkpoint)
        spec = parameter_spec(target, pname, resolved, method)
        shapes = tuple((k, tuple(v)) for k, v in method_shapes(spec).items())
        plan[path] = PlanEntry(spec=spec, params=method.param_names(spec), shapes=shapes, parameter=key)
        owners.setdefault(module_name_, path)
    if method.shared_trainable is not None and targets:  # one tree entry for them; every layer reads it
        owner = plan[targets[0].name].spec
        assert owner is not None
        own_shapes = tuple((k, tuple(v)) for k, v in shared_shapes(owner).items())
        shared_names = tuple(k for k, _ in own_shapes)
        plan.update({t.name: dataclasses.replace(plan[t.name], shared=shared_names) for t in targets})
        plan[SHARED_PATH] = PlanEntry(params=shared_names, owner=owner, shapes=own_shapes)
    _ties(model, resolved, method, plan, tied, common)
    _auxiliary(model, resolved, plan, revision, adapter_name, for_checkpoint)
    saved = find_modules_to_save(model, resolved, set(names) | {t.name for t in targets}, set(owners))
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


def _auxiliary(
    model: nn.Module, config: PeftConfig, plan: Plan, revision: str | None, adapter_name: str, for_checkpoint: bool
) -> None:
    """Add the entries of the config's auxiliary parts (`PeftConfig.auxiliary_configs`: LoRA's trainable tokens),
    each planned as its own method's adapter; a part that does not tie loses the ties its method would make."""
    for part in config.auxiliary_configs(model):
        _, sub = plan_adapter(model, part.config, revision, adapter_name, for_checkpoint=for_checkpoint)
        for path, entry in sub.items():
            taken = [t.path for t in entry.tied if t.path in plan] + ([path] if path in plan else [])
            if taken:
                what = plan.get(taken[0])
                how = what.spec.method if what is not None and what.spec is not None else "another auxiliary part"
                raise TypeError(
                    f"{type(config).__name__}: {taken[0]!r} would carry both this adapter's {how} and its auxiliary "
                    f"{type(part.config).__name__} part (PEFT: the auxiliary wrapper cannot be applied to an adapted "
                    "layer). Do not target that module with both."
                )
            tied = tuple(dataclasses.replace(t, saved=False) for t in entry.tied) if part.tie else ()
            plan[path] = dataclasses.replace(entry, tied=tied, key_part=part.key_part)


def _plan_input(
    model: nn.Module, config: PeftConfig, method: InputMethod, revision: str | None
) -> tuple[PeftConfig, Plan]:
    """An input-level adapter's plan: its `PROMPT_PATH` entry, and modules_to_save copies (SEQ_CLS's classifier)."""
    resolved, spec = method.plan(model, config)
    if revision is not None:
        resolved.revision = revision
    shapes = tuple(method.shapes(spec))
    plan: Plan = {PROMPT_PATH: PlanEntry(params=tuple(n for n, _ in shapes), shapes=shapes, prompt=(method.name, spec))}
    modules = dict(model.named_modules())
    for name in find_modules_to_save(model, resolved):
        own = tuple((n, tuple(p.shape)) for n, p in modules[name].named_parameters())
        plan[name] = PlanEntry(overrides=tuple(n for n, _ in own), shapes=own)
    return resolved, plan


def input_method(entry: PlanEntry) -> InputMethod:
    """The input-level method of a `PROMPT_PATH` entry."""
    assert entry.prompt is not None
    method = METHODS[entry.prompt[0]]
    assert isinstance(method, InputMethod)
    return method


def input_entry(plan: Plan) -> PlanEntry | None:
    """The plan's input-level (prompt learning) entry, None for a weight-level adapter."""
    entry = plan.get(PROMPT_PATH)
    return entry if entry is not None and entry.prompt is not None else None


def _module_targets(model: nn.Module, config: Any, found: list[tuple[str, str]]) -> list[str]:
    """The modules `target_modules` matches when `target_parameters` matched too (then none is fine: PEFT's rules).

    A module holding a targeted parameter cannot also be a LoRA layer (PEFT's ValueError).
    """
    targets, _ = match_targets(model, config)
    if config.target_modules and not targets:
        warnings.warn(
            f"target_modules={config.target_modules} were set but no module was matched.", RuntimeWarning, stacklevel=4
        )
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


def layer_dtype(weight: torch.Tensor, module: nn.Module | None = None) -> torch.dtype:
    """The dtype PEFT moves a layer's adapter to (`_get_base_layer_device_and_dtype`): the weight's, except a layer
    with a `compute_dtype` (bitsandbytes 4-bit, whose weight is packed uint8 data), whose compute dtype it is. A
    layer with neither `weight` nor `qweight` (HQQLinear: its packed `W_q`, returned as it is) gives PEFT no device,
    so it moves nothing: the adapter keeps its float32 draws (and VeRA's shared projections stay float32)."""
    if module is not None and all(getattr(module, n, None) is None for n in ("weight", "qweight")):
        return weight.dtype
    compute = getattr(module, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) else weight.dtype


def fresh_method_params(
    entry: PlanEntry,
    weight: torch.Tensor,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    data: Any = NO_INIT_DATA,
    module: nn.Module | None = None,
    shared: Params | None = None,
) -> WeightInit:
    """A layer's fresh method parameters on the weight's device (meta tensors for a meta-device weight), and its
    new base weight for inits that change it (`Method.init_from_weight`; None otherwise).

    data: the layer's entry of get_peft_model's `init_data` (CorDA's eigens, LoRA-GA's gradient, ...).
    module: the layer (a quantised layer's inits see its dequantised weight, e.g. DoRA's magnitude; `init_from_module`).
    shared: the layer's frozen shared tensors (`layer_shared`), for `finish_init`.
    """
    assert entry.spec is not None
    method = entry.method
    if weight.device.type == "meta":
        return WeightInit(
            {k: torch.empty(shape, device="meta", dtype=dtype) for k, shape in method_shapes(entry.spec).items()}
        )
    # PEFT moves a fresh adapter to its layer's dtype before upcasting fp16/bf16 ones to float32: round through it
    layer = layer_dtype(weight, module)
    via = layer if layer.is_floating_point else dtype
    drawn = method.init(entry.spec, generator)
    first = method.finish_init_first
    if method.finish_init is not None and first:  # on the float32 draws, before the round trip (DeFT's R)
        drawn = {k: v.to(weight.device) for k, v in drawn.items()}
        drawn = method.finish_init(entry.spec, drawn, _whole(weight.detach()), shared or {})
    fresh = {k: v.to(weight.device, via).to(dtype) for k, v in drawn.items()}
    if method.init_from_module is not None:  # an init reading the layer's weight and bias (AdaMSS)
        assert module is not None, "fresh_method_params: a method with init_from_module needs the module"
        fresh = method.init_from_module(entry.spec, fresh, module, generator)
    new_weight = None
    if method.init_from_weight is not None:  # PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ... (may replace the weight)
        done = method.init_from_weight(entry.spec, fresh, _whole(weight.detach()), data, generator)
        fresh, new_weight = done.params, done.weight
    if method.finish_init is not None and not first:  # init that needs the (new) base weight (DoRA's magnitude)
        final = weight if new_weight is None else new_weight
        if entry.spec.kind.module_level:  # packed data: the float weight it stands for (PEFT dequantises too)
            final = dequantize(_whole(final), module)  # an FSDP2 shard: gathered (the quant state is whole)
        fresh = method.finish_init(entry.spec, fresh, _whole(final.detach()), shared or {})
    return WeightInit(fresh, new_weight)


def method_shapes(spec: LayerSpec[Any]) -> dict[str, torch.Size]:
    """{param name: shape} of one layer's method parameters, from a meta-device init (no memory)."""
    method = weight_method(spec.method)
    with torch.device("meta"):
        params = method.init(spec, None)
        if method.finish_init is not None:
            params = method.finish_init(spec, params, torch.empty(spec.weight_shape), {})
    return {k: v.shape for k, v in params.items()}


def shared_shapes(owner: LayerSpec[Any]) -> dict[str, torch.Size]:
    """{name: shape} of the trainable tensors shared by the layers of `owner`'s method, from a meta-device draw."""
    draw = weight_method(owner.method).shared_trainable
    assert draw is not None
    with torch.device("meta"):
        return {k: v.shape for k, v in draw.init(owner, None).items()}


def init_adapter(
    model: nn.Module,
    plan: Plan,
    autocast_adapter_dtype: bool = True,
    generator: torch.Generator | None = None,
    trainable: bool = True,
    frozen_shared: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Params]:
    """A fresh adapter tree for `plan` (see `init_adapter_and_weights`; new base weights are dropped)."""
    return init_adapter_and_weights(
        model, plan, autocast_adapter_dtype, generator, trainable, frozen_shared=frozen_shared
    )[0]


def init_adapter_and_weights(
    model: nn.Module,
    plan: Plan,
    autocast_adapter_dtype: bool = True,
    generator: torch.Generator | None = None,
    trainable: bool = True,
    init_data: Mapping[str, Any] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    frozen_shared: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Params], dict[str, torch.Tensor]]:
    """A fresh adapter tree for `plan`, and `{module path: new base weight}` for layers whose init changes it.

    Method params come from their init, overrides are cloned from the model. Each leaf is a new leaf tensor
    with requires_grad=`trainable` (False for a config with inference_mode=True, like PEFT; trainable biases
    stay trainable, as in PEFT), on its layer's device; fp16/bf16 method params are float32 when
    `autocast_adapter_dtype` (PEFT's rule). On a meta-device model leaves are meta tensors.
    init_data: `{module path: data}` for inits that need it (funcpeft.corda, funcpeft.loraga); weights:
    `{module path: base weight}` to initialise from instead of the model's (a `base` already changed by an
    earlier adapter's init, as PEFT's second adapter sees it). frozen_shared: the adapter's frozen shared tensors
    (`shared_tensors`, or the `base` holding them) that `finish_init` reads; None: made here from `plan`, which must
    then be the whole adapter's (`SharedTensors.from_layers` reads every layer).
    """
    if init_data is not None:
        unknown = sorted(set(init_data) - {p for p, e in plan.items() if e.spec is not None})
        if unknown:
            raise ValueError(
                f"init_data has entries for modules this adapter does not adapt: {unknown[:5]} (adapted: "
                f"{sorted(p for p, e in plan.items() if e.spec is not None)[:5]}...); was it computed for another "
                "config or model?"
            )
    if frozen_shared is None and any(e.spec is not None and _reads_shared(e.method) for e in plan.values()):
        frozen_shared = shared_tensors(model, plan, autocast_adapter_dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    tree: dict[str, Params] = {}
    changed: dict[str, torch.Tensor] = {}
    shared: Params | None = None  # the shared trainable tensors (VB-LoRA's bank), drawn in PEFT's order
    for path, entry in plan.items():
        out: Params = {}
        if entry.prompt is not None:  # an input-level adapter's parameters (PEFT keeps them float32)
            method, spec = input_method(entry), entry.prompt[1]
            device = next(iter(params.values())).device if params else torch.device("cpu")
            if device.type == "meta":
                out.update({k: torch.empty(s, device="meta") for k, s in entry.shapes})
            else:
                out.update({k: v.to(device, torch.float32) for k, v in method.init(spec, model, generator).items()})
        if entry.spec is not None:
            w: torch.Tensor = params[entry.weight_key(path)]
            w = weights.get(path, w) if weights is not None else w
            data = init_data.get(path, NO_INIT_DATA) if init_data is not None else NO_INIT_DATA
            module = (
                model.get_submodule(path) if entry.spec.kind.module_level or entry.method.init_from_module else None
            )
            dtype = adapter_dtype(layer_dtype(w, module), autocast_adapter_dtype and entry.method.autocast)
            draw = entry.method.shared_trainable
            if entry.shared and draw is not None and (shared is None or draw.per_layer_draw):
                shared = _fresh(draw.init, entry.spec, w, generator, dtype)
            own = layer_shared(entry.spec, frozen_shared) if frozen_shared is not None else {}
            done = fresh_method_params(entry, w, generator, dtype, data, module, own)
            borrowed = {n for n, _ in entry.borrowed}  # drawn as PEFT draws them, then read from their holder
            out.update({k: v for k, v in done.params.items() if k not in borrowed})
            if done.weight is not None:
                changed[path] = done.weight
        for pname in entry.overrides:
            out[pname] = _whole(params[entry.base_key(path, pname)].detach()).clone()
        # PEFT trains `bias` in place on the base layer, so inference_mode does not freeze it
        # PEFT's inference mode freezes the base model's adapter layers, never a prompt encoder (it counts as trainable),
        # except the parameters the encoder freezes itself (InputMethod.frozen)
        keep = trainable or entry.prompt is not None
        frozen = input_method(entry).frozen(entry.prompt[1]) if entry.prompt is not None else frozenset()
        tree[path] = {k: v.requires_grad_((keep and k not in frozen) or k in entry.in_place) for k, v in out.items()}
    owner = plan[SHARED_PATH].owner if SHARED_PATH in plan else None
    if owner is not None:
        if shared is None:  # a plan holding only the shared entry (a partial re-init): CPU float32
            draw = weight_method(owner.method).shared_trainable
            assert draw is not None
            shared = _fresh(draw.init, owner, torch.empty(()), generator, torch.float32)
        tree[SHARED_PATH] = {k: v.requires_grad_(trainable) for k, v in shared.items()}
    return tree, changed


def _fresh(
    init: Any, spec: LayerSpec[Any], weight: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype
) -> Params:
    """`init(spec, generator)` on the weight's device in `dtype` (meta tensors, and no draw, for a meta weight)."""
    if weight.device.type == "meta":
        with torch.device("meta"):
            return {k: v.to(dtype) for k, v in init(spec, None).items()}
    return {k: v.to(weight.device, dtype) for k, v in init(spec, generator).items()}


def _reads_shared(method: Method) -> bool:
    """The method's per-layer init hooks read its frozen shared tensors (`FinishInitFn`'s `shared`)."""
    return method.shared is not None and method.finish_init is not None


def layer_shared(spec: LayerSpec[Any], shared: Mapping[str, torch.Tensor]) -> Params:
    """{param name: Tensor}: the frozen shared tensors layer `spec` reads (`SharedTensors.frozen_params`), from
    `shared` (`shared_tensors`' result or a `base`); empty for a method without them."""
    hook = weight_method(spec.method).shared
    return {} if hook is None else {name: shared[key] for name, key in hook.frozen_params(spec)}


def shared_tensors(model: nn.Module, plan: Plan, autocast_adapter_dtype: bool = True) -> dict[str, torch.Tensor]:
    """The plan's frozen tensors its layers read in common (VeRA's projections, FourierFT's indices, FRoD's bases),
    as extra `base` entries: `SharedTensors.from_layers` once with all of a method's layers, or `SharedTensors.make`
    for each layer whose keys are not made yet, on its device. Made before any layer's own init, which reads them.

    Keys start with `funcpeft._trees.SHARED_PREFIX`. Empty for methods without shared tensors.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, tuple[LayerSpec[Any], nn.Module]]] = {}  # method -> its layers, for from_layers
    for path, entry in plan.items():
        if entry.spec is not None and entry.method.shared is not None and entry.method.shared.from_layers is not None:
            layers.setdefault(entry.spec.method, {})[path] = (entry.spec, modules[path])
    for name, own in layers.items():
        hook = weight_method(name).shared
        assert hook is not None and hook.from_layers is not None
        out.update(hook.from_layers(own))
    upcast: set[str] = set()  # `SharedTensors.layer_dtype` keys: autocast_adapter_dtype applies after all layers
    for path, entry in plan.items():
        if entry.spec is None or entry.method.shared is None:
            continue
        hook = entry.method.shared
        shared_keys = [k for _, k in hook.frozen_params(entry.spec)]
        weight = params[entry.weight_key(path)]
        if hook.make is not None and not all(k in out for k in shared_keys):
            out.update({k: v.to(weight.device) for k, v in hook.make(entry.spec).items() if k not in out})
        # a 4-bit layer's packed weight is uint8: PEFT moves to its compute dtype (`layer_dtype`)
        dtype = layer_dtype(weight, modules[path] if entry.spec.kind.module_level else None)
        if hook.layer_dtype and dtype.is_floating_point:
            # PEFT: every layer moves the shared BufferDict entries to its weight's dtype, in module order
            floating = [k for k in shared_keys if out[k].is_floating_point()]
            out.update({k: out[k].to(dtype) for k in floating})
            upcast.update(floating)
    out.update({k: out[k].to(adapter_dtype(out[k].dtype, autocast_adapter_dtype)) for k in upcast})
    assert all(k.startswith(SHARED_PREFIX) for k in out), sorted(out)
    return out


def init_shared(
    model: nn.Module,
    plan: Plan,
    generator: torch.Generator | None = None,
    autocast_adapter_dtype: bool = True,
    shared: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The plan's frozen tensors, as extra `base` entries: those its layers read in common (`shared_tensors`;
    `shared`: already made) and each layer's own (`Method.layer_frozen`: SHiRA's mask indices, MiCA's lora_B, FRoD's
    U, on its weight's device, given the layer's shared ones; random ones, VeLoRA's projection, draw from
    `generator`; `LayerFrozen.autocast` ones follow `autocast_adapter_dtype`).

    Keys start with `funcpeft._trees.SHARED_PREFIX`. Empty for methods without frozen tensors.
    """
    modules = dict(model.named_modules())
    out = dict(shared_tensors(model, plan, autocast_adapter_dtype) if shared is None else shared)
    for path, entry in plan.items():
        if entry.spec is None or entry.method.layer_frozen is None:
            continue
        frozen = entry.method.layer_frozen
        made = frozen.make(entry.spec, modules[path], generator, layer_shared(entry.spec, out))
        if frozen.autocast:
            made = {k: v.to(adapter_dtype(v.dtype, autocast_adapter_dtype)) for k, v in made.items()}
        keys = dict(entry.frozen)
        out.update({keys[n]: made[n] for n in frozen.of(entry.spec)})
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
    names = (*entry.params, *entry.shared, *(n for n, _ in entry.borrowed))
    return {**{k: leaves[k] for k in names}, **shared_params(entry, base)}


def with_shared(tree: Mapping[str, Mapping[str, Any]], path: str, entry: PlanEntry) -> dict[str, Any]:
    """Adapter tree entry `path` plus the shared trainable tensors its layer reads (`PlanEntry.shared`, and
    `PlanEntry.borrowed` from other layers' entries)."""
    return {
        **tree[path],
        **{k: tree[SHARED_PATH][k] for k in entry.shared},
        **{k: tree[source][k] for k, source in entry.borrowed},
    }


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
            raise ValueError(
                f"adapter {adapter_name!r}: {path!r} should be a dict with keys {sorted(want)}, got {_describe(entry)}"
            )
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
    tree: Mapping[str, Mapping[str, Any]],
    shapes: LeafShapes,
    devices: Mapping[str, torch.device],
    adapter_name: str,
    lead: tuple[int, ...] = (),
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
