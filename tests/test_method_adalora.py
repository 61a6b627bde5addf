"""AdaLoRA (`funcpeft.AdaLoraConfig`) against PEFT 0.21.2.

Config checks, layer types, init draws, 20 training steps with the rank allocator (same ranks, masks, lora_E
zeros and values as PEFT's `update_and_allocate`), the orthogonal regulariser, files with a rank_pattern both
ways, the mixed model, compile and vmap. PEFT's own matrix rows run in tests/test_peft_matrix.py and the
contract rows (tiny Llama, GPT-2) in tests/test_contract.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from types import SimpleNamespace
from typing import Any

import method_checks as mc
import optree
import peft
import pytest
import torch
from helpers import MODELS, capture_stdout, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.adalora import RankAllocator as PeftRankAllocator
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.testing import CompileCounter

import funcpeft
from funcpeft import testing as T
from funcpeft.methods.adalora_allocator import budget_schedule

STEPS = 20
# the budget shrinks from step tinit=3 to total_step - tfinal = 16, with an allocation every deltaT=2 steps
TRAIN: dict[str, Any] = dict(
    init_r=6,
    target_r=2,
    lora_alpha=16,
    target_modules=["q_proj", "v_proj", "down_proj"],
    total_step=STEPS,
    tinit=3,
    tfinal=4,
    deltaT=2,
    task_type="CAUSAL_LM",
)
LR = 1e-2
SNAPSHOT = 12  # a budgeting step at which the allocators' sensitivity EMAs are compared


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_name(path: str, key: str, adapter: str = "default") -> str:
    return f"base_model.model.{path}.{key}.{adapter}"


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, T.VOCAB, (2, 8), generator=g) for _ in range(STEPS)]


# -- config ---------------------------------------------------------------------------------------------------
BAD_CONFIGS: list[dict[str, Any]] = [
    dict(use_dora=True, total_step=5),
    dict(total_step=None),
    dict(total_step=0),
    dict(total_step=5, orth_reg_weight=-1),
    dict(total_step=5, tinit=3, tfinal=2),
    dict(total_step=5, target_modules="q", layers_to_transform=[0]),
    dict(total_step=5, layers_pattern="layers"),
]


@pytest.mark.parametrize("kwargs", BAD_CONFIGS, ids=[",".join(k) for k in BAD_CONFIGS])
def test_config_errors_are_peft_s(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as want:
        peft.AdaLoraConfig(**kwargs)
    with pytest.raises(ValueError, match=re.escape(str(want.value))):
        funcpeft.AdaLoraConfig(**kwargs)


def test_config_warns_about_r_like_peft() -> None:
    with pytest.warns(UserWarning) as want:
        peft.AdaLoraConfig(total_step=5, r=4)
    with pytest.warns(UserWarning, match=re.escape(str(want[0].message))):
        funcpeft.AdaLoraConfig(total_step=5, r=4)


def test_negative_init_r_is_refused_with_peft_s_message() -> None:
    model = MODELS["mlp"]()
    with pytest.raises(ValueError) as want:
        _quiet(
            peft.get_peft_model,
            copy.deepcopy(model),
            peft.AdaLoraConfig(init_r=-1, total_step=5, target_modules=["lin0"]),
        )
    with pytest.raises(ValueError, match=re.escape(str(want.value))):
        funcpeft.AdaLoraConfig(init_r=-1, total_step=5, target_modules=["lin0"])


def test_rank_pattern_must_be_the_allocator_s_and_drops_the_adapter_name() -> None:
    with pytest.raises(ValueError, match="not LoRA's regex -> rank dict"):
        funcpeft.AdaLoraConfig(total_step=5, rank_pattern={"q_proj": [True]})
    with pytest.raises(ValueError, match=r"rank_pattern must be dict\[str, list\[bool\]\] \| None"):
        lora_style: Any = {"lin0.lora_E": 2}
        funcpeft.AdaLoraConfig(total_step=5, rank_pattern=lora_style)
    config = funcpeft.AdaLoraConfig(
        total_step=5, rank_pattern={"a.lin0.lora_E.default": [True, False], "b.lora_E": [False]}
    )
    assert config.rank_pattern == {"a.lin0.lora_E": [True, False], "b.lora_E": [False]}  # the keys PEFT saves


# -- layers and init ------------------------------------------------------------------------------------------
class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.c1 = nn.Conv1d(4, 4, 3)
        self.c3 = nn.Conv3d(4, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)


@pytest.mark.parametrize("name,kind", [("emb", "Embedding"), ("c1", "Conv1d"), ("c3", "Conv3d")])
def test_unsupported_layers_are_refused_like_peft(name: str, kind: str) -> None:
    with pytest.raises(ValueError, match="is not supported"):
        _quiet(peft.get_peft_model, Layers(), peft.AdaLoraConfig(total_step=5, target_modules=[name]))
    with pytest.raises(funcpeft.methods.base.UnsupportedLayerError, match=f"'{name}' \\({kind}\\) is not supported"):
        funcpeft.get_peft_model(Layers(), funcpeft.AdaLoraConfig(total_step=5, target_modules=[name]))


def test_grouped_conv2d_is_refused_where_peft_fails_later() -> None:
    pm = _quiet(peft.get_peft_model, Layers(), peft.AdaLoraConfig(total_step=5, target_modules=["grouped"]))
    with pytest.raises(RuntimeError):  # PEFT builds the layer, then cannot reshape its delta in the forward
        pm.base_model.model.grouped(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="'grouped' \\(Conv2d with groups=2\\)"):
        funcpeft.get_peft_model(Layers(), funcpeft.AdaLoraConfig(total_step=5, target_modules=["grouped"]))


@pytest.mark.parametrize("init", [True, False])
def test_fresh_adapter_equals_peft_s_for_the_same_seed(init: bool) -> None:
    model = MODELS["conv"]()  # a Conv2d (3x3 kernel) and a Linear
    kwargs: dict[str, Any] = dict(init_r=3, target_modules=["conv2d", "fc"], total_step=5, init_lora_weights=init)
    torch.manual_seed(4)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(**kwargs))
    fpm = funcpeft.get_peft_model(model, funcpeft.AdaLoraConfig(**kwargs), generator=torch.Generator().manual_seed(4))
    named = dict(pm.named_parameters())
    assert fpm.adapter["conv2d"]["lora_A"].shape == (3, 3 * 3 * 3)
    for path, entry in fpm.adapter.items():
        for key, value in entry.items():
            assert torch.equal(value, named[_peft_name(path, key)]), (path, key)
        assert named[_peft_name(path, "ranknum")].item() == 3.0
    assert (fpm.adapter["fc"]["lora_E"] == 0).all() == init
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()  # ranknum counts in "all params"
    x = make_inputs("conv")
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    T.copy_into_peft(pm, tree, fpm.plans["default"])
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, tree, **x), pm.eval()(**x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_model_init_forward_and_merge_are_peft_s_bitwise(autocast: bool) -> None:
    """PEFT rounds a fresh adapter through the layer's dtype (and back to float32 when autocasting); ranknum too."""
    # transformers wraps PreTrainedModel.to in functools.wraps, whose stub loses the bound self
    model = T.tiny_gpt2().to(torch.bfloat16)  # type: ignore[arg-type]  # Conv1D layers: the transposed delta
    kwargs: dict[str, Any] = dict(init_r=4, target_modules=["c_attn", "c_fc"], total_step=5, init_lora_weights=False)
    torch.manual_seed(0)
    pm = _quiet(
        peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(**kwargs), autocast_adapter_dtype=autocast
    )
    torch.manual_seed(0)
    fpm = _quiet(funcpeft.get_peft_model, model, funcpeft.AdaLoraConfig(**kwargs), autocast_adapter_dtype=autocast)
    named = dict(pm.named_parameters())
    for path, entry in fpm.adapter.items():
        assert (
            named[_peft_name(path, "ranknum")].dtype
            == entry["lora_A"].dtype
            == (torch.float32 if autocast else torch.bfloat16)
        )
        for key, value in entry.items():
            assert torch.equal(value, named[_peft_name(path, key)]), (path, key)
    ids = make_inputs("gpt2")["input_ids"]
    with torch.no_grad():
        assert torch.equal(fpm.fn(fpm.base, fpm.adapter, input_ids=ids).logits, pm.eval()(input_ids=ids).logits)
        merged = _quiet(funcpeft.merge_and_unload, fpm, fpm.adapter)(input_ids=ids).logits
        assert torch.equal(merged, _quiet(copy.deepcopy(pm).merge_and_unload)(input_ids=ids).logits)


