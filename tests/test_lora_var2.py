"""LoRA options of PEFT 0.21.2 beyond plain LoRA: VeLoRA, MonteCLoRA, aLoRA, Arrow, layer_replication.

Differential against `peft`: training-mode outputs and every gradient (VeLoRA's compressed-activation backward,
MonteCLoRA's sampled lora_A with PEFT's sampler fed funcpeft's draws, and its variational loss), files both
ways, PEFT's merge refusals, Arrow's routed experts, layer_replication through the row harness. Their
eval-mode rows run in tests/test_contract.py and tests/test_peft_matrix.py.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import hypothesis.strategies as st
import peft
import pytest
import torch
from helpers import examples, msg_prefixed
from hypothesis import given, settings
from method_helpers import assert_same_state, quiet
from peft.utils import get_peft_model_state_dict
from peft_matrix import models
from peft_matrix.cases import Case
from peft_matrix.harness import PERTURB_SEED, RowMismatch, _loss, _peft_grads, _perturb, check_row
from safetensors.torch import load_file
from torch import nn

import funcpeft
import funcpeft.io
from funcpeft._replicate import PEFT_MERGE_ERROR
from funcpeft.methods import monteclora, velora

if TYPE_CHECKING:
    from peft.tuners.lora.monteclora import MontecloraSampler

X: dict[str, Any] = models.inputs("MLP")  # typed Any: passed as **kwargs next to velora_update's own options
# another batch (batch_average_once keeps the first one's)
X2: dict[str, Any] = {"X": torch.arange(90).flip(0).view(9, 10) % 13}


def _mlp() -> nn.Module:
    model = models.build("MLP")
    # the model's own dropout would draw from different streams in PEFT and funcpeft
    cast(nn.Dropout, model.get_submodule("drop")).p = 0.0
    return model


def _pair(model: nn.Module, make: Callable[[Any], Any], tmp: str) -> tuple[Any, Any]:
    """PEFT's model with values moved off the init and funcpeft's from PEFT's files (trainable)."""
    torch.manual_seed(0)
    pm = quiet(peft.get_peft_model, copy.deepcopy(model), make(peft))
    _perturb(pm, PERTURB_SEED)
    quiet(pm.save_pretrained, tmp)
    fpm = quiet(funcpeft.from_pretrained, copy.deepcopy(model), tmp, is_trainable=True)
    return pm, fpm


def _our_grads(fpm: Any, x: Mapping[str, Any], base: Any = None, **call: Any) -> dict[str, torch.Tensor]:
    base = fpm.base if base is None else base
    _, tree = funcpeft.value_and_grad(lambda a: _loss(fpm.fn(base, a, **x, **call)))(fpm.adapter)
    return dict(funcpeft.io.checkpoint_state(tree, fpm.peft_config["default"], fpm.model, base_params=base))


def _same_grads(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], frozen: tuple[str, ...]) -> None:
    """Every trainable checkpoint key's gradient (frozen buffers, which both states carry as values, left out)."""
    keys = {k for k in want if not any(k.endswith(f".{n}") for n in frozen)}
    assert keys == {k for k in got if not any(k.endswith(f".{n}") for n in frozen)}, (sorted(got), sorted(want))
    assert keys, "no gradients compared"
    for k in sorted(keys):
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=msg_prefixed(k))


# -- VeLoRA ---------------------------------------------------------------------------------------------------
def _velora(init_type: str, num_groups: int = 3) -> Callable[[Any], Any]:
    return lambda lib: lib.LoraConfig(
        target_modules=["lin0", "lin1"],
        lora_dropout=0.0,
        velora_config=lib.VeloraConfig(num_groups=num_groups, init_type=init_type, scale=0.7),
    )


def _peft_embeds(pm: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model.").removesuffix(".lora_velora_embed.default"): b.detach().clone()
        for n, b in pm.named_buffers()
        if "lora_velora_embed" in n
    }


