"""WaveFT (`WaveFTConfig`) against PEFT 0.21.2: config checks and errors, unsupported layers, init draws and
coefficient indices (frozen, rebuilt from the seed, never saved), n_frequency_pattern, proportional_parameters,
every wavelet PEFT's transform knows (odd and even shapes), GPT-2 Conv1D, merge; laws (hypothesis). Compile and
per-example routing: tests/test_method_transforms.py."""

from __future__ import annotations

import copy
from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import MODELS, cast_model, examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft._wavelets import WAVELETS


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        *mc.N_FREQUENCY_ROWS,
        (dict(target_modules=["lin0"], wavelet_family="db99"), ValueError, "Wavelet family db99 not supported"),
        (dict(target_modules=["lin0"], wavelet_family="haar"), ValueError, "Wavelet family haar not supported"),
        *mc.LAYERS_PATTERN_ROWS,
        (dict(target_modules="lin0", layers_pattern="h"), ValueError, "`layers_pattern` cannot be used"),
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], exc: type[BaseException], match: str) -> None:
    info = mc.assert_raises_like_peft(models.build("MLP"), "WaveFTConfig", kwargs, exc, match)
    if "product" in match:
        assert "'lin0'" in str(info.value)  # funcpeft names the module


@pytest.mark.parametrize(
    "wavelet, peft_error, ours",
    [
        ("db20", "Unknown wavelet name 'db20'", "Wavelet family 'db20' has no filters in PEFT's WaveFT transform"),
        ("coif5", "shapes cannot be multiplied", "'coif5': PEFT's filter has 48 taps but its padding"),
    ],
)
def test_a_wavelet_peft_cannot_reconstruct_is_refused_up_front(wavelet: str, peft_error: str, ours: str) -> None:
    """PEFT's config accepts db11-db38, sym11-sym20, coif6-coif17, but its transform has no filters for them; its
    coif5 filter (48 taps) does not fit its padding (28 = 30 taps - 2), so dW comes out 18 rows and columns short.
    PEFT fails at the first forward; funcpeft refuses the config. With use_idwt=False (no transform) both work."""
    model, x = models.build("MLP"), {"X": torch.randn(3, 10)}
    config = peft.WaveFTConfig(n_frequency=8, target_modules=["lin0"], wavelet_family=wavelet)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    with pytest.raises((ValueError, RuntimeError), match=peft_error):
        pm(**x)
    with pytest.raises(ValueError, match=ours):
        funcpeft.WaveFTConfig(target_modules=["lin0"], wavelet_family=wavelet)
    kwargs = dict(n_frequency=8, target_modules=["lin0"], wavelet_family=wavelet, use_idwt=False, init_weights=False)
    fpm, pm = mc.build_both(model, "WaveFTConfig", kwargs)
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, 1)[0], x)


def test_a_missing_seed_is_refused_up_front() -> None:
    """PEFT accepts random_loc_seed=None and fails at get_peft_model (manual_seed(None)); funcpeft says why at once."""
    with pytest.raises(RuntimeError, match="manual_seed expected a long"):
        peft.get_peft_model(
            models.build("MLP"),
            peft.WaveFTConfig(n_frequency=8, target_modules=["lin0"], random_loc_seed=None),  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="WaveFTConfig.random_loc_seed must be int, got None"):
        funcpeft.WaveFTConfig(random_loc_seed=None)  # type: ignore[arg-type]


def test_unsupported_layers_name_module_and_type() -> None:
    match = r"Target module 'transformer.wte' \(Embedding\) is not supported"
    mc.assert_unsupported_like_peft(
        T.tiny_gpt2(), "WaveFTConfig", dict(target_modules=["wte"]), "is not supported", match
    )


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(n_frequency=50, target_modules="all-linear", init_weights=False)),  # randn * 0.01
        ("llama", dict(n_frequency=50, target_modules="all-linear")),  # zeros, no draw (PEFT's default)
        ("gpt2", dict(n_frequency=40, random_loc_seed=3, init_weights=False)),  # PEFT's default: mlp.c_proj (Conv1D)
    ],
)
def test_fresh_adapter_and_indices_equal_peft_for_the_same_seed(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "WaveFTConfig", kwargs, seed=2)
    mc.assert_fresh_equals_peft(fpm, pm)
    mc.assert_frozen_equal_peft(fpm, pm, "waveft_indices")


def test_init_weights_true_draws_nothing_like_peft() -> None:
    torch.manual_seed(5)
    funcpeft.get_peft_model(T.tiny_llama(), funcpeft.WaveFTConfig(n_frequency=8, target_modules="all-linear"))
    ours = torch.rand(3)
    torch.manual_seed(5)
    want = torch.rand(3)
    assert torch.equal(ours, want)


@pytest.mark.parametrize(
    "model, targets, pattern, proportional",
    [
        (models.build("MLP"), ["lin0", "lin1"], {"lin0": 5}, False),
        (models.build("MLP"), ["lin0", "lin1"], {"lin.": 6}, False),  # PEFT's get_pattern_key: a regex at a dot
        (T.tiny_llama(), "all-linear", {"layers.1.mlp.up_proj": 3, "q_proj": 7, "k_pro.": 2}, False),
        (T.tiny_llama(), "all-linear", {"q_proj": 7}, True),  # proportional wins over the pattern (PEFT's order)
        (T.tiny_gpt2(), ["c_attn", "c_proj", "c_fc"], {}, True),
        (models.build("MLP"), ["lin0", "lin1"], {}, True),
    ],
)
def test_n_frequency_pattern_and_proportional_parameters_follow_peft(
    model: nn.Module, targets: Any, pattern: dict[str, int], proportional: bool
) -> None:
    kwargs = dict(n_frequency=8, n_frequency_pattern=pattern, target_modules=targets)
    fpm, pm = mc.build_both(model, "WaveFTConfig", {**kwargs, "proportional_parameters": proportional})
    got = {p: e.spec.hyper.n_frequency for p, e in fpm.plans["default"].items()}
    want = {p: pm.get_submodule(f"base_model.model.{p}").waveft_n_frequency["default"] for p in got}
    assert got == want
    assert set(got.values()) != {8}  # the case really changes n


