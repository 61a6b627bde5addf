"""The user facade: `get_peft_model`, `from_pretrained` and what they return, `FunctionalPeftModel`.

    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=8, target_modules="all-linear"))
    fn, base, adapter = pm              # fn(base, adapter, **inputs) is pure; `model` is never mutated

This is the top layer: it wires planning (funcpeft._plan), the pure call (funcpeft._functional), files
(funcpeft.io) and merging (funcpeft.merge) together; nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._config import PeftConfig
from ._constants import MIXED_COMPATIBLE_TYPES
from ._conversion import convert_mutated_init
from ._counting import count_parameters, format_trainable
from ._decode import generate
from ._fsdp import reshard
from ._functional import PeftFunction
from ._loading import load_for_model
from ._merge import merge_and_unload
from ._names import Names
from ._plan import (
    Plan,
    check_adapter_name,
    init_adapter,
    init_adapter_and_weights,
    init_shared,
    plan_adapter,
    shared_tensors,
)
from ._quant import base_tensor
from ._replicate import prepared
from ._trees import AdapterTree, BaseTree, tree_numel
from .io import save_adapter
from .methods import method_for
from .methods._registry import MODEL_LEVEL
from .methods.lora import LoraHyper
from .methods.lora_init import changes_base


@dataclasses.dataclass(repr=False)
class FunctionalPeftModel:
    """What `get_peft_model` returns. Unpacks to `(fn, base, adapter)`.

    fn: `PeftFunction`, pure `fn(base, adapter, *args, **kwargs)`.
    base: `{param_name: Tensor}`, the model's parameters (detached, shared storage, requires_grad=False), plus
      frozen method tensors under reserved keys (shared projections, per-layer buffers; see funcpeft._trees).
    adapter: the trainable tree of `adapter_name` (see funcpeft._trees).
    peft_config: `{adapter_name: resolved config}`, like PEFT's `PeftModel.peft_config`.
    model: the module tree the adapters are planned on: the user's model, or with `layer_replication` its
      replicated copy (sharing the model's tensors; funcpeft._replicate).
    """

    fn: PeftFunction
    base: BaseTree
    adapter: AdapterTree
    peft_config: dict[str, PeftConfig]
    adapter_name: str
    model: nn.Module
    autocast_adapter_dtype: bool = True
    mixed: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.fn, self.base, self.adapter))

    def __repr__(self) -> str:
        configs = ", ".join(f"{n!r}: {type(c).__name__}" for n, c in self.peft_config.items())
        layers = sum(e.spec is not None or e.copied_by is not None for e in self.plans[self.adapter_name].values())
        return (
            f"FunctionalPeftModel({type(self.model).__name__}, adapters={{{configs}}}, active={self.adapter_name!r}, "
            f"{layers} adapted layers, {tree_numel(self.adapter):,} adapter values, {len(self.base)} base tensors"
            + (", mixed=True" if self.mixed else "")
            + ")"
        )

    @property
    def plans(self) -> dict[str, Plan]:
        return self.fn.plans

    def init_adapter(self, adapter_name: str | None = None, generator: torch.Generator | None = None) -> AdapterTree:
        """A freshly initialised tree for a registered adapter (e.g. K of them for an ensemble)."""
        name = adapter_name or self.adapter_name
        trainable = not getattr(self.peft_config[name], "inference_mode", False)
        return init_adapter(self.model, self.plans[name], self.autocast_adapter_dtype, generator, trainable)

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        generator: torch.Generator | None = None,
        *,
        init_data: Mapping[str, Any] | None = None,
    ) -> AdapterTree:
        """Register another adapter (PEFT's `add_adapter`) and return its fresh tree.

        An init that changes base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) reads them from `self.base` (as
        PEFT's second adapter sees the first one's changes) and replaces them in `self.base` (new tensors).
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; registered: {sorted(self.peft_config)}")
        _check_combinable(peft_config, self.peft_config[self.adapter_name], self.mixed)
        _check_no_second_replication(peft_config)
        peft_config.check_new_adapter_config(self.peft_config)
        _check_same_parameters(peft_config, self.peft_config)
        resolved, plan = plan_adapter(self.model, peft_config, None, adapter_name)
        _check_parameter_layers(plan, self.plans)
        _check_nesting(plan, self.plans)
        names = Names(self.fn.aliases)
        weights = {p: names.read(self.base, e.weight_key(p)) for p, e in plan.items() if e.spec is not None}
        trainable = not getattr(resolved, "inference_mode", False)
        shared = shared_tensors(self.model, plan, self.autocast_adapter_dtype)  # the layers' inits read them
        tree, changed = init_adapter_and_weights(
            self.model, plan, self.autocast_adapter_dtype, generator, trainable, init_data, weights, shared
        )
        # after the params: a random frozen tensor (VeLoRA's projection) is drawn after them, as in PEFT
        self.base.update(init_shared(self.model, plan, generator, self.autocast_adapter_dtype, shared))
        _write_weights(self.base, names, changed, plan)
        self.peft_config[adapter_name] = resolved
        self.plans[adapter_name] = plan
        return tree

    def load_adapter(
        self,
        directory: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        *,
        init_data: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> AdapterTree:
        """PEFT's `PeftModel.load_adapter`: register the adapter saved in `directory` as `adapter_name` and return
        its tree; its per-layer frozen tensors (e.g. VeLoRA's projection) go into `base`, like PEFT's layers hold them.

        Like PEFT (its load_adapter runs `add_adapter` with the saved config before loading the file) and like
        `from_pretrained`, a base-changing `init_lora_weights` ("pissa", "olora", "loftq", "corda" with
        `init_data`, ...) runs again on the current `self.base` weights and replaces them in `self.base`.

        kwargs: `autocast_adapter_dtype`, `strict`, `allow_pickle` (see funcpeft.load_adapter).
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; registered: {sorted(self.peft_config)}")
        loaded = load_for_model(
            self.model, directory, adapter_name, is_trainable=is_trainable, root_fallback=True, **kwargs
        )
        _check_combinable(loaded.config, self.peft_config[self.adapter_name], self.mixed)
        _check_no_second_replication(loaded.config)
        loaded.config.check_new_adapter_config(self.peft_config)
        _check_same_parameters(loaded.config, self.peft_config)
        _check_parameter_layers(loaded.plan, self.plans)
        _check_nesting(loaded.plan, self.plans)
        params = dict(self.model.named_parameters())
        redo = _base_changing(loaded.plan)
        if redo:  # on the current base, as PEFT's second adapter sees the first one's changes
            names = Names(self.fn.aliases)
            weights = {p: names.read(self.base, e.weight_key(p)) for p, e in redo.items()}
            data = {p: None for p in redo} if init_data is None else init_data
            _, changed = init_adapter_and_weights(
                self.model, redo, self.autocast_adapter_dtype, None, False, data, weights
            )
            _write_weights(self.base, names, changed, redo)
        self.base.update({n: t for n, t in loaded.base.items() if n not in params})
        self.peft_config[adapter_name] = loaded.config
        self.plans[adapter_name] = loaded.plan
        return loaded.tree

    def lora_scalings(self, adapter_name: str | None = None) -> dict[str, float]:
        """{module path: LoRA scaling (alpha / r, or alpha / sqrt(r) with rsLoRA)} of a LoRA / DoRA adapter's layers:
        PEFT's per-layer `module.scaling[adapter]`, as `funcpeft.optim.lorafa` needs it."""
        plan = self.plans[adapter_name or self.adapter_name]
        return {
            p: e.spec.hyper.scaling
            for p, e in plan.items()
            if e.spec is not None and isinstance(e.spec.hyper, LoraHyper)
        }

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

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        adapter_params: Any = None,
        *,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Write PEFT's on-disk format for `adapter_params` (the trained tree; see funcpeft.io.save_adapter), or for
        each adapter of `{adapter_name: tree, ...}` (PEFT saves every adapter: non-default ones in subdirectories).

        path_initial_model_for_weight_conversion: the directory where the adapter was saved right after
        get_peft_model (before training) under PiSSA / OLoRA / CorDA / LoRA-GA, which change the base weights:
        the adapter is then saved as a plain LoRA adapter of the original weights (rank 2r; see
        funcpeft._conversion), and that directory's config gets init_lora_weights=True, as in PEFT. One adapter per
        call: its tree, or `{name: tree}` for another registered adapter (PEFT's `selected_adapters=[name]`);
        several are refused (PEFT subtracts the one initial adapter from each).
        """
        if adapter_params is None:
            raise TypeError(
                "save_pretrained(directory, adapter_params): pass the trained tree to save. funcpeft never updates "
                "pm.adapter, which is the tree get_peft_model initialised: saving it after training would silently "
                "write the untrained adapter."
            )
        named = self.fn.split_adapters(adapter_params)
        if path_initial_model_for_weight_conversion is not None:
            if len(named) != 1:
                raise NotImplementedError(
                    "save_pretrained(path_initial_model_for_weight_conversion=...) with several adapters "
                    f"{[n for n, _ in named]}: the directory holds ONE adapter as initialised, and PEFT subtracts that "
                    "same initial adapter from every adapter it saves (right only for the adapter trained from it; "
                    "another one is silently wrong, or a KeyError when it adapts other layers). Convert one adapter "
                    "per call: pass {name: tree} of the adapter that directory belongs to (PEFT's "
                    "selected_adapters=[name]), and save the others without conversion."
                )
            name, tree = named[0]
            self.fn.check_tree(name, tree, self.base)
            converted, plain = convert_mutated_init(
                tree, self.peft_config[name], path_initial_model_for_weight_conversion, self.model
            )
            return save_adapter(directory, converted, plain, name, model=self.model, base_params=self.base, **kwargs)
        if len(named) != 1 or named[0][0] != self.adapter_name:  # {name: tree, ...}: PEFT saves each adapter
            for name, tree in named:
                self.save_pretrained_adapter(directory, name, tree, **kwargs)
            return os.fspath(directory)
        return self.save_pretrained_adapter(directory, self.adapter_name, adapter_params, **kwargs)

    def save_pretrained_adapter(
        self, directory: str | os.PathLike[str], adapter_name: str, tree: Any, **kwargs: Any
    ) -> str:
        """Write registered adapter `adapter_name`'s `tree` (PEFT's layout: `directory/<adapter_name>` unless default)."""
        kwargs = {"model": self.model, "base_params": self.base, "plan": self.plans[adapter_name], **kwargs}
        return save_adapter(directory, tree, self.peft_config[adapter_name], adapter_name, **kwargs)

    def generate(self, base: BaseTree, adapter: Any, **kwargs: Any) -> Any:
        """PEFT's `peft_model.generate(...)` with `adapter` applied (see `funcpeft.generate`; `rng=` for sampling)."""
        return generate(self, base, adapter, **kwargs)

    def merge_and_unload(self, adapter_params: Any) -> nn.Module:
        """A new plain model with `adapter_params` merged in (see funcpeft.merge); the original model is untouched."""
        return merge_and_unload(self, adapter_params)


def _reject_peft_model(model: nn.Module) -> None:
    """A `peft.PeftModel` (or a model holding PEFT tuner layers) would get adapters on PEFT's own lora_A layers."""
    cls = type(model)
    if cls.__module__.startswith("peft.") or any(type(m).__module__.startswith("peft.tuners") for m in model.modules()):
        raise TypeError(
            f"get_peft_model got a PEFT-wrapped model ({cls.__module__}.{cls.__name__}): funcpeft adapts plain models "
            "and would target PEFT's own adapter layers. Pass the base model instead (PEFT: `peft_model.get_base_model()` "
            "after `unload()`), and load PEFT adapters with funcpeft.from_pretrained(model, directory)."
        )


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    *,
    generator: torch.Generator | None = None,
    init_data: Mapping[str, Any] | None = None,
) -> FunctionalPeftModel:
    """PEFT's `get_peft_model`, functionally: returns `(fn, base, adapter)` (as a FunctionalPeftModel).

    Args:
        model: the base model (any nn.Module; transformers models get PEFT's per-model defaults). Never mutated
            (one FSDP2 exception: a sharded unit whose parameters a forward left gathered is resharded first,
            `FSDPModule.reshard()`, as FSDP itself does after a unit; docs/distributed.md).
        peft_config: a funcpeft config (`LoraConfig`, `IA3Config`, ...); never mutated (the resolved copy is in
            `pm.peft_config[adapter_name]`).
        adapter_name: the adapter's name (a directory name in saved files).
        mixed: PEFT's PeftMixedModel: `add_adapter` accepts other adapter types (LoRA/DoRA, LoHa, LoKr, ...:
            PEFT's compatible types), and `fn(base, {name: tree, ...})` applies the adapters in the order they
            were added, whatever the dict's order, each wrapping the layer below it. Without `mixed`, adapters
            are applied in the dict's order (PEFT's `set_adapter([...])` order) and must share one peft_type.
        autocast_adapter_dtype: fp16/bf16 layers get float32 adapter leaves (PEFT's default).
        revision: recorded in the config, like PEFT.
        generator: a `torch.Generator` for the adapter init (default: the global RNG, so `torch.manual_seed`
            makes it reproducible, with the same draws as PEFT).
        init_data: `{module path: data}` for data-driven inits: CorDA's eigens (`funcpeft.corda.preprocess_corda`),
            LoRA-GA's gradients (`funcpeft.loraga.preprocess_loraga`). PEFT attaches these to the modules instead.

    Returns:
        A `FunctionalPeftModel`; `fn, base, adapter = pm`. base: `{name: Tensor}` sharing the model's storage;
        adapter: `{module_path: {leaf name: Tensor}}`, e.g. lora_A (r, in) and lora_B (out, r) per layer.
        Inits that change base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: PEFT writes them into the model) put
        new tensors into `base` under those weights' names; the model and its tensors are untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a funcpeft config (e.g. funcpeft.LoraConfig), got {type(peft_config).__module__}."
            f"{type(peft_config).__name__}"
        )
    _reject_peft_model(model)
    check_adapter_name(adapter_name)
    level = MODEL_LEVEL.get(peft_config.type_name())
    if level is not None:  # a model-level method (X-LoRA): its own facade
        extra = {"mixed": mixed, "revision": revision, "init_data": init_data}
        rest = {k: v for k, v in extra.items() if v}
        return level[0](model, peft_config, adapter_name, autocast_adapter_dtype, generator, **rest)  # type: ignore[no-any-return]
    reshard(model)  # an FSDP2-sharded model: capture its shards, not the weights a forward left gathered
    if mixed:
        _check_combinable(peft_config, None, mixed)
    model = prepared(model, peft_config)  # layer_replication: a replicated structure sharing the model's tensors
    resolved, plan = plan_adapter(model, peft_config, revision, adapter_name)
    trainable = not getattr(resolved, "inference_mode", False)
    shared = shared_tensors(model, plan, autocast_adapter_dtype)  # made first: the layers' inits read them
    adapter, changed = init_adapter_and_weights(
        model, plan, autocast_adapter_dtype, generator, trainable, init_data, frozen_shared=shared
    )
    base = {n: base_tensor(p) for n, p in model.named_parameters()}
    base.update(init_shared(model, plan, generator, autocast_adapter_dtype, shared))
    fn = PeftFunction(model, {adapter_name: plan}, adapter_name, mixed=mixed, layer_replication=_layer_map(resolved))
    _write_weights(base, Names(fn.aliases), changed, plan)
    return FunctionalPeftModel(
        fn, base, adapter, {adapter_name: resolved}, adapter_name, model, autocast_adapter_dtype, mixed
    )


def _write_weights(
    base: dict[str, torch.Tensor], names: Names, changed: Mapping[str, torch.Tensor], plan: Plan
) -> None:
    """New base weights from an init, written like PEFT's `weight.data = ...` (tied names see them too)."""
    for path, weight in changed.items():
        names.write_shared(base, plan[path].weight_key(path), weight)


def _base_changing(plan: Plan) -> Plan:
    """The layers whose init changes the base weight (PiSSA, OLoRA, LoftQ, CorDA, ...): PEFT runs it again on load."""
    return {
        p: e
        for p, e in plan.items()
        if e.spec is not None and e.method.init_from_weight is not None and changes_base(e.spec)
    }


def _layer_map(config: PeftConfig) -> list[list[int]] | None:
    return getattr(config, "layer_replication", None)


def _check_no_second_replication(config: PeftConfig) -> None:
    if _layer_map(config):
        raise NotImplementedError(
            f"{type(config).__name__}.layer_replication on an added adapter: PEFT replicates the already replicated "
            "layers again (cloning the first adapter's layers with them); funcpeft plans layer replication once, with "
            "the first adapter (get_peft_model / from_pretrained). Give the added adapter layer_replication=None."
        )


def _check_combinable(config: PeftConfig, first: PeftConfig | None, mixed: bool) -> None:
    """PEFT's rules: one peft_type per PeftModel; PeftMixedModel only takes its compatible types."""
    peft_type = config.type_name()
    if mixed:
        if not method_for(config).mixed_compatible:
            raise ValueError(
                f"The provided `peft_type` '{peft_type}' is not compatible with the `PeftMixedModel`. "
                f"Compatible types are: {MIXED_COMPATIBLE_TYPES}"
            )
    elif first is not None and peft_type != first.type_name():
        raise ValueError(
            f"Cannot combine adapters with different peft types. Found {first.type_name()} and {peft_type}. "
            "Pass mixed=True to get_peft_model to mix adapter types."
        )


def _check_same_parameters(config: PeftConfig, others: dict[str, PeftConfig]) -> None:
    """PEFT's `LoraModel._check_new_adapter_config`: adapters with target_parameters all target the same set
    (PEFT encodes which parameter a LoRA belongs to by its ParamWrapper's nesting, shared by all adapters)."""
    wanted = getattr(config, "target_parameters", None)
    if not wanted:
        return
    for name, other in others.items():
        theirs = getattr(other, "target_parameters", None)
        if theirs and set(theirs) != set(wanted):
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {sorted(wanted)} for the new adapter and {sorted(theirs)} for adapter '{name}'."
            )


