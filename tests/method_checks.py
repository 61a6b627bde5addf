"""Checks the per-method test files (tests/test_method_*.py) share: one method against PEFT 0.21.2.

fpm, pm = build_both(model, "MissConfig", dict(r=2, target_modules=["lin0"]), seed=0)
assert_fresh_equals_peft(fpm, pm)                       # the same init draws, bitwise
assert_matches_peft_with(fpm, pm, adapter, inputs)      # outputs and every gradient
assert_raises_like_peft(model, "C3AConfig", kwargs, ValueError, "block size should be a factor")
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import assert_forward_and_grads_equal_peft, cast_model, make_inputs, method_pair, out_tensor
from method_helpers import seeded
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import SHARED_PREFIX
from funcpeft.methods.base import UnsupportedLayerError


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def build_both(
    model: nn.Module, config_cls: str, kwargs: Mapping[str, Any], seed: int = 0, autocast_adapter_dtype: bool = True
) -> tuple[Any, Any]:
    """funcpeft's and PEFT's `get_peft_model` on copies of `model`, each right after `torch.manual_seed(seed)`."""
    built = []
    for lib in (funcpeft, peft):
        torch.manual_seed(seed)
        config = getattr(lib, config_cls)(**kwargs)
        built.append(
            _quiet(lib.get_peft_model, copy.deepcopy(model), config, autocast_adapter_dtype=autocast_adapter_dtype)
        )
    fpm, pm = built
    return fpm, pm.eval()


def _peft_names(fpm: Any) -> dict[tuple[str, str], str]:
    plan = fpm.plans[fpm.adapter_name]
    return {(p, k): T.peft_param_name(p, k, plan[p]) for p, e in plan.items() for k in e.keys}


def assert_fresh_equals_peft(fpm: Any, pm: nn.Module) -> None:
    """Same trainable parameters as PEFT, and every fresh leaf bitwise equal to PEFT's (same dtype too)."""
    names = _peft_names(fpm)
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert set(names.values()) == set(theirs), (sorted(names.values()), sorted(theirs))
    for (path, key), name in names.items():
        ours = fpm.adapter[path][key]
        assert ours.dtype == theirs[name].dtype, (name, ours.dtype, theirs[name].dtype)
        assert torch.equal(ours, theirs[name].detach()), f"{name}: fresh value differs from PEFT's"


def assert_matches_peft_with(
    fpm: Any, pm: nn.Module, adapter: Any, inputs: Mapping[str, Any], atol: float = 1e-5
) -> None:
    """`adapter` copied into PEFT: eval outputs and the gradients of a random-weighted loss agree."""
    fn, base, _ = fpm
    T.copy_into_peft(pm, adapter, fpm.plans[fpm.adapter_name])
    adapter = optree.tree_map(lambda t: t.detach().requires_grad_(True), adapter)
    out = out_tensor(fn(base, adapter, **inputs))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    pm.zero_grad(set_to_none=True)
    want = out_tensor(pm(**inputs))
    (want * weights).sum().backward()
    torch.testing.assert_close(out.detach(), want.detach(), atol=atol, rtol=1e-5)
    theirs = T.peft_grads(pm, adapter, fpm.plans[fpm.adapter_name])
    ours = optree.tree_map(lambda t: t.grad, adapter)
    T.assert_trees_close(ours, theirs, atol=atol, rtol=1e-4)


def assert_raises_like_peft(
    model: nn.Module, config_cls: str, kwargs: Mapping[str, Any], exc: type[BaseException], match: str
) -> pytest.ExceptionInfo[Any]:
    """Both libraries refuse (config or get_peft_model) with `exc` and a message matching `match`; funcpeft's info."""
    with pytest.raises(exc, match=match):
        _quiet(peft.get_peft_model, copy.deepcopy(model), getattr(peft, config_cls)(**kwargs))
    with pytest.raises(exc, match=match) as info:
        _quiet(funcpeft.get_peft_model, copy.deepcopy(model), getattr(funcpeft, config_cls)(**kwargs))
    return info


