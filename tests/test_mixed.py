"""Mixed adapter types (`get_peft_model(..., mixed=True)`, PEFT's PeftMixedModel): differential tests and laws.

Adapters of different types, on different layers or stacked on the same one, are active together; like
PEFT, they apply in the order they were added (each wraps the layer below it), whatever the order of the
`{adapter_name: tree}` dict passed to `fn`.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from typing import Any

import peft
import pytest
import torch
from helpers import capture_stdout, examples, make_inputs, tree_map
from hypothesis import given, settings
from hypothesis import strategies as st

import funcpeft
from funcpeft import testing as T
from funcpeft.grad import value_and_grad

Spec = tuple[str, str, dict[str, Any]]  # (adapter name, config class name, kwargs)

CASES: dict[str, list[Spec]] = {
    "lora-attention-loha-mlp": [
        ("default", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        ("mlp", "LoHaConfig", dict(r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])),
    ],
    "four-types-on-one-layer": [
        ("default", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])),
        ("hada", "LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "up_proj"])),
        ("kron", "LoKrConfig", dict(r=2, alpha=4, target_modules=["q_proj", "down_proj"])),
        ("dora", "LoraConfig", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
    ],
    "dora-under-loha": [
        ("default", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_dora=True)),
        ("hada", "LoHaConfig", dict(r=2, alpha=8, target_modules=["q_proj"])),
    ],
}


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def peft_name(named: dict[str, Any], path: str, key: str, adapter: str) -> str:
    """The PEFT mixed-model parameter of leaf `key` of adapter `adapter` at `path` (layers nest: base_layer...)."""
    pattern = re.compile(rf"^base_model\.model\.{re.escape(path)}\.(base_layer\.)*{key}\.{adapter}(\.weight)?$")
    hits = [n for n in named if pattern.match(n)]
    assert len(hits) == 1, (path, key, adapter, hits)
    return hits[0]


class Mixed:
    """funcpeft and PEFT mixed models on copies of a tiny Llama with the same adapters, all active."""

    def __init__(self, case: str, seed: int = 0) -> None:
        specs = CASES[case]
        self.model = T.tiny_llama()
        first, cls, kwargs = specs[0]
        self.fpm = funcpeft.get_peft_model(self.model, getattr(funcpeft, cls)(**kwargs), mixed=True)
        self.peft_model = peft.get_peft_model(copy.deepcopy(self.model), getattr(peft, cls)(**kwargs), mixed=True)
        fresh = {first: self.fpm.adapter}
        for name, cls, kwargs in specs[1:]:
            fresh[name] = self.fpm.add_adapter(name, getattr(funcpeft, cls)(**kwargs))
            self.peft_model.add_adapter(name, getattr(peft, cls)(**kwargs))
        self.peft_model.set_adapter([s[0] for s in specs])
        g = torch.Generator().manual_seed(seed)
        self.trees = {
            n: tree_map(lambda f, r: (f.detach() + r.detach()).requires_grad_(True), t, T.random_like(t, g, 0.2))
            for n, t in fresh.items()
        }
        self.named = dict(self.peft_model.named_parameters())
        with torch.no_grad():
            for adapter, path, key, value in self.leaves(self.trees):
                self.named[peft_name(self.named, path, key, adapter)].copy_(value)
        self.peft_model.eval()
        self.inputs = make_inputs("llama")

    @staticmethod
    def leaves(trees: dict[str, Any]) -> list[tuple[str, str, str, torch.Tensor]]:
        return [(a, p, k, v) for a, t in trees.items() for p, e in t.items() for k, v in e.items()]

    def loss(self, trees: Any) -> torch.Tensor:
        return self.fpm.fn(self.fpm.base, trees, **self.inputs, labels=self.inputs["input_ids"]).loss


@pytest.fixture(scope="module", params=sorted(CASES))
def mixed(request: pytest.FixtureRequest) -> Mixed:
    return Mixed(request.param)


def test_forward_and_gradients_equal_peft_mixed_model(mixed: Mixed) -> None:
    reversed_order = dict(reversed(list(mixed.trees.items())))  # registration order wins, as in PEFT
    with torch.no_grad():
        got = mixed.fpm.fn(mixed.fpm.base, reversed_order, **mixed.inputs).logits
        plain = mixed.model(**mixed.inputs).logits
    mixed.peft_model.zero_grad(set_to_none=True)
    ref = mixed.peft_model(**mixed.inputs, labels=mixed.inputs["input_ids"])
    ref.loss.backward()
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, ref.logits.detach(), atol=1e-5, rtol=0)
    _, grads = value_and_grad(mixed.loss)(mixed.trees)
    want = {
        a: {p: {k: mixed.named[peft_name(mixed.named, p, k, a)].grad for k in e} for p, e in t.items()}
        for a, t in mixed.trees.items()
    }
    T.assert_trees_close(grads, want, atol=1e-5)


def test_trainable_parameters_equal_peft_mixed_model(mixed: Mixed) -> None:
    assert mixed.fpm.get_nb_trainable_parameters(mixed.trees) == mixed.peft_model.get_nb_trainable_parameters()
    assert capture_stdout(lambda: mixed.fpm.print_trainable_parameters(mixed.trees)) == capture_stdout(
        mixed.peft_model.print_trainable_parameters
    )


@pytest.mark.parametrize("case", ["lora-attention-loha-mlp"])
def test_merge_and_unload_equals_peft_mixed_model(case: str) -> None:
    m = Mixed(case)
    merged = _quiet(funcpeft.merge_and_unload, m.fpm, m.trees)
    want = _quiet(m.peft_model.merge_and_unload)
    got = dict(merged.named_parameters())
    for name, p in want.named_parameters():
        torch.testing.assert_close(got[name], p, atol=1e-5, rtol=1e-6, msg=name)


def test_a_subset_of_the_adapters_is_a_subset_of_peft_s_active_adapters() -> None:
    m = Mixed("four-types-on-one-layer")
    chosen = ["kron", "default"]
    m.peft_model.set_adapter(chosen)
    with torch.no_grad():
        got = m.fpm.fn(m.fpm.base, {n: m.trees[n] for n in chosen}, **m.inputs).logits
        torch.testing.assert_close(got, m.peft_model(**m.inputs).logits, atol=1e-5, rtol=0)


# -- what PEFT refuses ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["IA3Config", "VeraConfig"])
def test_types_peft_cannot_mix_are_refused_like_peft(config: str) -> None:
    model = T.tiny_llama()
    kwargs = (
        dict(target_modules=["q_proj"])
        if config == "VeraConfig"
        else dict(target_modules=["q_proj"], feedforward_modules=[])
    )
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`") as want:
        peft.get_peft_model(copy.deepcopy(model), getattr(peft, config)(**kwargs), mixed=True)
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        funcpeft.get_peft_model(model, getattr(funcpeft, config)(**kwargs), mixed=True)
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=["q_proj"]), mixed=True)
    with pytest.raises(ValueError, match=str(want.value).split("'")[1]):
        fpm.add_adapter("other", getattr(funcpeft, config)(**kwargs))
    assert list(fpm.peft_config) == ["default"]  # nothing half-registered


def test_without_mixed_other_types_are_refused_like_peft() -> None:
    model = T.tiny_llama()
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        ref.add_adapter("other", peft.LoHaConfig(target_modules=["v_proj"]))
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types.*mixed=True"):
        fpm.add_adapter("other", funcpeft.LoHaConfig(target_modules=["v_proj"]))
    assert list(fpm.peft_config) == ["default"] and list(fpm.plans) == ["default"]
    fpm.add_adapter("dora", funcpeft.LoraConfig(target_modules=["v_proj"], use_dora=True))  # same peft_type: fine


# -- laws ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four() -> Mixed:
    return Mixed("four-types-on-one-layer", seed=3)


@settings(max_examples=examples(12))
@given(order=st.permutations(["default", "hada", "kron", "dora"]), subset=st.integers(2, 4))
def test_mixed_output_does_not_depend_on_dict_order(four: Mixed, order: list[str], subset: int) -> None:
    m = four
    names = order[:subset]
    canonical = {n: m.trees[n] for n in m.trees if n in names}
    with torch.no_grad():
        want = m.fpm.fn(m.fpm.base, canonical, **m.inputs).logits
        got = m.fpm.fn(m.fpm.base, {n: m.trees[n] for n in names}, **m.inputs).logits
    assert torch.equal(got, want)


def test_stacked_additive_adapters_commute() -> None:
    """LoRA, LoHa and LoKr only add terms: registering them in another order changes nothing but rounding."""
    outs = []
    for perm in itertools.permutations(CASES["four-types-on-one-layer"][:3]):
        model = T.tiny_llama()
        (n0, c0, k0), rest = perm[0], perm[1:]
        fpm = funcpeft.get_peft_model(model, getattr(funcpeft, c0)(**k0), adapter_name=n0, mixed=True)
        trees = {n0: fpm.adapter}
        for n, c, k in rest:
            trees[n] = fpm.add_adapter(n, getattr(funcpeft, c)(**k))
        trees = {n: T.random_like(t, torch.Generator().manual_seed(sum(map(ord, n)))) for n, t in trees.items()}
        with torch.no_grad():
            outs.append(fpm.fn(fpm.base, trees, **make_inputs("llama")).logits)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=0)
