"""Compiled generation: transformers' `generate` with a static KV cache and a `torch.compile`d decode step.

    decoder = funcpeft.Decoder(pm)                                   # compiles on first use, keeps it
    out = decoder.generate(base, tree_a, input_ids=ids, attention_mask=mask, max_new_tokens=64)
    out = decoder.generate(base, tree_b, ...)                        # other adapter values: no recompile
    out = decoder.generate(base, funcpeft.mixed_batch({"a": ta, "b": tb}, ["b", "a", "__base__"]), ...)
    out = funcpeft.generate(pm, base, tree, compile=True, ...)       # the same, with a Decoder kept per pm

transformers' own generation loop runs on a call skeleton as in `funcpeft.generate` (every logits processor,
stopping criterion, sampling and beam search), with two changes: the KV cache is a `StaticCache` the Decoder
owns (fixed shapes), and every one-token forward after the prefill is `fn(base, adapter, ...)` compiled once
(`fullgraph=True`, static shapes). The prefill (the prompt, of any length) runs eagerly, as in transformers.

The compiled step takes the base, the adapter and the routing as graph *inputs*: a tree's leaves, a routed
adapter's stacked leaves and its index tensor (a `mixed_batch` is turned into stacks and an index outside
the graph). New adapter values, a new routing (including examples routed to `"__base__"`) or a new base
value reuse the compiled step; a new adapter *structure* (other targets or rank, a tree vs. a routed batch),
a new batch size (rows x beams) or a larger cache compile another (torch's `recompile_limit`, 8 by default,
applies). With the default `backend="inductor"` tokens may differ from eager generation where two logits
tie to within float rounding; with `"aot_eager"` / `"eager"` the tokens are eager's exactly.

Cache size: `max_cache_len` if given (a generation that needs more is an error), else the prompt length plus
`max_new_tokens` (or `max_length`) rounded up to a power of two, at least 64: growing prompts reuse one size.
With `return_dict_in_generate=True` the returned cache is the Decoder's own, emptied by its next call.
Encoder-decoder models are refused (their cross-attention cache is not handled here); use `funcpeft.generate`.

Threads: a Decoder owns one KV cache, so its calls run one at a time (a lock; concurrent calls wait, and
each gets its own correct result). For generation in parallel threads use one Decoder per thread. The
model, `base` and the adapter are never mutated; as for any compiled model, an eager call of a
transformers Llama-family model in another thread while a Decoder *compiles* can break that compile
(see funcpeft._functional).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._functional import PeftFunction, peft_function
from ._generation import check_expansion, eager_generate, expand_routing, generation_randomness, prompt_rows
from ._plan import check_adapter_structure
from ._trees import stack_adapters, tensor_leaves
from .rng import redirect
from .routing import MixedBatch, PerExample, per_example

_OWNED = ("cache", "past_key_values", "use_cache", "cache_implementation")


class Decoder:
    """A compiled decode step for one `pm`, kept across `generate` calls with any adapter values and routing.

    Args:
        pm: what `funcpeft.get_peft_model` returned (or its `fn`); a decoder-only model with a `generate`.
        backend, mode, options, fullgraph: passed to `torch.compile` (`backend` may be a callable, e.g.
            `torch._dynamo.testing.CompileCounter()`); fullgraph=True makes a graph break an error.
        max_cache_len: the static KV cache's length in tokens (prompt + new tokens must fit); None: sized
            per call (see the module docstring).
    """

    def __init__(
        self,
        pm: Any,
        *,
        backend: Any = "inductor",
        mode: str | None = None,
        options: dict[str, Any] | None = None,
        fullgraph: bool = True,
        max_cache_len: int | None = None,
    ):
        self.fn = peft_function(pm)
        model = self.fn.model
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"funcpeft.Decoder: the model ({type(model).__name__}) has no `generate` method")
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise NotImplementedError(
                f"funcpeft.Decoder: {type(model).__name__} is an encoder-decoder model; the compiled path handles "
                "decoder-only models. Use funcpeft.generate (eager) for it."
            )
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or int(max_cache_len) < 1):
            raise ValueError(f"funcpeft.Decoder: max_cache_len must be a positive int, got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        fn = self.fn

        def step(base: Mapping[str, torch.Tensor], adapter: Any, inputs: dict[str, Any]) -> Any:
            return fn(base, _rebuild(adapter), **inputs)

        compile_kw: dict[str, Any] = {"mode": mode} if mode is not None else {}
        if options is not None:
            compile_kw["options"] = options
        self._step = torch.compile(step, backend=backend, fullgraph=fullgraph, dynamic=False, **compile_kw)
        self._cache: Any = None
        self._cache_key: tuple[Any, ...] = ()
        self._lock = threading.Lock()

    def generate(
        self, base: Mapping[str, torch.Tensor], adapter: Any, *, rng: int | torch.Generator | None = None, **kwargs: Any
    ) -> Any:
        """`funcpeft.generate(pm, base, adapter, rng=rng, **kwargs)` with the compiled decode step.

        Args:
            base: the `{parameter name: Tensor}` tree.
            adapter: anything `fn` accepts (a tree, None, `{adapter name: tree}`, `per_example`, `mixed_batch`).
            rng: an int seed or a `torch.Generator` (required when sampling).
            **kwargs: transformers' generate arguments (`input_ids` (B, L), `attention_mask` (B, L),
                `max_new_tokens`, `do_sample`, `num_beams`, ...), except the cache: the Decoder owns it
                (`cache_implementation="static"` is accepted).

        Returns:
            What the model's `generate` returns: token ids (B * num_return_sequences, L + new) by default.
        """
        fn = self.fn
        model = fn.model
        for key in _OWNED:
            if (
                key in kwargs
                and not (key == "cache_implementation" and kwargs[key] == "static")
                and not (key == "use_cache" and kwargs[key] is True)
            ):
                raise ValueError(
                    f"funcpeft.Decoder.generate: {key}={kwargs[key]!r} is not supported: the compiled path decodes "
                    "with its own static KV cache (max_cache_len= on the Decoder sets its size)"
                )
        kwargs = {k: v for k, v in kwargs.items() if k not in _OWNED}
        config, randomness = generation_randomness(model, kwargs, rng)
        adapter, expanded = expand_routing(fn, adapter, kwargs, config)
        if not any(isinstance(kwargs.get(k), torch.Tensor) for k in ("input_ids", "inputs", "inputs_embeds")):
            raise ValueError(
                "funcpeft.Decoder.generate: pass the prompts as a tensor (input_ids=... of shape (B, L), or "
                "inputs_embeds=...): the static cache is sized from them"
            )
        rows = expanded or prompt_rows(kwargs)
        graph_adapter = _graph_input(fn, adapter)
        eager_adapter = _rebuild(graph_adapter)
        length = _needed_length(kwargs, config)
        with self._lock:
            skel: Any = fn.bound_model(base, eager_adapter, ((), {"input_ids": torch.empty((rows, 0), device="meta")}))
            if expanded:
                check_expansion(skel, expanded // prompt_rows(kwargs))
            cache = self._static_cache(model, base, rows, length)
            eager_forward = skel.forward
            calls = 0

            @functools.wraps(eager_forward)  # transformers reads forward's signature (e.g. to pass position_ids)
            def forward(*args: Any, **inputs: Any) -> Any:
                nonlocal calls
                calls += 1
                ids = inputs.get("input_ids")
                if calls == 1 or args or ids is None or ids.shape[1] != 1 or inputs.get("cache") is not cache:
                    return eager_forward(*args, **inputs)  # the prefill (any length): eager, as in transformers
                if torch.overrides._get_current_function_mode() is not mode:
                    return self._step(base, graph_adapter, inputs)
                # the eval-mode step draws no random numbers (as fn without dropout_rng, it runs without the
                # redirect): left on, the mode would see every op of the compiled code's wrapper, in Python
                with torch.overrides._pop_mode_temporarily():
                    return self._step(base, graph_adapter, inputs)

            skel.__dict__["forward"] = forward
            mode = redirect(randomness)
            with mode:
                return skel.generate(**kwargs, cache=cache, use_cache=True)

    def _static_cache(self, model: Any, base: Mapping[str, torch.Tensor], rows: int, length: int) -> Any:
        """The Decoder's StaticCache, emptied; a new one when the batch, dtype, device or needed length differ."""
        from transformers import StaticCache

        size = self.max_cache_len
        if size is None:
            size = max(64, 1 << (length - 1).bit_length())
        elif length > size:
            raise ValueError(
                f"funcpeft.Decoder: this generation needs {length} cache positions (prompt + new tokens), but the "
                f"Decoder's max_cache_len is {size}; make a Decoder with a larger max_cache_len"
            )
        first = next(iter(base.values()))
        key = (rows, size, first.dtype, first.device)
        if self._cache is None or self._cache_key != key:
            self._cache = StaticCache(config=model.config, max_cache_len=size)
            self._cache_key = key
        else:
            self._cache.reset()
        return self._cache


