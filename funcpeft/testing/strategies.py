"""Hypothesis strategies for testing code built on funcpeft (funcpeft's own tests use them too).

    from hypothesis import given, strategies as st
    from funcpeft.testing import strategies as fst
    from funcpeft.testing import assert_adapter_is_noop

    @given(st.data())
    def test_fresh_lora_is_a_noop(data):
        model = data.draw(fst.tiny_models())                          # or your own nn.Module
        config = data.draw(fst.lora_configs(model, init_lora_weights=[True]))
        fn, base, adapter = funcpeft.get_peft_model(model, config)
        assert_adapter_is_noop(fn, base, adapter, model, **data.draw(fst.model_inputs(model)))

Every config drawn is valid *for the model it was drawn for*: its targets exist (by construction, not by
filtering), exclusions leave at least one target, `layers_to_transform` picks layers that hold a target,
and `modules_to_save` names norm layers that are not targets. Tensors are drawn from a seeded
`torch.Generator` (hypothesis draws the seed and the scale), so examples are cheap and reproducible.

Strategies: `tiny_models`, `lora_config_kwargs` / `lora_configs`, `adapter_trees`, `model_inputs`,
`models_and_configs`. Needs `hypothesis` (a test dependency), imported here only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from .._config import LoraConfig
from .._constants import DEFAULT_TARGET_MODULES, TASK_MODULES_TO_SAVE
from .._targeting import layer_index, layer_kind, output_embedding_name, overlaps_saved_module
from ._asserts import random_like
from ._models import TINY_MODELS, VOCAB

__all__ = [
    "LINEAR_KINDS",
    "adaptable_modules",
    "adapter_trees",
    "lora_config_kwargs",
    "lora_configs",
    "model_inputs",
    "models_and_configs",
    "tiny_models",
]

LINEAR_KINDS = ("linear", "conv1d_hf")
_TASK_BY_CLASS = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
)


# -- models ---------------------------------------------------------------------------------------------------
def tiny_models(kinds: Sequence[str] | None = None, max_seed: int = 3) -> st.SearchStrategy[nn.Module]:
    """A freshly built tiny random transformers model (eval mode) from `funcpeft.TINY_MODELS`.

    kinds: names to draw from (default all: llama, mistral, qwen2, gpt2, bert_seq_cls, t5).
    """
    names = list(TINY_MODELS) if kinds is None else list(kinds)
    unknown = [k for k in names if k not in TINY_MODELS]
    if unknown or not names:
        raise ValueError(f"tiny_models: unknown kinds {unknown or names}; known: {sorted(TINY_MODELS)}")
    return st.builds(lambda kind, seed: TINY_MODELS[kind](seed=seed), st.sampled_from(names), st.integers(0, max_seed))


def adaptable_modules(model: nn.Module, layer_kinds: Sequence[str] = LINEAR_KINDS) -> list[str]:
    """Names of the modules of `model` whose layer kind (funcpeft.targeting.layer_kind) is in `layer_kinds`."""
    return [
        n for n, m in model.named_modules() if n and (kind := layer_kind(m)) is not None and kind.value in layer_kinds
    ]


def _norm_modules(model: nn.Module, avoid: set[str]) -> list[str]:
    """Parameter-holding leaf modules that are not adaptable layers (LayerNorm/RMSNorm ...), away from `avoid`."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    out = []
    for name, m in model.named_modules():
        params = list(m.parameters(recurse=False))
        if not name or list(m.children()) or not params or layer_kind(m) is not None:
            continue
        if any(counts[id(p)] > 1 for p in params):  # tied weights: not a clean copy
            continue
        if any(a == name or a.startswith(name + ".") or name.startswith(a + ".") for a in avoid):
            continue
        out.append(name)
    return out


def _default_task_types(model: nn.Module) -> list[str | None]:
    cls = type(model).__name__
    return [None] + [task for suffix, task in _TASK_BY_CLASS if cls.endswith(suffix)][:1]


# -- configs --------------------------------------------------------------------------------------------------
@st.composite
def _targets(
    draw: Callable[..., Any], model: nn.Module, layer_kinds: Sequence[str], forms: Sequence[str], saved: Sequence[str]
) -> tuple[Any, list[str] | None]:
    """(target_modules value, the module names it matches, or None when funcpeft/PEFT resolve it).

    Never targets the output head or a module the task saves whole (`saved`, e.g. SEQ_CLS's classifier).
    """
    head = output_embedding_name(model)
    names = [n for n in adaptable_modules(model, layer_kinds) if n != head and not overlaps_saved_module(n, saved)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no module of kinds {list(layer_kinds)} to target")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    usable = [
        f
        for f in forms
        if f not in ("default", "all-linear")
        or (f == "default" and model_type in DEFAULT_TARGET_MODULES)
        or (f == "all-linear" and set(layer_kinds) <= set(LINEAR_KINDS))
    ]
    if not usable:
        raise ValueError(f"no usable target form among {list(forms)} for {type(model).__name__}")
    form = draw(st.sampled_from(usable))
    if form == "default":
        return None, None
    if form == "all-linear":
        return "all-linear", None
    if form == "suffixes":
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        chosen = draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=min(3, len(leaves)), unique=True))
        return chosen, [n for n in names if n.rsplit(".", 1)[-1] in chosen]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=min(4, len(names)), unique=True))
    if form == "names":
        return chosen, [n for n in names if n in chosen]
    return "(" + "|".join(re.escape(c) for c in chosen) + ")", [n for n in names if n in chosen]  # "regex"


