"""AdaptionPrompt (Llama-Adapter, `AdaptionPromptConfig`) against PEFT 0.21.2 and against an independent reference
of its maths: config, fresh init, outputs / losses / every gradient, counts, files both ways, several adapters,
vmap, compile, generate, and bad input. PEFT supports model types llama, mistral and gpt2."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import method_checks as mc
import optree
import peft
import pytest
import torch
from helpers import MODELS, capture_stdout, cast_model, make_inputs
from method_helpers import quiet
from peft.utils import get_peft_model_state_dict
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import funcpeft
from funcpeft import testing as T

KINDS = ["llama", "mistral", "gpt2"]  # PEFT's TRANSFORMERS_MODEL_CONFIG
CONFIG: dict[str, Any] = {"adapter_len": 3, "adapter_layers": 1, "task_type": "CAUSAL_LM"}


def _padded(kind: str) -> dict[str, torch.Tensor]:
    """input_ids (2, 6) with the second row left-padded by two, its attention_mask and labels (padding -100)."""
    x = make_inputs(kind)
    mask = torch.ones_like(x["input_ids"])
    mask[1, :2] = 0
    labels = x["input_ids"].masked_fill(mask == 0, -100)
    return {"input_ids": x["input_ids"], "attention_mask": mask, "labels": labels}


def _noisy(fresh: Any, seed: int = 1) -> Any:
    """`fresh` + N(0, 0.5): a gate away from zero, so the prompt term shows in outputs and gradients."""
    return mc.random_trees(fresh, n=seed + 1, scale=0.5)[seed]


# -- an independent reference: the paper's maths with forward hooks on the plain model --------------------------
def _reference_term(module: Any, prompt: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, rope: Any) -> Any:
    """gate * softmax(q k_p^T / sqrt(d)) v_p per head, (B, T, hidden) before the output projection (Llama) / as is
    (GPT-2). Written from the paper and transformers' own rotary code, not from PEFT's."""
    cfg, d = module.config, module.head_dim
    heads = cfg.num_attention_heads
    if rope is None:  # GPT-2: fused c_attn (Conv1D, x @ W + b)
        hidden = cfg.hidden_size
        q = (x @ module.c_attn.weight + module.c_attn.bias)[..., :hidden]
        kv = prompt @ module.c_attn.weight + module.c_attn.bias
        k, v = kv[:, hidden : 2 * hidden], kv[:, 2 * hidden :]
        q = q.unflatten(-1, (heads, d))
        k, v = k.unflatten(-1, (heads, d)), v.unflatten(-1, (heads, d))
    else:
        q = (x @ module.q_proj.weight.T).unflatten(-1, (heads, d)).transpose(1, 2)
        q = apply_rotary_pos_emb(q, q, *rope)[0].transpose(1, 2)  # (B, T, heads, d)
        kv_heads = cfg.num_key_value_heads
        owner = torch.arange(heads) // (heads // kv_heads)  # the key/value head each query head reads
        k = (prompt @ module.k_proj.weight.T).unflatten(-1, (kv_heads, d))[:, owner]
        v = (prompt @ module.v_proj.weight.T).unflatten(-1, (kv_heads, d))[:, owner]
    attn = torch.softmax(torch.einsum("bthd,lhd->bhtl", q, k) / math.sqrt(d), dim=-1) * gate
    out = torch.einsum("bhtl,lhd->bthd", attn, v).flatten(2)
    return out if rope is None else out @ module.o_proj.weight.T


def _reference_logits(model: Any, adapter: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    handles = []
    for path, leaves in adapter.items():

        def hook(module: Any, args: Any, kwargs: Any, output: Any, leaves: Any = leaves) -> Any:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rope = kwargs.get("position_embeddings")
            term = _reference_term(module, leaves["adaption_prompt"][0], leaves["adaption_gate"], x, rope)
            return (output[0] + term, *output[1:])

        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


# -- config --------------------------------------------------------------------------------------------------
def test_config_fields_defaults_and_saved_dict_equal_peft_s() -> None:
    ours, theirs = funcpeft.AdaptionPromptConfig(), peft.AdaptionPromptConfig()
    for name in ("target_modules", "adapter_len", "adapter_layers", "task_type", "inference_mode"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.peft_type.value == theirs.peft_type.value == "ADAPTION_PROMPT"  # type: ignore[union-attr]
    assert ours.is_adaption_prompt and theirs.is_adaption_prompt
    assert set(ours.to_dict()) == set(theirs.to_dict())
    with pytest.raises(TypeError, match="adapter_len"):
        funcpeft.AdaptionPromptConfig(adapter_length=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="target_modules"):
        funcpeft.AdaptionPromptConfig(target_modules=["self_attn"])  # type: ignore[arg-type]


# -- init, outputs, gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_equals_peft_s_and_is_the_base_model(kind: str) -> None:
    model = MODELS[kind]()
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", {**CONFIG, "adapter_layers": 2}, seed=3)
    mc.assert_fresh_equals_peft(fpm, pm)
    assert all(set(e) == {"adaption_prompt", "adaption_gate"} for e in fpm.adapter.values())
    x = _padded(kind)
    with torch.no_grad():  # zero gate: exactly the base model
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, model(**x).logits, atol=0, rtol=0)
        torch.testing.assert_close(pm(**x).logits, model(**x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_outputs_loss_and_every_gradient_equal_peft_and_the_reference(kind: str, layers: int) -> None:
    model = MODELS[kind]()
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", {**CONFIG, "adapter_layers": layers})
    adapter, x = _noisy(fpm.adapter), _padded(kind)
    with torch.no_grad():
        want = _reference_logits(copy.deepcopy(model), adapter, x)
        assert not torch.allclose(want, model(**x).logits, atol=1e-3)  # the term is there
        torch.testing.assert_close(fpm.fn(fpm.base, adapter, **x).logits, want, atol=1e-5, rtol=1e-5)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)  # outputs and the gradient of every leaf
    with torch.no_grad():  # PEFT 0.21.2 with transformers 5 is right too (against the reference)
        torch.testing.assert_close(pm(**x).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fpm.fn(fpm.base, adapter, **x).loss, pm(**x).loss, atol=1e-6, rtol=1e-6)
    loss, grads = funcpeft.value_and_grad(lambda a: fpm.fn(fpm.base, a, **x).loss)(adapter)
    pm.zero_grad()
    pm(**x).loss.backward()
    T.assert_trees_close(grads, T.peft_grads(pm, adapter, fpm.plans["default"]), atol=1e-5, rtol=1e-4)


def test_the_model_is_never_changed() -> None:
    model = T.tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    fpm = funcpeft.get_peft_model(model, funcpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
    x = _padded("llama")
    adapter = optree.tree_map(lambda t: t.requires_grad_(True), _noisy(fpm.adapter))
    fpm.fn(fpm.base, adapter, **x).loss.backward()
    assert all(t.grad is not None for t in optree.tree_leaves(adapter))
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# -- counting and files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_counts_and_the_printed_line_equal_peft_s(kind: str) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "AdaptionPromptConfig", {**CONFIG, "adapter_len": 5, "adapter_layers": 2})
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert fpm.get_nb_trainable_parameters()[0] == 2 * (5 * 64 + 1)
    assert capture_stdout(fpm.print_trainable_parameters) == capture_stdout(pm.print_trainable_parameters)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_both_ways(kind: str, tmp_path: Any) -> None:
    model = MODELS[kind]()
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", {**CONFIG, "adapter_layers": 2})
    adapter, x = _noisy(fpm.adapter), _padded(kind)
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    fpm.save_pretrained(tmp_path / "ours", adapter)
    quiet(pm.save_pretrained, tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert ours == theirs
    assert ours["target_modules"] == ("attn" if kind == "gpt2" else "self_attn")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert set(a) == set(b) == set(get_peft_model_state_dict(pm))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        want = pm(**x).logits
        loaded = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), tmp_path / "ours").eval()
        torch.testing.assert_close(loaded(**x).logits, want, atol=1e-6, rtol=0)
        back = funcpeft.from_pretrained(model, tmp_path / "theirs")
        torch.testing.assert_close(back.fn(back.base, back.adapter, **x).logits, want, atol=1e-6, rtol=0)
    T.assert_trees_close(back.adapter, adapter, atol=0)


# -- several adapters ------------------------------------------------------------------------------------------
def test_adapters_run_one_at_a_time_like_peft_and_do_not_stack() -> None:
    model, x = T.tiny_llama(layers=3), _padded("llama")
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", {**CONFIG, "adapter_layers": 2})
    trees = {"default": _noisy(fpm.adapter, 1)}
    other = funcpeft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1)
    trees["b"] = _noisy(fpm.add_adapter("b", other), 2)
    pm.add_adapter("b", peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1))
    for name in ("default", "b"):
        pm.set_adapter(name)
        with torch.no_grad():
            for path, leaves in trees[name].items():
                for key, value in leaves.items():
                    pm.get_parameter(f"base_model.model.{path}.{key}").copy_(value)
            torch.testing.assert_close(
                fpm.fn(fpm.base, {name: trees[name]}, **x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5
            )
    assert set(trees["b"]) == {"model.layers.2.self_attn"}
    with pytest.raises(TypeError, match="Unable to stack multiple adaption prompts"):
        fpm.fn(fpm.base, trees, **x)  # both on layer 2: PEFT cannot stack them either
    with pytest.raises(NotImplementedError, match="AdaptionPrompt cannot merge"):
        funcpeft.merge(fpm, fpm.base, trees["default"])


def test_stacked_prompts_vmap_and_route_per_example() -> None:
    fn, base, fresh = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.AdaptionPromptConfig(**CONFIG))
    x = {k: v for k, v in _padded("llama").items() if k != "labels"}
    trees = mc.random_trees(fresh, n=3, scale=0.5)
    stacked = funcpeft.stack_adapters(trees)
    with torch.no_grad():
        alone = [fn(base, t, **x).logits for t in trees]
        mapped = torch.func.vmap(lambda a: fn(base, a, **x).logits)(stacked)
        for k in range(3):
            torch.testing.assert_close(mapped[k], alone[k], atol=1e-5, rtol=1e-5)
        for index in ([2, 0], [-1, 1]):  # -1: no adapter, exactly the base model's output
            routed = fn(base, funcpeft.per_example(stacked, index), **x).logits
            for i, k in enumerate(index):
                want = alone[k][i] if k >= 0 else fn(base, None, **x).logits[i]
                torch.testing.assert_close(routed[i], want, atol=1e-5 if k >= 0 else 0, rtol=1e-5 if k >= 0 else 0)


def test_gpt2_routes_per_example() -> None:
    fn, base, fresh = funcpeft.get_peft_model(T.tiny_gpt2(), funcpeft.AdaptionPromptConfig(**CONFIG))
    x = {k: v for k, v in _padded("gpt2").items() if k != "labels"}
    trees = mc.random_trees(fresh, n=2, scale=0.5)
    with torch.no_grad():
        routed = fn(base, funcpeft.per_example(funcpeft.stack_adapters(trees), [1, 0]), **x).logits
        for i, k in enumerate([1, 0]):
            torch.testing.assert_close(routed[i], fn(base, trees[k], **x).logits[i], atol=1e-5, rtol=1e-5)


def test_fn_compiles_once_for_new_adapter_values() -> None:
    fn, base, fresh = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.AdaptionPromptConfig(**CONFIG))
    mc.assert_compiles_once(fn, base, mc.random_trees(fresh, n=3, scale=0.5), _padded("llama"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_equals_peft_s_greedy_tokens(kind: str) -> None:
    model: Any = MODELS[kind]()
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", {**CONFIG, "adapter_layers": 2})
    adapter = _noisy(fpm.adapter)
    for leaves in adapter.values():  # a strong prompt term, so that it changes the greedy tokens
        leaves["adaption_gate"] = torch.full((1,), 4.0)
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    x = {k: v for k, v in _padded(kind).items() if k != "labels"}
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = quiet(pm.generate, **x, **kw)
        got = quiet(fpm.generate, fpm.base, adapter, **x, **kw)
        plain = quiet(model.generate, **x, **kw)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)  # the adapter changed the tokens


# -- bad input -------------------------------------------------------------------------------------------------
def test_unsupported_model_type_is_refused_like_peft() -> None:
    model = MODELS["bert"]()
    for lib in (peft, funcpeft):
        with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'bert'"):
            quiet(lib.get_peft_model, copy.deepcopy(model), lib.AdaptionPromptConfig(**CONFIG))
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'qwen2'"):  # even when named
        funcpeft.get_peft_model(MODELS["qwen2"](), funcpeft.AdaptionPromptConfig(target_modules="self_attn", **CONFIG))


def test_more_adapter_layers_than_the_model_has_is_refused_like_peft() -> None:
    for lib in (peft, funcpeft):
        with pytest.raises(ValueError, match="more adapter layers '3' than the model has '2'"):
            quiet(lib.get_peft_model, T.tiny_llama(), lib.AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    with pytest.raises(ValueError, match="more adapter layers '1' than the model has '0'"):
        funcpeft.get_peft_model(T.tiny_llama(), funcpeft.AdaptionPromptConfig(target_modules="attn", **CONFIG))


@pytest.mark.parametrize("field, value", [("adapter_len", None), ("adapter_layers", None), ("adapter_layers", 0)])
def test_missing_or_non_positive_sizes_are_refused_clearly(field: str, value: Any) -> None:
    config = funcpeft.AdaptionPromptConfig(**{**CONFIG, field: value})
    with pytest.raises(ValueError, match=f"AdaptionPromptConfig.{field} must be a positive int, got {value}"):
        funcpeft.get_peft_model(T.tiny_llama(), config)


def test_peft_s_adapter_layers_0_adapts_every_layer() -> None:
    """Why funcpeft refuses adapter_layers=0: PEFT's `parents[-0:]` silently takes all of them."""
    pm = quiet(peft.get_peft_model, T.tiny_llama(layers=3), peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=0))
    assert len([n for n, _ in pm.named_parameters() if n.endswith("adaption_gate")]) == 3