def _our_embeds(fpm: Any, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from funcpeft._trees import layer_frozen_key

    return {p: base[layer_frozen_key("default", p, velora.EMBED)] for p in ("lin0", "lin1")}


@pytest.mark.parametrize("init_type", ["random", "batch_average", "batch_average_once"])
def test_velora_training_matches_peft(init_type: str, tmp_path: Any) -> None:
    """A training call: PEFT's VeloraFunction gradients (the compressed-activation approximation, not autograd's)."""
    pm, fpm = _pair(_mlp(), _velora(init_type), os.fspath(tmp_path / "peft"))
    torch.testing.assert_close(_our_embeds(fpm, fpm.base), _peft_embeds(pm), atol=0, rtol=0)
    pm.train()
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **X, dropout_rng=0), pm(**X), atol=1e-6, rtol=1e-6)
    want = _peft_grads(pm, ["default"], X)["default"]
    got = _our_grads(fpm, X, dropout_rng=0)
    _same_grads(got, want, (velora.EMBED,))
    exact = _our_grads(fpm, X)  # an eval call: plain LoRA, autograd's exact gradient
    assert not torch.allclose(exact["base_model.model.lin0.lora_A.weight"], got["base_model.model.lin0.lora_A.weight"])
    torch.testing.assert_close(exact["base_model.model.lin0.lora_B.weight"], got["base_model.model.lin0.lora_B.weight"])

    # what PEFT's layers stored in that step, and the next step (batch_average_once keeps the first batch's)
    base = funcpeft.velora_update(fpm, fpm.base, fpm.adapter, **X, dropout_rng=0)
    torch.testing.assert_close(_our_embeds(fpm, base), _peft_embeds(pm), atol=1e-7, rtol=1e-6)
    want2 = _peft_grads(pm, ["default"], X2)["default"]
    _same_grads(_our_grads(fpm, X2, base, dropout_rng=1), want2, (velora.EMBED,))
    base = funcpeft.velora_update(fpm, base, fpm.adapter, **X2, dropout_rng=1)  # batch_average_once: unchanged
    torch.testing.assert_close(_our_embeds(fpm, base), _peft_embeds(pm), atol=1e-7, rtol=1e-6)

    # files after training steps hold the stored projection, PEFT's both ways
    ours, theirs = os.fspath(tmp_path / "ours"), os.fspath(tmp_path / "theirs")
    quiet(pm.save_pretrained, theirs)
    fpm.save_pretrained(ours, fpm.adapter, base_params=base)
    a, b = load_file(f"{ours}/adapter_model.safetensors"), load_file(f"{theirs}/adapter_model.safetensors")
    assert set(a) == set(b) and any(k.endswith(velora.EMBED) for k in a)
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=1e-6, msg=msg_prefixed(k))
    back = quiet(funcpeft.from_pretrained, _mlp(), ours)
    torch.testing.assert_close(_our_embeds(back, back.base), _peft_embeds(pm), atol=1e-7, rtol=1e-6)


def test_velora_batch_average_once_after_loading(tmp_path: Any) -> None:
    """PEFT recomputes a loaded "batch_average_once" projection in its first training forward (in-memory state):
    `velora_update(..., first_step=True)` does the same; without it the stored projection is kept."""
    pm, fpm = _pair(_mlp(), _velora("batch_average_once"), os.fspath(tmp_path / "fresh"))
    pm.train()
    _peft_grads(pm, ["default"], X)  # one training step: PEFT stores X's projection
    trained = os.fspath(tmp_path / "trained")
    quiet(pm.save_pretrained, trained)
    stored = _peft_embeds(pm)
    back = quiet(peft.PeftModel.from_pretrained, _mlp(), trained, is_trainable=True).train()
    fpm = quiet(funcpeft.from_pretrained, _mlp(), trained, is_trainable=True)
    torch.testing.assert_close(_our_embeds(fpm, fpm.base), stored, atol=0, rtol=0)
    kept = funcpeft.velora_update(fpm, fpm.base, fpm.adapter, **X2, dropout_rng=0)
    torch.testing.assert_close(_our_embeds(fpm, kept), stored, atol=0, rtol=0)
    base = funcpeft.velora_update(fpm, fpm.base, fpm.adapter, **X2, dropout_rng=0, first_step=True)
    want = _peft_grads(back, ["default"], X2)["default"]
    assert not torch.allclose(_peft_embeds(back)["lin0"], stored["lin0"]), "PEFT kept the loaded projection"
    torch.testing.assert_close(_our_embeds(fpm, base), _peft_embeds(back), atol=1e-7, rtol=1e-6)
    _same_grads(_our_grads(fpm, X2, base, dropout_rng=0), want, (velora.EMBED,))


