"""`AdaptedWeight`: a frozen weight that carries adapters and adds their term inside the layer's own op.

`functional_call` puts an AdaptedWeight where a targeted layer's weight was. When the layer calls
`F.linear` / `torch.addmm` (GPT-2 Conv1D) / `F.embedding` / `F.convNd` with it, `__torch_function__`
computes the base op on the plain weight and hands its output to each adapter's `forward`. Nothing
weight-sized is built; the weight's storage is the model's. Metadata reads (`.dtype`, `.shape`, ...)
pass through; any other op on the weight raises `UnsupportedWeightOp` instead of silently dropping the
adapter term.

An op that reads a weight as data instead of applying it as a layer (`F.multi_head_attention_forward` reads
an nn.MultiheadAttention's in_proj_weight and out_proj.weight) gets the merged weights instead, computed
from the adapters' own merge (`W + delta_weight`, or the method's merge hook), as PEFT's
lora.MultiheadAttention merges before the call: one weight-sized temporary per weight and call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .methods import weight_method
from .methods.base import Dropout, ForwardFn, Generators, LayerSpec, OpContext, Params, no_generator


class Applied(NamedTuple):
    """One adapter applied to a layer: its static facts, its tensors and the op that adds it."""

    spec: LayerSpec[Any]
    params: Params
    forward: ForwardFn  # the method's forward (or a routing wrapper around it, see funcpeft.routing)
    uses_result: bool  # False: `forward` gets result=None and runs the layer below itself (IA3 feed-forward)
    call: Any = None  # the layer's per-call data (Method.prepare_call), OpContext.call
    path: str = ""  # the module path, OpContext.path
    peers: Mapping[str, tuple[LayerSpec[Any], Params]] = {}  # adapters this one reads here (OpContext.peers)
    routed: bool = False  # params differ per example (funcpeft.routing): there is no single merged weight


Adapters = tuple[Applied, ...]


def nesting_order(adapters: Sequence[Applied]) -> Adapters:
    """A layer's adapters, innermost first, from their activation order: the same order, except that a run of
    consecutive adapters of one method with `Method.outermost_first` is reversed (PEFT applies their input
    transforms in activation order, so the first one must be the outermost op)."""
    out: list[Applied] = []
    for name, run in itertools.groupby(adapters, key=lambda a: a.spec.method):
        group = list(run)
        out += reversed(group) if weight_method(name).outermost_first else group
    return tuple(out)


class UnsupportedWeightOp(RuntimeError):
    """An op other than the layer's own was applied to an adapted weight."""


_PASSTHROUGH_PROPERTIES = (
    "dtype",
    "device",
    "shape",
    "ndim",
    "is_cuda",
    "is_meta",
    "is_cpu",
    "layout",
    "requires_grad",
    "is_leaf",
    "is_sparse",
    "is_quantized",
    "is_mkldnn",
    "is_nested",
    "names",
    "grad_fn",
    "itemsize",
    "nbytes",
    "_base",
)
_PASSTHROUGH: set[Any] = {getattr(torch.Tensor, n).__get__ for n in _PASSTHROUGH_PROPERTIES if hasattr(torch.Tensor, n)}
_PASSTHROUGH |= {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
    torch.Tensor.data_ptr,
    torch.Tensor.stride,
    torch.Tensor.is_contiguous,
    torch.Tensor.__len__,
    torch.Tensor.storage_offset,
    torch.Tensor.untyped_storage,
    torch.Tensor.__format__,
    torch.Tensor.__repr__,
}


_STAND_INS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _stand_in(weight: torch.Tensor) -> torch.Tensor:
    """A view with `weight`'s shape, dtype and device on one cached element (no allocation per call)."""
    key = (weight.dtype, weight.device)
    one = _STAND_INS.get(key)
    if one is None:
        one = _STAND_INS.setdefault(key, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return one.expand(weight.shape)


class AdaptedWeight(torch.Tensor):
    """A weight plus the adapters applied to the layer that owns it.

    Attributes: `weight` (the plain base tensor), `adapters` (tuple of `Applied`, innermost first), `dropout`,
    `generator` (the call's randomness for methods that sample, OpContext.generator), `applies_in` (the module
    path whose forward sees it: the layer's own, or `PlanEntry.applies_in`; None: the module holding it).
    """

    weight: torch.Tensor
    adapters: Adapters
    dropout: Dropout
    generator: Generators
    applies_in: str | None

    @staticmethod
    def wrap(
        weight: torch.Tensor,
        adapters: Adapters,
        dropout: Dropout,
        generator: Generators = no_generator,
        applies_in: str | None = None,
    ) -> AdaptedWeight:
        """An alias of `weight` (same storage, no copy) that carries `adapters`; shape/dtype of `weight`.

        A weight that is itself a wrapper tensor subclass (torchao's quantised tensors) cannot be aliased as
        another subclass: the carrier is then a one-element stand-in with its shape, dtype and device (such a
        layer is module-level: only `weight` and the adapters are read from the carrier, never its data)."""
        alias = _stand_in(weight) if is_traceable_wrapper_subclass(weight) else weight
        out = alias.as_subclass(AdaptedWeight)
        out.weight = weight
        out.adapters = adapters
        out.dropout = dropout
        out.generator = generator
        out.applies_in = applies_in
        return out  # type: ignore[return-value]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func in _PASSTHROUGH:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        raise UnsupportedWeightOp(
            f"funcpeft: `{name}` was applied to an adapted layer weight. Only the layer's own op "
            "(F.linear, torch.addmm for GPT-2 Conv1D, F.embedding, F.conv1d/2d/3d) knows how to add the "
            "adapter term; running anything else on the weight would silently drop it. Merge the adapter "
            "(funcpeft.merge) if you need the plain weight, or do not target this module."
        )