def test_training_dropout_matches_peft_given_the_same_masks() -> None:
    """lora_dropout on the layer input only (PEFT's nn.Dropout before `@ (A * E).T`), drawn like funcpeft's."""
    model = T.tiny_llama()
    kwargs: dict[str, Any] = dict(init_r=4, lora_dropout=0.3, target_modules=["q_proj", "down_proj"], total_step=5)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(**kwargs))
    fpm = funcpeft.get_peft_model(model, funcpeft.AdaLoraConfig(**kwargs))
    adapter = optree.tree_map(
        torch.Tensor.detach, T.random_like(fpm.adapter, torch.Generator().manual_seed(3), scale=0.3)
    )
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    mc.patch_peft_dropout(pm, "lora_dropout", 0.3, seed=5)
    ids = make_inputs("llama")["input_ids"]
    with torch.no_grad():
        want = pm.train()(input_ids=ids).logits
        got = fpm.fn(fpm.base, adapter, input_ids=ids, dropout_rng=torch.Generator().manual_seed(5)).logits
        plain = fpm.fn(fpm.base, adapter, input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-4


# -- training with the rank allocator --------------------------------------------------------------------------
def _train_peft(model: nn.Module, batches: list[torch.Tensor]) -> SimpleNamespace:
    """PEFT's loop: loss (with its orthogonal regulariser) -> backward -> AdamW step -> update_and_allocate."""
    torch.manual_seed(0)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(**TRAIN))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    patterns, losses = [], []
    for step, b in enumerate(batches):
        loss = pm(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
        patterns.append(copy.deepcopy(pm.peft_config["default"].rank_pattern))
        losses.append(loss.item())
        if step == SNAPSHOT:
            alloc = pm.base_model.rankallocator
            emas = {k: {n: t.clone() for n, t in getattr(alloc, k).items()} for k in ("exp_avg_ipt", "exp_avg_unc")}
    return SimpleNamespace(model=pm, patterns=patterns, losses=losses, emas=emas)


def _train_funcpeft(model: nn.Module, batches: list[torch.Tensor], optimiser: str) -> SimpleNamespace:
    """The same loop on funcpeft: funcpeft.optim.adamw, or torch.optim.AdamW on the adapter's leaves."""
    torch.manual_seed(0)
    fpm = _quiet(funcpeft.get_peft_model, model, funcpeft.AdaLoraConfig(**TRAIN))
    fn, base, adapter = fpm
    config = fpm.peft_config["default"]
    alloc = funcpeft.rank_allocator(config)
    alloc_state = alloc.init(adapter)

    def loss_fn(a: Any, b: torch.Tensor) -> torch.Tensor:
        return fn(base, a, input_ids=b, labels=b).loss + funcpeft.orthogonal_regularizer(a, config)

    patterns, losses = [], []
    if optimiser == "funcpeft":
        opt = funcpeft.optim.adamw(LR)
        opt_state = opt.init(adapter)
    else:
        leaves = [t.detach().clone().requires_grad_(True) for t in optree.tree_leaves(adapter)]
        adapter = optree.tree_unflatten(optree.tree_structure(adapter), leaves)
        torch_opt = torch.optim.AdamW(leaves, lr=LR)
    for step, b in enumerate(batches):
        if optimiser == "funcpeft":
            loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, b)
            updates, opt_state = opt.update(grads, opt_state, adapter)
            adapter = funcpeft.optim.apply_updates(adapter, updates)
            alloc_state, adapter = alloc.update(alloc_state, adapter, grads, step)
        else:
            torch_opt.zero_grad()
            loss = loss_fn(adapter, b)
            loss.backward()
            grads = optree.tree_unflatten(optree.tree_structure(adapter), [t.grad for t in leaves])
            torch_opt.step()
            alloc_state, masked = alloc.update(alloc_state, adapter, grads, step)
            with torch.no_grad():  # PEFT's in-place masked_fill_ on the optimiser's own parameters
                new_leaves: list[torch.Tensor] = optree.tree_leaves(masked)  # type: ignore[arg-type]
                for leaf, new in zip(leaves, new_leaves):
                    leaf.copy_(new)
        patterns.append(funcpeft.rank_pattern(alloc_state))
        losses.append(loss.item())
        if step == SNAPSHOT:
            emas = {
                k: {f"{p}.{n}.default": t for p, e in getattr(alloc_state, k).items() for n, t in e.items()}
                for k in ("exp_avg_ipt", "exp_avg_unc")
            }
    return SimpleNamespace(pm=fpm, adapter=adapter, state=alloc_state, patterns=patterns, losses=losses, emas=emas)


