"""FRoD (`FrodConfig`) against PEFT 0.21.2: config fields and errors (PEFT's checks between adapters too),
unsupported layers, role bases shared across blocks, init draws, forward / gradients away from the init (GPT-2
Conv1D and bfloat16 too), files both ways, merging from the pre-merge weight, mixed models refused. PEFT's
TEST_CASES rows: tests/test_peft_matrix.py; compile and per-example routing: tests/test_method_transforms.py; tiny
transformers models: tests/test_contract.py."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, cast

import method_checks as mc
import peft
import pytest
import torch
from peft_matrix import models
from safetensors.torch import load_file
from torch import nn

import funcpeft
import funcpeft.testing
from funcpeft.methods.base import UnsupportedLayerError


class Stack(nn.Module):
    """Four blocks of q (8 -> 8), up (8 -> 12), down (12 -> 8) and a narrow head (8 -> 2): roles across blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(8, 8), "up": nn.Linear(8, 12), "down": nn.Linear(12, 8, bias=False)})
            for _ in range(4)
        )
        self.head = nn.Linear(8, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            b = cast(nn.ModuleDict, block)
            X = X + torch.tanh(b["q"](X)) + b["down"](torch.relu(b["up"](X)))
        return self.head(X)


def stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


X = {"X": torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))}
CASES: list[dict[str, Any]] = [
    dict(target_modules=["q", "up", "down", "head"], sparse_rate=0.1),
    dict(target_modules=r"blocks\.\d\.(q|down)", sparse_rate=0.3, projection_prng_key=7),
    dict(target_modules=["up"], layers_to_transform=[0, 2], layers_pattern="blocks", sparse_rate=0.02),
]


@pytest.mark.parametrize(
    "model_id, kwargs, exc, match",
    [
        ("MLP", dict(target_modules=["lin0"], sparse_rate=1.5), ValueError, "`sparse_rate` should be between 0 and 1"),
        ("MLP", dict(target_modules=["lin0"], layers_pattern="x"), ValueError, "`layers_to_transform` must also be"),
        ("MLP", dict(target_modules=["lin0"], bias="other"), NotImplementedError, "Requested bias"),
        ("EmbConv1D", dict(target_modules=["emb"]), ValueError, "No layer types compatible with FRoD were found"),
    ],
)
def test_config_errors_are_peft_s(model_id: str, kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    mc.assert_raises_like_peft(models.build(model_id), "FrodConfig", {**kwargs, "progressbar": False}, exc, match)


@pytest.mark.parametrize(
    "second, match",
    [
        (dict(projection_prng_key=1), "FRoD projection initialization key must be the same for all adapters"),
        (dict(save_projection=False), "FRoD projection weights must be saved for all adapters or none"),
        (dict(runtime_offload_base_weight=True), "FRoD runtime base-weight offloading must be enabled for all"),
    ],
)
def test_second_adapter_checks_are_peft_s(second: dict[str, Any], match: str) -> None:
    first: dict[str, Any] = dict(target_modules=["lin0"], progressbar=False)
    pm = peft.get_peft_model(models.build("MLP"), peft.FrodConfig(**first))
    with pytest.raises(ValueError, match=match):
        pm.add_adapter("other", peft.FrodConfig(**first, **second))
    fpm = funcpeft.get_peft_model(models.build("MLP"), funcpeft.FrodConfig(**first))
    with pytest.raises(ValueError, match=match):
        fpm.add_adapter("other", funcpeft.FrodConfig(**first, **second))


@pytest.mark.parametrize("model_id, target, kind", [("EmbConv1D", "emb", "Embedding"), ("Conv2d", "conv2d", "Conv2d")])
def test_unsupported_layers_name_module_and_type(model_id: str, target: str, kind: str) -> None:
    model = models.build(model_id)
    extra = ["conv1d"] if model_id == "EmbConv1D" else ["lin0"]  # PEFT needs a layer it can build bases from
    with pytest.raises(KeyError, match=target):  # PEFT built no basis for the layer's role, then looks it up
        peft.get_peft_model(copy.deepcopy(model), peft.FrodConfig(target_modules=[target, *extra], progressbar=False))
    with pytest.raises(UnsupportedLayerError, match=rf"{target!r}.*{kind}"):
        funcpeft.get_peft_model(model, funcpeft.FrodConfig(target_modules=[target, *extra]))


def test_mixed_is_refused_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(
        models.build("MLP"), "FrodConfig", dict(target_modules=["lin0"], progressbar=False)
    )


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("kwargs", CASES)
def test_fresh_adapter_equals_peft_for_the_same_seed(kwargs: dict[str, Any], init: bool) -> None:
    fpm, pm = mc.build_both(stack(), "FrodConfig", {**kwargs, "init_weights": init, "progressbar": False}, seed=5)
    mc.assert_fresh_equals_peft(fpm, pm)
    # the frozen side: each role's V and S pattern once in `base`, each layer's U, equal to PEFT's buffers
    buffers = dict(pm.named_buffers())
    for path, entry in fpm.plans["default"].items():
        if entry.spec is None:
            continue
        role = entry.spec.hyper.role
        for name, key in entry.frozen:
            want = buffers[
                f"base_model.{name}.{role}.default" if name != "frod_U" else f"base_model.model.{path}.frod_U.default"
            ]
            assert torch.equal(fpm.base[key], want), (path, name)


@pytest.mark.parametrize("kwargs", CASES)
def test_forward_and_gradients_match_peft_away_from_the_init(kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(stack(), "FrodConfig", {**kwargs, "progressbar": False})
    for adapter in mc.random_trees(fpm.adapter, n=2, scale=0.3):
        mc.assert_matches_peft_with(fpm, pm, adapter, X, atol=1e-5)


def test_gpt2_conv1d_matches_peft() -> None:
    kwargs = dict(target_modules=["conv1d"], sparse_rate=0.05, init_weights=False, progressbar=False)
    fpm, pm = mc.build_both(models.build("EmbConv1D"), "FrodConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)
    assert fpm.peft_config["default"].fan_in_fan_out is pm.peft_config["default"].fan_in_fan_out is True
    ids = {"X": torch.arange(90).reshape(9, 10) % 7}
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], ids, atol=1e-5)


@pytest.mark.parametrize("init", [True, False])
def test_bfloat16_model_matches_peft(init: bool) -> None:
    model = models.build("MLP", dtype=torch.bfloat16)
    cast(Any, model).dtype = torch.bfloat16  # the model casts its input to it
    kwargs: dict[str, Any] = dict(
        target_modules=["lin0", "lin1"], sparse_rate=0.1, init_weights=init, progressbar=False
    )
    fpm, pm = mc.build_both(model, "FrodConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)  # float32 adapters drawn and rounded in bfloat16 first, like PEFT's
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], {"X": torch.randn(4, 10)}, atol=2e-2)


