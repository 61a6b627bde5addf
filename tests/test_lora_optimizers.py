"""PEFT's LoRA optimizers (peft.optimizers) as pure `funcpeft.optim` transforms: LoRA+, LoRA-FA, Riemannian.

Each runs 10 training steps on a tiny Llama (and BERT for LoRA+'s no-decay groups) next to PEFT's optimizer on
a PEFT model holding the same adapter values, both fed the same gradients; after every step every adapter value
agrees within 1e-6 (fp32) with PEFT's parameter. Then the transforms' purity (nothing mutated, states are trees) and their errors.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import examples, hf_config, tree_leaves
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer, create_riemannian_optimizer

import funcpeft
from funcpeft import optim
from funcpeft import testing as T

STEPS = 10
TOL = 1e-6


def _batches(model: torch.nn.Module, n: int = STEPS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, T.VOCAB, (2, 8), generator=g)
        labels = ids if hf_config(model).model_type == "llama" else torch.randint(0, 3, (2,), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _twins(model: torch.nn.Module, **cfg: Any) -> tuple[Any, Any, Any]:
    """funcpeft's model with a random adapter, and PEFT's model holding the same values (eval: no dropout)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**cfg))
        ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**copy.deepcopy(cfg)))
    adapter = optree.tree_map(
        lambda t: t.detach().requires_grad_(True), T.random_like(pm.adapter, torch.Generator().manual_seed(1))
    )
    T.copy_into_peft(ref, adapter, pm.plans["default"])
    return pm, adapter, ref.eval()


def _train_both(
    pm: Any,
    adapter: Any,
    ref: Any,
    ours: optim.GradientTransformation,
    theirs: torch.optim.Optimizer,
) -> float:
    """STEPS steps each from the same gradients; returns the largest |funcpeft - PEFT| over adapter values and steps.

    Each step's gradient is funcpeft's (at funcpeft's values), handed to PEFT's optimizer as `.grad` too: so the
    comparison measures the optimizers' arithmetic, not the models' (whose rounding differences a chaotic training
    run would amplify). Parameters PEFT froze (LoRA-FA's lora_A) get no gradient, as in PEFT.
    """
    plan = pm.plans["default"]
    named = dict(ref.named_parameters())
    key = {(p, n): T.peft_param_name(p, n, plan[p]) for p, e in adapter.items() for n in e}
    state = ours.init(adapter)
    before = adapter
    worst = 0.0
    for batch in _batches(pm.model):
        _, grads = funcpeft.value_and_grad(lambda a, batch=batch: pm.fn(pm.base, a, **batch).loss)(adapter)
        theirs.zero_grad()
        for (p, n), k in key.items():
            if named[k].requires_grad:
                named[k].grad = grads[p][n].detach().clone()
        theirs.step()
        updates, state = ours.update(grads, state, adapter)
        adapter = optim.apply_updates(adapter, updates)
        worst = max(
            worst, *((adapter[p][n].detach() - named[k].detach()).abs().max().item() for (p, n), k in key.items())
        )
    assert all(torch.isfinite(t).all() for t in optree.tree_leaves(adapter))
    assert any(not torch.equal(a, b) for a, b in zip(optree.tree_leaves(adapter), optree.tree_leaves(before)))
    return worst


LLAMA: dict[str, Any] = dict(
    r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}
)
BERT: dict[str, Any] = dict(
    r=4,
    target_modules=["query", "value", "word_embeddings"],
    task_type="SEQ_CLS",
    bias="lora_only",
    modules_to_save=["LayerNorm"],
)