@pytest.fixture(scope="module")
def trained() -> SimpleNamespace:
    model, batches = T.tiny_llama(), _batches()
    return SimpleNamespace(
        model=model, batches=batches, peft=_train_peft(model, batches), ours=_train_funcpeft(model, batches, "funcpeft")
    )


def _check_training_equals_peft(ours: SimpleNamespace, theirs: SimpleNamespace) -> None:
    assert ours.patterns == theirs.patterns  # every allocation: the same masks, in PEFT's rank_pattern form
    final = theirs.patterns[-1]
    ranks = [sum(m) for m in final.values()]
    assert sum(ranks) == TRAIN["target_r"] * len(final) and len(set(ranks)) > 1  # a real, uneven allocation
    assert max(abs(a - b) for a, b in zip(ours.losses, theirs.losses)) <= 1e-5  # PEFT's loss includes its regulariser
    for kind, want in theirs.emas.items():  # the allocator's state, PEFT's RankAllocator.exp_avg_ipt / exp_avg_unc
        assert ours.emas[kind].keys() == want.keys()
        for name, value in want.items():
            scale = value.abs().max().item()
            assert scale > 0 and (ours.emas[kind][name] - value).abs().max().item() <= 1e-4 * scale, (kind, name)
    named = dict(theirs.model.named_parameters())
    for path, entry in ours.adapter.items():
        keep = torch.tensor(final[f"{path}.lora_E.default"])
        assert torch.equal(entry["lora_E"].view(-1) == 0, ~keep), path  # exactly the pruned singular values are 0
        assert torch.equal(named[_peft_name(path, "lora_E")].view(-1) == 0, ~keep), path
        for key, value in entry.items():
            torch.testing.assert_close(value.detach(), named[_peft_name(path, key)].detach(), atol=1e-5, rtol=0)


