"""MiSS (`MissConfig`: balanced, "mini", "bat") against PEFT 0.21.2: config checks and errors, unsupported layers, init
draws, padding (in % r != 0), dropout, merge / unmerge; laws (hypothesis). Compile and routing:
test_method_transforms.py."""

from __future__ import annotations

import copy
from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods.base import UnsupportedLayerError


class Odd(nn.Module):
    """x (B, 10) -> (B, 4): in_features 10 is not a multiple of r=4 (PEFT pads the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x)))


def _odd() -> nn.Module:
    torch.manual_seed(0)
    return Odd().eval()


# -- config and errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            dict(r=0, target_modules=["lin0"]),
            ValueError,
            "`r` should be a positive integer value but the value passed is 0",
        ),
        (
            dict(r=11, target_modules=["lin0"]),
            ValueError,
            r"`r` \(11\) must be less than or equal to in_features \(10\)",
        ),
        (dict(r=3, init_weights="bat", target_modules=["lin0"]), ValueError, r"fully divisible into \[r, r\] blocks"),
        (
            dict(r=2, init_weights="mini", mini_r=3, target_modules=["lin0"]),
            ValueError,
            "mini_r is divided along the out_features",
        ),
        (
            dict(r=2, bias="foo", target_modules=["lin0"]),
            NotImplementedError,
            "Requested bias: .*foo.*is not implemented",
        ),
        (dict(r=2, target_modules="lin0", layers_to_transform=[0]), ValueError, "`layers_to_transform` cannot be used"),
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], exc: type[BaseException], match: str) -> None:
    info = mc.assert_raises_like_peft(models.build("MLP"), "MissConfig", kwargs, exc, match)
    if "in_features" in match or "blocks" in match or "mini_r" in match:
        assert "'lin0'" in str(info.value)  # funcpeft names the module


def test_unknown_init_weights_is_refused() -> None:
    """PEFT silently treats any other truthy init_weights (e.g. a typo of "bat") as True; funcpeft refuses it."""
    with pytest.raises(ValueError, match=r"`init_weights` must be True, False, 'bat' or 'mini', got 'batt'"):
        funcpeft.MissConfig(init_weights="batt")


@pytest.mark.parametrize("target, kind", [("c_attn", "Conv1D"), ("wte", "Embedding")])
def test_unsupported_layers_name_module_and_type(target: str, kind: str) -> None:
    model = T.tiny_gpt2()
    with pytest.raises(TypeError, match="is not supported"):
        peft.get_peft_model(copy.deepcopy(model), peft.MissConfig(r=2, target_modules=[target]))
    with pytest.raises(UnsupportedLayerError, match=rf"Target module '.*{target}' \({kind}\) is not supported"):
        funcpeft.get_peft_model(model, funcpeft.MissConfig(r=2, target_modules=[target]))


# -- init, forward, gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, init_weights=False, target_modules="all-linear"),  # kaiming-uniform blocks
        dict(r=4, target_modules="all-linear"),
        dict(r=8, init_weights="bat", target_modules="all-linear"),
        dict(r=4, init_weights="mini", mini_r=8, target_modules=["q_proj", "up_proj"]),
    ],
)
def test_fresh_adapter_equals_peft_for_the_same_seed(kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(T.tiny_llama(), "MissConfig", kwargs, seed=3)
    mc.assert_fresh_equals_peft(fpm, pm)


@pytest.mark.parametrize("init", [True, "bat"])
def test_inputs_not_a_multiple_of_r_match_peft(init: Any) -> None:
    """in_features=10, r=4: the balanced forward zero-pads x (bat needs r | in, so it uses r=2 here)."""
    r = 4 if init is True else 2
    fpm, pm = mc.build_both(
        _odd(), "MissConfig", dict(r=r, init_weights=init, target_modules=["lin", "out"] if r == 2 else ["lin"])
    )
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.3)[0]
    mc.assert_matches_peft_with(fpm, pm, adapter, {"x": torch.randn(5, 10)})


def test_training_dropout_matches_peft_given_the_same_masks() -> None:
    model = _odd()
    fpm, pm = mc.build_both(model, "MissConfig", dict(r=4, miss_dropout=0.4, target_modules=["lin", "out"]))
    fn, base, fresh = fpm
    adapter = mc.random_trees(fresh, 1)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    mc.patch_peft_dropout(pm, "miss_dropout", 0.4, seed=5)
    x = torch.randn(6, 10)
    with torch.no_grad():
        want = pm.train()(x)
        got = fn(base, adapter, x=x, dropout_rng=torch.Generator().manual_seed(5))
        plain = fn(base, adapter, x=x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the dropout did something


# -- merge / unmerge ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, init_weights=False, target_modules=["lin", "out"]),  # in 10 % 4: the last block is partial
        dict(r=4, init_weights="mini", mini_r=6, target_modules=["lin"]),
        dict(r=2, init_weights="bat", target_modules=["lin", "out"]),
    ],
)
def test_merge_and_unmerge_equal_peft(kwargs: dict[str, Any]) -> None:
    model = _odd()
    fpm, pm = mc.build_both(model, "MissConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.3)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    x = torch.randn(5, 10)
    with torch.no_grad():
        adapted = fpm.fn(fpm.base, adapter, x=x)
        merged = funcpeft.merge(fpm, fpm.base, adapter)
        torch.testing.assert_close(fpm.fn(merged, None, x=x), adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            funcpeft.merge_and_unload(fpm, adapter)(x), pm.merge_and_unload()(x), atol=1e-6, rtol=0
        )
        back = funcpeft.unmerge(fpm, merged, adapter)
    for name in ("lin.weight", "out.weight"):
        torch.testing.assert_close(back[name], fpm.base[name], atol=1e-5, rtol=0)


def test_bat_cannot_stack_on_another_adapter_of_the_layer() -> None:
    fpm = funcpeft.get_peft_model(_odd(), funcpeft.MissConfig(r=2, init_weights="bat", target_modules=["lin"]))
    second = fpm.add_adapter("other", funcpeft.MissConfig(r=2, init_weights="bat", target_modules=["lin"]))
    with pytest.raises(NotImplementedError, match="init_weights='bat'.*cannot be stacked"):
        fpm.fn(fpm.base, {"default": fpm.adapter, "other": second}, x=torch.randn(2, 10))


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "MissConfig", dict(r=2, target_modules=["lin0"]))


# -- laws --------------------------------------------------------------------------------------------------------
@settings(max_examples=examples(15))
@given(in_f=st.integers(1, 12), out_f=st.integers(1, 9), r=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_balanced_miss_is_additive_with_b_tiled_over_column_blocks(in_f: int, out_f: int, r: int, seed: int) -> None:
    """y = base(x) + x @ dW^T with dW[o, i] = B[i % r, o], for any in_features (padding included)."""
    r = min(r, in_f)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.MissConfig(r=r, init_weights=False, target_modules=["0"]))
    block = fresh["0"]["miss_block"].detach()
    dw = torch.stack([block[i % r] for i in range(in_f)], dim=1)  # (out, in)
    x = torch.randn(3, in_f)
    with torch.no_grad():
        torch.testing.assert_close(fn(base, fresh, x), model(x) + x @ dw.T, atol=1e-5, rtol=1e-5)


@settings(max_examples=examples(10))
@given(blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)), r=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_bat_unmerge_inverts_merge(blocks: tuple[int, int], r: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(blocks[0] * r, blocks[1] * r)).eval()
    fpm = funcpeft.get_peft_model(model, funcpeft.MissConfig(r=r, init_weights="bat", target_modules=["0"]))
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.1)[0]  # small: I + B stays invertible
    merged = funcpeft.merge(fpm, fpm.base, adapter)
    assert not torch.allclose(merged["0.weight"], fpm.base["0.weight"])
    torch.testing.assert_close(
        funcpeft.unmerge(fpm, merged, adapter)["0.weight"], fpm.base["0.weight"], atol=1e-5, rtol=1e-5
    )
