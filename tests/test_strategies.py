"""Properties of funcpeft checked with its own public hypothesis strategies (funcpeft.strategies) and
assertions (funcpeft.testing), plus the guarantees those helpers make (they must be able to fail)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import peft
import pytest
import torch
from helpers import examples, hf_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcpeft
from funcpeft import strategies as fst
from funcpeft import testing as T
from funcpeft.methods.base import Method


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_xdist_worker() -> Iterator[None]:
    """`make test` runs 2 workers on 2 cores: 2 torch threads each oversubscribe the CPU (measured 3-4x slower)."""
    threads = torch.get_num_threads()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quiet_peft_model(model: nn.Module, kw: dict) -> funcpeft.FunctionalPeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out on GPT-2, unused rank_pattern keys: expected here
        return funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kw))


# -- properties of funcpeft ------------------------------------------------------------------------------------
@given(st.data())
def test_any_drawn_config_matches_peft(data: st.DataObject) -> None:
    """Differential: same adapted parameters and same outputs as peft, for any valid config and adapter values."""
    model, kw = data.draw(fst.models_and_configs())
    adapter = data.draw(fst.adapter_trees(_quiet_peft_model(model, kw).adapter))
    inputs: dict[str, Any] = data.draw(fst.model_inputs(model))  # Any: spread next to typed keyword options
    T.assert_matches_peft(model, kw, adapter, **inputs)


@given(st.data())
def test_fresh_adapter_is_a_noop(data: st.DataObject) -> None:
    model, kw = data.draw(fst.models_and_configs(init_lora_weights=[True, "gaussian"]))
    fn, base, adapter = _quiet_peft_model(model, kw)
    T.assert_adapter_is_noop(fn, base, adapter, model, **data.draw(fst.model_inputs(model)))


@given(st.data())
def test_only_the_adapter_receives_gradients(data: st.DataObject) -> None:
    model, kw = data.draw(fst.models_and_configs())
    fn, base, fresh = _quiet_peft_model(model, kw)
    adapter = data.draw(fst.adapter_trees(fresh))
    inputs = data.draw(fst.model_inputs(model, min_len=2))  # one token: attention ignores k_proj (zero gradient)
    T.assert_only_adapter_gets_grads(lambda a, b: fn(b, a, **inputs).logits.square().mean(), adapter, base)
    assert all(p.grad is None for p in model.parameters()), "the model's own parameters received gradients"


@settings(max_examples=examples(8))
@given(st.data(), st.integers(2, 3))
def test_vmap_over_stacked_adapters_equals_a_loop(data: st.DataObject, k: int) -> None:
    model, kw = data.draw(fst.models_and_configs(biases=["none"]))
    fn, base, fresh = _quiet_peft_model(model, kw)
    trees = [data.draw(fst.adapter_trees(fresh)) for _ in range(k)]
    stacked = funcpeft.stack_adapters(trees)
    for tree, back in zip(trees, funcpeft.unstack_adapters(stacked)):
        T.assert_trees_close(tree, back, atol=0)
    inputs = data.draw(fst.model_inputs(model, padded=False))  # a batched mask cannot be vmapped (see notes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no batching rule for sdpa": a performance note only
        together = torch.func.vmap(lambda a: fn(base, a, **inputs).logits)(stacked)
        for i, tree in enumerate(trees):
            alone = fn(base, tree, **inputs).logits
            # float32 rounding grows with the logits' scale (random adapters at scale 1 reach |logit| ~ 10): the
            # tolerance is relative to the largest logit; a wrong vmap rule is off by O(1) of it
            scale = max(1.0, alone.abs().max().item())
            torch.testing.assert_close(together[i], alone, atol=1e-5 * scale, rtol=1e-5)


@settings(max_examples=examples(10))
@given(st.data())
def test_save_then_load_gives_back_the_tree_and_peft_reads_it(data: st.DataObject) -> None:
    model, kw = data.draw(fst.models_and_configs())
    pm = _quiet_peft_model(model, kw)
    adapter = data.draw(fst.adapter_trees(pm.adapter))
    inputs = data.draw(fst.model_inputs(model))
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(d, adapter)
        loaded, _ = funcpeft.load_adapter(d, model=model)
        T.assert_trees_close(loaded, {p: {n: t.detach() for n, t in e.items()} for p, e in adapter.items()}, atol=0)
        import copy

        twin = peft.PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
        with torch.no_grad():
            want = twin(**inputs).logits
            got = pm.fn(pm.base, adapter, **inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- what the strategies promise -------------------------------------------------------------------------------
@settings(max_examples=examples(25))
@given(st.data())
def test_drawn_kwargs_build_in_both_libraries_and_target_something(data: st.DataObject) -> None:
    model, kw = data.draw(fst.models_and_configs())
    pm = _quiet_peft_model(model, kw)
    assert any(e.spec is not None for e in pm.plans["default"].values()), kw
    assert set(kw) <= {f for f in peft.LoraConfig.__dataclass_fields__}, "kwargs must also be valid for peft"
    for name in kw.get("modules_to_save") or []:
        assert pm.plans["default"][name].spec is None, f"{name} is both saved and targeted"


@settings(max_examples=examples(10))
@given(st.data())
def test_model_inputs_fit_the_model(data: st.DataObject) -> None:
    model = data.draw(fst.tiny_models())
    inputs = data.draw(fst.model_inputs(model, max_batch=3, max_len=5))
    ids = inputs["input_ids"]
    assert 1 <= ids.shape[0] <= 3 and 1 <= ids.shape[1] <= 5
    assert int(ids.min()) >= 1 and int(ids.max()) < hf_config(model).vocab_size
    assert (inputs["attention_mask"][:, 0] == 1).all(), "every row keeps at least its first token"
    with torch.no_grad():
        model(**inputs)


@given(st.data())
def test_adapter_trees_keep_structure_dtype_and_are_not_all_zero(data: st.DataObject) -> None:
    model, kw = data.draw(fst.models_and_configs(kinds=["llama", "gpt2"]))
    fresh = _quiet_peft_model(model, kw).adapter
    tree = data.draw(fst.adapter_trees(fresh))
    assert tree.keys() == fresh.keys()
    for path, entry in fresh.items():
        assert entry.keys() == tree[path].keys()
        for name, t in entry.items():
            got = tree[path][name]
            assert got.shape == t.shape and got.dtype == t.dtype and got.requires_grad
            assert got.abs().sum() > 0


def test_unknown_tiny_model_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown kinds \\['lama'\\]; known: .*'llama'"):
        fst.tiny_models(["lama"])


@given(st.data())
@settings(max_examples=examples(1))
def test_config_for_a_model_without_adaptable_layers_is_a_clear_error(data: st.DataObject) -> None:
    with pytest.raises(ValueError, match="no module of kinds"):
        data.draw(fst.lora_config_kwargs(nn.Sequential(nn.ReLU())))


def test_testing_reexports_the_strategies_lazily() -> None:
    assert T.lora_configs is fst.lora_configs and T.adapter_trees is fst.adapter_trees
    with pytest.raises(AttributeError, match="no attribute 'lora_config'"):
        T.lora_config  # noqa: B018


# -- the assertions can fail -----------------------------------------------------------------------------------
def _llama_pm() -> tuple[nn.Module, funcpeft.FunctionalPeftModel, dict]:
    model = T.tiny_llama()
    return (
        model,
        funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["q_proj"])),
        {"input_ids": torch.tensor([[1, 2, 3, 4]])},
    )


def test_noop_assertion_fails_for_a_non_trivial_adapter() -> None:
    model, (fn, base, fresh), inputs = _llama_pm()
    with pytest.raises(AssertionError, match="not a no-op"):
        T.assert_adapter_is_noop(fn, base, T.random_like(fresh, torch.Generator().manual_seed(0)), model, **inputs)


def test_gradient_assertion_fails_when_the_adapter_is_unused() -> None:
    _, (fn, base, fresh), inputs = _llama_pm()
    with pytest.raises(AssertionError, match="no adapter leaf"):
        T.assert_only_adapter_gets_grads(lambda a, b: fn(b, None, **inputs).logits.sum(), fresh, base)


def test_gradient_assertion_fails_when_a_base_leaf_requires_grad() -> None:
    _, (fn, base, fresh), inputs = _llama_pm()
    leaky = dict(base)
    name = next(iter(leaky))
    leaky[name] = leaky[name].detach().clone().requires_grad_(True)
    with pytest.raises(AssertionError, match=f"base leaf {name}"):
        T.assert_only_adapter_gets_grads(lambda a, b: fn(b, a, **inputs).logits.sum(), fresh, leaky)


def test_peft_assertion_passes_then_fails_on_other_targets_or_other_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    import funcpeft._plan
    from funcpeft.methods import METHODS

    model, pm, inputs = _llama_pm()
    kw = {"r": 2, "target_modules": ["q_proj", "v_proj"]}
    T.assert_matches_peft(model, kw, **inputs)  # they agree
    extra = {**pm.adapter, "model.layers.0.self_attn.v_proj": pm.adapter["model.layers.0.self_attn.q_proj"]}
    with pytest.raises(ValueError, match="v_proj"):  # a tree that does not fit the config is bad input
        T.assert_matches_peft(model, {"r": 2, "target_modules": ["q_proj"]}, extra, **inputs)
    with monkeypatch.context() as m:  # a targeting bug: the last target is dropped
        find = funcpeft._plan.find_targets
        m.setattr(funcpeft._plan, "find_targets", lambda model, config, **kw: find(model, config, **kw)[:-1])
        with pytest.raises(
            AssertionError, match=r"trainable parameters differ: only funcpeft \[\], only peft .*v_proj"
        ):
            T.assert_matches_peft(model, kw, **inputs)
    lora = METHODS["lora"]
    assert isinstance(lora, Method)
    right = lora.forward
    doubled = dataclasses.replace(
        lora, forward=lambda spec, params, x, result, ctx: 2 * right(spec, params, x, result, ctx) - result
    )
    monkeypatch.setitem(METHODS, "lora", doubled)
    with pytest.raises(AssertionError, match="outputs differ"):  # a LoRA term twice too large
        T.assert_matches_peft(model, kw, **inputs)