def test_twenty_steps_equal_peft_with_funcpeft_optim(trained: SimpleNamespace) -> None:
    _check_training_equals_peft(trained.ours, trained.peft)


def test_twenty_steps_equal_peft_with_torch_optim_on_the_leaves(trained: SimpleNamespace) -> None:
    _check_training_equals_peft(_train_funcpeft(trained.model, trained.batches, "torch"), trained.peft)


@settings(max_examples=examples(60))
@given(
    tinit=st.integers(0, 5),
    budgeting=st.integers(1, 12),
    tfinal=st.integers(0, 5),
    delta=st.integers(1, 4),
    init_bgt=st.integers(2, 40),
    data=st.data(),
)
def test_budget_schedule_is_peft_s(
    tinit: int, budgeting: int, tfinal: int, delta: int, init_bgt: int, data: Any
) -> None:
    total = tinit + budgeting + tfinal
    config = _quiet(funcpeft.AdaLoraConfig, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=delta)
    target = data.draw(st.integers(0, init_bgt - 1))
    theirs = object.__new__(PeftRankAllocator)  # only its schedule: no model needed
    theirs.peft_config, theirs.init_bgt, theirs.target_bgt = config, init_bgt, target
    for step in range(total + 3):
        assert budget_schedule(config, init_bgt, target, step) == theirs.budget_schedule(step), step


def _peft_allocator_state(pm: Any) -> dict[str, dict[str, torch.Tensor]]:
    alloc = pm.base_model.rankallocator
    return {"exp_avg_ipt": dict(alloc.exp_avg_ipt), "exp_avg_unc": dict(alloc.exp_avg_unc)}


