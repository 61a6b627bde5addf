"""Trainable tokens (`TrainableTokensConfig`) against PEFT 0.21.2: config and layers, init, tied embeddings (the lm_head
uses the same rows), no embedding-sized tensor per call, padding_idx / scale_grad_by_freq gradients, several adapters,
merging (compile: test_method_transforms.py). PEFT's own matrix row and the tiny-model rows (tied Llama, GPT-2, untied
Llama) run in test_peft_matrix.py / test_contract.py."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import pytest
import torch
from helpers import MODELS, make_inputs
from method_helpers import assert_same_state, fresh_states
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import funcpeft
from funcpeft import testing as T
from funcpeft.grad import value_and_grad
from funcpeft.methods.base import UnsupportedLayerError


class TokenModel(nn.Module):
    """ids (B, S) -> (B, S, 3) through an nn.Embedding with the given options."""

    def __init__(self, **embedding: Any) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4, **embedding)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


IDS = torch.tensor([[3, 5, 3, 1, 7], [5, 5, 0, 3, 9]])


# -- config and layers ---------------------------------------------------------------------------------------
def test_config_checks() -> None:
    bad: Any
    for bad, why in (
        ([1, 1, 2], "duplicates \\[1\\]"),
        ([-1], "non-negative"),
        ("12", r"must be list\[int\]"),
        ([True], r"must be list\[int\]"),
    ):
        with pytest.raises(ValueError, match=why):
            funcpeft.TrainableTokensConfig(token_indices=bad)
    with pytest.raises(TypeError, match="token_indices"):
        funcpeft.TrainableTokensConfig(token_index=[1])  # type: ignore[call-arg]
    model = T.tiny_llama()
    with pytest.raises(IndexError):  # PEFT: an index error while cloning the rows
        peft.get_peft_model(copy.deepcopy(model), peft.TrainableTokensConfig(token_indices=[1, 500]))
    with pytest.raises(
        ValueError, match=r"token_indices \[500\] are out of range for 'model.embed_tokens', which has 128 rows"
    ):
        funcpeft.get_peft_model(model, funcpeft.TrainableTokensConfig(token_indices=[1, 500]))
    # target_modules default: the input embedding's name (PEFT's _prepare_adapter_config), saved as a str
    resolved: Any = funcpeft.get_peft_model(model, funcpeft.TrainableTokensConfig(token_indices=[1])).peft_config[
        "default"
    ]
    assert resolved.target_modules == "model.embed_tokens"


def test_layers_peft_cannot_handle_are_refused_clearly() -> None:
    gpt2 = MODELS["gpt2"]()
    with pytest.raises(AttributeError, match="no attribute 'in_features'"):  # PEFT: an AttributeError
        peft.get_peft_model(
            copy.deepcopy(gpt2), peft.TrainableTokensConfig(target_modules=["c_attn"], token_indices=[1])
        )
    with pytest.raises(UnsupportedLayerError, match="unknown layer type.*'transformer.h.0.attn.c_attn' is a Conv1D"):
        funcpeft.get_peft_model(gpt2, funcpeft.TrainableTokensConfig(target_modules=["c_attn"], token_indices=[1]))
    with pytest.raises(NotImplementedError, match="'head'.*without its bias"):  # PEFT silently drops the bias
        funcpeft.get_peft_model(
            TokenModel(), funcpeft.TrainableTokensConfig(target_modules=["head"], token_indices=[1])
        )


# -- init ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, init_weights", [("llama-tied", True), ("llama-tied", False), ("gpt2", False)])
def test_fresh_adapter_equals_peft_s(kind: str, init_weights: bool) -> None:
    model = T.tiny_llama(tie=True) if kind == "llama-tied" else MODELS[kind]()
    ours, theirs = fresh_states(
        model, "TrainableTokensConfig", dict(token_indices=[4, 0, 77], init_weights=init_weights), 2
    )
    assert_same_state(ours, theirs)
    assert any(k.startswith("base_model.model.lm_head") for k in ours)  # PEFT saves the tied layer's copy too


# -- memory: only the chosen rows ----------------------------------------------------------------------------
class _NewStorages(TorchDispatchMode):
    """The largest storage (elements) an op's outputs newly allocate (views of their inputs do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        seen = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_no_embedding_sized_tensor_per_call_unlike_peft() -> None:
    model, x = T.tiny_llama(tie=True), make_inputs("llama")
    config: dict[str, Any] = dict(token_indices=[3, 43, 95])
    fpm = funcpeft.get_peft_model(model, funcpeft.TrainableTokensConfig(**config))
    assert {tuple(v.shape) for e in fpm.adapter.values() for v in e.values()} == {(3, 64)}
    embedding = model.get_input_embeddings().get_parameter("weight").numel()  # type: ignore[operator]
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    with torch.no_grad():
        with _NewStorages() as ours:
            fpm.fn(fpm.base, tree, **x)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.TrainableTokensConfig(**config))
        with _NewStorages() as theirs:
            pm(**x)
    assert theirs.largest >= embedding  # PEFT copies the whole embedding (twice: input and tied lm_head)
    assert ours.largest < embedding // 4, (ours.largest, embedding)


