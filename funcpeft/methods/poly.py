"""Poly / MHR (`PolyConfig`): per task, a learned soft mixture of LoRA "skills", PEFT 0.21.2's arithmetic.

Each targeted nn.Linear (in -> out) has n_skills LoRA modules split into n_splits heads and a router with one
row of logits per task:

    poly_lora_A (splits, skills, in / splits, r)    poly_lora_B (splits, skills, r, out / splits)
    poly_router (n_tasks, splits * skills)          saved as PEFT's `poly_router.module_logits`
    w = normalise(sigmoid(poly_router[task_ids]))   (B, splits, skills); a training call samples a relaxed
                                                    Bernoulli (temperature 1) instead of the sigmoid
    A_b = sum_s w[b, q, s] A[q, s] -> (in, r),  B_b likewise -> (r, out),  y_b = base(x_b) + x_b A_b B_b / r

The model is called as `fn(base, adapter, input_ids=..., task_ids=LongTensor (B,))`: `task_ids` is consumed here
(`Method.call_kwargs`), checked once per call (PEFT checks only `max() < n_tasks`; a negative id, which PEFT's
indexing silently wraps to the last tasks, is refused) and turned into every layer's mixing weights before the
model runs (`prepare_call`). A training call (`dropout_rng`) draws its uniforms from the call's randomness in
plan order, which is PEFT's draw order when layers run in module order (transformers' blocks): seeded alike, the
samples are PEFT's. Nothing weight-sized is materialised: A_b, B_b are (B, in, r) / (B, r, out), as in PEFT.
Inputs must be (B, T, in) (PEFT's `bmm`). Not mergeable (the weight depends on the task: PEFT raises
NotImplementedError); each example already has its own adapter mixture, so per-example adapter trees
(funcpeft.per_example) are refused; vmap over stacked trees works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configs import PolyConfig
from ._registry import register
from .base import (
    CallInputs,
    KeyRules,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
)

A, B, ROUTER = "poly_lora_A", "poly_lora_B", "poly_router"
TASK_IDS = "task_ids"
EPS = 1e-12  # PEFT's router: weights / (sum + EPS)


@dataclass(frozen=True)
class PolyHyper:
    r: int
    n_tasks: int
    n_skills: int
    n_splits: int
    init: bool


Spec = LayerSpec[PolyHyper]


def hyper(config: PolyConfig, target: Target) -> PolyHyper:
    """nn.Linear targets only (`kinds`: others raise UnsupportedLayerError before this)."""
    module = target.module
    splits = config.n_splits
    if module.in_features % splits or module.out_features % splits:
        raise ValueError(
            f"Poly at {target.name}: in_features={module.in_features} and out_features={module.out_features} must "
            f"both divide by n_splits={splits} (each head takes 1/n_splits of them; PEFT fails in the forward)"
        )
    return PolyHyper(config.r, config.n_tasks, config.n_skills, splits, bool(config.init_weights))


def param_names(spec: Spec) -> tuple[str, ...]:
    return (A, B, ROUTER)


def _kaiming_transposed(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """nn.Linear's default init of a (rows, cols) weight, transposed (PEFT's per-skill, per-split draw)."""
    param = torch.empty((rows, cols))
    nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
    return param.T


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's `reset_poly_parameters`: A (then B unless init_weights) skill by skill, split by split; the router
    logits ~ U(-1e-3, 1e-3) last."""
    h = spec.hyper
    d_in, d_out = spec.in_features // h.n_splits, spec.out_features // h.n_splits
    a = torch.empty(h.n_splits, h.n_skills, d_in, h.r)
    b = torch.zeros(h.n_splits, h.n_skills, h.r, d_out)
    for skill in range(h.n_skills):
        for split in range(h.n_splits):
            a[split, skill] = _kaiming_transposed(h.r, d_in, generator)
    if not h.init:
        for skill in range(h.n_skills):
            for split in range(h.n_splits):
                b[split, skill] = _kaiming_transposed(d_out, h.r, generator)
    router = torch.empty(h.n_tasks, h.n_splits * h.n_skills).uniform_(-1e-3, 1e-3, generator=generator)
    return {A: a, B: b, ROUTER: router}


