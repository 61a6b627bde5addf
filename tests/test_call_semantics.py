"""What a call of `fn` reads from the model and from the RNG (funcpeft issue 9).

- gradient checkpointing (enabled before or after get_peft_model, reentrant or not) gives PEFT's gradients,
  with the same dropout masks in the recompute;
- seeded dropout is thread-safe and never touches the process-global RNG; masks equal PEFT's under
  `torch.manual_seed(seed)` (CPU);
- hooks, attributes and checkpointing switches are read from the model at call time, in every thread;
- a compiled fn runs in threads next to eager calls.
"""

from __future__ import annotations

import copy
import threading
import warnings
from typing import TYPE_CHECKING, Any, cast

import optree
import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import MODELS, assert_unchanged, hf, in_threads, snapshot
from torch import nn
from torch._dynamo.testing import CompileCounter

import funcpeft
from funcpeft import testing as T
from funcpeft.grad import value_and_grad

if TYPE_CHECKING:
    from transformers.models.llama.modeling_llama import LlamaAttention

pytestmark = pytest.mark.filterwarnings(
    "ignore:fan_in_fan_out", "ignore:.*gradient_checkpointing_enable.*:FutureWarning"
)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()  # "use_cache=True is incompatible with gradient checkpointing"


_quiet_transformers()


def _ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, T.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _loss(out: Any) -> torch.Tensor:
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(7))
    return (out.logits * weights).mean()


def _detached(tree: Any) -> Any:
    return optree.tree_map(torch.Tensor.detach, tree)


def _max_diff(a: Any, b: Any) -> float:
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    assert len(la) == len(lb)
    return max((x - y).abs().max().item() for x, y in zip(la, lb))


def _backward_grads(fn: Any, base: Any, adapter: Any, **kw: Any) -> Any:
    """Gradients via `.backward()` on fresh adapter leaves."""
    leaves = optree.tree_map(lambda t: t.detach().clone().requires_grad_(True), adapter)
    _loss(fn(base, leaves, **kw)).backward()
    return optree.tree_map(lambda t: t.grad, leaves)


