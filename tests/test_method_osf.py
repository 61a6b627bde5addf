"""OSF (`OSFConfig`) against PEFT 0.21.2: config fields, errors, default targets, unsupported layers, init (SVD and
random) and the frozen SVD parts (not saved, rebuilt from the base weight on load), forward, PEFT's projected
gradients, merge, bf16 dtypes; laws (hypothesis): the trained factors' gradients are orthogonal to the frozen top
subspace. Compile and per-example routing: tests/test_method_transforms.py; vmap and routing on tiny-llama:
tests/test_contract.py."""

from __future__ import annotations

import copy
from typing import Any, cast

import method_checks as mc
import optree
import peft
import pytest
import torch
from helpers import examples, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_matrix import models
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods import osf
from funcpeft.methods.base import UnsupportedLayerError

# q_proj (64, 64), up_proj (out > in: U_high stored), down_proj (out < in: V_high stored)
LLAMA: dict[str, Any] = dict(target_modules=["q_proj", "up_proj", "down_proj"], effective_rank=0.75)
BUFFERS = {
    osf.U0: "_osf_U_low_init",
    osf.S0: "_osf_S_low_init",
    osf.V0: "_osf_V_low_init",
    osf.U_HIGH: "_osf_U_high",
    osf.V_HIGH: "_osf_V_high",
}


def _frozen(fpm: Any, path: str) -> dict[str, torch.Tensor]:
    return {name: fpm.base[key] for name, key in fpm.plans[fpm.adapter_name][path].frozen}


@pytest.mark.parametrize(
    "kwargs",
    [dict(effective_rank=0), dict(effective_rank=-3), dict(effective_rank=4, rank_pattern={"lin1": 0.1})],
)
def test_invalid_ranks_raise_like_peft(kwargs: dict[str, Any]) -> None:
    match = "`effective_rank` should be a positive integer value but the value passed is 0"
    info = mc.assert_raises_like_peft(models.build("MLP"), "OSFConfig", kwargs, ValueError, match)
    assert "(module 'lin" in str(info.value)  # funcpeft names the module


def test_modules_to_save_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="OSFConfig.modules_to_save"):
        funcpeft.OSFConfig(modules_to_save=["lin1"])


@pytest.mark.parametrize("model_id", ["MLP", "tiny-llama"])
def test_default_targets_equal_peft(model_id: str) -> None:
    """No target_modules: the model type's table (llama), else every linear layer (a custom MLP)."""
    model = T.tiny_llama() if model_id == "tiny-llama" else models.build(model_id)
    fpm, pm = mc.build_both(model, "OSFConfig", {})
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "osf_svd_params"))
    assert sorted(fpm.plans["default"]) == theirs and len(theirs) > 1


def test_unsupported_layers_name_module_and_type() -> None:
    """PEFT silently leaves a targeted non-Linear layer unadapted (GPT-2's Conv1D: its own default targets);
    funcpeft refuses, naming the module and its type."""
    model = T.tiny_gpt2()
    for targets, kind in ((None, "Conv1D"), (["wte"], "Embedding")):
        pm = peft.get_peft_model(copy.deepcopy(model), peft.OSFConfig(target_modules=targets))
        assert not any(hasattr(m, "osf_svd_params") for m in pm.modules())  # PEFT: nothing adapted
        with pytest.raises(UnsupportedLayerError, match=rf"not '.*' \({kind}\)"):
            funcpeft.get_peft_model(model, funcpeft.OSFConfig(target_modules=targets))


@pytest.mark.parametrize("init_weights", [True, False])
def test_fresh_adapter_and_frozen_parts_equal_peft_for_the_same_seed(init_weights: bool) -> None:
    fpm, pm = mc.build_both(T.tiny_llama(), "OSFConfig", {**LLAMA, "init_weights": init_weights}, seed=3)
    mc.assert_fresh_equals_peft(fpm, pm)
    stored = set()
    for path in fpm.plans["default"]:
        layer: Any = pm.get_submodule(f"base_model.model.{path}")
        ours = _frozen(fpm, path)
        theirs = {n: getattr(layer, b)["default"] for n, b in BUFFERS.items() if "default" in getattr(layer, b)}
        assert set(ours) == set(theirs), path
        for name, value in ours.items():
            assert torch.equal(value, theirs[name]), (path, name)
        stored |= set(ours)
    assert stored == set(BUFFERS)  # the three shapes exercise both high subspaces


