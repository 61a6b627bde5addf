"""VB-LoRA (`VBLoRAConfig`): config checks, layers, init against PEFT 0.21.2 (the shared bank drawn in PEFT's order),
the trainable bank shared by all layers, `save_only_topk_weights` files both ways (compile: test_method_transforms.py).
PEFT's own matrix rows and the tiny-model rows run in test_peft_matrix.py / test_contract.py."""

from __future__ import annotations

import copy
import os
from typing import Any

import optree
import peft
import pytest
import safetensors.torch
import torch
from helpers import MODELS, make_inputs
from method_helpers import assert_same_state, fresh_states, quiet

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import SHARED_PATH
from funcpeft.grad import value_and_grad
from funcpeft.methods.base import UnsupportedLayerError


# -- config checks -------------------------------------------------------------------------------------------
def test_config_checks_follow_peft() -> None:
    model = T.tiny_llama()
    odd: dict[str, Any] = dict(target_modules=["q_proj"], vector_length=24)  # 64 % 24 != 0
    with pytest.raises(ValueError, match="`in_features` 64 must be divisible by `vector_length` 24"):
        peft.get_peft_model(copy.deepcopy(model), peft.VBLoRAConfig(**odd))
    with pytest.raises(ValueError, match="`in_features` 64 must be divisible by `vector_length` 24.*q_proj"):
        funcpeft.get_peft_model(model, funcpeft.VBLoRAConfig(**odd))
    for lib in (peft, funcpeft):
        with pytest.raises(ValueError, match="`layers_to_transform` must also be specified"):
            lib.VBLoRAConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        funcpeft.VBLoRAConfig(r=0)  # PEFT: "`r` 0 should be a positive integer value", when the layer is built
    with pytest.raises(ValueError, match="`topk` 0 should be a positive integer"):
        funcpeft.VBLoRAConfig(topk=0)
    with pytest.raises(ValueError, match="`topk` 9 cannot exceed `num_vectors` 8"):  # PEFT: torch's topk error
        funcpeft.VBLoRAConfig(topk=9, num_vectors=8)
    with pytest.raises(ValueError, match="`bias` must be"):
        funcpeft.VBLoRAConfig(bias="some")


@pytest.mark.parametrize("kind, targets", [("llama", ["embed_tokens"]), ("conv", ["conv2d"])])
def test_unsupported_layers_raise_like_peft(kind: str, targets: list[str]) -> None:
    model = MODELS[kind]()
    kwargs: dict[str, Any] = dict(target_modules=targets, vector_length=1, num_vectors=4)
    with pytest.raises(TypeError, match="is not supported.*torch.nn.Linear`, `transformers.pytorch_utils.Conv1D"):
        peft.get_peft_model(copy.deepcopy(model), peft.VBLoRAConfig(**kwargs))
    with pytest.raises(UnsupportedLayerError, match=rf"'[\w.]*{targets[0]}' \(\w+\) is not supported.*Conv1D"):
        funcpeft.get_peft_model(model, funcpeft.VBLoRAConfig(**kwargs))


# -- init: the bank is drawn again before each layer (PEFT), the last draw is kept -----------------------------
@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(r=2, vector_length=16, num_vectors=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        (
            "gpt2",
            dict(
                r=3,
                vector_length=32,
                num_vectors=5,
                topk=1,
                target_modules=["c_attn", "c_proj"],
                init_vector_bank_bound=0.5,
                init_logits_std=2.0,
            ),
        ),
    ],
)
def test_fresh_adapter_equals_peft_s(kind: str, kwargs: dict[str, Any]) -> None:
    ours, theirs = fresh_states(MODELS[kind](), "VBLoRAConfig", kwargs, seed=11)
    assert_same_state(ours, theirs)
    assert "base_model.vblora_vector_bank" in ours


