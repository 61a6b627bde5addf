"""SHiRA (`ShiraConfig`): config checks, layers, init and masks against PEFT 0.21.2, the frozen mask on the base side,
custom mask functions and checkpoints, mixed models (compile: test_method_transforms.py). PEFT's own matrix rows and the
tiny-model rows run in test_peft_matrix.py / test_contract.py."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import MODELS, make_inputs
from method_helpers import assert_same_state, fresh_states, quiet

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import SHARED_PREFIX
from funcpeft.grad import value_and_grad
from funcpeft.methods.base import UnsupportedLayerError


def magnitude_mask(base_layer: torch.nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
    """A weight-dependent mask (the largest |W| entries), as a user's `config.mask_fn` would be."""
    w = base_layer.get_parameter("weight").detach()
    n = r * (w.shape[0] + w.shape[1])
    mask = torch.zeros(w.numel(), dtype=w.dtype)
    mask[w.abs().flatten().topk(n).indices] = 1.0
    return mask.view_as(w)


# -- config checks -------------------------------------------------------------------------------------------
def test_config_checks_follow_peft() -> None:
    model = T.tiny_llama()
    with pytest.raises(ValueError, match="should be a positive integer") as want:
        peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(r=0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=str(want.value)[:40]):
        funcpeft.ShiraConfig(r=0, target_modules=["q_proj"])
    big: dict[str, Any] = dict(r=40, target_modules=["q_proj"])  # 40 * (64 + 64) > 64 * 64
    with pytest.raises(ValueError, match="more shira params than the total number") as want:
        peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(**big))
    with pytest.raises(ValueError, match="more shira params than the total number.*q_proj"):
        funcpeft.get_peft_model(model, funcpeft.ShiraConfig(**big))
    for lib in (peft, funcpeft):
        with pytest.warns(UserWarning, match="supply your own masking function"):
            lib.ShiraConfig(mask_type="mine")
    with pytest.raises(TypeError, match="random_seed"):
        funcpeft.ShiraConfig(random_sed=3)  # type: ignore[call-arg]
    assert "mask_fn" not in funcpeft.ShiraConfig().to_dict()  # PEFT's mask_fn is an attribute, never saved


@pytest.mark.parametrize("kind, targets", [("gpt2", ["c_attn"]), ("llama", ["embed_tokens"]), ("conv", ["conv2d"])])
def test_unsupported_layers_raise_like_peft(kind: str, targets: list[str]) -> None:
    model = MODELS[kind]()
    with pytest.raises(TypeError, match="is not supported.*torch.nn.Linear"):
        quiet(peft.get_peft_model, copy.deepcopy(model), peft.ShiraConfig(r=1, target_modules=targets))
    with pytest.raises(UnsupportedLayerError, match=rf"'[\w.]*{targets[0]}' \(\w+\) is not supported.*torch.nn.Linear"):
        funcpeft.get_peft_model(model, funcpeft.ShiraConfig(r=1, target_modules=targets))


# -- init and masks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),  # random_seed None: torch's default generator seed
        dict(r=1, target_modules=["k_proj", "up_proj"], random_seed=56, init_weights=False),
    ],
)
def test_fresh_adapter_and_mask_equal_peft_s(kwargs: dict[str, Any]) -> None:
    ours, theirs = fresh_states(T.tiny_llama(), "ShiraConfig", kwargs, seed=5)
    assert_same_state(ours, theirs)
    assert any(k.endswith("shira_indices") and v.dtype == torch.int32 for k, v in ours.items())


def test_custom_mask_fn_equals_peft_s() -> None:
    def use_magnitude(config: Any) -> None:
        config.mask_fn = magnitude_mask

    kwargs: dict[str, Any] = dict(r=2, target_modules=["q_proj", "o_proj"], mask_type="magnitude", init_weights=False)
    ours, theirs = quiet(fresh_states, T.tiny_llama(), "ShiraConfig", kwargs, 3, use_magnitude)
    assert_same_state(ours, theirs)


def test_the_mask_is_frozen_base_side_data_not_adapter_or_parameters() -> None:
    fpm = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.ShiraConfig(r=2, target_modules=["q_proj"]))
    fn, base, adapter = fpm
    frozen = {k: v for k, v in base.items() if k.startswith(SHARED_PREFIX)}
    assert sorted(frozen) == [f"<shared>.default.model.layers.{i}.self_attn.q_proj.shira_indices" for i in range(2)]
    assert all(v.dtype == torch.int32 and v.shape == (2, 256) and not v.requires_grad for v in frozen.values())
    assert {k for e in adapter.values() for k in e} == {"shira_weight"}
    trainable, total = fpm.get_nb_trainable_parameters()
    assert trainable == 2 * 256 and total == trainable + sum(p.numel() for p in fpm.model.parameters())
    tree = T.random_like(adapter, torch.Generator().manual_seed(0))
    _, grads = value_and_grad(lambda a: fn(base, a, **make_inputs("llama")).logits.square().mean())(tree)
    assert all(g.abs().sum() > 0 for g in optree.tree_leaves(grads))
    with pytest.raises(KeyError, match="shira_indices"):  # the frozen side is required: never a silent no-op
        fn({k: v for k, v in base.items() if k not in frozen}, tree, **make_inputs("llama"))