# -- 1. gradient checkpointing ------------------------------------------------------------------------------
class CkptPair:
    """funcpeft and PEFT on copies of one tiny model with checkpointing on, one random adapter, lora_dropout>0."""

    def __init__(self, kind: str, reentrant: bool | None, when: str, dropout: float = 0.2):
        model = hf(MODELS[kind]())
        kw = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
        cfg: dict[str, Any] = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
        twin = copy.deepcopy(model)
        self.calls = _recompute_counter(model)  # registered before get_peft_model
        if when == "before":
            model.gradient_checkpointing_enable(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**cfg))
            if when != "never":
                twin.gradient_checkpointing_enable(**kw)
            self.peft_model = peft.get_peft_model(twin, peft.LoraConfig(**cfg))
        if when == "after":
            model.gradient_checkpointing_enable(**kw)
        self.model = model
        self.fn, self.base, fresh = self.pm
        self.adapter = _detached(T.random_like(fresh, torch.Generator().manual_seed(1)))
        T.copy_into_peft(self.peft_model, self.adapter, self.plan)

    @property
    def plan(self) -> Any:
        return self.pm.plans["default"]

    def peft_loss_and_grads(self, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, Any]:
        self.peft_model.train()
        self.peft_model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # PEFT draws every dropout mask from the global RNG
        loss = _loss(self.peft_model(input_ids=ids))
        loss.backward()
        return loss.detach(), T.peft_grads(self.peft_model, self.adapter, self.plan)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("reentrant", [None, True], ids=["default", "reentrant"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_checkpointing_gradients_equal_peft(kind: str, reentrant: bool | None, when: str) -> None:
    """Old code: CheckpointError (before), no checkpointing at all (after), zero gradients (reentrant)."""
    pair = CkptPair(kind, reentrant, when)
    ids, seed = _ids(), 3
    before = snapshot(pair.model)
    want_loss, want = pair.peft_loss_and_grads(ids, seed)
    assert min(g.abs().max().item() for g in optree.tree_leaves(want)) > 0, "every adapter leaf has a gradient"
    pair.calls[0] = 0
    loss, got = value_and_grad(lambda a: _loss(pair.fn(pair.base, a, input_ids=ids, dropout_rng=seed)))(pair.adapter)
    assert pair.calls[0] == 2, "layer 0 is checkpointed: its MLP runs in the forward and again in backward"
    assert abs(loss.item() - want_loss.item()) <= 1e-6
    T.assert_trees_close(got, want, atol=1e-5)
    T.assert_trees_close(
        _backward_grads(pair.fn, pair.base, pair.adapter, input_ids=ids, dropout_rng=seed), want, atol=1e-5
    )
    assert_unchanged(pair.model, before)


def _recompute_counter(model: nn.Module) -> list[int]:
    """Calls of layer 0's MLP: once per forward, once more per backward recompute when checkpointed.

    A pre-hook: the recompute stops (torch's early_stop) inside the MLP's last op, before forward hooks run.
    """
    calls = [0]
    mlp = model.get_submodule("model.layers.0.mlp" if hasattr(model, "model") else "transformer.h.0.mlp")

    def hook(module: nn.Module, args: Any) -> None:
        calls[0] += 1

    mlp.register_forward_pre_hook(hook)
    return calls


def test_checkpointing_switched_after_get_peft_model_takes_effect_and_masks_replay() -> None:
    """Checkpointing toggled on the model after fn exists applies to the next call; with lora_dropout and a
    seed the recompute redraws the forward's masks: gradients equal those without checkpointing, bitwise."""
    pair = CkptPair("llama", None, "never", dropout=0.5)
    calls = pair.calls
    ids = _ids()

    def grads(seed: int) -> Any:
        calls[0] = 0
        return value_and_grad(lambda a: _loss(pair.fn(pair.base, a, input_ids=ids, dropout_rng=seed)))(pair.adapter)

    loss_plain, plain = grads(5)
    assert calls[0] == 1
    pair.model.gradient_checkpointing_enable()
    loss_ckpt, ckpt = grads(5)
    assert calls[0] == 2, "the MLP inside a checkpointed layer runs again in backward"
    assert torch.equal(loss_plain, loss_ckpt)
    assert _max_diff(plain, ckpt) <= 1e-6
    assert _max_diff(plain, grads(6)[1]) > 1e-4, "another seed draws other masks"
    pair.model.gradient_checkpointing_disable()
    grads(5)
    assert calls[0] == 1


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_checkpointing_inside_torch_func_raises_naming_it(transform: str) -> None:
    pair = CkptPair("llama", None, "before")
    ids = _ids()

    def loss(a: Any) -> torch.Tensor:
        return _loss(pair.fn(pair.base, a, input_ids=ids, dropout_rng=0))

    with pytest.raises(RuntimeError, match="gradient checkpointing.*torch.func"):
        if transform == "grad":
            torch.func.grad(loss)(pair.adapter)
        else:
            stacked = funcpeft.stack_adapters([pair.adapter, pair.adapter])
            torch.func.vmap(value_and_grad(loss), randomness="different")(stacked)


def test_checkpointing_in_eval_mode_warns_that_nothing_is_checkpointed() -> None:
    pair = CkptPair("llama", None, "after")
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            pair.fn(pair.base, pair.adapter, input_ids=ids)  # no gradients: nothing to warn about
    with pytest.warns(UserWarning, match="eval mode.*dropout_rng"):
        pair.fn(pair.base, pair.adapter, input_ids=ids)


# -- 2. seeded dropout: private generators, masks as PEFT's ----------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dropout() -> tuple[Any, ...]:
    """Tiny GPT-2 (its own embedding, attention and residual dropout, 0.1 each) with lora_dropout 0.3."""
    model = MODELS["gpt2"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, base, fresh = funcpeft.get_peft_model(
            model, funcpeft.LoraConfig(r=4, lora_dropout=0.3, target_modules=["c_attn", "c_fc"])
        )
    return model, fn, base, _detached(T.random_like(fresh, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_seeded_masks_equal_peft_under_manual_seed(kind: str) -> None:
    """Every draw (adapters' and the model's, attention dropout inside sdpa included) comes from a generator
    seeded like `torch.manual_seed(seed)`, in PEFT's order, with torch's CPU kernels: the same numbers."""
    pair = CkptPair(kind, None, "never", dropout=0.3)
    ids = _ids()
    pair.peft_model.train()
    with torch.no_grad():
        for seed in (0, 11):
            torch.manual_seed(seed)
            want = pair.peft_model(input_ids=ids).logits
            got = pair.fn(pair.base, pair.adapter, input_ids=ids, dropout_rng=seed).logits
            assert torch.equal(got, want)
        assert not torch.equal(got, pair.fn(pair.base, pair.adapter, input_ids=ids, dropout_rng=0).logits)
        assert not torch.allclose(got, pair.fn(pair.base, pair.adapter, input_ids=ids).logits)


def test_seeded_call_leaves_the_global_rng_alone(gpt2_dropout: tuple[Any, ...]) -> None:
    _, fn, base, adapter = gpt2_dropout
    state = torch.get_rng_state()
    with torch.no_grad():
        fn(base, adapter, input_ids=_ids(), dropout_rng=4)
        fn(base, adapter, input_ids=_ids(), dropout_rng=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("randomness", ["different", "same"])
@pytest.mark.parametrize("rng", ["int", "generator"])
def test_seeded_dropout_under_vmap(gpt2_dropout: tuple[Any, ...], randomness: str, rng: str) -> None:
    _, fn, base, adapter = gpt2_dropout
    ids = _ids(1, 6)
    stacked = funcpeft.stack_adapters([adapter] * 3)  # the same adapter three times

    def run(seed: int) -> torch.Tensor:
        dropout_rng = seed if rng == "int" else torch.Generator().manual_seed(seed)
        return torch.func.vmap(
            lambda a: fn(base, a, input_ids=ids, dropout_rng=dropout_rng).logits, randomness=randomness
        )(stacked)

    with torch.no_grad():
        out = run(0)
        assert torch.equal(out, run(0))
        assert not torch.equal(out, run(1))
        assert torch.equal(out[0], out[1]) == (randomness == "same")


class RandomModel(nn.Module):
    """A model drawing random numbers itself: torch.rand, Tensor.bernoulli_, a distribution, F.dropout(1d), and
    optionally F.gumbel_softmax (which draws inside itself: refused)."""

    def __init__(self, gumbel: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gumbel = gumbel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) + torch.rand(x.shape) + torch.empty_like(x).bernoulli_(0.5)
        h = h + torch.distributions.Gamma(torch.ones(()), torch.ones(())).sample(x.shape)  # torch._standard_gamma
        h = F.dropout(h, 0.2, self.training) + F.dropout1d(h.unsqueeze(0), 0.2, self.training).squeeze(0)
        return F.gumbel_softmax(h) if self.gumbel and self.training else h


def test_model_random_ops_use_the_call_generator_and_opaque_ones_raise() -> None:
    from funcpeft.rng import GlobalRNGError

    fn, base, fresh = funcpeft.get_peft_model(RandomModel(), funcpeft.LoraConfig(r=2, target_modules=["lin"]))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b, c = (fn(base, fresh, x, dropout_rng=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    fn, base, fresh = funcpeft.get_peft_model(
        RandomModel(gumbel=True), funcpeft.LoraConfig(r=2, target_modules=["lin"])
    )
    with pytest.raises(GlobalRNGError, match="gumbel_softmax.*global RNG"):
        fn(base, fresh, x, dropout_rng=1)
    assert fn(base, fresh, x).shape == (3, 8)  # eval mode: no randomness, nothing to refuse


# -- 5. the thread harness: 16 threads x 100 seeded calls -----------------------------------------------------


@pytest.fixture
def one_torch_thread() -> Any:
    """17 Python threads on a small CPU: one intra-op thread each, or they oversubscribe it many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_16_threads_x_100_seeded_calls_equal_serial_and_spare_other_threads_rng(one_torch_thread: None) -> None:
    """Old code (a seeded fork of the global RNG): ~40% of the threaded calls differed from the same calls
    run one by one, and the bystander thread's `manual_seed(42); rand(5)` sequence changed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # one block, every dropout 0.1 (embedding, attention inside sdpa, residual)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=T.VOCAB, n_positions=16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, base, fresh = funcpeft.get_peft_model(
            model, funcpeft.LoraConfig(r=2, lora_dropout=0.3, target_modules=["c_attn"])
        )
    adapter = _detached(T.random_like(fresh, torch.Generator().manual_seed(1)))
    ids = _ids(1, 4)
    n_threads, n_calls = 16, 100

    def call(seed: int) -> torch.Tensor:
        with torch.no_grad():
            return fn(base, adapter, input_ids=ids, dropout_rng=seed).logits

    serial = {(t, i): call(t * n_calls + i) for t in range(n_threads) for i in range(n_calls)}
    assert len({v.sum().item() for v in serial.values()}) > n_threads, "seeds give different masks"
    torch.manual_seed(42)
    want_bystander = [torch.rand(5) for _ in range(200)]

    got: dict[tuple[int, int], torch.Tensor] = {}
    bystander: list[torch.Tensor] = []

    def work(t: int) -> None:
        if t == n_threads:  # one extra thread uses the global RNG meanwhile
            torch.manual_seed(42)
            for _ in range(200):
                bystander.append(torch.rand(5))
            return
        for i in range(n_calls):
            got[(t, i)] = call(t * n_calls + i)

    in_threads(n_threads + 1, work)
    differ = [k for k, v in got.items() if not torch.equal(v, serial[k])]
    assert len(got) == n_threads * n_calls
    assert not differ, f"{len(differ)} of {len(got)} threaded seeded calls differ from the same calls run one by one"
    assert all(torch.equal(a, b) for a, b in zip(bystander, want_bystander, strict=True)), (
        "another thread's RNG was disturbed"
    )


# -- 3. one rule: hooks and attributes read from the model at call time, in every thread --------------------------
@pytest.mark.parametrize("registered", ["before", "after"])
def test_hooks_fire_in_every_thread_see_the_adapted_output_and_stop_when_removed(registered: str) -> None:
    """Old code: each thread's skeleton copied the hooks when it was made, so a hook registered after
    get_peft_model did not fire in the creating thread, and a removed one kept firing."""
    model = MODELS["llama"]()
    twin = copy.deepcopy(model)
    seen: dict[str, list[torch.Tensor]] = {}
    layer = model.get_submodule("model.layers.1")

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        seen.setdefault(threading.current_thread().name, []).append(
            (out[0] if isinstance(out, tuple) else out).detach()
        )

    handle = layer.register_forward_hook(hook) if registered == "before" else None
    fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = _detached(T.random_like(fresh, torch.Generator().manual_seed(2)))
    if handle is None:
        handle = layer.register_forward_hook(hook)
    ids = _ids()
    ref = peft.get_peft_model(twin, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    T.copy_into_peft(ref, adapter, fn.plans["default"])
    want: list[torch.Tensor] = []
    ref.get_submodule("base_model.model.model.layers.1").register_forward_hook(
        lambda m, a, o: want.append((o[0] if isinstance(o, tuple) else o).detach())
    )

    def work(i: int) -> None:
        with torch.no_grad():
            fn(base, adapter, input_ids=ids)

    with torch.no_grad():
        ref(input_ids=ids)
        model(input_ids=ids)  # the model itself: the plain layer output
    plain = seen.pop(threading.current_thread().name)
    work(0)
    in_threads(3, work)
    assert len(seen) == 4, f"the hook fired in {sorted(seen)}; expected the main thread and 3 workers"
    for outs in seen.values():
        assert len(outs) == 1
        torch.testing.assert_close(
            outs[0], want[0], atol=1e-5, rtol=0
        )  # the adapted layer output, as PEFT's hook sees it
    assert not torch.allclose(plain[0], want[0], atol=1e-4)
    handle.remove()
    seen.clear()
    work(0)
    in_threads(2, work)
    assert not seen, "a removed hook still fired"


def test_kwargs_pre_hook_and_attribute_changes_apply_in_every_thread() -> None:
    model = MODELS["llama"]()
    fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    adapter = _detached(T.random_like(fresh, torch.Generator().manual_seed(2)))
    ids = _ids()
    with torch.no_grad():
        before = fn(base, adapter, input_ids=ids).logits
    attn = cast("LlamaAttention", model.get_submodule("model.layers.0.self_attn"))
    handle = model.get_submodule("model.layers.0").register_forward_pre_hook(
        lambda m, args, kwargs: (
            ((args[0] * 2,), kwargs) if args else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 2})
        ),
        with_kwargs=True,
    )
    old_scaling = attn.scaling
    attn.scaling = old_scaling * 3  # a plain attribute, changed after get_peft_model
    try:
        results: dict[str, torch.Tensor] = {}

        def work(i: int) -> None:
            with torch.no_grad():
                results[threading.current_thread().name] = fn(base, adapter, input_ids=ids).logits

        work(0)
        in_threads(3, work)
    finally:
        handle.remove()
        attn.scaling = old_scaling
    assert len(results) == 4
    first = next(iter(results.values()))
    assert all(torch.equal(r, first) for r in results.values())
    assert not torch.allclose(first, before)
    with torch.no_grad():
        assert torch.equal(fn(base, adapter, input_ids=ids).logits, before)


def test_instance_forward_wrappers_keep_the_adapter() -> None:
    """accelerate's hooks replace `module.forward` by a partial bound to the module (and keep `_old_forward`):
    call skeletons rebind them, so the wrapped layer still runs with the adapter."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Double(ModelHook):
        def post_forward(self, module: nn.Module, output: Any) -> Any:
            return output * 2

    model = MODELS["llama"]()
    fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    adapter = _detached(T.random_like(fresh, torch.Generator().manual_seed(0)))
    ids = _ids()
    with torch.no_grad():
        plain = fn(base, adapter, input_ids=ids).logits
        add_hook_to_module(model.lm_head, Double())
        hooked = fn(base, adapter, input_ids=ids).logits
        base_hooked = fn(base, None, input_ids=ids).logits
        own = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, 2 * plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(base_hooked, own, atol=1e-6, rtol=0)


def test_changed_module_structure_is_a_clear_error() -> None:
    model = MODELS["mlp"]()
    fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["lin0"]))
    model.lin1 = nn.Sequential(nn.Linear(16, 4))  # `lin1.weight` is now `lin1.0.weight`
    with pytest.raises(RuntimeError, match=r"lin1\.(weight|bias).*structure changed"):
        fn(base, fresh, torch.randn(2, 8))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_output_hidden_states_over_many_calls_equal_the_models_and_add_no_hooks(kind: str) -> None:
    """transformers installs its output-capturing hooks on the first call asking for hidden states and marks the
    module; on call skeletons the mark was lost and each call added another set to the model's hook dicts
    (hidden_states grew by one entry per layer per call). Each call now equals the plain model's, and the model
    gets one set, the one a plain call of it would install."""
    model, plain = MODELS[kind](), MODELS[kind]()
    fn, base, _ = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules="all-linear"))
    ids = _ids()
    with torch.no_grad():
        want = plain(input_ids=ids, output_hidden_states=True).hidden_states
        counts = []
        for _ in range(3):
            got = fn(base, None, input_ids=ids, output_hidden_states=True).hidden_states
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
            counts.append(sum(len(m._forward_hooks) for m in model.modules()))
    assert counts[0] == counts[-1] == sum(len(m._forward_hooks) for m in plain.modules())


# -- 4. compiled fn in threads next to eager calls -------------------------------------------------------------
def _compile_setup(kind: str) -> tuple[Any, ...]:
    model = MODELS[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, target_modules="all-linear"))
    trees = [_detached(T.random_like(fresh, torch.Generator().manual_seed(s))) for s in range(3)]
    ids = _ids()
    with torch.no_grad():
        want = [fn(base, t, input_ids=ids).logits for t in trees]
    return fn, base, trees, ids, want


def _eager_until(
    done: threading.Event, fn: Any, base: Any, trees: list[Any], ids: torch.Tensor, want: list[torch.Tensor]
) -> None:
    with torch.no_grad():
        rounds = 0
        while not done.is_set() or rounds < 2:
            for k, t in enumerate(trees):
                assert torch.equal(fn(base, t, input_ids=ids).logits, want[k])
            rounds += 1


def _compiled_calls(compiled: Any, base: Any, trees: list[Any], ids: torch.Tensor, want: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for _ in range(2):
            for k, t in enumerate(trees):
                assert (compiled(base, t, input_ids=ids).logits - want[k]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compile_in_a_worker_thread_next_to_eager_and_compiled_calls(kind: str) -> None:
    """Old code: InternalTorchDynamoError (compiled code used the creating thread's skeleton while that
    thread's eager calls swapped it). Phase 1: a worker compiles while this (the creating) thread and
    another worker run eager calls. Phase 2: two workers run the compiled fn while this thread runs eagerly.

    Llama is compiled with no eager call running meanwhile: transformers' Llama uses `kernels`'
    CompileableContextVar, which follows the process-wide `torch.compiler.is_compiling()` flag, so an eager
    Llama call in any thread during a compile breaks the compile (also without funcpeft).
    """
    fn, base, trees, ids, want = _compile_setup(kind)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    done = threading.Event()

    def phase(n_compiled: int, n_eager: int) -> None:
        done.clear()
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                if i < n_compiled:
                    try:
                        _compiled_calls(compiled, base, trees, ids, want)
                    finally:
                        done.set()
                else:
                    _eager_until(done, fn, base, trees, ids, want)
            except BaseException as e:  # noqa: B036 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n_compiled + n_eager)]
        for t in threads:
            t.start()
        if n_eager:
            run(n_compiled)  # this thread, which created fn, runs eager calls meanwhile
        for t in threads:
            t.join()
        assert not errors, errors

    phase(1, 2 if kind == "gpt2" else 0)
    phase(2, 1)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for one adapter structure"
    torch._dynamo.reset()


def test_compiled_fn_retraces_when_the_model_changes() -> None:
    """Under torch.compile the model is read when tracing, and dynamo guards on what it read: a changed
    attribute retraces; a new hook too when torch guards on hooks (its default skip_nnmodule_hook_guards=True
    ignores hooks added after compiling, for funcpeft as for any compiled model)."""
    fn, base, trees, ids, want = _compile_setup("gpt2")
    attn = fn._model.transformer.h[0].attn
    before = snapshot(fn._model)
    torch._dynamo.reset()
    counter = CompileCounter()
    with torch.no_grad(), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled = torch.compile(fn, fullgraph=True, backend=counter)
        torch.testing.assert_close(compiled(base, trees[0], input_ids=ids).logits, want[0], atol=1e-5, rtol=0)
        old = attn.scaling
        attn.scaling = old * 3
        try:
            eager = fn(base, trees[0], input_ids=ids).logits
            got = compiled(base, trees[0], input_ids=ids).logits
        finally:
            attn.scaling = old
        assert not torch.allclose(eager, want[0])
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
        handle = attn.register_forward_hook(lambda m, a, o: (o[0] * 0.5, *o[1:]))
        try:
            eager = fn(base, trees[0], input_ids=ids).logits
            got = compiled(base, trees[0], input_ids=ids).logits
        finally:
            handle.remove()
        assert not torch.allclose(eager, want[0])
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled(base, trees[0], input_ids=ids).logits, want[0], atol=1e-5, rtol=0)
    assert counter.frame_count >= 3
    assert_unchanged(fn._model, before)
    torch._dynamo.reset()


def test_compiled_grad_with_checkpointing_enabled_leaves_out_the_input_grad_hook() -> None:
    """gradient_checkpointing_enable() registers transformers' `requires_grad_` hook on the embeddings, which
    torch.compile cannot return from a graph (and torch.func rejects); fn leaves it out, compiled or not."""
    fn, base, trees, ids, _ = _compile_setup("gpt2")
    fn._model.gradient_checkpointing_enable()
    torch._dynamo.reset()
    counter = CompileCounter()

    def loss(a: Any) -> torch.Tensor:
        return fn(base, a, input_ids=ids).logits.square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eval mode: nothing is checkpointed (the warning's subject)
        got = value_and_grad(compiled)(trees[0])
        want = value_and_grad(loss)(trees[0])
    assert abs(got[0].item() - want[0].item()) <= 1e-6
    T.assert_trees_close(got[1], want[1], atol=1e-5)
    assert counter.frame_count == 1
    assert len(fn._model.transformer.wte._forward_hooks) == 1  # the model keeps its hook
    torch._dynamo.reset()