def test_velora_random_projection_draws_from_the_generator() -> None:
    """init_type="random": the projection is a unit vector drawn from get_peft_model's generator (reproducible)."""

    def draw(seed: int) -> dict[str, torch.Tensor]:
        fpm = funcpeft.get_peft_model(
            _mlp(), _velora("random")(funcpeft), generator=torch.Generator().manual_seed(seed)
        )
        return _our_embeds(fpm, fpm.base)

    first, again, other = draw(0), draw(0), draw(1)
    for p in first:
        torch.testing.assert_close(first[p], again[p], atol=0, rtol=0)
        assert not torch.equal(first[p], other[p])
        torch.testing.assert_close(torch.linalg.vector_norm(first[p]), torch.tensor(1.0))


# -- MonteCLoRA -----------------------------------------------------------------------------------------------
def _monteclora(lib: Any) -> Any:
    return lib.LoraConfig(
        target_modules=["lin0", "lin1"],
        r=3,
        lora_dropout=0.0,
        monteclora_config=lib.MontecloraConfig(num_samples=4, buffer_size=1, use_entropy=True),
    )


def _feed_peft_sampler(pm: nn.Module, fpm: Any, seed: int) -> None:
    """Give PEFT's samplers the sample sets funcpeft's call with dropout_rng=Generator(seed) draws (plan order)."""
    g = torch.Generator().manual_seed(seed)
    for path, entry in fpm.plans["default"].items():
        if entry.spec is None:
            continue
        params = {**fpm.adapter[path]}
        samples = monteclora.draw_samples(entry.spec, params, lambda device: g)
        owner = cast("MontecloraSampler", pm.get_submodule(f"base_model.model.{path}.lora_monteclora_sampler.default"))
        sampler = owner.sampler
        sampler.buffer, sampler.buffer_size, sampler.index = [{k: v.clone() for k, v in samples.items()}], 1, 0


def test_monteclora_training_matches_peft(tmp_path: Any) -> None:
    """A training call's output, every gradient, and PEFT's variational loss (`_get_monteclora_loss`)."""
    pm, fpm = _pair(_mlp(), _monteclora, os.fspath(tmp_path))
    pm.train()
    _feed_peft_sampler(pm, fpm, 5)
    with torch.no_grad():
        want = pm(**X)
    got = fpm.fn(fpm.base, fpm.adapter, **X, dropout_rng=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, fpm.fn(fpm.base, fpm.adapter, **X), atol=1e-4), "the samples change lora_A"

    _feed_peft_sampler(pm, fpm, 5)
    want_grads = _peft_grads(pm, ["default"], X)["default"]
    got_grads = _our_grads(fpm, X, dropout_rng=torch.Generator().manual_seed(5))
    _same_grads(got_grads, want_grads, (monteclora.GAUSSIAN_VAR, monteclora.EXPERT_WEIGHTS))

    # the variational loss after that training forward, and its gradients
    _feed_peft_sampler(pm, fpm, 5)
    pm.zero_grad(set_to_none=True)
    pm(**X)
    peft_loss = pm.base_model._get_monteclora_loss()
    peft_loss.backward()
    loss, tree = funcpeft.value_and_grad(
        lambda a: funcpeft.monteclora_loss(fpm, a, dropout_rng=torch.Generator().manual_seed(5))
    )(fpm.adapter)
    torch.testing.assert_close(loss, peft_loss.detach(), atol=1e-5, rtol=1e-5)
    for path in ("lin0", "lin1"):
        sampler = pm.get_submodule(f"base_model.model.{path}").lora_monteclora_sampler["default"]
        for ours, theirs in ((monteclora.STD, sampler.std_prior), (monteclora.EXPERT, sampler.expert_weights_prior)):
            torch.testing.assert_close(tree[path][ours], theirs.grad, atol=1e-5, rtol=1e-5)
    assert float(funcpeft.monteclora_loss(fpm, fpm.adapter)) == 0.0  # an eval call: PEFT's loss is 0


