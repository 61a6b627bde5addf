"""Activated LoRA (`LoraConfig(alora_invocation_tokens=[...])`): the adapter applies only from the last occurrence
of the invocation token sequence on (PEFT's ALoraLinearVariant), so the KV cache before it is the base model's.

Parameters, init and files are LoRA's (linear layers only). The adapter needs to know, in every adapted layer,
where each row's invocation starts. Functionally that is input-level information computed once per call
(`prepare_call`, before the model runs) and handed to each layer as `ctx.call`: a LongTensor `offsets` (B,),
the distance of the invocation start from the end of the row (PEFT's `alora_offsets`; 0: not found). Where
it comes from, as in PEFT's `PeftModelForCausalLM.forward`:

- `fn(..., alora_offsets=[...])` (PEFT's special forward argument: a list with None for "not found", or a
  tensor), consumed by funcpeft and never passed to the model;
- else, for task_type="CAUSAL_LM", from `input_ids` (keyword, or the first positional argument) by
  `invocation_offsets` (vectorised; PEFT loops in Python). Only `inputs_embeds`: warned, no activation.
- else (another task type: PEFT warns at config time): no offsets, the adapter never applies.

In a layer whose output has T tokens per row (B, T, out), token t of row i gets the LoRA term iff
t >= T - min(offsets[i], T); a 2-d output (B, out) is one token per row. funcpeft computes the term for all
tokens and selects (PEFT computes it on the selected tokens only): the same outputs and gradients, static
shapes for compile and vmap; only lora_dropout masks are drawn over all tokens (PEFT draws them over the
selected ones). GPT-2's Conv1D sees (B*T, in): funcpeft views it as (B, T, in) from the offsets' B.

Generation: PEFT computes the offsets once from the prompt (`input_ids` of `generate`) and keeps them for
every step; with a KV cache each decoding step has T = 1 and offset >= 1, so every generated token is adapted,
and the prefill adapts the prompt from the invocation on. `funcpeft.generate` does the same (it binds the
prompt's offsets, or `alora_offsets=`, into the bound model once). A hand-written generate loop over `fn` must pass the prompt's offsets (`invocation_offsets(prompt_ids, tokens)`) as `alora_offsets=` at
each step instead of letting funcpeft recompute them from the step's (single-token) input_ids, and must use a
KV cache (without one, offsets counted from the end point at the wrong tokens, in PEFT as well). Beam search
is refused by PEFT for aLoRA.

Merging is refused (PEFT: "aLoRA does not support merging."): no single weight applies the term to some
tokens only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import LoraConfig, TaskType
from . import lora
from ._registry import register
from ._variant import base_fields, linear_lora_hyper
from .base import CallInputs, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target

OFFSETS_KWARG = "alora_offsets"


@dataclass(frozen=True)
class AloraHyper(lora.LoraHyper):
    tokens: tuple[int, ...] = ()
    causal_lm: bool = False  # PEFT computes offsets from input_ids only for task_type CAUSAL_LM


Spec = LayerSpec[AloraHyper]


def hyper(config: Any, target: Target) -> AloraHyper:
    base = linear_lora_hyper(config, target, "alora_invocation_tokens")
    causal = config.task_type == TaskType.CAUSAL_LM
    return AloraHyper(**base_fields(base), tokens=tuple(config.alora_invocation_tokens), causal_lm=causal)


def invocation_offsets(input_ids: torch.Tensor, tokens: Any) -> torch.Tensor:
    """PEFT's `calculate_alora_offsets` for one invocation sequence.

    Pure tensor ops (no data-dependent Python), so it traces and vmaps.

    Args:
        input_ids: (B, T) token ids (or (T,), taken as one row).
        tokens: the invocation token sequence (e.g. `config.alora_invocation_tokens`), any iterable of ints.

    Returns:
        (B,) long: T - the start of the LAST occurrence of `tokens` in each row, 0 where it does not occur (also
        for an empty or too long `tokens`); pass it as `fn(..., alora_offsets=...)`.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    seq = torch.as_tensor(list(tokens), dtype=input_ids.dtype, device=input_ids.device)
    n, t = seq.numel(), input_ids.shape[-1]
    if n == 0 or n > t:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    windows = input_ids.unfold(-1, n, 1)  # (B, T - n + 1, n)
    match = (windows == seq).all(-1)
    starts = torch.arange(t - n + 1, device=input_ids.device)
    last = torch.where(match, starts, -1).amax(-1)  # -1: not found
    return torch.where(last >= 0, t - last, 0).long()


