"""funcpeft.merge / unmerge / merge_and_unload: differential tests against PEFT, laws, storage sharing."""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import optree
import peft
import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcpeft
from funcpeft._merge import merge_weight, unmerge_weight
from funcpeft.methods import METHODS
from funcpeft.methods.base import LayerKind, LayerSpec, MergeHooks
from funcpeft.testing import TINY_MODELS, copy_into_peft, random_like

TOKENS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


class TinyConv(nn.Module):
    """Conv2d 3x3, Conv2d 1x1, Conv1d and Linear: every conv layout LoRA merges."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1, groups=groups)
        self.c3 = nn.Conv1d(8, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(self.c3(h.flatten(2)).mean(-1))


def tiny_conv(seed: int = 0, groups: int = 1) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyConv(groups).eval()


def gpt2_biased(seed: int = 0) -> nn.Module:
    """tiny GPT-2 with non-zero biases (GPT-2 initialises them to 0, which hides bias bugs)."""
    model = TINY_MODELS["gpt2"](seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


BUILD = {**TINY_MODELS, "conv": tiny_conv, "gpt2_biased": gpt2_biased}


def out(y: object) -> torch.Tensor:
    return y.logits if hasattr(y, "logits") else y  # type: ignore[return-value]


def inputs(model_name: str) -> torch.Tensor:
    return IMAGES if model_name == "conv" else TOKENS


def run(fn, base, adapter, x):  # noqa: ANN001, ANN201
    with torch.no_grad():
        return out(fn(base, adapter, x))


def twins(model_name: str, seed: int = 0, config: str = "LoraConfig", **cfg: object):  # noqa: ANN201
    """(pm, random non-zero adapter, the same adapter in a PEFT model (eval), the untouched model).

    config: the config class name, the same in funcpeft and peft (LoraConfig, IA3Config, ...).
    """
    model = BUILD[model_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = funcpeft.get_peft_model(model, getattr(funcpeft, config)(**cfg))
        adapter = random_like(pm.adapter, torch.Generator().manual_seed(seed))
        if config == "IA3Config":  # scales near 1, as trained ones are (unmerge divides by them)
            adapter = optree.tree_map(lambda t: (t + 1).detach().requires_grad_(True), adapter)
        ref = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config)(**copy.deepcopy(cfg)))
    copy_into_peft(ref, adapter, pm.plans["default"])
    return pm, adapter, ref.eval(), model


def snapshot(tree: optree.PyTree[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    return [(t.detach().clone(), t.data_ptr()) for t in optree.tree_leaves(tree)]


def assert_unchanged(tree: optree.PyTree[torch.Tensor], snap: list[tuple[torch.Tensor, int]]) -> None:
    for t, (v, ptr) in zip(optree.tree_leaves(tree), snap):
        assert t.data_ptr() == ptr and torch.equal(t.detach(), v)


# -- merge: one layer changes, the rest is shared --------------------------------------------------------------
def test_merge_matches_fn_and_copies_only_the_adapted_weights():
    pm, adapter, _, _ = twins("llama", r=8, target_modules=["q_proj", "v_proj"])
    fn, base, _ = pm
    before_base, before_adapter = snapshot(base), snapshot(adapter)
    merged = funcpeft.merge(pm, base, adapter)
    assert_unchanged(base, before_base)
    assert_unchanged(adapter, before_adapter)
    assert merged.keys() == base.keys() and merged is not base
    changed = {k for k in base if merged[k] is not base[k]}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")}
    for k in base.keys() - changed:
        assert merged[k].data_ptr() == base[k].data_ptr()
    for k in changed:
        assert merged[k].untyped_storage().data_ptr() != base[k].untyped_storage().data_ptr()
        assert not torch.equal(merged[k], base[k])
    torch.testing.assert_close(run(fn, merged, None, TOKENS), run(fn, base, adapter, TOKENS), atol=1e-5, rtol=0)


CASES = {
    "llama-embed-lora_only-bias": (
        "llama",
        dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"], bias="lora_only"),
    ),
    "gpt2-conv1d-modules_to_save-bias_all": (
        "gpt2",
        dict(target_modules=["c_attn", "c_proj"], modules_to_save=["ln_f"], bias="all"),
    ),
    "bert-seq_cls-rslora-rank_pattern": (
        "bert_seq_cls",
        dict(
            task_type="SEQ_CLS",
            target_modules=["query", "value"],
            use_rslora=True,
            lora_alpha=16,
            rank_pattern={"value": 2},
        ),
    ),
    "conv-2d-1x1-1d": ("conv", dict(target_modules=["c1", "c2", "c3", "fc"], r=4, lora_alpha=6)),
}


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_equals_peft_and_fn(case):
    name, cfg = CASES[case]
    pm, adapter, ref, model = twins(name, **cfg)
    fn, base, _ = pm
    x = inputs(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    new = funcpeft.merge_and_unload(pm, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.merge_and_unload()
    # the original model is untouched, and the new one is a plain model of the same class
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert type(new) is type(model) and new is not model
    assert not any(isinstance(p, funcpeft.AdaptedWeight) for p in new.parameters())
    got_params = dict(new.named_parameters(remove_duplicate=False))
    for n, p in want.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(got_params[n], p, atol=1e-6, rtol=0, msg=n)
    y = run(fn, base, adapter, x)
    with torch.no_grad():
        torch.testing.assert_close(out(new(x)), y, atol=1e-5, rtol=0)
        torch.testing.assert_close(out(new(x)), out(want(x)), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(fn, funcpeft.merge(pm, base, adapter), None, x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_unmerge_inverts_merge(case):
    name, cfg = CASES[case]
    pm, adapter, _, _ = twins(name, **cfg)
    base = pm.base
    merged = funcpeft.merge(pm, base, adapter)
    back = funcpeft.unmerge(pm, merged, adapter, base=base)
    assert back.keys() == base.keys()
    for k in base:
        torch.testing.assert_close(back[k], base[k], atol=1e-6, rtol=0, msg=k)


def test_unmerge_without_base_needs_it_only_for_overrides():
    pm, adapter, _, _ = twins("bert_seq_cls", task_type="SEQ_CLS", target_modules=["query"])
    merged = funcpeft.merge(pm, pm.base, adapter)
    with pytest.raises(ValueError, match=r"classifier\.weight.*pass the original base tree as `base=`"):
        funcpeft.unmerge(pm, merged, adapter)
    pm2, adapter2, _, _ = twins("llama", target_modules=["q_proj"])
    back = funcpeft.unmerge(pm2, funcpeft.merge(pm2, pm2.base, adapter2), adapter2)
    for k in pm2.base:
        torch.testing.assert_close(back[k], pm2.base[k], atol=1e-6, rtol=0)


def test_merge_and_unload_storage_sharing_and_independence():
    pm, adapter, _, model = twins("bert_seq_cls", task_type="SEQ_CLS", target_modules=["query", "value"])
    orig = dict(model.named_parameters())
    shared = funcpeft.merge_and_unload(pm, adapter)
    adapted = {f"{p}.weight" for p, e in pm.plans["default"].items() if e.spec is not None}
    for n, p in shared.named_parameters():
        same = p.data_ptr() == orig[n].data_ptr()
        assert same == (n not in adapted and not n.startswith("classifier.")), n
    # the modules_to_save copy is not the adapter's tensor: training the adapter further leaves the model alone
    leaf_ptrs = {t.data_ptr() for t in optree.tree_leaves(adapter)}
    assert not any(p.data_ptr() in leaf_ptrs for p in shared.parameters())
    copied = funcpeft.merge_and_unload(pm, adapter, share_storage=False)
    assert not any(p.data_ptr() == orig[n].data_ptr() for n, p in copied.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(copied(TOKENS).logits, shared(TOKENS).logits, atol=0, rtol=0)
        next(copied.parameters()).add_(1.0)
    assert torch.equal(next(model.parameters()), next(shared.parameters()))


def test_pm_method_merges_the_tree_it_is_given_and_requires_one():
    pm, adapter, _, _ = twins("llama", target_modules=["q_proj"])
    with torch.no_grad():
        torch.testing.assert_close(
            pm.merge_and_unload(adapter)(TOKENS).logits, run(pm.fn, pm.base, adapter, TOKENS), atol=1e-5, rtol=0
        )
    with pytest.raises(TypeError, match="adapter_params"):  # pm.adapter is the untrained init: never a silent default
        pm.merge_and_unload()  # type: ignore[call-arg]


METHOD_CASES = {
    "dora-linear": ("llama", dict(config="LoraConfig", target_modules=["q_proj", "v_proj"], use_dora=True)),
    "dora-conv1d-hf": ("gpt2", dict(config="LoraConfig", target_modules=["c_attn"], use_dora=True)),
    "ia3-scales-bias-and-feedforward": (
        "gpt2_biased",
        dict(config="IA3Config", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    ),
    "loha": ("llama", dict(config="LoHaConfig", target_modules=["q_proj", "v_proj"], r=4)),
    "lokr": ("llama", dict(config="LoKrConfig", target_modules=["q_proj", "v_proj"], r=4)),
    "vera": ("llama", dict(config="VeraConfig", target_modules=["q_proj", "k_proj"], r=8)),
}


@pytest.mark.parametrize("case", METHOD_CASES)
def test_merge_is_generic_over_methods(case):
    """Non-additive merges (DoRA's norm, IA3's scaling of weight and bias) go through the methods' hooks."""
    name, cfg = METHOD_CASES[case]
    pm, adapter, ref, _ = twins(name, **cfg)
    fn, base, _ = pm
    x = inputs(name)
    merged = funcpeft.merge(pm, base, adapter)
    y = run(fn, base, adapter, x)
    torch.testing.assert_close(run(fn, merged, None, x), y, atol=1e-5, rtol=0)
    new = funcpeft.merge_and_unload(pm, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.merge_and_unload()
    got_params = dict(new.named_parameters())
    for n, p in want.named_parameters():
        torch.testing.assert_close(got_params[n], p, atol=1e-6, rtol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(out(new(x)), out(want(x)), atol=1e-5, rtol=0)
    back = funcpeft.unmerge(pm, merged, adapter, base=base)
    for k in base:
        torch.testing.assert_close(back[k], base[k], atol=1e-5, rtol=1e-5, msg=k)


def test_dora_unmerge_needs_the_pre_merge_weight():
    pm, adapter, _, _ = twins("llama", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="base weight"):
        funcpeft.unmerge(pm, funcpeft.merge(pm, pm.base, adapter), adapter)


# -- tied embeddings: PEFT's rules -------------------------------------------------------------------------
@pytest.mark.parametrize("saved", ["lm_head", "wte"])
def test_modules_to_save_on_a_tied_weight_breaks_the_tie_like_peft(saved, tmp_path):
    pm, adapter, ref, model = twins("gpt2", target_modules=["c_attn"], modules_to_save=[saved])
    fn, base, _ = pm
    merged = funcpeft.merge(pm, base, adapter)
    assert merged.keys() - base.keys() == {"lm_head.weight"}  # both names now have their own entry
    y = run(fn, base, adapter, TOKENS)
    torch.testing.assert_close(run(fn, merged, None, TOKENS), y, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="no longer tied"):
        new = funcpeft.merge_and_unload(pm, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.merge_and_unload()
    assert want.config.tie_word_embeddings is False and new.config.tie_word_embeddings is False
    assert model.config.tie_word_embeddings is True  # the original's config is untouched
    assert new.lm_head.weight.data_ptr() != new.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(new(TOKENS).logits, y, atol=1e-5, rtol=0)
        torch.testing.assert_close(new(TOKENS).logits, want(TOKENS).logits, atol=1e-5, rtol=0)
    new.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, y, atol=1e-5, rtol=0)
    back = funcpeft.unmerge(pm, merged, adapter, base=base)
    assert back.keys() == base.keys() and all(back[k] is base[k] for k in base if ".c_attn." not in k)


def test_lora_on_a_tied_embedding_merges_into_both_like_peft():
    pm, adapter, ref, _ = twins("gpt2", target_modules=["wte"])
    with pytest.warns(UserWarning, match="tied to"):
        new = funcpeft.merge_and_unload(pm, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.merge_and_unload()
    assert new.config.tie_word_embeddings is True and want.config.tie_word_embeddings is True
    assert new.lm_head.weight.data_ptr() == new.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(new(TOKENS).logits, want(TOKENS).logits, atol=1e-5, rtol=0)
        # PEFT's merged model is not its unmerged one here (lm_head gets the delta too); neither is ours
        assert (new(TOKENS).logits - run(pm.fn, pm.base, adapter, TOKENS)).abs().max() > 1e-3


def test_merged_model_saves_and_reloads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    pm, adapter, _, _ = twins("llama", target_modules=["q_proj", "v_proj"])
    new = funcpeft.merge_and_unload(pm, adapter)
    new.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(new)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, run(pm.fn, pm.base, adapter, TOKENS), atol=1e-5, rtol=0)


# -- options, hooks, errors ----------------------------------------------------------------------------------
def test_safe_merge_rejects_non_finite_weights():
    pm, adapter, _, _ = twins("llama", target_modules=["q_proj"])
    path = "model.layers.1.self_attn.q_proj"
    broken = {p: dict(e) for p, e in adapter.items()}
    broken[path]["lora_B"] = torch.full_like(adapter[path]["lora_B"], float("nan"))
    assert torch.isnan(funcpeft.merge(pm, pm.base, broken)[f"{path}.weight"]).all()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        funcpeft.merge(pm, pm.base, broken, safe_merge=True)
    with pytest.raises(ValueError, match="NaNs detected"):
        funcpeft.merge_and_unload(pm, broken, safe_merge=True)


def test_merge_of_bf16_base_follows_peft_rounding():
    model = BUILD["llama"]().to(torch.bfloat16)
    cfg = dict(target_modules=["q_proj"])
    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**cfg))
    adapter = random_like(pm.adapter, torch.Generator().manual_seed(0))
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    copy_into_peft(ref, adapter, pm.plans["default"])
    merged = funcpeft.merge(pm, pm.base, adapter)
    want = dict(ref.merge_and_unload().named_parameters())
    for k, v in merged.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, want[k]), k


