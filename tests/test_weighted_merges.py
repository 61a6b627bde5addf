"""`add_weighted_adapter`'s pruning types (ties, dare_*, magnitude_prune and their *_svd forms).

The whole-adapter comparison with PEFT is a table in tests/test_multi_adapter.py (`WEIGHTED`). Here: the
combination rules tensor by tensor against PEFT's own peft/utils/merge_utils.py (property tests), the laws
they obey, the generator contract of DARE's masks, and the argument checks.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils as peft_merge
from test_merge import inputs, run, twins
from test_multi_adapter import add_twin

import funcpeft
from funcpeft._weighted import Rule, magnitude_prune, majority_sign_mask, random_prune

PEFT_RULES = {
    "linear": lambda t, w, d, m: peft_merge.task_arithmetic(t, w),
    "ties": lambda t, w, d, m: peft_merge.ties(t, w, d, m),
    "magnitude_prune": lambda t, w, d, m: peft_merge.magnitude_prune(t, w, d),
    "dare_linear": lambda t, w, d, m: peft_merge.dare_linear(t, w, d),
    "dare_ties": lambda t, w, d, m: peft_merge.dare_ties(t, w, d, m),
}


@st.composite
def task_tensors(draw: Any) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """K tensors of one shape with some ties and zeros, K weights (either sign), a seed."""
    k = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g).round(decimals=1) for _ in range(k)]  # rounding makes ties
    weights = torch.tensor(draw(st.lists(st.floats(-2, 2, width=32), min_size=k, max_size=k)))
    return tensors, weights, seed


@settings(max_examples=examples(60), derandomize=True)
@given(
    task_tensors(), st.sampled_from(sorted(PEFT_RULES)), st.floats(0.0, 1.0), st.sampled_from(["total", "frequency"])
)
def test_rules_equal_peft_merge_utils(case: Any, kind: str, density: float, sign: str) -> None:
    """Every rule on the same tensors: DARE with a generator seeded like PEFT's global RNG gives PEFT's tensor."""
    tensors, weights, seed = case
    if kind.startswith("dare") and density == 0:
        density = 0.5  # PEFT divides by it (NaN); funcpeft refuses it (test_bad_arguments_are_refused...)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # density >= 1
        torch.manual_seed(seed)
        want = PEFT_RULES[kind]([t.clone() for t in tensors], weights, density, sign)
        got = Rule(kind, density, sign, torch.Generator().manual_seed(seed)).combine(tensors, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # bitwise (a tiny density overflows both)


@settings(max_examples=examples(40), derandomize=True)
@given(task_tensors(), st.floats(0.0, 0.99))
def test_pruning_keeps_what_peft_keeps(case: Any, density: float) -> None:
    tensors, _, seed = case
    t = tensors[0]
    density = max(density, 0.01)  # DARE divides by it
    assert torch.equal(magnitude_prune(t, density), peft_merge.magnitude_based_pruning(t, density))
    kept = int(density * t.numel())
    assert int((magnitude_prune(t, density) != 0).sum()) <= kept
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        want = peft_merge.random_pruning(t, density, rescale=True)
    assert torch.equal(random_prune(t, density, torch.Generator().manual_seed(seed)), want)
    stacked = torch.stack(tensors)
    for method in ("total", "frequency"):
        assert torch.equal(
            majority_sign_mask(stacked, method), peft_merge.calculate_majority_sign_mask(stacked, method)
        )


@settings(max_examples=examples(30), derandomize=True)
@given(task_tensors())
def test_full_density_laws(case: Any) -> None:
    """density 1 prunes nothing: magnitude_prune and dare_linear are linear and DARE draws nothing; density 0
    keeps nothing."""
    tensors, weights, _ = case
    linear = Rule("linear").combine(tensors, weights)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(Rule("magnitude_prune", 1.0).combine(tensors, weights), linear)
    assert torch.equal(Rule("dare_linear", 1.0, generator=g).combine(tensors, weights), linear)
    assert torch.equal(g.get_state(), state)
    for kind in ("ties", "magnitude_prune"):
        assert not Rule(kind, 0.0).combine(tensors, weights).any()


# -- the generator contract ----------------------------------------------------------------------------------
def _pair() -> tuple[Any, Any, Any]:
    pm, tree_a, ref, _ = twins("llama", target_modules=["q_proj", "v_proj"])
    tree_b = add_twin(pm, ref, "b", target_modules=["q_proj", "v_proj"], lora_alpha=16)
    return pm, tree_a, tree_b


@pytest.mark.parametrize("ct", ["dare_linear", "dare_ties_svd"])
def test_dare_masks_come_from_the_generator_only(ct: str) -> None:
    """Same seed (int or Generator) -> the same tree; another seed -> another; the global RNG is neither read
    nor advanced; a Generator is advanced, not reseeded."""
    pm, tree_a, tree_b = _pair()
    trees = {"default": tree_a, "b": tree_b}

    def combine(**kw: Any) -> dict[str, dict[str, torch.Tensor]]:
        return funcpeft.add_weighted_adapter(pm, trees, [1.0, 0.5], combination_type=ct, density=0.5, **kw)[0]

    state = torch.random.get_rng_state()
    g = torch.Generator().manual_seed(3)
    first = combine(generator=g)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = combine(generator=torch.Generator().manual_seed(3))
    by_int = combine(generator=3)
    later = combine(generator=g)  # advanced: new masks
    other = combine(generator=4)
    for path, entry in first.items():
        for k, v in entry.items():
            assert torch.equal(v, again[path][k]) and torch.equal(v, by_int[path][k]), (path, k)
    assert any(not torch.equal(v, other[p][k]) for p, e in first.items() for k, v in e.items())
    assert any(not torch.equal(v, later[p][k]) for p, e in first.items() for k, v in e.items())
    torch.manual_seed(5)
    from_global = combine()  # None: the global RNG, like PEFT
    torch.manual_seed(5)
    replay = combine()
    assert all(torch.equal(v, replay[p][k]) for p, e in from_global.items() for k, v in e.items())


def test_pruned_adapter_runs_and_is_frozen() -> None:
    pm, tree_a, tree_b = _pair()
    tree, cfg = funcpeft.add_weighted_adapter(
        pm, {"default": tree_a, "b": tree_b}, [1.0, -1.0], "ties", combination_type="ties", density=0.3
    )
    assert cfg.r == cfg.lora_alpha == 8
    assert not any(t.requires_grad for e in tree.values() for t in e.values())
    assert 0 < sum(int((t == 0).sum()) for e in tree.values() for t in e.values())
    out = run(pm.fn, pm.base, {"ties": tree}, inputs("llama"))
    assert torch.isfinite(out).all()


# -- arguments ------------------------------------------------------------------------------------------------
BAD: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "no-density": (dict(combination_type="ties"), ValueError, "'ties' prunes the adapters: pass density"),
    "density-not-a-number": (dict(combination_type="dare_linear", density="0.5"), ValueError, "pass density"),
    "negative-density": (
        dict(combination_type="magnitude_prune", density=-0.1),
        ValueError,
        r"Density should be >= 0, got -0.1",
    ),
    "dare-density-zero": (dict(combination_type="dare_ties", density=0.0), ValueError, "density 0 would give NaN"),
    "sign-method": (
        dict(combination_type="ties", density=0.5, majority_sign_method="mean"),
        ValueError,
        "majority_sign_method must be one of",
    ),
    "unknown-svd-type": (
        dict(combination_type="bogus_svd"),
        ValueError,
        "Invalid value passed to combination type: bogus_svd",
    ),
    "generator-type": (
        dict(combination_type="dare_linear", density=0.5, generator="seed"),
        TypeError,
        "generator must be",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_are_refused_before_anything_runs(case: str) -> None:
    kw, exc, msg = BAD[case]
    pm, tree_a, tree_b = _pair()
    with pytest.raises(exc, match=msg):
        funcpeft.add_weighted_adapter(pm, {"default": tree_a, "b": tree_b}, [1.0, 1.0], adapter_name="w", **kw)
    assert "w" not in pm.peft_config and "w" not in pm.plans


def test_density_one_warns_like_peft() -> None:
    pm, tree_a, tree_b = _pair()
    with pytest.warns(
        UserWarning, match="The density 1.0 is greater than or equal to 1, no pruning will be performed."
    ):
        tree, _ = funcpeft.add_weighted_adapter(
            pm, {"default": tree_a, "b": tree_b}, [1.0, 0.5], combination_type="magnitude_prune", density=1.0
        )
    linear, _ = funcpeft.add_weighted_adapter(
        pm, {"default": tree_a, "b": tree_b}, [1.0, 0.5], combination_type="linear"
    )
    assert all(torch.equal(v, linear[p][k]) for p, e in tree.items() for k, v in e.items())
