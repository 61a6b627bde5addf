"""OFT (`OFTConfig`) against PEFT 0.21.2: config checks, unsupported layers, init, forward / gradients / merges on
the layer kinds PEFT supports, several adapters on one layer, mixed models, COFT training. Compile and routing:
tests/test_method_transforms.py."""

from __future__ import annotations

import copy
import functools
import re
import warnings
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import examples, method_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import assert_bf16_layers_cast_like_peft, assert_rotation_case_equals_peft
from method_helpers import CONV_X, MLP_X, OrthConv, OrthMLP, quiet, seeded
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods import oft
from funcpeft.methods.base import UnsupportedLayerError

MLP = OrthMLP
Conv = functools.partial(OrthConv, 3)
_seeded, _quiet = seeded, quiet
IDS = {"input_ids": torch.randint(1, T.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))}


# -- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=0, oft_block_size=0),
        dict(r=4, oft_block_size=4),
        dict(layers_pattern="layers"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as theirs:
        peft.OFTConfig(**kwargs)
    with pytest.raises(ValueError) as ours:
        funcpeft.OFTConfig(**kwargs)
    assert str(ours.value) == str(theirs.value)


def test_config_checks_peft_leaves_to_later_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="`bias` must be 'none', 'all' or 'oft_only'"):
        funcpeft.OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match=r"`module_dropout` must be in \[0, 1\)"):
        funcpeft.OFTConfig(module_dropout=1.0)
    with pytest.raises(TypeError, match="did you mean 'oft_block_size'|Did you mean 'oft_block_size'"):
        funcpeft.OFTConfig(oft_blocksize=4)  # type: ignore[call-arg]


def test_files_from_old_peft_are_refused_or_warned_like_peft() -> None:
    old = {"peft_type": "OFT", "r": 8, "target_modules": ["q"]}
    with pytest.raises(ValueError) as theirs:
        peft.OFTConfig.check_kwargs(**old)
    with pytest.raises(ValueError) as ours:
        funcpeft.io.config_from_dict(old)
    assert str(ours.value).endswith(str(theirs.value)) and "adapter_config.json" in str(ours.value)  # + the file
    neumann = {**funcpeft.OFTConfig(target_modules=["q"]).to_dict(), "peft_version": "0.17.1"}
    with pytest.warns(UserWarning, match="cayley-neumann parameterization has been slightly changed"):
        funcpeft.io.config_from_dict(neumann)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        funcpeft.io.config_from_dict({**neumann, "peft_version": "0.21.2"})


# -- layers -----------------------------------------------------------------------------------------------------
def test_unsupported_layers_name_module_and_type() -> None:
    gpt2 = T.tiny_gpt2()
    with pytest.raises(TypeError, match="is not supported"):  # PEFT: Conv1D is not an nn.Linear
        peft.get_peft_model(copy.deepcopy(gpt2), peft.OFTConfig(oft_block_size=4, target_modules=["c_attn"]))
    with pytest.raises(
        UnsupportedLayerError, match=r"'transformer\.h\.0\.attn\.c_attn' \(Conv1D\) is not supported by OFT"
    ):
        funcpeft.get_peft_model(gpt2, funcpeft.OFTConfig(oft_block_size=4, target_modules=["c_attn"]))
    conv1d = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(TypeError, match="is not supported"):
        peft.get_peft_model(copy.deepcopy(conv1d), peft.OFTConfig(oft_block_size=4, target_modules=["0"]))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Conv1d\) is not supported by OFT"):
        funcpeft.get_peft_model(conv1d, funcpeft.OFTConfig(oft_block_size=4, target_modules=["0"]))


def test_conv_dilation_is_refused_like_peft_and_non_square_kernels_clearly() -> None:
    dilated = _seeded(lambda: Conv(dilation=2, padding=2))
    with pytest.raises(ValueError) as theirs:
        peft.get_peft_model(copy.deepcopy(dilated), peft.OFTConfig(r=2, oft_block_size=0, target_modules=["conv"]))
    with pytest.raises(ValueError) as ours:
        funcpeft.get_peft_model(dilated, funcpeft.OFTConfig(r=2, oft_block_size=0, target_modules=["conv"]))
    assert str(ours.value) == str(theirs.value) == "Conv2d with dilation > 1 is not supported by OFT."
    wide = nn.Sequential(nn.Conv2d(2, 3, (3, 1)))
    x = torch.randn(1, 2, 5, 5)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(wide), peft.OFTConfig(r=2, oft_block_size=0, target_modules=["0"]))
    with pytest.raises(RuntimeError):  # PEFT sizes the rotation from kernel_size[0] ** 2 and fails on the call
        pm(x)
    with pytest.raises(NotImplementedError, match=r"kernel_size=\(3, 1\) is not square"):
        funcpeft.get_peft_model(wide, funcpeft.OFTConfig(r=2, oft_block_size=0, target_modules=["0"]))


