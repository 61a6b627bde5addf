"""Arrow (`LoraConfig(arrow_config=ArrowConfig(...))`): a router that mixes several trained LoRA experts per token
(PEFT's ArrowLinearVariant / ArrowLoraLinearLayer, peft/tuners/lora/arrow.py), with optional GenKnowSub.

The router is an adapter of its own ("arrow_router", built by `funcpeft.create_arrow_model`); its lora_A /
lora_B exist (PEFT creates and saves them) but its forward never reads them. At each linear layer it reads
the experts' layers, which are registered adapters named in `arrow_config.task_adapter_names` (and
`gks_adapter_names`): `Method.reads_adapters`, so a call passes every tree, `fn(base, {"arrow_router": r,
"task_0": t0, ...})`, and only the router is applied (PEFT: only it is active). Per layer, for E task experts
(A_e (r, in), B_e (out, r), scaling s_e):

1. GenKnowSub (use_gks): A_e -= mean of the general experts' A, B_e -= mean of their B (PEFT subtracts in place
   once; funcpeft in every call, a pure function of the trees: outputs equal PEFT's after its first forward).
2. prototypes p_e (in,): the top right singular vector of B_e A_e, by 15 power iterations from a N(0, 1) start
   drawn with a generator seeded with `rng_seed`, in float32, without gradient (PEFT computes them once, lazily;
   funcpeft per call, which gives the same values: they depend only on the frozen experts). With rng_seed=None
   PEFT draws the start from the global RNG (not reproducible); funcpeft then seeds its generator with 0.
3. for each token x: c = softmax over experts of |x . p_e| / temperature, keeping the top_k experts (others -inf);
   delta = dropout(sum_e c_e s_e B_e A_e x) (the router's lora_dropout, on the output, as in PEFT).

Merging raises PEFT's RuntimeError (per-token routing has no single weight). Routing per example is refused
(the router reads other adapters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..configs import LoraConfig
from . import lora
from ._registry import register
from ._variant import base_fields, linear_lora_hyper
from .base import LayerSpec, MergeHooks, Method, OpContext, Params, Target


@dataclass(frozen=True)
class ArrowHyper(lora.LoraHyper):
    top_k: int = 3
    temperature: float = 1.0
    use_gks: bool = False
    rng_seed: int | None = None
    task_names: tuple[str, ...] = ()
    gks_names: tuple[str, ...] = ()


Spec = LayerSpec[ArrowHyper]


def hyper(config: Any, target: Target) -> ArrowHyper:
    base = linear_lora_hyper(config, target, "arrow_config")
    a = config.arrow_config
    if not a.task_adapter_names:
        raise ValueError(
            "arrow_config.task_adapter_names is not set: an Arrow router routes among loaded LoRA experts, so build it "
            "with funcpeft.create_arrow_model(model, task_specific_adapter_paths, arrow_config), which loads the "
            "experts and names them (PEFT's create_arrow_model)"
        )
    gks = tuple(a.gks_adapter_names or ()) if a.use_gks else ()
    return ArrowHyper(
        **base_fields(base),
        top_k=a.top_k,
        temperature=float(a.router_temperature),
        use_gks=a.use_gks,
        rng_seed=a.rng_seed,
        task_names=tuple(a.task_adapter_names),
        gks_names=gks,
    )


def reads_adapters(spec: LayerSpec[Any]) -> tuple[str, ...]:
    return (*spec.hyper.task_names, *spec.hyper.gks_names)


_START: dict[tuple[int, int, str], torch.Tensor] = {}


def _start_vector(seed: int | None, n: int, device: torch.device) -> torch.Tensor:
    """PEFT's power-iteration start: randn(n) from a generator seeded with `rng_seed` on the experts' device
    (cached: a pure function of its key)."""
    key = (0 if seed is None else int(seed), n, str(device))
    if key not in _START:
        gen = torch.Generator(device=device.type).manual_seed(key[0])
        _START[key] = torch.randn(n, dtype=torch.float32, device=device, generator=gen)
    return _START[key]


def prototype(a: torch.Tensor, b: torch.Tensor, seed: int | None, iters: int = 15, eps: float = 1e-8) -> torch.Tensor:
    """The top right singular vector (in,) of B @ A (A (r, in), B (out, r)) by power iteration, float32, no grad."""
    a32, b32 = a.detach().float(), b.detach().float()
    c = b32.T @ b32
    v = _start_vector(seed, a32.shape[1], a32.device)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = a32.T @ (c @ (a32 @ v))
        v = w / (w.norm() + eps)
    return v


def _experts(spec: Spec, ctx: OpContext) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """The task experts' (A, B, scaling) at this layer, GenKnowSub applied."""
    h = spec.hyper
    missing = [n for n in (*h.task_names, *h.gks_names) if n not in ctx.peers]
    if missing:
        raise ValueError(f"Arrow router at {ctx.path}: the experts {missing} were not passed to the call")
    a = [ctx.peers[n][1]["lora_A"] for n in h.task_names]
    b = [ctx.peers[n][1]["lora_B"] for n in h.task_names]
    if h.use_gks and h.gks_names:  # PEFT: in-place `.data.sub_`, outside autograd: the means are constants
        avg_a = torch.stack([ctx.peers[n][1]["lora_A"] for n in h.gks_names]).mean(0).detach()
        avg_b = torch.stack([ctx.peers[n][1]["lora_B"] for n in h.gks_names]).mean(0).detach()
        a, b = [t - avg_a for t in a], [t - avg_b for t in b]
    return a, b, [ctx.peers[n][0].hyper.scaling for n in h.task_names]


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result` + the routed mixture of the experts' LoRA terms (see the module docstring)."""
    assert result is not None
    h = spec.hyper
    a, b, scales = _experts(spec, ctx)
    protos = torch.stack([prototype(ai, bi, h.rng_seed).to(ai.dtype) for ai, bi in zip(a, b)])  # (E, in)
    x = x.to(a[0].dtype)
    tok = x.reshape(-1, x.shape[-1])
    sim = torch.abs(tok @ protos.T)  # (t, E)
    top_v, idx = torch.topk(sim, h.top_k, dim=1)
    scores = tok.new_full(sim.shape, float("-inf")).scatter(1, idx, top_v)
    coeff = torch.softmax(scores / h.temperature, dim=1)
    z = torch.einsum("tf, erf -> ter", tok, torch.stack(a))
    y = torch.einsum("ter, eor -> teo", z, torch.stack(b))
    y = y * torch.tensor(scales, device=tok.device, dtype=tok.dtype).view(1, -1, 1)
    delta = ctx.dropout(torch.einsum("te, teo -> to", coeff, y), h.dropout)
    return result + delta.view(*x.shape[:-1], delta.shape[-1])


def _refuse(what: str) -> Exception:
    return RuntimeError(f"Cannot {what} an active Arrow router adapter. Remove it first.")


ARROW = register(
    Method(
        name="arrow",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "arrow_config",
        hyper=hyper,
        param_names=lora.param_names,
        init=lora.init,
        forward=forward,
        merge=MergeHooks(refuse=_refuse),
        reads_adapters=reads_adapters,
    )
)
