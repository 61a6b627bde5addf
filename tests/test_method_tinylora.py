"""TinyLoRA (`TinyLoraConfig`) against PEFT 0.21.2: config fields and errors, unsupported layers, init (v draws
with weight tying, the frozen SVD factors and seeded projections equal to PEFT's buffers), forward / gradients on
Linear, GPT-2 Conv1D and Embedding, merging, mixed models refused. PEFT's TEST_CASES rows:
tests/test_peft_matrix.py; compile: tests/test_method_transforms.py."""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from helpers import tree_map
from method_checks import assert_mixed_refused_like_peft, assert_raises_like_peft, build_both, random_trees
from peft_matrix import models

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import SHARED_PATH, layer_frozen_key
from funcpeft.methods.base import UnsupportedLayerError


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0, target_modules=["lin0"]), "`r` should be a positive integer value but the value passed is 0"),
        (dict(u=0, target_modules=["lin0"]), "`u` should be a positive integer value but the value passed is 0"),
        (dict(weight_tying=1.5, target_modules=["lin0"]), "`weight_tying` should be a float between 0.0 and 1.0"),
        (dict(layers_pattern="x", target_modules=["lin0"]), "`layers_to_transform` must also be specified"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    assert_raises_like_peft(models.build("MLP"), "TinyLoraConfig", kwargs, ValueError, match)


def test_save_projection_false_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="save_projection=False"):
        funcpeft.TinyLoraConfig(save_projection=False)


def test_unsupported_layers_name_module_and_type() -> None:
    with pytest.raises(KeyError, match="conv2d"):  # PEFT's index of target layers skips it, then looks it up
        peft.get_peft_model(models.build("Conv2d"), peft.TinyLoraConfig(target_modules=["conv2d"]))
    with pytest.raises(UnsupportedLayerError, match=r"'conv2d'.*Conv2d"):
        funcpeft.get_peft_model(models.build("Conv2d"), funcpeft.TinyLoraConfig(target_modules=["conv2d"]))


def test_mixed_is_refused_like_peft() -> None:
    assert_mixed_refused_like_peft(models.build("MLP"), "TinyLoraConfig", dict(target_modules=["lin0"]))


def _peft_v(pm: Any) -> dict[str, torch.nn.Parameter]:
    return {f"tinylora_v.{g}": p for g, p in pm.base_model.tinylora_v["default"].items()}


def _assert_v_equal_peft(fpm: Any, pm: Any) -> None:
    """The adapter tree holds only the shared v's, bitwise PEFT's (its trainable parameters)."""
    assert all(not e for p, e in fpm.adapter.items() if p != SHARED_PATH)
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert trainable == {id(v) for v in _peft_v(pm).values()}  # PEFT trains exactly its v's
    assert sorted(fpm.adapter[SHARED_PATH]) == sorted(_peft_v(pm))
    for name, v in _peft_v(pm).items():
        assert torch.equal(fpm.adapter[SHARED_PATH][name], v.detach()), name


def _assert_frozen_equal_peft(fpm: Any, pm: Any) -> None:
    """Each layer's tinylora_A / _B / _P in `base` equals PEFT's buffers."""
    fn, base, _ = fpm
    wrapped = pm.base_model.model
    for path, entry in fpm.plans["default"].items():
        if path == SHARED_PATH or entry.spec is None:
            continue
        layer = wrapped.get_submodule(path)
        for name in ("tinylora_A", "tinylora_B", "tinylora_P"):
            ours = base[layer_frozen_key("default", path, name)]
            torch.testing.assert_close(ours, getattr(layer, name)["default"], atol=0, rtol=0)


CASES = [
    ("MLP", dict(target_modules=["lin0", "lin1"], u=5, weight_tying=0.0)),
    ("MLP", dict(target_modules=["lin0", "lin1"], u=5, weight_tying=1.0, r=3)),
    ("EmbConv1D", dict(target_modules=["emb", "conv1d"], u=6, r=4)),
]


@pytest.mark.parametrize("model_id, kwargs", CASES)
def test_fresh_adapter_and_frozen_tensors_equal_peft(model_id: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = build_both(models.build(model_id), "TinyLoraConfig", {**kwargs, "init_weights": "uniform"}, seed=2)
    _assert_v_equal_peft(fpm, pm)
    _assert_frozen_equal_peft(fpm, pm)


def test_llama_groups_follow_peft_s_weight_tying() -> None:
    kwargs = dict(target_modules="all-linear", u=3, weight_tying=0.6, init_weights="uniform")
    fpm, pm = build_both(T.tiny_llama(), "TinyLoraConfig", kwargs, seed=1)
    _assert_v_equal_peft(fpm, pm)
    _assert_frozen_equal_peft(fpm, pm)
    theirs = {m._tinylora_v_key["default"] for m in pm.modules() if hasattr(m, "_tinylora_v_key")}
    ours = {e.spec.hyper.group for p, e in fpm.plans["default"].items() if e.spec is not None}
    assert {int(k) for k in theirs} == ours and len(ours) > 1


@pytest.mark.parametrize("model_id, kwargs", CASES)
def test_forward_gradients_and_merge_match_peft(model_id: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = build_both(models.build(model_id), "TinyLoraConfig", kwargs)
    x = {"X": torch.arange(40).reshape(4, 10) % 9}
    fn, base, _ = fpm
    adapter: funcpeft.AdapterTree = tree_map(
        lambda t: t.requires_grad_(True), random_trees(fpm.adapter, n=1, scale=0.5)[0]
    )
    with torch.no_grad():
        for name, v in _peft_v(pm).items():
            v.copy_(adapter[SHARED_PATH][name])
    weights = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    (fn(base, adapter, **x) * weights).sum().backward()
    out = pm(**x)
    (out * weights).sum().backward()
    torch.testing.assert_close(fn(base, adapter, **x).detach(), out.detach(), atol=1e-5, rtol=1e-5)
    for name, v in _peft_v(pm).items():
        torch.testing.assert_close(adapter[SHARED_PATH][name].grad, v.grad, atol=1e-5, rtol=1e-4)
    adapter = tree_map(lambda t: t.detach(), adapter)
    merged = funcpeft.merge(fpm, base, adapter)
    torch.testing.assert_close(fn(merged, None, **x), fn(base, adapter, **x), atol=1e-5, rtol=1e-5)
    model = copy.deepcopy(pm)
    model.merge_adapter()
    for path in fpm.plans["default"]:
        if path != SHARED_PATH:
            key = f"{path}.weight"
            torch.testing.assert_close(merged[key], model.base_model.model.get_submodule(path).base_layer.weight)