def test_methods_may_provide_their_own_merge(monkeypatch):
    lora = METHODS["lora"]
    spec = LayerSpec("scale", LayerKind.LINEAR, (3, 2), 2, 3, None)
    w = torch.randn(3, 2)
    hooks = MergeHooks(weight=lambda s, p, W, base: W * p["l"], unweight=lambda s, p, W, base: W / p["l"])
    monkeypatch.setitem(METHODS, "scale", dataclasses.replace(lora, name="scale", merge=hooks, delta_weight=None))
    l2 = {"l": torch.tensor([1.0, 2.0, 3.0])[:, None]}
    torch.testing.assert_close(merge_weight(spec, l2, w), w * l2["l"])
    torch.testing.assert_close(unmerge_weight(spec, l2, merge_weight(spec, l2, w)), w)
    half = MergeHooks(weight=hooks.weight)
    monkeypatch.setitem(METHODS, "scale", dataclasses.replace(lora, name="scale", merge=half, delta_weight=None))
    with pytest.raises(NotImplementedError, match="no merge.unweight"):
        unmerge_weight(spec, l2, w)
    monkeypatch.setitem(METHODS, "scale", dataclasses.replace(lora, name="scale", delta_weight=lambda s, p: p["d"]))
    d = {"d": torch.ones(3, 2)}
    torch.testing.assert_close(merge_weight(spec, d, w), w + 1)
    torch.testing.assert_close(unmerge_weight(spec, d, w + 1), w)
    monkeypatch.setitem(METHODS, "scale", dataclasses.replace(lora, name="scale", delta_weight=None))
    with pytest.raises(NotImplementedError, match="neither a delta_weight nor merge hooks"):
        merge_weight(spec, d, w)


