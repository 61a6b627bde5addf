"""BEFT (`BeftConfig`) against PEFT 0.21.2: config fields, default targets, unsupported layers, init draws (PEFT
draws randn even for the zero init), forward, gradients, merge / unmerge into the bias, merging refused for a layer
without a bias, mixed models refused; laws (hypothesis): the adapter adds exactly its bias, merge then unmerge is
the identity; torch.compile without recompiles, per-example routing and vmap."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import MODELS, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T


def test_default_targets_are_peft_s_in_its_order() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING as theirs_targets

    assert dict(funcpeft.BeftConfig.DEFAULT_TARGET_MODULES) == theirs_targets


def test_unsupported_layers_name_module_and_type() -> None:
    """PEFT adapts nn.Linear only: GPT-2's Conv1D and an embedding are refused."""
    mc.assert_linear_only_like_peft("BeftConfig", TypeError, "Currently, only `torch.nn.Linear` is supported")


@pytest.mark.parametrize("init_weights", [True, False])
def test_fresh_adapter_and_random_stream_equal_peft_for_the_same_seed(init_weights: bool) -> None:
    """Same values, and the global RNG left in the same state (PEFT draws randn before zeroing)."""
    fpm, pm = mc.build_both(T.tiny_llama(), "BeftConfig", dict(init_weights=init_weights), seed=5)
    model = T.tiny_llama()
    nexts = []
    for lib in (funcpeft, peft):
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Llama's v_proj has no bias
            lib.get_peft_model(copy.deepcopy(model), lib.BeftConfig(init_weights=init_weights))
        nexts.append(torch.rand(4))
    assert torch.equal(*nexts)
    mc.assert_fresh_equals_peft(fpm, pm)
    assert list(fpm.adapter) == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]  # the default targets
    assert fpm.adapter["model.layers.0.self_attn.v_proj"]["beft_bias"].shape == (1, 32)
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_forward_gradients_merge_and_unmerge_equal_peft() -> None:
    fpm, pm = mc.build_both(MODELS["mlp"](), "BeftConfig", dict(target_modules=["lin0", "lin1"], init_weights=False))
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    x = make_inputs("mlp", batch=3)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    merged, back = mc.merged_like_peft(fpm, pm, adapter, x)
    for path in ("lin0", "lin1"):
        assert merged[f"{path}.weight"] is fpm.base[f"{path}.weight"]  # the weight is not touched
        torch.testing.assert_close(merged[f"{path}.bias"], fpm.base[f"{path}.bias"] + adapter[path]["beft_bias"][0])
        torch.testing.assert_close(back[f"{path}.bias"], fpm.base[f"{path}.bias"], atol=1e-6, rtol=0)


def test_a_layer_without_bias_warns_and_cannot_be_merged_like_peft() -> None:
    model = T.tiny_llama()
    config: dict[str, Any] = dict(target_modules=["v_proj"], init_weights=False)
    with pytest.warns(UserWarning, match="has no bias term. Note you cannot merge the BEFT adapter"):
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.BeftConfig(**config))
    with pytest.warns(UserWarning, match=r"'model\.layers\.0\.self_attn\.v_proj' has no bias term"):
        fpm = funcpeft.get_peft_model(model, funcpeft.BeftConfig(**config))
    match = "Base layer has no bias, cannot merge bias adapter"
    with pytest.raises(ValueError, match=match):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match=match) as info:
        funcpeft.merge_and_unload(fpm, fpm.adapter)
    assert "v_proj" in str(info.value)
    with pytest.raises(ValueError, match=match):
        funcpeft.merge(fpm, fpm.base, fpm.adapter)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "BeftConfig", dict(target_modules=["lin0"]))


def _layer(out_f: int, in_f: int, seed: int) -> Any:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layer has a bias: no warning
        return funcpeft.get_peft_model(model, funcpeft.BeftConfig(target_modules=["0"], init_weights=False))


@settings(max_examples=examples(15))
@given(out_f=st.integers(1, 8), in_f=st.integers(1, 8), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_the_adapter_adds_its_bias_and_merging_round_trips(out_f: int, in_f: int, batch: int, seed: int) -> None:
    fpm = _layer(out_f, in_f, seed)
    x = torch.randn(batch, in_f)
    bias = fpm.adapter["0"]["beft_bias"]
    torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, x) - fpm.fn(fpm.base, None, x), bias.expand(batch, -1))
    merged = funcpeft.merge(fpm, fpm.base, fpm.adapter)
    torch.testing.assert_close(merged["0.bias"], fpm.base["0.bias"] + bias.flatten(), atol=0, rtol=0)
    back = funcpeft.unmerge(fpm, merged, fpm.adapter)
    torch.testing.assert_close(back["0.bias"], fpm.base["0.bias"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("autocast", [True, False])
def test_a_bf16_model_equals_peft(autocast: bool) -> None:
    """autocast_adapter_dtype: float32 adapter (True) or the model's bf16 (False), in both; the same outputs."""
    kwargs: dict[str, Any] = dict(init_weights=False, target_modules=["q_proj", "down_proj"])
    mc.assert_bf16_model_equals_peft("BeftConfig", kwargs, autocast)