def assert_compiles_once(fn: Any, base: Any, trees: Sequence[Any], inputs: Mapping[str, Any]) -> None:
    """`torch.compile(fn, fullgraph=True)` (aot_eager) equals eager for each tree, with one graph for all of them."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        for tree in trees:
            got, want = out_tensor(compiled(base, tree, **inputs)), out_tensor(fn(base, tree, **inputs))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for {len(trees)} adapters"


def random_trees(fresh: Any, n: int = 3, scale: float = 0.2) -> list[Any]:
    """n adapters near `fresh` (fresh + scale * N(0, 1)), detached."""
    out = []
    for s in range(n):
        noise = T.random_like(fresh, torch.Generator().manual_seed(s), scale=scale)
        out.append(optree.tree_map(lambda f, e: (f + e).detach(), fresh, noise))
    return out


def assert_mixed_refused_like_peft(model: nn.Module, config_cls: str, kwargs: Mapping[str, Any]) -> None:
    """PeftMixedModel does not take this method: both refuse `mixed=True` with PEFT's message."""
    match = "is not compatible with the `PeftMixedModel`"
    with pytest.raises(ValueError, match=match):
        _quiet(peft.get_peft_model, copy.deepcopy(model), getattr(peft, config_cls)(**kwargs), mixed=True)
    with pytest.raises(ValueError, match=match):
        _quiet(funcpeft.get_peft_model, copy.deepcopy(model), getattr(funcpeft, config_cls)(**kwargs), mixed=True)


def assert_unsupported_like_peft(
    model: nn.Module,
    config_cls: str,
    kwargs: Mapping[str, Any],
    peft_match: str,
    match: str,
    peft_exc: type[BaseException] = TypeError,
) -> None:
    """PEFT refuses the targeted layer type with a `peft_exc` matching `peft_match`; funcpeft with an
    UnsupportedLayerError matching `match` (which names the module and its type)."""
    with pytest.raises(peft_exc, match=peft_match):
        _quiet(peft.get_peft_model, copy.deepcopy(model), getattr(peft, config_cls)(**kwargs))
    with pytest.raises(UnsupportedLayerError, match=match):
        _quiet(funcpeft.get_peft_model, copy.deepcopy(model), getattr(funcpeft, config_cls)(**kwargs))


def assert_frozen_equal_peft(fpm: Any, pm: nn.Module, attr: str) -> None:
    """Each adapted layer's one frozen tensor equals PEFT's `layer.{attr}["default"]`, and every `base` entry that is
    not a parameter of the model is under a reserved key (funcpeft._trees.SHARED_PREFIX)."""
    for path, entry in fpm.plans["default"].items():
        ((_, key),) = entry.frozen
        layer = pm.get_submodule(f"base_model.model.{path}")
        assert torch.equal(fpm.base[key], getattr(layer, attr)["default"]), path
    assert all(k.startswith(SHARED_PREFIX) for k in set(fpm.base) - {n for n, _ in fpm.model.named_parameters()})