def _needed_length(kwargs: Mapping[str, Any], config: Any) -> int:
    """Prompt length plus the new tokens: what the cache must hold."""
    ids = kwargs.get("input_ids", kwargs.get("inputs"))
    embeds = kwargs.get("inputs_embeds")
    prompt = ids.shape[1] if isinstance(ids, torch.Tensor) else embeds.shape[1] if embeds is not None else 0
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is not None:
        return int(prompt) + int(new)
    return max(int(kwargs.get("max_length", getattr(config, "max_length", 20))), int(prompt) + 1)


def _graph_input(fn: PeftFunction, adapter: Any) -> Any:
    """The adapter as the compiled step takes it: None, or {adapter name: tree | (stacked, index (B,), any_base)}.

    Routing is reduced to tensors (an index (B,) per stack) so that a new routing is new input values, not
    a new graph; `any_base` is a constant (True, exact for any routing) except for methods that change the
    base layer (KaSA), where routing to no adapter is refused and it stays False.
    """
    if adapter is None:
        return None
    if isinstance(adapter, MixedBatch):
        return _mixed_input(fn, adapter)
    return {
        name: _routing_input(fn, name, t) if isinstance(t, PerExample) else t for name, t in fn.split_adapters(adapter)
    }


def _mixed_input(fn: PeftFunction, mixed: MixedBatch) -> dict[str, tuple[Any, torch.Tensor, bool]]:
    """A mixed batch as stacks of *every* adapter it holds (grouped by identical plans, as `MixedBatch.split`),
    not only those the routing uses: the stacks' shapes then do not depend on the routing."""
    unknown = [n for n in mixed.adapters if n not in fn.plans]
    if unknown:
        raise KeyError(f"mixed_batch: {unknown} are not registered adapters; registered: {sorted(fn.plans)}")
    groups: list[list[str]] = []
    for name in mixed.adapters:
        check_adapter_structure(mixed.adapters[name], fn.plans[name], name)
        group = next((g for g in groups if fn.plans[g[0]] == fn.plans[name]), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    out = {}
    for members in groups:
        if _changes_base(fn, members[0]) and not any(n in members for n in mixed.adapter_names):
            continue  # unused, and it could not be routed to no adapter (KaSA): left out, as MixedBatch.split does
        stacked = stack_adapters([mixed.adapters[m] for m in members])
        slot = {m: j for j, m in enumerate(members)}
        index = torch.tensor([slot.get(n, -1) for n in mixed.adapter_names], device=next(tensor_leaves(stacked)).device)
        out[members[0]] = _routing_input(fn, members[0], per_example(stacked, index, members[0]))
    return out


def _changes_base(fn: PeftFunction, name: str) -> bool:
    return any(e.method.changes_base for e in fn.plans[name].values() if e.spec is not None)


def _routing_input(fn: PeftFunction, name: str, pe: PerExample) -> tuple[Any, torch.Tensor, bool]:
    index = pe.index
    if index is None:  # stacked adapter i for prompt i
        index = torch.arange(pe.k, device=next(iter(tensor_leaves(pe.stacked))).device)
    return pe.stacked, index, pe.any_base if _changes_base(fn, name) else True


def _rebuild(adapter: Any) -> Any:
    """`_graph_input`'s form back to what fn takes (inside the compiled step, and for the eager prefill)."""
    if adapter is None:
        return None
    return {n: PerExample(v[0], v[1], n, v[2]) if isinstance(v, tuple) else v for n, v in adapter.items()}


_DEFAULT: weakref.WeakKeyDictionary[PeftFunction, dict[Any, Decoder]] = weakref.WeakKeyDictionary()
_DEFAULT_LOCK = threading.Lock()


def default_decoder(pm: Any, backend: Any) -> Decoder:
    """The Decoder `funcpeft.generate(..., compile=backend)` uses: one per fn and backend, kept while fn lives."""
    fn = peft_function(pm)
    with _DEFAULT_LOCK:
        per_fn = _DEFAULT.setdefault(fn, {})
        decoder = per_fn.get(backend)
        if decoder is None:
            decoder = per_fn[backend] = Decoder(fn, backend=backend)
        return decoder


def generate(
    pm: Any,
    base: Mapping[str, torch.Tensor],
    adapter: Any,
    *,
    rng: int | torch.Generator | None = None,
    compile: bool | str | Callable[..., Any] = False,
    **kwargs: Any,
) -> Any:
    """PEFT's `peft_model.generate(**kwargs)` with `adapter` applied (what transformers' generate returns).

    Args:
        pm: what `funcpeft.get_peft_model` returned (or its `fn`).
        base: the `{parameter name: Tensor}` tree.
        adapter: anything `fn` accepts: a tree, None (the base model), `{adapter name: tree}`,
            `funcpeft.per_example(...)` or `funcpeft.mixed_batch(...)` (one entry per prompt, B).
        rng: randomness for sampling: an int seed or a `torch.Generator` (required when sampling).
        compile: True (or a torch.compile backend: a name, e.g. "aot_eager", or a callable): decode with a static
            KV cache and a compiled one-token step, kept per pm and backend (`funcpeft.Decoder`, which gives more
            control).
        **kwargs: transformers' generate arguments (`input_ids` (B, L), `attention_mask` (B, L),
            `max_new_tokens`, `num_beams`, `do_sample`, `generation_config`, ...).

    Returns:
        What the model's `generate` returns: token ids (B * num_return_sequences, L + new) by default.
    """
    fn = getattr(pm, "fn", pm)
    if not isinstance(fn, PeftFunction) and callable(getattr(fn, "generate", None)):
        # a model-level method's own function (X-LoRA's two passes): it generates itself, without a KV cache
        if compile:
            raise NotImplementedError(
                f"funcpeft.generate(compile=...): {type(fn).__name__} generates without a KV cache (every step runs "
                "its whole call over the sequence so far, like PEFT), which the compiled static-cache decoder cannot "
                "do; call funcpeft.generate without compile"
            )
        return fn.generate(base, adapter, rng=rng, **kwargs)
    if compile:
        decoder = default_decoder(pm, "inductor" if compile is True else compile)
        return decoder.generate(base, adapter, rng=rng, **kwargs)
    return eager_generate(pm, base, adapter, rng=rng, **kwargs)
