"""What the functional form adds: vmap over adapters, threads, explicit dropout RNG, training, compile."""

from __future__ import annotations

import copy
import threading
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import MODELS, WeightSum, assert_unchanged, in_threads, make_inputs, snapshot
from torch import nn

import funcpeft
from funcpeft import testing as T

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")


@pytest.fixture(scope="module")
def llama() -> tuple[Any, ...]:
    model = MODELS["llama"]()
    fn, base, adapter = funcpeft.get_peft_model(
        model, funcpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    adapters = [T.random_like(adapter, torch.Generator().manual_seed(s)) for s in range(4)]
    return model, fn, base, adapters


def _logits(fn: Any, base: Any, adapter: Any, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    return fn(base, adapter, input_ids=ids, **kw).logits


def test_vmap_over_stacked_adapters_equals_loop(llama: tuple[Any, ...]) -> None:
    _, fn, base, adapters = llama
    ids = make_inputs("llama")["input_ids"]
    with torch.no_grad():
        loop = torch.stack([_logits(fn, base, a, ids) for a in adapters])
        mapped = torch.func.vmap(lambda a: _logits(fn, base, a, ids))(funcpeft.stack_adapters(adapters))
    assert mapped.shape == loop.shape
    assert (mapped - loop).abs().max().item() <= 1e-5
    assert not torch.allclose(loop[0], loop[1])  # the adapters really differ


def test_concurrent_threads_equal_sequential(llama: tuple[Any, ...]) -> None:
    _, fn, base, adapters = llama
    inputs = [make_inputs("llama", seed=s)["input_ids"] for s in range(3)]
    with torch.no_grad():
        want = {(a, i): _logits(fn, base, adapters[a], ids) for a in range(4) for i, ids in enumerate(inputs)}
    got: dict[tuple[int, int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(a: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for rep in range(6):
                    for i, ids in enumerate(inputs):
                        got[(a, i, rep)] = _logits(fn, base, adapters[a], ids)
        except BaseException as e:  # noqa: B036 - re-raised in the main thread below
            errors.append(e)

    in_threads(4, work)
    assert not errors, errors
    assert len(got) == 4 * 3 * 6
    bad = [k for k, v in got.items() if not torch.equal(v, want[k[:2]])]
    assert not bad, f"{len(bad)} of {len(got)} concurrent calls differ from the sequential result"


# -- lora_dropout --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_dropout() -> tuple[Any, ...]:
    model = MODELS["mlp"]()
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, lora_dropout=0.5, target_modules=["lin0", "lin1"]))
    fn, base, fresh = fpm
    return model, fn, base, fresh, T.random_like(fresh, torch.Generator().manual_seed(3), scale=0.5)


def test_dropout_off_by_default(mlp_dropout: tuple[Any, ...]) -> None:
    _, fn, base, _, adapter = mlp_dropout
    x = make_inputs("mlp", batch=16)["x"]
    assert torch.equal(fn(base, adapter, x), fn(base, adapter, x))


@pytest.mark.parametrize("rng", ["int", "generator"])
def test_dropout_reproducible_given_rng_and_varies_with_it(mlp_dropout: tuple[Any, ...], rng: str) -> None:
    _, fn, base, _, adapter = mlp_dropout
    x = make_inputs("mlp", batch=16)["x"]

    def run(seed: int) -> torch.Tensor:
        return fn(base, adapter, x, dropout_rng=seed if rng == "int" else torch.Generator().manual_seed(seed))

    no_dropout = fn(base, adapter, x)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert not torch.allclose(run(0), no_dropout)


@pytest.mark.parametrize("rng", ["int", "generator"])
def test_dropout_under_vmap_randomness_different(mlp_dropout: tuple[Any, ...], rng: str) -> None:
    _, fn, base, _, adapter = mlp_dropout
    x = make_inputs("mlp", batch=16)["x"]
    stacked = funcpeft.stack_adapters([adapter] * 3)  # the same adapter three times

    def run(seed: int) -> torch.Tensor:
        dropout_rng = seed if rng == "int" else torch.Generator().manual_seed(seed)
        return torch.func.vmap(lambda a: fn(base, a, x, dropout_rng=dropout_rng), randomness="different")(stacked)

    out = run(0)
    assert out.shape == (3, 16, 4)
    assert not torch.equal(out[0], out[1]), "randomness='different' should give each adapter its own mask"
    assert torch.equal(out, run(0))
    assert not torch.equal(out, run(1))


def test_dropout_only_on_the_input_of_lora_a(mlp_dropout: tuple[Any, ...]) -> None:
    """PEFT: result = base(x) + B(A(dropout(x))) * s. With B = 0 the output is the base model's, exactly."""
    model, fn, base, fresh, _ = mlp_dropout
    assert all((e["lora_B"] == 0).all() for e in fresh.values())
    x = make_inputs("mlp", batch=16)["x"]
    with torch.no_grad():
        want = model(x)
        for seed in range(3):
            assert torch.equal(fn(base, fresh, x, dropout_rng=seed), want)


# -- training ------------------------------------------------------------------------------------------------
def test_adamw_training_loop_decreases_loss_and_leaves_model_untouched() -> None:
    model = MODELS["llama"]()
    before = snapshot(model)
    fn, base, adapter = funcpeft.get_peft_model(
        model, funcpeft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")
    )
    ids = make_inputs("llama", batch=4, seq=8)["input_ids"]
    opt = torch.optim.AdamW(optree.tree_leaves(adapter), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = fn(base, adapter, input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(not (e["lora_B"] == 0).all() for e in adapter.values()), "every lora_B should have been trained"
    assert_unchanged(model, before)


def test_torch_compile_fullgraph_matches_eager(llama: tuple[Any, ...]) -> None:
    _, fn, base, adapters = llama
    ids = make_inputs("llama")["input_ids"]
    torch._dynamo.reset()
    compiled = torch.compile(lambda b, a, x: fn(b, a, input_ids=x).logits, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(base, adapters[0], ids), _logits(fn, base, adapters[0], ids)
    assert (got - want).abs().max().item() <= 1e-5


# -- where the weight is read ------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["sum", "T"])
def test_a_parent_reading_the_weight_gets_the_plain_weight_like_peft(op: str) -> None:
    model = WeightSum(op).eval()
    fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["lin"]))
    adapter = T.random_like(adapter)
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["lin"])).eval()
    T.copy_into_peft(twin, adapter, fn.plans["default"])
    x = torch.randn(3, 8)
    torch.testing.assert_close(fn(base, adapter, x), twin(x), atol=0, rtol=0)  # PEFT's LoraLayer.weight is the base's


class _OwnOp(nn.Linear):
    """A Linear whose own forward uses its weight in an op that is not F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


@pytest.mark.parametrize("init", ["fresh", "random"])
def test_unhandled_weight_op_in_the_layers_own_forward_raises(init: str) -> None:
    model = nn.Sequential(_OwnOp(8, 4)).eval()
    fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["0"]))
    if init == "random":
        adapter = T.random_like(adapter)
    x = torch.randn(3, 8)
    model(x)  # the model itself runs
    with pytest.raises(funcpeft.UnsupportedWeightOp, match="was applied to an adapted layer weight"):
        fn(base, adapter, x)