# -- gradients: PEFT's F.embedding options ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "embedding", [dict(padding_idx=3), dict(scale_grad_by_freq=True), dict(padding_idx=0, scale_grad_by_freq=True)]
)
def test_padding_idx_and_scale_grad_by_freq_gradients_equal_peft_s(embedding: dict[str, Any], tmp_path: Any) -> None:
    torch.manual_seed(0)
    model: Any = TokenModel(**embedding)
    pm: Any = peft.get_peft_model(
        copy.deepcopy(model), peft.TrainableTokensConfig(target_modules=["emb"], token_indices=[3, 5, 0])
    )
    with torch.no_grad():
        pm.base_model.model.emb.trainable_tokens_delta["default"].normal_()
    pm.save_pretrained(tmp_path)
    weights = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    (pm(IDS) * weights).sum().backward()
    want = pm.base_model.model.emb.trainable_tokens_delta["default"].grad
    fpm = funcpeft.from_pretrained(model, tmp_path, is_trainable=True)
    out, grads = value_and_grad(lambda a: (fpm.fn(fpm.base, a, IDS) * weights).sum())(fpm.adapter)
    torch.testing.assert_close(grads["emb"]["trainable_tokens_delta"], want, atol=1e-6, rtol=0)
    if "padding_idx" in embedding:
        assert grads["emb"]["trainable_tokens_delta"][[3, 5, 0].index(embedding["padding_idx"])].abs().sum() == 0


# -- several adapters --------------------------------------------------------------------------------------------
def test_two_adapters_need_disjoint_tokens_like_peft() -> None:
    # untied: PEFT's second adapter on a tied lm_head wraps the first one's layer and cannot run
    model, x = T.tiny_llama(), make_inputs("llama", seq=12)
    configs = {"one": [3, 43], "two": [95, 7], "three": [43, 1]}
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.TrainableTokensConfig(token_indices=configs["one"]), adapter_name="one"
    )
    fpm = funcpeft.get_peft_model(
        model, funcpeft.TrainableTokensConfig(token_indices=configs["one"]), adapter_name="one"
    )
    trees = {"one": fpm.adapter}
    for name in ("two", "three"):
        pm.add_adapter(name, peft.TrainableTokensConfig(token_indices=configs[name]))
        trees[name] = fpm.add_adapter(name, funcpeft.TrainableTokensConfig(token_indices=configs[name]))
    trees = {n: T.random_like(t, torch.Generator().manual_seed(i)) for i, (n, t) in enumerate(trees.items())}
    named = dict(pm.named_parameters())
    both, overlapping = ["one", "two"], ["one", "three"]
    with torch.no_grad():
        for n, t in trees.items():
            named[f"base_model.model.model.embed_tokens.trainable_tokens_delta.{n}"].copy_(
                t["model.embed_tokens"]["trainable_tokens_delta"]
            )
        pm.base_model.set_adapter(both)  # type: ignore[operator]
        got = fpm.fn(fpm.base, {n: trees[n] for n in both}, **x).logits
        torch.testing.assert_close(got, pm(**x).logits, atol=1e-5, rtol=0)
        assert (got - model(**x).logits).abs().max() > 1e-3
        pm.base_model.set_adapter(overlapping)  # type: ignore[operator]
        with pytest.raises(ValueError, match="disjunct token indices"):
            pm(**x)
        with pytest.raises(ValueError, match=r"Token indices \[43\].*disjunct token indices"):
            fpm.fn(fpm.base, {n: trees[n] for n in overlapping}, **x)
        with pytest.raises(ValueError, match="disjunct token indices"):
            funcpeft.merge(fpm, fpm.base, {n: trees[n] for n in overlapping})


def test_merging_a_tied_embedding_keeps_the_function_and_does_not_warn() -> None:
    model, x = T.tiny_llama(tie=True), make_inputs("llama")
    fpm = funcpeft.get_peft_model(model, funcpeft.TrainableTokensConfig(token_indices=[3, 43, 95]))
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "changes its weight, which is tied": the adapter covers the lm_head
        merged = funcpeft.merge_and_unload(fpm, tree)
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, fpm.fn(fpm.base, tree, **x).logits, atol=1e-5, rtol=0)
        unmerged = funcpeft.unmerge(fpm, funcpeft.merge(fpm, fpm.base, tree), tree)  # PEFT's originals, no base=
    assert all(torch.equal(unmerged[k], fpm.base[k]) for k in fpm.base)
