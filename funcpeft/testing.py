"""Helpers for testing code that uses funcpeft: tiny models, random adapters, assertions.

Tiny models are randomly initialised from configs (no downloads), in eval mode, seeded.
`hypothesis` strategies live in `funcpeft.strategies` (also reachable here, e.g. `funcpeft.testing.lora_configs`,
imported lazily: hypothesis is a test extra).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch import nn

from ._plan import PlanEntry

VOCAB = 128


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


def tiny_mistral(seed: int = 0) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )
    return _seeded(lambda: MistralForCausalLM(cfg), seed)


def tiny_qwen2(seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )
    return _seeded(lambda: Qwen2ForCausalLM(cfg), seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed)


def tiny_bert_seq_cls(seed: int = 0, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(  # type: ignore[call-arg]
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return _seeded(lambda: BertForSequenceClassification(cfg), seed)


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(  # type: ignore[call-arg]
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0,
    )
    return _seeded(lambda: T5ForConditionalGeneration(cfg), seed)


TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2,
    "bert_seq_cls": tiny_bert_seq_cls, "t5": tiny_t5,
}


def random_like(tree: Any, generator: torch.Generator | None = None, scale: float = 0.1) -> Any:
    """A tree of the same structure with random normal leaves (times `scale`), requires_grad=True.

    Use it to make an adapter non-trivial (B = 0 at init hides most bugs).
    """

    def draw(t: torch.Tensor) -> torch.Tensor:
        r = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * scale
        return r.to(t.device).requires_grad_(True)

    return optree.tree_map(draw, tree)


def peft_param_name(path: str, key: str, plan_entry: PlanEntry, adapter_name: str = "default") -> str:
    """The in-memory parameter name in a `peft` PeftModel for adapter leaf `adapter[path][key]`.

    lora_A/B -> `...{path}.lora_A.{name}.weight`; lora_embedding_A/B -> `...{path}.lora_embedding_A.{name}`
    (likewise ia3_l, hada_*, lokr_*, vera_lambda_*: a method's `peft_unsuffixed`);
    modules_to_save copies -> `...{path}.modules_to_save.{name}.{key}`; a trainable bias -> `...{path}.base_layer.bias`
    on an adapted layer, else `...{path}.bias`.
    """
    prefix = f"base_model.model.{path}"
    if key in plan_entry.params:
        # parameters PEFT saves without `.weight` are nn.Parameter / ParameterDict entries in memory too, except
        # DoRA's magnitude, which is a module's weight in memory (PEFT strips `.weight` only in its files)
        if key in plan_entry.method.keys.unsuffixed:
            return f"{prefix}.{key}.{adapter_name}" + (".weight" if key == "lora_magnitude_vector" else "")
        return f"{prefix}.{key}.{adapter_name}.weight"
    if key in plan_entry.in_place:
        return f"{prefix}.base_layer.{key}" if plan_entry.spec is not None else f"{prefix}.{key}"
    return f"{prefix}.modules_to_save.{adapter_name}.{key}"


def copy_into_peft(peft_model: nn.Module, adapter: Any, plan: Mapping[str, PlanEntry], adapter_name: str = "default") -> None:
    """Copy funcpeft adapter values into a `peft` model's parameters (test helper; mutates peft_model)."""
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for path, entry in adapter.items():
            for key, value in entry.items():
                name = peft_param_name(path, key, plan[path], adapter_name)
                if name not in named:
                    raise KeyError(f"{name} not in the peft model (close: {[n for n in named if path in n][:6]})")
                named[name].copy_(value)


def peft_grads(peft_model: nn.Module, adapter: Any, plan: Mapping[str, PlanEntry], adapter_name: str = "default") -> Any:
    """The `.grad` of each peft parameter, in the structure of `adapter`."""
    named = dict(peft_model.named_parameters())
    return {
        path: {key: named[peft_param_name(path, key, plan[path], adapter_name)].grad for key in entry}
        for path, entry in adapter.items()
    }


def assert_trees_close(a: Any, b: Any, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Same structure and every leaf within tolerance; the message names the first differing path."""
    pa, la, sa = optree.tree_flatten_with_path(a)
    pb, lb, sb = optree.tree_flatten_with_path(b)
    if sa != sb:
        raise AssertionError(f"tree structures differ: {sorted(map(str, pa))[:5]} vs {sorted(map(str, pb))[:5]}")
    for p, x, y in zip(pa, la, lb):
        if x.shape != y.shape:
            raise AssertionError(f"{'.'.join(map(str, p))}: shape {tuple(x.shape)} != {tuple(y.shape)}")
        if not torch.allclose(x.float(), y.float(), atol=atol, rtol=rtol):
            diff = (x.float() - y.float()).abs().max().item()
            raise AssertionError(f"{'.'.join(map(str, p))}: max abs diff {diff:.3g} > atol {atol}")


def assert_adapter_is_noop(fn: Callable[..., Any], base: Any, adapter: Any, model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """`fn(base, adapter, ...)` equals `model(...)` exactly (e.g. for a freshly initialised LoRA adapter)."""
    with torch.no_grad():
        got, want = fn(base, adapter, *args, **kwargs), model(*args, **kwargs)
    got_t = got.logits if hasattr(got, "logits") else got
    want_t = want.logits if hasattr(want, "logits") else want
    if not torch.equal(got_t, want_t):
        raise AssertionError(f"adapter is not a no-op: max abs diff {(got_t - want_t).abs().max().item():.3g}")


def assert_only_adapter_gets_grads(loss_fn: Callable[[Any, Any], torch.Tensor], adapter: Any, base: Any) -> None:
    """Backprop `loss_fn(adapter, base)`: every base leaf stays gradient-free, and some adapter leaf gets one."""
    leaves = [t.detach().requires_grad_(True) for t in optree.tree_leaves(adapter)]
    fresh = optree.tree_unflatten(optree.tree_structure(adapter), leaves)
    loss = loss_fn(fresh, base)
    if not loss.requires_grad:
        raise AssertionError("no adapter leaf received a gradient: the loss does not depend on the adapter (no grad_fn)")
    loss.backward()
    for name, t in (base.items() if isinstance(base, Mapping) else []):
        if t.requires_grad or t.grad is not None:
            raise AssertionError(f"base leaf {name} requires or received a gradient")
    if not any(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves):
        raise AssertionError("no adapter leaf received a non-zero gradient")


def assert_matches_peft(
    model: nn.Module, config_kwargs: Mapping[str, Any], adapter: Any = None, *, config_class: str = "LoraConfig",
    atol: float = 1e-5, rtol: float = 1e-5, **inputs: Any,
) -> None:
    """funcpeft and `peft` (on a deep copy of `model`, same config) adapt the same parameters and agree.

    config_kwargs: keyword arguments valid for both `funcpeft.<config_class>` and `peft.<config_class>`.
    adapter: the values to compare with (default: a random tree, so that B != 0); inputs: model kwargs.
    Checks that PEFT's trainable parameters are exactly funcpeft's adapter leaves, then the outputs within
    `atol + rtol * |peft's|`.
    Needs `peft` (a test dependency). `model` is not modified.
    """
    import copy
    import warnings

    import peft

    import funcpeft
    from funcpeft._plan import check_adapter_structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both libraries warn alike (fan_in_fan_out, ...); not the point here
        pm = funcpeft.get_peft_model(model, getattr(funcpeft, config_class)(**config_kwargs))
        twin = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_class)(**config_kwargs)).eval()
    fn, base, fresh = pm
    adapter = random_like(fresh, torch.Generator().manual_seed(0)) if adapter is None else adapter
    plan = pm.plans[pm.adapter_name]
    check_adapter_structure(adapter, plan, pm.adapter_name)  # ValueError naming the path: a wrong tree, not a mismatch
    ours = {peft_param_name(p, k, plan[p]) for p, e in plan.items() for k in e.keys}
    theirs = {n for n, t in twin.named_parameters() if t.requires_grad}
    if ours != theirs:
        raise AssertionError(
            f"trainable parameters differ: only funcpeft {sorted(ours - theirs)[:5]}, only peft {sorted(theirs - ours)[:5]}"
        )
    copy_into_peft(twin, adapter, plan)
    with torch.no_grad():
        got, want = fn(base, adapter, **inputs), twin(**inputs)
    got_t = got.logits if hasattr(got, "logits") else got
    want_t = want.logits if hasattr(want, "logits") else want
    if got_t.shape != want_t.shape or not torch.allclose(got_t, want_t, atol=atol, rtol=rtol):
        diff = (got_t - want_t).abs().max().item() if got_t.shape == want_t.shape else float("nan")
        raise AssertionError(f"funcpeft and peft outputs differ: shapes {tuple(got_t.shape)} / {tuple(want_t.shape)}, "
                             f"max abs diff {diff:.3g} (atol {atol}, rtol {rtol})")


_STRATEGIES = ("tiny_models", "lora_config_kwargs", "lora_configs", "models_and_configs", "adapter_trees", "model_inputs")


def __getattr__(name: str) -> Any:
    """The hypothesis strategies of `funcpeft.strategies`, re-exported lazily (hypothesis is a test dependency)."""
    if name in _STRATEGIES:
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
