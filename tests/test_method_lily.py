"""Lily (`LilyConfig`) against PEFT 0.21.2: config fields and errors, unsupported layers, the cross-layer sharing
of lily_A (per stride_A layers) and lily_B (per target suffix and shape), init draws, forward / gradients away
from the init, files both ways (PEFT saves shared tensors under every layer; a file whose copies differ is
refused), counts, merging refused, per-example routing refused, compile with sharing. PEFT's TEST_CASES rows:
tests/test_peft_matrix.py; tiny transformers models: tests/test_contract.py."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, cast

import method_checks as mc
import optree
import pytest
import torch
from peft_matrix import models
from safetensors.torch import load_file, save_file
from torch import nn

import funcpeft
import funcpeft.testing


class Stack(nn.Module):
    """Five blocks of two same-shaped layers (q: 8 -> 8, v: 8 -> 8) and one of another shape (up: 8 -> 12 -> 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"q": nn.Linear(8, 8), "v": nn.Linear(8, 8), "up": nn.Linear(8, 12), "down": nn.Linear(12, 8)}
            )
            for _ in range(5)
        )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            b = cast(nn.ModuleDict, block)
            X = X + b["v"](torch.tanh(b["q"](X))) + b["down"](torch.relu(b["up"](X)))
        return X


def stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


X = {"X": torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))}
SHARING: list[dict[str, Any]] = [
    dict(r=3, stride_A=2, num_B=3, target_modules=["q", "v", "down"]),
    dict(r=2, stride_A=3, num_B=2, scaling=0.3, target_modules=r"blocks\.\d\.(q|v|up)"),  # one group per shape
    dict(r=2, stride_A=1, num_B=4, target_modules=["q"], layers_to_transform=[1, 2, 4], layers_pattern="blocks"),
]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["lin0"], stride_A=0), "`stride_A` must be at least 1"),
        (dict(target_modules=["lin0"], num_B=1), "`num_B` must be at least 2 for the router to be trained"),
        (dict(target_modules=["lin0"], r=0), "`r` should be a positive integer value but the value passed is 0"),
        (dict(target_modules=["lin0"], layers_pattern="x"), "`layers_to_transform` must also be specified"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    mc.assert_raises_like_peft(models.build("MLP"), "LilyConfig", kwargs, ValueError, match)


@pytest.mark.parametrize(
    "model_id, target, kind",
    [("EmbConv1D", "emb", "Embedding"), ("EmbConv1D", "conv1d", "Conv1D"), ("Conv2d", "conv2d", "Conv2d")],
)
def test_unsupported_layers_name_module_and_type(model_id: str, target: str, kind: str) -> None:
    model, config = models.build(model_id), dict(target_modules=[target])
    mc.assert_unsupported_like_peft(
        model,
        "LilyConfig",
        config,
        "Lily does not support target modules of type",
        rf"{target!r}.*{kind}",
        NotImplementedError,
    )


def test_a_name_ending_in_two_targets_is_refused() -> None:
    """PEFT groups by the last matching entry of a set of str: its hash-seed-dependent order decides."""
    with pytest.raises(ValueError, match=r"'blocks.0.up' ends with several: \['p', 'up'\]"):
        funcpeft.get_peft_model(stack(), funcpeft.LilyConfig(target_modules=["up", "p"]))


def test_mixed_and_merging_are_refused_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "LilyConfig", dict(target_modules=["lin0"]))
    fpm, pm = mc.build_both(models.build("MLP"), "LilyConfig", dict(target_modules=["lin0"], r=2))
    with pytest.raises(NotImplementedError, match="This method is not supported for Lily"):
        pm.merge_and_unload()
    with pytest.raises(NotImplementedError, match="This method is not supported for Lily"):
        funcpeft.merge(fpm, fpm.base, fpm.adapter)


@pytest.mark.parametrize("kwargs", SHARING)
def test_sharing_is_peft_s(kwargs: dict[str, Any]) -> None:
    """funcpeft keeps each tensor PEFT shares once, at the layer PEFT's other layers take it from."""
    fpm, pm = mc.build_both(stack(), "LilyConfig", kwargs)
    plan = fpm.plans["default"]
    modules = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()}
    order = list(plan)
    for i, (path, entry) in enumerate(plan.items()):
        for name, source in entry.borrowed:
            assert getattr(modules[path], name)["default"] is getattr(modules[source], name)["default"]
        for name in entry.params:  # a leaf of its own: no PEFT layer before it holds the same module
            module = getattr(modules[path], name)["default"]
            assert all(getattr(modules[p], name)["default"] is not module for p in order[:i])
    assert any(entry.borrowed for entry in plan.values())
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("kwargs", SHARING)
def test_fresh_adapter_equals_peft_for_the_same_seed(kwargs: dict[str, Any], init: bool) -> None:
    fpm, pm = mc.build_both(stack(), "LilyConfig", {**kwargs, "init_weights": init}, seed=5)
    mc.assert_fresh_equals_peft(fpm, pm)


