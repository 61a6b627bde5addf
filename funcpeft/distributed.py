"""Data-parallel adapter training with torch.distributed: only adapter trees cross the wire.

Each rank holds the full frozen base (loaded locally, never communicated) and the same adapter. After
each backward, `all_reduce_grads` averages the adapter *gradient tree* over ranks (one flat buffer per
device/dtype, a single collective each), so every rank applies the same update. See docs/distributed.md.

    adapter = broadcast_adapter(adapter, src=0)           # same start on every rank
    loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, base, local_batch)
    grads = all_reduce_grads(grads)                       # mean over ranks
    updates, state = opt.update(grads, state, adapter)
"""

from __future__ import annotations

from typing import Any

import optree
import torch
import torch.distributed as dist


def _buckets(leaves: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(leaves):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _flat_collective(tree: Any, collective: Any) -> Any:
    """Run `collective(flat_buffer)` (in place on the buffer) once per device/dtype; a new tree of the results."""
    leaves, spec = optree.tree_flatten(tree)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError("expected a tree of tensors (an adapter or its gradients)")
    out: list[torch.Tensor | None] = [None] * len(leaves)
    for idx in _buckets(leaves).values():
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in idx])  # a fresh buffer: the inputs stay untouched
        collective(flat)
        for i, piece in zip(idx, flat.split([leaves[i].numel() for i in idx])):
            out[i] = piece.view(leaves[i].shape)
    return optree.tree_unflatten(spec, out)


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first "
                           "(torchrun sets the environment for it; see docs/distributed.md)")


def all_reduce_grads(grads: Any, group: Any = None, average: bool = True) -> Any:
    """The gradient tree summed (average=True: averaged) over the ranks of `group`; a new tree.

    All ranks must pass trees of the same structure, shapes and dtypes. The frozen base is not involved.
    """
    _require_initialized()
    world = dist.get_world_size(group)

    def reduce(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(world)

    return _flat_collective(grads, reduce)


def broadcast_adapter(tree: Any, src: int = 0, group: Any = None) -> Any:
    """Rank `src`'s adapter (or optimiser state tree) on every rank; a new tree, the input is untouched."""
    _require_initialized()
    return _flat_collective(tree, lambda flat: dist.broadcast(flat, src=src, group=group))


def shard(batch: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """This rank's contiguous slice (along dim 0) of every tensor in `batch` (dim 0 must divide evenly)."""
    _require_initialized()
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size

    def piece(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.shape[0] % world_size:
            raise ValueError(f"shard: batch dim {t.shape[0]} is not divisible by world size {world_size}")
        n = t.shape[0] // world_size
        return t[rank * n:(rank + 1) * n]

    return optree.tree_map(piece, batch)
