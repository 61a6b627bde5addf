"""Per-example adapters: example i of a batch uses adapter `index[i]` of a stack (PEFT's `adapter_names=`).

    stacked = funcpeft.stack_adapters([tree_a, tree_b])                      # leaves (K, ...)
    fn(base, funcpeft.per_example(stacked, [0, -1, 1]), input_ids=ids, attention_mask=mask)  # -1: no adapter
    fn(base, funcpeft.mixed_batch({"a": tree_a, "b": tree_b}, ["a", "__base__", "b"]), ...)  # registered names

Inside each adapted layer the op gathers every example's parameters by index (leaves `(B, ...)`) and
runs the method's optional `forward_per_example(spec, params, x, result, ctx)` (batched matmuls; LoRA has
one), else its own `forward` under `torch.func.vmap` over the examples: any method works, there is no
Python loop over adapters and no vmap over the model (so padded batches with an attention_mask work), and
the shapes do not depend on the routing (compile-friendly). Examples with index -1 get the layer's output
without this adapter, exactly.

The layer input's leading dimension must be the batch (B) or the batch flattened with the tokens (B*n,
example-major, as GPT-2's Conv1D does).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch

from ._plan import check_adapter_structure
from ._trees import stack_adapters
from ._weights import Applied
from .grad import value_and_grad
from .methods.base import LayerSpec, Method, ModuleForwardFn, OpContext, Params

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_INDEX = "__index__"


@dataclasses.dataclass(frozen=True)
class PerExample:
    """An adapter value for `fn`: example i uses adapter `index[i]` of `stacked` (-1: none).

    stacked: adapter tree whose leaves have a leading dim K (see `funcpeft.stack_adapters`).
    index: LongTensor (B,), values in [-1, K); None means example i uses adapter i (K == B).
    adapter_name: the registered adapter whose plan the trees follow (None: fn's default adapter).
    """

    stacked: Any
    index: torch.Tensor | None
    adapter_name: str | None = None
    any_base: bool = True  # whether some index may be -1 (False skips the masking; known when index was concrete)
    origin: str = "index"  # what the user passed, for error messages ("index", "adapter_names")

    @property
    def k(self) -> int:
        """How many adapters are stacked (the leaves' leading dim)."""
        return int(_first_leaf(self.stacked).shape[0])

    @property
    def length(self) -> int:
        """How many examples this routing describes (B): the index's length, or K when index is None."""
        return int(self.index.shape[0]) if self.index is not None else self.k


@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """PEFT's mixed batch: example i uses the registered adapter named `adapter_names[i]` ("__base__": none)."""

    adapters: Mapping[str, Any]
    adapter_names: tuple[str, ...]

    def split(self, plans: Mapping[str, Any]) -> list[tuple[str, PerExample]]:
        """One PerExample per group of adapters with identical plans (those are stacked together)."""
        groups: list[list[str]] = []
        for name in dict.fromkeys(n for n in self.adapter_names if n != BASE):
            check_adapter_structure(self.adapters[name], plans[name], name)
            group = next((g for g in groups if plans[g[0]] == plans[name]), None)
            if group is None:
                groups.append([name])
            else:
                group.append(name)
        out = []
        for members in groups:
            stacked = stack_adapters([self.adapters[m] for m in members])
            slot = {m: j for j, m in enumerate(members)}
            index = torch.tensor([slot.get(n, -1) for n in self.adapter_names], device=_first_leaf(stacked).device)
            out.append(
                (members[0], dataclasses.replace(per_example(stacked, index, members[0]), origin="adapter_names"))
            )
        return out


def _first_leaf(tree: Any) -> torch.Tensor:
    leaves = optree.tree_leaves(tree)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise ValueError("per-example adapters need a non-empty adapter tree with tensor leaves")
    return leaves[0]


def _checking() -> bool:
    """Value checks need concrete tensors: skip them while compiling or inside a torch.func transform."""
    return not torch.compiler.is_dynamo_compiling() and torch._C._functorch.peek_interpreter_stack() is None


def per_example(stacked: Any, index: Any = None, adapter_name: str | None = None) -> PerExample:
    """Route example i of the batch to adapter `index[i]` of `stacked` (-1: no adapter); pass the result to fn.

    Args:
        stacked: tree with leaves (K, ...) (`funcpeft.stack_adapters(trees)`), or a list of K trees.
        index: ints or a LongTensor (B,) with values in [-1, K); None: example i uses adapter i (B == K).
        adapter_name: the registered adapter whose plan the trees follow (None: fn's default adapter).

    Returns:
        A `PerExample` to pass to fn (or `generate`) as the adapter; fn checks its length against the batch.
    """
    if isinstance(stacked, Sequence):
        stacked = stack_adapters(list(stacked))
    if not isinstance(stacked, Mapping):
        raise TypeError(
            f"per_example: stacked must be an adapter tree (dict) or a list of trees, got {type(stacked).__name__}"
        )
    leaves: list[Any] = optree.tree_leaves(stacked)  # type: ignore[arg-type]
    first = _first_leaf(stacked)
    k = first.shape[0] if first.dim() else 0
    if any(t.dim() == 0 or t.shape[0] != k for t in leaves):
        shapes = sorted({tuple(t.shape[:1]) for t in leaves})
        raise ValueError(f"per_example: every leaf of stacked needs the same leading (adapter) dim K; got {shapes}")
    if index is not None:
        index = torch.as_tensor(index, device=first.device)
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"per_example: index must be 1-D integers (B,), got {index.dtype} of shape {tuple(index.shape)}"
            )
        if _checking() and index.numel() and (int(index.min()) < -1 or int(index.max()) >= k):
            raise ValueError(
                f"per_example: index values must be in [-1, {k}) for K={k} stacked adapters, got {index.tolist()}"
            )
        return PerExample(stacked, index.long(), adapter_name, not _checking() or bool((index < 0).any()))
    return PerExample(stacked, None, adapter_name, False)


def mixed_batch(adapters: Mapping[str, Any], adapter_names: Sequence[str]) -> MixedBatch:
    """PEFT's `model(..., adapter_names=[...])`: example i uses registered adapter `adapter_names[i]`.

    Adapters with identical configs are stacked and run as one batched op; others each add their own routed term.

    Args:
        adapters: {registered adapter name: tree}.
        adapter_names: one name per example (length B); "__base__" means no adapter.

    Returns:
        A `MixedBatch` to pass to fn (or `generate`) as the adapter.
    """
    if not isinstance(adapters, Mapping):
        raise TypeError(f"mixed_batch: adapters must be a dict of adapter name -> tree, got {type(adapters).__name__}")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"mixed_batch: adapter_names must be a list of names (one per example), got {adapter_names!r}")
    for n in adapter_names:
        if n != BASE and n not in adapters:
            close = difflib.get_close_matches(str(n), [*adapters, BASE], n=3)
            raise ValueError(
                f"mixed_batch: adapter name {n!r} is not in adapters {sorted(adapters)} nor {BASE!r}"
                + (f"; did you mean {close}?" if close else "")
            )
    return MixedBatch(dict(adapters), tuple(adapter_names))


