"""C3A (`C3AConfig`) against PEFT 0.21.2: config checks and errors, unsupported layers, init draws, forward,
gradients (PEFT's hand-written backward is wrong for the input: proven by finite differences), merging (also in
bfloat16); laws (hypothesis). Compile and per-example routing: tests/test_method_transforms.py."""

from __future__ import annotations

import copy
from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import MODELS, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.c3a.utils import BlockCircularConvolution
from peft_matrix import models
from torch import nn
from torch.autograd.gradcheck import GradcheckError

import funcpeft
from funcpeft import testing as T
from funcpeft.methods.base import UnsupportedLayerError
from funcpeft.methods.c3a import block_circular


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(block_size=0, target_modules=["lin0"]),
            "`block_size` should be a positive integer value but the value passed is 0",
        ),
        (
            dict(block_size=4, target_modules=["lin0"]),
            "a factor of the input size. However, the input size is 10 and the block size is 4",
        ),
        (
            dict(block_size=4, target_modules=["lin1"]),
            "a factor of the output size. However, the output size is 2 and the block size is 4",
        ),
        (
            dict(block_size=2, block_size_pattern={"lin0": 3}, target_modules=["lin0"]),
            "the input size is 10 and the block size is 3",
        ),
        (dict(block_size=2, init_weights="foo", target_modules=["lin0"]), "Unknown init_weights: .?foo"),
        (dict(block_size=2, init_weights=None, target_modules=["lin0"]), "Unknown init_weights: None"),
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], match: str) -> None:
    info = mc.assert_raises_like_peft(models.build("MLP"), "C3AConfig", kwargs, ValueError, match)
    if "size is" in match:
        assert "(module 'lin" in str(info.value)  # funcpeft names the module


@pytest.mark.parametrize("target, kind", [("c_attn", "Conv1D"), ("wte", "Embedding")])
def test_unsupported_layers_name_module_and_type(target: str, kind: str) -> None:
    model = T.tiny_gpt2()
    with pytest.raises(TypeError, match="is not supported"):
        peft.get_peft_model(copy.deepcopy(model), peft.C3AConfig(block_size=2, target_modules=[target]))
    with pytest.raises(UnsupportedLayerError, match=rf"Target module '.*{target}' \({kind}\) is not supported"):
        funcpeft.get_peft_model(model, funcpeft.C3AConfig(block_size=2, target_modules=[target]))


@pytest.mark.parametrize("init", [True, False, "xavier_uniform", "gaussian", "kaiming_uniform"])
def test_fresh_adapter_equals_peft_for_the_same_seed(init: Any) -> None:
    kwargs = dict(block_size=16, init_weights=init, target_modules="all-linear", block_size_pattern={"down_proj": 32})
    fpm, pm = mc.build_both(T.tiny_llama(), "C3AConfig", kwargs, seed=4)
    mc.assert_fresh_equals_peft(fpm, pm)


def test_fresh_adapter_is_float32_on_a_bfloat16_model_like_peft() -> None:
    model = MODELS["mlp"]().to(torch.bfloat16)
    fpm, pm = mc.build_both(
        model, "C3AConfig", dict(block_size=4, init_weights="gaussian", target_modules=["lin0", "lin1"])
    )
    mc.assert_fresh_equals_peft(fpm, pm)  # dtype included


