"""Laws of `fn(base, adapter, ...)`, checked with hypothesis on small models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import MODELS, assert_unchanged, examples, make_inputs, out_tensor, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import funcpeft
from funcpeft import testing as T

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"],
    "gpt2": ["c_attn", "c_proj", "c_fc", "wte"],
    "conv": ["conv2d", "conv1d", "fc"],
}

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")


@st.composite
def configs(draw: Any) -> tuple[str, dict[str, Any]]:
    """A model kind and a LoraConfig whose fresh adapter is a no-op (init True or gaussian: B = 0)."""
    kind = draw(st.sampled_from(sorted(TARGETS)))
    return kind, {
        "target_modules": draw(st.lists(st.sampled_from(TARGETS[kind]), min_size=1, max_size=3, unique=True)),
        "r": draw(st.sampled_from([1, 2, 4])),
        "lora_alpha": draw(st.sampled_from([1, 8, 32])),
        "use_rslora": draw(st.booleans()),
        "bias": draw(st.sampled_from(["none", "all", "lora_only"])),
        "init_lora_weights": draw(st.sampled_from([True, "gaussian"])),
    }


_MODELS: dict[str, torch.nn.Module] = {}


def _model(kind: str) -> torch.nn.Module:
    if kind not in _MODELS:
        _MODELS[kind] = MODELS[kind]()
    return _MODELS[kind]


@settings(max_examples=examples(25))
@given(case=configs())
def test_fresh_adapter_is_exactly_the_base_model(case: tuple[str, dict[str, Any]]) -> None:
    kind, config = case
    model = _model(kind)
    fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config))
    inputs = make_inputs(kind)
    with torch.no_grad():
        assert torch.equal(out_tensor(fn(base, adapter, **inputs)), out_tensor(model(**inputs)))


@settings(max_examples=examples(12))
@given(case=configs(), seed=st.integers(0, 2**16))
def test_gradients_never_reach_the_base_and_model_is_untouched(case: tuple[str, dict[str, Any]], seed: int) -> None:
    kind, config = case
    model = _model(kind)
    before = snapshot(model)
    fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config))
    adapter = T.random_like(adapter, torch.Generator().manual_seed(seed))
    assert all(not t.requires_grad and t.grad is None for t in base.values())
    out = out_tensor(fn(base, adapter, **make_inputs(kind)))
    out.square().mean().backward()
    assert all(t.grad is None for t in base.values())
    assert all(leaf.grad is not None for e in adapter.values() for leaf in e.values())
    assert_unchanged(model, before)  # types, values, pointers, requires_grad, hooks, training flags, no .grad


@settings(max_examples=examples(12))
@given(name=st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True), case=configs())
def test_result_does_not_depend_on_the_adapter_name(name: str, case: tuple[str, dict[str, Any]]) -> None:
    kind, config = case
    model, inputs = _model(kind), make_inputs(kind)
    fn0, base, adapter = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config))
    adapter = T.random_like(adapter, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = out_tensor(fn0(base, adapter, **inputs))
        for adapter_name in ("x", name):
            fn = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**config), adapter_name=adapter_name).fn
            assert torch.equal(out_tensor(fn(base, adapter, **inputs)), want)
            assert torch.equal(out_tensor(fn(base, {adapter_name: adapter}, **inputs)), want)


@settings(max_examples=examples(12))
@given(case=configs(), seed=st.integers(0, 2**16))
def test_fn_is_deterministic(case: tuple[str, dict[str, Any]], seed: int) -> None:
    kind, config = case
    fn, base, adapter = funcpeft.get_peft_model(_model(kind), funcpeft.LoraConfig(**config))
    adapter = T.random_like(adapter, torch.Generator().manual_seed(seed))
    inputs = make_inputs(kind, seed=seed)
    with torch.no_grad():
        assert torch.equal(out_tensor(fn(base, adapter, **inputs)), out_tensor(fn(base, adapter, **inputs)))


class _NewTensors(TorchDispatchMode):
    """Records the shape of every op output that owns fresh storage (not a view of an existing tensor)."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.fresh_shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.fresh_shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_base_shares_storage_and_no_weight_copy_is_made(kind: str) -> None:
    model = _model(kind)
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules="all-linear"))
    fn, base, adapter = fpm
    params = dict(model.named_parameters())
    assert base.keys() == params.keys()
    for name, t in base.items():
        assert t.data_ptr() == params[name].data_ptr() and t.shape == params[name].shape, name
    weight_shapes = {tuple(params[f"{p}.weight"].shape) for p, e in fpm.plans["default"].items() if e.spec is not None}
    weight_shapes |= {s[::-1] for s in weight_shapes}  # a transposed copy counts too
    adapter = T.random_like(adapter, torch.Generator().manual_seed(0))
    mode = _NewTensors(list(base.values()))
    with torch.no_grad(), mode:
        fn(base, adapter, **make_inputs(kind, batch=3, seq=5))
    assert mode.fresh_shapes, "the dispatch mode saw no op"
    assert not (mode.fresh_shapes & weight_shapes), (
        f"weight-shaped tensors were built: {mode.fresh_shapes & weight_shapes}"
    )