def split_routed(adapter: Any, plans: Mapping[str, Any], default: str) -> list[tuple[str, Any]] | None:
    """PeftFunction's hook: [(adapter_name, PerExample)] for a routed adapter value, None for anything else."""
    if isinstance(adapter, PerExample):
        return [(adapter.adapter_name or default, adapter)]
    if isinstance(adapter, MixedBatch):
        unknown = [n for n in adapter.adapters if n not in plans]
        if unknown:
            raise KeyError(f"mixed_batch: {unknown} are not registered adapters; registered: {sorted(plans)}")
        return adapter.split(plans)
    return None


_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "x", "X")


def batch_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, str] | None:
    """(batch size, where it was read) of a model call: dim 0 of its first tensor input, or None if it has none.

    Positional tensors come first, then the usual keyword names (input_ids, inputs_embeds, pixel_values, ...),
    then any other tensor keyword.
    """
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim():
            return int(a.shape[0]), f"positional argument {i}"
    names = [k for k in _BATCH_KEYS if k in kwargs] + [k for k in kwargs if k not in _BATCH_KEYS]
    for k in names:
        v = kwargs[k]
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0]), k
    return None


def check_batch(routing: PerExample, batch: tuple[int, str] | None) -> int:
    """The batch size, after checking that the routing has one entry per example (PEFT raises on a mismatch)."""
    n = routing.length
    if routing.origin == "adapter_names":
        what = f"mixed_batch adapter_names has length {n}"
    elif routing.index is None:
        what = f"per_example(stacked) without an index uses stacked adapter i for example i, but K = {n} adapters"
    else:
        what = f"per_example index has length {n}"
    if batch is None:
        raise ValueError(
            f"per-example adapters: the {what}, and the model call has no tensor input to read the batch size from; "
            "pass the inputs as tensors (e.g. input_ids=...)"
        )
    size, where = batch
    if n != size:
        raise ValueError(
            f"per-example adapters: the {what}, but the batch has {size} examples (dim 0 of {where}); "
            "they must be equal: one adapter choice per example"
        )
    return size


