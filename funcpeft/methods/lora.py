"""LoRA: `y = base(x) + s * B(A(dropout(x)))`, with PEFT's parameter layout, init and arithmetic order.

Shapes (nn.Linear orientation even for GPT-2 Conv1D):
  linear / conv1d_hf:  lora_A (r, in), lora_B (out, r)
  embedding:           lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r)
  conv (N-d):          lora_A (r, in, *kernel), lora_B (out, r // groups, 1, ..., 1)
  mha:                 lora_A (r, embed), lora_B (3 * embed, r) on in_proj_weight
  lora_bias=True:      lora_B_bias (out,) as well (PEFT's `lora_B.bias`; not on embeddings): y = base(x) + s * (B A x + b)

nn.MultiheadAttention (PEFT's `lora.MultiheadAttention`, one in_proj_weight only): LoRA on in_proj_weight and on
its out_proj (an nn.Linear adapted along with it). The attention reads both weights as data, so funcpeft hands
F.multi_head_attention_forward the merged weights (funcpeft._weights), as PEFT's merge -> call -> unmerge does:
one weight-sized temporary each per call, no dropout. PEFT merges the out_proj delta twice there (once itself,
once through the wrapped lora.Linear's own merge), in its forward and in merge_and_unload alike; funcpeft
reproduces that as a doubled out_proj scaling (its gradients are autograd's: PEFT's are half of its own forward's
derivative there, as the second merge bypasses autograd; docs/usage.md "Limits").
  bare parameter:      lora_A (r * E, in), lora_B (out, r * E)   (`target_parameters`, PEFT's lora.ParamWrapper)

A bare parameter W (2-D (out, in), or an expert stack (E, in, out) / (E, out, in)) has no op to hook, so its
adapted value is materialised once per call, as PEFT's parametrization does: `W' = baddbmm(W, lhs, rhs, alpha=s)`
per expert for one adapter on a stack (lhs @ rhs is expert e's B_e @ A_e in W's layout, A_e = lora_A rows
e*r:(e+1)*r, B_e = lora_B columns e::E), else `W + sum_i delta_i`; float8 weights are added in the adapters'
precision, clamped to the float8 range and cast back.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._config import init_mode
from .._quant import BITSANDBYTES, QUANT_BACKENDS
from ..configs import LoraConfig
from . import lora_init
from ._layers import FLOAT8_DTYPES, cast_delta, conv_op, embed, low_precision_add
from ._patterns import rank_and_alpha
from ._registry import register
from .base import (
    WEIGHT_OP_KINDS,
    KeyRules,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    Target,
    Tying,
)

BIAS = "lora_B_bias"  # lora_B's bias (lora_bias=True); PEFT's file key `...lora_B.bias`
KEYS = KeyRules(renamed=((BIAS, "lora_B.bias"),))


@dataclass(frozen=True)
class LoraHyper:
    r: int
    scaling: float  # alpha / r, or alpha / sqrt(r) with use_rslora (doubled on an attention's out_proj, see above)
    dropout: float  # on the input of lora_A (never on embeddings or attention weights, like PEFT)
    init: bool | str  # init_lora_weights
    lora_bias: bool = False  # lora_B has a bias (LoraConfig.lora_bias)
    mha_out_proj: bool = False  # the out_proj of a targeted nn.MultiheadAttention: only used through it
    init_args: tuple[Any, ...] = ()  # the init's own settings (funcpeft.methods.lora_init.init_args)


Spec = LayerSpec[LoraHyper]


def _check_mha(config: Any, target: Target) -> None:
    """PEFT's lora.MultiheadAttention: plain LoRA only; funcpeft also refuses lora_bias there (see the message)."""
    if config.lora_bias:
        raise NotImplementedError(
            f"lora_bias=True on the nn.MultiheadAttention {target.name!r}: PEFT's lora.MultiheadAttention merges only "
            "weights into in_proj, so its lora_B bias there would be a parameter without effect, while out_proj's "
            "bias would be merged once next to a twice-merged weight; funcpeft does not reproduce that. Use "
            "lora_bias=False or do not target the attention."
        )