@settings(max_examples=examples(25), deadline=None)
@given(
    tinit=st.integers(0, 3),
    budgeting=st.integers(1, 8),
    tfinal=st.integers(0, 3),
    delta=st.integers(1, 3),
    init_r=st.integers(1, 5),
    beta1=st.sampled_from([0.1, 0.5, 0.85, 0.99]),
    beta2=st.sampled_from([0.2, 0.85, 0.95]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_update_and_allocate_equals_peft_step_by_step(
    tinit: int,
    budgeting: int,
    tfinal: int,
    delta: int,
    init_r: int,
    beta1: float,
    beta2: float,
    ties: bool,
    seed: int,
    data: Any,
) -> None:
    """The same gradients and parameter updates at every step, through all three phases and two steps past the
    end: the same EMAs, masks (PEFT's rank_pattern) and lora_E (with its zeros) as PEFT's update_and_allocate.
    ties: small-integer gradients, so that many ranks score the same (the threshold's `<=` decides)."""
    total = tinit + budgeting + tfinal
    target_r = data.draw(st.integers(0, init_r - 1))
    kwargs: dict[str, Any] = dict(
        init_r=init_r,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta,
        total_step=total,
        beta1=beta1,
        beta2=beta2,
        target_modules=["lin0", "lin1"],
    )
    model = MODELS["mlp"]()
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(**kwargs))
    fpm = _quiet(funcpeft.get_peft_model, model, funcpeft.AdaLoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    adapter: Any = optree.tree_map(torch.Tensor.detach, T.random_like(fpm.adapter, g, scale=0.5))
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    named = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    alloc = funcpeft.rank_allocator(fpm.peft_config["default"])
    state = alloc.init(adapter)
    for step in range(total + 2):

        def draw(t: torch.Tensor) -> torch.Tensor:
            r = torch.randint(-2, 3, t.shape, generator=g).float() if ties else torch.randn(t.shape, generator=g)
            return r.to(t.dtype)

        grads: Any = optree.tree_map(draw, adapter)
        step_: Any = optree.tree_map(lambda t: 0.05 * draw(t), adapter)  # an optimiser's update, before the allocator
        adapter = optree.tree_map(torch.add, adapter, step_)
        with torch.no_grad():
            for path, entry in adapter.items():
                for key in entry:
                    p = named[_peft_name(path, key)]
                    p.add_(step_[path][key])
                    p.grad = grads[path][key].clone()
        pm.base_model.update_and_allocate(step)
        state, adapter = alloc.update(state, adapter, grads, step)
        assert funcpeft.rank_pattern(state) == pm.peft_config["default"].rank_pattern, step
        for path, entry in adapter.items():
            assert torch.equal(entry["lora_E"], named[_peft_name(path, "lora_E")]), (step, path)
        theirs = _peft_allocator_state(pm)
        for kind in ("exp_avg_ipt", "exp_avg_unc"):
            ours = {f"{p}.{n}.default": t for p, e in getattr(state, kind).items() for n, t in e.items()}
            if not theirs[kind]:  # PEFT's reset_ipt() after the final allocation: funcpeft's EMAs are zeros again
                assert all(not t.any() for t in ours.values()), (step, kind)
                continue
            assert ours.keys() == theirs[kind].keys()
            for name, want in theirs[kind].items():
                assert torch.equal(ours[name], want), (step, kind, name)
    final = pm.peft_config["default"].rank_pattern
    assert sum(sum(m) for m in final.values()) <= target_r * 2  # ties can prune below the budget, in both


def test_allocator_refuses_what_peft_cannot_run() -> None:
    model = MODELS["mlp"]()
    fpm = funcpeft.get_peft_model(
        model, funcpeft.AdaLoraConfig(init_r=2, target_r=2, target_modules=["lin0"], total_step=4)
    )
    with pytest.raises(ValueError, match="nothing to prune"):
        funcpeft.rank_allocator(fpm.peft_config["default"]).init(fpm.adapter)
    with pytest.raises(ValueError, match="beta1 must be in \\(0, 1\\)"):
        funcpeft.rank_allocator(funcpeft.AdaLoraConfig(total_step=4, beta1=1.0))
    with pytest.raises(ValueError, match="inference_mode is True"):
        funcpeft.rank_allocator(funcpeft.AdaLoraConfig(total_step=4, inference_mode=True))
    config = funcpeft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["lin0", "lin1"], total_step=4, tfinal=1)
    fpm = funcpeft.get_peft_model(model, config)
    alloc = funcpeft.rank_allocator(fpm.peft_config["default"])
    state = alloc.init(fpm.adapter)
    grads: Any = optree.tree_map(torch.ones_like, fpm.adapter)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="step must be an int"):
        alloc.update(state, fpm.adapter, grads, 1.0)
    with pytest.raises(ValueError, match="no allocation has run yet"):
        alloc.update(state, fpm.adapter, grads, 4)  # PEFT: AttributeError on its rank_pattern None
    with pytest.raises(ValueError, match=r"grads\['lin1'\]\['lora_A'\] should be a tensor of shape \(4, 16\)"):
        alloc.update(state, fpm.adapter, {"lin0": grads["lin0"]}, 0)
    adapter = fpm.adapter
    for step in range(4):  # 3 = total_step - tfinal: the final allocation
        state, adapter = alloc.update(state, adapter, grads, step)
    masked = adapter
    saved, in_memory = funcpeft.rank_pattern(state, None), funcpeft.rank_pattern(state)
    assert saved is not None and in_memory is not None
    assert sum(saved["lin0.lora_E"]) + sum(in_memory["lin1.lora_E.default"]) == 4
    assert masked["lin0"]["lora_A"] is fpm.adapter["lin0"]["lora_A"]  # only lora_E is new
    emas: list[torch.Tensor] = optree.tree_leaves(state.exp_avg_ipt)  # type: ignore[arg-type]
    assert all(torch.equal(t, torch.zeros_like(t)) for t in emas)  # reset_ipt


