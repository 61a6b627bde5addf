"""Comparing funcpeft with `peft` (a test dependency, imported when used): PEFT's parameter names, copies, asserts."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import configs
from .._keys import peft_path
from .._model import get_peft_model
from .._plan import PlanEntry, check_adapter_structure
from ..methods.base import LayerKind
from ._asserts import random_like


def peft_param_name(
    path: str, key: str, plan_entry: PlanEntry, adapter_name: str = "default", wrapped: Any = ()
) -> str:
    """The in-memory parameter name in a `peft` PeftModel for adapter leaf `adapter[path][key]`.

    lora_A/B -> `...{path}.lora_A.{name}.weight`; lora_embedding_A/B -> `...{path}.lora_embedding_A.{name}`
    (likewise ia3_l, hada_*, lokr_*, vera_lambda_*: a method's `peft_unsuffixed`); lora_B_bias ->
    `...{path}.lora_B.{name}.bias` (a method's `renamed`); modules_to_save copies ->
    `...{path}.modules_to_save.{name}.{key}`; a trainable bias -> `...{path}.base_layer.bias` on an adapted layer,
    else `...{path}.bias`. wrapped: the adapted module paths (a module inside one lies under its `base_layer`).
    """
    prefix = f"base_model.model.{peft_path(path, wrapped)}"
    if plan_entry.spec is not None and plan_entry.spec.kind is LayerKind.MODULE:
        return f"{prefix}.{key}"  # PEFT's module wrappers (AdaptedAttention) hold one adapter's parameters bare
    renamed = dict(plan_entry.method.keys.renamed) if plan_entry.spec is not None else {}
    if plan_entry.key_part is not None:  # an auxiliary part's layer, inside PEFT's wrapper
        prefix = f"{prefix}.{plan_entry.key_part}"
    if key in renamed:
        module, _, leaf = renamed[key].rpartition(".")
        return f"{prefix}.{module}.{adapter_name}.{leaf}"
    if key in plan_entry.params:
        # parameters PEFT saves without `.weight` are nn.Parameter / ParameterDict entries in memory too, except
        # DoRA's magnitude, which is a module's weight in memory (PEFT strips `.weight` only in its files)
        part, _, index = key.partition(".")
        if part in plan_entry.method.keys.indexed:  # a ModuleList part: `{part}.{name}.{i}.weight` (PEANuT)
            return f"{prefix}.{part}.{adapter_name}.{index}.weight"
        if key in plan_entry.method.keys.unsuffixed:
            return f"{prefix}.{key}.{adapter_name}" + (".weight" if key == "lora_magnitude_vector" else "")
        return f"{prefix}.{key}.{adapter_name}.weight"
    if key in plan_entry.in_place:
        return f"{prefix}.base_layer.{key}" if plan_entry.spec is not None else f"{prefix}.{key}"
    return f"{prefix}.modules_to_save.{adapter_name}.{key}"


def copy_into_peft(
    peft_model: nn.Module, adapter: Any, plan: Mapping[str, PlanEntry], adapter_name: str = "default"
) -> None:
    """Copy funcpeft adapter values into a `peft` model's parameters (test helper; mutates peft_model)."""
    named = dict(peft_model.named_parameters())
    wrapped = {p for p, e in plan.items() if e.spec is not None}
    with torch.no_grad():
        for path, entry in adapter.items():
            for key, value in entry.items():
                name = peft_param_name(path, key, plan[path], adapter_name, wrapped)
                if name not in named:
                    raise KeyError(f"{name} not in the peft model (close: {[n for n in named if path in n][:6]})")
                named[name].copy_(value)


def peft_grads(
    peft_model: nn.Module, adapter: Any, plan: Mapping[str, PlanEntry], adapter_name: str = "default"
) -> Any:
    """The `.grad` of each peft parameter, in the structure of `adapter`."""
    named = dict(peft_model.named_parameters())
    wrapped = {p for p, e in plan.items() if e.spec is not None}
    return {
        path: {key: named[peft_param_name(path, key, plan[path], adapter_name, wrapped)].grad for key in entry}
        for path, entry in adapter.items()
    }


def assert_matches_peft(
    model: nn.Module,
    config_kwargs: Mapping[str, Any],
    adapter: Any = None,
    *,
    config_class: str = "LoraConfig",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    **inputs: Any,
) -> None:
    """funcpeft and `peft` (on a deep copy of `model`, same config) adapt the same parameters and agree.

    config_kwargs: keyword arguments valid for both `funcpeft.<config_class>` and `peft.<config_class>`.
    adapter: the values to compare with (default: a random tree, so that B != 0); inputs: model kwargs.
    Checks that PEFT's trainable parameters are exactly funcpeft's adapter leaves, then the outputs within
    `atol + rtol * |peft's|`.
    Needs `peft` (a test dependency). `model` is not modified.
    """
    import peft  # a test dependency: imported only when used

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both libraries warn alike (fan_in_fan_out, ...); not the point here
        pm = get_peft_model(model, getattr(configs, config_class)(**config_kwargs))
        twin = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_class)(**config_kwargs)).eval()
    fn, base, fresh = pm
    adapter = random_like(fresh, torch.Generator().manual_seed(0)) if adapter is None else adapter
    plan = pm.plans[pm.adapter_name]
    check_adapter_structure(adapter, plan, pm.adapter_name)  # ValueError naming the path: a wrong tree, not a mismatch
    wrapped = {p for p, e in plan.items() if e.spec is not None}
    ours = {peft_param_name(p, k, plan[p], "default", wrapped) for p, e in plan.items() for k in e.keys}
    theirs = {n for n, t in twin.named_parameters() if t.requires_grad}
    if ours != theirs:
        raise AssertionError(
            f"trainable parameters differ: only funcpeft {sorted(ours - theirs)[:5]}, only peft {sorted(theirs - ours)[:5]}"
        )
    copy_into_peft(twin, adapter, plan)
    with torch.no_grad():
        got, want = fn(base, adapter, **inputs), twin(**inputs)
    got_t = got.logits if hasattr(got, "logits") else got
    want_t = want.logits if hasattr(want, "logits") else want
    if got_t.shape != want_t.shape or not torch.allclose(got_t, want_t, atol=atol, rtol=rtol):
        diff = (got_t - want_t).abs().max().item() if got_t.shape == want_t.shape else float("nan")
        raise AssertionError(
            f"funcpeft and peft outputs differ: shapes {tuple(got_t.shape)} / {tuple(want_t.shape)}, "
            f"max abs diff {diff:.3g} (atol {atol}, rtol {rtol})"
        )