# -- LoRA+ -----------------------------------------------------------------------------------------------------------
LORAPLUS: dict[str, tuple[Callable[[], torch.nn.Module], dict[str, Any], str, dict[str, Any]]] = {
    "llama-adamw": (
        T.tiny_llama,
        LLAMA,
        "adamw",
        dict(lr=2e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=5e-3, loraplus_weight_decay=0.1, betas=(0.8, 0.99)),
    ),
    "llama-sgd": (
        T.tiny_llama,
        {**LLAMA, "modules_to_save": ["lm_head"]},
        "sgd",
        dict(lr=1e-2, loraplus_lr_ratio=4, momentum=0.9),
    ),
    "llama-dora-adamw": (
        T.tiny_llama,
        {**LLAMA, "use_dora": True, "target_modules": ["q_proj", "v_proj"]},
        "adamw",
        dict(lr=1e-3, loraplus_lr_ratio=4, loraplus_weight_decay=0.2),
    ),
    "bert-adamw-groups": (
        T.tiny_bert_seq_cls,
        BERT,
        "adamw",
        dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.3),
    ),
}


@pytest.mark.parametrize("case", LORAPLUS)
def test_loraplus_equals_peft(case: str) -> None:
    build, cfg, name, kw = LORAPLUS[case]
    model = build()
    pm, adapter, ref = _twins(model, **cfg)
    torch_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    theirs = create_loraplus_optimizer(ref, torch_cls, **kw)
    ours = optim.loraplus(getattr(optim, name), model=model, **kw)
    assert _train_both(pm, adapter, ref, ours, theirs) <= TOL


def test_loraplus_groups_are_peft_s() -> None:
    """Every leaf lands in the group PEFT puts its parameter in (compared through the parameters' identities)."""
    model = T.tiny_bert_seq_cls()
    pm, adapter, ref = _twins(model, **BERT)
    theirs = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1.0, loraplus_lr_ratio=2.0)
    names = {id(p): n for n, p in ref.named_parameters()}
    peft_group = {
        names[id(p)]: g
        for g, group in zip(("groupA", "embedding", "groupB", "groupB_no_decay"), theirs.param_groups)
        for p in group["params"]
    }
    layernorms = frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
    ours = {(p, n): optim.loraplus_group(p, n, t, layernorms) for p, e in adapter.items() for n, t in e.items()}
    assert set(ours.values()) == set(peft_group.values()) == {"groupA", "embedding", "groupB", "groupB_no_decay"}
    for (path, name), group in ours.items():
        key = T.peft_param_name(path, name, pm.plans["default"][path])
        assert peft_group[key] == group, (path, name)


# -- LoRA-FA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "kw"),
    [
        (LLAMA, dict(lr=5e-3, weight_decay=0.0)),
        ({**LLAMA, "use_rslora": True, "modules_to_save": ["lm_head"]}, dict(lr=1e-3, weight_decay=0.05)),
    ],
    ids=["llama", "llama-rslora-saved-head-decay"],
)
def test_lorafa_equals_peft(cfg: dict[str, Any], kw: dict[str, Any]) -> None:
    """A stays put; B's gradient projected by (A A^T)^-1 / s^2 per layer (bf16 on CPU like PEFT's autocast)."""
    pm, adapter, ref = _twins(T.tiny_llama(), **cfg)
    a_before = {p: e["lora_A"].clone() for p, e in adapter.items() if "lora_A" in e}
    theirs = create_lorafa_optimizer(ref, r=cfg["r"], lora_alpha=8, **kw)
    ours = optim.lorafa(kw["lr"], pm.lora_scalings(), weight_decay=kw["weight_decay"])
    state = ours.init(adapter)
    _, grads = funcpeft.value_and_grad(lambda a: pm.fn(pm.base, a, **_batches(pm.model, 1)[0]).loss)(adapter)
    updates, _ = ours.update(grads, state, adapter)
    assert all(not updates[p]["lora_A"].any() for p in a_before)
    assert _train_both(pm, adapter, ref, ours, theirs) <= TOL


def test_lorafa_projection_in_full_precision_differs_from_peft_s_bf16() -> None:
    """The bf16 projection is what makes funcpeft equal to PEFT on CPU (projection_dtype=None: not bitwise)."""
    pm, adapter, _ = _twins(T.tiny_llama(), **LLAMA)
    _, grads = funcpeft.value_and_grad(lambda a: pm.fn(pm.base, a, **_batches(pm.model, 1)[0]).loss)(adapter)
    fa16, fa32 = (optim.lorafa(1e-3, pm.lora_scalings(), projection_dtype=d) for d in (torch.bfloat16, None))
    u16, _ = fa16.update(grads, fa16.init(adapter), adapter)
    u32, _ = fa32.update(grads, fa32.init(adapter), adapter)
    assert any(not torch.equal(u16[p]["lora_B"], u32[p]["lora_B"]) for p in u16 if "lora_B" in u16[p])


