"""Random adapter values and assertions on adapter trees."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch import nn


def random_like(tree: Any, generator: torch.Generator | None = None, scale: float = 0.1) -> Any:
    """A tree of the same structure with random normal leaves (times `scale`), requires_grad=True.

    Use it to make an adapter non-trivial (B = 0 at init hides most bugs).
    """

    def draw(t: torch.Tensor) -> torch.Tensor:
        r = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * scale
        return r.to(t.device).requires_grad_(True)

    return optree.tree_map(draw, tree)


def assert_trees_close(a: Any, b: Any, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Same structure and every leaf within tolerance; the message names the first differing path."""
    pa, la, sa = optree.tree_flatten_with_path(a)
    pb, lb, sb = optree.tree_flatten_with_path(b)
    if sa != sb:
        raise AssertionError(f"tree structures differ: {sorted(map(str, pa))[:5]} vs {sorted(map(str, pb))[:5]}")
    for p, x, y in zip(pa, la, lb):
        if x.shape != y.shape:
            raise AssertionError(f"{'.'.join(map(str, p))}: shape {tuple(x.shape)} != {tuple(y.shape)}")
        if not torch.allclose(x.float(), y.float(), atol=atol, rtol=rtol):
            diff = (x.float() - y.float()).abs().max().item()
            raise AssertionError(f"{'.'.join(map(str, p))}: max abs diff {diff:.3g} > atol {atol}")


def assert_adapter_is_noop(
    fn: Callable[..., Any], base: Any, adapter: Any, model: nn.Module, *args: Any, **kwargs: Any
) -> None:
    """`fn(base, adapter, ...)` equals `model(...)` exactly (e.g. for a freshly initialised LoRA adapter)."""
    with torch.no_grad():
        got, want = fn(base, adapter, *args, **kwargs), model(*args, **kwargs)
    got_t = got.logits if hasattr(got, "logits") else got
    want_t = want.logits if hasattr(want, "logits") else want
    if not torch.equal(got_t, want_t):
        raise AssertionError(f"adapter is not a no-op: max abs diff {(got_t - want_t).abs().max().item():.3g}")


def assert_only_adapter_gets_grads(loss_fn: Callable[[Any, Any], torch.Tensor], adapter: Any, base: Any) -> None:
    """Backprop `loss_fn(adapter, base)`: every base leaf stays gradient-free, and some adapter leaf gets one."""
    leaves = [t.detach().requires_grad_(True) for t in optree.tree_leaves(adapter)]
    fresh = optree.tree_unflatten(optree.tree_structure(adapter), leaves)
    loss = loss_fn(fresh, base)
    if not loss.requires_grad:
        raise AssertionError(
            "no adapter leaf received a gradient: the loss does not depend on the adapter (no grad_fn)"
        )
    loss.backward()
    for name, t in base.items() if isinstance(base, Mapping) else []:
        if t.requires_grad or t.grad is not None:
            raise AssertionError(f"base leaf {name} requires or received a gradient")
    if not any(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves):
        raise AssertionError("no adapter leaf received a non-zero gradient")
