"""RoAd (`RoadConfig`) against PEFT 0.21.2: config checks and errors, unsupported layers, init draws (every
variant), forward, gradients, merge / unmerge (bias included), mixed models refused; laws (hypothesis): the merge
matrix R reproduces the forward's rotation, road_1 with alpha 1 keeps each pair's norm; torch.compile without
recompiles, per-example routing and vmap."""

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
from funcpeft.methods import road

VARIANTS = ["road_1", "road_2", "road_4"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="road_3"), "Invalid variant road_3 specified. Please choose from road_1, road_2 or road_4"),
        (dict(group_size=3), "The group_size must be divisible by 2 when using RoadLayer, but got 3."),
        (dict(group_size=0), "The group_size must be divisible by 2 when using RoadLayer, but got 0."),
        (dict(group_size=-2), "The group_size must be divisible by 2 when using RoadLayer, but got -2."),
        # lin0 has 20 outputs: a group size that does not divide them is refused when the layer is made
        (dict(group_size=8), r"The out_features of the base layer must be divisible by group_size \(8\)"),
    ],
)
def test_invalid_configs_raise_like_peft(kwargs: dict[str, Any], match: str) -> None:
    info = mc.assert_raises_like_peft(
        models.build("MLP"), "RoadConfig", {"target_modules": ["lin0"], **kwargs}, ValueError, match
    )
    if "out_features" in match:
        assert "'lin0'" in str(info.value)  # funcpeft names the module


def test_unsupported_layers_name_module_and_type() -> None:
    """PEFT adapts nn.Linear only: GPT-2's Conv1D and an embedding are refused."""
    mc.assert_linear_only_like_peft(
        "RoadConfig",
        ValueError,
        "Currently, only the following modules are supported: `torch.nn.Linear`",
        dict(group_size=2),
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("init_weights", [True, False])
def test_fresh_adapter_equals_peft_for_the_same_seed(variant: str, init_weights: bool) -> None:
    kwargs = dict(variant=variant, group_size=16, init_weights=init_weights, target_modules="all-linear")
    fpm, pm = mc.build_both(T.tiny_llama(), "RoadConfig", kwargs, seed=4)
    mc.assert_fresh_equals_peft(fpm, pm)
    n = {"road_1": 64, "road_2": 128, "road_4": 256}[variant]  # per 128 outputs
    assert fpm.adapter["model.layers.0.mlp.gate_proj"]["road_theta"].shape == (n,)
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_gradients_merge_and_unmerge_equal_peft(variant: str) -> None:
    """On an MLP with biases: R W and R b merged like PEFT, and unmerged back with R's inverse."""
    kwargs = dict(variant=variant, group_size=4, target_modules=["lin0", "lin1"], init_weights=False)
    fpm, pm = mc.build_both(MODELS["mlp"](), "RoadConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, 1)[0]
    x = make_inputs("mlp", batch=3)
    mc.assert_matches_peft_with(fpm, pm, adapter, x)
    merged, back = mc.merged_like_peft(fpm, pm, adapter, x)
    for path in ("lin0", "lin1"):
        for name in ("weight", "bias"):
            key = f"{path}.{name}"
            assert not torch.allclose(merged[key], fpm.base[key])
            torch.testing.assert_close(back[key], fpm.base[key], atol=1e-5, rtol=1e-5)


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "RoadConfig", dict(group_size=2, target_modules=["lin0"]))


@settings(max_examples=examples(20))
@given(
    variant=st.sampled_from(VARIANTS),
    groups=st.integers(1, 4),
    half=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_the_merge_matrix_is_the_forward_rotation(variant: str, groups: int, half: int, seed: int) -> None:
    """R y (PEFT's `_get_delta_weight`, used to merge) equals the elementwise forward on any y (..., out)."""
    g = torch.Generator().manual_seed(seed)
    out = 2 * half * groups
    spec: Any = road.LayerSpec(
        "road", road.LayerKind.LINEAR, (out, 3), 3, out, road.RoadHyper(variant, 2 * half, False)
    )
    params = road.init(spec, g)
    y = torch.randn(5, 2, out, generator=g, dtype=torch.float64)
    params64 = {k: v.double() for k, v in params.items()}
    want = y @ road.rotation(spec, params64).T
    torch.testing.assert_close(road._apply(spec, params64, y), want, atol=1e-12, rtol=1e-12)


@settings(max_examples=examples(20))
@given(groups=st.integers(1, 4), half=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_road_1_with_unit_scales_keeps_every_pairs_norm(groups: int, half: int, seed: int) -> None:
    """alpha = 1: each pair (i, i + g / 2) of a group is rotated, so its Euclidean norm is unchanged."""
    gen = torch.Generator().manual_seed(seed)
    size = 2 * half
    model = nn.Sequential(nn.Linear(3, size * groups)).eval()
    fpm = funcpeft.get_peft_model(model, funcpeft.RoadConfig(group_size=size, target_modules=["0"]))
    theta = torch.randn(fpm.adapter["0"]["road_theta"].shape, generator=gen, dtype=torch.float64)
    adapter = {"0": {"road_theta": theta, "road_alpha": torch.ones_like(theta)}}
    base = {k: v.double() for k, v in fpm.base.items()}
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y, plain = fpm.fn(base, adapter, x), fpm.fn(base, None, x)
    assert not torch.allclose(y, plain)

    def pair_norms(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(4, groups, 2, half)
        return t.square().sum(dim=2)

    torch.testing.assert_close(pair_norms(y), pair_norms(plain), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("autocast", [True, False])
def test_a_bf16_model_equals_peft(autocast: bool) -> None:
    """autocast_adapter_dtype: float32 adapter (True) or the model's bf16 (False), in both; the same outputs."""
    kwargs: dict[str, Any] = dict(group_size=16, init_weights=False, target_modules=["q_proj", "down_proj"])
    mc.assert_bf16_model_equals_peft("RoadConfig", kwargs, autocast)
