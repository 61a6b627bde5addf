"""BOFT (`BOFTConfig`) against PEFT 0.21.2's pure-torch path: config and per-layer checks, unsupported layers and
conv geometries, init, forward / gradients / merges, block dropout, the butterfly factor. Compile and routing:
tests/test_method_transforms.py."""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Any

import peft
import pytest
import torch
from helpers import assert_forward_and_grads_equal_peft, examples, method_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import assert_bf16_layers_cast_like_peft, assert_rotation_case_equals_peft
from method_helpers import CONV_X, MLP_X, OrthConv, OrthMLP, quiet, seeded
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods import boft
from funcpeft.methods.base import UnsupportedLayerError

MLP = OrthMLP
Conv = functools.partial(OrthConv, 4)
_seeded, _quiet = seeded, quiet


def _same_error(exc: type[Exception], peft_call: Any, funcpeft_call: Any) -> str:
    with pytest.raises(exc) as theirs:
        _quiet(peft_call)
    with pytest.raises(exc) as ours:
        _quiet(funcpeft_call)
    assert str(ours.value) == str(theirs.value)
    return str(ours.value)


# -- config and layers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(boft_block_size=0, boft_block_num=0),
        dict(boft_block_size=2, boft_block_num=4),
        dict(layers_pattern="layers"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any]) -> None:
    _same_error(ValueError, lambda: peft.BOFTConfig(**kwargs), lambda: funcpeft.BOFTConfig(**kwargs))


def test_config_bias_and_block_checks() -> None:
    with pytest.raises(ValueError, match="`bias` must be 'none', 'all' or 'boft_only'"):
        funcpeft.BOFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="`boft_block_size` and `boft_block_num` must be >= 0"):
        funcpeft.BOFTConfig(boft_block_size=-2)


@pytest.mark.parametrize(
    "build, kwargs",
    [
        (MLP, dict(boft_block_size=3, target_modules=["lin0"])),
        (MLP, dict(boft_block_size=0, boft_block_num=3, target_modules=["lin0"])),
        (Conv, dict(boft_block_size=4, target_modules=["conv"])),
        (Conv, dict(boft_block_size=0, boft_block_num=4, target_modules=["conv"])),
    ],
)
def test_block_sizes_that_do_not_divide_raise_like_peft(build: Any, kwargs: dict[str, Any]) -> None:
    model = _seeded(build)
    msg = _same_error(
        ValueError,
        lambda: peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(**kwargs)),
        lambda: funcpeft.get_peft_model(model, funcpeft.BOFTConfig(**kwargs)),
    )
    assert "must be divisible by" in msg


def test_grouped_convs_are_refused_like_peft() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    msg = _same_error(
        NotImplementedError,
        lambda: peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(boft_block_size=2, target_modules=["0"])),
        lambda: funcpeft.get_peft_model(model, funcpeft.BOFTConfig(boft_block_size=2, target_modules=["0"])),
    )
    assert "groups > 1" in msg


def test_unsupported_layers_name_module_and_type() -> None:
    llama = T.tiny_llama()
    with pytest.raises(TypeError, match="is not supported"):
        peft.get_peft_model(copy.deepcopy(llama), peft.BOFTConfig(boft_block_size=4, target_modules=["embed_tokens"]))
    with pytest.raises(UnsupportedLayerError, match=r"'model\.embed_tokens' \(Embedding\) is not supported by BOFT"):
        funcpeft.get_peft_model(llama, funcpeft.BOFTConfig(boft_block_size=4, target_modules=["embed_tokens"]))
    with pytest.raises(UnsupportedLayerError, match=r"\(Conv1D\) is not supported by BOFT"):
        _quiet(funcpeft.get_peft_model, T.tiny_gpt2(), funcpeft.BOFTConfig(boft_block_size=4, target_modules=["c_fc"]))


@pytest.mark.parametrize("conv", [dict(dilation=2, padding=2), dict(stride=(2, 1)), dict(padding=(1, 0))])
def test_conv_geometries_peft_gets_wrong_are_refused(conv: dict[str, Any]) -> None:
    """PEFT runs the adapted conv with stride[0] / padding[0] and no dilation: at init its BOFT layer already
    differs from the base layer (or fails). funcpeft refuses these layers."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, **conv))
    x = torch.randn(2, 2, 6, 6)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.BOFTConfig(boft_block_size=2, target_modules=["0"]))
    with torch.no_grad():
        try:
            wrong = pm(x).shape != model(x).shape or not torch.allclose(pm(x), model(x), atol=1e-4)
        except RuntimeError:
            wrong = True
    assert wrong
    with pytest.raises(NotImplementedError, match="is not this layer's convolution"):
        funcpeft.get_peft_model(model, funcpeft.BOFTConfig(boft_block_size=2, target_modules=["0"]))


def test_butterfly_factor_follows_peft_s_pure_torch_path() -> None:
    """PEFT without its CUDA extension sets boft_n_butterfly_factor to 1 (and skips the factor's checks)."""
    model = _seeded(MLP)
    config: dict[str, Any] = dict(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=["lin0", "lin1"])
    with pytest.warns(UserWarning, match="boft_n_butterfly_factor=3 is used by PEFT 0.21.2 only through its CUDA"):
        funcpeft.get_peft_model(model, funcpeft.BOFTConfig(**config))
    fpm, pm, adapter = method_pair(model, "BOFTConfig", config)
    assert {tuple(e["boft_R"].shape) for e in fpm.adapter.values()} == {(1, 4, 2, 2), (1, 8, 2, 2)}
    assert_forward_and_grads_equal_peft(fpm, pm, adapter, MLP_X)
    with pytest.raises(ValueError, match="boft_n_butterfly_factor 0 to be a positive integer"):
        funcpeft.get_peft_model(
            model, funcpeft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=0, target_modules=["lin0"])
        )


