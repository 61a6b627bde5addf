"""AdaMSS (`AdamssConfig`) against PEFT 0.21.2: config fields and errors, unsupported layers, init (the seeded SVD,
the k-means subspaces, the ranks, fixed or dynamic, A from each subspace's randomized SVD and B's draws, in PEFT's
random order; bfloat16 models too), the frozen saved `adamss_newB`, forward / gradients away from the init (with and
without a bias), merging into the weight and the bias, ASA's fields (validated; the forward is the same), mixed
models refused; laws (hypothesis): the subspaces partition the outputs, A's rows are orthonormal, the fresh adapter
is the base model, a merge equals the unmerged call. PEFT's TEST_CASES rows: tests/test_peft_matrix.py; compile and
per-example routing: tests/test_method_transforms.py and tests/test_contract.py."""

from __future__ import annotations

import copy
import os
from typing import Any

import method_checks as mc
import peft
import pytest
import torch
from helpers import examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from safetensors.torch import load_file
from torch import nn

import funcpeft
from funcpeft import testing as T

X = {"X": torch.randn(6, 10, generator=torch.Generator().manual_seed(0))}


def test_init_weights_false_becomes_none_like_peft() -> None:
    false: Any = False  # PEFT's annotation says "orthogonal" or None; its __post_init__ turns False into None
    assert funcpeft.AdamssConfig(init_weights=false).init_weights is peft.AdamssConfig(init_weights=false).init_weights


ASA = dict(use_asa=True, target_modules=["lin0"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_weights="kaiming", target_modules=["lin0"]), "init_weights must be 'orthogonal' or None"),
        ({**ASA, "mask_interval": 0}, "`mask_interval` must be a positive integer when `use_asa=True`"),
        ({**ASA, "init_warmup": 10, "final_warmup": 10}, "`init_warmup` must be smaller than `final_warmup`"),
        ({**ASA, "asa_target_subspaces": 0}, "`asa_target_subspaces` must be a positive integer"),
        ({**ASA, "asa_schedule_exponent": 0.0}, "`asa_schedule_exponent` must be a positive number"),
    ],
)
def test_config_errors_are_peft_s(kwargs: dict[str, Any], match: str) -> None:
    mc.assert_raises_like_peft(models.build("MLP"), "AdamssConfig", kwargs, ValueError, match)


@pytest.mark.parametrize("field", ["r", "num_subspaces", "subspace_rank"])
def test_non_positive_sizes_are_refused_by_the_config(field: str) -> None:
    """PEFT fails later (inside its SVD or k-means); funcpeft names the field."""
    with pytest.raises(ValueError, match=rf"`{field}` should be a positive integer value but the value passed is 0"):
        kwargs: dict[str, Any] = {field: 0}
        funcpeft.AdamssConfig(**kwargs)


def test_a_subspace_rank_above_the_svd_rank_is_refused() -> None:
    """PEFT builds A (r', r') and B (n, subspace_rank) there and fails in its forward; funcpeft refuses the layer."""
    model = models.build("MLP")
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.AdamssConfig(r=2, num_subspaces=1, subspace_rank=3, target_modules=["lin0"])
    )
    with pytest.raises(RuntimeError):
        pm(**X)
    with pytest.raises(ValueError, match=r"'lin0': a subspace rank of 3 exceeds the SVD rank 2"):
        funcpeft.get_peft_model(
            model, funcpeft.AdamssConfig(r=2, num_subspaces=1, subspace_rank=3, target_modules=["lin0"])
        )


@pytest.mark.parametrize(
    "model_id, target, kind", [("EmbConv1D", "emb", "Embedding"), ("EmbConv1D", "conv1d", "Conv1D")]
)
def test_unsupported_layers_name_module_and_type(model_id: str, target: str, kind: str) -> None:
    """PEFT adapts nn.Linear only."""
    model, config = models.build(model_id), dict(target_modules=[target])
    mc.assert_unsupported_like_peft(
        model, "AdamssConfig", config, "Currently, only `torch.nn.Linear` is supported", rf"'{target}', a .*{kind} \("
    )