# -- the per-layer op ------------------------------------------------------------------------------------
def route_layer(
    spec: LayerSpec[Any], method: Method, stacked: Params, shared: Params, routing: PerExample, batch: int
) -> Applied:
    """One layer's adapter, routed per example: what `fn` hands to the layer's AdaptedWeight.

    stacked: the method's own params with a leading K dim; shared: frozen tensors every example uses (VeRA's);
    batch: the model call's batch size B (checked against the routing by `check_batch`).
    """
    index = routing.index
    any_base = routing.any_base
    if any_base and method.changes_base:
        raise NotImplementedError(
            f"per-example adapters with {method.name}: an example routed to no adapter (index -1 / '__base__') is "
            f"ambiguous, because {method.name} changes the base layer itself (PEFT gives such examples its changed "
            "base, funcpeft's fn(base, None) is the unchanged model). Route every example to an adapter."
        )
    params = {**stacked, **shared, **({_INDEX: index} if index is not None else {})}
    keys = tuple(stacked)

    def forward(
        spec: LayerSpec[Any], params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
    ) -> torch.Tensor:
        assert result is not None
        return _routed_forward(method, spec, keys, any_base, batch, params, x, result, ctx)

    return Applied(spec, params, forward, True, routed=True)


def route_module(per_example: ModuleForwardFn, routing: PerExample) -> ModuleForwardFn:
    """A whole-module adapter's forward (`Method.module_forward`) routed per example: each example's params
    gathered by index (leaves (B, ...)) for the method's `module_forward_per_example`; examples routed to no
    adapter (-1) get the module's own output, exactly (every output tensor whose leading dim is the batch)."""
    index, any_base = routing.index, routing.any_base

    def forward(
        spec: LayerSpec[Any], params: Params, module: Any, args: tuple[Any, ...], kwargs: Any, output: Any
    ) -> Any:
        if index is None:
            return per_example(spec, params, module, args, kwargs, output)
        at = {k: index.to(v.device).clamp(min=0) for k, v in params.items()}
        out = per_example(spec, {k: v.index_select(0, at[k]) for k, v in params.items()}, module, args, kwargs, output)
        if not any_base:
            return out

        def keep_base(adapted: Any, own: Any) -> Any:
            if not isinstance(adapted, torch.Tensor) or adapted.dim() == 0 or adapted.shape[0] != index.shape[0]:
                return adapted
            none = (index < 0).to(adapted.device).view(-1, *([1] * (adapted.dim() - 1)))
            return torch.where(none, own, adapted)

        return optree.tree_map(keep_base, out, output, none_is_leaf=True)

    return forward


