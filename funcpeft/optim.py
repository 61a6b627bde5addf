"""Pure optimisers over adapter trees, optax-style: `init(params) -> state`, `update(grads, state, params) -> (updates, state)`.

    opt = funcpeft.optim.adamw(1e-3)
    state = opt.init(adapter)
    loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, base, batch)
    updates, state = opt.update(grads, state, adapter)
    adapter = funcpeft.optim.apply_updates(adapter, updates)

Nothing is mutated; states are plain trees (NamedTuples of trees and tensors), so they stack, vmap
(one optimiser state per ensemble member), compile and checkpoint like the adapter itself. The step
count is a tensor, so a compiled step does not recompile as it grows. `adamw` follows
`torch.optim.AdamW`'s arithmetic (decoupled decay, bias correction, eps outside the sqrt).

Prefer torch.optim? The adapter leaves are ordinary tensors:

    leaves = [t.detach().requires_grad_() for t in optree.tree_leaves(adapter)]
    adapter = optree.tree_unflatten(optree.tree_structure(adapter), leaves)
    opt = torch.optim.AdamW(leaves, lr=1e-3)
    for batch in data:
        opt.zero_grad()
        fn(base, adapter, **batch).loss.backward()
        opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

Tree = Any
Schedule = Callable[[torch.Tensor], Any]  # step (a 0-d tensor, 1 on the first update) -> learning rate


class GradientTransformation(NamedTuple):
    """A pair of pure functions (optax's shape)."""

    init: Callable[[Tree], Any]
    update: Callable[..., tuple[Tree, Any]]


class AdamWState(NamedTuple):
    step: torch.Tensor  # 0-d float tensor, number of updates done
    exp_avg: Tree  # first moment, like params
    exp_avg_sq: Tree  # second moment, like params


class SgdState(NamedTuple):
    step: torch.Tensor
    momentum: Tree  # momentum buffer, like params (zeros until the first update)


def _map(f: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    return optree.tree_map(f, tree, *rest, none_is_leaf=False)


def _step_like(params: Tree) -> torch.Tensor:
    leaves = optree.tree_leaves(params)
    return torch.zeros((), dtype=torch.float32, device=leaves[0].device if leaves else None)


def _lr(lr: float | Schedule, step: torch.Tensor) -> Any:
    return lr(step) if callable(lr) else lr


def _one_minus_pow(beta: float, step: torch.Tensor) -> torch.Tensor:
    """1 - beta**step, accurate in float32 (torch.optim computes it in Python doubles)."""
    return -torch.expm1(step * (math.log(beta) if beta > 0 else -math.inf))


def _check(name: str, value: float, low: float, high: float = float("inf")) -> None:
    if not (low <= value < high):
        raise ValueError(f"{name} must be in [{low}, {high}), got {value!r}")


def adamw(
    lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 1e-2, maximize: bool = False,
) -> GradientTransformation:
    """AdamW with torch.optim.AdamW's defaults and arithmetic; `lr` may be a schedule `step -> lr`."""
    b1, b2 = betas
    _check("beta1", b1, 0.0, 1.0)
    _check("beta2", b2, 0.0, 1.0)
    _check("eps", eps, 0.0)
    _check("weight_decay", weight_decay, 0.0)
    if not callable(lr):
        _check("lr", lr, 0.0)

    def init(params: Tree) -> AdamWState:
        zeros = _map(lambda p: torch.zeros_like(p, memory_format=torch.preserve_format).detach(), params)
        return AdamWState(_step_like(params), zeros, _map(torch.clone, zeros))

    def update(grads: Tree, state: AdamWState, params: Tree) -> tuple[Tree, AdamWState]:
        if params is None:
            raise ValueError("adamw.update needs params (for the decoupled weight decay)")
        step = state.step + 1
        rate = _lr(lr, step)
        grads = _map(torch.neg, grads) if maximize else grads
        exp_avg = _map(lambda m, g: torch.lerp(m, g, 1 - b1), state.exp_avg, grads)
        exp_avg_sq = _map(lambda v, g: torch.addcmul(v * b2, g, g, value=1 - b2), state.exp_avg_sq, grads)
        step_size = rate / _one_minus_pow(b1, step)
        bc2_sqrt = _one_minus_pow(b2, step).sqrt()

        def one(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            decayed = p * (1 - rate * weight_decay)
            new = decayed - step_size * (m / ((v.sqrt() / bc2_sqrt) + eps))
            return new - p

        return _map(one, params, exp_avg, exp_avg_sq), AdamWState(step, exp_avg, exp_avg_sq)

    return GradientTransformation(init, update)


def sgd(
    lr: float | Schedule, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
    dampening: float = 0.0,
) -> GradientTransformation:
    """SGD with torch.optim.SGD's momentum / dampening / nesterov / (coupled) weight decay."""
    _check("momentum", momentum, 0.0)
    _check("weight_decay", weight_decay, 0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD)")

    def init(params: Tree) -> SgdState:
        return SgdState(_step_like(params), _map(lambda p: torch.zeros_like(p).detach(), params))

    def update(grads: Tree, state: SgdState, params: Tree = None) -> tuple[Tree, SgdState]:
        step = state.step + 1
        if weight_decay:
            if params is None:
                raise ValueError("sgd.update needs params when weight_decay > 0")
            grads = _map(lambda g, p: g + weight_decay * p, grads, params)
        buf = state.momentum
        if momentum:
            first = step == 1  # torch.optim.SGD starts the buffer at the first gradient, undampened
            buf = _map(lambda b, g: torch.where(first, g, b * momentum + (1 - dampening) * g), buf, grads)
            grads = _map(lambda g, b: g + momentum * b, grads, buf) if nesterov else buf
        rate = _lr(lr, step)
        return _map(lambda g: -rate * g, grads), SgdState(step, buf)

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the whole update tree so its global L2 norm is at most max_norm (torch's clip_grad_norm_)."""
    _check("max_norm", max_norm, 0.0)

    def update(grads: Tree, state: Any, params: Tree = None) -> tuple[Tree, Any]:
        coef = (max_norm / (global_norm(grads) + 1e-6)).clamp(max=1.0)
        return _map(lambda g: g * coef, grads), state

    return GradientTransformation(lambda params: (), update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in order (e.g. `chain(clip_by_global_norm(1.0), adamw(1e-3))`)."""

    def init(params: Tree) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Tree, state: tuple[Any, ...], params: Tree = None) -> tuple[Tree, tuple[Any, ...]]:
        new_states = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """params + updates, leaf-wise, in each param's dtype (a new tree)."""
    return _map(lambda p, u: (p + u).to(p.dtype), params, updates)


def global_norm(tree: Tree) -> torch.Tensor:
    """The L2 norm of all leaves together (a 0-d tensor)."""
    leaves = optree.tree_leaves(tree)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in leaves]))


def clip_per_sample(grads: Tree, max_norm: float) -> Tree:
    """DP-SGD's clipping: per-sample gradients (leaves (B, ...)) each scaled to norm <= max_norm.

    Sum (or average) the result over dim 0 and add noise for DP-SGD; see `funcpeft.per_sample_grads`.
    """
    _check("max_norm", max_norm, 0.0)
    leaves = optree.tree_leaves(grads)
    if not leaves:
        return grads
    norms = torch.linalg.vector_norm(torch.stack([t.flatten(1).float().norm(dim=1) for t in leaves]), dim=0)  # (B,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return _map(lambda g: g * coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype), grads)
