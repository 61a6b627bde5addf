"""DeFT (`DeftConfig`) against PEFT 0.21.2: config fields and errors, unsupported layers, init draws (the identity
init's R computed from the base weight, bfloat16 models too), forward / gradients away from the init for every
decomposition (PaRa too), dropout in training, merging several adapters (each delta's removal term reads the
pre-merge W0) and unmerging, mixed models refused; laws (hypothesis): the identity init is the base model, a merge
equals the unmerged call, PaRa with QR removes the subspace. PEFT's TEST_CASES rows: tests/test_peft_matrix.py;
compile and per-example routing: tests/test_method_transforms.py and tests/test_contract.py."""

from __future__ import annotations

import copy
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

X = {"X": torch.arange(90).reshape(9, 10) % 7}  # token ids < 100 for EmbConv1D, values for the MLP


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(target_modules=["lin0"], decomposition_method="svd"), ValueError, "Unknown decomposition_method 'svd'"),
        (dict(target_modules="lin0", layers_to_transform=[0]), ValueError, "`layers_to_transform` cannot be used"),
        (dict(target_modules="lin0", layers_pattern=["x"]), ValueError, "`layers_pattern` cannot be used"),
        (dict(target_modules=["lin0"], layers_pattern="x"), ValueError, "`layers_to_transform` must also be"),
        (dict(r=0, target_modules=["lin0"]), ValueError, "`r` should be a positive integer value but the value"),
        (dict(target_modules=["lin0"], deft_dropout=1.5), ValueError, "dropout probability has to be between 0"),
        (dict(target_modules=["lin0"], bias="lora_all"), NotImplementedError, "Requested bias: .?lora_all"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any], exc: type[BaseException], match: str) -> None:
    mc.assert_raises_like_peft(models.build("MLP"), "DeftConfig", kwargs, exc, match)


@pytest.mark.parametrize("model_id, target, kind", [("EmbConv1D", "emb", "Embedding"), ("Conv2d", "conv2d", "Conv2d")])
def test_unsupported_layers_name_module_and_type(model_id: str, target: str, kind: str) -> None:
    """PEFT adapts nn.Linear and GPT-2's Conv1D only."""
    model, config = models.build(model_id), dict(target_modules=[target])
    mc.assert_unsupported_like_peft(
        model,
        "DeftConfig",
        config,
        "Currently, only `torch.nn.Linear` and `transformers.pytorch_utils.Conv1D`",
        rf"'{target}', a torch\.nn\..*{kind} \(",
    )


def test_mixed_is_refused_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "DeftConfig", dict(target_modules=["lin0"]))


CONFIGS: dict[str, dict[str, Any]] = {
    "relu": dict(r=3),
    "qr-alpha": dict(r=4, decomposition_method="qr", alpha=16),
    "relu-r-capped": dict(r=8, alpha=4),  # lin1 has 2 outputs: r becomes 2 there (PEFT's cap), scaling alpha / 2
    "para-relu": dict(r=3, para=True),
    "para-qr": dict(r=3, para=True, decomposition_method="qr"),
    "init-scale": dict(r=2, init_scale=3.0),
}
MODELS = [("MLP", ["lin0", "lin1"]), ("EmbConv1D", ["conv1d", "lin0"])]


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("model_id, targets", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_adapter_equals_peft_for_the_same_seed(model_id: str, targets: list[str], name: str, init: bool) -> None:
    kwargs = {**CONFIGS[name], "target_modules": targets, "init_weights": init}
    fpm, pm = mc.build_both(models.build(model_id), "DeftConfig", kwargs, seed=5)
    mc.assert_fresh_equals_peft(fpm, pm)
    for path, entry in fpm.plans["default"].items():
        assert entry.spec is not None
        assert entry.spec.hyper.r == pm.get_submodule(f"base_model.model.{path}").deft_r["default"], path


@pytest.mark.parametrize("model_id, targets", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_peft_away_from_the_init(model_id: str, targets: list[str], name: str) -> None:
    fpm, pm = mc.build_both(models.build(model_id), "DeftConfig", {**CONFIGS[name], "target_modules": targets})
    for adapter in mc.random_trees(fpm.adapter, n=2, scale=0.3):
        mc.assert_matches_peft_with(fpm, pm, adapter, X, atol=1e-4)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], decomposition_method="qr")),
        ("llama", dict(r=4, target_modules="all-linear", alpha=8)),
    ],
)
def test_gpt2_and_llama_match_peft(kind: str, kwargs: dict[str, Any]) -> None:
    model = T.tiny_gpt2() if kind == "gpt2" else T.tiny_llama()
    fpm, pm = mc.build_both(model, "DeftConfig", kwargs, seed=1)
    mc.assert_fresh_equals_peft(fpm, pm)
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], make_inputs(kind), atol=1e-4)


