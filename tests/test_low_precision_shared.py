"""Methods with frozen tensors shared by their layers (`SharedTensors`: VeRA's, PVeRA's and RandLoRA's random
projections, UniLoRA's scales, FourierFT's / WaveFT's indices) or drawn per layer in float32 (TinyLoRA's P), on an
fp16 / bf16 tiny Llama, against PEFT 0.21.2 with and without `autocast_adapter_dtype`.

PEFT keeps these tensors in BufferDicts that each layer moves to its base weight's dtype and that autocasting
upcasts to float32 again, so their float32 draws are rounded to the model's dtype (`SharedTensors.layer_dtype`).
Every row is bitwise: funcpeft runs PEFT's arithmetic in PEFT's dtypes, so nothing is left to a tolerance.
FRoD (`layer_dtype=False`: PEFT's FRoD layer moves only its trainable tensors) is not a row: its frozen tensors
and files equal PEFT's on such a model, but its half-precision logits do not bitwise (up to 0.004 on this bf16
Llama; not from the shared tensors); test_method_frod.py checks bf16 to a tolerance.
"""

from __future__ import annotations

from typing import Any

import optree
import peft
import pytest
import torch
from helpers import cast_model, make_inputs
from method_checks import build_both, random_trees

from funcpeft import testing as T
from funcpeft._trees import SHARED_PREFIX
from funcpeft.io import checkpoint_state

_TARGETS = ["q_proj", "v_proj"]
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("VeraConfig", dict(r=4, target_modules=_TARGETS, save_projection=True)),
    ("PveraConfig", dict(r=4, target_modules=_TARGETS, save_projection=True)),
    ("RandLoraConfig", dict(r=8, target_modules=_TARGETS, save_projection=True)),
    ("UniLoraConfig", dict(r=4, target_modules=_TARGETS, theta_d_length=64, save_indices=True)),
    ("TinyLoraConfig", dict(target_modules=_TARGETS)),
    ("FourierFTConfig", dict(n_frequency=20, target_modules=_TARGETS)),
    ("WaveFTConfig", dict(n_frequency=20, target_modules=_TARGETS)),
]


def _ours_state(fpm: Any, tree: Any) -> dict[str, torch.Tensor]:
    """What funcpeft's save_pretrained writes for `tree` (frozen tensors from `fpm.base`), as PEFT's keys."""
    return checkpoint_state(tree, fpm.peft_config["default"], fpm.model, fpm.base, plan=fpm.plans["default"])


def _theirs_state(pm: Any, grads: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's `get_peft_model_state_dict`; with `grads`, each trainable parameter replaced by its gradient."""
    state = {n: (t.grad if grads and t.requires_grad else t.detach()) for n, t in pm.state_dict(keep_vars=True).items()}
    return peft.get_peft_model_state_dict(pm, state_dict=state)


def _assert_states_bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(ours) == sorted(theirs), (what, sorted(set(ours) ^ set(theirs)))
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype, (what, key, ours[key].dtype, t.dtype)
        assert torch.equal(ours[key], t), f"{what}: {key} differs from PEFT's"


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("config_cls", "kwargs"), ROWS, ids=[r[0] for r in ROWS])
def test_low_precision_model_equals_peft_bitwise(
    config_cls: str, kwargs: dict[str, Any], dtype: torch.dtype, autocast: bool
) -> None:
    """The saved state (fresh adapter and frozen projections: keys, dtypes, values), the frozen tensors' dtypes in
    `base`, and, for a random adapter loaded into PEFT, the logits and every gradient equal PEFT's bitwise."""
    fpm, pm = build_both(cast_model(T.tiny_llama(), dtype), config_cls, kwargs, 0, autocast)
    _assert_states_bitwise(_ours_state(fpm, fpm.adapter), _theirs_state(pm), "fresh state")
    floating = {t.dtype for k, t in fpm.base.items() if k.startswith(SHARED_PREFIX) and t.is_floating_point()}
    assert floating <= {torch.float32 if autocast else dtype}, floating

    adapter = random_trees(fpm.adapter, 1)[0]
    loaded: Any = peft.set_peft_model_state_dict(pm, _ours_state(fpm, adapter))
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    adapter = optree.tree_map(lambda t: t.detach().requires_grad_(True), adapter)
    x = make_inputs("llama")
    out = fpm.fn(fpm.base, adapter, **x).logits
    want = pm(**x).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out.float() * weights).sum().backward()
    (want.float() * weights).sum().backward()
    assert out.dtype == want.dtype and torch.equal(out, want), (out - want).abs().max()
    grads = optree.tree_map(lambda t: t.grad, adapter)
    _assert_states_bitwise(_ours_state(fpm, grads), _theirs_state(pm, grads=True), "gradients")