def test_a_custom_mask_checkpoint_loads_its_indices_from_the_file(tmp_path: Any) -> None:
    """PEFT saves the indices; a loaded adapter with a custom mask_type (no mask_fn) reads them from the file."""
    model = T.tiny_llama()
    config = quiet(peft.ShiraConfig, r=2, target_modules=["v_proj"], mask_type="magnitude", init_weights=False)
    config.mask_fn = magnitude_mask
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    pm.save_pretrained(tmp_path)
    x = make_inputs("llama")
    fpm = funcpeft.from_pretrained(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, pm(**x).logits, atol=1e-5, rtol=0)
    tree, _ = funcpeft.load_adapter(tmp_path)  # without the model: the indices are not adapter leaves
    assert {k for e in tree.values() for k in e} == {"shira_weight"}
    # a fresh adapter of that config has no mask function: PEFT fails at its first forward, funcpeft says why
    fresh = quiet(
        funcpeft.get_peft_model, model, funcpeft.ShiraConfig(r=2, target_modules=["v_proj"], mask_type="magnitude")
    )
    with pytest.raises(ValueError, match="mask indices are unknown.*mask_fn"):
        fresh.fn(fresh.base, fresh.adapter, **x)


def test_a_mask_fn_with_the_wrong_number_of_ones_is_refused() -> None:
    def too_few(base_layer: torch.nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        return torch.eye(*base_layer.get_parameter("weight").shape)

    config = quiet(funcpeft.ShiraConfig, r=2, target_modules=["q_proj"], mask_type="eye")
    config.mask_fn = too_few
    with pytest.raises(ValueError, match="the mask has 64 ones, the layer needs r \\* \\(in \\+ out\\) = 256"):
        funcpeft.get_peft_model(T.tiny_llama(), config)


# -- mixed models (PEFT's PeftMixedModel accepts SHiRA) -------------------------------------------------------
def test_shira_under_lora_in_a_mixed_model_equals_peft() -> None:
    model, x = T.tiny_llama(), make_inputs("llama")
    shira: dict[str, Any] = dict(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    lora: dict[str, Any] = dict(r=4, target_modules=["q_proj"])
    fpm = funcpeft.get_peft_model(model, funcpeft.ShiraConfig(**shira), mixed=True)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(**shira), mixed=True)
    trees = {"default": fpm.adapter, "lora": fpm.add_adapter("lora", funcpeft.LoraConfig(**lora))}
    pm.add_adapter("lora", peft.LoraConfig(**lora))
    pm.set_adapter(["default", "lora"])  # type: ignore[arg-type]  # a mixed model takes a list
    trees["lora"] = T.random_like(trees["lora"], torch.Generator().manual_seed(1))
    named = dict(pm.named_parameters())
    with torch.no_grad():  # the same values in PEFT's layers (LoRA wraps SHiRA on q_proj), and the same masks
        for path, e in trees["default"].items():
            named[
                f"base_model.model.{path}.base_layer.shira_weight.default"
                if "q_proj" in path
                else f"base_model.model.{path}.shira_weight.default"
            ].copy_(e["shira_weight"])
        for path, e in trees["lora"].items():
            for k, v in e.items():
                named[f"base_model.model.{path}.{k}.lora.weight"].copy_(v)
        mask = {n: b for n, b in pm.named_modules() if hasattr(b, "shira_indices")}
        for path in trees["default"]:
            layer = mask[f"base_model.model.{path}.base_layer" if "q_proj" in path else f"base_model.model.{path}"]
            assert torch.equal(layer.shira_indices["default"], fpm.base[f"<shared>.default.{path}.shira_indices"])
        got = fpm.fn(fpm.base, trees, **x).logits
        torch.testing.assert_close(got, pm.eval()(**x).logits, atol=1e-5, rtol=0)
        assert (got - model(**x).logits).abs().max() > 1e-3
    assert fpm.get_nb_trainable_parameters(trees) == pm.get_nb_trainable_parameters()


def test_shira_over_another_method_is_refused_like_peft() -> None:
    model = T.tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"]), mixed=True)
    with pytest.raises(ValueError, match="SHiRA does not support nested base layers"):
        pm.add_adapter("s", peft.ShiraConfig(r=1, target_modules=["q_proj"]))
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=["q_proj"]), mixed=True)
    with pytest.raises(ValueError, match="SHIRA does not support nested base layers.*q_proj"):
        fpm.add_adapter("s", funcpeft.ShiraConfig(r=1, target_modules=["q_proj"]))
    assert list(fpm.peft_config) == ["default"]
    fpm.add_adapter("s", funcpeft.ShiraConfig(r=1, target_modules=["k_proj"]))  # another layer: fine


# -- files --------------------------------------------------------------------------------------------------
def test_load_adapter_warns_that_it_drops_a_custom_mask(tmp_path: Any) -> None:
    model = T.tiny_llama()
    config = quiet(peft.ShiraConfig, r=2, target_modules=["v_proj"], mask_type="magnitude")
    config.mask_fn = magnitude_mask
    peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="frozen adapter tensors its config alone does not give.*shira_indices"):
        funcpeft.load_adapter(tmp_path, model=model)
    peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(r=2, target_modules=["v_proj"])).save_pretrained(
        tmp_path / "r"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a random mask: the config gives the same indices, nothing is dropped
        funcpeft.load_adapter(tmp_path / "r", model=model)