def _explicit(offsets: Any, device: torch.device) -> torch.Tensor:
    """`alora_offsets` as passed to fn: a list (None = not found) or a tensor -> (B,) long."""
    if isinstance(offsets, torch.Tensor):
        return offsets.to(device=device, dtype=torch.long)
    if isinstance(offsets, (list, tuple)) and all(o is None or isinstance(o, int) for o in offsets):
        return torch.tensor([0 if o is None else int(o) for o in offsets], dtype=torch.long, device=device)
    raise TypeError(f"alora_offsets must be a list of ints (None: no invocation) or a LongTensor (B,), got {offsets!r}")


def prepare_call(layers: Mapping[str, tuple[LayerSpec[Any], Params]], call: CallInputs) -> dict[str, Any]:
    """The call's offsets (B,) for every layer (the same tensor), or nothing: the adapter stays off."""
    if not layers:
        return {}
    spec, params = next(iter(layers.values()))
    device = params["lora_A"].device
    offsets: torch.Tensor | None = None
    if call.kwargs.get(OFFSETS_KWARG) is not None:
        offsets = _explicit(call.kwargs[OFFSETS_KWARG], device)
    elif spec.hyper.causal_lm:
        ids = call.kwargs.get("input_ids")
        if ids is None and call.args and isinstance(call.args[0], torch.Tensor):
            ids = call.args[0]
        if ids is not None:
            offsets = invocation_offsets(ids, spec.hyper.tokens).to(device)
        elif call.kwargs.get("inputs_embeds") is not None:
            warnings.warn(
                "Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for this forward pass.",
                stacklevel=2,
            )
    return {} if offsets is None else dict.fromkeys(layers, offsets)


def _tokens(spec: Spec, t: torch.Tensor, b: int, where: str) -> tuple[torch.Tensor, int]:
    """`t` as (B, T, features) and T, following PEFT's reading of the layer output's shape."""
    if t.dim() == 3 and t.shape[0] == b:
        return t, t.shape[1]
    if t.dim() == 2 and t.shape[0] == b:
        return t.unsqueeze(1), 1
    if t.dim() == 2 and spec.kind is LayerKind.CONV1D_HF and t.shape[0] % b == 0:  # Conv1D flattens (B*T, in)
        return t.reshape(b, t.shape[0] // b, t.shape[1]), t.shape[0] // b
    raise ValueError(
        f"aLoRA at {where}: the layer output has shape {tuple(t.shape)}, but the call's alora offsets are for a batch "
        f"of {b} rows; aLoRA needs (batch, tokens, features) or (batch, features) (PEFT's reading)"
    )


def _mask(offsets: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T, 1) bool: token t of row i is at or after the invocation start (PEFT's `pos >= T - offsets`)."""
    pos = torch.arange(t, device=offsets.device).unsqueeze(0)
    return (pos >= (t - offsets.clamp(max=t)).unsqueeze(1)).unsqueeze(-1)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`result` plus LoRA's term on the activated tokens (all of it off without offsets)."""
    assert result is not None
    offsets = ctx.call
    if offsets is None:
        return result
    a, b = params["lora_A"], params["lora_B"]
    rows = offsets.shape[0]
    r3, t = _tokens(spec, result, rows, ctx.path)
    x3, _ = _tokens(spec, x.to(a.dtype), rows, ctx.path)
    delta = F.linear(F.linear(ctx.dropout(x3, spec.hyper.dropout), a), b) * spec.hyper.scaling
    out = r3 + torch.where(
        _mask(offsets.to(result.device), t), delta, torch.zeros((), dtype=delta.dtype, device=delta.device)
    )
    return out.to(result.dtype).reshape(result.shape)


def forward_per_example(
    spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext
) -> torch.Tensor | None:
    """`forward` with a different adapter per example (funcpeft.routing): lora_A (B, r, in), lora_B (B, out, r),
    x (B, ..., in) with the batch first; the offsets are per row already."""
    assert result is not None
    offsets = ctx.call
    if offsets is None:
        return result
    a, b = params["lora_A"], params["lora_B"]
    rows = result.shape[0]
    r3 = result.reshape(rows, -1, result.shape[-1])
    x3 = ctx.dropout(x.to(a.dtype).reshape(rows, -1, x.shape[-1]), spec.hyper.dropout)
    delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2)) * spec.hyper.scaling
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    out = r3 + torch.where(_mask(offsets.to(result.device), r3.shape[1]), delta, zero)
    return out.to(result.dtype).reshape(result.shape)


def _refuse(what: str) -> Exception:
    return NotImplementedError(
        "aLoRA does not support merging." if what == "merge" else "aLoRA does not support unmerging."
    )


ALORA = register(
    Method(
        name="alora",
        config=LoraConfig,
        accepts=lambda config: config.lora_variant == "alora_invocation_tokens",
        hyper=hyper,
        param_names=lora.param_names,
        init=lora.init,
        forward=forward,
        forward_per_example=forward_per_example,
        merge=MergeHooks(refuse=_refuse),
        prepare_call=prepare_call,
        call_kwargs=frozenset({OFFSETS_KWARG}),
    )
)