Op = Callable[[torch.Tensor], torch.Tensor]


def _apply(
    w: AdaptedWeight,
    x: torch.Tensor,
    base_op: Op,
    bias: torch.Tensor | None = None,
    dense: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each adapter wraps the op below it, in order (PEFT's active-adapter loop / nested mixed layers).

    For additive methods this is: run the base op once, then let each adapter add its term.
    """
    op = base_op
    for a in w.adapters:
        ctx = OpContext(w.weight, base_op, w.dropout, bias, op, w.generator, a.call, a.path, a.peers, dense)
        op = _stacked(a, ctx)
    return op(x)


def apply_module(
    w: AdaptedWeight,
    x: torch.Tensor,
    module_op: Op,
    bias: torch.Tensor | None,
    dense: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """A module-level layer (`LayerKind.module_level`: a quantised linear) with its adapters: `module_op` (the
    layer's own forward, its own kernel on its packed weight) is the base op; each adapter wraps it as in `_apply`.

    bias: the layer's bias (out,) or None; dense: `() -> the dequantised weight (out, in)`, for the methods that
    read the weight (`OpContext.float_weight`)."""
    return _apply(w, x, module_op, bias, dense)


def _stacked(applied: Applied, ctx: OpContext) -> Op:
    spec, params, forward = applied.spec, applied.params, applied.forward
    inner = ctx.inner_op
    assert inner is not None
    if not applied.uses_result:
        return lambda x: forward(spec, params, x, None, ctx)
    return lambda x: forward(spec, params, x, inner(x), ctx)


def _linear(input: torch.Tensor, weight: AdaptedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _apply(weight, input, lambda x: F.linear(x, weight.weight, bias), bias)


def _addmm(
    input: torch.Tensor,
    mat1: torch.Tensor,
    mat2: AdaptedWeight,
    *,
    beta: float = 1,
    alpha: float = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if (
        not isinstance(mat2, AdaptedWeight)
        or isinstance(mat1, AdaptedWeight)
        or out is not None
        or beta != 1
        or alpha != 1
    ):
        raise UnsupportedWeightOp("funcpeft: torch.addmm on an adapted weight is only supported as Conv1D calls it")
    return _apply(mat2, mat1, lambda x: torch.addmm(input, x, mat2.weight), input)


def _embedding(
    input: torch.Tensor,
    weight: AdaptedWeight,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    if max_norm is not None:
        raise UnsupportedWeightOp(
            "funcpeft: nn.Embedding(max_norm=...) renormalises its weight in place; not supported"
        )
    return _apply(
        weight,
        input,
        lambda x: F.embedding(x, weight.weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse),
    )


def _conv(conv: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def handler(
        input: torch.Tensor, weight: AdaptedWeight, bias: torch.Tensor | None = None, *args: Any, **kw: Any
    ) -> torch.Tensor:
        return _apply(weight, input, lambda x: conv(x, weight.weight, bias, *args, **kw), bias)

    return handler


def merged(w: torch.Tensor) -> torch.Tensor:
    """The weight with its adapters merged in, in order (each method's merge: `W + delta` or its merge hook)."""
    if not isinstance(w, AdaptedWeight):
        return w
    out = w.weight
    for applied in w.adapters:
        spec = applied.spec
        if applied.routed:
            raise NotImplementedError(
                f"per-example adapters on a {spec.kind.value} weight that its layer reads as data (PEFT: "
                f"lora.MultiheadAttention does not support mixed adapter batches): there is no single merged weight"
            )
        method = weight_method(spec.method)
        if method.merge.weight is not None:
            out = method.merge.weight(spec, applied.params, out, None)
        elif method.delta_weight is not None:
            out = out + method.delta_weight(spec, applied.params).to(out.dtype)  # PEFT: W.detach() + delta.to(W.dtype)
        else:
            raise NotImplementedError(f"method {spec.method!r} cannot merge, so it cannot adapt a weight read as data")
    return out


def _multi_head_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    if not isinstance(in_proj_weight, AdaptedWeight):
        raise UnsupportedWeightOp(
            "funcpeft: an adapter on an nn.MultiheadAttention's out_proj alone: the attention reads out_proj.weight "
            "directly and never calls out_proj, so PEFT silently ignores such an adapter. Target the "
            "MultiheadAttention itself (PEFT adapts its in_proj_weight and out_proj together)."
        )
    if any(isinstance(a, AdaptedWeight) for a in (*args, *kwargs.values())):
        raise UnsupportedWeightOp(
            "funcpeft: separate q/k/v projection weights of nn.MultiheadAttention cannot be adapted"
        )
    return F.multi_head_attention_forward(
        query,
        key,
        value,
        embed_dim_to_check,
        num_heads,
        merged(in_proj_weight),
        in_proj_bias,
        bias_k,
        bias_v,
        add_zero_attn,
        dropout_p,
        merged(out_proj_weight),
        out_proj_bias,
        *args,
        **kwargs,
    )


_HANDLERS: dict[Any, Callable[..., torch.Tensor]] = {
    F.linear: _linear,
    torch.addmm: _addmm,
    F.embedding: _embedding,
    F.conv1d: _conv(F.conv1d),
    F.conv2d: _conv(F.conv2d),
    F.conv3d: _conv(F.conv3d),
    F.multi_head_attention_forward: _multi_head_attention_forward,
}
