"""MonteCLoRA (`LoraConfig(monteclora_config=MontecloraConfig(...))`): LoRA whose lora_A is a Monte Carlo average
of sampled perturbations during training (PEFT's MontecloraSampler, peft/tuners/lora/monteclora.py).

Parameters (per linear layer): LoRA's lora_A (r, in), lora_B (out, r), plus the sampler's
`lora_monteclora_sampler.std_prior` (r,) and `.expert_weights_prior` (N,) (N = num_samples), both U(0, 1) at
init like PEFT's, trainable. Buffers PEFT saves: `.gaussian_var_prior` (r, r) and `.expert_weights` (N,)
(identity and 1/N at init): PEFT overwrites them in every training forward and reads them only in its
variational loss; funcpeft keeps them in `base` for the files and computes the loss from the call's samples.

Eval calls are plain LoRA. A training call (`dropout_rng` given) draws, for every MonteCLoRA layer and before
the model runs, one sample set from the call's randomness (`OpContext.generator`: the Generator passed, or the
seeded fork of the global RNG of an int seed; never the process-global stream): z_mvn (N, in, r) and
z_dirichlet (N,) standard normal, z_wishart (r, r) by Bartlett's decomposition of Wishart(df=r, I). Then,
as PEFT's sampler: std = diag(exp(std_prior)); Sigma = diag(clip(diag(std z_wishart std^T), 1e-3));
noise = sample_scaler * z_mvn @ chol(Sigma); w = softmax(Dirichlet reparameterisation of exp(expert_weights_prior)
with z_dirichlet); A' = (sum_n w_n (A^T + noise_n))^T; y = base(x) + s * B(A'(dropout(x))).
PEFT draws its normals ahead into a buffer of `buffer_size` sample sets at init (from the global RNG) and
cycles through it; funcpeft draws each call's set from that call's randomness instead (same distribution, no
hidden state; `buffer_size` is kept for the config only). If a sample is NaN, PEFT warns and uses A: so does
funcpeft (without a warning: the choice is a tensor select, so it traces and vmaps).

The extra loss term is the pure function `monteclora_loss(adapter, config, dropout_rng=seed)`: PEFT's
`_get_monteclora_loss` after the training call `fn(..., dropout_rng=seed)` (it redraws that call's samples).
Merging is LoRA's (the samples are ignored, as in PEFT).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import LoraConfig
from . import lora
from ._registry import register
from ._variant import base_fields, linear_lora_hyper
from .base import (
    LORA_UNSUFFIXED,
    CallInputs,
    Generators,
    KeyRules,
    LayerFrozen,
    LayerSpec,
    Method,
    OpContext,
    Params,
    Target,
)

SAMPLER = "lora_monteclora_sampler"
STD = f"{SAMPLER}.std_prior"
EXPERT = f"{SAMPLER}.expert_weights_prior"
GAUSSIAN_VAR = f"{SAMPLER}.gaussian_var_prior"
EXPERT_WEIGHTS = f"{SAMPLER}.expert_weights"


@dataclass(frozen=True)
class MontecloraHyper(lora.LoraHyper):
    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5


Spec = LayerSpec[MontecloraHyper]


def hyper(config: Any, target: Target) -> MontecloraHyper:
    base = linear_lora_hyper(config, target, "monteclora_config")
    m = config.monteclora_config
    return MontecloraHyper(
        **base_fields(base),
        num_samples=m.num_samples,
        use_entropy=m.use_entropy,
        dirichlet_prior=float(m.dirichlet_prior),
        sample_scaler=float(m.sample_scaler),
        kl_loss_weight=float(m.kl_loss_weight),
    )


def param_names(spec: LayerSpec[Any]) -> tuple[str, ...]:
    return (*lora.param_names(spec), STD, EXPERT)


def init(spec: LayerSpec[Any], generator: torch.Generator | None) -> Params:
    """LoRA's init, then the sampler's U(0, 1) priors (PEFT's order: std_prior, then expert_weights_prior)."""
    params = lora.init(spec, generator)
    params[STD] = torch.rand(spec.hyper.r, generator=generator)
    params[EXPERT] = torch.rand(spec.hyper.num_samples, generator=generator)
    return params


def make_buffers(
    spec: LayerSpec[Any], module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> Params:
    """The sampler's fresh buffers (PEFT's `MontecloraSampler`), in the base weight's dtype (PEFT's layer moves
    them there; autocast_adapter_dtype casts only parameters) and on its device."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    n, r = spec.hyper.num_samples, spec.hyper.r
    return {
        GAUSSIAN_VAR: torch.eye(r, device=weight.device, dtype=weight.dtype),
        EXPERT_WEIGHTS: (torch.ones(n) / n).to(weight.device, weight.dtype),
    }


# -- the samples ----------------------------------------------------------------------------------------------
def _wishart(r: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One Wishart(df=r, scale=I_r) sample (r, r), float32: torch's `Wishart._bartlett_sampling`, its draws in order."""
    df = r - torch.arange(r, dtype=torch.float32, device=device)  # chi2 degrees of freedom, r - i
    chi2 = torch._standard_gamma(df / 2, generator=generator) / 0.5  # Chi2(k) = Gamma(k / 2, rate 1 / 2)
    chi2 = chi2.detach().clamp(min=torch.finfo(chi2.dtype).tiny)
    noise = chi2.sqrt().clamp(min=torch.finfo(chi2.dtype).eps).diag_embed()
    i, j = torch.tril_indices(r, r, offset=-1, device=device)
    noise = noise.index_put((i, j), torch.randn(r * (r - 1) // 2, generator=generator, device=device))
    return noise @ noise.transpose(-2, -1)


def draw_samples(spec: Spec, params: Params, generator: Generators) -> Params:
    """One layer's sample set for a training call: z_mvn (N, in, r), z_wishart (r, r), z_dirichlet (N,)."""
    like = params[STD]
    gen = generator(like.device)
    n, r = spec.hyper.num_samples, spec.hyper.r
    z_mvn = torch.randn((n, spec.in_features, r), generator=gen, device=like.device, dtype=like.dtype)
    z_dirichlet = torch.randn((n,), generator=gen, device=like.device, dtype=like.dtype)
    z_wishart = _wishart(r, gen, like.device).to(like.dtype)  # PEFT samples it in float32, then casts
    return {"z_mvn": z_mvn, "z_wishart": z_wishart, "z_dirichlet": z_dirichlet}


def prepare_call(layers: Mapping[str, tuple[LayerSpec[Any], Params]], call: CallInputs) -> dict[str, Params]:
    """A training call's sample sets, {path: samples}, drawn in plan order before the model runs (eval: none)."""
    if not call.training:
        return {}
    return {path: draw_samples(spec, params, call.generator) for path, (spec, params) in layers.items()}


def _sampled(spec: Spec, params: Params, samples: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `MontecloraSampler.forward`: (noise (N, in, r), expert weights (N,), gaussian_var (r, r))."""
    h = spec.hyper
    std_prior, expert_prior = params[STD], params[EXPERT]
    z_mvn, z_wishart, z_dirichlet = (samples[k].to(std_prior.dtype) for k in ("z_mvn", "z_wishart", "z_dirichlet"))
    std = torch.diag(torch.exp(std_prior))
    var = std @ z_wishart @ std.T
    gaussian_var = torch.diag(torch.clip(var.diag(), min=1e-3))
    chol = torch.linalg.cholesky(gaussian_var.float()).to(gaussian_var.dtype)
    noise = h.sample_scaler * torch.nan_to_num(torch.einsum("eio,op->eip", z_mvn, chol), nan=1e-3)
    weights = torch.softmax(_dirichlet(h.num_samples, torch.exp(expert_prior), z_dirichlet), dim=-1)
    return noise, weights, gaussian_var


def _dirichlet(n: int, alpha: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """PEFT's `dirichlet_reparameterization`: the logits of a log-normal approximation of Dirichlet(alpha)."""
    eps = 1e-6
    alpha = torch.clamp(alpha, min=eps)
    mu = torch.log(alpha) - torch.log(alpha).mean()
    diag = torch.clamp(1 / alpha * (1 - 2 / n) + 1 / (n**2) * (1 / alpha).sum(), min=eps)
    sigma = torch.diag(diag) + eps * torch.eye(n, device=alpha.device)
    # a positive diagonal: its Cholesky factor always exists (PEFT's LinAlgError fallback never triggers)
    chol = torch.linalg.cholesky(sigma.float()).to(sigma.dtype)
    return chol @ z + mu


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """LoRA's output; in a training call lora_A is the sample-weighted average of its perturbed copies."""
    assert result is not None
    a, b = params["lora_A"], params["lora_B"]
    out_dtype = result.dtype
    x = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    if ctx.training:
        if ctx.call is None:
            raise ValueError(f"MonteCLoRA at {ctx.path}: a training call without samples (prepare_call did not run)")
        noise, weights, _ = _sampled(spec, params, ctx.call)
        averaged = torch.einsum("n,nij->ij", weights, a.T + torch.nan_to_num(noise, nan=0.0)).T
        a = torch.where(noise.isnan().any() | weights.isnan().any(), a, averaged)  # PEFT: NaN samples -> plain A
    return (result + F.linear(F.linear(x, a), b) * spec.hyper.scaling).to(out_dtype)


def forward_per_example(
    spec: LayerSpec[Any], params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor | None:
    """Eval calls: LoRA's batched per-example forward. Training calls cannot route (one sample set per layer)."""
    if ctx.training:
        raise NotImplementedError(
            f"MonteCLoRA at {ctx.path}: per-example adapters in a training call (dropout_rng): PEFT draws one sample "
            "set per adapter and forward, funcpeft one per layer and call; route MonteCLoRA adapters in eval calls only"
        )
    return lora.forward_per_example(spec, {k: params[k] for k in ("lora_A", "lora_B")}, x, result, ctx)


# -- the variational loss ------------------------------------------------------------------------------------------
def _dirichlet_kl(prior: float, n: int, alpha2: torch.Tensor) -> torch.Tensor:
    alpha1 = torch.tensor([prior] * n, device=alpha2.device)

    def gamma(x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(x).exp()

    return (
        torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum()))
        + (torch.log(gamma(alpha2) / gamma(alpha1))).sum()
        + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum()
    )


def _wishart_kl(r: int, std: torch.Tensor) -> torch.Tensor:
    var = torch.diag((std @ std.T).diag())
    return 0.5 * (-torch.log(var).trace() * r + var.trace() * r - r**2)


def _multivariate_kl(n: int, r: int, var: torch.Tensor) -> torch.Tensor:
    var = torch.clamp(var, min=1e-6)
    return n * 0.5 * (var.trace() - torch.log(var).trace() - r)


def layer_loss(spec: Spec, params: Params, samples: Params | None) -> torch.Tensor:
    """One sampler's `get_variational_loss` (KL + entropy) in training mode, after the forward that drew `samples`
    (None: before any training forward, PEFT's initial buffers)."""
    h = spec.hyper
    std_prior, expert_prior = params[STD], params[EXPERT]
    if samples is None:
        gaussian_var = torch.eye(h.r, dtype=std_prior.dtype, device=std_prior.device)
        weights = torch.ones(h.num_samples, dtype=std_prior.dtype, device=std_prior.device) / h.num_samples
    else:
        _, weights, gaussian_var = _sampled(spec, params, samples)
    kl = (
        _dirichlet_kl(h.dirichlet_prior, h.num_samples, torch.exp(expert_prior))
        + _wishart_kl(h.r, torch.diag(torch.exp(std_prior)))
        + _multivariate_kl(h.num_samples, h.r, gaussian_var)
    )
    entropy = (weights**2).sum() if h.use_entropy else 0.0
    return h.kl_loss_weight * kl + entropy


def _call_generators(dropout_rng: Any) -> Generators:
    """The randomness a training call with this dropout_rng has (funcpeft._functional): fresh generators seeded
    like the call's for an int, the generator itself otherwise."""
    if isinstance(dropout_rng, torch.Generator):
        return lambda device: dropout_rng
    if isinstance(dropout_rng, bool) or not isinstance(dropout_rng, int):
        raise TypeError(f"dropout_rng must be None, an int seed or a torch.Generator, got {dropout_rng!r}")
    gens: dict[torch.device, torch.Generator] = {}

    def get(device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(dropout_rng)
        return gens[device]

    return get


def monteclora_loss(
    pm: Any, adapter: Mapping[str, Mapping[str, torch.Tensor]], dropout_rng: Any = None, adapter_name: str | None = None
) -> torch.Tensor:
    """PEFT's `_get_monteclora_loss` for one MonteCLoRA adapter: the mean over its layers of KL + entropy.

    `fn(base, adapter, **batch, dropout_rng=s).loss + monteclora_loss(pm, adapter, s)` is PEFT's training loss
    with the variational term (for a call whose only MonteCLoRA adapter is this one).

    Args:
        pm: what get_peft_model / from_pretrained returned (its plan of `adapter_name` is read).
        adapter: the tree passed to the call.
        dropout_rng: that training call's (an int seed, or a Generator in the state it had before the call): its
            sample sets are redrawn, in the same order. None: an eval call, where PEFT's loss is 0.
        adapter_name: the MonteCLoRA adapter (default: pm's adapter).

    Returns:
        A 0-d tensor, differentiable in the adapter's leaves.
    """
    plan = pm.plans[adapter_name or pm.adapter_name]
    specs = {p: e.spec for p, e in plan.items() if e.spec is not None and e.spec.method == MONTECLORA.name}
    if not specs:
        raise ValueError("monteclora_loss: the plan has no MonteCLoRA layers (LoraConfig(monteclora_config=...))")
    leaves = next(iter(adapter[p] for p in specs))
    if dropout_rng is None:
        return torch.zeros((), dtype=leaves[STD].dtype, device=leaves[STD].device)
    generators = _call_generators(dropout_rng)
    total: Any = 0.0
    for path, entry in adapter.items():  # the call's order: its draws come in this order
        spec = specs.get(path)
        if spec is not None:
            params = dict(entry)
            total = total + layer_loss(spec, params, draw_samples(spec, params, generators))
    out: torch.Tensor = total / len(specs)
    return out


_KEYS = KeyRules(unsuffixed=LORA_UNSUFFIXED | {STD, EXPERT, GAUSSIAN_VAR, EXPERT_WEIGHTS})  # buffers: no .weight

MONTECLORA = register(
    Method(
        name="monteclora",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "monteclora_config",
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        forward_per_example=forward_per_example,
        delta_weight=lambda spec, params: lora.delta_weight(spec, {k: params[k] for k in ("lora_A", "lora_B")}),
        layer_frozen=LayerFrozen(names=(GAUSSIAN_VAR, EXPERT_WEIGHTS), make=make_buffers),
        prepare_call=prepare_call,
        keys=_KEYS,
    )
)
