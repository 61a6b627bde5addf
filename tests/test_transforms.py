"""torch.func transforms on adapters: ensembles, per-example adapters (vs PEFT's adapter_names), per-sample
gradients, forward mode. Each compares against a loop of plain calls or against PEFT."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from helpers import MODELS, hf, make_inputs, tree_map
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import funcpeft
from funcpeft import testing as T
from funcpeft.grad import value_and_grad

K = 3


def _padded_batch(batch: int = 4, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) and an attention_mask with left padding on some rows and right padding on another."""
    ids = make_inputs("llama", batch=batch, seq=seq, seed=seed)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[-1, seq - 2 :] = 0
    return ids, mask


@pytest.fixture(scope="module")
def llama() -> tuple[Any, ...]:
    model = MODELS["llama"]()
    fn, base, fresh = funcpeft.get_peft_model(
        model, funcpeft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"])
    )
    trees = [T.random_like(fresh, torch.Generator().manual_seed(s)) for s in range(K)]
    return fn, base, trees


def _logits(fn: Any, base: Any, adapter: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return fn(base, adapter, input_ids=ids, attention_mask=mask).logits


def _lm_loss(fn: Any, base: Any, adapter: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example mean next-token loss (B,) over non-padded targets."""
    logits = _logits(fn, base, adapter, ids, mask)[:, :-1]
    target = ids[:, 1:]
    keep = torch.ones_like(target, dtype=logits.dtype) if mask is None else mask[:, 1:].to(logits.dtype)
    tok = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return (tok * keep).sum(1) / keep.sum(1)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in optree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


# -- ensembles ----------------------------------------------------------------------------------------------------
def test_vmapped_ensemble_equals_loop_and_never_copies_the_base(llama: tuple[Any, ...]) -> None:
    fn, base, trees = llama
    ids, mask = _padded_batch(batch=3, seq=7)  # B*T = 21: no activation can look like a stacked weight
    stacked = funcpeft.stack_adapters(trees)
    mode = _Shapes()
    with torch.no_grad():
        loop = torch.stack([_logits(fn, base, t, ids, mask) for t in trees])
        with mode:
            mapped = torch.func.vmap(lambda a: _logits(fn, base, a, ids, mask))(stacked)
    assert (mapped - loop).abs().max().item() <= 1e-5
    assert not torch.allclose(loop[0], loop[1])
    per_member_weights = {(K, *w.shape) for w in base.values() if w.dim() >= 2}
    assert mode.shapes, "the dispatch mode saw no ops"
    assert not mode.shapes & per_member_weights, "a base weight was materialised once per ensemble member"
    assert funcpeft.unstack_adapters(stacked)[1]["model.layers.0.self_attn.q_proj"]["lora_A"].equal(
        trees[1]["model.layers.0.self_attn.q_proj"]["lora_A"]
    )


def test_training_k_adapters_at_once_equals_k_separate_steps(llama: tuple[Any, ...]) -> None:
    fn, base, trees = llama
    ids, mask = _padded_batch()
    opt = funcpeft.optim.adamw(1e-2)

    def loss(a: Any) -> torch.Tensor:
        return _lm_loss(fn, base, a, ids, mask).mean()

    def step(a: Any, state: Any) -> tuple[torch.Tensor, Any, Any]:
        value, grads = value_and_grad(loss)(a)
        updates, state = opt.update(grads, state, a)
        return value, funcpeft.optim.apply_updates(a, updates), state

    singles = [(t, opt.init(t)) for t in trees]
    stacked = funcpeft.stack_adapters(trees)
    state = torch.func.vmap(opt.init)(stacked)
    for _ in range(2):
        losses, stacked, state = torch.func.vmap(step)(stacked, state)
        want = []
        for i, (t, s) in enumerate(singles):
            value, t, s = step(t, s)
            singles[i] = (t, s)
            want.append(value)
        assert (losses - torch.stack(want)).abs().max().item() <= 1e-5
    for got, (t, _) in zip(funcpeft.unstack_adapters(stacked), singles):
        T.assert_trees_close(got, t, atol=1e-5)
    assert not torch.allclose(losses[0], losses[1])


# -- per-example adapters ---------------------------------------------------------------------------------------
@given(index=st.lists(st.integers(-1, K - 1), min_size=4, max_size=4))
def test_per_example_rows_equal_single_adapter_runs(llama: tuple[Any, ...], index: list[int]) -> None:
    fn, base, trees = llama
    ids, mask = _padded_batch()
    with torch.no_grad():
        got = _logits(fn, base, funcpeft.per_example(funcpeft.stack_adapters(trees), index), ids, mask)
        full = {i: _logits(fn, base, trees[i] if i >= 0 else None, ids, mask) for i in set(index)}
    for row, i in enumerate(index):
        assert (got[row] - full[i][row]).abs().max().item() <= 1e-5, (row, i)


MIXED = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(r=4, lora_alpha=8, target_modules="all-linear"),  # Conv1D: (B*T, in) inputs
}


@pytest.mark.parametrize("kind", sorted(MIXED))
def test_mixed_batch_matches_peft_adapter_names(kind: str) -> None:
    import peft

    cfg: dict[str, Any] = MIXED[kind]
    configs: dict[str, Any] = {
        "default": cfg,
        "same": cfg,
        "other": {**cfg, "lora_alpha": 3, "r": 2},
    }  # "same" stacks with default
    model = MODELS[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**cfg))
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
        fresh = {"default": fpm.adapter}
        for name in ("same", "other"):
            fresh[name] = fpm.add_adapter(name, funcpeft.LoraConfig(**configs[name]))
            pm.add_adapter(name, peft.LoraConfig(**configs[name]))
    trees = {n: T.random_like(t, torch.Generator().manual_seed(i)) for i, (n, t) in enumerate(fresh.items())}
    for name, tree in trees.items():
        T.copy_into_peft(pm, tree, fpm.plans[name], name)
    pm.eval()
    ids, mask = _padded_batch(batch=5)
    names = ["default", "__base__", "other", "same", "default"]
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        got = _logits(fpm.fn, fpm.base, funcpeft.mixed_batch(trees, names), ids, mask)
        base_out = _logits(fpm.fn, fpm.base, None, ids, mask)
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(got[1], base_out[1])  # "__base__" is exactly the base model
    assert not torch.allclose(got[0], base_out[0]) and not torch.allclose(got[2], base_out[2])
    assert (got[0] - got[4]).abs().max() > 1e-4  # same adapter on different inputs...
    assert not torch.allclose(got[3], base_out[3])


def test_per_example_on_conv_layers_equals_single_runs() -> None:
    model = MODELS["conv"]()
    fn, base, fresh = funcpeft.get_peft_model(
        model, funcpeft.LoraConfig(r=2, target_modules=["conv2d", "conv1d", "fc"])
    )
    trees = [T.random_like(fresh, torch.Generator().manual_seed(s)) for s in range(2)]
    x = make_inputs("conv", batch=3)["x"]
    index = [1, -1, 0]
    with torch.no_grad():
        got = fn(base, funcpeft.per_example(trees, index), x)
        want = torch.stack([fn(base, trees[i] if i >= 0 else None, x)[row] for row, i in enumerate(index)])
    assert (got - want).abs().max().item() <= 1e-5


OTHER_METHODS = {  # the generic path: each method's own forward, vmapped over the examples
    "dora": lambda: funcpeft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "down_proj"]),
    "ia3-feedforward": lambda: funcpeft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "loha": lambda: funcpeft.LoHaConfig(r=4, target_modules=["q_proj", "down_proj"]),
    "lokr": lambda: funcpeft.LoKrConfig(r=4, target_modules=["q_proj", "down_proj"]),
    "vera-shared-projections": lambda: funcpeft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_per_example_works_for_every_method(method: str) -> None:
    fn, base, fresh = funcpeft.get_peft_model(MODELS["llama"](), OTHER_METHODS[method]())
    trees = [T.random_like(fresh, torch.Generator().manual_seed(s)) for s in range(2)]
    ids, mask = _padded_batch()
    index = [1, -1, 0, 1]
    with torch.no_grad():
        got = _logits(fn, base, funcpeft.per_example(trees, index), ids, mask)
        full = [_logits(fn, base, t, ids, mask) for t in (*trees, None)]
    for row, i in enumerate(index):
        assert (got[row] - full[i][row]).abs().max().item() <= 1e-5, (row, i)
    assert not torch.allclose(full[0], full[1])


def test_per_example_gradients_reach_only_the_adapters_used(llama: tuple[Any, ...]) -> None:
    fn, base, trees = llama
    ids, mask = _padded_batch()
    index = [0, -1, 0, 2]  # adapter 1 unused
    grads = value_and_grad(lambda s: _lm_loss(fn, base, funcpeft.per_example(s, index), ids, mask).sum())(
        funcpeft.stack_adapters(trees)
    )[1]
    for k in range(K):
        want = (
            value_and_grad(
                lambda a, k=k: _lm_loss(fn, base, a, ids, mask)[[r for r, i in enumerate(index) if i == k]].sum()
            )(trees[k])[1]
            if k in index
            else optree.tree_map(torch.zeros_like, trees[k])
        )
        T.assert_trees_close(funcpeft.unstack_adapters(grads)[k], want, atol=1e-5)


def test_per_example_bad_input(llama: tuple[Any, ...]) -> None:
    fn, base, trees = llama
    ids, mask = _padded_batch()
    stacked = funcpeft.stack_adapters(trees)
    with pytest.raises(ValueError, match=r"index values must be in \[-1, 3\)"):
        funcpeft.per_example(stacked, [0, 3, 0, 0])
    with pytest.raises(ValueError, match="index has length 3, but the batch has 4 examples"):
        fn(base, funcpeft.per_example(stacked, [0, 1, 2]), input_ids=ids[:, :5])
    with pytest.raises(ValueError, match="same leading"):
        funcpeft.per_example({"a": {"x": torch.zeros(2, 3), "y": torch.zeros(3, 3)}}, [0])
    with pytest.raises(ValueError, match=r"'defualt'.*did you mean \['default'\]"):
        funcpeft.mixed_batch({"default": trees[0]}, ["defualt"])
    with pytest.raises(KeyError, match="not registered"):
        fn(base, funcpeft.mixed_batch({"nope": trees[0]}, ["nope"]), input_ids=ids)
    with pytest.raises(ValueError, match="is missing"):
        fn(
            base,
            funcpeft.per_example([{k: v for k, v in trees[0].items() if "q_proj" not in k}], [0] * 4),
            input_ids=ids,
        )


def test_per_example_refuses_modules_to_save() -> None:
    model = MODELS["bert"]()
    fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(task_type="SEQ_CLS", r=2))
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        fn(base, funcpeft.per_example([fresh, fresh], [0, 1]), **make_inputs("bert"))


# -- per-sample gradients ----------------------------------------------------------------------------------------
def _loop_grads(fn: Any, base: Any, tree: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> Any:
    rows = [
        value_and_grad(
            lambda a, r=r: _lm_loss(fn, base, a, ids[r : r + 1], None if mask is None else mask[r : r + 1])[0]
        )(tree)[1]
        for r in range(ids.shape[0])
    ]
    return funcpeft.stack_adapters(rows)


def test_per_sample_grads_by_vmap_equal_a_loop(llama: tuple[Any, ...]) -> None:
    fn, base, trees = llama
    ids, _ = _padded_batch()

    def one(a: Any, x: torch.Tensor) -> torch.Tensor:
        return _lm_loss(fn, base, a, x[None])[0]

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0))(trees[0], ids)
    T.assert_trees_close(grads, _loop_grads(fn, base, trees[0], ids, None), atol=1e-5)


def test_per_sample_grads_on_a_padded_batch_equal_a_loop(llama: tuple[Any, ...]) -> None:
    fn, base, trees = llama
    ids, mask = _padded_batch()
    losses, grads = funcpeft.per_sample_grads(lambda a: _lm_loss(fn, base, a, ids, mask), trees[0], batch_size=4)
    T.assert_trees_close(grads, _loop_grads(fn, base, trees[0], ids, mask), atol=1e-5)
    assert (losses - _lm_loss(fn, base, trees[0], ids, mask)).abs().max().item() <= 1e-5
    clipped = funcpeft.optim.clip_per_sample(grads, max_norm=1e-3)
    norms = torch.stack([t.flatten(1).norm(dim=1) for t in optree.tree_leaves(clipped)]).norm(dim=0)
    assert torch.allclose(norms, torch.full((4,), 1e-3), rtol=1e-3)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        funcpeft.per_sample_grads(lambda a: _lm_loss(fn, base, a, ids, mask).sum(), trees[0], batch_size=4)


# -- forward mode -------------------------------------------------------------------------------------------------
# CPU sdpa has no forward-mode derivative: these models use eager attention. Finite differences run on GPT-2
# in float64 (Llama's RMSNorm computes in float32 whatever the dtype, which would swamp them).
@pytest.fixture(scope="module")
def gpt2_64() -> tuple[Any, ...]:
    model = hf(MODELS["gpt2"]()).double()
    model.set_attn_implementation("eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out forced for Conv1D
        fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    a, v = (
        optree.tree_map(torch.Tensor.detach, T.random_like(fresh, torch.Generator().manual_seed(s))) for s in (0, 1)
    )
    return fn, base, a, v


def _right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids, _ = _padded_batch(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask


def _axpy(a: Any, v: Any, eps: float) -> Any:
    return optree.tree_map(lambda x, y: x + eps * y, a, v)


def test_jvp_and_hvp_on_the_adapter_match_finite_differences(gpt2_64: tuple[Any, ...]) -> None:
    fn, base, a, v = gpt2_64
    ids, mask = _right_padded()

    def f(t: Any) -> torch.Tensor:
        return _logits(fn, base, t, ids, mask)

    def loss(t: Any) -> torch.Tensor:
        return _lm_loss(fn, base, t, ids, mask).mean()

    eps = 1e-6
    tangent = torch.func.jvp(f, (a,), (v,))[1]  # (output, tangent): torch types it as a 2- or 3-tuple
    fd = (f(_axpy(a, v, eps)) - f(_axpy(a, v, -eps))) / (2 * eps)
    assert (tangent - fd).abs().max().item() <= 1e-7 * max(1.0, fd.abs().max().item())
    assert fd.abs().max().item() > 1e-3
    hvp = torch.func.jvp(torch.func.grad(loss), (a,), (v,))[1]  # forward-over-reverse
    g = torch.func.grad(loss)
    fd_h = optree.tree_map(lambda p, m: (p - m) / (2 * eps), g(_axpy(a, v, eps)), g(_axpy(a, v, -eps)))
    T.assert_trees_close(hvp, fd_h, atol=1e-7)
    assert max(t.abs().max().item() for t in optree.tree_leaves(hvp)) > 1e-4


def test_jacfwd_equals_jacrev_on_the_adapter() -> None:
    model = hf(MODELS["llama"]())
    model.set_attn_implementation("eager")
    fn, base, fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    a = tree_map(torch.Tensor.detach, T.random_like(fresh))
    ids, mask = _padded_batch(batch=2, seq=6)
    path = "model.layers.1.mlp.up_proj"

    def f(b: torch.Tensor) -> torch.Tensor:
        return _logits(fn, base, {**a, path: {**a[path], "lora_B": b}}, ids, mask)[:, -1, :5]

    x = a[path]["lora_B"]
    fwd, rev = torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x)
    assert fwd.shape == (2, 5, *x.shape)
    assert (fwd - rev).abs().max().item() <= 1e-5 and fwd.abs().max().item() > 1e-3
