"""Adapter training with torch.distributed: only adapter trees cross the wire; the base can be sharded (FSDP2).

Data parallel (each rank holds the whole frozen base): after each backward, `all_reduce_grads` averages
the adapter *gradient tree* over ranks (one flat buffer per device/dtype, a single collective each), so
every rank applies the same update. See docs/distributed.md.

    adapter = broadcast_adapter(adapter, src=0)           # same start on every rank
    loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, base, local_batch)
    grads = all_reduce_grads(grads)                       # mean over ranks
    updates, state = opt.update(grads, state, adapter)

A base sharded with FSDP2 (each rank holds 1/N of the frozen base): shard the model with
`torch.distributed.fsdp.fully_shard` (or `shard_base`), then call `get_peft_model` on it. `base` then
holds the ranks' DTensor shards, and `fn` runs the sharded model itself: FSDP gathers each unit's weights
just before it runs and frees them after (again in backward), funcpeft applies the adapter to the
gathered weights (funcpeft._fsdp). The adapter stays replicated (plain tensors, the same on every rank),
so the training loop above is unchanged; FSDP communicates no gradients (the base is frozen).

    model.requires_grad_(False)                           # FSDP must not compute base gradients
    shard_base(model)                                     # fully_shard on each decoder layer, then the root
    fn, base, adapter = pm = funcpeft.get_peft_model(model, config)
    ...                                                   # the loop above
    save_pretrained(pm, "out", adapter)                   # every rank calls it; rank 0 writes PEFT's files

A 4-bit bitsandbytes base (QLoRA) shards the same way (its packed weights split like any tensor; 8-bit cannot be
sharded), and `fully_shard(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))` runs the base in bf16
(the adapter keeps its own dtype); docs/distributed.md.

`fully_shard` changes the model (its class, DTensor parameters, hooks); funcpeft changes nothing more
between calls (except that get_peft_model / from_pretrained reshard a unit a forward left gathered, as FSDP does
after each unit). During a call it hooks the adapted modules (replaces a quantised layer's forward) and sets
`training` flags, and undoes that before returning (funcpeft._fsdp).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optree
import torch
import torch.distributed as dist
from torch import nn

from ._fsdp import is_dtensor, local_tensor
from ._functional import peft_function
from .io import adapter_dir, checkpoint_state

if TYPE_CHECKING:
    from ._model import FunctionalPeftModel


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
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first "
            "(torchrun sets the environment for it; see docs/distributed.md)"
        )


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
        return t[rank * n : (rank + 1) * n]

    return optree.tree_map(piece, batch)


# -- a base sharded with FSDP2 ------------------------------------------------------------------------------
def shard_base(
    model: nn.Module,
    mesh: Any = None,
    *,
    units: Sequence[type[nn.Module] | str] | None = None,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """Shard `model`'s frozen base with FSDP2, in place: `fully_shard` on each unit module, then on the root.

    The usual FSDP2 wrapping, for `get_peft_model(model, config)` afterwards. Each unit's parameters are
    gathered just before it runs and freed after, so a rank holds 1/N of the base plus about one unit.

    Args:
        model: the base, frozen (`model.requires_grad_(False)` first: else FSDP would compute and reduce-scatter
            base gradients; funcpeft does not change your model's flags). Nothing is sharded if it is not.
        mesh: a 1-D `DeviceMesh` (default: all ranks, on the model's device type), as for `fully_shard`.
        units: the classes (or class names) of the modules to shard one by one; default: transformers'
            `model._no_split_modules` (the decoder layers, as accelerate's FSDP wrapping does).
        fully_shard_kwargs: passed to every `fully_shard` call (`reshard_after_forward`, `mp_policy`, `offload_policy`).

    Returns `model` itself, sharded: `fully_shard` replaces its parameters by DTensor shards and its classes by
    FSDP subclasses (torch's documented changes); funcpeft changes nothing else.
    """
    from torch.distributed.fsdp import fully_shard

    _require_initialized()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"shard_base: the base must be frozen before it is sharded, but {len(trainable)} parameter(s) require grad, "
            f"e.g. {trainable[:3]}: call model.requires_grad_(False) first (the adapter is trained, not the base); "
            "nothing was sharded"
        )
    wanted = list(units) if units is not None else list(getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        raise ValueError(
            f"shard_base: {type(model).__name__} names no block classes (no `_no_split_modules`): pass units=[...] "
            "(e.g. the decoder layer class) so that each block is gathered on its own"
        )

    def is_unit(m: nn.Module) -> bool:
        return any(type(m).__name__ == u if isinstance(u, str) else isinstance(m, u) for u in wanted)

    blocks = [m for m in model.modules() if m is not model and is_unit(m)]
    if not blocks:
        raise ValueError(f"shard_base: no module of {type(model).__name__} is one of the units {wanted}")
    for block in blocks:  # model.modules() is parents first: skip blocks nested in a block already taken
        if not any(b is not block and any(c is block for c in b.modules()) for b in blocks):
            fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def local_bytes(base: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole tensors) over `base`'s tensors; a DTensor counts its local shard."""
    held = whole = 0
    for t in base.values():
        local = local_tensor(t)
        held += local.numel() * local.element_size()
        whole += t.numel() * t.element_size()
    return held, whole


class _Reads(Mapping[str, torch.Tensor]):
    """A base that records which keys are read (their local shards stand in for the values)."""

    def __init__(self, base: Mapping[str, torch.Tensor]):
        self.base, self.read = base, set[str]()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        t = self.base[key]
        return local_tensor(t)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def save_pretrained(
    pm: FunctionalPeftModel, directory: Any, adapter_params: Any, *, src: int = 0, group: Any = None, **kwargs: Any
) -> str:
    """`pm.save_pretrained(directory, adapter_params, **kwargs)` for a distributed run: call it on every rank.

    Rank `src` writes PEFT's files (through funcpeft.save_adapter: atomically, the same bytes as a single
    process); no other rank writes. Base tensors the files hold (embedding layers when an embedding is
    targeted, bias="all" duplicates) are gathered whole first, on every rank (a collective; only those).
    Returns the adapter's directory on every rank once the files are complete; if the save fails on `src`,
    it raises there and a RuntimeError on the other ranks. The adapter must be the same on all ranks.
    """
    _require_initialized()
    rank = dist.get_rank(group)
    name = pm.adapter_name
    config = pm.peft_config[name]
    reads = _Reads(pm.base)
    with warnings.catch_warnings():  # the real save below warns once, on `src`
        warnings.simplefilter("ignore")
        checkpoint_state(adapter_params, config, pm.model, reads, kwargs.get("save_embedding_layers", "auto"), name)
    gathered = {k: pm.base[k].full_tensor() for k in sorted(reads.read) if is_dtensor(pm.base[k])}  # type: ignore[attr-defined]
    error: BaseException | None = None
    if rank == src:
        try:
            pm.save_pretrained(directory, adapter_params, **{"base_params": {**pm.base, **gathered}, **kwargs})
        except BaseException as e:  # noqa: BLE001 (re-raised below, after the other ranks are told)
            error = e
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"funcpeft: rank {src} could not save the adapter to {directory}: {status[0]}")
    return adapter_dir(directory, name)


def is_sharded(pm: Any) -> bool:
    """Whether `pm` (what get_peft_model returned, or its fn) runs a base sharded with FSDP2."""
    return peft_function(pm).sharded is not None


__all__ = [
    "all_reduce_grads",
    "broadcast_adapter",
    "is_sharded",
    "local_bytes",
    "save_pretrained",
    "shard",
    "shard_base",
]