def test_forward_projected_gradients_and_merge_equal_peft() -> None:
    fpm, pm = mc.build_both(T.tiny_llama(), "OSFConfig", LLAMA)
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.05)[0]
    x = make_inputs("llama")
    mc.assert_matches_peft_with(fpm, pm, adapter, x)  # PEFT's gradients pass through its projection hooks
    mc.assert_merge_equals_peft(fpm, pm, adapter, x)  # PEFT refuses to unmerge; additive here


def test_only_the_trained_factors_are_saved_and_loading_rebuilds_the_rest_like_peft(tmp_path: Any) -> None:
    model = T.tiny_llama()
    fpm = funcpeft.get_peft_model(model, funcpeft.OSFConfig(**LLAMA, init_weights=False))
    saved, paths, back, pm = mc.saved_and_reloaded_on_changed_weights(
        fpm,
        model,
        tmp_path,
        ("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"),
        lambda w: torch.randn_like(w) * 0.1,
    )
    for p in paths:
        layer: Any = pm.get_submodule(f"base_model.model.{p}")
        for name, value in _frozen(back, p).items():
            assert torch.equal(value, getattr(layer, BUFFERS[name])["default"]), (p, name)
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(back.fn(back.base, back.adapter, **x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)


def test_a_bf16_model_gets_float32_factors_and_frozen_parts_rounded_through_bf16_like_peft() -> None:
    """PEFT computes the SVD parts (and the random init) in the model's dtype, then upcasts all of them."""
    fpm, pm = mc.build_both(T.tiny_llama().bfloat16(), "OSFConfig", {**LLAMA, "init_weights": False})
    mc.assert_fresh_equals_peft(fpm, pm)
    assert {t.dtype for t in optree.tree_leaves(fpm.adapter)} == {torch.float32}
    for path in fpm.plans["default"]:
        layer: Any = pm.get_submodule(f"base_model.model.{path}")
        for name, value in _frozen(fpm, path).items():
            assert torch.equal(value, getattr(layer, BUFFERS[name])["default"]), (path, name)
            assert torch.equal(value, value.bfloat16().float())  # rounded through the model's dtype
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, pm(**x).logits, atol=1e-2, rtol=0)


def test_two_osf_adapters_on_one_layer_are_refused() -> None:
    """PEFT's forward would apply only the first active one."""
    model = models.build("MLP")
    fpm = funcpeft.get_peft_model(model, funcpeft.OSFConfig(target_modules=["lin0"], init_weights=False))
    fpm.add_adapter("other", funcpeft.OSFConfig(target_modules=["lin0"]))
    other = funcpeft.get_peft_model(model, funcpeft.OSFConfig(target_modules=["lin0"])).adapter
    with pytest.raises(NotImplementedError, match="applies only the first active adapter"):
        fpm.fn(fpm.base, {"default": fpm.adapter, "other": other}, **models.inputs("MLP"))


def test_mixed_models_refuse_it_like_peft() -> None:
    mc.assert_mixed_refused_like_peft(models.build("MLP"), "OSFConfig", dict(target_modules=["lin0"]))