def test_monteclora_files_hold_the_sampler_buffers(tmp_path: Any) -> None:
    """get_peft_model's fresh buffers are PEFT's (identity, 1/N) and are written to / read from the files."""
    fpm = funcpeft.get_peft_model(_mlp(), _monteclora(funcpeft))
    out = os.fspath(tmp_path / "ours")
    fpm.save_pretrained(out, fpm.adapter)
    state = load_file(f"{out}/adapter_model.safetensors")
    torch.manual_seed(0)
    pm = quiet(peft.get_peft_model, _mlp(), _monteclora(peft))
    theirs = get_peft_model_state_dict(pm)
    assert set(state) == set(theirs)
    for k in (f"base_model.model.lin0.{monteclora.GAUSSIAN_VAR}", f"base_model.model.lin1.{monteclora.EXPERT_WEIGHTS}"):
        torch.testing.assert_close(state[k], theirs[k], atol=0, rtol=0)
    back = quiet(peft.PeftModel.from_pretrained, _mlp(), out)  # PEFT loads funcpeft's files
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(**X), fpm.fn(fpm.base, fpm.adapter, **X))


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("variant", ["velora", "monteclora"])
def test_fresh_state_and_buffer_dtypes_are_peft_s(variant: str, autocast: bool) -> None:
    """A bfloat16 model: the fresh file state has PEFT's keys, shapes and dtypes, and PEFT's buffer values (PEFT
    keeps the buffers in the base weight's dtype; autocast_adapter_dtype casts only parameters)."""
    make = {
        "velora": _velora("batch_average"),  # a zero projection: "random" draws it after all layers' params
        # one layer: PEFT's sampler also fills its sample buffer from the global RNG at init, funcpeft does not
        "monteclora": lambda lib: lib.LoraConfig(
            target_modules=["lin0"], monteclora_config=lib.MontecloraConfig(num_samples=3)
        ),
    }[variant]
    model = models.build("MLP", dtype=torch.bfloat16)
    configs = [make(lib) for lib in (funcpeft, peft)]
    torch.manual_seed(0)
    fpm = quiet(funcpeft.get_peft_model, copy.deepcopy(model), configs[0], autocast_adapter_dtype=autocast)
    ours = funcpeft.io.checkpoint_state(fpm.adapter, fpm.peft_config["default"], fpm.model, base_params=fpm.base)
    torch.manual_seed(0)
    pm = quiet(peft.get_peft_model, copy.deepcopy(model), configs[1], autocast_adapter_dtype=autocast)
    theirs = {k: v.detach() for k, v in get_peft_model_state_dict(pm).items()}
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert (ours[k].dtype, ours[k].shape) == (v.dtype, v.shape), (k, ours[k].dtype, v.dtype)
    buffers = [k for k in theirs if k.endswith((velora.EMBED, monteclora.GAUSSIAN_VAR, monteclora.EXPERT_WEIGHTS))]
    assert buffers
    assert_same_state({k: ours[k] for k in buffers}, {k: theirs[k] for k in buffers})


# -- aLoRA ----------------------------------------------------------------------------------------------------
def _alora(lib: Any) -> Any:
    return lib.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[48, 65], task_type="CAUSAL_LM"
    )


def test_alora_explicit_offsets_and_gradients_match_peft(tmp_path: Any) -> None:
    """`alora_offsets=` (PEFT's special forward argument) is consumed, never passed to the model."""
    model = models.build("tiny-llama")
    x = models.inputs("tiny-llama")
    pm, fpm = _pair(model, _alora, os.fspath(tmp_path))
    pm.eval()
    for offsets in ([3, None], [7, 1], [None, None]):
        with torch.no_grad():
            want = pm(**x, alora_offsets=offsets).logits
        got = fpm.fn(fpm.base, fpm.adapter, **x, alora_offsets=offsets).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pm.zero_grad(set_to_none=True)
    _loss(pm(**x, alora_offsets=[3, 5]).logits).backward()
    _, tree = funcpeft.value_and_grad(lambda a: _loss(fpm.fn(fpm.base, a, **x, alora_offsets=[3, 5]).logits))(
        fpm.adapter
    )
    for path, leaves in tree.items():
        for name, g in leaves.items():
            theirs = pm.get_submodule(f"base_model.model.{path}.{name}")["default"].weight.grad
            torch.testing.assert_close(g, theirs, atol=1e-5, rtol=1e-5)
    # no invocation in row 1: its output is the base model's
    with torch.no_grad():
        plain = model(**x).logits
    torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits[1], plain[1], atol=1e-6, rtol=0)
    assert not torch.allclose(fpm.fn(fpm.base, fpm.adapter, **x).logits[0], plain[0], atol=1e-4)


