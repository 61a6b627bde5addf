"""`generate` with an adapter: transformers' generation on the model with `base` and an adapter bound.

    out = funcpeft.generate(pm, base, adapter, input_ids=ids, attention_mask=mask, max_new_tokens=20)
    out = pm.generate(base, funcpeft.mixed_batch({"a": ta, "b": tb}, ["a", "b", "__base__"]), input_ids=ids, ...)
    out = pm.generate(base, adapter, input_ids=ids, do_sample=True, top_k=50, rng=7)   # explicit randomness

The model's own `generate` runs on a call skeleton (`PeftFunction.bound_model`): the adapter is applied
exactly as in `fn` (un-merged), the model, `base` and the adapter are never mutated, and concurrent calls
do not see each other. Every transformers generation kwarg and `generation_config` is passed through.

Per-example adapters (`per_example`, `mixed_batch`) follow the batch through beam search and
`num_return_sequences`: transformers repeats each example `max(num_beams, num_return_sequences)` times
(example-major), and so is the routing (PEFT's `generate(adapter_names=...)` does the same).

Sampling draws from `rng` (an int seed or a `torch.Generator`), never from the process-global RNG: on CPU
the tokens equal PEFT's after `torch.manual_seed(seed)`. Sampling without `rng` is an error, as is any other
random draw in a call without `rng`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ._functional import PeftFunction, peft_function
from ._trees import tensor_leaves
from .rng import CallRandomness, GlobalRNGError, redirect
from .routing import MixedBatch, PerExample, batch_size, check_batch, split_routed


def eager_generate(
    pm: Any,
    base: Mapping[str, torch.Tensor],
    adapter: Any,
    *,
    rng: int | torch.Generator | None = None,
    **kwargs: Any,
) -> Any:
    """`funcpeft.generate` without `compile`: transformers' generate on a call skeleton (see funcpeft.generate)."""
    fn = peft_function(pm)
    model = fn.model
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"funcpeft.generate: the model ({type(model).__name__}) has no `generate` method")
    config, randomness = generation_randomness(model, kwargs, rng)
    if fn.capturing is not None:  # generate(output_hidden_states=True): transformers' hooks once, on the model
        fn.capturing.install_if_asked(kwargs)
    if fn.has_input_adapter(adapter):  # prompt learning: the prompts go in as generate's inputs (see apply_inputs)
        call, finish = fn.apply_inputs(base, adapter, (), kwargs, generating=True)
        skel: Any = fn.bound_model(base, adapter, ((), kwargs))
        with redirect(randomness):
            return finish(skel.generate(*call.args, **call.kwargs))
    adapter, expanded = expand_routing(fn, adapter, kwargs, config)
    prompt, kwargs = _prompt_inputs(fn, kwargs, config, expanded)
    skel = fn.bound_model(
        base, adapter, ((), {"input_ids": torch.empty((expanded, 0), device="meta")}) if expanded else ((), prompt)
    )
    if expanded:
        check_expansion(skel, expanded // prompt_rows(kwargs))
    with redirect(randomness):
        return skel.generate(**kwargs)


def _prompt_inputs(
    fn: PeftFunction, kwargs: dict[str, Any], config: Any, expanded: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the adapters' per-call data is computed from, generate's kwargs without the methods' own arguments).

    Methods that consume call arguments (aLoRA's `alora_offsets`, `PeftFunction.call_kwargs`) get them, or the
    prompt's `input_ids`, once for the whole generation, as PEFT's generate computes aLoRA's offsets from the
    prompt and keeps them for every step (each cached decoding step then adapts its one new token).
    """
    consumed = fn.call_kwargs()
    if not consumed:
        return {}, kwargs
    prompt = {k: kwargs[k] for k in ("input_ids", *sorted(consumed)) if k in kwargs}
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    if int(beams) > 1:
        if "alora_offsets" in consumed:
            raise ValueError("Beam search not yet supported for aLoRA.")  # PEFT's error (LoraModel)
        raise ValueError(
            f"funcpeft.generate: num_beams={beams} with an adapter that consumes {sorted(consumed)}: those are per "
            "prompt row, but beam search repeats the rows (PEFT fails on this too). Generate with num_beams=1."
        )
    if int(returned) > 1 or expanded:
        raise NotImplementedError(
            f"funcpeft.generate: num_return_sequences={returned} (or per-example routing) with an adapter that "
            f"consumes {sorted(consumed)} (aLoRA's offsets, Poly's task_ids): they are per prompt row, but "
            "transformers repeats the rows (PEFT fails on this too). Generate with num_return_sequences=1."
        )
    return prompt, {k: v for k, v in kwargs.items() if k not in consumed}


def generation_randomness(model: Any, kwargs: Mapping[str, Any], rng: Any) -> tuple[Any, CallRandomness]:
    """(generate's generation config, the call's randomness): sampling, in the call or the model's generation config,
    needs `rng`; without one every draw is refused (funcpeft never uses the process-global RNG)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    sampling = bool(kwargs.get("do_sample", getattr(config, "do_sample", False)))
    if sampling and rng is None:
        raise ValueError(
            "funcpeft.generate: sampling (do_sample=True, in the call or the model's generation_config) needs "
            "explicit randomness: pass rng=<int seed> or rng=<torch.Generator> (funcpeft never uses the global RNG)"
        )
    return config, RefusedRandomness() if rng is None else sampling_randomness(rng)


def sampling_randomness(rng: Any) -> CallRandomness:
    if isinstance(rng, torch.Generator):
        return CallRandomness(user_generator=rng)
    if isinstance(rng, bool) or not isinstance(rng, int):
        raise TypeError(f"funcpeft.generate: rng must be None, an int seed or a torch.Generator, got {rng!r}")
    return CallRandomness(seed=rng)


class RefusedRandomness(CallRandomness):
    """A call without `rng`: any random draw is an error (it would read the process-global RNG)."""

    def generator(self, device: Any) -> torch.Generator:
        raise GlobalRNGError(
            "funcpeft.generate: the generation drew random numbers, but no rng was given; pass rng=<int seed> or "
            "rng=<torch.Generator> (funcpeft never uses the process-global RNG)"
        )


def prompt_rows(kwargs: Mapping[str, Any]) -> int:
    found = batch_size((), {k: kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds") if k in kwargs})
    if found is None:
        raise ValueError(
            "funcpeft.generate: per-example adapters need the prompts as a tensor (input_ids=... of shape (B, L)), "
            "to check one adapter choice per prompt"
        )
    return found[0]


def expand_routing(fn: PeftFunction, adapter: Any, kwargs: Mapping[str, Any], config: Any) -> tuple[Any, int]:
    """The adapter with per-example routing repeated as transformers repeats the prompts, and the new batch size.

    transformers expands each prompt `max(num_beams, num_return_sequences)` times, example-major
    (`_expand_inputs_for_generation`); (adapter, 0) when nothing is routed.
    """
    routed = split_routed(adapter, fn.plans, fn.default_adapter)
    if routed is None and isinstance(adapter, Mapping):
        routed = [(n, t) for n, t in adapter.items() if isinstance(t, PerExample)] or None
    if not routed:
        return adapter, 0
    rows = prompt_rows(kwargs)
    for _, routing in routed:
        check_batch(routing, (rows, "input_ids"))
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    factor = max(int(beams), int(returned))
    if factor > 1 and getattr(getattr(fn.model, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(
            "funcpeft.generate: per-example adapters with num_beams / num_return_sequences > 1 on an encoder-decoder "
            "model: its encoder runs on the B prompts and its decoder on B x beams rows, which one routing cannot "
            "describe. Generate per adapter, or with num_beams=1."
        )
    return _repeat(adapter, factor), rows * factor


def _repeat(adapter: Any, factor: int) -> Any:
    if factor == 1:
        return adapter
    if isinstance(adapter, MixedBatch):
        return dataclasses.replace(
            adapter, adapter_names=tuple(n for n in adapter.adapter_names for _ in range(factor))
        )
    if isinstance(adapter, PerExample):
        index = adapter.index
        if index is None:  # stacked adapter i for prompt i
            index = torch.arange(adapter.k, device=next(iter(tensor_leaves(adapter.stacked))).device)
        return dataclasses.replace(adapter, index=index.repeat_interleave(factor))
    return {n: _repeat(t, factor) if isinstance(t, PerExample) else t for n, t in adapter.items()}


def check_expansion(skel: Any, factor: int) -> None:
    """Check that transformers repeats the prompts `factor` times, as the routing was repeated (else a clear error)."""
    original = skel._expand_inputs_for_generation

    def expand(*args: Any, expand_size: int = 1, **kw: Any) -> Any:
        if expand_size != factor:
            raise RuntimeError(
                f"funcpeft.generate: transformers repeats each prompt {expand_size} times, but the per-example routing "
                f"was repeated {factor} times (from num_beams / num_return_sequences); please report this"
            )
        return original(*args, expand_size=expand_size, **kw)

    skel.__dict__["_expand_inputs_for_generation"] = expand
