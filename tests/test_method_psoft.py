"""PSOFT (`PsoftConfig`) against PEFT 0.21.2: config checks, errors and warnings, unsupported layers, init draws
and the frozen SVD factors (full / lowrank, psoft / pissa init; not saved, rebuilt from the base weight on load),
forward, gradients, merge, bf16; laws (hypothesis): the Cayley R is orthogonal, s B A is W's rank-r truncation,
psoft_dropout=1 drops the update in training. Compile and per-example routing: tests/test_method_transforms.py;
vmap and routing on tiny-llama: tests/test_contract.py."""

from __future__ import annotations

import warnings
from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods import psoft

LLAMA: dict[str, Any] = dict(r=4, psoft_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _factors(fpm: Any, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    frozen = dict(fpm.plans["default"][path].frozen)
    return fpm.base[frozen[psoft.A_CACHE]], fpm.base[frozen[psoft.B_CACHE]]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(r=0, target_modules=["lin0"]), ValueError, r"`r` must be a positive integer; got 0\."),
        (dict(ab_svd_init="olora", target_modules=["lin0"]), ValueError, r"`ab_svd_init` must be one of"),
        (dict(psoft_svd="qr", target_modules=["lin0"]), ValueError, r"`psoft_svd` must be one of"),
        (
            dict(use_cayley_neumann=True, num_cayley_neumann_terms=0, target_modules=["lin0"]),
            ValueError,
            "`num_cayley_neumann_terms` must be a positive integer",
        ),
        (
            dict(use_cayley_neumann=True, cayley_neumann_eps=1.5, target_modules=["lin0"]),
            ValueError,
            r"`cayley_neumann_eps` must be in \(0, 1\)",
        ),
        (dict(target_modules="lin0", layers_to_transform=[0]), ValueError, "`layers_to_transform` cannot be used"),
        (dict(target_modules=["lin0"], layers_pattern="h"), ValueError, "`layers_to_transform` must also be specified"),
        # at get_peft_model: lin1 is (2, 20)
        (dict(r=4, target_modules=["lin1"]), ValueError, r"`r` \(4\) must be less than or equal to min"),
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], exc: type[BaseException], match: str) -> None:
    info = mc.assert_raises_like_peft(models.build("MLP"), "PsoftConfig", kwargs, exc, match)
    if "min" in match:
        assert "'lin1'" in str(info.value)  # funcpeft names the module


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(psoft_svd_lowrank_niter=3),
        dict(num_cayley_neumann_terms=7),
        dict(cayley_neumann_eps=0.5),
    ],
)
def test_ignored_fields_warn_like_peft(kwargs: dict[str, Any]) -> None:
    messages = []
    for lib in (peft, funcpeft):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.PsoftConfig(target_modules=["lin0"], **kwargs)
        messages.append([str(w.message) for w in caught if "only used when" in str(w.message)])
    assert len(messages[0]) == 1 and messages[0] == messages[1]


def test_unsupported_layers_name_module_and_type() -> None:
    """PEFT adapts nn.Linear only: GPT-2's Conv1D is refused like an embedding."""
    mc.assert_linear_only_like_peft("PsoftConfig", ValueError, "is not supported by minimal PSOFT", dict(r=2))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(init_weights=False),
        dict(init_weights=False, psoft_orth=False, psoft_mag_a=False),
        dict(ab_svd_init="pissa_init", psoft_svd="lowrank", psoft_svd_lowrank_niter=2, random_seed=3),
    ],
)
def test_fresh_adapter_and_svd_factors_equal_peft_for_the_same_seed(options: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(T.tiny_llama(), "PsoftConfig", {**LLAMA, **options}, seed=2)
    after_peft = torch.randn(3)  # the lowrank SVD seeds a fork: the global stream goes on like PEFT's
    mc.assert_fresh_equals_peft(fpm, pm)
    for path in fpm.plans["default"]:
        layer: Any = pm.get_submodule(f"base_model.model.{path}")
        a, b = _factors(fpm, path)
        assert torch.equal(a, layer._psoft_A_cache["default"]), path
        assert torch.equal(b, layer._psoft_B_cache["default"]), path
    torch.manual_seed(2)
    _ = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.PsoftConfig(**LLAMA, **options))
    torch.testing.assert_close(torch.randn(3), after_peft, atol=0, rtol=0)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(use_cayley_neumann=True, cayley_neumann_eps=0.2, num_cayley_neumann_terms=6), dict(psoft_orth=False)],
)
def test_forward_gradients_and_merge_equal_peft(options: dict[str, Any]) -> None:
    mc.assert_forward_and_merge_equal_peft(
        T.tiny_llama(), "PsoftConfig", {**LLAMA, **options}, make_inputs("llama"), 0.3
    )


