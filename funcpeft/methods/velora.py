"""VeLoRA (`LoraConfig(velora_config=VeloraConfig(...))`): LoRA whose lora_A gradient uses compressed activations.

The forward is LoRA's, `y = base(x) + s * B(A(dropout(x)))`, in every mode. In a training call (`dropout_rng`
given) with gradients enabled, PEFT runs lora_A through its `VeloraFunction`, and so does funcpeft
(`velora_linear`, the same arithmetic). What it saves for backward, instead of lora_A's input x (tokens, in):

- `compressed` (tokens, num_groups), in x's dtype: x padded to num_groups * d features (d = ceil(in /
  num_groups)), cut into num_groups sub-tokens of d features, each projected on the unit vector `embed` (d,);
- `embed` (d,) and lora_A's weight (r, in), which are kept anyway.

Backward: dL/dx = g @ A exactly; dL/dA = g^T @ x_hat, where x_hat = scale * (compressed (x) embed)[:, :in]
rebuilds every sub-token as its projection on `embed` — PEFT's (and VeLoRA's) approximation of g^T @ x, which
funcpeft reproduces exactly, not autograd's true gradient. The activation memory of lora_A's input drops from
in to num_groups values per token.

The projection `embed` is the per-layer buffer `lora_velora_embed` (d,), in the base weight's dtype, that PEFT
saves; funcpeft keeps it in `base` (see funcpeft.methods.base.LayerFrozen):

- init_type="random": drawn at init (normalised N(0, 1)) and fixed;
- "batch_average": each training call uses the normalised mean sub-token of its own (dropped-out) input
  (PEFT also stores it in the buffer, which only matters for its files: `velora_update` does that);
- "batch_average_once": PEFT computes it on the first training forward after creating or loading the model,
  then keeps it. funcpeft has no hidden state: a call uses the stored projection, except that a zero one
  (fresh: never computed) is computed from the call's input, which is PEFT's first step. Store the first
  step's projection with `base = velora_update(pm, base, adapter, **batch, dropout_rng=seed)` (the same seed
  as that training call) and later calls reuse it, as PEFT's do.

Merging, files and counts are LoRA's (plus the buffer in the files).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._trees import layer_frozen_key
from ..configs import LoraConfig
from . import lora
from ._registry import register
from ._variant import base_fields, linear_lora_hyper
from .base import KeyRules, LayerFrozen, LayerSpec, Method, OpContext, Params, Target

EMBED = "lora_velora_embed"


@dataclass(frozen=True)
class VeloraHyper(lora.LoraHyper):
    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"


Spec = LayerSpec[VeloraHyper]


def hyper(config: Any, target: Target) -> VeloraHyper:
    base = linear_lora_hyper(config, target, "velora_config")
    v = config.velora_config
    return VeloraHyper(**base_fields(base), num_groups=v.num_groups, scale=float(v.scale), init_type=v.init_type)


def group_dim(in_features: int, num_groups: int) -> int:
    return (in_features + num_groups - 1) // num_groups


def _subtokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(..., in) -> (tokens, num_groups, d): zero-padded to num_groups * d features, then grouped (PEFT's layout)."""
    d = group_dim(x.shape[-1], num_groups)
    if x.shape[-1] != num_groups * d:
        x = F.pad(x, (0, num_groups * d - x.shape[-1]))
    return x.reshape(-1, num_groups, d)


def normalize(embed: torch.Tensor) -> torch.Tensor:
    """PEFT's `_normalize_projection`: float32, unit norm; a zero vector becomes the normalised ones vector."""
    embed = embed.float()
    norm = torch.linalg.vector_norm(embed)
    ones = torch.ones_like(embed)
    return torch.where(norm == 0, ones / torch.linalg.vector_norm(ones), embed / norm)


