"""GraLoRA (`GraloraConfig`) against PEFT 0.21.2: config fields and errors, unsupported layers, init draws (with
and without the hybrid LoRA), forward / gradients away from the init on 2-D and 3-D inputs and GPT-2 Conv1D,
merging, bfloat16, mixed models refused. PEFT's TEST_CASES rows: tests/test_peft_matrix.py; compile:
tests/test_method_transforms.py."""

from __future__ import annotations

from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import as_type
from peft_matrix import models

import funcpeft
from funcpeft import testing as T
from funcpeft.methods.base import UnsupportedLayerError


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gralora_k=0, target_modules=["lin0"]), "`gralora_k` should be a positive integer value"),
        (dict(r=6, gralora_k=4, target_modules=["lin0"]), "r should be divisible by gralora_k, but got 6 and 4"),
        (dict(r=0, target_modules=["lin0"]), "`r` should be a positive integer value but the value passed is 0"),
        (dict(r=4, hybrid_r=-1, target_modules=["lin0"]), "`hybrid_r` should be a non-negative integer"),
        (dict(r=4, gralora_k=4, target_modules=["lin0"]), "in_features should be divisible by gralora_k, but got 10"),
        (dict(r=4, gralora_k=4, target_modules=["lin1"]), "out_features should be divisible by gralora_k, but got 2"),
    ],
)
def test_config_and_layer_errors_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    info = mc.assert_raises_like_peft(models.build("MLP"), "GraloraConfig", kwargs, ValueError, match)
    if "features" in match:
        assert repr(kwargs["target_modules"][0]) in str(info.value)  # funcpeft names the module


def test_unsupported_layers_name_module_and_type() -> None:
    model = models.build("EmbConv1D")
    with pytest.raises(TypeError, match="is not supported"):
        peft.get_peft_model(models.build("EmbConv1D"), peft.GraloraConfig(target_modules=["emb"]))
    with pytest.raises(UnsupportedLayerError, match=r"'emb'.*Embedding"):
        funcpeft.get_peft_model(model, funcpeft.GraloraConfig(target_modules=["emb"]))


def test_mixed_is_refused_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "GraloraConfig", dict(r=4, target_modules=["lin0"]))


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("hybrid_r", [0, 3])
def test_fresh_adapter_equals_peft_for_the_same_seed(init: bool, hybrid_r: int) -> None:
    kwargs = dict(r=4, gralora_k=2, hybrid_r=hybrid_r, init_weights=init, target_modules="all-linear")
    fpm, pm = mc.build_both(T.tiny_llama(), "GraloraConfig", kwargs, seed=3)
    mc.assert_fresh_equals_peft(fpm, pm)


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_forward_and_gradients_match_peft_on_a_sequence_model(hybrid_r: int) -> None:
    kwargs = dict(r=4, gralora_k=2, hybrid_r=hybrid_r, target_modules=["q_proj", "v_proj", "down_proj"])
    fpm, pm = mc.build_both(T.tiny_llama(), "GraloraConfig", kwargs)
    ids = {"input_ids": torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))}
    for adapter in mc.random_trees(fpm.adapter, n=2):
        mc.assert_matches_peft_with(fpm, pm, adapter, ids, atol=1e-4)


def test_conv1d_and_2d_inputs_match_peft_and_merge() -> None:
    fpm, pm = mc.build_both(models.build("EmbConv1D"), "GraloraConfig", dict(target_modules=["conv1d"], gralora_k=1))
    x = {"X": torch.arange(20).reshape(2, 10) % 9}
    adapter = mc.random_trees(fpm.adapter, n=1)[0]
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    fn, base, _ = fpm
    merged = funcpeft.merge(fpm, base, adapter)
    torch.testing.assert_close(fn(merged, None, **x), fn(base, adapter, **x), atol=1e-5, rtol=1e-5)
    pm.merge_adapter()
    torch.testing.assert_close(merged["conv1d.weight"], pm.base_model.model.conv1d.base_layer.weight)


def test_bfloat16_model_matches_peft() -> None:
    model = as_type(models.build("MLP", dtype=torch.bfloat16), models.MLP)
    model.dtype = torch.bfloat16  # the model casts its input to it
    kwargs = dict(r=4, hybrid_r=2, init_weights=False, target_modules=["lin0", "lin1"])
    fpm, pm = mc.build_both(model, "GraloraConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], {"X": torch.randn(4, 10)}, atol=2e-2)