@pytest.mark.parametrize("kwargs", [dict(oft_block_size=3), dict(oft_block_size=40), dict(r=3, oft_block_size=0)])
def test_block_sizes_that_do_not_divide_are_adjusted_like_peft(kwargs: dict[str, Any]) -> None:
    model = _seeded(MLP)
    config: dict[str, Any] = dict(target_modules=["lin0", "lin1"], **kwargs)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**config))
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        fpm = funcpeft.get_peft_model(model, funcpeft.OFTConfig(**config))

    def adjusted(ws: Any) -> list[str]:
        return [str(w.message) for w in ws if "Adjusted" in str(w.message)]

    assert adjusted(ours) == adjusted(theirs) and adjusted(ours)
    shapes = {n: tuple(p.shape) for n, p in pm.named_parameters() if p.requires_grad}
    assert {
        f"base_model.model.{k}.oft_R.default.weight": tuple(v["oft_R"].shape) for k, v in fpm.adapter.items()
    } == shapes


# -- init, forward, gradients, merges ---------------------------------------------------------------------------
@pytest.mark.parametrize("init_weights", [True, False])
def test_fresh_adapter_equals_peft_s_for_the_same_seed(init_weights: bool) -> None:
    model = T.tiny_llama()
    config: dict[str, Any] = dict(
        oft_block_size=8, target_modules=["q_proj", "down_proj", "embed_tokens"], init_weights=init_weights
    )
    torch.manual_seed(3)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.OFTConfig(**config))
    torch.manual_seed(3)
    fpm = funcpeft.get_peft_model(model, funcpeft.OFTConfig(**config))
    named = dict(pm.named_parameters())
    plan = fpm.plans["default"]
    for path, entry in fpm.adapter.items():
        for key, value in entry.items():
            assert torch.equal(value, named[T.peft_param_name(path, key, plan[path])]), (path, key)
    leaves: list[torch.Tensor] = optree.tree_leaves(fpm.adapter)  # type: ignore[arg-type]
    assert any(v.abs().sum() > 0 for v in leaves) != init_weights


CASES: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "conv-overlapping-patches": (Conv, dict(r=2, oft_block_size=0, target_modules=["conv"]), CONV_X),
    "conv-cayley-coft-shared": (
        Conv,
        dict(
            oft_block_size=6, target_modules=["conv"], use_cayley_neumann=False, coft=True, eps=0.05, block_share=True
        ),
        CONV_X,
    ),
    "mlp-neumann-3-terms": (
        MLP,
        dict(oft_block_size=4, target_modules=["lin0", "lin1"], num_cayley_neumann_terms=3),
        MLP_X,
    ),
    "mlp-coft-bias": (
        MLP,
        dict(oft_block_size=8, target_modules=["lin0", "lin1"], coft=True, eps=0.1, bias="oft_only"),
        MLP_X,
    ),
    "llama-embedding-block-share": (
        T.tiny_llama,
        dict(r=8, oft_block_size=0, target_modules=["embed_tokens", "o_proj"], block_share=True),
        IDS,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_gradients_and_merges_equal_peft(case: str) -> None:
    build, config, x = CASES[case]
    assert_rotation_case_equals_peft(build, "OFTConfig", config, x)


def test_bf16_layers_cast_like_peft() -> None:
    kwargs = dict(oft_block_size=4, target_modules=["lin0", "lin1"])
    adapter = assert_bf16_layers_cast_like_peft(_seeded(MLP), "OFTConfig", kwargs, MLP_X)
    assert all(t.dtype == torch.float32 for t in optree.tree_leaves(adapter))  # PEFT's autocast_adapter_dtype


def test_conv_with_a_kernel_above_one_warns_and_is_not_a_no_op_at_init_like_peft() -> None:
    model = _seeded(Conv)
    config: dict[str, Any] = dict(r=2, oft_block_size=0, target_modules=["conv"])
    with pytest.warns(UserWarning, match="folds them back by summing overlapping patches"):
        fpm = funcpeft.get_peft_model(model, funcpeft.OFTConfig(**config))
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.OFTConfig(**config)).eval()
    with torch.no_grad():
        plain, got, want = model(**CONV_X), fpm.fn(fpm.base, fpm.adapter, **CONV_X), pm(**CONV_X)
    assert (want - plain).abs().max() > 0.1  # PEFT's own fresh OFT changes this layer
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_module_dropout_is_never_applied_like_peft() -> None:
    model = _seeded(MLP)
    fpm, pm, adapter = method_pair(
        model, "OFTConfig", dict(oft_block_size=4, target_modules=["lin0"], module_dropout=0.5)
    )
    with torch.no_grad():
        eval_out = fpm.fn(fpm.base, adapter, **MLP_X)
        train_out = fpm.fn(fpm.base, adapter, **MLP_X, dropout_rng=0)
        peft_eval = pm(**MLP_X)
        peft_train = pm.train()(**MLP_X)
    assert torch.equal(train_out, eval_out)
    assert torch.equal(peft_train, peft_eval)