def merged_like_peft(
    fpm: Any, pm: Any, adapter: Any, inputs: Mapping[str, Any], rtol: float = 1e-5, unmerge_base: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """merge_and_unload's outputs equal PEFT's (on a copy of `pm`; atol 1e-5); returns (merge(fpm.base, adapter),
    unmerge of that), for the caller's checks on the weights. unmerge_base: unmerge is given `base=fpm.base`."""
    with torch.no_grad():
        want = out_tensor(copy.deepcopy(pm).merge_and_unload()(**inputs))
        got = out_tensor(funcpeft.merge_and_unload(fpm, adapter)(**inputs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=rtol)
        merged = funcpeft.merge(fpm, fpm.base, adapter)
        back = funcpeft.unmerge(fpm, merged, adapter, **({"base": fpm.base} if unmerge_base else {}))
    return merged, back


def assert_merge_equals_peft(fpm: Any, pm: Any, adapter: Any, inputs: Mapping[str, Any]) -> None:
    """merge_and_unload's outputs equal PEFT's, and unmerge(merge(W)) gives every adapted weight back."""
    _, back = merged_like_peft(fpm, pm, adapter, inputs)
    for path in fpm.plans["default"]:
        torch.testing.assert_close(back[f"{path}.weight"], fpm.base[f"{path}.weight"], atol=1e-6, rtol=0)


def assert_rotation_case_equals_peft(
    build: Any, config_cls: str, config: Mapping[str, Any], inputs: Mapping[str, Any]
) -> None:
    """The orthogonal methods' (OFT, BOFT, HRA) case: on `build()` (seeded), a random adapter's outputs and
    gradients equal PEFT's, merge_and_unload's outputs too (rtol 0), and unmerging the merged base (given the base)
    gives every base tensor back."""
    fpm, pm, adapter = method_pair(seeded(build), config_cls, dict(config))
    assert_forward_and_grads_equal_peft(fpm, pm, adapter, dict(inputs))
    _, back = merged_like_peft(fpm, pm, adapter, inputs, rtol=0, unmerge_base=True)
    for k, v in fpm.base.items():
        torch.testing.assert_close(back[k], v, atol=1e-5, rtol=1e-5)


def assert_bf16_layers_cast_like_peft(
    model: nn.Module, config_cls: str, kwargs: Mapping[str, Any], inputs: Mapping[str, torch.Tensor]
) -> Any:
    """On `model` cast to bf16 (inputs too), eval outputs are bf16 and bitwise PEFT's; returns the adapter."""
    fpm, pm, adapter = method_pair(cast_model(model, torch.bfloat16), config_cls, dict(kwargs))
    x = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    with torch.no_grad():
        got, want = fpm.fn(fpm.base, adapter, **x), pm(**x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
    return adapter


def assert_linear_only_like_peft(
    config_cls: str, peft_exc: type[BaseException], peft_match: str, kwargs: Mapping[str, Any] | None = None
) -> None:
    """PEFT adapts nn.Linear only: on GPT-2 it refuses the Conv1D (c_attn) and the embedding (wte) with `peft_exc`
    matching `peft_match`; funcpeft with an UnsupportedLayerError naming the module and its type."""
    model = T.tiny_gpt2()
    for target, kind in (("c_attn", "Conv1D"), ("wte", "Embedding")):
        config = {**(kwargs or {}), "target_modules": [target]}
        match = rf"'transformer\..*{target}' \({kind}\) is not supported"
        assert_unsupported_like_peft(model, config_cls, config, peft_match, match, peft_exc)


def patch_peft_dropout(pm: nn.Module, attr: str, p: float, seed: int) -> None:
    """Makes every `module.{attr}["default"]` dropout of `pm` draw funcpeft's masks (bernoulli(1 - p) from one
    Generator seeded `seed`, in call order): PEFT's training call then equals funcpeft's with
    `dropout_rng=torch.Generator().manual_seed(seed)`."""
    g = torch.Generator().manual_seed(seed)

    def shared_dropout(x: torch.Tensor) -> torch.Tensor:
        return x * torch.empty_like(x).bernoulli_(1 - p, generator=g) / (1 - p)

    for module in pm.modules():
        if isinstance(getattr(module, attr, None), nn.ModuleDict) and "default" in getattr(module, attr):
            getattr(module, attr)["default"].forward = shared_dropout


def assert_forward_and_merge_equal_peft(
    model: nn.Module, config_cls: str, kwargs: Mapping[str, Any], inputs: Mapping[str, Any], scale: float = 0.2
) -> None:
    """A random adapter (fresh + N(0, scale)) on `model`: outputs and gradients equal PEFT's
    (`assert_matches_peft_with`), and so does merging (`assert_merge_equals_peft`)."""
    fpm, pm = build_both(model, config_cls, kwargs)
    adapter = random_trees(fpm.adapter, 1, scale=scale)[0]
    assert_matches_peft_with(fpm, pm, adapter, inputs)
    assert_merge_equals_peft(fpm, pm, adapter, inputs)


def assert_merged_weights_bitwise_peft_s(fpm: Any, pm: Any, adapter: Any, names: Sequence[str]) -> None:
    """`adapter` (already copied into PEFT) merged into `fpm.base`: each weight in `names` keeps its dtype and is
    bitwise PEFT's merge_and_unload weight."""
    merged = funcpeft.merge(fpm, fpm.base, adapter)
    theirs = dict(pm.merge_and_unload().named_parameters())
    for name in names:
        assert merged[name].dtype == fpm.base[name].dtype == theirs[name].dtype, name
        assert torch.equal(merged[name], theirs[name]), name


def assert_full_dropout_drops_the_update(fpm: Any, x: torch.Tensor) -> None:
    """With the method's dropout at 1 and an update that is not zero, a training call gives the base output."""
    base_out = fpm.model(x)
    adapted = fpm.fn(fpm.base, fpm.adapter, x)
    trained = fpm.fn(fpm.base, fpm.adapter, x, dropout_rng=3)
    assert not torch.allclose(adapted, base_out)  # the update is not zero at init_weights=False
    torch.testing.assert_close(trained, base_out, atol=0, rtol=0)


# config rows (kwargs, exception, message) several methods refuse like PEFT, on models.build("MLP")
LAYERS_PATTERN_ROWS: list[tuple[dict[str, Any], type[Exception], str]] = [
    (
        dict(target_modules=["lin0"], layers_pattern="layers"),
        ValueError,
        "`layers_to_transform` must also be specified",
    ),
    (dict(target_modules="lin0", layers_to_transform=[0]), ValueError, "`layers_to_transform` cannot be used"),
]
N_FREQUENCY_ROWS: list[tuple[dict[str, Any], type[Exception], str]] = [  # FourierFT and WaveFT, lin0: 20 x 10
    (dict(n_frequency=0, target_modules=["lin0"]), ValueError, "`n_frequency` should be a positive integer value"),
    (
        dict(n_frequency=201, target_modules=["lin0"]),
        ValueError,
        "`n_frequency` should be less than or equal to the product",
    ),
    (
        dict(n_frequency_pattern={"lin0": 300}, n_frequency=10, target_modules=["lin0"]),
        ValueError,
        "value passed is 300 and the product is 200",
    ),
]


def files_equal_and_load_both_ways(
    fpm: Any, pm: Any, model: nn.Module, adapter: Any, tmp_path: Any, inputs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """`adapter` copied into PEFT; both libraries save it: the files hold the same keys and tensors (bitwise),
    and each library loads the other's file onto `model` with PEFT's logits (atol 1e-5). Returns funcpeft's file."""
    T.copy_into_peft(pm, adapter, fpm.plans["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpm.save_pretrained(tmp_path / "ours", adapter)
        pm.save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(os.path.join(tmp_path, d, "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = funcpeft.from_pretrained(model, tmp_path / "peft")
        peft_back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        want = pm(**inputs).logits
        torch.testing.assert_close(back.fn(back.base, back.adapter, **inputs).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(peft_back(**inputs).logits, want, atol=1e-5, rtol=0)
    return ours


def saved_and_reloaded_on_changed_weights(
    fpm: Any, model: nn.Module, tmp_path: Any, tails: Sequence[str], change: Any
) -> tuple[dict[str, torch.Tensor], list[str], Any, Any]:
    """Saves `fpm`'s fresh adapter to `tmp_path`, checks the file holds exactly `tails` under every adapted layer,
    then loads it with funcpeft and with PEFT onto a copy of `model` whose adapted weights are `change(weight)`
    (frozen tensors the file holds must come from it, the others from the changed weights).
    Returns (the file's tensors, the adapted paths, funcpeft's loaded model, PEFT's in eval mode)."""
    fpm.save_pretrained(tmp_path, fpm.adapter)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    paths = list(fpm.plans["default"])
    assert sorted(saved) == sorted(f"base_model.model.{p}.{t}" for p in paths for t in tails)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in paths:
            weight: Any = changed.get_submodule(p).weight
            weight.copy_(change(weight))
    back = funcpeft.from_pretrained(changed, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(changed), tmp_path).eval()
    return saved, paths, back, pm


def assert_spectrum_indices_frozen_and_unsaved(config_cls: str, leaf: str, tmp_path: Any) -> None:
    """FourierFT / WaveFT: the (2, n) int64 indices are frozen (in `base`, not counted), one tensor per layer shape,
    never saved (the file holds only the `leaf` spectra) and rebuilt from the seed on loading."""
    model = T.tiny_llama()
    config = getattr(funcpeft, config_cls)(n_frequency=20, target_modules=["q_proj", "k_proj"], random_loc_seed=11)
    fpm = funcpeft.get_peft_model(model, config)
    keys = {k for _, k in fpm.plans["default"]["model.layers.0.self_attn.q_proj"].frozen}
    assert all(not t.is_floating_point() for t in (fpm.base[k] for k in keys))  # int64 indices on the frozen side
    assert fpm.get_nb_trainable_parameters()[0] == 4 * 20  # the indices are not counted
    fpm.save_pretrained(tmp_path, fpm.adapter)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(saved) == sorted(f"base_model.model.{p}.{leaf}" for p in fpm.plans["default"])
    back = funcpeft.from_pretrained(model, tmp_path)
    for k in keys:
        assert torch.equal(back.base[k], fpm.base[k])
    # q_proj (64 x 64) and k_proj (32 x 64) have different shapes: different index tensors
    assert len({k for e in fpm.plans["default"].values() for _, k in e.frozen}) == 2


def _saved_bytes(fn: Any, xs: Sequence[torch.Tensor]) -> list[int]:
    """The sizes in bytes of the tensors autograd saves for backward when `fn(*xs)` runs."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*xs)
    return saved


def assert_memory_lean_function_is_autograd(
    f: Any, want: Any, xs: Sequence[torch.Tensor], vmapped: int = 3, frozen: Sequence[torch.Tensor] = ()
) -> None:
    """A method's hand-written autograd Function `f(*xs)` (saving less than autograd would, like PEFT's) keeps
    every transform: its values equal the plain expression `want(*xs)`; gradcheck, gradgradcheck and forward-mode
    gradcheck pass in float64; what it saves for backward is no more bytes than its inputs (plain autograd would
    also keep intermediates); and vmap over a stack of inputs (values and gradients) equals a loop.
    `xs`: float64 leaves that require grad; `frozen`: tensors `f` and `want` close over (an index pattern), which
    count as inputs too."""
    torch.testing.assert_close(f(*xs), want(*xs), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, xs)
    assert torch.autograd.gradgradcheck(f, xs)
    assert torch.autograd.gradcheck(f, xs, check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)
    inputs = sum(x.numel() * x.element_size() for x in (*xs, *frozen))
    for fn, bounded in ((f, True), (want, False)):  # the bound must hold for f and fail for plain autograd
        saved = _saved_bytes(fn, xs)
        assert (sum(saved) <= inputs) is bounded, f"saved for backward: {sorted(saved)} bytes, inputs {inputs} bytes"
    stacked = [torch.stack([x.detach() * (1 + i) for i in range(vmapped)]) for x in xs]
    torch.testing.assert_close(
        torch.func.vmap(f)(*stacked), torch.stack([f(*[s[i] for s in stacked]) for i in range(vmapped)])
    )
    argnums = tuple(range(len(xs)))
    grad = torch.func.grad(lambda *ys: f(*ys).pow(2).sum(), argnums=argnums)
    batched = torch.func.vmap(grad)(*stacked)
    for i in range(vmapped):
        for a, b in zip(batched, grad(*[s[i] for s in stacked])):
            torch.testing.assert_close(a[i], b)


def assert_bf16_model_equals_peft(config_cls: str, kwargs: Mapping[str, Any], autocast: bool) -> None:
    """On a bf16 tiny Llama, with `autocast_adapter_dtype=autocast` in both libraries: the fresh adapter is PEFT's
    (float32 leaves when autocast, else bf16) and the logits are bitwise equal."""
    fpm, pm = build_both(cast_model(T.tiny_llama(), torch.bfloat16), config_cls, kwargs, 0, autocast)
    assert_fresh_equals_peft(fpm, pm)
    assert {t.dtype for entry in fpm.adapter.values() for t in entry.values()} == {
        torch.float32 if autocast else torch.bfloat16
    }
    x = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, pm(**x).logits, atol=0, rtol=0)