def test_alora_offsets_helper() -> None:
    ids = torch.tensor([[5, 48, 65, 1, 48, 65, 2], [1, 2, 3, 4, 5, 6, 7], [48, 65, 9, 9, 9, 9, 48]])
    assert funcpeft.alora_offsets(ids, [48, 65]).tolist() == [3, 0, 7]


def _merge_error(pm: peft.PeftModel) -> BaseException:
    try:
        pm.merge_and_unload()
    except Exception as e:  # noqa: BLE001 - the exception PEFT raises is the expectation
        return e
    raise AssertionError("PEFT merged")


def test_alora_merge_is_refused_like_peft(tmp_path: Any) -> None:
    pm, fpm = _pair(models.build("tiny-llama"), _alora, os.fspath(tmp_path))
    err = _merge_error(pm)
    with pytest.raises(type(err), match=re.escape(str(err))):
        funcpeft.merge_and_unload(fpm, fpm.adapter)


# -- Arrow ----------------------------------------------------------------------------------------------------
def _experts(tmp: str, n: int, seed: int) -> list[str]:
    """`n` trained-looking LoRA experts on lin0 / lin1, saved by PEFT."""
    paths = []
    for i in range(n):
        torch.manual_seed(seed + i)
        pm = quiet(peft.get_peft_model, _mlp(), peft.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
        _perturb(pm, seed + 100 + i)
        paths.append(os.path.join(tmp, f"expert{seed}_{i}"))
        quiet(pm.save_pretrained, paths[-1])
    return paths


@pytest.mark.parametrize("use_gks", [False, True])
def test_arrow_matches_peft(use_gks: bool, tmp_path: Any) -> None:
    """create_arrow_model vs PEFT's: outputs and the gradients of every task expert (the router's own lora_A /
    lora_B are unused). With GenKnowSub, PEFT subtracts the general experts once, in place: its general experts
    get no gradient, funcpeft's (a pure function of them) do, so only task experts' gradients are compared."""
    tasks = _experts(os.fspath(tmp_path), 3, 0)
    general = _experts(os.fspath(tmp_path), 2, 10) if use_gks else None
    kwargs: dict[str, Any] = dict(top_k=2, router_temperature=0.7, use_gks=use_gks, rng_seed=3)
    pm = quiet(peft.create_arrow_model, _mlp(), tasks, peft.ArrowConfig(**kwargs), general, is_trainable=True)
    fpm = quiet(funcpeft.create_arrow_model, _mlp(), tasks, funcpeft.ArrowConfig(**kwargs), general, is_trainable=True)
    fn, base, adapters = fpm
    assert set(adapters) == {"arrow_router", "task_0", "task_1", "task_2", *(["gks_0", "gks_1"] if use_gks else [])}
    pm.eval()
    for p in pm.parameters():
        p.requires_grad_(True)
    out = pm(**X)
    _loss(out).backward()
    got = fn(base, adapters, **X)
    torch.testing.assert_close(got, out.detach(), atol=1e-5, rtol=1e-5)
    _, grads = funcpeft.value_and_grad(lambda a: _loss(fn(base, a, **X)))(adapters)
    for name in ("task_0", "task_1", "task_2"):
        for path in ("lin0", "lin1"):
            for leaf in ("lora_A", "lora_B"):
                theirs = pm.get_submodule(f"base_model.model.{path}.{leaf}")[name].weight.grad
                torch.testing.assert_close(grads[name][path][leaf], theirs, atol=1e-5, rtol=1e-5)
    assert all(float(g.abs().sum()) == 0 for g in grads["arrow_router"]["lin0"].values())
    # routing: with top_k=1 the output differs (a different mixture), so the expert choice is exercised
    single = quiet(funcpeft.create_arrow_model, _mlp(), tasks, funcpeft.ArrowConfig(**{**kwargs, "top_k": 1}), general)
    assert not torch.allclose(single.fn(single.base, single.adapter, **X), got, atol=1e-4)


def test_arrow_merge_is_refused_like_peft(tmp_path: Any) -> None:
    tasks = _experts(os.fspath(tmp_path), 2, 0)
    pm = quiet(peft.create_arrow_model, _mlp(), tasks, peft.ArrowConfig(top_k=1, rng_seed=0))
    fpm = quiet(funcpeft.create_arrow_model, _mlp(), tasks, funcpeft.ArrowConfig(top_k=1, rng_seed=0))
    err = _merge_error(pm)
    with pytest.raises(type(err), match=re.escape(str(err))):
        funcpeft.merge_and_unload(fpm, fpm.adapter)


def test_arrow_needs_its_experts_in_the_call(tmp_path: Any) -> None:
    fpm = quiet(funcpeft.create_arrow_model, _mlp(), _experts(os.fspath(tmp_path), 2, 0), funcpeft.ArrowConfig(top_k=1))
    with pytest.raises(ValueError, match="reads adapter 'task_1'"):
        fpm.fn(fpm.base, {"arrow_router": fpm.adapter["arrow_router"], "task_0": fpm.adapter["task_0"]}, **X)


# -- layer_replication ----------------------------------------------------------------------------------------
LAYER_MAP = [[0, 2], [1, 2]]  # tiny-llama's 2 decoder layers -> [0, 1, 1]


def test_layer_replication_matches_peft(tmp_path: Any) -> None:
    """Outputs, every gradient, counts, files both ways. Merging: funcpeft raises the error PEFT means to raise
    (`LoraModel._check_merge_allowed`), while PEFT's check reads `peft_config.get("layer_replication")` on its
    {adapter name: config} dict, never fires, and merges wrongly (see the next test): the only failing check."""
    case = Case(
        "layer_replication",
        "tiny-llama",
        "LoraConfig",
        {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "layer_replication": LAYER_MAP},
    )
    with pytest.raises(RowMismatch) as info:
        check_row(case, tmp_path)
    assert info.value.failed_checks == ["merge"], info.value
    assert PEFT_MERGE_ERROR in str(info.value)


def test_layer_replication_shares_weights_and_never_mutates_the_model(tmp_path: Any) -> None:
    model = models.build("tiny-llama")
    x = models.inputs("tiny-llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    config = {"r": 4, "target_modules": ["q_proj"], "layer_replication": LAYER_MAP}
    pm, fpm = _pair(model, lambda lib: lib.LoraConfig(**config), os.fspath(tmp_path))
    layers = [cast(nn.ModuleList, m.get_submodule("model.layers")) for m in (model, fpm.model)]
    assert len(layers[0]) == 2 and len(layers[1]) == 3
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the clone's weight is the original layer's tensor; each position has its own adapter
    assert fpm.model.model.layers[2].self_attn.q_proj.weight is fpm.model.model.layers[1].self_attn.q_proj.weight
    assert {"model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"} <= set(fpm.adapter)
    # PEFT merges both positions' deltas into the one shared weight: its merged model is wrong
    pm.eval()
    with torch.no_grad():
        want = pm(**x).logits
        merged = quiet(copy.deepcopy(pm).merge_and_unload)(**x).logits
    assert not torch.allclose(merged, want, atol=1e-3), "PEFT's replicated merge is right now: compare merges"
    with pytest.raises(ValueError, match=PEFT_MERGE_ERROR):
        funcpeft.merge_and_unload(fpm, fpm.adapter)
    with pytest.raises(NotImplementedError, match="layer_replication on an added adapter"):
        fpm.add_adapter("other", funcpeft.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=LAYER_MAP))


# -- laws -----------------------------------------------------------------------------------------------------
_LLAMA = models.build("tiny-llama")
_ALORA_PM = funcpeft.get_peft_model(_LLAMA, _alora(funcpeft), generator=torch.Generator().manual_seed(0))


@settings(max_examples=examples(12), deadline=None)
@given(o0=st.integers(0, 7), o1=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_alora_tokens_before_the_invocation_are_the_base_model_s(o0: int, o1: int, seed: int) -> None:
    """aLoRA's promise: in a causal LM every token before the invocation start sees only unadapted tokens, so its
    logits are the base model's (the KV cache can be shared); from the start on the adapter acts."""
    fn, base, fresh = _ALORA_PM
    tree = {
        p: {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)) for k, v in e.items()}
        for p, e in fresh.items()
    }
    x = models.inputs("tiny-llama", seed)
    with torch.no_grad():
        plain = _LLAMA(**x).logits
        out = fn(base, tree, **x, alora_offsets=[o0, o1]).logits
    t = x["input_ids"].shape[1]
    for row, o in enumerate((o0, o1)):
        torch.testing.assert_close(out[row, : t - o], plain[row, : t - o], atol=1e-5, rtol=0)
        if o:
            assert not torch.allclose(out[row, t - o :], plain[row, t - o :], atol=1e-4)


