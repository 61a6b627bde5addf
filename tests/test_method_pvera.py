"""PVeRA (`PveraConfig`) against PEFT 0.21.2: config fields and checks, unsupported layers, the shared projections
and init draws (bitwise PEFT's), the training-mode sampling (same noise as PEFT's seeded generator: outputs and
gradients), sample_at_inference, files with and without the projections, merging; laws (hypothesis). Compile and
per-example routing: test_method_transforms.py (and test_contract.py on the tiny transformers models)."""

from __future__ import annotations

from typing import Any

import method_checks as mc
import optree
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
from funcpeft._trees import SHARED_PREFIX
from funcpeft.methods.base import UnsupportedLayerError


def test_config_checks() -> None:
    with pytest.warns(UserWarning, match="Specified to not save pvera_A and pvera_B"):
        funcpeft.PveraConfig(save_projection=False)
    with pytest.raises(ValueError, match="`layers_to_transform` must also be specified"):
        funcpeft.PveraConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match="`layers_to_transform` must also be specified"):
        peft.PveraConfig(layers_pattern="layers")
    # PEFT refuses r=0 at get_peft_model (update_layer), funcpeft already in the config, with PEFT's message
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        funcpeft.PveraConfig(r=0)
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        peft.get_peft_model(models.build("MLP"), peft.PveraConfig(r=0, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="pvera_dropout"):
        funcpeft.PveraConfig(pvera_dropout=1.5)
    with pytest.raises(NotImplementedError, match="Requested bias"):
        funcpeft.PveraConfig(bias="lora")
    with pytest.raises(TypeError, match="sample_at_inferenc"):
        funcpeft.PveraConfig(sample_at_inferense=True)  # type: ignore[call-arg]


def test_unsupported_layers_raise_like_peft() -> None:
    model = T.tiny_gpt2()
    mc.assert_raises_like_peft(
        model, "PveraConfig", dict(r=4, target_modules=["wte"]), ValueError, "No layers types compatible with PVeRA"
    )
    info = mc.assert_raises_like_peft(
        model, "PveraConfig", dict(r=4, target_modules=["c_attn", "wte"]), ValueError, "is not supported"
    )
    assert isinstance(info.value, UnsupportedLayerError)
    assert "Target module 'transformer.wte' (Embedding)" in str(info.value)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(r=8, target_modules="all-linear", init_weights=False)),
        ("llama", dict(r=4, target_modules=["k_proj", "up_proj"], d_initial=0.3)),
        ("gpt2", dict(r=8, target_modules=["c_attn", "c_fc"], init_weights=False, projection_prng_key=5)),
    ],
)
def test_fresh_adapter_and_projections_equal_peft_for_the_same_seed(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "PveraConfig", kwargs, seed=1)
    mc.assert_fresh_equals_peft(fpm, pm)
    entry = next(iter(fpm.plans["default"].values()))
    for name, key in entry.frozen:
        assert key.startswith(SHARED_PREFIX)
        assert torch.equal(fpm.base[key], getattr(pm.base_model, name)["default"]), name
    assert fpm.base[entry.frozen[0][1]].shape[0] == 2 * kwargs["r"]  # A: mean and log-variance rows
    assert len([k for k in fpm.base if k.startswith(SHARED_PREFIX)]) == 2  # one A and one B for all layers
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()  # A and B are not counted


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(r=8, target_modules=["k_proj", "up_proj", "down_proj"])),
        ("gpt2", dict(r=8, target_modules=["c_attn", "mlp.c_proj"], init_weights=False)),
    ],
)
def test_forward_gradients_and_merge_equal_peft(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "PveraConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.3)[0]
    x = make_inputs(kind)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    mc.merged_like_peft(fpm, pm, adapter, x)


def _one_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))


def test_training_samples_like_peft_given_the_same_noise() -> None:
    """A training call draws eps ~ N(0, 1) of mu's shape from the call's generator: with one adapted layer this is
    the draw of PEFT's generator seeded with generator_seed, so outputs and every gradient (the log-variance half of
    lambda_d only gets one in training) are PEFT's train-mode ones."""
    kwargs = dict(r=4, target_modules=["0"], init_weights=False, generator_seed=5)
    fpm, pm = mc.build_both(_one_layer(), "PveraConfig", kwargs)
    fn, base, fresh = fpm
    adapter: Any = optree.tree_map(lambda t: t.detach().requires_grad_(True), mc.random_trees(fresh, 1, scale=0.5)[0])
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    got = fn(base, adapter, x, dropout_rng=torch.Generator().manual_seed(5))
    (got * weights).sum().backward()
    want = pm.train()(x)
    (want * weights).sum().backward()
    torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    T.assert_trees_close(
        optree.tree_map(lambda t: t.grad, adapter),
        T.peft_grads(pm, adapter, fpm.plans["default"]),
        atol=1e-5,
        rtol=1e-4,
    )
    logvar_grad = adapter["0"]["pvera_lambda_d"].grad[4:]
    assert logvar_grad.abs().sum() > 0
    with torch.no_grad():
        plain = fn(base, adapter, x)
        again = fn(base, adapter, x, dropout_rng=torch.Generator().manual_seed(5))
        other = fn(base, adapter, x, dropout_rng=torch.Generator().manual_seed(6))
    assert (plain - got).abs().max() > 1e-3  # eval uses the mean
    assert torch.equal(again, got.detach()) and (other - got).abs().max() > 1e-3  # the call's randomness only
    eval_grad = torch.autograd.grad(fn(base, adapter, x).sum(), adapter["0"]["pvera_lambda_d"])[0]
    assert torch.equal(eval_grad[4:], torch.zeros(4))  # eval: the log-variance half is unused


