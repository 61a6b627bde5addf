"""Uni-LoRA (`UniLoraConfig`) against PEFT 0.21.2: config fields and checks (PEFT's messages), unsupported layers, the
fresh adapter with the index assignment and scales over every layer (bitwise PEFT's, also in bfloat16), files with
and without the indices loaded both ways; laws (hypothesis): the balanced assignment, and the update is B @ A
gathered from theta_d. Outputs, gradients, counts, files and merges on PEFT's rows: test_peft_matrix.py and
test_contract.py (which also routes per example); compile and per-example routing: test_method_transforms.py."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import peft
import pytest
import torch
from helpers import MODELS, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import assert_mixed_refused_like_peft, assert_raises_like_peft
from method_helpers import assert_same_state, fresh_states
from peft_matrix import models
from safetensors.torch import load_file
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import SHARED_PATH
from funcpeft.methods.base import UnsupportedLayerError
from funcpeft.methods.unilora import generate_index


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "`r` should be a positive integer, got 0."),
        (dict(theta_d_length=-1), "`theta_d_length` should be a positive integer, got -1."),
        (dict(unilora_dropout=1.5), "`unilora_dropout` should be between 0.0 and 1.0, got 1.5."),
        (dict(init_theta_d_bound=0.0), "`init_theta_d_bound` should be a positive float, got 0.0."),
        (dict(bias="lora_only"), "`bias` should be 'none', 'all', or 'unilora_only', got lora_only."),
        (dict(target_modules="q", layers_to_transform=[0]), "`layers_to_transform` cannot be used when"),
        (dict(target_modules="q", layers_pattern="layers"), "`layers_pattern` cannot be used when"),
    ],
)
def test_config_checks_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    for lib in (peft, funcpeft):
        with pytest.raises(ValueError, match=match.replace("(", r"\(")):
            lib.UniLoraConfig(**kwargs)


def test_unsupported_layers_raise_like_peft() -> None:
    info = assert_raises_like_peft(
        T.tiny_gpt2(), "UniLoraConfig", dict(r=2, target_modules=["c_attn", "wte"]), TypeError, "is not supported"
    )
    assert isinstance(info.value, UnsupportedLayerError)
    assert "Target module 'transformer.wte' (Embedding)" in str(info.value)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        # 14 layers in module order, N not a multiple of theta_d_length: the extra indices and the shuffle matter
        ("llama", dict(r=3, theta_d_length=997, target_modules="all-linear", save_indices=True, proj_seed=3)),
        ("llama", dict(r=2, theta_d_length=50, target_modules=["v_proj", "q_proj"], init_weights=False)),
        ("gpt2", dict(r=4, theta_d_length=128, target_modules=["c_attn", "c_fc"], save_indices=True)),
    ],
)
def test_fresh_adapter_indices_and_scales_equal_peft_s(kind: str, kwargs: dict[str, Any]) -> None:
    ours, theirs = fresh_states(MODELS[kind](), "UniLoraConfig", kwargs, seed=5)
    assert_same_state(ours, theirs)
    assert "base_model.unilora_theta_d" in ours
    assert len([k for k in ours if "unilora_indices_A" in k]) == (
        0 if not kwargs.get("save_indices") else len(ours) // 4
    )


def test_bfloat16_model_scales_in_its_dtype() -> None:
    """PEFT casts theta_d and the scales to the layer weight's dtype, then upcasts them (autocast_adapter_dtype):
    float32 values rounded to bfloat16."""
    model = MODELS["llama"]().to(torch.bfloat16)
    kwargs = dict(r=2, theta_d_length=64, target_modules=["q_proj", "down_proj"], save_indices=True)
    ours, theirs = fresh_states(model, "UniLoraConfig", kwargs, seed=2)
    assert_same_state(ours, theirs)
    rounded = [v for k, v in ours.items() if "scales" in k or "theta" in k]
    assert all(v.dtype == torch.float32 and torch.equal(v, v.bfloat16().float()) for v in rounded)


def test_theta_d_is_one_trainable_leaf_and_layers_have_none() -> None:
    fpm = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.UniLoraConfig(r=2, theta_d_length=40))
    _, _, adapter = fpm
    assert list(adapter[SHARED_PATH]) == ["unilora_theta_d"] and adapter[SHARED_PATH]["unilora_theta_d"].requires_grad
    assert all(entry == {} for path, entry in adapter.items() if path != SHARED_PATH)
    assert fpm.get_nb_trainable_parameters()[0] == 40


@pytest.mark.parametrize("save_indices", [True, False])
def test_files_with_and_without_the_indices_load_both_ways(save_indices: bool, tmp_path: Any) -> None:
    model = T.tiny_llama()
    kwargs: dict[str, Any] = dict(
        r=2, theta_d_length=77, target_modules=["q_proj", "k_proj"], save_indices=save_indices
    )
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.UniLoraConfig(**kwargs, init_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    fpm = funcpeft.from_pretrained(copy.deepcopy(model), tmp_path / "peft")
    fpm.save_pretrained(tmp_path / "ours", fpm.adapter)
    ours, theirs = (load_file(os.path.join(tmp_path, d, "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ("base_model.model.model.layers.0.self_attn.q_proj.unilora_indices_A" in ours) == save_indices
    x = make_inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        want = pm(**x).logits
        assert (want - model(**x).logits).abs().max() > 1e-3
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(peft_back(**x).logits, want, atol=1e-5, rtol=0)


def test_mixed_models_refuse_it_like_peft() -> None:
    assert_mixed_refused_like_peft(models.build("MLP"), "UniLoraConfig", dict(target_modules=["lin0"]))


@settings(max_examples=examples(30), derandomize=True)
@given(total=st.integers(1, 400), length=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_the_assignment_is_balanced_and_peft_s(total: int, length: int, seed: int) -> None:
    from peft.tuners.unilora.model import UniLoraModel

    indices, inv_sqrt = generate_index(total, length, seed)
    assert torch.equal(indices, UniLoraModel.generate_index(total, length, seed))
    counts = torch.bincount(indices, minlength=length)
    assert set(counts.tolist()) <= {total // length, -(-total // length)}
    used = counts > 0
    torch.testing.assert_close(inv_sqrt[used], counts[used].float() ** -0.5)


@settings(max_examples=examples(15))
@given(in_f=st.integers(1, 9), out_f=st.integers(1, 9), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_the_update_is_b_at_a_gathered_from_theta(in_f: int, out_f: int, r: int, seed: int) -> None:
    """A[i, j] = theta[idx_A[i, j]] * scale_A[i, j] (likewise B), dW = B @ A, the first layer's indices open the one
    shared assignment (A then B), and an eval call is the merged model's."""
    torch.manual_seed(seed)
    first_layer, second_layer = nn.Linear(in_f, out_f), nn.Linear(out_f, in_f)
    model = nn.Sequential(first_layer, second_layer).eval()
    fpm = funcpeft.get_peft_model(model, funcpeft.UniLoraConfig(r=r, theta_d_length=7, target_modules=["0", "1"]))
    theta = fpm.adapter[SHARED_PATH]["unilora_theta_d"].detach().double()
    frozen = {n: fpm.base[k] for n, k in fpm.plans["default"]["0"].frozen}
    a = theta[frozen["unilora_indices_A"]] * frozen["unilora_scales_A"].double()
    b = theta[frozen["unilora_indices_B"]] * frozen["unilora_scales_B"].double()
    first, _ = generate_index(2 * (r * in_f + out_f * r), 7, 42)
    assert torch.equal(
        torch.cat([frozen["unilora_indices_A"].flatten(), frozen["unilora_indices_B"].flatten()]),
        first[: r * (in_f + out_f)],
    )
    delta = funcpeft.merge(fpm, fpm.base, fpm.adapter)["0.weight"] - fpm.base["0.weight"]
    torch.testing.assert_close(delta.double(), b @ a, atol=1e-6, rtol=1e-5)
    merged = funcpeft.merge(fpm, fpm.base, fpm.adapter)
    x = torch.randn(3, in_f)
    w0, w1 = merged["0.weight"].double(), merged["1.weight"].double()
    want = (x.double() @ w0.T + first_layer.bias.double()) @ w1.T + second_layer.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, x).double(), want, atol=1e-5, rtol=1e-5)
