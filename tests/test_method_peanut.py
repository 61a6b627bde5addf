"""PEANuT (`PeanutConfig`) against PEFT 0.21.2: config fields and errors, unsupported layers, init draws for both
init_weights at several depths, forward / gradients away from the init (bfloat16 too), merging from the pre-merge
weight and unmerging, mixed models refused. PEFT's TEST_CASES rows: tests/test_peft_matrix.py; compile and
per-example routing: tests/test_method_transforms.py; tiny transformers models: tests/test_contract.py."""

from __future__ import annotations

import copy
from typing import Any, cast

import method_checks as mc
import peft
import pytest
import torch
from peft_matrix import models

import funcpeft
from funcpeft import testing as T
from funcpeft.methods.base import UnsupportedLayerError

X = {"X": torch.randn(6, 10, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["lin0"], r=0), "`r` must be a positive integer"),
        (dict(target_modules=["lin0"], depth=-1), "`depth` can only be a non-negative integer"),
        (dict(target_modules=["lin0"], act_fn="nope"), "Unsupported `act_fn`: nope"),
        (dict(target_modules=["lin0"], layers_pattern="x"), "`layers_to_transform` must also be specified"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    mc.assert_raises_like_peft(models.build("MLP"), "PeanutConfig", kwargs, ValueError, match)


@pytest.mark.parametrize("model_id, target, kind", [("EmbConv1D", "emb", "Embedding"), ("Conv2d", "conv2d", "Conv2d")])
def test_unsupported_layers_name_module_and_type(model_id: str, target: str, kind: str) -> None:
    model, config = models.build(model_id), dict(target_modules=[target])
    mc.assert_unsupported_like_peft(
        model,
        "PeanutConfig",
        config,
        "PEANuT does not support target modules of type",
        rf"{target!r}.*{kind}",
        NotImplementedError,
    )


def test_gpt2_conv1d_is_refused() -> None:
    model = models.build("EmbConv1D")
    with pytest.raises(NotImplementedError):
        peft.get_peft_model(copy.deepcopy(model), peft.PeanutConfig(target_modules=["conv1d"]))
    with pytest.raises(UnsupportedLayerError, match=r"'conv1d'.*Conv1D"):
        funcpeft.get_peft_model(model, funcpeft.PeanutConfig(target_modules=["conv1d"]))


def test_mixed_is_refused_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "PeanutConfig", dict(target_modules=["lin0"]))


CASES: list[dict[str, Any]] = [
    dict(target_modules=["lin0", "lin1"], r=3),
    dict(target_modules=["lin0", "lin1"], r=2, depth=2, act_fn="gelu", scaling=0.5),
    dict(target_modules=["lin1"], r=4, depth=1, act_fn="tanh"),
]


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("kwargs", CASES)
def test_fresh_adapter_equals_peft_for_the_same_seed(kwargs: dict[str, Any], init: bool) -> None:
    fpm, pm = mc.build_both(models.build("MLP"), "PeanutConfig", {**kwargs, "init_weights": init}, seed=5)
    mc.assert_fresh_equals_peft(fpm, pm)


@pytest.mark.parametrize("kwargs", CASES)
def test_forward_and_gradients_match_peft_away_from_the_init(kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(models.build("MLP"), "PeanutConfig", kwargs)
    for adapter in mc.random_trees(fpm.adapter, n=2, scale=0.3):
        mc.assert_matches_peft_with(fpm, pm, adapter, X, atol=1e-5)


def test_bfloat16_model_matches_peft() -> None:
    model = models.build("MLP", dtype=torch.bfloat16)
    cast(Any, model).dtype = torch.bfloat16  # the model casts its input to it
    kwargs: dict[str, Any] = dict(target_modules=["lin0", "lin1"], depth=1, init_weights=False)
    fpm, pm = mc.build_both(model, "PeanutConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)  # float32 adapters, like PEFT's autocast
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], X, atol=2e-2)


def test_two_adapters_merge_from_the_pre_merge_weight_like_peft() -> None:
    """PEFT computes each merged delta from W0 (the weight before merging), not from W0 + delta_1."""
    model = models.build("MLP")
    cfg: dict[str, Any] = dict(target_modules=["lin0"], depth=1, init_weights=False)
    torch.manual_seed(0)
    fpm = funcpeft.get_peft_model(copy.deepcopy(model), funcpeft.PeanutConfig(**cfg))
    other = fpm.add_adapter("other", funcpeft.PeanutConfig(**cfg))
    fn, base, fresh = fpm
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.PeanutConfig(**cfg))
    pm.add_adapter("other", peft.PeanutConfig(**cfg))
    both = {"default": fresh, "other": other}
    plan = fpm.plans["default"]
    for name, tree in both.items():  # same fresh draws as PEFT
        for key, value in tree["lin0"].items():
            assert torch.equal(value, pm.get_parameter(T.peft_param_name("lin0", key, plan["lin0"], name)))
    merged = funcpeft.merge(fpm, base, both)
    layer = cast(Any, pm.get_submodule("base_model.model.lin0"))
    layer.merge(adapter_names=["default", "other"])
    torch.testing.assert_close(merged["lin0.weight"], layer.base_layer.weight, atol=1e-6, rtol=0)
    x = X["X"]
    torch.testing.assert_close(fn(merged, None, X=x), fn(base, both, X=x), atol=1e-5, rtol=1e-5)
    assert torch.equal(funcpeft.unmerge(fpm, merged, both, base=base)["lin0.weight"], base["lin0.weight"])
    with pytest.raises(ValueError, match="pre-merge weight.*base="):
        funcpeft.unmerge(fpm, merged, both)
