"""HiRA (`HiraConfig`) against PEFT 0.21.2: config fields and errors, unsupported layers, init draws for every
init_weights on every layer kind, forward / gradients for adapters away from the init (1x1 convs and bfloat16
too), merging several adapters (PEFT scales each delta by the pre-merge W0), mixed models refused. PEFT's
TEST_CASES rows: tests/test_peft_matrix.py; compile: tests/test_method_transforms.py."""

from __future__ import annotations

import copy
from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import as_type
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft.methods.base import UnsupportedLayerError

X = {"X": torch.arange(90).reshape(9, 10) % 7}  # token ids < 100 for EmbConv1D, values for the others


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules="lin0", layers_to_transform=[0]), "`layers_to_transform` cannot be used"),
        (dict(target_modules="lin0", layers_pattern=["x"]), "`layers_pattern` cannot be used"),
        (dict(r=0, target_modules=["lin0"]), "`r` should be a positive integer value but the value passed is 0"),
        (dict(target_modules=["lin0"], hira_dropout=1.5), "dropout probability has to be between 0 and 1"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    mc.assert_raises_like_peft(models.build("MLP"), "HiraConfig", kwargs, ValueError, match)


def test_unsupported_layers_name_module_and_type() -> None:
    mha = models.build("MHA")
    with pytest.raises(ValueError, match="is not supported"):
        peft.get_peft_model(copy.deepcopy(mha), peft.HiraConfig(target_modules=["mha"]))
    with pytest.raises(UnsupportedLayerError, match=r"'mha'.*MultiheadAttention"):
        funcpeft.get_peft_model(mha, funcpeft.HiraConfig(target_modules=["mha"]))
    info = mc.assert_raises_like_peft(
        models.build("Conv2dGroups"), "HiraConfig", dict(target_modules=["conv2d"]), NotImplementedError, "groups > 1"
    )
    assert "'conv2d'" in str(info.value)
    conv3d = nn.Sequential(nn.Conv3d(2, 3, (1, 1, 2)))
    with pytest.raises(RuntimeError):  # PEFT builds the layer but its delta fails in the forward
        peft.get_peft_model(copy.deepcopy(conv3d), peft.HiraConfig(r=2, target_modules=["0"]))(
            torch.randn(1, 2, 2, 2, 3)
        )
    with pytest.raises(NotImplementedError, match=r"Conv3d '0' with kernel \(1, 1, 2\)"):
        funcpeft.get_peft_model(conv3d, funcpeft.HiraConfig(r=2, target_modules=["0"]))


def test_rank_pattern_is_refused_where_peft_ignores_it() -> None:
    pm = peft.get_peft_model(
        models.build("MLP"), peft.HiraConfig(target_modules=["lin1"], r=4, rank_pattern={"lin1": 2})
    )
    lin1_a = pm.get_parameter("base_model.model.lin1.hira_A.default")
    assert lin1_a.shape[0] == 4  # PEFT built lin1 with r, not its pattern's 2
    with pytest.raises(NotImplementedError, match="ignores rank_pattern"):
        funcpeft.HiraConfig(target_modules=["lin1"], r=4, rank_pattern={"lin1": 2})


def test_mixed_is_refused_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "HiraConfig", dict(target_modules=["lin0"]))


CASES = [
    ("MLP", dict(target_modules=["lin0", "lin1"], r=3)),
    ("EmbConv1D", dict(target_modules=["emb", "conv1d"], r=4)),
    ("Conv1d", dict(target_modules=["conv1d"], r=2)),
    ("Conv2d", dict(target_modules=["conv2d"], r=3)),
    ("Conv2d1x1", dict(target_modules=["conv2d", "lin0"], r=3)),
    ("Conv3d", dict(target_modules=["conv3d"], r=2)),
]


@pytest.mark.parametrize("init", [True, False, "gaussian", None])
@pytest.mark.parametrize("model_id, kwargs", CASES, ids=[c[0] for c in CASES])
def test_fresh_adapter_equals_peft_for_the_same_seed(model_id: str, kwargs: dict[str, Any], init: Any) -> None:
    fpm, pm = mc.build_both(models.build(model_id), "HiraConfig", {**kwargs, "init_weights": init}, seed=5)
    mc.assert_fresh_equals_peft(fpm, pm)


@pytest.mark.parametrize("model_id, kwargs", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_peft_away_from_the_init(model_id: str, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(models.build(model_id), "HiraConfig", kwargs)
    for adapter in mc.random_trees(fpm.adapter, n=2, scale=0.3):
        mc.assert_matches_peft_with(fpm, pm, adapter, X, atol=1e-4)


def test_bfloat16_model_matches_peft() -> None:
    model = as_type(models.build("MLP", dtype=torch.bfloat16), models.MLP)
    model.dtype = torch.bfloat16  # the model casts its input to it
    fpm, pm = mc.build_both(model, "HiraConfig", dict(target_modules=["lin0", "lin1"], init_weights=False))
    mc.assert_fresh_equals_peft(fpm, pm)  # float32 adapters, like PEFT's autocast
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], {"X": torch.randn(4, 10)}, atol=2e-2)


def test_two_adapters_merge_scale_by_the_pre_merge_weight_and_unmerge_exactly() -> None:
    """PEFT: W0 + W0 * (d1 + d2), not (W0 + W0 d1)(1 + d2); unmerging with `base=` restores W0 bitwise."""
    model = models.build("MLP")
    fpm = funcpeft.get_peft_model(model, funcpeft.HiraConfig(target_modules=["lin0"], init_weights=False))
    fn, base, fresh = fpm
    fpm.add_adapter("other", funcpeft.HiraConfig(target_modules=["lin0"], init_weights=False))
    a1, a2 = mc.random_trees(fresh, n=2)
    both = {"default": a1, "other": a2}
    merged = funcpeft.merge(fpm, base, both)
    x = torch.randn(3, 10)
    torch.testing.assert_close(fn(merged, None, X=x), fn(base, both, X=x), atol=1e-5, rtol=1e-5)
    w0 = base["lin0.weight"]
    d = sum(p["hira_B"] @ p["hira_A"] for p in (a1["lin0"], a2["lin0"]))
    torch.testing.assert_close(merged["lin0.weight"], w0 + w0 * d)
    assert torch.equal(funcpeft.unmerge(fpm, merged, both, base=base)["lin0.weight"], w0)