# -- init, forward, gradients, merges ---------------------------------------------------------------------------
@pytest.mark.parametrize("init_weights", [True, False])
def test_fresh_adapter_equals_peft_s_for_the_same_seed(init_weights: bool) -> None:
    model = _seeded(Conv)
    config: dict[str, Any] = dict(boft_block_size=2, target_modules=["conv", "lin"], init_weights=init_weights)
    torch.manual_seed(3)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.BOFTConfig(**config))
    torch.manual_seed(3)
    fpm = funcpeft.get_peft_model(model, funcpeft.BOFTConfig(**config))
    named = dict(pm.named_parameters())
    plan = fpm.plans["default"]
    for path, entry in fpm.adapter.items():
        for key, value in entry.items():
            assert torch.equal(value, named[T.peft_param_name(path, key, plan[path])]), (path, key)


CASES: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "conv-and-linear": (Conv, dict(boft_block_size=3, target_modules=["conv", "lin"]), CONV_X),
    "conv-one-block-bias": (
        Conv,
        dict(boft_block_size=0, boft_block_num=1, target_modules=["conv"], bias="boft_only"),
        CONV_X,
    ),
    "mlp-block-num": (
        MLP,
        dict(boft_block_size=0, boft_block_num=2, target_modules=["lin0", "lin1"], bias="all"),
        MLP_X,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_gradients_and_merges_equal_peft(case: str) -> None:
    build, config, x = CASES[case]
    assert_rotation_case_equals_peft(build, "BOFTConfig", config, x)


def test_bf16_layers_cast_like_peft() -> None:
    assert_bf16_layers_cast_like_peft(
        _seeded(MLP), "BOFTConfig", dict(boft_block_size=4, target_modules=["lin0", "lin1"]), MLP_X
    )


def test_block_dropout_replaces_exactly_int_p_d_random_blocks_like_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training with boft_dropout=0.5 on D=4 blocks: every funcpeft draw equals PEFT's output for one of the 6
    choices of 2 identity blocks (PEFT's choice forced through torch.randperm), and the draws vary."""
    model = _seeded(MLP)
    fpm, pm, adapter = method_pair(
        model, "BOFTConfig", dict(boft_block_size=2, target_modules=["lin0"], boft_dropout=0.5)
    )
    pm.train()
    outs = []
    real_randperm = torch.randperm
    for chosen in itertools.combinations(range(4), 2):
        rest = [i for i in range(4) if i not in chosen]
        perm = torch.empty(4, dtype=torch.long)
        perm[list(chosen)], perm[rest] = torch.tensor([0, 1]), torch.tensor([2, 3])  # mask[i] = ones_first[perm[i]]
        monkeypatch.setattr(torch, "randperm", lambda n, *a, perm=perm, **k: perm)
        with torch.no_grad():
            outs.append(pm(**MLP_X))
    monkeypatch.setattr(torch, "randperm", real_randperm)
    hits = set()
    with torch.no_grad():
        for seed in range(12):
            got = fpm.fn(fpm.base, adapter, **MLP_X, dropout_rng=seed)
            match = [i for i, want in enumerate(outs) if torch.allclose(got, want, atol=1e-6)]
            assert len(match) == 1, f"seed {seed}: not one of PEFT's outputs"
            hits.add(match[0])
        assert torch.equal(fpm.fn(fpm.base, adapter, **MLP_X), pm.eval()(**MLP_X))  # eval: no dropout
    assert len(hits) >= 3


# -- several adapters, transforms -------------------------------------------------------------------------------
def test_two_adapters_on_a_conv_are_refused_clearly() -> None:
    model = _seeded(Conv)
    fpm = funcpeft.get_peft_model(
        model, funcpeft.BOFTConfig(boft_block_size=3, target_modules=["conv"]), adapter_name="a"
    )
    fpm.add_adapter("b", funcpeft.BOFTConfig(boft_block_size=3, target_modules=["conv"]))
    with pytest.raises(NotImplementedError, match="BOFT on a conv layer builds the adapted kernel"):
        fpm.fn(fpm.base, {"a": fpm.adapter, "b": fpm.adapter}, **CONV_X)


def test_mixed_models_refuse_boft_like_peft() -> None:
    model = _seeded(MLP)
    with pytest.raises(ValueError) as theirs:
        peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(target_modules=["lin0"]), mixed=True)
    with pytest.raises(ValueError) as ours:
        funcpeft.get_peft_model(model, funcpeft.BOFTConfig(target_modules=["lin0"]), mixed=True)
    assert "BOFT" in str(ours.value) and "BOFT" in str(theirs.value)


@settings(max_examples=examples(20), deadline=None)
@given(size=st.integers(1, 5), blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_blocks_are_orthogonal_and_merging_inverts(size: int, blocks: int, seed: int) -> None:
    lin = nn.Linear(size * blocks, 3)
    model = nn.Sequential(lin)
    fpm = funcpeft.get_peft_model(model, funcpeft.BOFTConfig(boft_block_size=size, target_modules=["0"]))
    spec = fpm.plans["default"]["0"].spec
    assert spec is not None
    g = torch.Generator().manual_seed(seed)
    params = {
        "boft_R": torch.randn(1, blocks, size, size, generator=g),
        "boft_s": 1 + 0.1 * torch.randn(3, 1, generator=g),
    }
    rot = boft.rotation_matrix(spec, params)
    torch.testing.assert_close(rot @ rot.t(), torch.eye(size * blocks), atol=1e-5, rtol=0)
    w = lin.weight.detach()
    merged = boft.merge_weight(spec, params, w, None)
    torch.testing.assert_close(boft.unmerge_weight(spec, params, merged, None), w, atol=1e-5, rtol=1e-5)