# -- several adapters -------------------------------------------------------------------------------------------
def test_two_adapters_on_one_layer_rotate_in_peft_s_order() -> None:
    """Block size 4 (rotations that do not commute): both active equals PEFT's forward, merging equals PEFT's
    merge, and PEFT's merge is not its forward (documented in docs/usage.md)."""
    model = _seeded(MLP)
    config: dict[str, Any] = dict(oft_block_size=4, target_modules=["lin0"], init_weights=False)
    fpm = funcpeft.get_peft_model(model, funcpeft.OFTConfig(**config), adapter_name="a")
    fpm.add_adapter("b", funcpeft.OFTConfig(**config))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**config), adapter_name="a")
    pm.add_adapter("b", peft.OFTConfig(**config))
    inner: Any = pm.base_model
    inner.model.lin0.set_adapter(["a", "b"])
    g = torch.Generator().manual_seed(1)
    trees = {n: T.random_like(fpm.adapter, g, 0.5) for n in "ab"}
    for n in "ab":
        T.copy_into_peft(pm, trees[n], fpm.plans[n], n)
    with torch.no_grad():
        want = pm(**MLP_X)
        torch.testing.assert_close(fpm.fn(fpm.base, trees, **MLP_X), want, atol=1e-6, rtol=0)
        swapped = fpm.fn(fpm.base, {"b": trees["b"], "a": trees["a"]}, **MLP_X)
        assert (swapped - want).abs().max() > 1e-2  # the order matters: {b, a} is PEFT's set_adapter(["b", "a"])
        peft_merged = copy.deepcopy(pm).merge_and_unload(adapter_names=["a", "b"])(**MLP_X)
        torch.testing.assert_close(funcpeft.merge_and_unload(fpm, trees)(**MLP_X), peft_merged, atol=1e-5, rtol=0)
        assert (peft_merged - want).abs().max() > 1e-2


def _peft_mixed_name(named: dict[str, Any], path: str, key: str, adapter: str) -> str:
    pattern = re.compile(rf"^base_model\.model\.{re.escape(path)}\.(base_layer\.)*{key}\.{adapter}(\.weight)?$")
    hits = [n for n in named if pattern.match(n)]
    assert len(hits) == 1, (path, key, adapter, hits)
    return hits[0]


