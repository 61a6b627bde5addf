"""HRA (`HRAConfig`) against PEFT 0.21.2: config and layer checks, init (symmetric, odd r, random), forward /
gradients / merges with and without Gram-Schmidt, several adapters, per-example routing, laws. Compile:
tests/test_method_transforms.py."""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import peft
import pytest
import torch
from helpers import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st
from method_checks import assert_bf16_layers_cast_like_peft, assert_rotation_case_equals_peft
from method_helpers import CONV_X, MLP_X, OrthConv, OrthMLP, quiet, seeded
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods import hra
from funcpeft.methods.base import UnsupportedLayerError

MLP = OrthMLP
Conv = functools.partial(OrthConv, 4)
_seeded, _quiet = seeded, quiet


# -- config and layers ------------------------------------------------------------------------------------------
def test_config_errors_are_peft_s() -> None:
    kwargs: dict[str, Any] = dict(target_modules="lin0", layers_to_transform=[0])
    with pytest.raises(ValueError) as theirs:
        peft.HRAConfig(**kwargs)
    with pytest.raises(ValueError) as ours:
        funcpeft.HRAConfig(**kwargs)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError) as theirs:  # PEFT checks r when it builds the layer; funcpeft in the config
        peft.get_peft_model(_seeded(MLP), peft.HRAConfig(r=0, target_modules=["lin0"]))
    with pytest.raises(ValueError) as ours:
        funcpeft.HRAConfig(r=0, target_modules=["lin0"])
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="`bias` must be 'none', 'all' or 'hra_only'"):
        funcpeft.HRAConfig(bias="lora_only")


def test_unsupported_layers_name_module_and_type() -> None:
    llama = T.tiny_llama()
    with pytest.raises(TypeError, match="is not supported"):
        peft.get_peft_model(copy.deepcopy(llama), peft.HRAConfig(target_modules=["embed_tokens"]))
    with pytest.raises(UnsupportedLayerError, match=r"'model\.embed_tokens' \(Embedding\) is not supported by HRA"):
        funcpeft.get_peft_model(llama, funcpeft.HRAConfig(target_modules=["embed_tokens"]))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Conv1d\) is not supported by HRA"):
        funcpeft.get_peft_model(nn.Sequential(nn.Conv1d(2, 2, 3)), funcpeft.HRAConfig(target_modules=["0"]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError) as theirs:
        peft.get_peft_model(copy.deepcopy(grouped), peft.HRAConfig(target_modules=["0"]))
    with pytest.raises(NotImplementedError) as ours:
        funcpeft.get_peft_model(grouped, funcpeft.HRAConfig(target_modules=["0"]))
    assert str(ours.value) == str(theirs.value)


def test_a_dilated_conv_is_refused_where_peft_silently_drops_the_dilation() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2, padding=2))
    x = torch.randn(2, 2, 6, 6)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.HRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        assert pm(x).shape != model(x).shape  # PEFT's fresh (identity) HRA already changes the layer
    with pytest.raises(NotImplementedError, match="is not this layer's convolution"):
        funcpeft.get_peft_model(model, funcpeft.HRAConfig(r=2, target_modules=["0"]))


# -- init -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r, init_weights", [(4, True), (3, True), (3, False)])
def test_fresh_adapter_equals_peft_s_for_the_same_seed(r: int, init_weights: bool) -> None:
    model = _seeded(Conv)
    config: dict[str, Any] = dict(r=r, target_modules=["conv", "lin"], init_weights=init_weights)
    torch.manual_seed(3)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.HRAConfig(**config))
    torch.manual_seed(3)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        fpm = funcpeft.get_peft_model(model, funcpeft.HRAConfig(**config))
    odd = "The symmetric initialization can NOT be performed when r is odd!"
    assert (
        [str(w.message) for w in ours].count(odd)
        == [str(w.message) for w in theirs].count(odd)
        == (2 if init_weights and r % 2 else 0)
    )
    named = dict(pm.named_parameters())
    plan = fpm.plans["default"]
    for path, entry in fpm.adapter.items():
        for key, value in entry.items():
            assert torch.equal(value, named[T.peft_param_name(path, key, plan[path])]), (path, key)
    if init_weights and r % 2 == 0:  # pairs of equal reflections: the identity, up to rounding
        with torch.no_grad():
            torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **CONV_X), model(**CONV_X), atol=1e-5, rtol=0)


# -- forward, gradients, merges ---------------------------------------------------------------------------------
CASES: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "conv-and-linear": (Conv, dict(r=4, target_modules=["conv", "lin"]), CONV_X),
    "conv-gram-schmidt-bias": (
        Conv,
        dict(r=3, apply_GS=True, init_weights=False, target_modules=["conv"], bias="hra_only"),
        CONV_X,
    ),
    "mlp-gram-schmidt": (MLP, dict(r=5, apply_GS=True, init_weights=False, target_modules=["lin0", "lin1"]), MLP_X),
    "mlp-bias-all": (MLP, dict(r=6, target_modules=["lin0", "lin1"], bias="all"), MLP_X),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_gradients_and_merges_equal_peft(case: str) -> None:
    build, config, x = CASES[case]
    assert_rotation_case_equals_peft(build, "HRAConfig", config, x)


