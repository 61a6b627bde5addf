"""Super-Tuning (`SupertuningConfig`, with the Supra LoRA hybrid) against PEFT 0.21.2: config checks and errors,
unsupported layers, init draws and the random stream, the magnitude-chosen indices (a frozen saved tensor in
`base`), forward, gradients, merge / unmerge, files, mixed models refused; laws (hypothesis): the update's support
is the top-k (bottom-k) magnitudes; torch.compile without recompiles, per-example routing and vmap."""

from __future__ import annotations

from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import MODELS, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T

SUPRA: dict[str, Any] = dict(sparsity=0.75, r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("kwargs", [{}, dict(r=3), dict(r=2, lora_alpha=5.0, sparsity=0.5, select_top=False)])
def test_config_fields_and_defaults_equal_peft(kwargs: dict[str, Any]) -> None:
    """lora_alpha defaults to 2 * r, written into the config like PEFT's."""
    ours, theirs = funcpeft.SupertuningConfig(**kwargs).to_dict(), peft.SupertuningConfig(**kwargs).to_dict()
    assert ours == {**theirs, "peft_version": funcpeft._config.PEFT_VERSION}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0.0, 1.0\), got 1.0"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0.0, 1.0\), got -0.1"),
        (dict(r=0), "r must be a positive integer or None, got 0"),
        (dict(lora_alpha=4.0), "lora_alpha is set but r is None — Supra mode requires an explicit r."),
        (dict(r=2, lora_dropout=1.0), r"lora_dropout must be in \[0.0, 1.0\), got 1.0"),
        # lin1 holds 20 * 2 = 40 entries: int(40 * 0.01) = 0 trainable
        (
            dict(sparsity=0.99, target_modules=["lin1"]),
            "sparsity=0.99 leaves no trainable entries for a weight with 40",
        ),
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], match: str) -> None:
    info = mc.assert_raises_like_peft(
        models.build("MLP"), "SupertuningConfig", {"target_modules": ["lin0"], **kwargs}, ValueError, match
    )
    if "leaves no" in match:
        assert "'lin1'" in str(info.value)  # funcpeft names the module


def test_unsaved_indices_are_refused_not_silently_saved() -> None:
    """save_precomputed_indices=False (indices recomputed on load) is not implemented: refused when the config is made."""
    with pytest.warns(UserWarning, match="save_precomputed_indices=False"):
        peft.SupertuningConfig(save_precomputed_indices=False)
    with pytest.raises(NotImplementedError, match="save_precomputed_indices=False is not implemented"):
        funcpeft.SupertuningConfig(save_precomputed_indices=False)


def test_unsupported_layers_name_module_and_type() -> None:
    """PEFT adapts nn.Linear only: GPT-2's Conv1D and an embedding are refused."""
    mc.assert_linear_only_like_peft("SupertuningConfig", TypeError, "Currently, only `torch.nn.Linear` is supported")


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("r", [None, 2])
def test_fresh_adapter_indices_and_random_stream_equal_peft(init_weights: bool, r: int | None) -> None:
    kwargs = {**SUPRA, "r": r, "lora_dropout": 0.0, "init_weights": init_weights, "select_top": r is None}
    fpm, pm = mc.build_both(T.tiny_llama(), "SupertuningConfig", kwargs, seed=6)
    mc.assert_fresh_equals_peft(fpm, pm)
    for path, entry in fpm.plans["default"].items():
        ((_, key),) = entry.frozen
        layer: Any = pm.get_submodule(f"base_model.model.{path}")
        theirs = layer.supertuning_indices["default"]
        assert fpm.base[key].dtype == torch.int32 and torch.equal(fpm.base[key], theirs), path
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    nexts = []  # Supra's discarded nn.Linear draws are drawn too: the global stream continues like PEFT's
    for lib in (funcpeft, peft):
        torch.manual_seed(6)
        lib.get_peft_model(T.tiny_llama(), lib.SupertuningConfig(**kwargs))
        nexts.append(torch.rand(4))
    assert torch.equal(*nexts)


def test_forward_gradients_merge_and_unmerge_equal_peft() -> None:
    kwargs = dict(sparsity=0.5, r=2, lora_alpha=3.0, target_modules=["lin0", "lin1"], init_weights=False)
    fpm, pm = mc.build_both(MODELS["mlp"](), "SupertuningConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    x = make_inputs("mlp", batch=3)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    assert list(fpm.plans["default"]) == ["lin0", "lin1"]
    mc.assert_merge_equals_peft(fpm, pm, adapter, x)


def test_indices_are_saved_and_restored_from_the_file_like_peft(tmp_path: Any) -> None:
    """PEFT saves supertuning_indices (a persistent buffer); loading restores them, even onto a changed weight."""
    model = T.tiny_llama()
    config = funcpeft.SupertuningConfig(sparsity=0.9, r=2, target_modules=["q_proj"], init_weights=False)
    fpm = funcpeft.get_peft_model(model, config)
    names = ("supertuning_values", "supertuning_indices", "supertuning_lora_A.weight", "supertuning_lora_B.weight")
    # the changed weights have other magnitudes: fresh indices would differ
    saved, paths, back, pm = mc.saved_and_reloaded_on_changed_weights(fpm, model, tmp_path, names, torch.randn_like)
    for p in paths:
        ((_, key),) = back.plans["default"][p].frozen
        assert torch.equal(back.base[key], saved[f"base_model.model.{p}.supertuning_indices"])
        layer: Any = pm.get_submodule(f"base_model.model.{p}")
        assert torch.equal(back.base[key], layer.supertuning_indices["default"])
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(back.fn(back.base, back.adapter, **x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "SupertuningConfig", dict(target_modules=["lin0"]))


@settings(max_examples=examples(15))
@given(
    out_f=st.integers(1, 8),
    in_f=st.integers(1, 8),
    sparsity=st.floats(0.0, 0.95),
    top=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_update_lives_on_the_top_or_bottom_magnitudes(
    out_f: int, in_f: int, sparsity: float, top: bool, seed: int
) -> None:
    """Without LoRA the merged update is nonzero exactly on k = int(numel (1 - sparsity)) entries, and every one of
    them has a magnitude at least (top) / at most (bottom) that of every entry left out."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    k = int(in_f * out_f * (1 - sparsity))
    config = funcpeft.SupertuningConfig(sparsity=sparsity, select_top=top, target_modules=["0"], init_weights=False)
    if k < 1:
        with pytest.raises(ValueError, match="leaves no trainable entries"):
            funcpeft.get_peft_model(model, config)
        return
    fpm = funcpeft.get_peft_model(model, config)
    values = fpm.adapter["0"]["supertuning_values"]
    adapter = {"0": {"supertuning_values": values.sign() + (values == 0).float()}}  # nonzero everywhere
    support = funcpeft.merge(fpm, fpm.base, adapter)["0.weight"] != fpm.base["0.weight"]
    assert int(support.sum()) == k
    magnitude = fpm.base["0.weight"].abs()
    if k < magnitude.numel():
        chosen, rest = magnitude[support], magnitude[~support]
        assert (chosen.min() >= rest.max()) if top else (chosen.max() <= rest.min())


@pytest.mark.parametrize("autocast", [True, False])
def test_a_bf16_model_equals_peft(autocast: bool) -> None:
    """autocast_adapter_dtype: float32 adapter (True) or the model's bf16 (False), in both; the same outputs."""
    kwargs: dict[str, Any] = dict(sparsity=0.5, r=2, init_weights=False, target_modules=["q_proj", "down_proj"])
    mc.assert_bf16_model_equals_peft("SupertuningConfig", kwargs, autocast)
