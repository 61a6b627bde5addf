"""Per-layer-kind helpers the methods share: the conv op of a weight, the embedding lookup, the layer op.

One home for the facts about layer kinds (funcpeft.methods.base.LayerKind), so no method re-derives them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .base import LayerKind, LayerSpec

# PEFT's float8 dtypes (utils/constants.UPCAST_DTYPES), those this torch has: low precision, no arithmetic of their own
FLOAT8_DTYPES: tuple[torch.dtype, ...] = tuple(
    d
    for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if isinstance(d := getattr(torch, n, None), torch.dtype)
)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # PEFT's ALLOWED_COMPUTE_DTYPES
# PEFT's autocast_adapter_dtype upcasts these to float32 (tuners_utils.cast_adapter_dtype)
UPCAST_DTYPES = (torch.float16, torch.bfloat16, *FLOAT8_DTYPES)

_CONV_BY_WEIGHT_DIM: dict[int, Callable[..., torch.Tensor]] = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def adapter_dtype(weight_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of a layer's adapter parameters (PEFT: fp16/bf16 layers get float32 adapters when autocasting;
    a quantised layer's packed integer weight leaves them float32)."""
    if not (weight_dtype.is_floating_point or weight_dtype.is_complex):
        return torch.float32
    return torch.float32 if autocast_adapter_dtype and weight_dtype in UPCAST_DTYPES else weight_dtype


def conv_op(spec: LayerSpec[Any]) -> Callable[..., torch.Tensor]:
    """F.conv1d / conv2d / conv3d for a conv layer's weight."""
    return _CONV_BY_WEIGHT_DIM[len(spec.weight_shape)]


def conv_op_for(weight: torch.Tensor) -> Callable[..., torch.Tensor]:
    """F.conv1d / conv2d / conv3d for a conv weight of that rank."""
    return _CONV_BY_WEIGHT_DIM[weight.dim()]


def kernel(spec: LayerSpec[Any]) -> tuple[int, ...]:
    """A conv's kernel size (empty for other kinds)."""
    return tuple(spec.weight_shape[2:]) if spec.kind is LayerKind.CONV else ()


def embed(spec: LayerSpec[Any], ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, table)` with the base nn.Embedding's own arguments (padding_idx, ...)."""
    g = spec.embedding
    return F.embedding(ids, table, g.padding_idx, g.max_norm, g.norm_type, g.scale_grad_by_freq, g.sparse)


def layer_op(
    spec: LayerSpec[Any], x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The base layer's own op with `weight` in the base weight's layout (linear / Conv1D / conv with its geometry)."""
    if spec.kind is LayerKind.CONV:
        g = spec.conv
        return conv_op(spec)(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)
    if spec.kind is LayerKind.CONV1D_HF:
        return F.linear(x, weight.T, bias)
    if spec.kind in (LayerKind.LINEAR, LayerKind.QUANT_LINEAR):  # a quantised one: `weight` dequantised
        return F.linear(x, weight, bias)
    raise TypeError(f"layer_op: no plain op for a {spec.kind.value} layer")


# -- bare parameters (LayerKind.PARAMETER): PEFT's lora.ParamWrapper dtype rules --------------------------------
def low_precision_add(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's `_LoraParameterProxy._low_prec_add`: a float8 W plus delta in delta's dtype, clamped, cast back."""
    if delta.dtype not in COMPUTE_DTYPES:
        raise RuntimeError(
            f"There is an attempt to upcast the targeted parameter to {delta.dtype} but the only supported are: "
            f"{COMPUTE_DTYPES}."
        )
    info = torch.finfo(weight.dtype)
    return (weight.to(delta.dtype) + delta).clamp(min=info.min, max=info.max).to(weight.dtype)


def cast_delta(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """PEFT's final cast in `ParamWrapper.get_delta_weight`: to W's dtype unless W is float8 (added in high precision)."""
    return delta.to(weight.device, weight.dtype) if weight.dtype in COMPUTE_DTYPES else delta.to(weight.device)


class SavesInputs(torch.autograd.Function):
    """Base of the methods' memory-lean autograd Functions (PEFT's hand-written ones: LoHa, RandLoRA, C3A).

    It saves only the tensor inputs, for backward and for forward AD (`ctx.saved_tensors`), and keeps the other
    inputs in `ctx.consts`; a subclass writes `forward` (inputs only, plain torch ops), `backward` of plain torch
    ops (so double backward works) and `jvp`. `generate_vmap_rule` makes vmap (ensembles, per-example routing)
    apply. Call it with `run`: under torch.compile it is the plain `forward` (dynamo cannot trace a custom jvp, and
    the compiler's own partitioner decides what to save), eagerly the Function.
    """

    generate_vmap_rule = True

    @classmethod
    def run(cls, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return cls.forward(*args)
        return cls.apply(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.consts = tuple(x for x in inputs if not isinstance(x, torch.Tensor))