def test_sample_at_inference_needs_the_call_s_randomness() -> None:
    kwargs = dict(r=4, target_modules=["0"], sample_at_inference=True, generator_seed=5)
    fpm, pm = mc.build_both(_one_layer(), "PveraConfig", kwargs)
    fn, base, adapter = fpm
    x = torch.randn(2, 10)
    with pytest.raises(NotImplementedError, match=r"PVeRA at '0': sample_at_inference=True samples in eval mode"):
        fn(base, adapter, x)
    with torch.no_grad():  # a training call samples; PEFT samples in eval mode with the same generator
        torch.testing.assert_close(
            fn(base, adapter, x, dropout_rng=torch.Generator().manual_seed(5)), pm.eval()(x), atol=1e-6, rtol=0
        )


def test_per_example_training_call_samples_per_element() -> None:
    """Routing per example works in training too (the batched forward, one noise draw for the whole batch)."""
    fpm = funcpeft.get_peft_model(_one_layer(), funcpeft.PveraConfig(r=4, target_modules=["0"], init_weights=False))
    fn, base, fresh = fpm
    trees = mc.random_trees(fresh, 2, scale=0.5)
    x = torch.randn(4, 10)
    routed = funcpeft.per_example(funcpeft.stack_adapters(trees), torch.tensor([1, 0, 1, 0]))
    with torch.no_grad():
        out = fn(base, routed, x, dropout_rng=3)
        assert torch.equal(out, fn(base, routed, x, dropout_rng=3))
        eval_out = fn(base, routed, x)
        for i, k in enumerate([1, 0, 1, 0]):
            torch.testing.assert_close(eval_out[i], fn(base, trees[k], x)[i], atol=1e-6, rtol=0)
    assert (out - eval_out).abs().max() > 1e-3


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_with_and_without_the_projections_load_both_ways(save_projection: bool, tmp_path: Any) -> None:
    model = T.tiny_llama()
    kwargs = dict(r=8, target_modules=["q_proj", "k_proj"], save_projection=save_projection, projection_prng_key=9)
    fpm, pm = mc.build_both(model, "PveraConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.3)[0]
    ours = mc.files_equal_and_load_both_ways(fpm, pm, model, adapter, tmp_path, make_inputs("llama"))
    assert ("base_model.pvera_A" in ours) == save_projection


def test_merged_bfloat16_weights_equal_peft_s() -> None:
    """PEFT adds the float32 delta to the bf16 weight (promoted add); on a bf16 model it also rounds the shared
    projections to bf16 (moved to the layer's dtype, then upcast), as funcpeft does: the merge is bitwise."""
    model = MODELS["mlp"]().to(torch.bfloat16)
    fpm, pm = mc.build_both(model, "PveraConfig", dict(r=4, target_modules=["lin0", "lin1"], init_weights=False))
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    frozen = dict(fpm.plans["default"]["lin0"].frozen)
    for name, key in frozen.items():  # the rounded projections are PEFT's, bitwise
        assert torch.equal(fpm.base[key], getattr(pm.base_model, name)["default"]), name
    assert fpm.base["lin0.weight"].dtype == torch.bfloat16
    mc.assert_merged_weights_bitwise_peft_s(fpm, pm, adapter, ["lin0.weight", "lin1.weight"])


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "PveraConfig", dict(r=2, target_modules=["lin0"]))


@settings(max_examples=examples(15))
@given(in_f=st.integers(1, 12), out_f=st.integers(1, 12), r=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_update_is_the_mean_half_of_scaled_projections(in_f: int, out_f: int, r: int, seed: int) -> None:
    """dW = (lambda_b * B) @ (lambda_d[:r] * A[:r]) with the shared A (2r, in), B (out, r), and an eval call adds
    exactly x @ dW^T; the log-variance half of lambda_d does not change it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    fpm = funcpeft.get_peft_model(model, funcpeft.PveraConfig(r=r, target_modules=["0"], init_weights=False))
    (_, key_a), (_, key_b) = fpm.plans["default"]["0"].frozen
    a, b = fpm.base[key_a].double(), fpm.base[key_b].double()
    assert a.shape == (2 * r, in_f) and b.shape == (out_f, r)
    lb, ld = (fpm.adapter["0"][k].detach().double() for k in ("pvera_lambda_b", "pvera_lambda_d"))
    dw = (lb[:, None] * b) @ (ld[:r, None] * a[:r])
    delta = funcpeft.merge(fpm, fpm.base, fpm.adapter)["0.weight"] - fpm.base["0.weight"]
    torch.testing.assert_close(delta.double(), dw, atol=1e-5, rtol=1e-4)
    x = torch.randn(3, in_f)
    other = {"0": {**fpm.adapter["0"], "pvera_lambda_d": torch.cat([ld[:r], 7 * ld[r:]]).float()}}
    with torch.no_grad():
        for tree in (fpm.adapter, other):
            torch.testing.assert_close(
                fpm.fn(fpm.base, tree, x).double(), model(x).double() + x.double() @ dw.T, atol=1e-4, rtol=1e-4
            )
