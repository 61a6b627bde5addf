"""RandLoRA (`RandLoraConfig`) against PEFT 0.21.2: config checks and errors, unsupported layers, the shared random
bases (dense / sparse / very_sparse, frozen, bitwise PEFT's), init draws, dropout, files with and without the
bases, merging (also in bfloat16); laws (hypothesis). Compile and routing: test_method_transforms.py."""

from __future__ import annotations

from typing import Any

import method_checks as mc
import pytest
import torch
from helpers import MODELS, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import SHARED_PREFIX
from funcpeft.methods.base import UnsupportedLayerError


def test_config_checks() -> None:
    with pytest.warns(UserWarning, match="Specified to not save basis_A and basis_B"):
        funcpeft.RandLoraConfig(save_projection=False)
    # PEFT accepts r=0 and fails with a ZeroDivisionError at get_peft_model
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        funcpeft.RandLoraConfig(r=0)
    with pytest.raises(NotImplementedError, match="Requested bias"):
        funcpeft.RandLoraConfig(bias="lora")


def test_unsupported_layers_raise_like_peft() -> None:
    model = T.tiny_gpt2()
    mc.assert_raises_like_peft(
        model,
        "RandLoraConfig",
        dict(target_modules=["wte"]),
        ValueError,
        "No layers types compatible with RandLora were found",
    )
    info = mc.assert_raises_like_peft(
        model, "RandLoraConfig", dict(target_modules=["c_attn", "wte"]), ValueError, "is not supported"
    )
    assert isinstance(info.value, UnsupportedLayerError)
    assert "Target module 'transformer.wte' (Embedding)" in str(info.value)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(r=8, target_modules="all-linear", init_weights=False)),  # in > out and in < out layers
        ("llama", dict(r=24, target_modules=["k_proj", "up_proj"], sparse=True)),  # 24 does not divide 64: ceil
        (
            "gpt2",
            dict(r=8, target_modules=["c_attn", "c_fc"], very_sparse=True, init_weights=False, projection_prng_key=5),
        ),
    ],
)
def test_fresh_adapter_and_bases_equal_peft_for_the_same_seed(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "RandLoraConfig", kwargs, seed=1)
    mc.assert_fresh_equals_peft(fpm, pm)
    entry = next(iter(fpm.plans["default"].values()))
    for name, key in entry.frozen:
        assert key.startswith(SHARED_PREFIX)
        assert torch.equal(fpm.base[key], getattr(pm.base_model, name)["default"]), name
    shared = [k for k in fpm.base if k.startswith(SHARED_PREFIX)]
    assert len(shared) == 2  # one A and one B for all layers
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()  # the bases are not counted


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(r=8, randlora_alpha=16, target_modules=["k_proj", "up_proj", "down_proj"])),
        ("gpt2", dict(r=8, randlora_alpha=16, target_modules=["c_attn", "mlp.c_proj"], sparse=True)),
    ],
)
def test_forward_gradients_and_merge_equal_peft(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "RandLoraConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.05)[0]
    x = make_inputs(kind)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    mc.merged_like_peft(fpm, pm, adapter, x)


def test_training_dropout_matches_peft_given_the_same_masks() -> None:
    fpm, pm = mc.build_both(
        T.tiny_llama(), "RandLoraConfig", dict(r=8, randlora_dropout=0.3, target_modules=["q_proj", "down_proj"])
    )
    fn, base, fresh = fpm
    adapter = mc.random_trees(fresh, 1, scale=0.05)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    mc.patch_peft_dropout(pm, "randlora_dropout", 0.3, seed=5)
    x = make_inputs("llama")
    with torch.no_grad():
        want = pm.train()(**x).logits
        got = fn(base, adapter, **x, dropout_rng=torch.Generator().manual_seed(5)).logits
        plain = fn(base, adapter, **x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-4


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_with_and_without_the_bases_load_both_ways(save_projection: bool, tmp_path: Any) -> None:
    model = T.tiny_llama()
    kwargs = dict(r=8, target_modules=["q_proj", "k_proj"], save_projection=save_projection, projection_prng_key=9)
    fpm, pm = mc.build_both(model, "RandLoraConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.05)[0]
    ours = mc.files_equal_and_load_both_ways(fpm, pm, model, adapter, tmp_path, make_inputs("llama"))
    bases = [k for k in ours if k.endswith(("randlora_A", "randlora_B"))]
    assert len(bases) == (2 + 2 * 4 if save_projection else 0)  # base_model.* and a copy under each layer


def test_merged_bfloat16_weights_equal_peft_s() -> None:
    """PEFT casts the delta to the weight's dtype before adding it; so does funcpeft."""
    model = MODELS["mlp"]().to(torch.bfloat16)
    fpm, pm = mc.build_both(model, "RandLoraConfig", dict(r=4, target_modules=["lin0", "lin1"], init_weights=False))
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    assert fpm.base["lin0.weight"].dtype == torch.bfloat16
    mc.assert_merged_weights_bitwise_peft_s(fpm, pm, adapter, ["lin0.weight", "lin1.weight"])


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "RandLoraConfig", dict(r=2, target_modules=["lin0"]))


@settings(max_examples=examples(15))
@given(
    in_f=st.integers(2, 12), out_f=st.integers(2, 12), r=st.integers(1, 5), seed=st.integers(0, 2**16)
)  # 1 x 1: std of one value is nan (in PEFT too)
def test_the_update_is_lambda_gamma_scaled_bases(in_f: int, out_f: int, r: int, seed: int) -> None:
    """dW = s * sum_t B[:, t // r, t % r] (lambda[t // n, t % n] A[t // n, 0, :] gamma[t % n]) in (max, min)
    orientation (PEFT flattens B as (n, r) but lambda * A * gamma as (r, n): its pairing, kept), and the forward adds
    exactly x @ dW^T (both orientations: in <= out and in > out)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    fpm = funcpeft.get_peft_model(
        model, funcpeft.RandLoraConfig(r=r, randlora_alpha=3, target_modules=["0"], init_weights=False)
    )
    (_, key_a), (_, key_b) = fpm.plans["default"]["0"].frozen
    a, b = fpm.base[key_a].double(), fpm.base[key_b].double()
    lam, gamma = (fpm.adapter["0"][k].detach().double() for k in ("randlora_lambda", "randlora_gamma"))
    k, big, n = min(in_f, out_f), max(in_f, out_f), lam.shape[1]
    update = torch.zeros(big, k, dtype=torch.float64)
    for t in range(r * n):
        update += torch.outer(b[:big, t // r, t % r], lam[t // n, t % n] * a[t // n, 0, :k] * gamma[t % n])
    update = update * 3 / r  # (max, min)
    dw = update if k == in_f else update.T  # (out, in)
    delta = funcpeft.merge(fpm, fpm.base, fpm.adapter)["0.weight"] - fpm.base["0.weight"]
    torch.testing.assert_close(delta.double(), dw, atol=1e-5, rtol=1e-4)
    x = torch.randn(3, in_f)
    with torch.no_grad():
        torch.testing.assert_close(
            fpm.fn(fpm.base, fpm.adapter, x).double(), model(x).double() + x.double() @ dw.T, atol=1e-4, rtol=1e-4
        )


def test_scaled_basis_saves_only_its_inputs_and_keeps_every_transform() -> None:
    """`lam[:, :, None] * A * gamma[None]` is a custom Function saving only A (r, 1, k), lam (r, n) and gamma
    (n, k) (PEFT's UniqueBaseGrad memory, not autograd's extra (r, n, k) product), with autograd's derivatives."""
    from peft.tuners.randlora.layer import UniqueBaseGrad

    from funcpeft.methods.randlora import _ScaledBasis

    r, n, k = 3, 4, 5
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((r, 1, k), (r, n), (n, k))]
    mc.assert_memory_lean_function_is_autograd(
        _ScaledBasis.apply, lambda a, lam, gamma: lam[:, :, None] * a * gamma[None], xs
    )
    # and its lambda / gamma gradients are PEFT's (A frozen there)
    out = _ScaledBasis.apply(xs[0].detach(), xs[1], xs[2])
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((out * weights).sum(), xs[1:])
    theirs = torch.autograd.grad((UniqueBaseGrad.apply(xs[0].detach(), xs[1], xs[2]) * weights).sum(), xs[1:])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
