"""Data-parallel adapter training over 2 gloo processes equals one process on the full batch, and only the
adapter's gradients cross the wire."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import funcpeft
from funcpeft import distributed as D
from funcpeft import optim
from funcpeft import testing as T
from funcpeft.grad import value_and_grad

pytestmark = pytest.mark.slow  # `make test-fast` skips this file (CONTRIBUTING.md)

WORLD, STEPS, BATCH = 2, 2, 4


def _setup() -> tuple[Any, Any, Any, torch.Tensor]:
    """Identical on every rank: the seeded model, a random adapter, the full batch."""
    fn, base, fresh = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.LoraConfig(r=4, target_modules="all-linear"))
    adapter = optree.tree_map(torch.Tensor.detach, T.random_like(fresh, torch.Generator().manual_seed(0)))
    ids = torch.randint(1, T.VOCAB, (BATCH, 8), generator=torch.Generator().manual_seed(1))
    return fn, base, adapter, ids


def _train(fn: Any, base: Any, adapter: Any, ids: torch.Tensor, reduce: Any = None) -> Any:
    opt = optim.sgd(0.5, momentum=0.9)  # scale-sensitive (unlike Adam): a sum instead of a mean would show
    state = opt.init(adapter)
    for _ in range(STEPS):
        _, grads = value_and_grad(lambda a: fn(base, a, input_ids=ids, labels=ids).loss)(adapter)
        if reduce is not None:
            grads = reduce(grads)
        updates, state = opt.update(grads, state, adapter)
        adapter = optim.apply_updates(adapter, updates)
    return adapter


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        fn, base, adapter, ids = _setup()
        if rank == 1:  # a different start on rank 1: broadcast_adapter must fix it
            adapter = optree.tree_map(torch.zeros_like, adapter)
        adapter = D.broadcast_adapter(adapter, src=0)
        sent: list[int] = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            sent.append(tensor.numel())
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce  # this worker process only
        trained = _train(fn, base, adapter, D.shard(ids), reduce=D.all_reduce_grads)
        torch.save({"adapter": trained, "sent": sent}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_full_batch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True, start_method="spawn"
        )
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    fn, base, adapter, ids = _setup()
    want = _train(fn, base, adapter, ids)
    for r in results:
        T.assert_trees_close(r["adapter"], want, atol=1e-5)
        # one all-reduce per step, of exactly the adapter's size: the frozen base never crosses the wire
        assert r["sent"] == [funcpeft._trees.tree_numel(adapter)] * STEPS
    T.assert_trees_close(results[0]["adapter"], results[1]["adapter"], atol=0.0)
    assert max((a - b).abs().max().item() for a, b in zip(optree.tree_leaves(want), optree.tree_leaves(adapter))) > 1e-3


def test_helpers_need_an_initialized_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.all_reduce_grads({"x": {"lora_A": torch.zeros(2)}})