# -- Riemannian -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inner", "kw"),
    [("adamw", dict(lr=2e-3, weight_decay=0.01)), ("sgd", dict(lr=5e-2, momentum=0.5))],
    ids=["adamw", "sgd"],
)
def test_riemannian_equals_peft(inner: str, kw: dict[str, Any]) -> None:
    pm, adapter, ref = _twins(T.tiny_llama(), **{**LLAMA, "modules_to_save": ["lm_head"]})
    torch_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[inner]
    theirs = create_riemannian_optimizer(ref, torch_cls, reg=0.05, **kw)
    ours = optim.riemannian(getattr(optim, inner)(**kw), reg=0.05)
    assert _train_both(pm, adapter, ref, ours, theirs) <= TOL


def test_riemannian_preconditions_only_linear_lora_pairs() -> None:
    """Embedding LoRA and non-LoRA leaves pass unchanged; a linear pair's gradients change."""
    pm, adapter, _ = _twins(T.tiny_llama(), **{**LLAMA, "modules_to_save": ["lm_head"]})
    _, grads = funcpeft.value_and_grad(lambda a: pm.fn(pm.base, a, **_batches(pm.model, 1)[0]).loss)(adapter)
    seen = optim.riemannian(optim.sgd(1.0)).update(grads, optim.sgd(1.0).init(adapter), adapter)[0]
    for path, entry in grads.items():
        for name, g in entry.items():
            changed = not torch.equal(-seen[path][name], g)
            assert changed == (name in ("lora_A", "lora_B")), (path, name)


# -- partition's law ----------------------------------------------------------------------------------------------------
def _small_tree(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.q": {"lora_A": torch.randn(2, 5, generator=g), "lora_B": torch.randn(3, 2, generator=g)},
        "a.v": {
            "lora_A": torch.randn(2, 4, generator=g),
            "lora_B": torch.randn(4, 2, generator=g),
            "bias": torch.randn(4, generator=g),
        },
        "e": {"lora_embedding_A": torch.randn(2, 7, generator=g), "lora_embedding_B": torch.randn(3, 2, generator=g)},
    }


@settings(max_examples=examples(15), deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.lists(st.sampled_from("xy"), min_size=7, max_size=7))
def test_partition_is_each_transform_on_its_own_leaves(seed: int, groups: list[str]) -> None:
    """partition(label, {x: adamw, y: sgd}) updates each leaf exactly as its group's transform alone on that group's
    sub-tree does, over 3 steps (bitwise), whatever the grouping."""
    params = _small_tree(seed)
    order = [(p, n) for p, e in params.items() for n in e]
    label = dict(zip(order, groups))
    transforms = {"x": optim.adamw(1e-2, weight_decay=0.1), "y": optim.sgd(5e-2, momentum=0.9)}
    opt = optim.partition(lambda p, n, t: label[(p, n)], transforms)
    alone = {g: _sub(params, label, g) for g in "xy"}
    state, states = opt.init(params), {g: transforms[g].init(alone[g]) for g in "xy"}
    for step in range(3):
        grads = _small_tree(seed + 1 + step)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        for g in "xy":
            u, states[g] = transforms[g].update(_sub(grads, label, g), states[g], alone[g])
            alone[g] = optim.apply_updates(alone[g], u)
    for (p, n), g in label.items():
        assert torch.equal(params[p][n], alone[g][p][n]), (p, n, g)


