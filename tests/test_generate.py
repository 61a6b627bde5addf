"""`funcpeft.generate` / `pm.generate` (issue 13): tokens equal PEFT's `generate`, the model untouched.

Greedy, beam search and seeded sampling with KV cache on tiny Llama, GPT-2 and T5; LoRA, DoRA, IA3, LoHa,
LoKr and VeRA; mixed batches equal PEFT's `generate(adapter_names=...)` with left padding and beams.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optree
import peft
import pytest
import torch
from helpers import in_threads
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import funcpeft
from funcpeft import testing as T

if TYPE_CHECKING:
    from transformers import PreTrainedModel

pytestmark = pytest.mark.filterwarnings("ignore")

GREEDY = {"do_sample": False}
BEAMS = {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}
SAMPLE = {"do_sample": True, "top_k": 20}

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}),
    "dora": ("LoraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "loha": ("LoHaConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False}),
    "lokr": ("LoKrConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False}),
    "vera": ("VeraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
}


def _pair(model: nn.Module, config_class: str, kwargs: dict[str, Any], seed: int = 0) -> tuple[Any, Any, Any]:
    """(pm, a random adapter tree, PEFT's model holding the same values, eval mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = funcpeft.get_peft_model(model, getattr(funcpeft, config_class)(**kwargs))
        twin = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_class)(**kwargs)).eval()
    tree = T.random_like(pm.adapter, torch.Generator().manual_seed(seed), scale=0.5)
    T.copy_into_peft(twin, tree, pm.plans[pm.adapter_name])
    return pm, tree, twin