def _check_parameter_layers(plan: Plan, plans: dict[str, Plan]) -> None:
    """A module cannot be a LoRA layer for one adapter and hold a targeted bare parameter for another."""
    layers = {path for p in plans.values() for path, e in p.items() if e.spec is not None and e.parameter is None}
    owners = {e.module(path): e.parameter for p in plans.values() for path, e in p.items() if e.parameter is not None}
    for path, entry in plan.items():
        if entry.parameter is not None and entry.module(path) in layers:
            module = entry.module(path)
            raise ValueError(
                f"Trying to wrap an `nn.Parameter` of layer '{module}', which another adapter adapts as a layer "
                "(`target_modules`): not a valid target. Make sure that this layer is not also targeted with "
                "`target_modules`."
            )
        if entry.spec is not None and entry.parameter is None and path in owners:
            raise NotImplementedError(
                f"{path!r} holds {owners[path]!r}, which another adapter targets with `target_parameters`; PEFT would "
                "add this adapter to that parameter's wrapper instead of the layer. Target the layer in neither or "
                "both adapters the same way."
            )


def _check_nesting(plan: Plan, plans: dict[str, Plan]) -> None:
    """A method that cannot wrap another method's layer (`Method.nests`, PEFT's SHiRA) must be added first there."""
    for path, entry in plan.items():
        if entry.spec is None or entry.method.nests:
            continue
        below = [
            (n, p[path].method.peft_type)
            for n, p in plans.items()
            if (e := p.get(path)) is not None and e.spec is not None and e.method.peft_type != entry.method.peft_type
        ]
        if below:
            raise ValueError(
                f"{entry.method.peft_type} does not support nested base layers: {path!r} is already adapted by "
                f"{below} (PEFT's rule); add the {entry.method.peft_type} adapter before the others on that layer"
            )