def hyper(config: Any, target: Target) -> LoraHyper:
    """LoRA's (and DoRA's) hyper-parameters for one module: rank/alpha patterns, rsLoRA scaling."""
    owner = target.owner
    r, alpha = rank_and_alpha(config, owner.name if owner is not None else target.name)
    mha_out_proj = owner is not None and owner.kind is LayerKind.MHA
    if target.kind is LayerKind.MHA or mha_out_proj:
        _check_mha(config, owner if owner is not None else target)
    lora_bias = bool(getattr(config, "lora_bias", False))
    if lora_bias and target.kind is LayerKind.EMBEDDING:
        raise ValueError(f"lora_bias={lora_bias} is not supported for Embedding ({target.name!r}).")  # PEFT's check
    if lora_bias and getattr(target.module, "bias", None) is None:
        warnings.warn(
            f"`lora_bias=True` was passed but the targeted layer of type {type(target.module).__name__} has no bias. "
            "This means that merging LoRA weights won't be possible.",
            stacklevel=2,
        )
    if target.kind is LayerKind.CONV and target.module.groups > 1:
        groups = target.module.groups
        warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.", stacklevel=2)
        if r % groups != 0:
            raise ValueError(
                f"Targeting a {type(target.module).__name__} ({target.name!r}) with groups={groups} and rank {r}. "
                "Currently, support is limited to conv layers where the rank is divisible by groups. Either choose a "
                "different rank or do not target this specific layer."
            )
    if target.kind is LayerKind.PARAMETER:
        _check_parameter_target(config)
    lora_init.check_target(config.init_lora_weights, r, target)
    scaling = alpha / (r**0.5) if config.use_rslora else alpha / r
    if mha_out_proj:
        scaling *= 2  # PEFT merges out_proj's delta twice (module docstring)
    merged_only = target.kind in (LayerKind.EMBEDDING, LayerKind.MHA) or mha_out_proj
    dropout = 0.0 if merged_only else float(config.lora_dropout)
    return LoraHyper(
        r=r,
        scaling=scaling,
        dropout=dropout,
        init=config.init_lora_weights,
        lora_bias=lora_bias,
        mha_out_proj=mha_out_proj,
        init_args=lora_init.init_args(config),
    )


def _check_parameter_target(config: Any) -> None:
    """PEFT's `lora.ParamWrapper.__init__` checks, in its order (the maths cannot factor these through W')."""
    for bad, what in (
        (bool(config.lora_dropout), "lora_dropout != 0"),
        (config.fan_in_fan_out, "fan_in_fan_out"),
        (config.lora_bias, "lora_bias=True"),
        (config.use_dora, "use_dora=True"),
    ):
        if bad:
            raise ValueError(f"lora.ParamWrapper does not work with {what}.")


def param_names(spec: LayerSpec[Any]) -> tuple[str, ...]:
    if spec.kind is LayerKind.EMBEDDING:
        return ("lora_embedding_A", "lora_embedding_B")
    return ("lora_A", "lora_B", BIAS) if spec.hyper.lora_bias else ("lora_A", "lora_B")


def _shapes(spec: Spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    r = spec.hyper.r
    if spec.kind is LayerKind.CONV:
        kernel = spec.weight_shape[2:]
        return (r, spec.in_features, *kernel), (spec.out_features, r // spec.conv.groups, *([1] * len(kernel)))
    if spec.kind is LayerKind.PARAMETER:
        r *= spec.parameter.experts  # PEFT: one nn.Linear pair holding every expert's factors
    return (r, spec.in_features), (spec.out_features, r)


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)), the default init of nn.Linear/nn.ConvNd: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    t = torch.empty(shape)
    return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """Fresh float32 CPU parameters following PEFT's `init_lora_weights` (see funcpeft.methods.lora_init for the
    inits beyond True, False and "gaussian"; those that read the base weight finish in `init_from_weight`).

    lora_B_bias: zeros, or nn.Linear's / nn.ConvNd's default bias draw (U(+-1/sqrt(fan_in))) for False, drawn
    after lora_B as PEFT's nn.Linear(r, out, bias=True) does.
    """
    shape_a, shape_b = _shapes(spec)
    mode = spec.hyper.init
    if spec.kind in (LayerKind.LINEAR, LayerKind.CONV1D_HF) and init_mode(mode) in lora_init.WEIGHT_INITS:
        return lora_init.init(spec, generator)
    names = param_names(spec)
    if spec.kind is LayerKind.EMBEDDING:
        a = torch.randn(shape_a, generator=generator) if mode is False else torch.zeros(shape_a)
        b = torch.randn(shape_b, generator=generator)
        return dict(zip(names, (a, b)))
    if mode is False:
        a, b = kaiming_uniform(shape_a, generator), kaiming_uniform(shape_b, generator)
    elif init_mode(mode) == "gaussian":
        a, b = torch.randn(shape_a, generator=generator) / spec.hyper.r, torch.zeros(shape_b)
    else:
        a, b = kaiming_uniform(shape_a, generator), torch.zeros(shape_b)
    out = dict(zip(names, (a, b)))
    if spec.hyper.lora_bias:
        bound = 1 / math.sqrt(math.prod(shape_b[1:]))  # fan_in of lora_B: r (// groups for convs)
        bias = torch.empty(spec.out_features)
        out[BIAS] = torch.nn.init.uniform_(bias, -bound, bound, generator=generator) if mode is False else bias.zero_()
    return out