def _prompts(vocab: int, batch: int = 3, length: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    ids[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _same_tokens(rows: torch.Tensor, alone: torch.Tensor) -> bool:
    """Rows of a batched generation equal a lone one (which may stop earlier at EOS; the batch pads with 0)."""
    n = alone.shape[1]
    return torch.equal(rows[:, :n], alone) and bool((rows[:, n:] == 0).all())


def _peft_generate(twin: Any, mode: dict[str, Any], seed: int = 5, **kwargs: Any) -> torch.Tensor:
    if mode.get("do_sample"):
        torch.manual_seed(seed)  # PEFT samples from the global RNG
    return twin.generate(**kwargs, **mode)


# every method greedy; beam search and sampling do not depend on the method: with LoRA
CASES = [(m, GREEDY) for m in sorted(METHODS)] + [("lora", BEAMS), ("lora", SAMPLE)]


@pytest.mark.parametrize(
    "method, mode",
    CASES,
    ids=[f"{m}-{'sample' if d.get('do_sample') else 'beams' if 'num_beams' in d else 'greedy'}" for m, d in CASES],
)
def test_tokens_equal_peft_on_llama(method: str, mode: dict[str, Any]) -> None:
    model = T.tiny_llama()
    pm, tree, twin = _pair(model, *METHODS[method])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 8, "pad_token_id": 0}
    want = _peft_generate(twin, mode, **kw)
    global_state = torch.get_rng_state()
    got = pm.generate(pm.base, tree, **kw, **mode, **({"rng": 5} if mode.get("do_sample") else {}))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was neither read nor reseeded
    assert torch.equal(got, want), (got, want)
    assert not torch.equal(got, model.generate(**kw, do_sample=False)) or mode is not GREEDY  # the adapter matters
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("build, targets", [(T.tiny_gpt2, ["c_attn"]), (T.tiny_t5, ["q", "v"])], ids=["gpt2", "t5"])
@pytest.mark.parametrize("mode", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_tokens_equal_peft_on_gpt2_and_t5(
    build: Callable[[], PreTrainedModel], targets: list[str], mode: dict[str, Any]
) -> None:
    model = build()
    pm, tree, twin = _pair(model, "LoraConfig", {"r": 4, "target_modules": targets, "init_lora_weights": False})
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 6, "pad_token_id": 0}
    if model.config.is_encoder_decoder:
        kw["decoder_start_token_id"] = 0
    assert torch.equal(pm.generate(pm.base, tree, **kw, **mode), _peft_generate(twin, mode, **kw))


@pytest.mark.parametrize("mode", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_mixed_batch_equals_peft_adapter_names(mode: dict[str, Any]) -> None:
    model = T.tiny_llama()
    cfg: dict[str, Any] = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    pm, tree_a, twin = _pair(model, "LoraConfig", cfg, seed=0)
    pm.add_adapter("b", funcpeft.LoraConfig(**cfg))
    tree_b = T.random_like(tree_a, torch.Generator().manual_seed(9))
    twin.add_adapter("b", peft.LoraConfig(**cfg))
    T.copy_into_peft(twin, tree_b, pm.plans["b"], adapter_name="b")
    names = ["default", "__base__", "b"]
    kw = {**_prompts(model.config.vocab_size), "max_new_tokens": 6, "pad_token_id": 0}
    got = pm.generate(pm.base, funcpeft.mixed_batch({"default": tree_a, "b": tree_b}, names), **kw, **mode)
    want = twin.generate(**kw, **mode, adapter_names=names)
    assert torch.equal(got, want)
    # and each row equals generating with its own adapter alone
    rows = max(mode.get("num_return_sequences", 1), 1)
    for i, tree in enumerate([tree_a, None, tree_b]):
        alone = pm.generate(
            pm.base,
            tree,
            **{k: v[i : i + 1] for k, v in _prompts(model.config.vocab_size).items()},
            max_new_tokens=6,
            pad_token_id=0,
            **mode,
        )
        if i:  # row 0 is left-padded in the batch: its attention differs from a lone, unpadded prompt only in padding
            assert _same_tokens(got[i * rows : (i + 1) * rows], alone)


def test_per_example_routing_follows_beams() -> None:
    model = T.tiny_llama()
    pm, tree, _ = _pair(model, *METHODS["lora"])
    other = T.random_like(tree, torch.Generator().manual_seed(3))
    stacked = funcpeft.stack_adapters([tree, other])
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 5, "pad_token_id": 0, **BEAMS}
    got = pm.generate(pm.base, funcpeft.per_example(stacked, [1, -1, 0]), **kw)
    for i, t in [(1, None), (2, tree)]:
        alone = pm.generate(pm.base, t, **{**kw, **{k: kw[k][i : i + 1] for k in ("input_ids", "attention_mask")}})
        assert _same_tokens(got[2 * i : 2 * i + 2], alone)


def test_seeded_sampling_is_reproducible_across_threads() -> None:
    model = T.tiny_llama()
    pm, tree, _ = _pair(model, *METHODS["lora"])
    kw = {**_prompts(model.config.vocab_size), "max_new_tokens": 6, "pad_token_id": 0, **SAMPLE}
    want = {seed: pm.generate(pm.base, tree, **kw, rng=seed) for seed in range(4)}
    got: dict[tuple[int, int], torch.Tensor] = {}

    def work(t: int) -> None:
        for seed in range(4):
            got[t, seed] = pm.generate(pm.base, tree, **kw, rng=seed)

    in_threads(4, work)
    assert len(got) == 16 and all(torch.equal(v, want[seed]) for (_, seed), v in got.items())
    assert not torch.equal(want[0], want[1])  # the seed matters
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(pm.generate(pm.base, tree, **kw, rng=gen), want[0])


def test_bad_generation_input_is_refused() -> None:
    model = T.tiny_llama()
    pm, tree, _ = _pair(model, *METHODS["lora"])
    kw = {**_prompts(model.config.vocab_size), "max_new_tokens": 3, "pad_token_id": 0}
    with pytest.raises(ValueError, match="needs explicit randomness"):
        pm.generate(pm.base, tree, **kw, do_sample=True)
    with pytest.raises(TypeError, match="rng must be"):
        pm.generate(pm.base, tree, **kw, do_sample=True, rng=1.5)
    stacked = funcpeft.stack_adapters([tree, tree])
    with pytest.raises(ValueError, match="index has length 2, but the batch has 3"):
        pm.generate(pm.base, funcpeft.per_example(stacked, [0, 1]), **kw)
    t5 = T.tiny_t5()
    pm5, tree5, _ = _pair(t5, "LoraConfig", {"r": 2, "target_modules": ["q"]})
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        pm5.generate(
            pm5.base,
            funcpeft.per_example(funcpeft.stack_adapters([tree5] * 3)),
            **kw,
            num_beams=2,
            decoder_start_token_id=0,
        )
    with pytest.raises(TypeError, match="has no `generate`"):
        funcpeft.generate(
            funcpeft.get_peft_model(nn.Sequential(nn.Linear(2, 2)), funcpeft.LoraConfig(target_modules=["0"])), {}, None
        )


# -- the compiled path (funcpeft.Decoder): static cache, compiled one-token step ---------------------------------
# CompileCounter traces with dynamo and runs the captured graphs eagerly: exact tokens, cheap. Names contain
# "compile" (or "thread"): the fast tier leaves them out (conftest.py).
def _frozen(*trees: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(t, t.clone()) for tree in trees for t in optree.tree_leaves(tree)]


@pytest.mark.parametrize("method", ["lora", "ia3", "dora"])
def test_compiled_generate_equals_eager_and_new_adapter_values_do_not_recompile(method: str) -> None:
    model = T.tiny_llama()
    pm, tree, _ = _pair(model, *METHODS[method])
    trees = [tree] + [T.random_like(tree, torch.Generator().manual_seed(s), scale=0.5) for s in (11, 12)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    leaves = _frozen(pm.base, *trees)
    torch._dynamo.reset()
    counter = CompileCounter()
    decoder = funcpeft.Decoder(pm, backend=counter)
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 8, "pad_token_id": 0}
    outs = []
    for t in trees:
        got = decoder.generate(pm.base, t, **kw)
        assert torch.equal(got, pm.generate(pm.base, t, **kw))
        outs.append(got)
    for seed in (3, 4):  # sampling: the same rng gives eager's tokens
        want = pm.generate(pm.base, trees[1], **kw, **SAMPLE, rng=seed)
        assert torch.equal(decoder.generate(pm.base, trees[1], **kw, **SAMPLE, rng=seed), want)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 3 adapters' values and 2 seeds"
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])  # values are inputs, not constants
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert all(torch.equal(t, copy_) for t, copy_ in leaves)