@settings(max_examples=examples(15), deadline=None)
@given(shape=st.tuples(st.integers(2, 9), st.integers(2, 9)), rank=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_the_trained_factors_move_orthogonally_to_the_frozen_top_subspace(
    shape: tuple[int, int], rank: int, seed: int
) -> None:
    """U_high^T dU = 0 and dV V_high^T = 0, while the output is the unprojected forward's."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(shape[1], shape[0])).double().eval()
    fpm = funcpeft.get_peft_model(
        model, funcpeft.OSFConfig(target_modules=["0"], effective_rank=min(rank, min(shape) - 1))
    )
    spec = fpm.plans["default"]["0"].spec
    assert spec is not None
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.3)[0]
    x = torch.randn(5, shape[1], dtype=torch.double)
    weights = torch.randn(5, shape[0], dtype=torch.double)
    _, tree = funcpeft.value_and_grad(lambda a: (fpm.fn(fpm.base, a, x) * weights).sum())(adapter)
    grads = tree["0"]
    # the top subspace as OSF computes it (a float32 SVD, like PEFT's), so orthogonality holds to float32 precision
    u, _, vh = (t.double() for t in torch.linalg.svd(fpm.base["0.weight"].float(), full_matrices=False))
    k, n = spec.hyper.k, spec.hyper.n
    zeros = torch.zeros(k, n, dtype=torch.double)
    torch.testing.assert_close(u[:, :k].T @ grads[osf.U], zeros, atol=1e-5 * (1 + grads[osf.U].abs().max()), rtol=0)
    torch.testing.assert_close(grads[osf.V] @ vh[:k].T, zeros.T, atol=1e-5 * (1 + grads[osf.V].abs().max()), rtol=0)
    params = {**adapter["0"], **_frozen(fpm, "0")}
    with torch.no_grad():
        plain = model(x) + x @ osf.delta_weight(spec, params).T
        torch.testing.assert_close(fpm.fn(fpm.base, adapter, x), plain)


@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("left", [True, False])
def test_gradient_projection_keeps_nothing_per_call(square: bool, left: bool) -> None:
    """U / V are read through a Function whose value is the parameter (nothing computed in the forward, only the
    frozen basis saved, like PEFT's hooks; the straight-through form keeps P(U)) and whose gradient, tangent and
    vmapped gradient are the projection, bitwise the straight-through form's gradient."""
    from method_checks import _saved_bytes

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    basis = (q[:, :3] if square else q[:, 3:]) if left else (q[:3] if square else q[3:])
    u = torch.randn((5, 3) if left else (3, 5), generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=g, dtype=torch.float64)

    def straight(x: torch.Tensor) -> torch.Tensor:
        p = osf._project(x, basis, square, left)
        return x.detach() + (p - p.detach())

    ours = lambda x: osf._projected(x, basis, square, left)  # noqa: E731
    torch.testing.assert_close(ours(u), u, rtol=0, atol=0)
    basis_bytes = basis.numel() * basis.element_size()
    assert sum(_saved_bytes(ours, [u])) <= basis_bytes < sum(_saved_bytes(straight, [u]))
    want = osf._project(w, basis, square, left)
    (grad,) = torch.autograd.grad((ours(u) * w).sum(), u)
    (grad_straight,) = torch.autograd.grad((straight(u) * w).sum(), u)
    assert torch.equal(grad, want) and torch.equal(grad, grad_straight)
    torch.testing.assert_close(torch.func.jvp(ours, (u.detach(),), (w,))[1], want)
    stacked = torch.stack([u.detach(), 2 * u.detach()])
    batched = torch.func.vmap(torch.func.grad(lambda x: (ours(x) * w).sum()))(stacked)
    torch.testing.assert_close(batched, torch.stack([want, want]))


def test_a_bf16_model_projects_its_gradients_where_peft_loses_its_hooks() -> None:
    """Deviation (PEFT provably wrong): on a bf16 / fp16 model PEFT attaches its projection hooks to the factors, then
    `cast_adapter_dtype` (autocast_adapter_dtype=True, the default) replaces each factor with a new float32
    Parameter, dropping the hooks: PEFT trains U_low / V_low with the raw gradient, which moves into the frozen top
    subspace OSF exists to protect. funcpeft keeps projecting: its gradient is PEFT's raw gradient projected, and
    projecting it again changes nothing, while PEFT's is changed by its own projection (so it was never applied)."""
    fpm, pm = mc.build_both(T.tiny_llama().bfloat16(), "OSFConfig", LLAMA)
    adapter = mc.random_trees(fpm.adapter, 1, scale=0.05)[0]
    plan = fpm.plans["default"]
    T.copy_into_peft(pm, adapter, plan)
    adapter = optree.tree_map(lambda t: t.detach().requires_grad_(True), adapter)
    x = make_inputs("llama")
    fpm.fn(fpm.base, adapter, **x).logits.float().square().mean().backward()
    pm.zero_grad(set_to_none=True)
    pm(**x).logits.float().square().mean().backward()
    theirs = T.peft_grads(pm, adapter, plan)
    checked = 0
    for path, spec in ((p, e.spec) for p, e in plan.items()):
        frozen = _frozen(fpm, path)
        for name, left in ((osf.U, True), (osf.V, False)):
            square = spec.hyper.u_square if left else spec.hyper.v_square
            basis = frozen[(osf.U0 if left else osf.V0) if square else (osf.U_HIGH if left else osf.V_HIGH)]
            ours, raw = cast(torch.Tensor, adapter[path][name].grad), cast(torch.Tensor, theirs[path][name])
            torch.testing.assert_close(ours, osf._project(raw, basis, square, left), atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(osf._project(ours, basis, square, left), ours, atol=1e-6, rtol=1e-4)
            gap = (osf._project(raw, basis, square, left) - raw).abs().max()
            assert gap > 1e-2 * raw.abs().max(), (path, name)  # PEFT's gradient was not projected
            checked += 1
    assert checked == 2 * len(plan)