def test_a_wrong_tree_names_the_leaf() -> None:
    fpm = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.AdaptionPromptConfig(**CONFIG))
    bad = {p: dict(e) for p, e in fpm.adapter.items()}
    bad["model.layers.1.self_attn"]["adaption_prompt"] = torch.zeros(1, 4, 64)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.adaption_prompt has shape \(1, 4, 64\)"):
        fpm.fn(fpm.base, bad, **make_inputs("llama"))


def test_a_bf16_model_keeps_bf16_prompts_like_peft() -> None:
    """PEFT's AdaptionPromptModel has no adapter upcast (it is no BaseTuner): the prompts are bf16, drawn the same."""
    model = cast_model(T.tiny_llama(), torch.bfloat16)
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", CONFIG, seed=2)
    mc.assert_fresh_equals_peft(fpm, pm)
    assert all(t.dtype == torch.bfloat16 for t in optree.tree_leaves(fpm.adapter))
    adapter, x = _noisy(fpm.adapter), _padded("llama")
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, adapter, **x).logits, pm(**x).logits, atol=0, rtol=0)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(T.tiny_llama(), "AdaptionPromptConfig", CONFIG)


def test_generate_with_per_example_prompts_equals_each_alone() -> None:
    fpm = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.AdaptionPromptConfig(**{**CONFIG, "adapter_layers": 2}))
    trees = mc.random_trees(fpm.adapter, n=2, scale=2.0)
    ids = torch.randint(1, T.VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "num_beams": 2}
    with torch.no_grad():
        routed = quiet(
            fpm.generate,
            fpm.base,
            funcpeft.per_example(funcpeft.stack_adapters(trees), [1, -1, 0]),
            input_ids=ids,
            **kw,
        )
        for b, i in enumerate([1, -1, 0]):
            tree = trees[i] if i >= 0 else None
            assert torch.equal(routed[b], quiet(fpm.generate, fpm.base, tree, input_ids=ids[b : b + 1], **kw)[0])


