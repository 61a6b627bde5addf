"""What OFT, BOFT and HRA share: PEFT's conv-layer assumptions, checked once, and the CPU half-precision rule."""

from __future__ import annotations

from typing import Any

import torch

from .base import LayerKind, Target, UnsupportedLayerError


def require_kind(target: Target, method: str, kinds: tuple[LayerKind, ...], supported: str) -> None:
    """UnsupportedLayerError naming the module unless it is one of `kinds` (a conv must be an nn.Conv2d)."""
    conv2d = target.kind is LayerKind.CONV and target.module.weight.dim() == 4
    if target.kind in kinds and (target.kind is not LayerKind.CONV or conv2d):
        return
    raise UnsupportedLayerError(
        f"Target module {target.name!r} ({type(target.module).__name__}) is not supported by {method}. "
        f"Currently, only {supported} are supported."
    )


def square_kernel(target: Target, method: str) -> int:
    """The kernel size k of an nn.Conv2d with a k x k kernel; PEFT's conv code reads only `kernel_size[0]`."""
    kernel = tuple(target.module.kernel_size)
    if kernel[0] != kernel[1]:
        raise NotImplementedError(
            f"{method} on {target.name!r}: kernel_size={kernel} is not square; PEFT 0.21.2 sizes the adapter from "
            "kernel_size[0] only (in_channels * kernel_size[0] ** 2), so it fails on this layer. Do not target it."
        )
    return int(kernel[0])


def check_plain_conv_geometry(target: Target, method: str) -> None:
    """BOFT / HRA call `F.conv2d(x, W', b, padding=padding[0], stride=stride[0])`: refuse a conv where that is
    not the layer's own convolution (PEFT would silently compute a different one)."""
    m = target.module
    uniform = (
        isinstance(m.padding, tuple)
        and len(set(m.padding)) == 1
        and len(set(m.stride)) == 1
        and tuple(m.dilation) == (1, 1)
    )
    if not uniform:
        raise NotImplementedError(
            f"{method} on {target.name!r} (stride={m.stride}, padding={m.padding}, dilation={m.dilation}): PEFT "
            "0.21.2 runs the adapted conv with stride[0] and padding[0] only and without dilation, which is not "
            "this layer's convolution; funcpeft refuses rather than silently change the layer. Do not target it."
        )


def refuse_stacked_conv(method: str, ctx: Any) -> None:
    """A conv adapter that rebuilds the weight cannot sit on top of another adapter of the same layer."""
    if ctx.inner_op is not ctx.base_op:
        raise NotImplementedError(
            f"{method} on a conv layer builds the adapted kernel from the base weight, so it cannot be applied on "
            f"top of another adapter of the same layer (PEFT composes several {method} adapters into one kernel); "
            "activate one adapter per conv layer or merge the others first (funcpeft.merge)."
        )


def cpu_half_to_float(t: torch.Tensor) -> torch.Tensor:
    """PEFT's merge rule: fp16/bf16 adapter tensors on CPU are computed in float32 (slow half matmuls)."""
    return t.float() if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16) else t
