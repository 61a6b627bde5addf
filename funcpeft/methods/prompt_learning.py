"""PEFT's prompt-learning family as input-level methods: prompt tuning, multitask prompt tuning, P-tuning and
prefix tuning (peft/tuners/{prompt_tuning,multitask_prompt_tuning,p_tuning,prefix_tuning}/ and the prompt-learning
branches of peft/peft_model.py's PeftModelFor* forwards).

The adapter tree's `'<prompt>'` entry holds PEFT's prompt-encoder parameters under PEFT's names: prompt tuning
`embedding.weight` (num_virtual_tokens * num_transformer_submodules, token_dim); multitask adds
`prefix_task_cols` (tasks, n, ranks) and `prefix_task_rows` (tasks, ranks, token_dim); P-tuning adds its encoder
(`mlp_head.{0,2,4}.*`, or `lstm_head.*_l{k}[_reverse]` and `mlp_head.{0,2}.*`); prefix tuning `embedding.weight`
(n, num_layers * 2 * token_dim), or (n, token_dim) and `transform.{0,2}.*` with prefix_projection. In inference
mode (a loaded, non-trainable adapter) every method but multitask holds only `embedding.weight` = the saved
`prompt_embeddings` (the encoder's output), as in PEFT.

A call computes the prompts once per call (PEFT computes them once and repeats them over the batch) and then
rewrites the call like PEFT's forward for the task type: `inputs_embeds` = [prompts; word embeddings of
input_ids], attention_mask extended with ones, CAUSAL_LM labels with -100, token_type_ids with zeros (SEQ_CLS /
TOKEN_CLS), position_ids dropped with PEFT's warning; prefix tuning passes the prefixes as a transformers
Cache in `past_key_values` (position_ids shifted by num_virtual_tokens).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._config import PeftType, TaskType
from .._constants import TASK_MODULES_TO_SAVE
from ..configs.prompt_learning import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)
from ._registry import register
from .base import InputContext, InputMethod, ModelCall, Params

SUPPORTED_TASKS = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "FEATURE_EXTRACTION")

# PEFT's forward signatures (PeftModelFor*.forward), to bind positional arguments of fn like PEFT does
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "CAUSAL_LM": ("input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
                  "return_dict", "task_ids"),
    "SEQ_CLS": ("input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
                "return_dict", "task_ids"),
    "TOKEN_CLS": ("input_ids", "attention_mask", "inputs_embeds", "labels", "output_attentions",
                  "output_hidden_states", "return_dict", "task_ids"),
    "FEATURE_EXTRACTION": ("input_ids", "attention_mask", "inputs_embeds", "output_attentions", "output_hidden_states",
                           "return_dict", "task_ids"),
    "SEQ_2_SEQ_LM": ("input_ids", "attention_mask", "inputs_embeds", "decoder_input_ids", "decoder_attention_mask",
                     "decoder_inputs_embeds", "labels", "output_attentions", "output_hidden_states", "return_dict",
                     "task_ids"),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """Static facts of one prompt-learning adapter (hashable).

    n: num_virtual_tokens; total: n * num_transformer_submodules (the embedding's rows); embed_path / embed_key:
    the word embedding's module path and its weight's canonical `base` key; embed_plain: it is an nn.Embedding
    (called as F.embedding; other modules run on a shallow copy). encoder: "MLP" / "LSTM" (P-tuning),
    "projection" (prefix tuning), None. return_dict_default: the model config's `return_dict` (SEQ_CLS, TOKEN_CLS).
    """

    peft_type: str
    task_type: str
    n: int
    submodules: int
    token_dim: int
    num_layers: int
    heads: int
    embed_path: str
    embed_key: str
    embed_plain: bool
    inference_mode: bool
    init: str = "RANDOM"
    encoder: str | None = None
    hidden: int = 0
    encoder_layers: int = 0
    encoder_dropout: float = 0.0
    num_tasks: int = 1
    num_ranks: int = 1
    zero_init: bool = False
    init_text: str | None = None
    tokenizer: str | None = None
    tokenizer_kwargs: tuple[tuple[str, Any], ...] = ()
    source_path: str | None = None
    source_task: int = 0
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    return_dict_default: bool = True

    @property
    def total(self) -> int:
        return self.n * self.submodules

    @property
    def prefix(self) -> bool:
        """The prompts are a key/value prefix (`past_key_values`): prefix tuning and Cartridges, as in PEFT."""
        return self.peft_type in (PeftType.PREFIX_TUNING.value, PeftType.CARTRIDGE.value)


# -- resolution and planning ----------------------------------------------------------------------------------
def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"prompt learning needs a transformers model (with a `config`); got {type(model).__name__}, which has none"
        )
    return config


def resolve(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """A new config with what PEFT fills in (`_prepare_prompt_learning_config`, `_setup_prompt_encoder`, the
    task type's modules_to_save, base_model_name_or_path)."""
    task = config.task_type.value if isinstance(config.task_type, TaskType) else config.task_type
    if task not in SUPPORTED_TASKS:
        if task == TaskType.QUESTION_ANS.value:
            raise NotImplementedError(
                f"{type(config).__name__}(task_type='QUESTION_ANS'): prompt learning for question answering is not "
                f"implemented in funcpeft; supported task types: {list(SUPPORTED_TASKS)}"
            )
        raise ValueError(
            f"{type(config).__name__}(task_type={task!r}): prompt learning needs a task type, one of "
            f"{list(SUPPORTED_TASKS)} (PEFT picks its forward by task type and has none for {task!r})"
        )
    if isinstance(config, MultitaskPromptTuningConfig) and task == TaskType.FEATURE_EXTRACTION.value:
        raise ValueError(
            "MultitaskPromptTuningConfig(task_type='FEATURE_EXTRACTION'): PEFT's PeftModelForFeatureExtraction never "
            "passes task_ids to the prompt encoder, so every PEFT call raises 'task_ids cannot be None'; use another "
            "task type or PromptTuningConfig"
        )
    if config.num_virtual_tokens is None or config.num_virtual_tokens < 1:
        raise ValueError(
            f"{type(config).__name__}.num_virtual_tokens must be a positive int, got {config.num_virtual_tokens!r}"
        )
    mc = _model_config(model)
    raw = mc.to_dict()
    if "text_config" in raw:
        raw = raw["text_config"]
    changes: dict[str, Any] = {}
    extra = TASK_MODULES_TO_SAVE.get(task, [])
    if extra:
        # PEFT appends them twice for prompt learning (PeftModelFor{SequenceClassification,TokenClassification}'s
        # __init__ and again in its add_adapter), and its adapter_config.json shows both
        changes["modules_to_save"] = list(config.modules_to_save or []) + list(extra) * 2
    changes["base_model_name_or_path"] = model.__dict__.get("name_or_path", None) or None
    out = dataclasses.replace(config, **changes)
    if out.num_layers is None:
        layers = getattr(mc, "num_hidden_layers", None) or raw.get("num_layers") or raw.get("n_layer")
        if layers is None:
            raise ValueError("Please specify `num_layers` in `peft_config`")
        out.num_layers = layers
    if out.token_dim is None:
        dim = raw.get("hidden_size") or raw.get("n_embd") or raw.get("d_model")
        if dim is None:
            raise ValueError("Please specify `token_dim` in `peft_config`")
        out.token_dim = dim
    if out.num_attention_heads is None:
        heads = next(
            (raw[k] for k in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads") if k in raw),
            None,
        )
        if heads is None:
            raise ValueError("Please specify `num_attention_heads` in `peft_config`")
        out.num_attention_heads = heads
    kv_prefix = out.PEFT_TYPE in (PeftType.PREFIX_TUNING, PeftType.CARTRIDGE)  # type: ignore[attr-defined]
    if kv_prefix and "num_key_value_heads" in raw:  # grouped-query attention (PEFT #1901)
        if raw.get("global_head_dim") is not None or raw.get("per_layer_config") is not None:
            raise NotImplementedError(
                "prefix tuning on a model with per-layer attention shapes (Gemma 4) is not implemented in funcpeft"
            )
        head_dim = raw.get("head_dim") or out.token_dim // out.num_attention_heads
        out.token_dim = head_dim * raw["num_key_value_heads"]
        out.num_attention_heads = raw["num_key_value_heads"]
    if getattr(out, "encoder_hidden_size", 0) is None:
        out.encoder_hidden_size = out.token_dim  # type: ignore[attr-defined]
    if out.num_transformer_submodules is None:
        out.num_transformer_submodules = 2 if task == TaskType.SEQ_2_SEQ_LM.value else 1
    return out


def word_embeddings(model: nn.Module) -> str:
    """The module path of the word embedding, found as PEFT's `_setup_prompt_encoder` does."""
    try:
        model.get_submodule("embeddings.word_embeddings")
        return "embeddings.word_embeddings"
    except AttributeError:
        pass
    from transformers import PreTrainedModel

    backbone_name, backbone = "", model
    for name, child in model.named_children():
        if isinstance(child, PreTrainedModel):
            backbone_name, backbone = name, child
            break
    mc = _model_config(model)
    vocab = mc.get_text_config().vocab_size if hasattr(mc, "get_text_config") else mc.vocab_size
    for pname, p in backbone.named_parameters():
        if p.shape[0] == vocab:
            path = pname.removesuffix(".weight")
            return f"{backbone_name}.{path}" if backbone_name else path
    raise ValueError(f"could not find the word embeddings of {type(model).__name__} (no parameter with {vocab} rows)")


def _check_no_checkpointing(model: nn.Module) -> None:
    """PEFT's rule: the prefix cache is extended in place as the layers run, so a recomputed layer would see it
    longer (and checkpointing would be silently wrong)."""
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError(f"{PeftType.PREFIX_TUNING.value} does not work with gradient checkpointing.")


def _check_model(model: nn.Module, config: PromptLearningConfig, spec: PromptSpec) -> None:
    model_type = getattr(_model_config(model), "model_type", "")
    if spec.prefix:
        _check_no_checkpointing(model)
        if any(k in model_type for k in ("gemma2", "gemma3_text", "gemma4")):
            raise NotImplementedError(
                f"prefix tuning on {model_type}: PEFT builds a model-specific cache there, which funcpeft does not "
                "implement"
            )
        if spec.task_type in ("SEQ_CLS", "TOKEN_CLS") and not _takes_past(model):
            backbone = _backbone(model)
            if backbone is None or not _takes_past(backbone):
                raise ValueError(  # PEFT's error (raised by PEFT at the first forward)
                    "Model does not support past key values which are required for prefix tuning. "
                    f"({type(model).__name__} and its backbone take no past_key_values argument)"
                )
            raise NotImplementedError(
                f"prefix tuning with task_type={spec.task_type!r} on {type(model).__name__}, whose forward takes no "
                "past_key_values: PEFT then runs the backbone and the classifier itself, which funcpeft does not "
                "implement (use prompt tuning or P-tuning for this model)"
            )
        return
    dim = _weight(model, spec).shape[1]
    if spec.token_dim != dim:
        raise ValueError(
            f"{type(config).__name__}.token_dim={spec.token_dim}, but the model's word embedding {spec.embed_path!r} "
            f"has dimension {dim}: the virtual tokens are prepended to its output. Leave token_dim=None to take it "
            "from the model."
        )


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def _weight(model: nn.Module, spec: PromptSpec) -> torch.Tensor:
    weight = getattr(model.get_submodule(spec.embed_path), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"the word embedding {spec.embed_path!r} has no weight tensor")
    return weight


def _takes_past(model: nn.Module) -> bool:
    """The module's forward names past_key_values (PEFT's test; **kwargs does not count: BERT ignores it there)."""
    return "past_key_values" in inspect.signature(model.forward).parameters


def _backbone(model: nn.Module) -> nn.Module | None:
    """PEFT's `transformer_backbone`: the first child that is a transformers PreTrainedModel."""
    from transformers import PreTrainedModel

    return next((c for c in model.children() if isinstance(c, PreTrainedModel)), None)


def plan(model: nn.Module, config: Any) -> tuple[PromptLearningConfig, PromptSpec]:
    """(the resolved config, the adapter's PromptSpec)."""
    resolved = resolve(model, config)
    if isinstance(resolved, PromptEncoderConfig) and _value(resolved.encoder_reparameterization_type) == "MLP":
        if resolved.encoder_num_layers != 2 and not resolved.inference_mode:
            warnings.warn(
                "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used.", stacklevel=3
            )
    mc = _model_config(model)
    path = word_embeddings(model)
    weight = model.get_submodule(path).weight
    canon = next(n for n, p in model.named_parameters() if p is weight)
    task = resolved.task_type.value if isinstance(resolved.task_type, TaskType) else str(resolved.task_type)
    fields: dict[str, Any] = {}
    if isinstance(resolved, PromptTuningConfig):
        fields.update(
            init=_value(resolved.prompt_tuning_init),
            init_text=resolved.prompt_tuning_init_text,
            tokenizer=resolved.tokenizer_name_or_path,
            tokenizer_kwargs=tuple(sorted((resolved.tokenizer_kwargs or {}).items())),
        )
    if isinstance(resolved, MultitaskPromptTuningConfig):
        fields.update(
            num_tasks=resolved.num_tasks,
            num_ranks=resolved.num_ranks,
            source_path=resolved.prompt_tuning_init_state_dict_path,
            source_task=resolved.prompt_tuning_init_task or 0,
        )
    if isinstance(resolved, PromptEncoderConfig):
        fields.update(
            encoder=_value(resolved.encoder_reparameterization_type),
            hidden=resolved.encoder_hidden_size,
            encoder_layers=resolved.encoder_num_layers,
            encoder_dropout=resolved.encoder_dropout,
        )
    if isinstance(resolved, PrefixTuningConfig):
        fields.update(
            encoder="projection" if resolved.prefix_projection else None,
            hidden=resolved.encoder_hidden_size,
            zero_init=resolved.init_weights == "zero",
        )
    return_dict = getattr(mc, "return_dict", True)
    spec = PromptSpec(
        peft_type=resolved.type_name(),
        task_type=task,
        n=int(resolved.num_virtual_tokens),  # type: ignore[arg-type]
        submodules=int(resolved.num_transformer_submodules),  # type: ignore[arg-type]
        token_dim=int(resolved.token_dim),  # type: ignore[arg-type]
        num_layers=int(resolved.num_layers),  # type: ignore[arg-type]
        heads=int(resolved.num_attention_heads),  # type: ignore[arg-type]
        embed_path=path,
        embed_key=canon,
        embed_plain=type(model.get_submodule(path)) is nn.Embedding,
        inference_mode=bool(resolved.inference_mode),
        pad_token_id=getattr(mc, "pad_token_id", None),
        decoder_start_token_id=getattr(mc, "decoder_start_token_id", None),
        return_dict_default=True if return_dict is None else bool(return_dict),
        **fields,
    )
    _check_model(model, resolved, spec)
    return resolved, spec


# -- parameters -----------------------------------------------------------------------------------------------
def _linear(name: str, fan_in: int, fan_out: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return ((f"{name}.weight", (fan_out, fan_in)), (f"{name}.bias", (fan_out,)))


def _lstm_names(spec: PromptSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    out: list[tuple[str, tuple[int, ...]]] = []
    h = spec.hidden
    for layer in range(spec.encoder_layers):
        fan_in = spec.token_dim if layer == 0 else 2 * h
        for suffix in ("", "_reverse"):
            out += [
                (f"lstm_head.weight_ih_l{layer}{suffix}", (4 * h, fan_in)),
                (f"lstm_head.weight_hh_l{layer}{suffix}", (4 * h, h)),
                (f"lstm_head.bias_ih_l{layer}{suffix}", (4 * h,)),
                (f"lstm_head.bias_hh_l{layer}{suffix}", (4 * h,)),
            ]
    return tuple(out)


def shapes(spec: PromptSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The `'<prompt>'` entry's leaves and shapes, in PEFT's parameter order."""
    d = spec.token_dim
    if spec.prefix:
        if spec.encoder == "projection" and not spec.inference_mode:
            return (
                ("embedding.weight", (spec.n, d)),
                *_linear("transform.0", d, spec.hidden),
                *_linear("transform.2", spec.hidden, spec.num_layers * 2 * d),
            )
        return (("embedding.weight", (spec.n, spec.num_layers * 2 * d)),)
    out: tuple[tuple[str, tuple[int, ...]], ...] = (("embedding.weight", (spec.total, d)),)
    if spec.peft_type == PeftType.MULTITASK_PROMPT_TUNING.value:  # its own parameters come first in PEFT's order
        out = (
            ("prefix_task_cols", (spec.num_tasks, spec.total, spec.num_ranks)),
            ("prefix_task_rows", (spec.num_tasks, spec.num_ranks, d)),
            *out,
        )
    if spec.encoder == "LSTM" and not spec.inference_mode:
        h = spec.hidden
        out += _lstm_names(spec) + _linear("mlp_head.0", 2 * h, 2 * h) + _linear("mlp_head.2", 2 * h, d)
    elif spec.encoder == "MLP" and not spec.inference_mode:
        h = spec.hidden
        out += _linear("mlp_head.0", d, h) + _linear("mlp_head.2", h, h) + _linear("mlp_head.4", h, d)
    return out


def _word_rows(model: nn.Module, spec: PromptSpec, ids: torch.Tensor) -> torch.Tensor:
    module: Any = model.get_submodule(spec.embed_path)
    with torch.no_grad():
        return module(ids.to(module.weight.device)).detach().clone().to(torch.float32)


def _text_ids(spec: PromptSpec) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(spec.tokenizer_kwargs)
    kwargs.pop("trust_remote_code", None)  # PEFT's security rule
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, **kwargs)
    ids = list(tokenizer(spec.init_text)["input_ids"])
    if len(ids) < spec.total:
        ids = ids * math.ceil(spec.total / len(ids))
    return ids[: spec.total]


def init(spec: PromptSpec, model: nn.Module, generator: torch.Generator | None) -> Params:
    """Fresh parameters with PEFT's draws in PEFT's order (module construction order), float32 on CPU."""
    out: Params = {}
    for name, shape in shapes(spec):
        if name == "embedding.weight" or name.startswith(("prefix_task", "lstm_head")):
            continue
        out[name] = torch.empty(shape)
    emb = torch.empty(dict(shapes(spec))["embedding.weight"])
    emb.normal_(generator=generator)  # nn.Embedding's reset_parameters
    out["embedding.weight"] = emb
    if (
        spec.peft_type in (PeftType.PROMPT_TUNING.value, PeftType.MULTITASK_PROMPT_TUNING.value)
        and not spec.inference_mode
    ):
        if spec.init == "SAMPLE_VOCAB":
            vocab = int(_weight(model, spec).shape[0])
            ids = torch.randint(0, vocab, (spec.total,), dtype=torch.long, generator=generator)
            out["embedding.weight"] = _word_rows(model, spec, ids)
        elif spec.init == "TEXT":
            out["embedding.weight"] = _word_rows(model, spec, torch.tensor(_text_ids(spec), dtype=torch.long))
    if spec.peft_type == PeftType.MULTITASK_PROMPT_TUNING.value:
        out["prefix_task_cols"] = torch.normal(
            0, 0.02, (spec.num_tasks, spec.total, spec.num_ranks), generator=generator
        )
        out["prefix_task_rows"] = torch.normal(
            0, 0.02, (spec.num_tasks, spec.num_ranks, spec.token_dim), generator=generator
        )
        out.update(_source_init(spec))
    if spec.encoder == "LSTM" and not spec.inference_mode:
        k = 1 / math.sqrt(spec.hidden)  # nn.LSTM's reset_parameters: every weight uniform(-k, k), in order
        for name, shape in _lstm_names(spec):
            out[name] = torch.empty(shape).uniform_(-k, k, generator=generator)
    if spec.encoder is not None and not spec.inference_mode:
        prefix = "transform" if spec.prefix else "mlp_head"
        for name, shape in shapes(spec):
            if name.startswith(prefix) and name.endswith(".weight"):
                w, b = out[name], out[name.removesuffix("weight") + "bias"]
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)  # nn.Linear's reset_parameters
                bound = 1 / math.sqrt(shape[1]) if shape[1] > 0 else 0
                nn.init.uniform_(b, -bound, bound, generator=generator)
        if spec.zero_init:
            last = "transform.2"
            out[f"{last}.weight"] = torch.zeros_like(out[f"{last}.weight"])
            out[f"{last}.bias"] = torch.zeros_like(out[f"{last}.bias"])
    if spec.prefix and spec.zero_init and spec.encoder is None:
        out["embedding.weight"] = torch.zeros_like(out["embedding.weight"])
    return {name: out[name] for name, _ in shapes(spec)}


def _source_init(spec: PromptSpec) -> Params:
    """Multitask prompt tuning's source-task inits (read from `prompt_tuning_init_state_dict_path`)."""
    if spec.init not in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"):
        return {}
    if spec.source_path is None:
        raise ValueError(f"prompt_tuning_init_state_dict_path needs to be specified with {spec.init} init method")
    if spec.source_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(spec.source_path)
    else:
        state = torch.load(spec.source_path, map_location="cpu", weights_only=True)
    out = {"embedding.weight": state["prompt_embeddings"]}
    if spec.init == "ONLY_SOURCE_SHARED":
        return out
    cols, rows = state["prefix_task_cols"], state["prefix_task_rows"]
    if spec.init == "AVERAGE_SOURCE_TASKS":
        cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
    else:
        cols, rows = cols[spec.source_task].unsqueeze(0), rows[spec.source_task].unsqueeze(0)
    return {**out, "prefix_task_cols": cols, "prefix_task_rows": rows}


# -- the call -------------------------------------------------------------------------------------------------
def _lstm(spec: PromptSpec, params: Params, x: torch.Tensor, ctx: InputContext) -> torch.Tensor:
    """nn.LSTM(bidirectional=True, batch_first=True) on one sequence x (n, d) -> (n, 2h), in plain ops."""
    h = spec.hidden
    for layer in range(spec.encoder_layers):
        outs = []
        for suffix, order in (("", range(x.shape[0])), ("_reverse", range(x.shape[0] - 1, -1, -1))):
            w_ih, w_hh = (
                params[f"lstm_head.weight_ih_l{layer}{suffix}"],
                params[f"lstm_head.weight_hh_l{layer}{suffix}"],
            )
            bias = params[f"lstm_head.bias_ih_l{layer}{suffix}"] + params[f"lstm_head.bias_hh_l{layer}{suffix}"]
            gates_x = x @ w_ih.T + bias
            hs = x.new_zeros(h)
            cs = x.new_zeros(h)
            seq: list[torch.Tensor] = [hs] * x.shape[0]
            for t in order:
                i, f, g, o = (gates_x[t] + w_hh @ hs).chunk(4)
                cs = torch.sigmoid(f) * cs + torch.sigmoid(i) * torch.tanh(g)
                hs = torch.sigmoid(o) * torch.tanh(cs)
                seq[t] = hs
            outs.append(torch.stack(seq))
        x = torch.cat(outs, dim=-1)
        if layer < spec.encoder_layers - 1 and spec.encoder_dropout > 0:
            x = ctx.dropout(x, spec.encoder_dropout)
    return x


def _mlp(params: Params, prefix: str, x: torch.Tensor, layers: int, act: Any) -> torch.Tensor:
    for k in range(layers):
        x = F.linear(x, params[f"{prefix}.{2 * k}.weight"], params[f"{prefix}.{2 * k}.bias"])
        if k < layers - 1:
            x = act(x)
    return x


def batch_size(call: ModelCall) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        t = call.kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return int(t.shape[0])
    return None


def bind(spec: PromptSpec, call: ModelCall) -> dict[str, Any]:
    """The call's arguments by PEFT's forward parameter names (positional ones bound like PEFT's signature)."""
    names = _SIGNATURES[spec.task_type]
    if len(call.args) > len(names):
        raise TypeError(f"fn takes at most {len(names)} positional model arguments for {spec.task_type} ({names})")
    kwargs = dict(call.kwargs)
    for name, value in zip(names, call.args):
        if name in kwargs:
            raise TypeError(f"fn got multiple values for argument {name!r}")
        kwargs[name] = value
    return kwargs


def encode(spec: PromptSpec, params: Params, call: ModelCall, ctx: InputContext) -> torch.Tensor:
    """The virtual tokens for the batch: (B, total, token_dim), or (B, n, num_layers * 2 * token_dim) for prefix
    tuning; the same rows for every example except with multitask's per-example task_ids."""
    kwargs = bind(spec, call)
    b = batch_size(ModelCall((), kwargs))
    if b is None:
        raise ValueError(f"{spec.peft_type}: the call needs input_ids or inputs_embeds (to know the batch size)")
    x = params["embedding.weight"]
    if spec.peft_type == PeftType.MULTITASK_PROMPT_TUNING.value:
        task_ids = kwargs.get("task_ids")
        if task_ids is None:
            raise ValueError("task_ids cannot be None")
        cols = torch.index_select(params["prefix_task_cols"], 0, task_ids)
        rows = torch.index_select(params["prefix_task_rows"], 0, task_ids)
        return x.expand(b, *x.shape) * torch.matmul(cols, rows)
    if not spec.inference_mode:
        if spec.encoder == "MLP":
            x = _mlp(params, "mlp_head", x, 3, torch.relu)
        elif spec.encoder == "LSTM":
            x = _mlp(params, "mlp_head", _lstm(spec, params, x, ctx), 2, torch.relu)
        elif spec.encoder == "projection":
            x = _mlp(params, "transform", x, 2, torch.tanh)
    return x.expand(b, *x.shape)


def _input_embeds(spec: PromptSpec, kwargs: Mapping[str, Any], ctx: InputContext) -> torch.Tensor:
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds
    ids: Any = kwargs.get("input_ids")
    weight = ctx.base[spec.embed_key]
    if spec.embed_plain:
        return F.embedding(ids, weight)
    module = ctx.model.get_submodule(spec.embed_path)
    skel = object.__new__(type(module))
    skel.__dict__.update(module.__dict__)
    skel.__dict__["_parameters"] = {**module._parameters, "weight": weight}
    return skel(ids)


def _check_inputs(spec: PromptSpec, kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("input_ids") is not None and kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            f"{spec.peft_type}: pass either input_ids or inputs_embeds, not both (PEFT would silently use "
            "inputs_embeds and ignore input_ids)"
        )
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None and not spec.prefix and embeds.shape[-1] != spec.token_dim:
        raise ValueError(
            f"{spec.peft_type}: inputs_embeds has hidden size {embeds.shape[-1]}, but the virtual tokens have "
            f"token_dim={spec.token_dim}"
        )
    if kwargs.get("past_key_values") is not None and not spec.prefix:
        # PEFT passes it through; the virtual tokens are prepended to the new tokens too, which is never meant
        raise ValueError(
            f"{spec.peft_type}: a call with past_key_values would prepend the virtual tokens to the cached "
            "continuation; call fn on the whole sequence (funcpeft.generate runs decoding correctly)"
        )


def _ones(b: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(b, n, device=like.device)  # PEFT's float ones (the cat promotes the mask to float)


def prepare(spec: PromptSpec, prompts: torch.Tensor, call: ModelCall, ctx: InputContext) -> ModelCall:
    """PEFT's `PeftModelFor<task>.forward` prompt-learning branch, with `prompts` (B, ...) as the virtual tokens."""
    kw = bind(spec, call)
    _check_inputs(spec, kw)
    task = spec.task_type
    b = prompts.shape[0]
    kw.pop("task_ids", None)
    n = spec.n
    if task == "SEQ_2_SEQ_LM":
        return _prepare_seq2seq(spec, prompts, kw, ctx)
    mask = kw.get("attention_mask")
    if mask is not None:
        kw["attention_mask"] = torch.cat((_ones(b, n, mask), mask), dim=1)
    for key in ("output_attentions", "output_hidden_states", "return_dict"):
        kw.setdefault(key, None)
    if task in ("SEQ_CLS", "TOKEN_CLS") and kw["return_dict"] is None:
        kw["return_dict"] = spec.return_dict_default
    if task != "FEATURE_EXTRACTION":
        kw.setdefault("labels", None)
    _adjust_positions(spec, kw, remove_token_type_ids=task not in ("SEQ_CLS", "TOKEN_CLS"))
    if spec.prefix:
        if ctx.training:  # checkpointing runs only in training mode; it may have been enabled after get_peft_model
            _check_no_checkpointing(ctx.model)
        kw["past_key_values"] = prefix_cache(spec, prompts, ctx)
        kw.setdefault("input_ids", None)
        kw.setdefault("inputs_embeds", None)
        return ModelCall((), kw)
    tt = kw.get("token_type_ids")
    if tt is not None:
        kw["token_type_ids"] = torch.cat((torch.zeros(b, n, device=tt.device), tt), dim=1).long()
    embeds = _input_embeds(spec, kw, ctx)
    kw.pop("input_ids", None)
    labels = kw.get("labels")
    if task == "CAUSAL_LM" and labels is not None:
        kw["labels"] = torch.cat((torch.full((b, n), -100, device=labels.device), labels), dim=1)
    kw["inputs_embeds"] = torch.cat((prompts.to(embeds.dtype), embeds), dim=1)
    return ModelCall((), kw)


def _adjust_positions(spec: PromptSpec, kw: dict[str, Any], remove_token_type_ids: bool) -> None:
    """PEFT's `_adjust_prompt_learning_kwargs`."""
    if kw.get("position_ids") is not None:
        if spec.prefix:
            kw["position_ids"] = kw["position_ids"] + spec.n
        else:
            warnings.warn(
                "Position ids are not supported for parameter efficient tuning. Ignoring position ids.", stacklevel=4
            )
            kw["position_ids"] = None
    if remove_token_type_ids and kw.get("token_type_ids") is not None:
        warnings.warn(
            "Token type ids are not supported for parameter efficient tuning. Ignoring token type ids", stacklevel=4
        )
        kw["token_type_ids"] = None


def _prepare_seq2seq(spec: PromptSpec, prompts: torch.Tensor, kw: dict[str, Any], ctx: InputContext) -> ModelCall:
    """PeftModelForSeq2SeqLM.forward's prompt-learning branches."""
    b, n = prompts.shape[0], spec.n
    dmask = kw.get("decoder_attention_mask")
    if dmask is not None and spec.peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        kw["decoder_attention_mask"] = torch.cat((_ones(b, n, dmask), dmask), dim=1)
    _adjust_positions(spec, kw, remove_token_type_ids=True)
    for key in ("attention_mask", "decoder_attention_mask", "labels", "output_attentions", "output_hidden_states",
                "return_dict", "decoder_input_ids", "decoder_inputs_embeds"):  # fmt: skip
        kw.setdefault(key, None)
    if spec.prefix:
        kw["past_key_values"] = prefix_cache(spec, prompts, ctx)
        kw.setdefault("input_ids", None)
        kw.setdefault("inputs_embeds", None)
        return ModelCall((), kw)
    embeds = _input_embeds(spec, kw, ctx)
    kw.pop("input_ids", None)
    mask = kw.get("attention_mask")
    if mask is not None:
        kw["attention_mask"] = torch.cat((_ones(b, n, mask), mask), dim=1)
    if spec.peft_type in ("PROMPT_TUNING", "P_TUNING"):
        kw["inputs_embeds"] = torch.cat((prompts[:, :n].to(embeds.dtype), embeds), dim=1)
        return ModelCall((), kw)
    # multitask prompt tuning: the decoder gets the second half of the virtual tokens too
    if spec.submodules == 2 and kw.get("decoder_input_ids") is not None and kw.get("decoder_inputs_embeds") is None:
        raise ValueError(
            "multitask prompt tuning on a SEQ_2_SEQ_LM model with decoder_input_ids: PEFT 0.21.2 fails on this call "
            "(it prepends the decoder's virtual tokens to decoder_inputs_embeds, which it leaves None); pass labels "
            "alone (the decoder inputs are derived from them) or decoder_inputs_embeds"
        )
    if kw.get("decoder_inputs_embeds") is None and kw.get("decoder_input_ids") is None:
        from transformers.models.bart.modeling_bart import shift_tokens_right

        if kw.get("labels") is None or spec.pad_token_id is None or spec.decoder_start_token_id is None:
            raise ValueError(
                "multitask prompt tuning (SEQ_2_SEQ_LM) without decoder_input_ids / decoder_inputs_embeds derives them "
                "from labels, which needs labels and the model config's pad_token_id and decoder_start_token_id"
            )
        kw["decoder_input_ids"] = shift_tokens_right(kw["labels"], spec.pad_token_id, spec.decoder_start_token_id)
    if kw.get("decoder_inputs_embeds") is None:
        ids = kw.pop("decoder_input_ids")
        kw["decoder_inputs_embeds"] = _input_embeds(spec, {"input_ids": ids}, ctx)
    else:
        kw.pop("decoder_input_ids", None)
    labels = kw.get("labels")
    if labels is not None and spec.submodules == 2:
        kw["labels"] = torch.cat((torch.full((b, n), -100, device=labels.device), labels), dim=1)
    prompts = prompts.to(embeds.dtype)
    kw["inputs_embeds"] = torch.cat((prompts[:, :n], embeds), dim=1)
    if spec.submodules == 2:
        kw["decoder_inputs_embeds"] = torch.cat((prompts[:, n:], kw["decoder_inputs_embeds"]), dim=1)
    else:
        kw.pop("decoder_inputs_embeds")
    return ModelCall((), kw)


def prefix_cache(spec: PromptSpec, prompts: torch.Tensor, ctx: InputContext) -> Any:
    """PEFT's `get_prompt` for prefix tuning: the prefixes (B, n, L * 2 * D) as a transformers Cache."""
    from transformers import DynamicCache, EncoderDecoderCache

    b = prompts.shape[0]
    dtype = getattr(ctx.model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        prompts = prompts.to(dtype)
    kv = prompts.reshape(b, spec.n, spec.num_layers * 2, spec.heads, spec.token_dim // spec.heads)
    if spec.submodules == 2:
        kv = torch.cat([kv, kv], dim=2)
    layers = kv.permute([2, 0, 3, 1, 4]).split(spec.submodules * 2)
    if spec.submodules == 1:
        return DynamicCache(layers)
    cache = EncoderDecoderCache(layers)
    cache.cross_attention_cache = DynamicCache()  # PEFT's: the encoder's keys are recomputed with the prompt
    for key in cache.is_updated.keys():
        cache.is_updated[key] = False
    return cache


def prepare_generate(spec: PromptSpec, prompts: torch.Tensor, call: ModelCall, ctx: InputContext) -> ModelCall:
    """The model's `generate` arguments that decode as PEFT's forward does step by step: the virtual tokens (or
    prefixes) go in once, with the prompt, and the KV cache carries them (PEFT 0.21.2's own generate re-injects
    them through `prepare_inputs_for_generation`, which misbehaves with transformers 5; see docs/usage.md)."""
    if call.args:
        raise TypeError("funcpeft.generate takes keyword arguments only (input_ids=..., attention_mask=...)")
    kw = dict(call.kwargs)
    kw.pop("task_ids", None)
    _check_inputs(spec, kw)
    if spec.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise NotImplementedError(
            f"funcpeft.generate with task_type={spec.task_type!r}: PEFT generates only for CAUSAL_LM and SEQ_2_SEQ_LM"
        )
    if spec.task_type == "SEQ_2_SEQ_LM" and spec.peft_type == PeftType.MULTITASK_PROMPT_TUNING.value:
        raise NotImplementedError(
            "funcpeft.generate: multitask prompt tuning on a SEQ_2_SEQ_LM model is not implemented"
        )
    ids = kw.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"funcpeft.generate with a {spec.peft_type} adapter needs input_ids (B, L)")
    b, length = ids.shape
    mask = kw.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if spec.task_type == "CAUSAL_LM" and kw.get("max_length") is not None:  # counts the prompt, not virtual tokens
        new = int(kw.pop("max_length")) - length
        if new < 1:
            raise ValueError(
                f"funcpeft.generate: max_length={new + length} leaves no room after the prompt's {length} tokens "
                f"(the {spec.n} virtual tokens come on top); pass max_new_tokens"
            )
        kw["max_new_tokens"] = new
    ones = torch.ones(b, spec.n, dtype=mask.dtype, device=mask.device)
    if spec.prefix:
        kw["past_key_values"] = prefix_cache(spec, prompts, ctx)
        if spec.task_type == "CAUSAL_LM":
            kw["attention_mask"] = torch.cat((ones, mask), dim=1)
        return ModelCall((), kw)
    embeds = _input_embeds(spec, kw, ctx)
    kw.pop("input_ids")
    kw["inputs_embeds"] = torch.cat((prompts[:, : spec.n].to(embeds.dtype), embeds), dim=1)
    kw["attention_mask"] = torch.cat((ones, mask), dim=1)
    return ModelCall((), kw)


def finish_generate(spec: PromptSpec, call: ModelCall, output: Any) -> Any:
    """A decoder-only model generating from inputs_embeds returns only the new tokens: put the prompt's ids in
    front, as PEFT's generate (from input_ids) returns them."""
    if spec.task_type != "CAUSAL_LM" or spec.prefix:
        return output
    ids = call.kwargs["input_ids"]
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = ids.repeat_interleave(sequences.shape[0] // ids.shape[0], dim=0)
    joined = torch.cat((prompt.to(sequences.device), sequences), dim=1)
    if isinstance(output, torch.Tensor):
        return joined
    output.sequences = joined
    return output


def file_state(spec: PromptSpec, params: Params) -> dict[str, torch.Tensor]:
    """PEFT's `get_peft_model_state_dict` for prompt learning: `prompt_embeddings` = the encoder's output
    (the embedding itself in inference mode), plus multitask's task matrices."""
    if spec.peft_type == PeftType.MULTITASK_PROMPT_TUNING.value:
        return {
            "prefix_task_cols": params["prefix_task_cols"],
            "prefix_task_rows": params["prefix_task_rows"],
            "prompt_embeddings": params["embedding.weight"],
        }
    if spec.inference_mode:
        return {"prompt_embeddings": params["embedding.weight"]}
    with torch.no_grad():
        x = encode(spec, params, ModelCall((), {"input_ids": torch.zeros(1, 0, dtype=torch.long)}), _NO_CTX)
    return {"prompt_embeddings": x[0].detach().cpu()}


class _NoModel(nn.Module):
    pass


_NO_CTX = InputContext(model=_NoModel(), base={})


def load_state(spec: PromptSpec, tensors: Mapping[str, torch.Tensor], fresh: Params) -> Params:
    """PEFT's `set_peft_model_state_dict`: embedding.weight = prompt_embeddings (the rest keeps its fresh
    values: a trainable P-tuning / projected prefix adapter gets a new encoder, as in PEFT)."""
    if "prompt_embeddings" not in tensors:
        raise KeyError(f"the checkpoint has no 'prompt_embeddings' (keys: {sorted(tensors)[:5]})")
    out = dict(fresh)
    emb = tensors["prompt_embeddings"]
    if spec.prefix and spec.encoder == "projection" and not spec.inference_mode:
        raise ValueError("Cannot load flattened prompt embeddings when `prefix_projection=True`.")
    if tuple(emb.shape) != tuple(out["embedding.weight"].shape):
        raise ValueError(
            f"prompt_embeddings has shape {tuple(emb.shape)}, expected {tuple(out['embedding.weight'].shape)} "
            "(num_virtual_tokens x token_dim of this config and model)"
        )
    out["embedding.weight"] = emb
    if spec.peft_type == PeftType.MULTITASK_PROMPT_TUNING.value:
        for key in ("prefix_task_cols", "prefix_task_rows"):
            if key in tensors:
                out[key] = tensors[key]
    return out


def _method(name: str, config: type[Any]) -> InputMethod:
    return register(
        InputMethod(
            name=name,
            config=config,
            plan=plan,
            shapes=shapes,
            init=init,
            encode=encode,
            prepare=prepare,
            file_state=file_state,
            load_state=load_state,
            prepare_generate=prepare_generate,
            finish_generate=finish_generate,
            call_kwargs=frozenset({"task_ids"}),
        )
    )


PROMPT_TUNING = _method("prompt_tuning", PromptTuningConfig)
MULTITASK_PROMPT_TUNING = _method("multitask_prompt_tuning", MultitaskPromptTuningConfig)
P_TUNING = _method("p_tuning", PromptEncoderConfig)
PREFIX_TUNING = _method("prefix_tuning", PrefixTuningConfig)