@st.composite
def lora_config_kwargs(
    draw: Callable[..., Any],
    model: nn.Module,
    *,
    layer_kinds: Sequence[str] = LINEAR_KINDS,
    target_forms: Sequence[str] = ("suffixes", "names", "regex", "all-linear", "default"),
    task_types: Sequence[str | None] | None = None,
    init_lora_weights: Sequence[bool | str] = (True, False, "gaussian"),
    biases: Sequence[str] = ("none", "all", "lora_only"),
    max_rank: int = 8,
    allow_modules_to_save: bool = True,
) -> dict[str, Any]:
    """Keyword arguments of a `LoraConfig` valid for `model` (the same dict works for `peft.LoraConfig`).

    layer_kinds: which layers may be targeted ('linear', 'conv1d_hf', 'embedding', 'conv').
    target_forms: how target_modules is written: leaf-name suffixes, full names, a fullmatch regex,
    "all-linear", or None ("default": PEFT's per-model_type table). task_types: default None plus the
    task matching the model's class (e.g. SEQ_CLS for *ForSequenceClassification). allow_modules_to_save:
    may add norm layers to `modules_to_save` (whole trainable copies; the task's own head is added anyway).
    """
    task_type = draw(st.sampled_from(list(task_types) if task_types is not None else _default_task_types(model)))
    target, matched = draw(_targets(model, layer_kinds, target_forms, TASK_MODULES_TO_SAVE.get(task_type, [])))
    r = draw(st.integers(1, max_rank))
    kw: dict[str, Any] = {
        "r": r,
        "target_modules": target,
        "lora_alpha": draw(st.sampled_from([1, 8, 16, r, 2 * r])),
        "use_rslora": draw(st.booleans()),
        "lora_dropout": draw(st.sampled_from([0.0, 0.1])),
        "init_lora_weights": draw(st.sampled_from(list(init_lora_weights))),
        "bias": draw(st.sampled_from(list(biases))),
        "task_type": task_type,
    }
    if matched and isinstance(target, list):  # layer selection and exclusions apply to list targets only
        indices = sorted({i for i in (layer_index(n, None) for n in matched) if i is not None})
        if indices and draw(st.booleans()):
            layers = draw(st.lists(st.sampled_from(indices), min_size=1, max_size=len(indices), unique=True))
            kw["layers_to_transform"] = sorted(layers)
            matched = [n for n in matched if layer_index(n, None) in layers]
        if len(matched) > 1 and draw(st.booleans()):
            kw["exclude_modules"] = draw(
                st.lists(st.sampled_from(matched), min_size=1, max_size=len(matched) - 1, unique=True)
            )
            matched = [n for n in matched if n not in kw["exclude_modules"]]
        if draw(st.booleans()):
            key = draw(st.sampled_from(sorted({n.rsplit(".", 1)[-1] for n in matched})))
            kw["rank_pattern"] = {key: draw(st.integers(1, max_rank))}
            kw["alpha_pattern"] = draw(st.sampled_from([{}, {key: 4}]))
    if matched is not None and allow_modules_to_save:
        norms = _norm_modules(model, set(matched))
        if norms and draw(st.booleans()):
            kw["modules_to_save"] = draw(st.lists(st.sampled_from(norms), min_size=1, max_size=2, unique=True))
    return kw


def lora_configs(model: nn.Module, **kwargs: Any) -> st.SearchStrategy[LoraConfig]:
    """A funcpeft `LoraConfig` valid for `model`; same options as `lora_config_kwargs`."""
    return lora_config_kwargs(model, **kwargs).map(lambda kw: LoraConfig(**kw))


def models_and_configs(
    kinds: Sequence[str] | None = None, **kwargs: Any
) -> st.SearchStrategy[tuple[nn.Module, dict[str, Any]]]:
    """(tiny model, LoraConfig kwargs valid for it)."""
    return tiny_models(kinds).flatmap(lambda m: lora_config_kwargs(m, **kwargs).map(lambda kw: (m, kw)))


# -- tensors --------------------------------------------------------------------------------------------------
def adapter_trees(template: Any, scales: Sequence[float] = (0.01, 0.1, 1.0)) -> st.SearchStrategy[Any]:
    """Trees shaped like `template` (e.g. the adapter from get_peft_model) with random normal leaves.

    Each leaf is N(0, scale^2) from a drawn seed, in the template leaf's dtype and device, requires_grad=True.
    Unlike a fresh LoRA adapter (B = 0), these make every adapted layer change the output.
    """
    return st.builds(
        lambda seed, scale: random_like(template, torch.Generator().manual_seed(seed), scale),
        st.integers(0, 2**31 - 1),
        st.sampled_from(list(scales)),
    )


@st.composite
def model_inputs(
    draw: Callable[..., Any],
    model: nn.Module,
    max_batch: int = 3,
    max_len: int = 8,
    padded: bool = True,
    min_len: int = 1,
) -> dict[str, torch.Tensor]:
    """Keyword inputs for a tiny transformers `model`: input_ids (B, L), attention_mask (right padding when
    `padded`; every row keeps at least `min_len` tokens) and, for encoder-decoders, decoder_input_ids.

    min_len=2 avoids a degenerate case: attention over a single token ignores its key (zero k_proj gradient).
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"model_inputs: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    vocab = int(getattr(model.config, "vocab_size", VOCAB))
    batch, length = draw(st.integers(1, max_batch)), draw(st.integers(min_len, max_len))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    out = {"input_ids": ids}
    if padded:
        lengths = draw(st.lists(st.integers(min_len, length), min_size=batch, max_size=batch))
        out["attention_mask"] = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    if getattr(model.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(1, vocab, (batch, draw(st.integers(min_len, max_len))), generator=g)
    return out
