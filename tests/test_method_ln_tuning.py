"""LN tuning (`LNTuningConfig`): trainable copies of targeted modules' parameters, against PEFT 0.21.2: config, init and
dtypes, one adapter at a time, nested targets, routing (compile: test_method_transforms.py). PEFT's own matrix rows and
the tiny-model rows run in test_peft_matrix.py / test_contract.py."""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from helpers import MODELS, make_inputs
from method_helpers import assert_same_state, fresh_states, quiet

import funcpeft
from funcpeft import testing as T


def test_config_keeps_target_modules_as_given_like_peft() -> None:
    ours, theirs = (
        funcpeft.LNTuningConfig(target_modules=["norm", "input_layernorm"]),
        peft.LNTuningConfig(target_modules=["norm", "input_layernorm"]),
    )
    assert ours.target_modules == theirs.target_modules == ["norm", "input_layernorm"]  # a list, not a set
    with pytest.raises(ValueError, match="target_modules must be"):
        funcpeft.LNTuningConfig(target_modules=[1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="target_modules"):
        funcpeft.LNTuningConfig(target_module=["norm"])  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "kind, dtype, kwargs",
    [
        ("llama", torch.float32, {}),  # PEFT's defaults for llama: both RMSNorms of each layer and the final one
        ("gpt2", torch.bfloat16, {}),  # ln_1, ln_2, ln_f; the copies keep the model's dtype (no adapter upcast)
        ("llama", torch.float32, dict(target_modules=["o_proj"], modules_to_save=["lm_head"])),  # any module
    ],
)
def test_fresh_copies_equal_peft_s(kind: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> None:
    ours, theirs = fresh_states(MODELS[kind]().to(dtype), "LNTuningConfig", kwargs)
    assert_same_state(ours, theirs)
    assert all(v.dtype == dtype for v in ours.values())


def test_the_adapter_is_the_copies_only_and_counts_like_peft() -> None:
    model = T.tiny_llama()
    fpm = funcpeft.get_peft_model(model, funcpeft.LNTuningConfig())
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig())
    assert set(fpm.adapter) == {"model.norm"} | {
        f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert all(set(e) == {"weight"} for e in fpm.adapter.values())
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, model(**x).logits, atol=0, rtol=0)


def test_one_adapter_at_a_time_like_peft() -> None:
    model, x = T.tiny_llama(), make_inputs("llama")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig())
    pm.add_adapter("b", peft.LNTuningConfig(target_modules=["norm"]))
    pm.base_model.set_adapter(["default", "b"])  # type: ignore[operator]
    with pytest.raises(ValueError, match="more than one adapter at a time"):
        pm(**x)
    with pytest.raises(ValueError, match="more than one adapter at a time"):
        copy.deepcopy(pm).merge_and_unload(adapter_names=["default", "b"])
    fpm = funcpeft.get_peft_model(model, funcpeft.LNTuningConfig())
    trees = {"default": fpm.adapter, "b": fpm.add_adapter("b", funcpeft.LNTuningConfig(target_modules=["norm"]))}
    with pytest.raises(ValueError, match="LN_TUNING.*more than one adapter at a time"):
        fpm.fn(fpm.base, trees, **x)
    with pytest.raises(ValueError, match="more than one adapter at a time"):
        funcpeft.merge(fpm, fpm.base, trees)
    with torch.no_grad():  # each alone is fine
        for name in trees:
            torch.testing.assert_close(fpm.fn(fpm.base, {name: trees[name]}, **x).logits, model(**x).logits)


def test_nested_targets_are_refused_with_both_names() -> None:
    model = T.tiny_llama()
    with pytest.raises(AttributeError):  # PEFT replaces the block, then cannot find the norm inside it
        quiet(
            peft.get_peft_model,
            copy.deepcopy(model),
            peft.LNTuningConfig(target_modules=["layers.0", "input_layernorm"]),
        )
    with pytest.raises(ValueError, match="'model.layers.0.input_layernorm' lies inside target 'model.layers.0'"):
        funcpeft.get_peft_model(model, funcpeft.LNTuningConfig(target_modules=["layers.0", "input_layernorm"]))


def test_stacked_copies_vmap_but_per_example_routing_is_refused_naming_the_method() -> None:
    fn, base, fresh = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.LNTuningConfig())
    x = make_inputs("llama")
    trees = [
        {p: {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in e.items()} for p, e in fresh.items()}
        for _ in range(2)
    ]
    stacked = funcpeft.stack_adapters(trees)
    with torch.no_grad():
        mapped = torch.func.vmap(lambda a: fn(base, a, **x).logits)(stacked)
        for k in range(2):
            torch.testing.assert_close(mapped[k], fn(base, trees[k], **x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="LN_TUNING replaces its parameters"):
        fn(base, funcpeft.per_example(stacked, [0, 1]), **x)
