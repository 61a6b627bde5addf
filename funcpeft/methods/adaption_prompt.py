"""Llama-Adapter (`AdaptionPromptConfig`): gated attention over learned prompts in the top attention modules.

PEFT wraps each of the top `adapter_layers` attention modules in an `AdaptedAttention` that runs the module,
then adds `gate * softmax(q k_p^T / sqrt(head_dim)) v_p` (through o_proj for Llama / Mistral; not for GPT-2),
where k_p / v_p are the module's own key / value projections of the `adapter_len` prompt vectors and q the
module's (rotary-embedded) queries, recomputed from its input. The gate starts at zero, so a fresh adapter
leaves the model's output unchanged. funcpeft does the same as a whole-module adapter (`Method.module_forward`):
the attention's forward runs as it is on the call's base tensors and this term is added to its output; the model
is never changed. Per layer the adapter tree holds PEFT's `adaption_prompt` (1, adapter_len, hidden) and
`adaption_gate` (1,), saved as `base_model.model.{attention path}.adaption_prompt` / `.adaption_gate`.

Arithmetic, dtype casts and the head layout follow PEFT 0.21.2's `layer.py` exactly, including its key/value
head count `num_heads // (k_proj.in_features // k_proj.out_features)`, which funcpeft checks against the
module's k_proj (PEFT's formula assumes hidden_size == num_heads * head_dim; another model is refused, not run
wrong). Nothing weight-sized is materialised: the prompt's keys and values are (1, adapter_len, kv_dim).
Merging is refused (no weight represents the term), as PEFT has no merge for it. Per-example routing (which
PEFT's AdaptionPrompt cannot do) gives each example its own prompt and gate in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from ..configs.adaption_prompt import AdaptionPromptConfig, check_model_type
from ._registry import register
from .base import KeyRules, LayerKind, LayerSpec, MergeHooks, Method, Params, Target, UnsupportedLayerError

_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class AdaptionPromptHyper:
    """One adapted attention module. gpt2: GPT-2's fused c_attn layout (else Llama / Mistral's projections);
    kv_heads: the prompt's key / value heads (PEFT's `num_heads // factor`), repeated `num_heads // kv_heads` times."""

    gpt2: bool
    adapter_len: int
    hidden_size: int
    num_heads: int
    head_dim: int
    kv_heads: int


Spec = LayerSpec[AdaptionPromptHyper]


def _positive(config: AdaptionPromptConfig, name: str) -> int:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"AdaptionPromptConfig.{name} must be a positive int, got {value!r} (PEFT fails later with an unclear "
            + ("TypeError" if value is None else "result: adapter_layers=0 adapts every layer")
            + ")"
        )
    return value


def module_targets(model: nn.Module, config: AdaptionPromptConfig, match: Callable[[], list[str]]) -> list[str]:
    """PEFT's `AdaptionPromptModel.add_adapter`: the last `adapter_layers` modules named `*.{target_modules}`
    (its own rule: `match`, PEFT's generic matching, is not used)."""
    check_model_type(model)
    _positive(config, "adapter_len")
    layers = _positive(config, "adapter_layers")
    name = config.target_modules
    found = [n for n, _ in model.named_modules() if n.endswith(f".{name}")]
    if len(found) < layers:
        raise ValueError(
            f"Config specifies more adapter layers '{layers}' than the model has '{len(found)}' (modules named "
            f"'*.{name}')."
        )
    return found[-layers:]


def hyper(config: AdaptionPromptConfig, target: Target) -> AdaptionPromptHyper:
    module: Any = target.module
    cfg = getattr(module, "config", None)
    what = f"AdaptionPrompt cannot adapt {target.name!r} ({type(module).__module__}.{type(module).__name__})"
    gpt2 = getattr(cfg, "model_type", None) == "gpt2"
    needs = ("c_attn", "c_proj") if gpt2 else _LLAMA_PROJECTIONS
    missing = [n for n in needs if not isinstance(getattr(module, n, None), nn.Module)]
    if cfg is None or missing or not isinstance(getattr(module, "head_dim", None), int):
        raise UnsupportedLayerError(
            f"{what}: PEFT's AdaptedAttention{'GPT' if gpt2 else ''} needs an attention module with `config`, "
            f"`head_dim` and the sub-modules {list(needs)} (missing: {missing or ['config / head_dim']})"
        )
    num_heads, head_dim = int(cfg.num_attention_heads), int(module.head_dim)
    kv_heads = num_heads
    if not gpt2:
        k_proj = module.k_proj
        factor = k_proj.in_features // k_proj.out_features  # PEFT's rule for Mistral-style grouped key / values
        if factor < 1 or num_heads % factor or (num_heads // factor) * head_dim != k_proj.out_features:
            raise UnsupportedLayerError(
                f"{what}: PEFT computes the prompt's key/value heads as num_heads // (k_proj.in_features // "
                f"k_proj.out_features) = {num_heads} // {factor if factor else 0}, which does not fit this module's "
                f"k_proj ({k_proj.in_features} -> {k_proj.out_features}, head_dim {head_dim}); PEFT would crash or "
                "be wrong here"
            )
        kv_heads = num_heads // factor
    return AdaptionPromptHyper(gpt2, config.adapter_len, int(cfg.hidden_size), num_heads, head_dim, kv_heads)  # type: ignore[arg-type]


def param_names(spec: Spec) -> tuple[str, ...]:
    return ("adaption_prompt", "adaption_gate")


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's draw: the prompt ~ N(0, 1) of shape (1, adapter_len, hidden); the gate zero ("zero-init")."""
    h = spec.hyper
    prompt = torch.empty(1, h.adapter_len, h.hidden_size)
    if prompt.device.type != "meta":
        prompt.normal_(generator=generator)
    return {"adaption_prompt": prompt, "adaption_gate": torch.zeros(1)}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _queries(h: AdaptionPromptHyper, module: Any, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The module's queries (bsz, num_heads, q_len, head_dim), recomputed as PEFT's `*_compute_query_states`."""
    bsz, q_len = hidden.shape[:2]
    if h.gpt2:
        if kwargs.get("encoder_hidden_states") is not None:
            if not hasattr(module, "q_attn"):
                raise ValueError(
                    f"If `{module.__class__.__name__}` is used as cross attention, the weights `q_attn` must be "
                    "defined. Please make sure to instantiate it with `GPT2Attention(..., is_cross_attention=True)`."
                )
            q = module.q_attn(hidden)
        else:
            q = module.c_attn(hidden).split(module.split_size, dim=2)[0]
        return q.view(*q.shape[:-1], -1, h.head_dim).transpose(1, 2)
    q = module.q_proj(hidden).view(bsz, q_len, h.num_heads, h.head_dim).transpose(1, 2)
    rope = kwargs.get("position_embeddings")
    if rope is None:
        raise ValueError(
            f"AdaptionPrompt on {type(module).__name__}: the attention was called without `position_embeddings` "
            "(cos, sin), which transformers' decoder layers pass; funcpeft needs them for the queries' rotary embedding"
        )
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin)


def _forward(
    batched: bool,
    spec: Spec,
    params: Params,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    output: Any,
) -> Any:
    """The attention's output tuple with PEFT's gated prompt attention added to its first element.

    output[0]: (bsz, q_len, hidden); adaption_prompt: (1, adapter_len, hidden) and adaption_gate (1,), or with
    `batched` example i's: (bsz, 1, adapter_len, hidden) and (bsz, 1).
    """
    h = spec.hyper
    m: Any = module
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    attn_output, rest = output[0], tuple(output[1:])
    bsz, q_len, embed_dim = attn_output.shape
    lead = bsz if batched else 1  # the prompts' leading dim: one per example, or one shared (PEFT's)
    prompt, gate = params["adaption_prompt"], params["adaption_gate"].view(lead, 1, 1, 1)
    if h.gpt2:
        _, key, value = m.c_attn(prompt).split(embed_dim, dim=-1)
    else:
        key, value = m.k_proj(prompt), m.v_proj(prompt)
    repeats = h.num_heads // h.kv_heads
    # (bsz, num_heads, adapter_len, head_dim)
    adapter_k = key.reshape(lead, h.adapter_len, h.kv_heads, h.head_dim).repeat(bsz // lead, 1, 1, 1).transpose(1, 2)
    adapter_v = value.reshape(lead, h.adapter_len, h.kv_heads, h.head_dim).repeat(bsz // lead, 1, 1, 1).transpose(1, 2)
    if not h.gpt2:
        adapter_k = torch.repeat_interleave(adapter_k, repeats=repeats, dim=1)
        adapter_v = torch.repeat_interleave(adapter_v, repeats=repeats, dim=1)
    query = _queries(h, m, hidden, kwargs)
    previous_dtype = query.dtype
    scores = torch.matmul(query, adapter_k.transpose(2, 3).to(previous_dtype)) / math.sqrt(h.head_dim)
    # (bsz, num_heads, q_len, adapter_len): softmax in float32, as PEFT
    scores = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(previous_dtype)
    adapter_output = torch.matmul(scores, adapter_v).transpose(1, 2).reshape(bsz, q_len, -1)
    if not h.gpt2:
        adapter_output = m.o_proj(adapter_output)
    return ((attn_output + adapter_output).to(previous_dtype), *rest)


# Method.module_forward (one prompt and gate for the batch, PEFT's) and module_forward_per_example (per-example
# routing: every param with a leading batch dim)
module_forward = partial(_forward, False)
module_forward_per_example = partial(_forward, True)


def check_stack(specs: tuple[LayerSpec[Any], ...]) -> None:
    raise TypeError(
        f"Unable to stack multiple adaption prompts ({len(specs)} AdaptionPrompt adapters on one attention module "
        "in one call; PEFT runs one at a time): call fn with one of them"
    )


def _no_weight_op(*args: Any) -> NoReturn:
    raise NotImplementedError("AdaptionPrompt wraps whole attention modules (module_forward): it has no weight op")


def _refuse(what: str) -> Exception:
    return NotImplementedError(
        f"AdaptionPrompt cannot {what}: its gated prompt attention is no change of any weight (PEFT's "
        "AdaptionPromptModel has no merge either)"
    )


ADAPTION_PROMPT = register(
    Method(
        name="adaption_prompt",
        config=AdaptionPromptConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=_no_weight_op,
        merge=MergeHooks(refuse=_refuse),
        keys=KeyRules(param_prefix="adaption_", unsuffixed=frozenset({"adaption_prompt", "adaption_gate"})),
        check_stack=check_stack,
        kinds=frozenset({LayerKind.MODULE}),
        module_forward=module_forward,
        module_targets=module_targets,
        module_forward_per_example=module_forward_per_example,
        autocast=False,  # AdaptionPromptModel is no BaseTuner: PEFT never upcasts its parameters
    )
)