def test_compiled_generate_routing_changes_do_not_recompile() -> None:
    model = T.tiny_llama()
    cfg: dict[str, Any] = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    pm, tree_a, twin = _pair(model, "LoraConfig", cfg, seed=0)
    pm.add_adapter("b", funcpeft.LoraConfig(**cfg))
    tree_b = T.random_like(tree_a, torch.Generator().manual_seed(9), scale=0.5)
    twin.add_adapter("b", peft.LoraConfig(**cfg))
    T.copy_into_peft(twin, tree_b, pm.plans["b"], adapter_name="b")
    trees = {"default": tree_a, "b": tree_b}
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 6, "pad_token_id": 0}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # the functionalized graph: the cache's in-place updates
    decoder = funcpeft.Decoder(pm, backend=counter)
    # routings that use both adapters, one of them, or none: one graph (every adapter is stacked)
    for names in (["default", "__base__", "b"], ["b", "b", "default"], ["default", "default", "default"]):
        mixed = funcpeft.mixed_batch(trees, names)
        got = decoder.generate(pm.base, mixed, **kw)
        assert torch.equal(got, pm.generate(pm.base, mixed, **kw))
        assert torch.equal(got, twin.generate(**kw, adapter_names=names))
    assert counter.frame_count == 1
    stacked = funcpeft.stack_adapters([tree_a, tree_b])
    for index in ([0, 1, -1], [1, 1, 1], [-1, -1, -1]):
        routed = funcpeft.per_example(stacked, index)
        assert torch.equal(decoder.generate(pm.base, routed, **kw), pm.generate(pm.base, routed, **kw))
    # the same graph again: a stack of 2 under the default adapter's name is what the mixed batch gave it
    assert counter.frame_count == 1


@pytest.mark.parametrize("mode", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_compiled_generate_on_gpt2_and_with_beams(mode: dict[str, Any]) -> None:
    model = T.tiny_gpt2()
    pm, tree, twin = _pair(model, "LoraConfig", {"r": 4, "target_modules": ["c_attn"], "init_lora_weights": False})
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 6, "pad_token_id": 0, **mode}
    torch._dynamo.reset()
    counter = CompileCounter()
    decoder = funcpeft.Decoder(pm, backend=counter)
    other = T.random_like(tree, torch.Generator().manual_seed(4), scale=0.5)
    assert torch.equal(decoder.generate(pm.base, tree, **kw), twin.generate(**kw))
    assert torch.equal(decoder.generate(pm.base, other, **kw), pm.generate(pm.base, other, **kw))
    assert counter.frame_count == 1