@pytest.mark.parametrize("init", [True, False])
def test_bfloat16_model_init_and_forward_match_peft(init: bool) -> None:
    """PEFT computes the identity init's R in float32 before rounding the fresh adapter through bfloat16 and
    upcasting it (autocast_adapter_dtype); the forward runs in float32 and returns bfloat16."""
    model: Any = models.build("MLP", dtype=torch.bfloat16)
    model.dtype = torch.bfloat16  # the model casts its input to it
    kwargs: dict[str, Any] = dict(target_modules=["lin0", "lin1"], decomposition_method="qr", init_weights=init)
    fpm, pm = mc.build_both(model, "DeftConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], {"X": torch.randn(4, 10)}, atol=2e-2)


def test_dropout_one_drops_only_the_injection_in_training_like_peft() -> None:
    """deft_dropout=1 zeroes the injection's input: the output is the base minus the removal term (deterministic,
    so PEFT's training-mode output is the reference)."""
    model: Any = models.build("MLP")
    model.drop.p = 0.0  # the MLP's own dropout, which both run in training
    kwargs: dict[str, Any] = dict(
        target_modules=["lin0"], deft_dropout=1.0, init_weights=False, decomposition_method="qr"
    )
    fpm, pm = mc.build_both(model, "DeftConfig", kwargs)
    x = torch.randn(5, 10)
    adapter = mc.random_trees(fpm.adapter, n=1)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    pm.train()
    with torch.no_grad():
        want = pm(X=x)
        got = fpm.fn(fpm.base, adapter, X=x, dropout_rng=0)
        para = funcpeft.get_peft_model(model, funcpeft.DeftConfig(**{**kwargs, "para": True}))
        removal_only = para.fn(para.base, {"lin0": {"deft_P": adapter["lin0"]["deft_P"]}}, X=x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, removal_only, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, fpm.fn(fpm.base, adapter, X=x))  # in eval the injection is there


def test_two_adapters_merge_like_peft_and_unmerge() -> None:
    """PEFT computes every adapter's removal factor right^T W0 from the weight before the merge, so merging two
    adapters is W0 + d1(W0) + d2(W0) (= the unmerged call), not a composition; `unmerge(base=)` restores W0 bitwise;
    without `base` funcpeft refuses (the merged weight has lost part of W0; PEFT's cache-less fallback is far off)."""
    model = models.build("MLP")
    kwargs: dict[str, Any] = dict(target_modules=["lin0"], init_weights=False, decomposition_method="qr")
    fpm = funcpeft.get_peft_model(model, funcpeft.DeftConfig(**kwargs))
    fpm.add_adapter("other", funcpeft.DeftConfig(**{**kwargs, "alpha": 4}))
    a1, a2 = mc.random_trees(fpm.adapter, n=2)
    both = {"default": a1, "other": a2}
    merged = funcpeft.merge(fpm, fpm.base, both)
    pm: Any = peft.get_peft_model(copy.deepcopy(model), peft.DeftConfig(**kwargs))
    pm.add_adapter("other", peft.DeftConfig(**{**kwargs, "alpha": 4}))
    T.copy_into_peft(pm, a1, fpm.plans["default"])
    T.copy_into_peft(pm, a2, fpm.plans["other"], adapter_name="other")
    pm.base_model.set_adapter(["default", "other"])
    x = torch.randn(3, 10)
    with torch.no_grad():
        pm.base_model.merge_adapter()
        torch.testing.assert_close(merged["lin0.weight"], pm.base_model.model.lin0.base_layer.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(fpm.fn(merged, None, X=x), fpm.fn(fpm.base, both, X=x), atol=1e-5, rtol=1e-5)
    assert torch.equal(funcpeft.unmerge(fpm, merged, both, base=fpm.base)["lin0.weight"], fpm.base["lin0.weight"])
    with pytest.raises(ValueError, match=r"DeFT cannot be unmerged from the merged weight alone.*base=base"):
        funcpeft.unmerge(fpm, merged, both)


def _layer(out_f: int, in_f: int, seed: int, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    return funcpeft.get_peft_model(model, funcpeft.DeftConfig(target_modules=["0"], **kwargs))


SHAPES = dict(out_f=st.integers(1, 8), in_f=st.integers(1, 8), r=st.integers(1, 6), seed=st.integers(0, 2**16))


@settings(max_examples=examples(15), deadline=None)
@given(**SHAPES, method=st.sampled_from(["relu", "qr"]), alpha=st.sampled_from([None, 1, 16]))
def test_the_identity_init_is_the_base_layer(
    out_f: int, in_f: int, r: int, seed: int, method: str, alpha: int | None
) -> None:
    fpm = _layer(out_f, in_f, seed, r=r, decomposition_method=method, alpha=alpha)
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed))
    assert fpm.plans["default"]["0"].spec.hyper.r == min(r, out_f)
    torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, x), fpm.model(x), atol=1e-5, rtol=1e-5)


@settings(max_examples=examples(15), deadline=None)
@given(**SHAPES, method=st.sampled_from(["relu", "qr"]), para=st.booleans())
def test_merging_equals_the_unmerged_call(out_f: int, in_f: int, r: int, seed: int, method: str, para: bool) -> None:
    fpm = _layer(out_f, in_f, seed, r=r, decomposition_method=method, para=para, init_weights=False)
    adapter = mc.random_trees(fpm.adapter, n=1, scale=0.5)[0]
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed))
    merged = funcpeft.merge(fpm, fpm.base, adapter)
    torch.testing.assert_close(fpm.fn(merged, None, x), fpm.fn(fpm.base, adapter, x), atol=1e-5, rtol=1e-5)


@settings(max_examples=examples(15), deadline=None)
@given(**SHAPES)
def test_para_with_qr_removes_the_subspace(out_f: int, in_f: int, r: int, seed: int) -> None:
    """W' = (I - Q Q^T) W with Q = qr(P).Q orthonormal: Q^T W' = 0 and W' - W lies in span(Q)."""
    fpm = _layer(out_f, in_f, seed, r=r, decomposition_method="qr", para=True)
    adapter = mc.random_trees(fpm.adapter, n=1, scale=0.5)[0]
    w = fpm.base["0.weight"].double()
    merged = funcpeft.merge(fpm, fpm.base, adapter)["0.weight"].double()
    q, _ = torch.linalg.qr(adapter["0"]["deft_P"].double())
    assert (q.T @ merged).abs().max() < 1e-5
    torch.testing.assert_close(q @ (q.T @ (merged - w)), merged - w, atol=1e-5, rtol=0)
