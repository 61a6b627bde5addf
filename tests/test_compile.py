"""torch.compile(fullgraph=True) on fn and on a whole training step: no graph break, equal to eager, and no
recompile when only the adapter's values change. Compiles are slow on small CPUs: few, tiny, counted."""

from __future__ import annotations

import warnings
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from helpers import MODELS, make_inputs
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import funcpeft
from funcpeft import optim
from funcpeft import testing as T
from funcpeft.grad import value_and_grad

pytestmark = pytest.mark.slow  # `make test-fast` skips this file (CONTRIBUTING.md)


def _setup(kind: str, targets: Any = "all-linear") -> tuple[Any, Any, list[Any], torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: fan_in_fan_out forced for Conv1D
        fn, base, fresh = funcpeft.get_peft_model(MODELS[kind](), funcpeft.LoraConfig(r=4, target_modules=targets))
    trees = [
        optree.tree_map(torch.Tensor.detach, T.random_like(fresh, torch.Generator().manual_seed(s))) for s in range(3)
    ]
    ids = make_inputs(kind, batch=2, seq=8)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return fn, base, trees, ids, mask


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fn_compiles_to_one_graph_and_new_adapter_values_do_not_recompile(kind: str) -> None:
    fn, base, trees, ids, mask = _setup(kind)
    torch._dynamo.reset()
    counter = CompileCounter()  # traces with dynamo, runs the captured graph eagerly: cheap
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        for tree in trees:
            got = compiled(base, tree, input_ids=ids, attention_mask=mask).logits
            want = fn(base, tree, input_ids=ids, attention_mask=mask).logits
            assert (got - want).abs().max().item() <= 1e-5
        assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 3 adapters of one structure"
        assert counter.op_count > 0
        compiled(base, {k: dict(v) for k, v in trees[0].items()}, input_ids=ids, attention_mask=mask)  # a rebuilt tree
    assert counter.frame_count == 1


def test_per_example_routing_compiles_once_for_any_index() -> None:
    fn, base, trees, _, _ = _setup("llama")
    ids, mask = make_inputs("llama", batch=4, seq=8)["input_ids"], torch.ones(4, 8, dtype=torch.long)
    mask[1, :3] = 0
    stacked = funcpeft.stack_adapters(trees)
    torch._dynamo.reset()
    counter = CompileCounter()

    def routed(s: Any, index: torch.Tensor) -> torch.Tensor:
        return fn(base, funcpeft.per_example(s, index), input_ids=ids, attention_mask=mask).logits

    compiled = torch.compile(routed, fullgraph=True, backend=counter)
    with torch.no_grad():
        for index in ([0, 1, 2, -1], [2, 2, 0, 1], [-1, -1, -1, -1]):
            got, want = compiled(stacked, torch.tensor(index)), routed(stacked, torch.tensor(index))
            assert (got - want).abs().max().item() <= 1e-5
    assert counter.frame_count == 1


def _lm_loss(fn: Any, base: Any, adapter: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # the loss from logits: transformers' own `labels=` loss logs a warning under dynamo for GPT-2 (a graph break)
    logits = fn(base, adapter, input_ids=ids, attention_mask=mask).logits[:, :-1]
    tok = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    keep = mask[:, 1:].to(tok.dtype)
    return (tok * keep).sum() / keep.sum()


@pytest.mark.parametrize(
    "kind,backend,targets",
    [
        ("llama", "inductor", ["q_proj", "v_proj"]),  # the one real (slow) inductor compile: few leaves
        ("gpt2", "aot_eager", "all-linear"),
    ],
)
def test_compiled_training_step_equals_eager_without_recompiling(kind: str, backend: str, targets: Any) -> None:
    fn, base, trees, ids, mask = _setup(kind, targets)
    opt = optim.adamw(1e-2)

    def step(adapter: Any, state: Any) -> tuple[torch.Tensor, Any, Any]:
        loss, grads = value_and_grad(lambda a: _lm_loss(fn, base, a, ids, mask))(adapter)
        updates, state = opt.update(grads, state, adapter)
        return loss, optim.apply_updates(adapter, updates), state

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    ours = theirs = trees[0]
    s_ours = s_theirs = opt.init(trees[0])
    for _ in range(3):  # the step count and every adapter value change between calls
        loss_c, ours, s_ours = compiled(ours, s_ours)
        loss_e, theirs, s_theirs = step(theirs, s_theirs)
        assert abs(loss_c.item() - loss_e.item()) <= 1e-5
    T.assert_trees_close(ours, theirs, atol=1e-4)  # Adam: see test_optim's trajectory note
    assert counter.frame_count == 1
    assert int(s_ours.step) == 3