def test_conv_with_groups_cannot_merge_like_peft():
    model = tiny_conv(groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=["c2"], r=2))
        ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["c2"], r=2))
    with pytest.raises(NotImplementedError, match="groups > 1") as ours:
        funcpeft.merge(pm, pm.base, pm.adapter)
    with pytest.raises(NotImplementedError) as theirs:
        ref.merge_and_unload()
    assert str(ours.value) == str(theirs.value)


def test_bad_inputs_raise_clear_errors():
    pm, adapter, _, _ = twins("llama", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj' is not a module this adapter targets"):
        funcpeft.merge(pm, pm.base, {**adapter, "model.layers.0.mlp.up_proj": {"lora_A": torch.zeros(1)}})
    with pytest.raises(TypeError, match="get_peft_model returned"):
        funcpeft.merge(object(), pm.base, adapter)
    partial = {k: v for k, v in pm.base.items() if "layers.0.self_attn.q_proj" not in k}
    with pytest.raises(KeyError, match="no entry for parameter 'model.layers.0.self_attn.q_proj.weight'"):
        funcpeft.merge(pm, partial, adapter)
    with pytest.raises(ValueError, match="lora_B is missing"):
        funcpeft.merge(pm.fn, pm.base, {p: {"lora_A": e["lora_A"]} for p, e in adapter.items()})


# -- laws (hypothesis) ---------------------------------------------------------------------------------------
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # not wte/lm_head: tied, where merging changes both (PEFT's rule)
}