def _split_batch(t: torch.Tensor, b: int) -> tuple[torch.Tensor, bool]:
    """(B, ...) as is, or (B*n, ...) viewed as (B, n, ...) (GPT-2's Conv1D flattens batch and tokens, example-major)."""
    if t.shape[0] == b:
        return t, False
    if t.dim() and t.shape[0] % b == 0:
        return t.reshape(b, t.shape[0] // b, *t.shape[1:]), True
    raise ValueError(
        f"per-example adapters: a layer got input of shape {tuple(t.shape)} whose leading dim is neither the batch "
        f"size {b} nor a multiple of it (the layer must see the batch first, or batch x tokens flattened)"
    )


def _routed_forward(
    method: Method,
    inner: LayerSpec[Any],
    stacked_keys: tuple[str, ...],
    any_base: bool,
    b: int,
    params: Params,
    x: torch.Tensor,
    result: torch.Tensor,
    ctx: OpContext,
) -> torch.Tensor:
    index = params.get(_INDEX)
    stacked = {k: params[k] for k in stacked_keys}
    shared = {k: v for k, v in params.items() if k not in stacked and k != _INDEX}
    if index is not None:
        index = index.to(result.device)
        stacked = {k: v.index_select(0, index.clamp(min=0)) for k, v in stacked.items()}
    xs, flat = _split_batch(x, b)
    rs, _ = _split_batch(result, b)
    pass_result = method.uses_result(inner)
    batched = method.forward_per_example
    out = batched(inner, {**stacked, **shared}, xs, rs if pass_result else None, ctx) if batched is not None else None
    if out is None:

        def one(p: Params, xi: torch.Tensor, ri: torch.Tensor) -> torch.Tensor:
            return method.forward(inner, {**p, **shared}, xi, ri if pass_result else None, ctx)

        try:
            out = torch.func.vmap(one, randomness="different")(stacked, xs, rs)
        except RuntimeError as exc:
            vmap_rule = "vmap" in str(exc) or "functorch" in str(exc)
            if not (inner.kind.module_level and not pass_result and vmap_rule):
                raise
            # the method runs the quantised layer's own kernel per example (OFT / BOFT rotate its input): an
            # autograd.Function without a vmap rule (bitsandbytes 8-bit, HQQ's default backend) cannot
            raise NotImplementedError(
                f"per-example adapters: {inner.method} on {ctx.path!r} runs this quantised layer's own kernel "
                f"({inner.quant.backend}) on each example's input under torch.func.vmap, which the kernel does not "
                f"support ({str(exc).splitlines()[0][:160]}). Route per example on a bitsandbytes 4-bit or torchao "
                "base (or HQQ with HQQLinear.set_backend(HQQBackend.PYTORCH_FORWARD)), or call fn once per adapter."
            ) from exc
    if index is not None and any_base:
        out = torch.where((index >= 0).view(b, *[1] * (out.dim() - 1)), out, rs)
    return out.reshape(result.shape) if flat else out


# -- per-sample gradients ----------------------------------------------------------------------------------
def per_sample_grads(
    loss_fn: Callable[..., torch.Tensor],
    adapter: Any,
    *args: Any,
    batch_size: int,
    adapter_name: str | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Per-example losses (B,) and per-example gradients (leaves (B, *leaf.shape)) in one backward pass.

    Each example gets its own copy of the adapter (no vmap over the model), so padded batches with an
    attention_mask work. One backward pass of `sum(losses)` gives every copy its example's gradient
    (`funcpeft.value_and_grad`: autograd at top level, torch.func inside transforms).

    Args:
        loss_fn: `loss_fn(routed_adapter, *args, **kwargs) -> losses (B,)`; pass `routed_adapter` to fn as the
            adapter; losses[i] must depend on example i only.
        adapter: the adapter tree (leaves of any shape).
        *args, **kwargs: passed to loss_fn.
        batch_size: B.
        adapter_name: the registered adapter the tree belongs to (None: the default).

    Returns:
        (losses (B,), grads): grads has the adapter's structure with leaves (B, *leaf.shape).
    """

    def total(copies: Any) -> tuple[torch.Tensor, torch.Tensor]:
        losses = loss_fn(PerExample(copies, None, adapter_name, False), *args, **kwargs)
        if not isinstance(losses, torch.Tensor) or losses.shape != (batch_size,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"per_sample_grads: loss_fn must return per-example losses of shape ({batch_size},), got {got}"
            )
        return losses.sum(), losses

    copies = optree.tree_map(lambda t: t.expand(batch_size, *t.shape), adapter)
    (_, losses), grads = value_and_grad(total, has_aux=True)(copies)
    return losses, grads