def task_ids(call: CallInputs, n_tasks: int) -> torch.Tensor:
    """The call's `task_ids` as a (B,) integer tensor, checked against the router's n_tasks."""
    ids = call.kwargs.get(TASK_IDS)
    if ids is None:
        raise ValueError(
            "task_ids should not be None. A Poly adapter needs fn(base, adapter, ..., task_ids=LongTensor (B,)): "
            "the task of each example (PEFT's `model(..., task_ids=...)`)"
        )
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dim() != 1:
        what = f"a {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else repr(ids)
        raise ValueError(f"Poly: task_ids must be an integer tensor of shape (B,), got {what}")
    if ids.dtype is torch.bool:
        raise ValueError("Poly: task_ids must be integer task indices, got a bool tensor")
    if torch.compiler.is_compiling():  # no data-dependent Python branch under compile: an asynchronous check
        torch._assert_async(((ids >= 0) & (ids < n_tasks)).all(), "Poly: a task id outside [0, n_tasks)")
    elif ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if high >= n_tasks:
            raise ValueError(f"Only {n_tasks} tasks available. Found task id = {high}")
        if low < 0:
            raise ValueError(
                f"Poly: task id {low} is negative; task ids are 0 .. {n_tasks - 1} (PEFT would index the router "
                "from the end, silently using another task's weights)"
            )
    return ids


def mixing_weights(
    spec: Spec, router: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None, training: bool
) -> torch.Tensor:
    """PEFT's PolyRouter.forward: (B, splits, skills) weights summing to ~1 over the skills. In training, a
    RelaxedBernoulli(temperature=1, logits).rsample() with its exact arithmetic, uniforms from `generator`."""
    h = spec.hyper
    if router.dim() != 2 or tuple(router.shape) != (h.n_tasks, h.n_splits * h.n_skills):
        raise NotImplementedError(
            f"Poly: router logits of shape {tuple(router.shape)} (expected ({h.n_tasks}, "
            f"{h.n_splits * h.n_skills})): per-example adapter trees (funcpeft.per_example) are not supported for "
            "Poly, which already mixes its skills per example by task_ids; stack trees and vmap over them instead"
        )
    logits = router[ids.to(router.device)].view(-1, h.n_splits, h.n_skills)
    if training:
        eps = torch.finfo(logits.dtype).eps
        probs = torch.sigmoid(logits).clamp(min=eps, max=1 - eps)
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
        u = u.clamp(min=eps, max=1 - eps)
        relaxed = u.log() - (-u).log1p() + probs.log() - (-probs).log1p()  # / temperature 1.0
        logits = torch.sigmoid(relaxed).clamp(min=torch.finfo(logits.dtype).tiny, max=1.0 - eps)
    else:
        logits = torch.sigmoid(logits)
    return logits / (logits.sum(dim=-1, keepdim=True) + EPS)


def prepare_call(layers: Mapping[str, tuple[LayerSpec[Any], Params]], call: CallInputs) -> dict[str, torch.Tensor]:
    """{path: mixing weights (B, splits, skills)} for the call, computed in plan order before the model runs."""
    if not layers:
        return {}
    first = next(iter(layers.values()))[0]
    ids = task_ids(call, first.hyper.n_tasks)
    out = {}
    for path, (spec, params) in layers.items():
        router = params[ROUTER]
        generator = call.generator(router.device) if call.training else None
        out[path] = mixing_weights(spec, router, ids, generator, call.training)
    return out


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """y = base(x) + x A_b B_b / r per example b; x (B, T, in), result (B, T, out)."""
    assert result is not None
    w = ctx.call
    if w is None:
        raise ValueError(f"Poly at {ctx.path}: the call's mixing weights are missing (prepare_call did not run)")
    h = spec.hyper
    if x.dim() != 3 or x.shape[0] != w.shape[0]:
        raise ValueError(
            f"Poly at {ctx.path}: the layer input has shape {tuple(x.shape)}, but the call has {w.shape[0]} task ids; "
            "Poly needs (batch, tokens, features) inputs with one task id per batch row (PEFT's bmm)"
        )
    bs = w.shape[0]
    a = torch.einsum("bqs,qsdr->bqdr", w, params[A]).reshape(bs, spec.in_features, h.r)
    b = torch.einsum("bqs,qsrd->bqrd", w, params[B]).transpose(1, 2).reshape(bs, h.r, spec.out_features)
    delta = x.to(a.dtype).bmm(a).bmm(b) / h.r
    return (result + delta).to(result.dtype).to(x.dtype)


def forward_per_example(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor | None:
    raise NotImplementedError(
        f"Poly at {ctx.path}: per-example adapter trees (funcpeft.per_example) are not supported for Poly, which "
        "already mixes its skills per example by task_ids; stack trees and vmap over them instead"
    )


POLY = register(
    Method(
        name="poly",
        config=PolyConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        forward_per_example=forward_per_example,
        merge=MergeHooks(refuse=lambda what: NotImplementedError()),
        keys=KeyRules(
            param_prefix="poly_",
            unsuffixed=frozenset({A, B}),
            renamed=((ROUTER, "poly_router.module_logits"),),
        ),
        prepare_call=prepare_call,
        call_kwargs=frozenset({TASK_IDS}),
        kinds=frozenset({LayerKind.LINEAR}),
    )
)