# -- the orthogonal regulariser -------------------------------------------------------------------------------
def test_loss_plus_orthogonal_regularizer_is_peft_s_loss() -> None:
    model = T.tiny_llama()
    kwargs: dict[str, Any] = dict(TRAIN)
    ids = make_inputs("llama")["input_ids"]
    fpm = funcpeft.get_peft_model(model, funcpeft.AdaLoraConfig(**kwargs))
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(2), scale=0.3)
    reg = funcpeft.orthogonal_regularizer(tree, fpm.peft_config["default"])
    for task_type, with_reg in (("CAUSAL_LM", True), (None, False)):  # a plain PeftModel skips AdaLoraModel.forward
        pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(**dict(kwargs, task_type=task_type)))
        T.copy_into_peft(pm, tree, fpm.plans["default"])
        with torch.no_grad():
            want = pm(input_ids=ids, labels=ids).loss
            got = fpm.fn(fpm.base, tree, input_ids=ids, labels=ids).loss + (reg if with_reg else 0)
        assert abs(got.item() - want.item()) <= 1e-6, task_type
    assert reg.item() > 0.1  # the regulariser is not negligible here: the check above can fail


# -- files with a rank_pattern --------------------------------------------------------------------------------
def _files(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    config["target_modules"] = sorted(config["target_modules"])
    return load_file(os.path.join(directory, "adapter_model.safetensors")), config


def test_saving_the_trained_adapter_writes_peft_s_pruned_files(trained: SimpleNamespace, tmp_path: Any) -> None:
    pm, ours = trained.peft.model, trained.ours
    _quiet(pm.save_pretrained, tmp_path / "peft")
    ours.pm.peft_config["default"] = funcpeft.with_rank_pattern(ours.pm.peft_config["default"], ours.state)
    _quiet(ours.pm.save_pretrained, tmp_path / "ours", ours.adapter)
    (got, got_cfg), (want, want_cfg) = _files(str(tmp_path / "ours")), _files(str(tmp_path / "peft"))
    assert got_cfg == want_cfg  # rank_pattern keys without the adapter name, like PEFT's file
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert any(v.shape[0] < TRAIN["init_r"] for k, v in want.items() if k.endswith("lora_E"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
    back = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(trained.model), str(tmp_path / "ours")).eval()
    ids = trained.batches[0]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, pm.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_loading_resizes_to_the_rank_pattern_like_peft(trained: SimpleNamespace, tmp_path: Any) -> None:
    _quiet(trained.peft.model.save_pretrained, tmp_path / "peft")
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(trained.model), str(tmp_path / "peft")).eval()
    fpm = _quiet(funcpeft.from_pretrained, copy.deepcopy(trained.model), str(tmp_path / "peft"))
    named = dict(theirs.named_parameters())
    for path, entry in fpm.adapter.items():
        rank = sum(fpm.peft_config["default"].rank_pattern[f"{path}.lora_E"])
        assert fpm.plans["default"][path].spec.hyper.r == rank == entry["lora_A"].shape[0]
        for key, value in entry.items():
            assert torch.equal(value, named[_peft_name(path, key)])
    assert capture_stdout(fpm.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)
    ids = trained.batches[1]
    with torch.no_grad():
        torch.testing.assert_close(
            fpm.fn(fpm.base, fpm.adapter, input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0
        )
    _quiet(fpm.save_pretrained, tmp_path / "ours", fpm.adapter)
    _quiet(theirs.save_pretrained, tmp_path / "peft2")
    (got, got_cfg), (want, want_cfg) = _files(str(tmp_path / "ours")), _files(str(tmp_path / "peft2"))
    assert got_cfg == want_cfg and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_get_peft_model_with_a_rank_pattern_keeps_init_r_like_peft(tmp_path: Any) -> None:
    """PEFT resizes only on load: a rank_pattern in get_peft_model's config changes nothing but the saved files."""
    model = MODELS["mlp"]()
    kwargs: dict[str, Any] = dict(
        init_r=3,
        target_modules=["lin0", "lin1"],
        total_step=5,
        rank_pattern={"lin0.lora_E": [True, False, True], "lin1.lora_E": [False, False, False]},
    )
    torch.manual_seed(0)
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(**kwargs))
    fpm = funcpeft.get_peft_model(model, funcpeft.AdaLoraConfig(**kwargs))
    assert [t.shape[0] for t in (fpm.adapter["lin0"]["lora_A"], fpm.adapter["lin1"]["lora_A"])] == [3, 3]
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    T.copy_into_peft(pm, tree, fpm.plans["default"])
    _quiet(pm.save_pretrained, tmp_path / "peft")
    fpm.save_pretrained(tmp_path / "ours", tree)
    (got, got_cfg), (want, want_cfg) = _files(str(tmp_path / "ours")), _files(str(tmp_path / "peft"))
    assert got_cfg == want_cfg and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got["base_model.model.lin1.lora_A"].shape == (0, 16)  # a layer that kept no rank
    loaded = funcpeft.from_pretrained(model, str(tmp_path / "ours"))
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), str(tmp_path / "peft")).eval()
    x = make_inputs("mlp")["x"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.fn(loaded.base, loaded.adapter, x=x), theirs(x=x), atol=1e-6, rtol=0)
    bad = {**tree, "lin0": {**tree["lin0"], "lora_E": tree["lin0"]["lora_E"][:1]}}
    with pytest.raises(
        funcpeft.AdapterMismatchError, match="lin0.lora_E: checkpoint \\[1, 1\\], model expects \\[3, 1\\]"
    ):
        fpm.save_pretrained(tmp_path / "bad", bad)


