"""Lily (`LilyConfig`): low-rank adapters interconnected across layers, PEFT 0.21.2's arithmetic.

    h = x A^T                                    A (r, in): lily_A
    p = mean over every token of the batch of softmax(h R^T)      R (num_B, r): lily_router, p (num_B,)
    y = base(x) + scaling * h (sum_e p_e B_e)    lily_B (num_B * r, out) read as B_e (r, out)

Sharing (PEFT's `_post_injection_hook`): the layers are grouped by (target suffix, base weight shape), the suffix
being the `target_modules` entry the layer's name ends with (the whole regex for a str); in each group, in the
model's module order, every `stride_A` consecutive layers read the first one's lily_A, and all read the first
layer's lily_B; each layer has its own router. funcpeft keeps a shared tensor once, in the tree entry of the layer
holding it (`Method.shares`): trained, counted and saved like PEFT's shared modules. A name ending in more than
one `target_modules` entry is refused: PEFT's group then depends on the iteration order of a set of strings,
which changes with Python's hash seed.

The routing probabilities are averaged over the whole batch (every example and position), so one example's output
depends on the others: vmap over stacked adapters is fine, but per-example routing (a different adapter per
example) has no meaning PEFT gives it and raises NotImplementedError. Nothing weight-sized is built per call (as
in PEFT). Merging is refused with PEFT's error; nn.Linear only, like PEFT.
Init (PEFT builds A, B, router as nn.Linear, each drawing its default init, then re-draws): A and the router
kaiming-uniform, B zeros (init_weights=True) or kaiming-uniform (False); layers that read a shared A or B draw
their own first, as PEFT's do before it replaces them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs.lily import LilyConfig
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target
from .lora import kaiming_uniform

A, B, ROUTER = "lily_A", "lily_B", "lily_router"


@dataclass(frozen=True)
class LilyHyper:
    r: int
    num_B: int
    scaling: float
    init: bool  # init_weights


Spec = LayerSpec[LilyHyper]


def hyper(config: Any, target: Target) -> LilyHyper:
    return LilyHyper(r=config.r, num_B=config.num_B, scaling=float(config.scaling), init=bool(config.init_weights))


def param_names(spec: Spec) -> tuple[str, ...]:
    return (A, B, ROUTER)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draws in its order: nn.Linear A, B, router (default inits), then `reset_lily_parameters`: A and the
    router kaiming-uniform, then B kaiming-uniform (init_weights=False) or zeros."""
    h = spec.hyper
    shapes = {A: (h.r, spec.in_features), B: (h.num_B * h.r, spec.out_features), ROUTER: (h.num_B, h.r)}
    for shape in shapes.values():  # the modules' construction draws, overwritten below
        kaiming_uniform(shape, generator)
    out = {A: kaiming_uniform(shapes[A], generator), ROUTER: kaiming_uniform(shapes[ROUTER], generator)}
    out[B] = torch.zeros(shapes[B]) if h.init else kaiming_uniform(shapes[B], generator)
    return {A: out[A], B: out[B], ROUTER: out[ROUTER]}


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + scaling * h B_mix` in PEFT's order and dtypes; x (..., in), the whole batch."""
    assert result is not None
    a, b, router = params[A], params[B], params[ROUTER]
    num_b = spec.hyper.num_B
    hidden = F.linear(x.to(a.dtype), a)  # (..., r)
    probs = F.softmax(F.linear(hidden, router), dim=-1)  # (..., num_B)
    experts = probs.reshape(-1, num_b).mean(dim=0)  # (num_B,): over every token of the batch
    combined = torch.einsum("e,eio->io", experts, b.reshape(num_b, -1, b.shape[1]))  # (r, out)
    delta = torch.matmul(hidden, combined)
    return result + (delta * spec.hyper.scaling).to(result.dtype)


def forward_per_example(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor | None:
    raise NotImplementedError(
        "per-example adapters are not supported for Lily (LilyConfig): its router averages the routing "
        "probabilities over every token of the batch, so an example's output depends on the other examples and a "
        "batch with a different adapter per example has no PEFT counterpart. Run one adapter per batch (vmap over "
        "stacked adapters works)."
    )


def _suffix(config: Any, path: str) -> str | None:
    """PEFT's group key part: the `target_modules` entry `path` ends with (plain `endswith`, as PEFT's hook)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets
    matches = sorted(t for t in targets if path.endswith(t))
    if len(matches) > 1:
        raise ValueError(
            f"Lily groups layers by the target_modules entry their name ends with, and {path!r} ends with several: "
            f"{matches}. PEFT then picks one by the iteration order of a set of strings, which depends on Python's "
            "hash seed, so the sharing is not reproducible; give target_modules entries no module name ends with "
            "two of (e.g. drop the shorter one)."
        )
    return matches[0] if matches else None


def shares(config: Any, layers: Sequence[tuple[str, Spec]]) -> Mapping[str, tuple[tuple[str, str], ...]]:
    """PEFT's `_post_injection_hook`: per (target suffix, weight shape) group, in module order, layer i reads
    lily_A from layer (i // stride_A) * stride_A and lily_B from layer 0 of its group."""
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for path, spec in layers:
        suffix = _suffix(config, path)
        if suffix is not None:
            groups.setdefault((suffix, spec.weight_shape), []).append(path)
    out: dict[str, tuple[tuple[str, str], ...]] = {}
    stride = config.stride_A
    for paths in groups.values():
        for i, path in enumerate(paths[1:], start=1):
            leader = paths[(i // stride) * stride]
            out[path] = ((B, paths[0]),) + (((A, leader),) if leader != path else ())
    return out


def _refuse(what: str) -> Exception:
    return NotImplementedError("This method is not supported for Lily.")


LILY = register(
    Method(
        name="lily",
        config=LilyConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        forward_per_example=forward_per_example,
        merge=MergeHooks(refuse=_refuse),
        keys=KeyRules(param_prefix="lily_", unsuffixed=frozenset()),
        kinds=frozenset({LayerKind.LINEAR}),
        shares=shares,
    )
)
