"""FourierFT (`FourierFTConfig`) against PEFT 0.21.2: config checks and errors, unsupported layers, init draws and
spectral indices (frozen, rebuilt from the seed, never saved), n_frequency_pattern, GPT-2 Conv1D, merge; laws
(hypothesis). Compile and per-example routing: tests/test_method_transforms.py."""

from __future__ import annotations

from typing import Any

import method_checks as mc
import pytest
import torch
from helpers import MODELS, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        *mc.N_FREQUENCY_ROWS,
        *mc.LAYERS_PATTERN_ROWS,
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], exc: type[BaseException], match: str) -> None:
    info = mc.assert_raises_like_peft(models.build("MLP"), "FourierFTConfig", kwargs, exc, match)
    if "product" in match:
        assert "'lin0'" in str(info.value)  # funcpeft names the module


def test_a_missing_seed_is_refused_up_front() -> None:
    """PEFT accepts random_loc_seed=None and fails at get_peft_model (manual_seed(None)); funcpeft says why at once."""
    with pytest.raises(ValueError, match="`random_loc_seed` must be an int"):
        funcpeft.FourierFTConfig(random_loc_seed=None)


def test_unsupported_layers_name_module_and_type() -> None:
    match = r"Target module 'transformer.wte' \(Embedding\) is not supported"
    mc.assert_unsupported_like_peft(
        T.tiny_gpt2(), "FourierFTConfig", dict(target_modules=["wte"]), "is not supported", match
    )


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        (
            "llama",
            dict(n_frequency=50, target_modules="all-linear"),
        ),  # init_weights=False: randn spectra (PEFT's default)
        ("gpt2", dict(n_frequency=40, random_loc_seed=3)),  # PEFT's gpt2 default target: mlp.c_proj (Conv1D)
    ],
)
def test_fresh_adapter_and_indices_equal_peft_for_the_same_seed(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "FourierFTConfig", kwargs, seed=2)
    mc.assert_fresh_equals_peft(fpm, pm)
    mc.assert_frozen_equal_peft(fpm, pm, "indices")


def test_n_frequency_pattern_follows_peft_s_matching_rule() -> None:
    """PEFT matches `.*\\.{key}$` first, then the full module name as a key: "lin0" still hits the top-level lin0,
    but a regex key "lin." does not (LoRA's rank_pattern rule would match it)."""
    cases = [
        (models.build("MLP"), ["lin0", "lin1"], {"lin0": 5}),
        (models.build("MLP"), ["lin0", "lin1"], {"lin.": 6}),
        (T.tiny_llama(), "all-linear", {"layers.1.mlp.up_proj": 3, "q_proj": 7, "k_pro.": 2}),
    ]
    for model, targets, pattern in cases:
        kwargs = dict(n_frequency=8, n_frequency_pattern=pattern, target_modules=targets)
        fpm, pm = mc.build_both(model, "FourierFTConfig", kwargs)
        for path, entry in fpm.plans["default"].items():
            layer = pm.get_submodule(f"base_model.model.{path}")
            assert entry.spec.hyper.n_frequency == layer.fourierft_n_frequency["default"], path


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(n_frequency=60, scaling=30.0, target_modules=["q_proj", "down_proj"])),
        ("gpt2", dict(n_frequency=60, scaling=30.0, target_modules=["c_attn", "mlp.c_proj"])),
    ],
)
def test_forward_gradients_and_merge_equal_peft(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "FourierFTConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    x = make_inputs(kind)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    mc.assert_merge_equals_peft(fpm, pm, adapter, x)


def test_indices_are_frozen_rebuilt_from_the_seed_and_never_saved(tmp_path: Any) -> None:
    mc.assert_spectrum_indices_frozen_and_unsaved("FourierFTConfig", "fourierft_spectrum", tmp_path)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(
        models.build("MLP"), "FourierFTConfig", dict(n_frequency=8, target_modules=["lin0"])
    )


@settings(max_examples=examples(15))
@given(out_f=st.integers(1, 8), in_f=st.integers(1, 8), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_the_update_is_the_inverse_dft_of_the_sparse_spectrum(out_f: int, in_f: int, frac: float, seed: int) -> None:
    """dW[p, q] = scaling / (out * in) * sum_k c_k cos(2 pi (p u_k / out + q v_k / in)) at the spectral entries (u, v)."""
    n = max(1, int(frac * out_f * in_f))
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    fpm = funcpeft.get_peft_model(
        model, funcpeft.FourierFTConfig(n_frequency=n, scaling=2.0, random_loc_seed=seed, target_modules=["0"])
    )
    ((_, key),) = fpm.plans["default"]["0"].frozen
    u, v = fpm.base[key].double()
    c = fpm.adapter["0"]["fourierft_spectrum"].detach().double()
    p, q = torch.arange(out_f).double()[:, None, None], torch.arange(in_f).double()[None, :, None]
    want = 2.0 / (out_f * in_f) * (c * torch.cos(2 * torch.pi * (p * u / out_f + q * v / in_f))).sum(-1)
    merged = funcpeft.merge(fpm, fpm.base, fpm.adapter)["0.weight"]
    torch.testing.assert_close((merged - fpm.base["0.weight"]).double(), want, atol=1e-5, rtol=1e-4)