def from_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    autocast_adapter_dtype: bool = True,
    strict: bool = True,
    allow_pickle: bool = False,
    init_data: Mapping[str, Any] | None = None,
    **model_level: Any,
) -> FunctionalPeftModel:
    """PEFT's `PeftModel.from_pretrained`, functionally: a `FunctionalPeftModel` holding the loaded adapter.

    Like PEFT, loading runs the config's `init_lora_weights` on the base weights: an adapter saved with
    "pissa", "olora" or "loftq" gets `base` = the residual / quantised weights of `model` (PEFT's advice: save
    such adapters converted, see `save_pretrained(path_initial_model_for_weight_conversion=...)`, or with
    init_lora_weights=True and the residual model); "corda" needs `init_data` (preprocess_corda's result,
    PEFT raises without it); "lora_ga" without `init_data` leaves the weights as they are (PEFT's fallback).

    Base-model tensors the checkpoint carries (PEFT saves the embedding when an embedding is targeted) replace
    the model's in the returned `base` dict when they differ; the model itself is never modified. Shapes the
    config implies are checked against the file and a sane rank limit before anything is allocated (see
    `funcpeft._loading.check_sizes`); a config that is not the one its weights were saved with raises
    `funcpeft.io.InterruptedSaveError`.

    Args:
        model: the base model (never modified).
        directory: a local directory in PEFT's layout.
        adapter_name: the adapter in `directory/<adapter_name>/` if there is one (PEFT's save layout), else the
            one in `directory` itself, given that name (PEFT's `from_pretrained(model, path, adapter_name=...)`).
        is_trainable: leaves require grad (and the config's inference_mode is False); as in PEFT, biases
            trained in place (bias="lora_only"/"all") require grad either way.
        autocast_adapter_dtype, strict, allow_pickle: as in `funcpeft.load_adapter`.
        init_data: per-layer data for inits that need it on load (CorDA).

        model_level: the arguments of a model-level method's load (X-LoRA's `adapters`, see funcpeft._xlora).

    Returns:
        A `FunctionalPeftModel` (`fn, base, adapter = pm`) holding the loaded adapter (a model-level method's own
        model for its saves: X-LoRA's XLoraModel).
    """
    _reject_peft_model(model)
    load = _model_level_loader(directory, adapter_name)
    if load is not None:
        kw = {"autocast_adapter_dtype": autocast_adapter_dtype, "strict": strict, **model_level}
        return load(model, directory, adapter_name, is_trainable, **kw)  # type: ignore[no-any-return]
    if model_level:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {sorted(model_level)}")
    reshard(model)  # an FSDP2-sharded model: capture its shards, not the weights a forward left gathered
    loaded = load_for_model(
        model,
        directory,
        adapter_name,
        is_trainable=is_trainable,
        autocast_adapter_dtype=autocast_adapter_dtype,
        strict=strict,
        allow_pickle=allow_pickle,
        root_fallback=True,
    )
    model = loaded.model  # the replicated structure with layer_replication
    base = {n: base_tensor(p) for n, p in model.named_parameters()}
    fn = PeftFunction(model, {adapter_name: loaded.plan}, adapter_name, layer_replication=_layer_map(loaded.config))
    # PEFT creates the layers with the config's init before loading the file: base-changing inits apply again
    # (None for every layer: no data, PEFT's loading fallback where there is one)
    # (only those layers: the others' random draws would be thrown away)
    redo = _base_changing(loaded.plan)
    if redo:
        data = {p: None for p in redo} if init_data is None else init_data
        _, changed = init_adapter_and_weights(model, redo, autocast_adapter_dtype, None, False, data)
        _write_weights(base, Names(fn.aliases), changed, redo)
    base.update({n: t for n, t in loaded.base.items() if n not in base or not torch.equal(t, base[n])})
    return FunctionalPeftModel(
        fn, base, loaded.tree, {adapter_name: loaded.config}, adapter_name, model, autocast_adapter_dtype
    )


def _model_level_loader(directory: str | os.PathLike[str], adapter_name: str) -> Any:
    """The load of a model-level method (`MODEL_LEVEL`) if `directory` holds one of its saves, else None."""
    for d in (os.path.join(os.fspath(directory), adapter_name), os.fspath(directory)):
        path = os.path.join(d, "adapter_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    peft_type = json.load(f).get("peft_type")
            except (OSError, ValueError, AttributeError):
                return None  # the regular loading reports the broken file
            return MODEL_LEVEL.get(peft_type, (None, None))[1]
    return None


__all__ = ["FunctionalPeftModel", "from_pretrained", "get_peft_model"]
