"""DeLoRA (`DeloraConfig`) against PEFT 0.21.2: config checks and errors, unsupported layers, init draws, the
frozen saved column norms (`delora_w_norm`: made from the base weight, restored from files), rank / lambda
patterns, forward, gradients (lambda's too) and merge; laws (hypothesis): the norm bound, module_dropout=1.
Compile and per-example routing: tests/test_method_transforms.py."""

from __future__ import annotations

from typing import Any

import method_checks as mc
import pytest
import torch
from helpers import cast_model, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T

LLAMA = dict(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2, "k_pro.": 3}, lambda_pattern={"q_proj": 3})


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(r=0, target_modules=["lin0"]), ValueError, "`r` must be a positive integer; got 0."),
        (
            dict(rank_pattern={"lin0": 0}, target_modules=["lin0"]),
            ValueError,
            "`r` should be a positive integer value but the value passed is 0",
        ),
        *mc.LAYERS_PATTERN_ROWS,
        (dict(target_modules="lin0", layers_pattern="h"), ValueError, "`layers_to_transform` must also be specified"),
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], exc: type[BaseException], match: str) -> None:
    info = mc.assert_raises_like_peft(models.build("MLP"), "DeloraConfig", kwargs, exc, match)
    if "value passed" in match:
        assert "'lin0'" in str(info.value)  # funcpeft names the module


def test_unsupported_layers_name_module_and_type() -> None:
    """PEFT adapts nn.Linear only: GPT-2's Conv1D is refused like an embedding."""
    mc.assert_linear_only_like_peft("DeloraConfig", TypeError, "Currently, only `torch.nn.Linear` is supported")


@pytest.mark.parametrize("init_weights", [True, False])
def test_fresh_adapter_and_column_norms_equal_peft_for_the_same_seed(init_weights: bool) -> None:
    fpm, pm = mc.build_both(T.tiny_llama(), "DeloraConfig", {**LLAMA, "init_weights": init_weights}, seed=2)
    mc.assert_fresh_equals_peft(fpm, pm)
    ranks = set()
    for path, entry in fpm.plans["default"].items():
        layer = pm.get_submodule(f"base_model.model.{path}")
        ((_, key),) = entry.frozen
        assert torch.equal(fpm.base[key], layer.delora_w_norm["default"]), path
        assert entry.spec.hyper.r == layer.r["default"], path
        ranks.add(entry.spec.hyper.r)
    assert ranks == {2, 3, 4}


def test_forward_gradients_and_merge_equal_peft() -> None:
    mc.assert_forward_and_merge_equal_peft(T.tiny_llama(), "DeloraConfig", LLAMA, make_inputs("llama"))


def test_column_norms_are_saved_and_restored_from_the_file_like_peft(tmp_path: Any) -> None:
    """PEFT saves delora_w_norm (a persistent buffer) and loading restores it, even onto a changed base weight."""
    model = T.tiny_llama()
    fpm = funcpeft.get_peft_model(model, funcpeft.DeloraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    assert fpm.get_nb_trainable_parameters()[0] == 2 * (2 * 64 + 64 * 2 + 1)  # the norms are not counted
    saved, paths, back, pm = mc.saved_and_reloaded_on_changed_weights(
        fpm, model, tmp_path, ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"), lambda w: w * 2.0
    )
    for p in paths:
        ((_, key),) = back.plans["default"][p].frozen
        torch.testing.assert_close(back.base[key], saved[f"base_model.model.{p}.delora_w_norm"], atol=0, rtol=0)
        layer: Any = pm.get_submodule(f"base_model.model.{p}")
        assert torch.equal(layer.delora_w_norm["default"], back.base[key])
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(back.fn(back.base, back.adapter, **x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "DeloraConfig", dict(target_modules=["lin0"]))


def _layer(out_f: int, in_f: int, r: int, lam: float, seed: int, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    config = funcpeft.DeloraConfig(r=r, delora_lambda=lam, target_modules=["0"], init_weights=False, **kwargs)
    return funcpeft.get_peft_model(model, config)


@settings(max_examples=examples(15))
@given(
    out_f=st.integers(1, 8),
    in_f=st.integers(1, 8),
    r=st.integers(1, 4),
    lam=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_the_update_over_the_column_norms_is_bounded_by_lambda(
    out_f: int, in_f: int, r: int, lam: float, seed: int
) -> None:
    """DeLoRA's bound: ||dW diag(1 / w_norm)||_F <= sum_i s_i ||B^i|| ||A_i|| = lambda (no norm below 1e-4)."""
    fpm = _layer(out_f, in_f, r, lam, seed)
    ((_, key),) = fpm.plans["default"]["0"].frozen
    delta = (funcpeft.merge(fpm, fpm.base, fpm.adapter)["0.weight"] - fpm.base["0.weight"]).double()
    w_norm = fpm.base[key].double()
    assert torch.equal(w_norm.float(), fpm.base["0.weight"].norm(dim=0))
    assert (delta / w_norm).norm() <= lam * (1 + 1e-5)


def test_module_dropout_one_drops_the_whole_update_in_training() -> None:
    fpm = _layer(6, 5, 2, 15.0, 0, module_dropout=1.0)
    mc.assert_full_dropout_drops_the_update(fpm, torch.randn(4, 5))


def test_a_bf16_model_equals_peft_with_its_upcast_adapter_and_norms() -> None:
    """autocast_adapter_dtype: A, B, lambda and the norms (a BufferDict in PEFT) become float32 in both."""
    kwargs = dict(r=4, target_modules=["q_proj", "down_proj"], init_weights=False)
    fpm, pm = mc.build_both(cast_model(T.tiny_llama(), torch.bfloat16), "DeloraConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)
    for path, entry in fpm.plans["default"].items():
        ((_, key),) = entry.frozen
        layer: Any = pm.get_submodule(f"base_model.model.{path}")
        assert fpm.base[key].dtype == layer.delora_w_norm["default"].dtype == torch.float32
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, 1)[0], make_inputs("llama"), atol=1e-2)