def batch_projection(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The normalised mean sub-token of a batch, (d,) float32 (PEFT's `_maybe_update_embed`)."""
    return normalize(_subtokens(x.detach(), num_groups).reshape(-1, group_dim(x.shape[-1], num_groups)).mean(dim=0))


def make_embed(
    spec: LayerSpec[Any], module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> Params:
    """The fresh projection (d,), in the base weight's dtype (upcast like the adapter: `LayerFrozen.autocast`) and
    on its device (PEFT's buffer)."""
    h, weight = spec.hyper, module.weight
    assert isinstance(weight, torch.Tensor)
    d = group_dim(spec.in_features, h.num_groups)
    if weight.is_meta:
        return {EMBED: torch.empty(d, device="meta", dtype=weight.dtype)}
    embed = normalize(torch.randn(d, generator=generator)) if h.init_type == "random" else torch.zeros(d)
    return {EMBED: embed.to(weight.device, weight.dtype)}


class _VeloraLinear(torch.autograd.Function):
    """`F.linear(x, weight)` that saves compressed activations (see the module docstring) for weight's grad."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor, num_groups: int, scale: float) -> Any:
        compressed = torch.einsum("tgd,d->tg", _subtokens(x, num_groups), embed.to(dtype=x.dtype))
        return F.linear(x, weight), compressed

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, embed, num_groups, scale = inputs
        ctx.input_shape, ctx.input_dtype = tuple(x.shape), x.dtype
        ctx.num_groups, ctx.scale = num_groups, scale
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], weight, embed)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _: Any) -> Any:
        compressed, weight, embed = ctx.saved_tensors
        dtype = grad_out.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(dtype)).reshape(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            e = embed.to(dtype)
            rebuilt = (compressed.to(dtype).unsqueeze(-1) * e.view(1, 1, -1)).reshape(
                -1, compressed.shape[-1] * e.numel()
            )
            grad_w = (g.transpose(0, 1) @ (rebuilt[:, : ctx.input_shape[-1]] * ctx.scale)).to(weight.dtype)
        return grad_x, grad_w, None, None, None


def velora_linear(
    x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor, num_groups: int, scale: float
) -> torch.Tensor:
    """`x @ weight.T` (x (..., in), weight (r, in)) whose weight gradient is VeLoRA's (PEFT's VeloraFunction)."""
    out: torch.Tensor = _VeloraLinear.apply(x, weight, embed, num_groups, scale)[0]
    return out


_CAPTURE: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "velora_capture", default=None
)


def projection(spec: Spec, stored: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The projection a training call uses at this layer, in the stored buffer's dtype (see the module docstring)."""
    h = spec.hyper
    if h.init_type == "random":
        return stored
    batch = batch_projection(x, h.num_groups).to(stored.dtype)
    if h.init_type == "batch_average":
        return batch
    return torch.where((stored == 0).all(), batch, stored)  # batch_average_once: zero = not computed yet


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """LoRA's output; in a training call with gradients enabled, lora_A through `velora_linear`."""
    assert result is not None
    h = spec.hyper
    a, b = params["lora_A"], params["lora_B"]
    out_dtype = result.dtype
    x = ctx.dropout(x.to(a.dtype), h.dropout)
    capture = _CAPTURE.get()
    if capture is not None and ctx.training:
        capture[ctx.path] = projection(spec, params[EMBED], x)
    if ctx.training and torch.is_grad_enabled():
        after_a = velora_linear(x, a, projection(spec, params[EMBED], x), h.num_groups, h.scale)
    else:
        after_a = F.linear(x, a)
    return (result + F.linear(after_a, b) * h.scaling).to(out_dtype)


@contextlib.contextmanager
def _capturing() -> Iterator[dict[str, torch.Tensor]]:
    found: dict[str, torch.Tensor] = {}
    token = _CAPTURE.set(found)
    try:
        yield found
    finally:
        _CAPTURE.reset(token)


def velora_update(
    pm: Any,
    base: Mapping[str, torch.Tensor],
    adapter: Any,
    *args: Any,
    dropout_rng: Any,
    adapter_name: str | None = None,
    first_step: bool = False,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """PEFT's projection update of one training step, functionally: a new `base` whose VeLoRA projections are the
    ones that training call uses, as PEFT's layers store them in a training forward: this batch's for
    "batch_average"; for "batch_average_once" this batch's if the stored one is zero (fresh), else the stored one.

    pm: what get_peft_model / from_pretrained returned; adapter: the adapter's tree; args / kwargs: the model call;
    dropout_rng: the seed (or a Generator in the same state) of the training call whose inputs to use, so the
    dropout masks match. Runs the model once without gradients. Call it with each training batch (or at least
    the first one for "batch_average_once") and pass the result as `base` from then on. first_step: treat the
    stored "batch_average_once" projections as not computed yet, as PEFT does in the first training forward
    after loading an adapter (it keeps that state in memory, not in its files); then also pass
    `velora_update(..., first_step=True)`'s result to that first call. "random" projections and every other entry
    are unchanged (the same tensors).

    Args:
        pm: what get_peft_model / from_pretrained returned.
        base: `{param_name: Tensor}`, the current base tree (holding the stored projections).
        adapter: the adapter's tree.
        *args: the model call's positional inputs.
        dropout_rng: the training call's seed (or a Generator in the same state), so the dropout masks match.
        adapter_name: the VeLoRA adapter (default: pm's adapter).
        first_step: treat stored "batch_average_once" projections as not computed yet (see above).
        **kwargs: the model call's keyword inputs (input_ids (B, T), ...).

    Returns:
        A new base tree: each VeLoRA layer's projection `lora_velora_embed` (d,) (d: the sub-token size) as this
        training call uses it; every other entry is the same tensor as in `base`.
    """
    name = adapter_name or pm.adapter_name
    plan = pm.plans[name]
    if first_step:
        base = {
            **base,
            **{
                k: torch.zeros_like(base[k])
                for p, e in plan.items()
                if e.spec is not None
                and e.spec.method == VELORA.name
                and e.spec.hyper.init_type == "batch_average_once"
                for k in [layer_frozen_key(name, p, EMBED)]
            },
        }
    with _capturing() as found, torch.no_grad():
        pm.fn(
            base,
            {name: adapter} if name != pm.fn.default_adapter else adapter,
            *args,
            dropout_rng=dropout_rng,
            **kwargs,
        )
    out = dict(base)
    for path, entry in plan.items():
        spec = entry.spec
        if spec is None or spec.method != VELORA.name or spec.hyper.init_type == "random":
            continue
        if path not in found:
            raise ValueError(f"velora_update: the call did not run the VeLoRA layer {path} (is dropout_rng set?)")
        key = layer_frozen_key(name, path, EMBED)
        out[key] = found[path].to(base[key].dtype)
    return out


VELORA = register(
    Method(
        name="velora",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "velora_config",
        hyper=hyper,
        param_names=lora.param_names,
        init=lora.init,
        forward=forward,
        delta_weight=lora.delta_weight,
        layer_frozen=LayerFrozen(names=(EMBED,), make=make_embed, autocast=True),
        keys=KeyRules(unsuffixed=lora.KEYS.unsuffixed | {EMBED}, renamed=lora.KEYS.renamed),  # a buffer: no .weight
    )
)