# -- PEFT's backward --------------------------------------------------------------------------------------------
def test_peft_block_circular_input_gradient_is_wrong_and_ours_is_right() -> None:
    """Finite differences (gradcheck, float64) accept funcpeft's BCC gradients and reject PEFT's input gradient;
    the kernel gradients agree. PEFT's backward misses a complex conjugate: fft(fft(g) * ifft(w)) instead of
    fft(conj(fft(g)) * ifft(w))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(block_circular, (x, w), fast_mode=True)
    torch.testing.assert_close(block_circular(x, w), BlockCircularConvolution.apply(x, w))
    with pytest.raises(GradcheckError, match="Jacobian mismatch for output 0 with respect to input 0"):
        torch.autograd.gradcheck(BlockCircularConvolution.apply, (x, w), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda k: BlockCircularConvolution.apply(x.detach(), k), (w,), fast_mode=True
    )  # kernel: right


def test_stacked_c3a_layers_get_gradients_by_finite_differences_where_peft_s_are_wrong() -> None:
    """lin0's kernel gets its gradient through lin1's C3A input gradient: PEFT's is off, ours is the derivative
    (central differences of the loss along random directions; C3A computes in float32 like PEFT). lin1's kernel
    gradient does not involve that path: there both agree."""
    fpm, pm = mc.build_both(
        MODELS["mlp"](), "C3AConfig", dict(block_size=4, init_weights="gaussian", target_modules=["lin0", "lin1"])
    )
    fn, base, fresh = fpm
    adapter = {p: {k: t.detach().requires_grad_(True) for k, t in e.items()} for p, e in fresh.items()}
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    x = make_inputs("mlp", batch=3)["x"]
    loss_w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    def loss(k0: torch.Tensor) -> float:
        with torch.no_grad():
            return float((fn(base, {"lin0": {"c3a_kernel": k0}, "lin1": adapter["lin1"]}, x=x) * loss_w).double().sum())

    (fn(base, adapter, x=x) * loss_w).sum().backward()
    (pm(x) * loss_w).sum().backward()
    theirs = T.peft_grads(pm, adapter, fpm.plans["default"])
    k0, eps = adapter["lin0"]["c3a_kernel"].detach(), 1e-2
    for s in range(3):
        v = torch.randn(k0.shape, generator=torch.Generator().manual_seed(10 + s))
        fd = (loss(k0 + eps * v) - loss(k0 - eps * v)) / (2 * eps)
        ours = float((adapter["lin0"]["c3a_kernel"].grad * v).sum())
        peft_dot = float((theirs["lin0"]["c3a_kernel"] * v).sum())
        assert abs(ours - fd) <= 1e-3 * max(1.0, abs(fd)), (ours, fd)
        assert abs(peft_dot - fd) > 0.05 * max(1.0, abs(fd)), (peft_dot, fd)  # PEFT's is wrong
    torch.testing.assert_close(theirs["lin1"]["c3a_kernel"], adapter["lin1"]["c3a_kernel"].grad)


def test_forward_and_gradients_equal_peft_where_its_backward_is_right() -> None:
    """No C3A layer below another trainable one: PEFT's wrong input gradient is never used."""
    kwargs = dict(
        block_size=16, init_weights=True, target_modules=["q_proj", "k_proj", "v_proj"], layers_to_transform=[1]
    )
    fpm, pm = mc.build_both(T.tiny_llama(), "C3AConfig", kwargs)
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, 1)[0], make_inputs("llama"))


# -- merging ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_equal_peft_s(dtype: torch.dtype) -> None:
    """bfloat16: PEFT casts the circulant to the weight's dtype before dividing by in_features; so does funcpeft."""
    model = MODELS["mlp"]().to(dtype)
    fpm, pm = mc.build_both(
        model, "C3AConfig", dict(block_size=4, init_weights="gaussian", target_modules=["lin0", "lin1"])
    )
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    merged = funcpeft.merge(fpm, fpm.base, adapter)
    theirs = dict(pm.merge_and_unload().named_parameters())
    for name in ("lin0.weight", "lin1.weight"):
        assert merged[name].dtype == dtype
        torch.testing.assert_close(merged[name], theirs[name], atol=1e-6 if dtype == torch.float32 else 0, rtol=0)
    back = funcpeft.unmerge(fpm, merged, adapter)
    torch.testing.assert_close(
        back["lin0.weight"], fpm.base["lin0.weight"], atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0
    )


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "C3AConfig", dict(block_size=2, target_modules=["lin0"]))


# -- laws ---------------------------------------------------------------------------------------------------------
@settings(max_examples=examples(15))
@given(m=st.integers(1, 3), n=st.integers(1, 3), b=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_the_update_is_a_block_circulant_matrix(m: int, n: int, b: int, seed: int) -> None:
    """dW's (i, j) block is the circulant of K[i, j]: dW[i*b + p, j*b + q] = K[i, j, (q - p) mod b] / in."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n * b, m * b)).eval()
    fpm = funcpeft.get_peft_model(
        model, funcpeft.C3AConfig(block_size=b, init_weights="gaussian", target_modules=["0"])
    )
    kernel = fpm.adapter["0"]["c3a_kernel"].detach()
    p = torch.arange(b)
    circ = kernel[:, :, (p[None, :] - p[:, None]) % b]  # (m, n, b, b): [i, j, p, q] = K[i, j, (q - p) mod b]
    want = circ.permute(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)
    delta = funcpeft.merge(fpm, fpm.base, fpm.adapter)["0.weight"] - fpm.base["0.weight"]
    torch.testing.assert_close(delta, want, atol=1e-5, rtol=1e-4)
    x = torch.randn(4, n * b)
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, x), model(x) + x @ want.T, atol=1e-5, rtol=1e-4)


def test_block_circular_saves_only_its_inputs_and_keeps_every_transform() -> None:
    """BCC is a custom Function saving only x and the kernel (PEFT's memory; plain autograd keeps the complex
    ifft(x)), with autograd's derivatives (of the plain-ops expression) and vmap."""
    from funcpeft.methods.c3a import _bcc

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    mc.assert_memory_lean_function_is_autograd(block_circular, lambda x, w: _bcc((x, w)), [x, w])