def test_gradient_checkpointing_gives_peft_s_gradients() -> None:
    model: Any = T.tiny_llama()
    model.gradient_checkpointing_enable()
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", {**CONFIG, "adapter_layers": 2})
    adapter, x = _noisy(fpm.adapter), _padded("llama")
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    pm.train()
    pm(**x).loss.backward()
    loss, grads = funcpeft.value_and_grad(lambda a: fpm.fn(fpm.base, a, **x, dropout_rng=0).loss)(adapter)
    T.assert_trees_close(grads, T.peft_grads(pm, adapter, fpm.plans["default"]), atol=1e-5, rtol=1e-4)


def test_files_of_two_adapters_both_ways(tmp_path: Any) -> None:
    model, x = T.tiny_llama(layers=3), _padded("llama")
    fpm, pm = mc.build_both(model, "AdaptionPromptConfig", {**CONFIG, "adapter_layers": 2})
    trees = {
        "default": _noisy(fpm.adapter, 1),
        "b": _noisy(fpm.add_adapter("b", funcpeft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1)), 2),
    }
    fpm.save_pretrained(tmp_path, trees)
    theirs = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), tmp_path).eval()
    quiet(theirs.load_adapter, tmp_path / "b", "b")
    back = funcpeft.from_pretrained(model, tmp_path)
    loaded = {"default": back.adapter, "b": back.load_adapter(tmp_path / "b", "b")}
    for name in ("default", "b"):
        theirs.set_adapter(name)
        with torch.no_grad():
            want = fpm.fn(fpm.base, {name: trees[name]}, **x).logits
            torch.testing.assert_close(theirs(**x).logits, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(back.fn(back.base, {name: loaded[name]}, **x).logits, want, atol=1e-6, rtol=0)