def test_mixed_is_refused_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "AdamssConfig", dict(target_modules=["lin0"]))


def _no_bias_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12, bias=False), nn.ReLU(), nn.Linear(12, 3, bias=False)).eval()


CASES: list[tuple[str, Any, dict[str, Any]]] = [
    ("mlp", lambda: models.build("MLP"), dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=["lin0", "lin1"])),
    ("no-bias", _no_bias_mlp, dict(r=5, num_subspaces=4, subspace_rank=2, target_modules=["0", "2"], random_seed=7)),
    (
        "dynamic",
        lambda: models.build("MLP"),
        dict(r=8, num_subspaces=3, subspace_rank=4, use_dynamic_rank=True, svd_threshold=0.2, target_modules=["lin0"]),
    ),
    ("llama", T.tiny_llama, dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=["q_proj", "down_proj"])),
]


def _inputs(case: str) -> dict[str, Any]:
    if case == "llama":
        return make_inputs("llama")
    return {"input": X["X"][:, :10]} if case == "no-bias" else X


@pytest.mark.parametrize("init", ["orthogonal", None])
@pytest.mark.parametrize("case, build, kwargs", CASES, ids=[c[0] for c in CASES])
def test_fresh_adapter_and_frozen_basis_equal_peft_for_the_same_seed(
    case: str, build: Any, kwargs: dict[str, Any], init: str | None
) -> None:
    fpm, pm = mc.build_both(build(), "AdamssConfig", {**kwargs, "init_weights": init}, seed=4)
    mc.assert_fresh_equals_peft(fpm, pm)
    for path, entry in fpm.plans["default"].items():
        assert entry.spec is not None
        layer: Any = pm.get_submodule(f"base_model.model.{path}")
        ((_, key),) = entry.frozen
        assert torch.equal(fpm.base[key], layer.adamss_newB["default"]), path
        assert entry.spec.hyper.order == tuple(layer.scatter_index["default"].tolist()), path
        assert len(entry.spec.hyper.rows) == layer.num_subspaces["default"], path


@pytest.mark.parametrize("case, build, kwargs", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_peft_away_from_the_init(case: str, build: Any, kwargs: dict[str, Any]) -> None:
    fpm, pm = mc.build_both(build(), "AdamssConfig", kwargs)
    for adapter in mc.random_trees(fpm.adapter, n=2, scale=0.3):
        mc.assert_matches_peft_with(fpm, pm, adapter, _inputs(case), atol=1e-4)


@pytest.mark.parametrize("init", ["orthogonal", None])
def test_bfloat16_model_matches_peft(init: str | None) -> None:
    """A from the float32 SVD and B drawn in bfloat16, both upcast (autocast_adapter_dtype), newB too; the forward
    runs in bfloat16, as PEFT's."""
    model: Any = models.build("MLP", dtype=torch.bfloat16)
    model.dtype = torch.bfloat16  # the model casts its input to it
    kwargs = dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=["lin0", "lin1"], init_weights=init)
    fpm, pm = mc.build_both(model, "AdamssConfig", kwargs, seed=3)
    mc.assert_fresh_equals_peft(fpm, pm)
    for path, entry in fpm.plans["default"].items():
        ((_, key),) = entry.frozen
        assert torch.equal(fpm.base[key], pm.get_submodule(f"base_model.model.{path}").adamss_newB["default"])
    mc.assert_matches_peft_with(fpm, pm, mc.random_trees(fpm.adapter, n=1)[0], {"X": torch.randn(4, 10)}, atol=2e-2)