def test_only_R_is_saved_and_loading_rebuilds_the_factors_from_the_base_like_peft(tmp_path: Any) -> None:
    """A and B are non-persistent buffers in PEFT: not in the file, recomputed from the (here changed) base weight."""
    model = T.tiny_llama()
    fpm = funcpeft.get_peft_model(model, funcpeft.PsoftConfig(r=2, target_modules=["q_proj"], init_weights=False))
    assert fpm.get_nb_trainable_parameters()[0] == 2 * (1 + 2 + 2)  # r(r-1)/2 + two vectors; A, B not counted
    saved, paths, back, pm = mc.saved_and_reloaded_on_changed_weights(
        fpm, model, tmp_path, ("psoft_R.weight", "psoft_R.vector_b", "psoft_R.vector_a"), torch.randn_like
    )
    for p in paths:
        layer: Any = pm.get_submodule(f"base_model.model.{p}")
        a, b = _factors(back, p)
        assert torch.equal(a, layer._psoft_A_cache["default"]) and torch.equal(b, layer._psoft_B_cache["default"])
        assert not torch.equal(a, _factors(fpm, p)[0])
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(back.fn(back.base, back.adapter, **x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "PsoftConfig", dict(r=2, target_modules=["lin0"]))


def test_a_bf16_model_equals_peft() -> None:
    """autocast_adapter_dtype: R and the vectors become float32; A and B are float32 in both (fp32 SVD)."""
    kwargs = {**LLAMA, "init_weights": False}
    fpm, pm = mc.build_both(T.tiny_llama().bfloat16(), "PsoftConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)
    for path in fpm.plans["default"]:
        layer: Any = pm.get_submodule(f"base_model.model.{path}")
        a, _ = _factors(fpm, path)
        assert a.dtype == layer._psoft_A_cache["default"].dtype == torch.float32
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, 1)[0], make_inputs("llama"), atol=1e-2)


def _layer(out_f: int, in_f: int, r: int, seed: int, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    return funcpeft.get_peft_model(model, funcpeft.PsoftConfig(r=r, target_modules=["0"], **kwargs))


@settings(max_examples=examples(15), deadline=None)
@given(
    shape=st.tuples(st.integers(2, 8), st.integers(2, 8)),
    r=st.integers(1, 8),
    alpha=st.integers(1, 16),
    pissa=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_factors_are_the_rank_r_truncation_and_R_is_orthogonal(
    shape: tuple[int, int], r: int, alpha: int, pissa: bool, seed: int
) -> None:
    """s B A = U_r S_r Vh_r, so ||W - s B A||_2 = sigma_(r+1); the Cayley R without magnitudes is orthogonal."""
    r = min(r, *shape)
    init = "pissa_init" if pissa else "psoft_init"
    fpm = _layer(*shape, r, seed, psoft_alpha=alpha, ab_svd_init=init, psoft_mag_a=False, psoft_mag_b=False)
    a, b = _factors(fpm, "0")
    spec = fpm.plans["default"]["0"].spec
    w = fpm.base["0.weight"].double()
    rest = torch.linalg.matrix_norm(w - spec.hyper.scaling * b.double() @ a.double(), ord=2)
    sigma = torch.linalg.svdvals(w)
    torch.testing.assert_close(rest, sigma[r] if r < len(sigma) else torch.zeros((), dtype=w.dtype), atol=1e-5, rtol=0)
    leaf = torch.randn(r * (r - 1) // 2, generator=torch.Generator().manual_seed(seed))
    rot = psoft.matrix(spec, {psoft.R: leaf})
    torch.testing.assert_close(rot @ rot.T, torch.eye(r), atol=1e-5, rtol=0)


def test_psoft_dropout_one_drops_the_whole_update_in_training() -> None:
    fpm = _layer(6, 5, 2, 0, psoft_dropout=1.0, init_weights=False)
    mc.assert_full_dropout_drops_the_update(fpm, torch.randn(4, 5))