def test_mixed_with_lora_on_the_same_layers_equals_peft_mixed_model() -> None:
    model = T.tiny_llama()
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("default", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        ("rot", "OFTConfig", dict(oft_block_size=8, target_modules=["q_proj", "o_proj"], coft=True, eps=0.2)),
        ("rot2", "OFTConfig", dict(oft_block_size=4, target_modules=["q_proj"], use_cayley_neumann=False)),
    ]
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**specs[0][2]), mixed=True)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**specs[0][2]), mixed=True)
    fresh: dict[str, Any] = {"default": fpm.adapter}
    for name, cls, kwargs in specs[1:]:
        fresh[name] = fpm.add_adapter(name, getattr(funcpeft, cls)(**kwargs))
        pm.add_adapter(name, getattr(peft, cls)(**kwargs))
    pm.set_adapter([s[0] for s in specs])
    g = torch.Generator().manual_seed(0)
    trees: dict[str, Any] = {
        n: optree.tree_map(lambda v: (v.detach() + 0.3 * torch.randn(v.shape, generator=g)).requires_grad_(), t)
        for n, t in fresh.items()
    }
    named = dict(pm.named_parameters())
    with torch.no_grad():
        for n, tree in trees.items():
            for path, entry in tree.items():
                for key, value in entry.items():
                    named[_peft_mixed_name(named, path, key, n)].copy_(value)
    pm.eval()
    want = pm(**IDS).logits
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
    (want * weights).sum().backward()
    got = fpm.fn(fpm.base, trees, **IDS).logits
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)
    _, grads = funcpeft.value_and_grad(lambda t: (fpm.fn(fpm.base, t, **IDS).logits * weights).sum())(trees)
    for n, tree in grads.items():
        for path, entry in tree.items():
            for key, grad in entry.items():
                torch.testing.assert_close(
                    grad, named[_peft_mixed_name(named, path, key, n)].grad, atol=1e-4, rtol=1e-4
                )


# -- COFT: PEFT projects its parameter in place -----------------------------------------------------------------
def test_coft_project_before_each_step_gives_peft_s_training_trajectory() -> None:
    model = _seeded(MLP)
    config: dict[str, Any] = dict(
        oft_block_size=4, target_modules=["lin0", "lin1"], coft=True, eps=0.05, init_weights=False
    )
    fpm, pm, adapter = method_pair(model, "OFTConfig", config, scale=0.3)
    plan = fpm.plans["default"]
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    plain: Any = optree.tree_map(torch.Tensor.detach, adapter)
    projected = plain
    for _ in range(3):
        opt.zero_grad()
        (pm(**MLP_X) * weights).sum().backward()
        opt.step()
        steps = []
        tree: Any
        for tree, project in ((plain, False), (projected, True)):
            if project:
                tree = {p: oft.coft_project(plan[p].spec, e) for p, e in tree.items()}
            _, g = funcpeft.value_and_grad(lambda a: (fpm.fn(fpm.base, a, **MLP_X) * weights).sum())(tree)
            steps.append(optree.tree_map(lambda t, d: (t - 0.5 * d).detach(), tree, g))
        plain, projected = steps
    T.assert_trees_close(projected, _peft_values(pm, plan, projected), atol=1e-6)
    with pytest.raises(AssertionError):  # without the projection the stored values drift from PEFT's
        T.assert_trees_close(plain, _peft_values(pm, plan, plain), atol=1e-6)


def _peft_values(pm: nn.Module, plan: Any, like: Any) -> Any:
    named = dict(pm.named_parameters())
    return {p: {k: named[T.peft_param_name(p, k, plan[p])].detach() for k in e} for p, e in like.items()}


# -- transforms -------------------------------------------------------------------------------------------------
@settings(max_examples=examples(20), deadline=None)
@given(block=st.integers(2, 6), neumann=st.booleans(), seed=st.integers(0, 2**16))
def test_cayley_blocks_are_orthogonal_and_merging_inverts(block: int, neumann: bool, seed: int) -> None:
    """Cayley blocks are exactly orthogonal; the Neumann series is close for small Q; unmerge(merge(W)) == W."""
    lin = nn.Linear(block * 3, 5)
    model = nn.Sequential(lin)
    fpm = funcpeft.get_peft_model(
        model,
        funcpeft.OFTConfig(
            oft_block_size=block, target_modules=["0"], use_cayley_neumann=neumann, num_cayley_neumann_terms=8
        ),
    )
    spec = fpm.plans["default"]["0"].spec
    assert spec is not None
    vec = 0.05 * torch.randn(3, block * (block - 1) // 2, generator=torch.Generator().manual_seed(seed))
    blocks = oft.rotation_blocks(spec, vec)
    eye = torch.eye(block).expand_as(blocks)
    torch.testing.assert_close(blocks @ blocks.transpose(1, 2), eye, atol=1e-4 if neumann else 1e-6, rtol=0)
    w = lin.weight.detach()
    merged = oft.merge_weight(spec, {"oft_R": vec}, w, None)
    torch.testing.assert_close(oft.unmerge_weight(spec, {"oft_R": vec}, merged, None), w, atol=1e-5, rtol=0)