@functools.cache
def cached_model(name: str) -> nn.Module:
    return BUILD[name]()


configs = st.sampled_from(sorted(TARGETS)).flatmap(
    lambda name: st.tuples(
        st.just(name),
        st.fixed_dictionaries(
            dict(
                target_modules=st.lists(st.sampled_from(TARGETS[name]), min_size=1, max_size=4, unique=True),
                r=st.integers(1, 8),
                lora_alpha=st.sampled_from([1, 8, 16]),
                use_rslora=st.booleans(),
            )
        ),
        st.integers(0, 2**16),
    )
)


def fresh(name: str, cfg: dict, seed: int):  # noqa: ANN201
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = funcpeft.get_peft_model(cached_model(name), funcpeft.LoraConfig(**cfg))
    return pm, random_like(pm.adapter, torch.Generator().manual_seed(seed))


@settings(max_examples=examples(12))
@given(configs)
def test_law_merged_forward_equals_unmerged_and_unmerge_inverts(example):
    name, cfg, seed = example
    pm, adapter = fresh(name, cfg, seed)
    merged = funcpeft.merge(pm, pm.base, adapter)
    torch.testing.assert_close(
        run(pm.fn, merged, None, TOKENS), run(pm.fn, pm.base, adapter, TOKENS), atol=1e-5, rtol=0
    )
    back = funcpeft.unmerge(pm, merged, adapter)
    for k, v in pm.base.items():
        torch.testing.assert_close(back[k], v, atol=1e-6, rtol=0)


@settings(max_examples=examples(10))
@given(configs)
def test_law_merging_a_zero_b_adapter_is_the_identity(example):
    name, cfg, seed = example
    pm, adapter = fresh(name, cfg, seed)
    zero_b = {p: {k: torch.zeros_like(v) if "_B" in k else v for k, v in e.items()} for p, e in adapter.items()}
    merged = funcpeft.merge(pm, pm.base, zero_b)
    assert merged.keys() == pm.base.keys()
    assert all(torch.equal(merged[k], v) for k, v in pm.base.items())