@settings(max_examples=examples(10), deadline=None)
@given(groups=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_velora_changes_only_lora_a_s_gradient(groups: int, seed: int) -> None:
    """VeLoRA's training forward is LoRA's; only lora_A's gradient is approximated (input and lora_B exact).
    With one feature per group (num_groups >= in) each sub-token is its own projection, so lora_A's gradient is
    exactly `scale` times autograd's; with wider groups it is not."""
    model = _mlp()
    g = torch.Generator().manual_seed(seed)
    fpm = funcpeft.get_peft_model(model, _velora("batch_average", groups)(funcpeft), generator=g)
    tree = {p: {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in e.items()} for p, e in fresh_items(fpm)}
    x = {"X": torch.randn(5, 10, generator=g)}

    def loss(a: Any, inp: torch.Tensor, **call: Any) -> torch.Tensor:
        return _loss(fpm.fn(fpm.base, a, X=inp, **call))

    train = torch.func.grad(loss, argnums=(0, 1))(tree, x["X"], dropout_rng=0)
    exact = torch.func.grad(loss, argnums=(0, 1))(tree, x["X"])
    torch.testing.assert_close(train[1], exact[1], atol=1e-5, rtol=1e-5)
    for path in tree:
        torch.testing.assert_close(train[0][path]["lora_B"], exact[0][path]["lora_B"], atol=1e-5, rtol=1e-5)
    scaled = 0.7 * exact[0]["lin0"]["lora_A"]  # lin0 has in = 10 features; _velora's scale is 0.7
    if groups >= 10:
        torch.testing.assert_close(train[0]["lin0"]["lora_A"], scaled, atol=1e-5, rtol=1e-4)
    else:
        assert not torch.allclose(train[0]["lin0"]["lora_A"], scaled, atol=1e-4, rtol=1e-3)


def fresh_items(fpm: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    return [(p, dict(e)) for p, e in fpm.adapter.items()]


@settings(max_examples=examples(8), deadline=None)
@given(seed=st.integers(0, 2**16))
def test_monteclora_training_calls_are_reproducible_and_sampled(seed: int) -> None:
    """The same seed gives the same training output (no hidden sampler state), another seed another one, and an
    eval call is plain LoRA on the same lora_A / lora_B."""
    fpm = funcpeft.get_peft_model(_mlp(), _monteclora(funcpeft), generator=torch.Generator().manual_seed(seed))
    lora = funcpeft.get_peft_model(_mlp(), funcpeft.LoraConfig(target_modules=["lin0", "lin1"], r=3))
    tree = {p: {k: v + 0.2 for k, v in e.items()} for p, e in fpm.adapter.items()}
    with torch.no_grad():
        a, b = (fpm.fn(fpm.base, tree, **X, dropout_rng=seed) for _ in range(2))
        other = fpm.fn(fpm.base, tree, **X, dropout_rng=seed + 1)
        plain = lora.fn(lora.base, {p: {k: e[k] for k in ("lora_A", "lora_B")} for p, e in tree.items()}, **X)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not torch.allclose(a, other, atol=1e-5)
        torch.testing.assert_close(fpm.fn(fpm.base, tree, **X), plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "variant",
    [
        {"velora_config": {"num_groups": 2}},
        {"monteclora_config": {"num_samples": 2}},
        {"alora_invocation_tokens": [1], "task_type": "CAUSAL_LM"},
    ],
    ids=["velora", "monteclora", "alora"],
)
@pytest.mark.parametrize(
    ("option", "what"), [({"lora_bias": True}, "lora_bias"), ({"init_lora_weights": "pissa"}, "init_lora_weights")]
)
def test_variant_options_they_cannot_carry_are_refused(
    variant: dict[str, Any], option: dict[str, Any], what: str
) -> None:
    """A LoRA variant layer has no lora_B bias and no weight-changing init: refused, never silently dropped."""
    model = nn.Sequential(nn.Linear(8, 8))
    config = funcpeft.LoraConfig(r=2, target_modules=["0"], **variant, **option)
    with pytest.raises(NotImplementedError, match=what):
        funcpeft.get_peft_model(model, config)