def _sub(tree: Any, label: dict[tuple[str, str], str], group: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (p, n), g in label.items():
        if g == group:
            out.setdefault(p, {})[n] = tree[p][n]
    return out


# -- purity and errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda pm: optim.loraplus(optim.adamw, lr=1e-3, loraplus_lr_ratio=4),
        lambda pm: optim.lorafa(1e-3, pm.lora_scalings()),
        lambda pm: optim.riemannian(optim.adamw(1e-3)),
    ],
    ids=["loraplus", "lorafa", "riemannian"],
)
def test_transforms_are_pure_and_states_are_trees(make: Callable[[Any], optim.GradientTransformation]) -> None:
    pm, adapter, _ = _twins(T.tiny_llama(), **LLAMA)
    opt = make(pm)
    _, grads = funcpeft.value_and_grad(lambda a: pm.fn(pm.base, a, **_batches(pm.model, 1)[0]).loss)(adapter)
    state = opt.init(adapter)
    snap = [t.clone() for t in tree_leaves((adapter, grads, state))]
    first = opt.update(grads, state, adapter)
    again = opt.update(grads, state, adapter)
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves((adapter, grads, state)), snap))
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(first), tree_leaves(again)))
    assert all(isinstance(t, torch.Tensor) for t in optree.tree_leaves(first[1]))
    assert optree.tree_structure(first[0]) == optree.tree_structure(adapter)


def test_errors_are_specific() -> None:
    pm, adapter, _ = _twins(T.tiny_llama(), **LLAMA)
    with pytest.raises(TypeError, match="pass loraplus_weight_decay"):
        optim.loraplus(optim.adamw, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    saved = funcpeft.get_peft_model(T.tiny_bert_seq_cls(), funcpeft.LoraConfig(**BERT)).adapter
    with pytest.raises(ValueError, match="pass model= to optim.loraplus"):
        optim.loraplus(optim.adamw, lr=1e-3, loraplus_lr_ratio=4).init(saved)
    with pytest.raises(KeyError, match="no scaling for"):
        optim.lorafa(1e-3, {}).update(adapter, optim.lorafa(1e-3, {}).init(adapter), adapter)
    dora = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="lora_magnitude_vector"):
        opt = optim.lorafa(1e-3, dora.lora_scalings())
        opt.update(dora.adapter, opt.init(dora.adapter), dora.adapter)
    with pytest.raises(ValueError, match="needs params"):
        optim.riemannian(optim.sgd(0.1)).update(adapter, (), None)
    with pytest.raises(ValueError, match="labels \\['x'\\] have no transform"):
        optim.partition(lambda p, n, t: "x", {"y": optim.sgd(0.1)}).init(adapter)
    with pytest.raises(TypeError, match="transform factory such as optim.adamw"):
        optim.loraplus(optim.adamw(1e-3), lr=1e-3, loraplus_lr_ratio=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be in"):
        optim.loraplus(optim.adamw, lr=1e-3, loraplus_lr_ratio=-1)
    with pytest.raises(
        KeyError, match=r"no scaling for 'model.layers.0.self_attn.v_proj' \(close: \['model.layers.0.self_attn.q_proj'"
    ):
        opt = optim.lorafa(1e-3, {"model.embed_tokens": 1.0, "model.layers.0.self_attn.q_proj": 2.0})  # v_proj missing
        opt.update(adapter, opt.init(adapter), adapter)
    with pytest.raises(ValueError, match="scaling must be in"):
        optim.lorafa(1e-3, 0.0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    conv_adapter = funcpeft.get_peft_model(conv, funcpeft.LoraConfig(r=2, target_modules=["0"])).adapter
    with pytest.raises(
        NotImplementedError, match=r"0's lora_A \(2, 3, 3, 3\) and lora_B \(4, 2, 1, 1\) are not matrices"
    ):
        opt = optim.lorafa(1e-3, 1.0)
        opt.update(conv_adapter, opt.init(conv_adapter), conv_adapter)
    with pytest.raises(TypeError, match="already built"):
        optim.riemannian(optim.adamw)  # type: ignore[arg-type]
    emb_only = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.LoraConfig(target_modules=["embed_tokens"])).adapter
    with pytest.raises(ValueError, match="no layer with 2-D lora_A and lora_B"):
        optim.riemannian(optim.adamw(1e-3)).init(emb_only)