def test_files_hold_peft_s_keys_and_load_both_ways(tmp_path: Any) -> None:
    """PEFT's ParameterList entries `adamss_A.<i>` / `adamss_B.<i>` and the persistent buffer `adamss_newB`."""
    model = models.build("MLP")
    kwargs = dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=["lin0"], init_weights=None)
    fpm, pm = mc.build_both(model, "AdamssConfig", kwargs)
    adapter = mc.random_trees(fpm.adapter, n=1)[0]
    fpm.save_pretrained(tmp_path / "ours", adapter)
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    pm.save_pretrained(tmp_path / "theirs")
    ours = load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors"))
    theirs = load_file(os.path.join(tmp_path / "theirs", "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert {k.rsplit(".", 2)[-2] for k in ours if "adamss_A." in k} == {"adamss_A"}
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    back = funcpeft.from_pretrained(model, tmp_path / "theirs")
    loaded: Any = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back.fn(back.base, back.adapter, **X), loaded(**X), atol=1e-6, rtol=1e-6)


def test_merging_writes_the_bias_like_peft_and_unmerges() -> None:
    fpm, pm = mc.build_both(models.build("MLP"), "AdamssConfig", dict(r=8, num_subspaces=3, target_modules=["lin0"]))
    adapter = mc.random_trees(fpm.adapter, n=1, scale=0.5)[0]
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    merged = funcpeft.merge(fpm, fpm.base, adapter)
    with torch.no_grad():
        plain: Any = pm.merge_and_unload()
    for name in ("lin0.weight", "lin0.bias"):
        assert not torch.equal(merged[name], fpm.base[name]), name
        torch.testing.assert_close(merged[name], plain.get_parameter(name), atol=1e-6, rtol=0)
    back = funcpeft.unmerge(fpm, merged, adapter)
    for name in ("lin0.weight", "lin0.bias"):
        torch.testing.assert_close(back[name], fpm.base[name], atol=1e-6, rtol=0)


def test_asa_fields_do_not_change_the_adapter() -> None:
    """ASA prunes subspaces from a training loop (PEFT's update_and_allocate, not in funcpeft): the layers, the
    fresh values and the forward are those without it, as in PEFT."""
    kwargs = dict(r=8, num_subspaces=6, target_modules=["lin0", "lin1"], init_weights=None)
    plain, _ = mc.build_both(models.build("MLP"), "AdamssConfig", kwargs, seed=2)
    asa, pm = mc.build_both(
        models.build("MLP"), "AdamssConfig", {**kwargs, "use_asa": True, "asa_target_subspaces": 3}, seed=2
    )
    mc.assert_fresh_equals_peft(asa, pm)
    T.assert_trees_close(asa.adapter, plain.adapter, atol=0, rtol=0)
    torch.testing.assert_close(asa.fn(asa.base, asa.adapter, **X), plain.fn(plain.base, plain.adapter, **X))


def _layer(out_f: int, in_f: int, bias: bool, seed: int, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).eval()
    return funcpeft.get_peft_model(model, funcpeft.AdamssConfig(target_modules=["0"], **kwargs))


LAYERS = dict(
    out_f=st.integers(2, 9),
    in_f=st.integers(2, 9),
    bias=st.booleans(),
    r=st.integers(1, 6),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=examples(10), deadline=None)
@given(**LAYERS)
def test_subspaces_partition_the_outputs_and_a_has_orthonormal_rows(
    out_f: int, in_f: int, bias: bool, r: int, k: int, seed: int
) -> None:
    fpm = _layer(out_f, in_f, bias, seed, r=r, num_subspaces=k, subspace_rank=1)
    spec = fpm.plans["default"]["0"].spec
    assert sorted(spec.hyper.order) == list(range(out_f))
    assert spec.hyper.rank == min(r, out_f, in_f + bias) and len(spec.hyper.rows) == min(k, out_f)
    for i in range(len(spec.hyper.rows)):
        a = fpm.adapter["0"][f"adamss_A_{i}"].double()
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, x), fpm.model(x), atol=0, rtol=0)  # B = 0


@settings(max_examples=examples(10), deadline=None)
@given(**LAYERS)
def test_merging_equals_the_unmerged_call(out_f: int, in_f: int, bias: bool, r: int, k: int, seed: int) -> None:
    fpm = _layer(out_f, in_f, bias, seed, r=r, num_subspaces=k, subspace_rank=1, init_weights=None)
    adapter = mc.random_trees(fpm.adapter, n=1, scale=0.5)[0]
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed))
    merged = funcpeft.merge(fpm, fpm.base, adapter)
    torch.testing.assert_close(fpm.fn(merged, None, x), fpm.fn(fpm.base, adapter, x), atol=1e-5, rtol=1e-5)
