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

PEFT's LoRA optimizers (peft.optimizers), as transforms of the same shape:

    opt = optim.loraplus(optim.adamw, lr=1e-4, loraplus_lr_ratio=16)   # create_loraplus_optimizer
    opt = optim.lorafa(1e-4, pm.lora_scalings())                      # create_lorafa_optimizer
    opt = optim.riemannian(optim.adamw(1e-4), reg=1e-2)               # create_riemannian_optimizer

`partition(labels, transforms)` (optax's multi_transform) runs a different transform per group of leaves.

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

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import torch
from torch import nn

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


def _check_adam(
    lr: float | Schedule, betas: tuple[float, float], eps: float, weight_decay: float
) -> tuple[float, float]:
    """Adam's hyper-parameters in range (torch.optim's checks; a schedule's values are not checked): the betas."""
    b1, b2 = betas
    _check("beta1", b1, 0.0, 1.0)
    _check("beta2", b2, 0.0, 1.0)
    _check("eps", eps, 0.0)
    _check("weight_decay", weight_decay, 0.0)
    if not callable(lr):
        _check("lr", lr, 0.0)
    return b1, b2


def adamw(
    lr: float | Schedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    maximize: bool = False,
) -> GradientTransformation:
    """AdamW with torch.optim.AdamW's defaults and arithmetic; `lr` may be a schedule `step -> lr`."""
    b1, b2 = _check_adam(lr, betas, eps, weight_decay)

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
    lr: float | Schedule,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
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


# -- several transforms over groups of leaves (optax's multi_transform) --------------------------------------------
Label = Callable[[str, str, torch.Tensor], str]  # (module path, leaf name, leaf) -> group name


def _split(tree: Tree, labels: Mapping[tuple[str, str], str], group: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, entry in tree.items():
        for name, leaf in entry.items():
            if labels[(path, name)] == group:
                out.setdefault(path, {})[name] = leaf
    return out


def _labels(tree: Tree, label: Label) -> dict[tuple[str, str], str]:
    if not isinstance(tree, Mapping) or not all(isinstance(e, Mapping) for e in tree.values()):
        raise TypeError("expected an adapter tree {module path: {leaf name: Tensor}} (see funcpeft.AdapterTree)")
    return {(path, name): label(path, name, leaf) for path, entry in tree.items() for name, leaf in entry.items()}


def partition(label: Label, transforms: Mapping[str, GradientTransformation]) -> GradientTransformation:
    """Each group of an adapter tree's leaves gets its own transform (optax's `multi_transform`).

    label(path, name, leaf) -> a key of `transforms`; each transform sees the sub-tree of its group's leaves
    (`{path: {name: leaf}}`), and its state is kept under the group's name.
    """

    def groups(tree: Tree) -> dict[tuple[str, str], str]:
        labels = _labels(tree, label)
        unknown = sorted({g for g in labels.values() if g not in transforms})
        if unknown:
            raise ValueError(f"partition: labels {unknown} have no transform (known: {sorted(transforms)})")
        return labels

    def init(params: Tree) -> dict[str, Any]:
        labels = groups(params)
        return {g: t.init(_split(params, labels, g)) for g, t in transforms.items()}

    def update(grads: Tree, state: dict[str, Any], params: Tree = None) -> tuple[Tree, dict[str, Any]]:
        labels = groups(grads)
        updates: dict[tuple[str, str], Any] = {}
        new_state = {}
        for g, t in transforms.items():
            sub_params = None if params is None else _split(params, labels, g)
            sub, new_state[g] = t.update(_split(grads, labels, g), state[g], sub_params)
            updates.update({(p, n): u for p, e in sub.items() for n, u in e.items()})
        return {p: {n: updates[(p, n)] for n in e} for p, e in grads.items()}, new_state

    return GradientTransformation(init, update)


# -- LoRA+ (peft.optimizers.create_loraplus_optimizer) --------------------------------------------------------------
def _scaled(lr: float | Schedule, factor: float) -> float | Schedule:
    return (lambda step: lr(step) * factor) if callable(lr) else lr * factor


def loraplus_group(path: str, name: str, leaf: torch.Tensor, layernorms: frozenset[str] | None = None) -> str:
    """PEFT's LoRA+ parameter group of one leaf: "embedding", "groupB", "groupB_no_decay" or "groupA".

    Embedding LoRA (lora_embedding_A/B) -> "embedding"; lora_B and every 1-D leaf (DoRA's magnitude, biases,
    norm weights) -> group B, without weight decay for names with "bias" and parameters of an nn.LayerNorm
    (`layernorms`: module paths, needed only for the leaves of modules_to_save copies); the rest -> "groupA".
    """
    if name in ("lora_embedding_A", "lora_embedding_B"):
        return "embedding"
    if "lora_B" in name or leaf.ndim == 1:
        if "bias" in f"{path}.{name}":
            return "groupB_no_decay"
        if not name.startswith("lora_"):  # a modules_to_save copy's parameter: decayed unless in a LayerNorm
            if layernorms is None:
                raise ValueError(
                    f"LoRA+ decays 1-D parameters except biases and LayerNorm parameters: whether {path}.{name} is "
                    "in an nn.LayerNorm is unknown; pass model= to optim.loraplus"
                )
            if path in layernorms:
                return "groupB_no_decay"
        return "groupB"
    return "groupA"


def loraplus(
    optimizer: Callable[..., GradientTransformation],
    *,
    lr: float | Schedule,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> GradientTransformation:
    """PEFT's `create_loraplus_optimizer`: `optimizer` per parameter group with LoRA+'s learning rates.

    optimizer: a transform factory called as `optimizer(lr=..., weight_decay=..., **kwargs)` (`adamw`, `sgd`).
    Groups (`loraplus_group`): A (lora_A and other 2-D leaves): lr; embedding LoRA: loraplus_lr_embedding;
    B (lora_B and 1-D leaves): lr * loraplus_lr_ratio, weight decay loraplus_weight_decay except biases and
    LayerNorm parameters (0). model: the base model, to find nn.LayerNorm modules (only needed for
    modules_to_save copies of 1-D parameters). PEFT ignores a `weight_decay` passed here (the groups set
    their own): funcpeft refuses it.
    """
    if isinstance(optimizer, GradientTransformation) or not callable(optimizer):
        raise TypeError(
            f"loraplus: optimizer must be a transform factory such as optim.adamw (called once per group with its lr "
            f"and weight_decay), got {optimizer!r}"
        )
    if "weight_decay" in kwargs:
        raise TypeError(
            "loraplus: the groups set their own weight decay; pass loraplus_weight_decay instead of weight_decay"
        )
    _check("loraplus_lr_ratio", loraplus_lr_ratio, 0.0)
    _check("loraplus_lr_embedding", loraplus_lr_embedding, 0.0)
    _check("loraplus_weight_decay", loraplus_weight_decay, 0.0)
    layernorms = (
        None if model is None else frozenset(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    )
    wd = loraplus_weight_decay
    transforms = {
        "groupA": optimizer(lr=lr, weight_decay=wd, **kwargs),
        "embedding": optimizer(lr=loraplus_lr_embedding, weight_decay=wd, **kwargs),
        "groupB": optimizer(lr=_scaled(lr, loraplus_lr_ratio), weight_decay=wd, **kwargs),
        "groupB_no_decay": optimizer(lr=_scaled(lr, loraplus_lr_ratio), weight_decay=0.0, **kwargs),
    }
    return partition(lambda path, name, leaf: loraplus_group(path, name, leaf, layernorms), transforms)


# -- LoRA-FA (peft.optimizers.create_lorafa_optimizer) --------------------------------------------------------------
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


class LoraFAState(NamedTuple):
    step: torch.Tensor  # 0-d float tensor, number of updates done
    exp_avg: Tree  # first moment, like params (zeros for the frozen lora_A)
    exp_avg_sq: Tree  # second moment, like params


def _lora_pair(path: str, entry: Mapping[str, Any]) -> tuple[str, str] | None:
    pair = next(((a, b) for a, b in _PAIRS if a in entry and b in entry), None)
    if pair is not None and (entry[pair[0]].ndim != 2 or entry[pair[1]].ndim != 2):
        raise NotImplementedError(
            f"lorafa: {path}'s {pair[0]} {tuple(entry[pair[0]].shape)} and {pair[1]} {tuple(entry[pair[1]].shape)} are "
            "not matrices (conv LoRA?); LoRA-FA's projection (A A^T)^-1 is defined for 2-D LoRA factors only"
        )
    extra = [n for n in entry if "lora" in n and (pair is None or n not in pair)]
    if extra:
        raise NotImplementedError(
            f"lorafa: {path} has {extra}; PEFT's LoRA-FA pairs every parameter named 'lora*' with its neighbour (A, B), "
            "which such a parameter (e.g. DoRA's lora_magnitude_vector) breaks. Plain LoRA only."
        )
    return pair


def lorafa(
    lr: float | Schedule,
    scalings: float | Mapping[str, float],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    projection_dtype: torch.dtype | None = torch.bfloat16,
) -> GradientTransformation:
    """PEFT's `create_lorafa_optimizer` (`LoraFAOptimizer`): lora_A frozen, lora_B's gradient projected, AdamW.

    For each layer (lora_A, lora_B) (or lora_embedding_A/B): A never changes (its gradient is ignored); B's
    gradient becomes `g_B @ pinv(A A^T + 1e-8 I) / s^2` (s: the layer's scaling), then B takes transformers'
    AdamW step (bias correction folded into the step size, eps outside the sqrt, decay `B -= lr * wd * B`
    after the step); every other leaf takes that AdamW step with its own gradient.
    scalings: `{module path: s}` (`pm.lora_scalings()`) or one float for every layer. projection_dtype:
    PEFT computes the projection under `torch.autocast(dtype=bfloat16)` wherever bf16 is available (CPUs
    and bf16-capable GPUs): the default reproduces that; None projects in the gradient's dtype.
    """
    b1, b2 = _check_adam(lr, betas, eps, weight_decay)
    if not isinstance(scalings, Mapping):
        _check("scaling", scalings, 1e-300)  # it divides the projected gradient

    def scaling(path: str) -> float:
        if isinstance(scalings, Mapping):
            if path not in scalings:
                close = difflib.get_close_matches(path, list(scalings), n=3)
                raise KeyError(
                    f"lorafa: no scaling for {path!r} (close: {close}); pass pm.lora_scalings() or one float"
                )
            return float(scalings[path])
        return float(scalings)

    def project(g: torch.Tensor, a: torch.Tensor, s: float) -> torch.Tensor:
        inv = torch.linalg.pinv(a @ a.T + 1e-8 * torch.eye(a.shape[0], device=a.device))
        if projection_dtype is None:
            return (1 / s**2) * (g @ inv)
        return ((1 / s**2) * (g.to(projection_dtype) @ inv.to(projection_dtype))).to(g.dtype)

    def init(params: Tree) -> LoraFAState:
        zeros = _map(lambda p: torch.zeros_like(p).detach(), params)
        return LoraFAState(_step_like(params), zeros, _map(torch.clone, zeros))

    def update(grads: Tree, state: LoraFAState, params: Tree) -> tuple[Tree, LoraFAState]:
        if params is None:
            raise ValueError("lorafa.update needs params (lora_A's value projects lora_B's gradient)")
        step = state.step + 1
        rate = _lr(lr, step)
        size = rate * _one_minus_pow(b2, step).sqrt() / _one_minus_pow(b1, step) if correct_bias else rate
        updates: dict[str, dict[str, torch.Tensor]] = {}
        exp_avg: dict[str, dict[str, torch.Tensor]] = {}
        exp_avg_sq: dict[str, dict[str, torch.Tensor]] = {}
        for path, entry in params.items():
            pair = _lora_pair(path, entry)
            for name, p in entry.items():
                m, v = state.exp_avg[path][name], state.exp_avg_sq[path][name]
                if pair is not None and name == pair[0]:  # frozen A
                    updates.setdefault(path, {})[name] = torch.zeros_like(p)
                    exp_avg.setdefault(path, {})[name], exp_avg_sq.setdefault(path, {})[name] = m, v
                    continue
                g = grads[path][name]
                if pair is not None:
                    g = project(g, entry[pair[0]], scaling(path))
                m = m * b1 + g * (1.0 - b1)
                v = torch.addcmul(v * b2, g, g, value=1.0 - b2)
                new = p - size * (m / (v.sqrt() + eps))
                if weight_decay > 0.0:
                    new = new + new * (-rate * weight_decay)
                updates.setdefault(path, {})[name] = new - p
                exp_avg.setdefault(path, {})[name], exp_avg_sq.setdefault(path, {})[name] = m, v
        return updates, LoraFAState(step, exp_avg, exp_avg_sq)

    return GradientTransformation(init, update)


# -- Riemannian preconditioning (peft.optimizers.create_riemannian_optimizer) -------------------------------------
def riemannian(optimizer: GradientTransformation, reg: float = 1e-2) -> GradientTransformation:
    """PEFT's `create_riemannian_optimizer`: LoRA gradients preconditioned by r x r matrices, then `optimizer`.

    For each layer with 2-D lora_A (r, in) and lora_B (out, r): `g_A <- pinv(B^T B + reg I) @ g_A`,
    `g_B <- g_B @ pinv(A A^T + reg I)`, computed in at least float32 and cast back to the gradient's dtype.
    Embedding and conv LoRA and every other leaf pass unchanged (PEFT's rule).
    """
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            f"riemannian: optimizer must be a transform such as optim.adamw(1e-3) (already built), got {optimizer!r}"
        )
    _check("reg", reg, 0.0)

    def pairs(params: Tree) -> list[str]:
        return [
            path
            for path, entry in params.items()
            if "lora_A" in entry and "lora_B" in entry and entry["lora_A"].ndim == 2 and entry["lora_B"].ndim == 2
        ]

    def init(params: Tree) -> Any:
        if not pairs(params):
            raise ValueError(
                "riemannian: the adapter tree has no layer with 2-D lora_A and lora_B (the r x r preconditioner is "
                f"defined for linear LoRA only; layers: {sorted(params)[:6]})"
            )
        return optimizer.init(params)

    def precondition(grads: Tree, params: Tree) -> Tree:
        out = {path: dict(entry) for path, entry in grads.items()}
        for path in pairs(params):
            a, b = params[path]["lora_A"], params[path]["lora_B"]
            dtype = torch.promote_types(a.dtype, torch.float32)
            a, b = a.detach().to(dtype), b.detach().to(dtype)
            r = a.shape[0]
            eye = torch.eye(r, device=a.device, dtype=dtype)
            g_a, g_b = grads[path]["lora_A"], grads[path]["lora_B"]
            out[path]["lora_A"] = (torch.linalg.pinv(b.T @ b + reg * eye) @ g_a.to(dtype)).to(g_a.dtype)
            out[path]["lora_B"] = (g_b.to(dtype) @ torch.linalg.pinv(a @ a.T + reg * eye)).to(g_b.dtype)
        return out

    def update(grads: Tree, state: Any, params: Tree = None) -> tuple[Tree, Any]:
        if params is None:
            raise ValueError("riemannian.update needs params (the preconditioners are built from lora_A and lora_B)")
        return optimizer.update(precondition(grads, params), state, params)

    return GradientTransformation(init, update)
