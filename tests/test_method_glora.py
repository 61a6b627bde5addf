"""GLoRA (`GloraConfig`) against PEFT 0.21.2: config fields and checks (PEFT's messages), unsupported layers (plain
nn.Linear only), the fresh adapter for every parametrisation (bitwise PEFT's, zero buffers included, with and
without bias), outputs / gradients / merges for every parametrisation, unmerging; the law (hypothesis): the layer is
`x (W0 + W0 * A + B)^T + b0 + b0 * D + E + W0 @ C`. Compile and per-example routing: test_method_transforms.py (and
test_contract.py on tiny Llama and BERT)."""

from __future__ import annotations

import copy
import itertools
import os
from typing import Any

import peft
import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from method_checks import assert_mixed_refused_like_peft, assert_raises_like_peft, random_trees
from method_helpers import assert_same_state, fresh_states, quiet
from peft_matrix import harness, models
from peft_matrix.cases import Case
from safetensors.torch import load_file
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods.base import UnsupportedLayerError

KINDS = list(
    itertools.product(
        ("lora", "vector", "constant", "none"), ("lora", "vector", "none"), ("vector", "constant", "none")
    )
)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(config_A_B="full"), "Invalid config_A_B value: 'full'. Valid values are: constant, lora, none, vector."),
        (dict(config_C="constant"), "Invalid config_C value: 'constant'. Valid values are: lora, none, vector."),
        (dict(config_D_E="lora"), "Invalid config_D_E value: 'lora'. Valid values are: constant, none, vector."),
    ],
)
def test_config_checks_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    for lib in (peft, funcpeft):
        with pytest.raises(ValueError, match=match.replace(".", r"\.")):
            lib.GloraConfig(**kwargs)


def test_rank_is_checked_where_a_path_uses_it() -> None:
    """PEFT builds rank-0 "lora" paths (always zero) and fails in torch for r < 0: funcpeft refuses both up front,
    and ignores r where no path is "lora" (as PEFT)."""
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        funcpeft.GloraConfig(r=0)
    funcpeft.GloraConfig(r=0, config_A_B="vector", config_C="none")
    with pytest.raises(NotImplementedError, match="Requested bias"):
        funcpeft.GloraConfig(bias="some")


def test_unsupported_layers_raise_like_peft() -> None:
    info = assert_raises_like_peft(
        T.tiny_gpt2(), "GloraConfig", dict(target_modules=["c_attn"]), ValueError, "is not a plain torch.nn.Linear"
    )
    assert isinstance(info.value, UnsupportedLayerError)
    assert "Target module 'transformer.h.0.attn.c_attn' (Conv1D)" in str(info.value)
    # a subclass of nn.Linear is refused too (PEFT: `type(...) is not nn.Linear`)
    model = nn.Sequential(_MyLinear(4, 3))
    info = assert_raises_like_peft(model, "GloraConfig", dict(target_modules=["0"]), ValueError, "not a plain")
    assert "Target module '0' (_MyLinear)" in str(info.value)


@pytest.mark.parametrize("kinds", KINDS, ids=["-".join(k) for k in KINDS])
@pytest.mark.parametrize("init_weights", [True, False])
def test_fresh_adapter_equals_peft_s(kinds: tuple[str, str, str], init_weights: bool) -> None:
    kwargs = dict(r=3, config_A_B=kinds[0], config_C=kinds[1], config_D_E=kinds[2], init_weights=init_weights)
    kwargs["target_modules"] = ["lin0", "lin1"]
    ours, theirs = fresh_states(models.build("MLP"), "GloraConfig", kwargs)
    assert_same_state(ours, theirs)
    # without a bias C, D and E are zero buffers whatever the config says
    ours, theirs = fresh_states(_no_bias(), "GloraConfig", kwargs, seed=3)
    assert_same_state(ours, theirs)
    assert sum(k.endswith(".zeros") for k in ours) >= 3


class _MyLinear(nn.Linear):
    pass


def _no_bias() -> nn.Module:
    torch.manual_seed(0)
    return models.MLP(bias=False)


@pytest.mark.parametrize("kinds", KINDS[::3], ids=["-".join(k) for k in KINDS[::3]])
def test_outputs_gradients_and_merge_equal_peft(kinds: tuple[str, str, str], tmp_path: Any) -> None:
    """Every parametrisation through the differential harness (outputs, gradients, counts, files both ways, merge).

    lin0 only: on lin1 (which feeds a LogSoftmax) a constant B or E shifts every logit alike, so its exact gradient
    is 0 and both libraries return rounding noise there."""
    kwargs = dict(r=2, target_modules=["lin0"], config_A_B=kinds[0], config_C=kinds[1], config_D_E=kinds[2])
    harness.check_row(Case(f"GLoRA {kinds}", "MLP", "GloraConfig", kwargs), tmp_path)