def test_the_bank_is_one_trainable_leaf_shared_by_every_layer() -> None:
    kwargs: dict[str, Any] = dict(r=2, vector_length=16, num_vectors=8, target_modules=["q_proj", "v_proj"])
    fpm = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.VBLoRAConfig(**kwargs))
    fn, base, adapter = fpm
    assert (
        list(adapter[SHARED_PATH]) == ["vblora_vector_bank"]
        and adapter[SHARED_PATH]["vblora_vector_bank"].requires_grad
    )
    assert all(set(e) == {"vblora_logits_A", "vblora_logits_B"} for p, e in adapter.items() if p != SHARED_PATH)
    trainable, _ = fpm.get_nb_trainable_parameters()
    assert trainable == funcpeft._trees.tree_numel(adapter)  # the bank once
    # changing the bank changes every layer (PEFT's gradient for it, summed over layers, is in the matrix rows)
    tree = T.random_like(adapter, torch.Generator().manual_seed(0))
    other = {**tree, SHARED_PATH: T.random_like(tree[SHARED_PATH], torch.Generator().manual_seed(1))}
    x = make_inputs("llama")
    with torch.no_grad():
        hidden = [fn(base, t, **x, output_hidden_states=True).hidden_states for t in (tree, other)]
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(hidden[0][1:], hidden[1][1:]))  # after each layer
    _, grads = value_and_grad(lambda a: fn(base, a, **x).logits.square().mean())(tree)
    assert all(g.abs().sum() > 0 for g in optree.tree_leaves(grads))


# -- save_only_topk_weights ------------------------------------------------------------------------------------
def test_topk_files_equal_peft_s_and_load_both_ways(tmp_path: Any) -> None:
    model, x = T.tiny_llama(), make_inputs("llama")
    kwargs: dict[str, Any] = dict(
        r=2, vector_length=16, num_vectors=8, topk=3, target_modules=["q_proj", "v_proj"], save_only_topk_weights=True
    )
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.VBLoRAConfig(**kwargs)).eval()
    pm.save_pretrained(tmp_path / "peft")
    fpm = funcpeft.from_pretrained(model, tmp_path / "peft", is_trainable=True)
    logits = fpm.adapter["model.layers.0.self_attn.q_proj"]["vblora_logits_A"]
    assert torch.isinf(logits).sum() == logits.numel() // 8 * 5  # -inf off each row's top 3 (of 8)
    with torch.no_grad():
        want = pm(**x).logits
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, want, atol=1e-5, rtol=0)
    fpm.save_pretrained(tmp_path / "ours", fpm.adapter)
    # the reference is PEFT's own load -> save (weights -> logits -> weights rounds the same way)
    quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), tmp_path / "peft").save_pretrained(tmp_path / "resaved")
    got, theirs = (
        safetensors.torch.load_file(os.path.join(tmp_path / d, "adapter_model.safetensors"))
        for d in ("ours", "resaved")
    )
    assert_same_state(got, theirs)
    assert got["base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A_topk_indices"].dtype == torch.uint8
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, want, atol=1e-5, rtol=0)
    # like PEFT, such an adapter is for inference and merging only
    with pytest.raises(RuntimeError, match="infinity values in VB-LoRA logits"):
        fpm.fn(fpm.base, fpm.adapter, **x, dropout_rng=0)
    merged = quiet(funcpeft.merge_and_unload, fpm, fpm.adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, want, atol=1e-5, rtol=0)


# -- routing ------------------------------------------------------------------------------------------------
def test_per_example_adapters_each_use_their_own_bank() -> None:
    kwargs: dict[str, Any] = dict(r=2, vector_length=4, num_vectors=6, target_modules=["lin0", "lin1"])
    fn, base, fresh = funcpeft.get_peft_model(MODELS["mlp"](), funcpeft.VBLoRAConfig(**kwargs))
    x = make_inputs("mlp", batch=3)["x"]
    trees = [T.random_like(fresh, torch.Generator().manual_seed(s)) for s in range(2)]
    trees[1] = {**trees[0], SHARED_PATH: trees[1][SHARED_PATH]}  # only the bank differs
    with torch.no_grad():
        routed = fn(base, funcpeft.per_example(trees, [1, -1, 0]), x=x)
        for i, k in enumerate([1, -1, 0]):
            torch.testing.assert_close(routed[i], fn(base, trees[k] if k >= 0 else None, x=x)[i], atol=1e-6, rtol=0)
        assert (routed[0] - fn(base, trees[0], x=x)[0]).abs().max() > 1e-4