def test_rank_patterns_that_do_not_fit_the_adapter_are_clear_errors(tmp_path: Any) -> None:
    """PEFT fails with a bare KeyError (saving) or IndexError (loading); funcpeft names the key and writes nothing."""
    model = MODELS["mlp"]()
    kwargs: dict[str, Any] = dict(init_r=3, target_modules=["lin0"], total_step=5)
    fpm = funcpeft.get_peft_model(model, funcpeft.AdaLoraConfig(**kwargs, rank_pattern={"lin1.lora_E": [True] * 3}))
    with pytest.raises(ValueError, match=r"names 'lin1.lora_E', but the adapter has no lin1.lora_E .*\['lin0'\]"):
        fpm.save_pretrained(tmp_path / "other", fpm.adapter)
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    _quiet(peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**kwargs)).save_pretrained, tmp_path / "ok")
    with open(tmp_path / "ok" / "adapter_config.json") as f:
        saved = json.load(f)
    with open(tmp_path / "ok" / "adapter_config.json", "w") as f:
        json.dump({**saved, "rank_pattern": {"lin0.lora_E": [True, False]}}, f)
    with pytest.raises(ValueError, match=r"rank_pattern\['lin0.lora_E'\] has 2 entries; it needs one per initial rank"):
        funcpeft.from_pretrained(model, str(tmp_path / "ok"))