@pytest.mark.parametrize("kwargs", SHARING)
def test_forward_and_gradients_match_peft_away_from_the_init(kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(stack(), "LilyConfig", kwargs)
    for adapter in mc.random_trees(fpm.adapter, n=2, scale=0.3):
        mc.assert_matches_peft_with(fpm, pm, adapter, X, atol=1e-5)


def test_files_both_ways_and_differing_copies_are_refused() -> None:
    kwargs = SHARING[0]
    fpm, pm = mc.build_both(stack(), "LilyConfig", {**kwargs, "init_weights": False})
    tree = mc.random_trees(fpm.adapter, n=1)[0]
    with tempfile.TemporaryDirectory() as d:
        fpm.save_pretrained(os.path.join(d, "f"), tree)
        ours = load_file(os.path.join(d, "f", "adapter_model.safetensors"))
        funcpeft.testing.copy_into_peft(pm, tree, fpm.plans["default"])
        pm.save_pretrained(os.path.join(d, "p"))
        theirs = load_file(os.path.join(d, "p", "adapter_model.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert "base_model.model.blocks.1.q.lily_A.weight" in ours  # the shared copy, under the reading layer
        back = funcpeft.from_pretrained(stack(), os.path.join(d, "p"))
        assert all(torch.equal(back.adapter[p][n], t) for p, e in tree.items() for n, t in e.items())
        ours["base_model.model.blocks.1.q.lily_A.weight"] = ours["base_model.model.blocks.1.q.lily_A.weight"] + 1
        save_file(ours, os.path.join(d, "f", "adapter_model.safetensors"))
        with pytest.raises(funcpeft.AdapterMismatchError, match=r"blocks.1.q.lily_A.weight \(differs from"):
            funcpeft.from_pretrained(stack(), os.path.join(d, "f"))
        with pytest.raises(ValueError, match="needs the model it was made for"):
            funcpeft.load_adapter(os.path.join(d, "p"))
        assert json.loads(open(os.path.join(d, "f", "adapter_config.json")).read())["peft_type"] == "LILY"


def test_vmap_over_adapters_equals_a_loop_and_per_example_routing_is_refused() -> None:
    fn, base, fresh = funcpeft.get_peft_model(stack(), funcpeft.LilyConfig(**SHARING[0]))
    trees = mc.random_trees(fresh, n=3)
    stacked = funcpeft.stack_adapters(trees)
    with torch.no_grad():
        vmapped = torch.func.vmap(lambda a: fn(base, a, **X))(stacked)
        for k, t in enumerate(trees):
            torch.testing.assert_close(vmapped[k], fn(base, t, **X), atol=1e-6, rtol=1e-6)
        with pytest.raises(NotImplementedError, match="per-example adapters are not supported for Lily"):
            fn(base, funcpeft.per_example(stacked, torch.tensor([0, 2, 1])), **X)


def test_one_example_depends_on_the_batch_like_peft() -> None:
    """PEFT's router averages over the batch: example 0 alone differs from example 0 in the batch; funcpeft too."""
    fpm, pm = mc.build_both(stack(), "LilyConfig", SHARING[0])
    fn, base, _ = fpm
    tree = mc.random_trees(fpm.adapter, n=1, scale=0.5)[0]
    funcpeft.testing.copy_into_peft(pm, tree, fpm.plans["default"])
    with torch.no_grad():
        alone = fn(base, tree, X=X["X"][:1])
        assert not torch.allclose(alone, fn(base, tree, **X)[:1], atol=1e-6)
        torch.testing.assert_close(alone, pm(X=X["X"][:1]), atol=1e-6, rtol=1e-6)


def test_compiles_once_with_shared_tensors() -> None:
    fn, base, fresh = funcpeft.get_peft_model(stack(), funcpeft.LilyConfig(**SHARING[0]))
    trees = mc.random_trees(fresh, n=3)
    mc.assert_compiles_once(fn, base, trees, X)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    tree = optree.tree_map(lambda t: t.requires_grad_(True), trees[0])
    compiled(base, tree, **X).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in optree.tree_leaves(tree))