def test_files_both_ways_are_peft_s() -> None:
    fpm, pm = mc.build_both(stack(), "FrodConfig", {**CASES[0], "init_weights": False, "progressbar": False})
    tree = mc.random_trees(fpm.adapter, n=1)[0]
    funcpeft.testing.copy_into_peft(pm, tree, fpm.plans["default"])
    with tempfile.TemporaryDirectory() as d:
        fpm.save_pretrained(os.path.join(d, "f"), tree)
        pm.save_pretrained(os.path.join(d, "p"))
        ours, theirs = (load_file(os.path.join(d, w, "adapter_model.safetensors")) for w in ("f", "p"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert {"base_model.frod_V.q", "base_model.frod_s_indices.head", "base_model.frod_s_size.down"} <= set(ours)
        back = funcpeft.from_pretrained(stack(), os.path.join(d, "p"))
        assert all(torch.equal(back.adapter[p][n], t) for p, e in tree.items() for n, t in e.items())


def test_two_adapters_merge_from_the_pre_merge_weight_like_peft() -> None:
    cfg: dict[str, Any] = dict(target_modules=["q", "head"], sparse_rate=0.2, init_weights=False, progressbar=False)
    torch.manual_seed(0)
    fpm = funcpeft.get_peft_model(stack(), funcpeft.FrodConfig(**cfg))
    other = fpm.add_adapter("other", funcpeft.FrodConfig(**cfg))
    fn, base, fresh = fpm
    torch.manual_seed(0)
    pm = peft.get_peft_model(stack(), peft.FrodConfig(**cfg))
    pm.add_adapter("other", peft.FrodConfig(**cfg))
    both = {"default": fresh, "other": other}
    for name, tree in both.items():
        funcpeft.testing.copy_into_peft(pm, tree, fpm.plans[name], name)
    merged = funcpeft.merge(fpm, base, both)
    for path in ("blocks.1.q", "head"):
        layer = cast(Any, pm.get_submodule(f"base_model.model.{path}"))
        layer.merge(adapter_names=["default", "other"])
        want = layer.base_layer.weight
        torch.testing.assert_close(merged[f"{path}.weight"], want, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(fn(merged, None, **X), fn(base, both, **X), atol=1e-5, rtol=1e-5)
    assert torch.equal(funcpeft.unmerge(fpm, merged, both, base=base)["head.weight"], base["head.weight"])
    with pytest.raises(ValueError, match="pre-merge weight.*base="):
        funcpeft.unmerge(fpm, merged, both)


def test_s_product_is_a_memory_lean_autograd_function() -> None:
    """`z S^T` keeps only z and S's values and pattern for backward (plain autograd of the gather keeps the
    (tokens, nnz) gathered z: 2.7x PEFT's training peak on the benchmark Llama), with every transform."""
    from funcpeft.methods.frod import _SparseProduct

    g = torch.Generator().manual_seed(0)
    n, nnz = 6, 20
    flat = torch.randperm(n * n, generator=g)[:nnz]
    rows, cols = flat // n, flat % n
    z = torch.randn(2, 3, n, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(nnz, generator=g, dtype=torch.float64, requires_grad=True)
    mc.assert_memory_lean_function_is_autograd(
        lambda z, v: _SparseProduct.apply(z, v, rows, cols),
        lambda z, v: torch.zeros_like(z).index_add(-1, rows, z[..., cols] * v),
        [z, values],
        frozen=[rows, cols],
    )


def test_specs_are_weight_free_and_bases_live_in_base() -> None:
    """The spec holds only static facts: two models of one shape with different weights plan equal specs, while
    their role bases (made from all of a role's weights before any layer's init) differ in `base`."""
    cfg: dict[str, Any] = dict(target_modules=["q", "up"], sparse_rate=0.1)
    first = funcpeft.get_peft_model(stack(), funcpeft.FrodConfig(**cfg))
    torch.manual_seed(1)
    second = funcpeft.get_peft_model(Stack(), funcpeft.FrodConfig(**cfg))
    assert first.plans["default"] == second.plans["default"]
    entry = first.plans["default"]["blocks.2.q"]
    key = dict(entry.frozen)["frod_V"]
    assert not torch.allclose(first.base[key], second.base[key])
    # the same settings name the same base entries: a second adapter reuses the first one's bases
    other = first.add_adapter("other", funcpeft.FrodConfig(**cfg))
    assert dict(first.plans["other"]["blocks.2.q"].frozen)["frod_V"] == key and other.keys() == first.adapter.keys()