def test_bf16_layers_cast_like_peft() -> None:
    assert_bf16_layers_cast_like_peft(_seeded(MLP), "HRAConfig", dict(r=2, target_modules=["lin0", "lin1"]), MLP_X)


# -- several adapters, routing, transforms ----------------------------------------------------------------------
def test_two_adapters_on_a_conv_are_refused_clearly() -> None:
    model = _seeded(Conv)
    fpm = funcpeft.get_peft_model(model, funcpeft.HRAConfig(r=2, target_modules=["conv"]), adapter_name="a")
    fpm.add_adapter("b", funcpeft.HRAConfig(r=2, target_modules=["conv"]))
    with pytest.raises(NotImplementedError, match="HRA on a conv layer builds the adapted kernel"):
        fpm.fn(fpm.base, {"a": fpm.adapter, "b": fpm.adapter}, **CONV_X)


def test_three_adapters_on_one_linear_layer_equal_peft() -> None:
    """PEFT multiplies W H_a H_b H_c; the outer adapters here rotate the input instead."""
    model = _seeded(MLP)
    config: dict[str, Any] = dict(r=3, init_weights=False, target_modules=["lin0"])
    names = ["a", "b", "c"]
    fpm = funcpeft.get_peft_model(model, funcpeft.HRAConfig(**config), adapter_name="a")
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.HRAConfig(**config), adapter_name="a")
    for n in names[1:]:
        fpm.add_adapter(n, funcpeft.HRAConfig(**config))
        pm.add_adapter(n, peft.HRAConfig(**config))
    pm.base_model.model.lin0.set_adapter(names)
    g = torch.Generator().manual_seed(1)
    trees = {n: T.random_like(fpm.adapter, g) for n in names}
    for n in names:
        T.copy_into_peft(pm, trees[n], fpm.plans[n], n)
    with torch.no_grad():
        want = pm(**MLP_X)
        torch.testing.assert_close(fpm.fn(fpm.base, trees, **MLP_X), want, atol=1e-5, rtol=0)
        merged = funcpeft.merge_and_unload(fpm, trees)(**MLP_X)
        torch.testing.assert_close(
            merged, copy.deepcopy(pm).merge_and_unload(adapter_names=names)(**MLP_X), atol=1e-5, rtol=0
        )


def test_per_example_routing_rotates_inputs_and_equals_each_adapter_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _seeded(MLP)
    fpm = funcpeft.get_peft_model(model, funcpeft.HRAConfig(r=4, target_modules=["lin0", "lin1"]))
    trees = [T.random_like(fpm.adapter, torch.Generator().manual_seed(s)) for s in range(3)]
    index = [2, -1, 0]
    built: list[bool] = []
    real = hra._adapted

    def spy(spec: Any, ctx: Any, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        built.append(torch._C._functorch.is_batchedtensor(w))
        return real(spec, ctx, w, x)

    monkeypatch.setattr(hra, "_adapted", spy)
    with torch.no_grad():
        routed = fpm.fn(fpm.base, funcpeft.per_example(trees, index), **MLP_X)
    assert built and not any(built)  # the base weight, not one adapted weight per example (vmap of forward)
    monkeypatch.undo()
    with torch.no_grad():
        for i, k in enumerate(index):
            want = fpm.fn(fpm.base, trees[k], **MLP_X)[i] if k >= 0 else model(**MLP_X)[i]
            torch.testing.assert_close(routed[i], want, atol=1e-5, rtol=0)


@settings(max_examples=examples(20), deadline=None)
@given(n=st.integers(2, 8), r=st.integers(1, 4), gs=st.booleans(), seed=st.integers(0, 2**16))
@example(n=2, r=2, gs=True, seed=378)  # float32 lost 2e-4 of orthogonality here
def test_householder_products_are_orthogonal_and_merging_inverts(n: int, r: int, gs: bool, seed: int) -> None:
    # float64: the laws are exact; in float32 Gram-Schmidt on near-parallel draws (n=2, r=2) loses ~1e-4 of
    # orthogonality to rounding, as PEFT's does, which says nothing about the algebra
    lin = nn.Linear(n, 3).double()
    model = nn.Sequential(lin)
    fpm = _quiet(funcpeft.get_peft_model, model, funcpeft.HRAConfig(r=min(r, n), apply_GS=gs, target_modules=["0"]))
    spec = fpm.plans["default"]["0"].spec
    assert spec is not None
    u = torch.randn(n, min(r, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    h = hra.householder(spec, u)
    torch.testing.assert_close(h @ h.t(), eye, atol=1e-9, rtol=0)
    torch.testing.assert_close(h @ hra.householder(spec, u, reverse=True), eye, atol=1e-9, rtol=0)
    w = lin.weight.detach()
    merged = hra.merge_weight(spec, {"hra_u": u}, w, None)
    torch.testing.assert_close(hra.unmerge_weight(spec, {"hra_u": u}, merged, None), w, atol=1e-9, rtol=0)