def test_unmerge_restores_the_base() -> None:
    model = models.build("MLP")
    cfg = funcpeft.GloraConfig(r=2, target_modules=["lin0"], init_weights=False, config_C="vector")
    fpm = quiet(funcpeft.get_peft_model, model, cfg)
    adapter = random_trees(fpm.adapter, 1, scale=0.1)[0]
    merged = funcpeft.merge(fpm, fpm.base, adapter)
    assert (merged["lin0.bias"] - fpm.base["lin0.bias"]).abs().max() > 1e-3
    back = funcpeft.unmerge(fpm, merged, adapter, base=fpm.base)
    for k in ("lin0.weight", "lin0.bias"):
        torch.testing.assert_close(back[k], fpm.base[k])
    # without the base there is no per-adapter inverse (each adapter scaled the same W0): refused, not guessed
    with pytest.raises(NotImplementedError, match=r"GLoRA: unmerging needs the original base"):
        funcpeft.unmerge(fpm, merged, adapter)


def test_peft_s_files_with_zero_buffers_load_and_round_trip(tmp_path: Any) -> None:
    """A "none" path's zeros are PEFT's saved buffers: read into `base` and written back bitwise."""
    model = _no_bias()
    torch.manual_seed(1)
    cfg: dict[str, Any] = dict(target_modules=["lin0"], config_A_B="none", init_weights=False)
    pm = quiet(peft.get_peft_model, copy.deepcopy(model), peft.GloraConfig(**cfg))
    pm.save_pretrained(tmp_path / "peft")
    fpm = quiet(funcpeft.from_pretrained, copy.deepcopy(model), tmp_path / "peft")
    fpm.save_pretrained(tmp_path / "ours", fpm.adapter)
    ours, theirs = (load_file(os.path.join(tmp_path, d, "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sorted(k for k in ours if k.endswith("zeros")) == [f"base_model.model.lin0.glora_{p}.zeros" for p in "ABCDE"]
    # saving needs them from `base`: without it, refused by name
    with pytest.raises(ValueError, match=r"frozen \['glora_A.zeros'"):
        funcpeft.io.checkpoint_state(fpm.adapter, fpm.peft_config["default"], base_params={})


@settings(max_examples=examples(20), deadline=None)
@given(
    kinds=st.sampled_from(KINDS),
    bias=st.booleans(),
    in_f=st.integers(1, 6),
    out_f=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_the_layer_is_the_generalised_weight_and_bias(
    kinds: tuple[Any, Any, Any], bias: bool, in_f: int, out_f: int, seed: int
) -> None:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    model = nn.Sequential(layer)
    cfg = funcpeft.GloraConfig(r=2, target_modules=["0"], config_A_B=kinds[0], config_C=kinds[1], config_D_E=kinds[2])
    fpm = funcpeft.get_peft_model(model, cfg)
    tree = random_trees(fpm.adapter, 1, scale=0.5)[0]
    p = {k.replace("glora_", ""): v.double() for k, v in tree["0"].items()}

    def path(name: str, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        if kind == "lora":
            return p[f"{name}.Xd"] @ p[f"{name}.Xu"]
        if kind in ("vector", "constant"):
            return p[f"{name}.X"] if kind == "vector" else p[f"{name}.X"][0]
        return torch.zeros(shape, dtype=torch.float64)

    w0 = layer.weight.detach().double()
    a, b = (path(n, kinds[0], (out_f, in_f)) for n in "AB")
    weight = w0 + w0 * a + b
    x = torch.randn(4, in_f, dtype=torch.float64)
    want = x @ weight.T
    if bias:
        b0 = layer.bias.detach().double()
        c = path("C", kinds[1], (in_f, 1))
        d, e = (path(n, kinds[2], (out_f,)) for n in "DE")
        want = want + b0 + b0 * d + e + (w0 @ c).squeeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, tree, x.float()).double(), want, atol=1e-5, rtol=1e-5)
        merged = funcpeft.merge_and_unload(fpm, tree)
        torch.testing.assert_close(merged(x.float()).double(), want, atol=1e-5, rtol=1e-5)


def test_mixed_models_refuse_it_like_peft() -> None:
    assert_mixed_refused_like_peft(models.build("MLP"), "GloraConfig", dict(target_modules=["lin0"]))