# -- mixed model, compile, vmap, weighted adapters --------------------------------------------------------------
def test_mixed_with_lora_equals_peft_mixed_model() -> None:
    model = T.tiny_llama()
    lora: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ada: dict[str, Any] = dict(init_r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], total_step=5)
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**lora), mixed=True)
    fresh = {"default": fpm.adapter, "ada": fpm.add_adapter("ada", funcpeft.AdaLoraConfig(**ada))}
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**lora), mixed=True)
    _quiet(pm.add_adapter, "ada", peft.AdaLoraConfig(**ada))
    pm.set_adapter(["default", "ada"])
    trees = {n: T.random_like(t, torch.Generator().manual_seed(i)) for i, (n, t) in enumerate(fresh.items())}
    named = dict(pm.named_parameters())

    def peft_param(adapter: str, path: str, key: str) -> nn.Parameter:
        pattern = re.compile(rf"^base_model\.model\.{re.escape(path)}\.(base_layer\.)*{key}\.{adapter}(\.weight)?$")
        (hit,) = [n for n in named if pattern.match(n)]
        return named[hit]

    with torch.no_grad():
        for a, t in trees.items():
            for path, entry in t.items():
                for key, value in entry.items():
                    peft_param(a, path, key).copy_(value)
    ids = make_inputs("llama")["input_ids"]
    out = pm.eval()(input_ids=ids, labels=ids)
    out.loss.backward()
    loss, grads = funcpeft.value_and_grad(lambda t: fpm.fn(fpm.base, t, input_ids=ids, labels=ids).loss)(trees)
    assert abs(loss.item() - out.loss.item()) <= 1e-5  # PeftMixedModel adds no orthogonal regulariser
    want = {a: {p: {k: peft_param(a, p, k).grad for k in e} for p, e in t.items()} for a, t in trees.items()}
    T.assert_trees_close(grads, want, atol=1e-5)
    assert fpm.get_nb_trainable_parameters(trees) == pm.get_nb_trainable_parameters()


def test_compiles_to_one_graph_and_new_values_do_not_recompile() -> None:
    fpm = funcpeft.get_peft_model(
        MODELS["conv"](), funcpeft.AdaLoraConfig(init_r=3, target_modules=["conv2d", "fc"], total_step=5)
    )
    fn, base, fresh = fpm
    x = make_inputs("conv")["x"]
    with torch.no_grad():
        fn(
            base, fresh, x=x
        )  # eager first: fn caches the plan's leaf shapes (tests/test_compile.py checks a cold start)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        for seed in range(3):
            tree = optree.tree_map(torch.Tensor.detach, T.random_like(fresh, torch.Generator().manual_seed(seed)))
            torch.testing.assert_close(compiled(base, tree, x=x), fn(base, tree, x=x), atol=1e-6, rtol=0)
    assert counter.frame_count == 1


def test_vmap_and_per_example_routing_on_conv2d_equal_each_adapter_alone() -> None:
    fpm = funcpeft.get_peft_model(
        MODELS["conv"](), funcpeft.AdaLoraConfig(init_r=3, target_modules=["conv2d", "fc"], total_step=5)
    )
    fn, base, fresh = fpm
    x = make_inputs("conv", batch=3)["x"]
    trees = [
        optree.tree_map(torch.Tensor.detach, T.random_like(fresh, torch.Generator().manual_seed(s))) for s in range(3)
    ]
    stacked = funcpeft.stack_adapters(trees)
    with torch.no_grad():
        alone = [fn(base, t, x=x) for t in trees]
        mapped = torch.func.vmap(lambda a: fn(base, a, x=x))(stacked)
        routed = fn(base, funcpeft.per_example(stacked, torch.tensor([2, 0, 1])), x=x)
    for k in range(3):
        torch.testing.assert_close(mapped[k], alone[k], atol=1e-6, rtol=0)
    for i, k in enumerate([2, 0, 1]):
        torch.testing.assert_close(routed[i], alone[k][i], atol=1e-6, rtol=0)


def test_add_weighted_adapter_is_refused_like_peft() -> None:
    model = MODELS["mlp"]()
    pm = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.AdaLoraConfig(total_step=5, target_modules=["lin0"]))
    with pytest.raises(TypeError, match="does not support add_weighted_adapter"):
        pm.add_weighted_adapter(["default"], [1.0], "merged")
    fpm = funcpeft.get_peft_model(model, funcpeft.AdaLoraConfig(total_step=5, target_modules=["lin0"]))
    with pytest.raises(TypeError, match="'default' is a AdaLoraConfig"):
        funcpeft.add_weighted_adapter(fpm, {"default": fpm.adapter}, [1.0], "merged")


@pytest.mark.parametrize("row", ["AdaLora Same", "AdaLora Different"])
def test_peft_s_two_adapter_rows_pass_the_harness_though_peft_skips_them(row: str, tmp_path: Any) -> None:
    """PEFT skips its MULTIPLE_ACTIVE_ADAPTERS rows for AdaLoRA (tests/test_peft_matrix.py follows it); both
    adapters are inference_mode=True there, which PEFT's model accepts, and funcpeft agrees with it on every check."""
    from peft_matrix import cases, harness

    (case,) = [c for c in cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES if c.name == row]
    assert harness.peft_skip_reason(case) is not None
    harness.check_multi_row(case, tmp_path)