def embedding_term(spec: Spec, params: Params, ids: torch.Tensor) -> torch.Tensor:
    """`B(A[ids])`, unscaled: the embedding LoRA's term for token ids (no dropout, no input cast, like PEFT)."""
    return embed(spec, ids, params["lora_embedding_A"].T) @ params["lora_embedding_B"].T


def _check_op(spec: Spec) -> None:
    if spec.kind is LayerKind.MHA or spec.hyper.mha_out_proj:
        raise NotImplementedError(
            "An nn.MultiheadAttention's in_proj_weight / out_proj carry LoRA only inside the attention's own call "
            "(PEFT's lora.MultiheadAttention merges them there); using out_proj as a layer, or the weight in any "
            "other op, is not supported (PEFT would silently skip the adapter)."
        )


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result + s * B(A(dropout(x)))` in PEFT's order and dtypes (`s * (B A x + b)` with lora_bias); x is the
    base layer's input."""
    if spec.kind is LayerKind.PARAMETER:
        raise TypeError("a bare-parameter target has no layer op: its value comes from `parameter_value`")
    assert result is not None
    s = spec.hyper.scaling
    if spec.kind is LayerKind.EMBEDDING:
        return result + embedding_term(spec, params, x) * s
    _check_op(spec)
    a, b = params["lora_A"], params["lora_B"]
    out_dtype = result.dtype
    x = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    delta = (
        low_rank(spec, a, b, x, params.get(BIAS)) * s
    )  # rebinding frees the unscaled delta first: PEFT's peak memory
    if spec.kind is LayerKind.QUANT_LINEAR and spec.quant.backend == BITSANDBYTES:
        return result + delta.to(out_dtype)  # PEFT's bnb layers cast the term before adding (torchao / HQQ: after)
    return (result + delta).to(out_dtype)


def forward_per_example(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor | None:
    """`forward` with a different adapter per example (funcpeft.routing), as batched matmuls.

    params: lora_A (B, r, in), lora_B (B, out, r); x (B, ..., in); result (B, ..., out). None for the layer
    kinds left to the generic per-example path (vmap of `forward`).
    """
    if spec.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        return None
    _check_op(spec)
    assert result is not None
    a, b = params["lora_A"], params["lora_B"]
    x = ctx.dropout(x.to(a.dtype), spec.hyper.dropout)
    h = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2))
    s = spec.hyper.scaling
    out = torch.baddbmm(result.reshape(h.shape[0], h.shape[1], -1).to(a.dtype), h, b.transpose(1, 2), alpha=s)
    if BIAS in params:
        out = out + params[BIAS].unsqueeze(1) * s  # (B, out) -> (B, 1, out)
    return out.reshape(result.shape).to(result.dtype)


def low_rank(
    spec: Spec, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`B(A(x))` (+ lora_B's bias) for a linear / Conv1D / conv layer (PEFT's lora_A, lora_B modules), unscaled."""
    if spec.kind is LayerKind.CONV:
        conv = conv_op(spec)
        # PEFT's lora_A conv copies kernel, stride and padding but not dilation; lora_B is 1x1 with the groups
        return conv(conv(x, a, None, spec.conv.stride, spec.conv.padding), b, bias, 1, 0, 1, spec.conv.groups)
    return F.linear(F.linear(x, a), b, bias)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """s * B @ A in the base weight's layout (transposed for Conv1D and Embedding; conv kernels composed;
    per expert for a bare parameter), in the adapter's dtype."""
    s = spec.hyper.scaling
    if spec.kind is LayerKind.PARAMETER:
        return _parameter_delta(spec, params)
    if spec.kind is LayerKind.EMBEDDING:
        return (params["lora_embedding_B"] @ params["lora_embedding_A"]).T * s
    a, b = params["lora_A"], params["lora_B"]
    if spec.kind is LayerKind.CONV:
        if all(k == 1 for k in spec.weight_shape[2:]):
            w = (b.flatten(1) @ a.flatten(1)).reshape(spec.weight_shape)
        else:
            w = conv_op(spec)(a.transpose(0, 1), b).transpose(0, 1)
        return w * s
    w = b @ a
    return (w.T if spec.kind is LayerKind.CONV1D_HF else w) * s


def merge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    """PEFT: `bias.data += s * lora_B.bias` (lora_bias=True); the bias itself otherwise."""
    if BIAS not in params:
        return bias
    return (bias + params[BIAS] * spec.hyper.scaling).to(bias.dtype)


def unmerge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    if BIAS not in params:
        return bias
    return (bias - params[BIAS] * spec.hyper.scaling).to(bias.dtype)


MERGE = MergeHooks(bias=merge_bias, unbias=unmerge_bias, needs_bias=lambda spec: spec.hyper.lora_bias)


def tie(params: Params) -> Params:
    """PEFT's `ensure_weight_tying`: the LoRA of a layer tied to the input embedding (lm_head) is the embedding's,
    transposed: lora_A = lora_embedding_B^T (r, dim), lora_B = lora_embedding_A^T (vocab, r); leading dims kept."""
    return {
        "lora_A": params["lora_embedding_B"].transpose(-2, -1),
        "lora_B": params["lora_embedding_A"].transpose(-2, -1),
    }


# -- bare parameters (target_parameters) ------------------------------------------------------------------------
def _parameter_delta(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `ParamWrapper.get_delta_weight` before its cast to W's dtype: (out, in) or (E, ., .) like W."""
    a, b, s = params["lora_A"], params["lora_B"], spec.hyper.scaling
    geo = spec.parameter
    if geo.experts == 1:  # PEFT's lora.Linear.get_delta_weight: half-precision factors multiply in fp32 on CPU
        half = a.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        delta = (b.float() @ a.float()) * s if half else (b @ a) * s
        return delta.to(b.dtype) if half else delta
    a3 = a.reshape(geo.experts, -1, a.shape[-1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, geo.experts)  # (out, r, E): expert e's B is columns e::E
    return torch.einsum("o r e, e r i -> e o i" if geo.swapped else "o r e, e r i -> e i o", b3, a3) * s


def _factors(spec: Spec, params: Params, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `ParamWrapper.get_delta_factors`: (lhs, rhs) with `s * lhs @ rhs` = the delta, in W's dtype."""
    a, b, e = params["lora_A"], params["lora_B"], spec.parameter.experts
    a3 = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
    lhs, rhs = (b3, a3) if spec.parameter.swapped else (a3.transpose(-2, -1), b3.transpose(-2, -1))
    return lhs.to(dtype), rhs.to(dtype)


def parameter_value(adapters: Sequence[tuple[LayerSpec[Any], Params]], weight: torch.Tensor) -> torch.Tensor:
    """W' for a targeted bare parameter, as PEFT's `ParamWrapper._activate_lora` parametrizes it.

    adapters: [(spec, {"lora_A": (r*E, in), "lora_B": (out, r*E)})] of every active adapter, in order; weight: W.
    One adapter on an expert stack: `baddbmm(W, lhs, rhs, alpha=s)` in W's dtype (no delta the size of W); else
    `W + sum_i cast(delta_i)`, float8 W via `low_precision_add`.
    """
    low = weight.dtype in FLOAT8_DTYPES
    if len(adapters) == 1 and adapters[0][0].parameter.experts > 1 and not low:
        spec, params = adapters[0]
        lhs, rhs = _factors(spec, params, weight.dtype)
        with torch.autocast(device_type=weight.device.type, enabled=False):  # PEFT folds in W's dtype
            return torch.baddbmm(weight, lhs, rhs, alpha=spec.hyper.scaling)
    delta: torch.Tensor | None = None
    for spec, params in adapters:
        d = cast_delta(_parameter_delta(spec, params), weight)
        delta = d if delta is None else delta + d
    assert delta is not None
    return low_precision_add(weight, delta) if low else weight + delta


LORA = register(
    Method(
        name="lora",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant is None,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        forward_per_example=forward_per_example,
        merge=MERGE,
        keys=KEYS,
        init_from_weight=lora_init.init_from_weight,
        mixed_compatible=True,
        kinds=WEIGHT_OP_KINDS | {LayerKind.MHA, LayerKind.QUANT_LINEAR},
        quant_backends=QUANT_BACKENDS,  # PEFT's dispatch_bnb_4bit / _8bit, dispatch_torchao, dispatch_hqq
        tie=Tying(params=tie, on_request=True, counted=True),
        parameter_value=parameter_value,
    )
)