def test_compile_spelling_of_generate_keeps_one_decoder_per_pm() -> None:
    model = T.tiny_llama()
    pm, tree, _ = _pair(model, *METHODS["lora"])
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 5, "pad_token_id": 0}
    torch._dynamo.reset()
    counter = CompileCounter()
    other = T.random_like(tree, torch.Generator().manual_seed(2))
    for t in (tree, other):
        got = funcpeft.generate(pm, pm.base, t, compile=counter, cache_implementation="static", **kw)
        assert torch.equal(got, pm.generate(pm.base, t, **kw))
    assert counter.frame_count == 1  # the second call reused the first call's Decoder and its compiled step


def test_compiled_generate_from_threads_serializes_on_one_decoder() -> None:
    model = T.tiny_llama()
    pm, tree, _ = _pair(model, *METHODS["lora"])
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 6, "pad_token_id": 0, **SAMPLE}
    torch._dynamo.reset()
    decoder = funcpeft.Decoder(pm, backend=CompileCounter())
    want = {seed: pm.generate(pm.base, tree, **kw, rng=seed) for seed in range(3)}
    decoder.generate(pm.base, tree, **kw, rng=0)  # compiled before the threads start
    got: dict[tuple[int, int], torch.Tensor] = {}

    def work(t: int) -> None:
        for seed in range(3):
            got[t, seed] = decoder.generate(pm.base, tree, **kw, rng=seed)

    in_threads(3, work)
    assert len(got) == 9 and all(torch.equal(v, want[seed]) for (_, seed), v in got.items())


def test_compiled_generate_refuses_what_it_cannot_honour() -> None:
    model = T.tiny_llama()
    pm, tree, _ = _pair(model, *METHODS["lora"])
    kw: dict[str, Any] = {**_prompts(model.config.vocab_size), "max_new_tokens": 4, "pad_token_id": 0}
    decoder = funcpeft.Decoder(pm, backend=CompileCounter(), max_cache_len=8)
    with pytest.raises(ValueError, match="needs 10 cache positions .* max_cache_len is 8"):
        decoder.generate(pm.base, tree, **kw)
    with pytest.raises(ValueError, match="cache_implementation='dynamic' is not supported"):
        decoder.generate(pm.base, tree, **kw, cache_implementation="dynamic")
    with pytest.raises(ValueError, match="needs explicit randomness"):
        decoder.generate(pm.base, tree, **kw, do_sample=True)
    with pytest.raises(ValueError, match="pass the prompts as a tensor"):
        decoder.generate(pm.base, tree, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        funcpeft.Decoder(pm, max_cache_len=0)
    pm5, _, _ = _pair(T.tiny_t5(), "LoraConfig", {"r": 2, "target_modules": ["q"]})
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        funcpeft.Decoder(pm5)


def test_generate_with_hidden_states_adds_transformers_hooks_once() -> None:
    """generate(output_hidden_states=True) on a call skeleton installed transformers' capturing hooks into the
    model's hook dicts on every generate call (the 'installed' mark stayed on the skeleton): now once, as a plain
    model's generate does, and each step's hidden states equal the plain model's."""
    model, plain = T.tiny_llama(), T.tiny_llama()
    fn, base, _ = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    prompts: dict[str, Any] = _prompts(int(plain.config.vocab_size))
    kw: dict[str, Any] = dict(
        max_new_tokens=3, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
    )
    want = plain.generate(**prompts, **kw).hidden_states
    hooks = []
    for _ in range(2):
        got = funcpeft.generate(fn, base, None, **prompts, **kw).hidden_states
        assert len(got) == len(want) and all(len(g) == len(w) for g, w in zip(got, want))
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                torch.testing.assert_close(a, b)
        hooks.append(sum(len(m._forward_hooks) for m in model.modules()))
    assert hooks[0] == hooks[1] == sum(len(m._forward_hooks) for m in plain.modules())