@pytest.mark.parametrize("wavelet", [w for w in WAVELETS if w not in ("haar", "coif5")])
@pytest.mark.parametrize("shape", [(7, 5), (6, 4)])
def test_every_wavelet_equals_peft_on_odd_and_even_shapes(wavelet: str, shape: tuple[int, int]) -> None:
    """Forward and gradients for every wavelet PEFT's transform knows; odd shapes take PEFT's extra padding row /
    column and the centre crop."""
    model = nn.Sequential(nn.Linear(shape[1], shape[0])).eval()
    kwargs = dict(n_frequency=9, scaling=3.0, wavelet_family=wavelet, target_modules=["0"], init_weights=False)
    fpm, pm = mc.build_both(model, "WaveFTConfig", kwargs)
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, 1)[0], {"input": torch.randn(3, shape[1])})


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("llama", dict(n_frequency=60, scaling=30.0, target_modules=["q_proj", "down_proj"], wavelet_family="db3")),
        ("gpt2", dict(n_frequency=60, scaling=30.0, target_modules=["c_attn", "mlp.c_proj"], wavelet_family="coif1")),
        ("gpt2", dict(n_frequency=60, target_modules=["c_attn", "mlp.c_proj"], use_idwt=False)),
    ],
)
def test_forward_gradients_and_merge_equal_peft(kind: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(MODELS[kind](), "WaveFTConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    x = make_inputs(kind)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    mc.assert_merge_equals_peft(fpm, pm, adapter, x)


def test_indices_are_frozen_rebuilt_from_the_seed_and_never_saved(tmp_path: Any) -> None:
    mc.assert_spectrum_indices_frozen_and_unsaved("WaveFTConfig", "waveft_spectrum", tmp_path)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "WaveFTConfig", dict(n_frequency=8, target_modules=["lin0"]))


def _delta(out_f: int, in_f: int, **kwargs: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(dW, the adapter's spectrum, its (2, n) indices) for one Linear(in_f, out_f) with random coefficients."""
    model = nn.Sequential(nn.Linear(in_f, out_f)).eval()
    fpm = funcpeft.get_peft_model(model, funcpeft.WaveFTConfig(target_modules=["0"], init_weights=False, **kwargs))
    ((_, key),) = fpm.plans["default"]["0"].frozen
    merged = funcpeft.merge(fpm, fpm.base, fpm.adapter)["0.weight"]
    return (merged - fpm.base["0.weight"]).double(), fpm.adapter["0"]["waveft_spectrum"].double(), fpm.base[key]


@settings(max_examples=examples(15))
@given(half_out=st.integers(1, 6), half_in=st.integers(1, 6), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_haar_on_even_shapes_is_orthogonal(half_out: int, half_in: int, frac: float, seed: int) -> None:
    """db1 (Haar) on an even (out, in) needs no padding: the inverse transform is orthonormal, so
    ||dW||_F = scaling * ||spectrum||, and dW sums to scaling * (sum of the approximation band's coefficients) * 2
    (each Haar approximation coefficient spreads c / 2 over a 2 x 2 block)."""
    out_f, in_f = 2 * half_out, 2 * half_in
    n = max(1, int(frac * out_f * in_f))
    delta, spectrum, idx = _delta(out_f, in_f, n_frequency=n, scaling=2.0, random_loc_seed=seed)
    torch.testing.assert_close(delta.norm(), 2.0 * spectrum.norm(), atol=1e-5, rtol=1e-5)
    approx = (idx[0] < half_out) & (idx[1] < half_in)
    torch.testing.assert_close(delta.sum(), 2.0 * 2 * spectrum[approx].sum(), atol=1e-5, rtol=1e-5)


@settings(max_examples=examples(15))
@given(out_f=st.integers(1, 9), in_f=st.integers(1, 9), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_without_the_transform_the_update_is_the_scaled_sparse_spectrum(
    out_f: int, in_f: int, frac: float, seed: int
) -> None:
    n = max(1, int(frac * out_f * in_f))
    delta, spectrum, idx = _delta(out_f, in_f, n_frequency=n, scaling=3.0, random_loc_seed=seed, use_idwt=False)
    want = torch.zeros(out_f, in_f, dtype=torch.float64)
    want[idx[0], idx[1]] = 3.0 * spectrum
    torch.testing.assert_close(delta, want, atol=1e-6, rtol=1e-5)


def test_a_bf16_model_equals_peft_with_its_upcast_spectrum() -> None:
    kwargs = dict(n_frequency=30, target_modules=["q_proj", "down_proj"], wavelet_family="db2", init_weights=False)
    fpm, pm = mc.build_both(cast_model(T.tiny_llama(), torch.bfloat16), "WaveFTConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)
    assert all(leaf.dtype == torch.float32 for tree in fpm.adapter.values() for leaf in tree.values())
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, 1)[0], make_inputs("llama"), atol=1e-2)
