"""Several adapters: `fn(base, None)`, `fn(base, {name: tree, ...})`, merging them, and add_weighted_adapter vs PEFT."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import optree
import peft
import pytest
import torch
from test_merge import inputs, out, run, twins

import funcpeft
from funcpeft.testing import copy_into_peft, peft_param_name, random_like


def add_twin(pm, ref, name: str, seed: int = 1, **cfg: Any):  # noqa: ANN001, ANN201
    """Register adapter `name` in both, with the same random non-zero values; returns its tree."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = random_like(pm.add_adapter(name, funcpeft.LoraConfig(**cfg)), torch.Generator().manual_seed(seed))
        ref.add_adapter(name, peft.LoraConfig(**copy.deepcopy(cfg)))
    copy_into_peft(ref, tree, pm.plans[name], name)
    return tree


def peft_out(ref, x: torch.Tensor, active: str | list[str]) -> torch.Tensor:  # noqa: ANN001
    if isinstance(active, str):
        ref.set_adapter(active)
    else:
        ref.base_model.set_adapter(active)
    with torch.no_grad():
        return out(ref(x))


# -- fn(base, None) and fn(base, {name: tree}) ---------------------------------------------------------------
def test_none_is_the_base_model_like_peft_disable_adapter():
    pm, adapter, ref, model = twins("llama", target_modules=["q_proj", "v_proj", "embed_tokens"])
    with torch.no_grad(), ref.disable_adapter():
        want = ref(inputs("llama")).logits
        plain = model(inputs("llama")).logits
    got = run(pm.fn, pm.base, None, inputs("llama"))
    assert torch.equal(got, plain)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - run(pm.fn, pm.base, adapter, inputs("llama"))).abs().max() > 1e-3  # the adapter does something


MULTI = {
    "llama-same-targets": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4),
    ),
    "llama-different-targets": (
        "llama",
        dict(target_modules=["q_proj"]),
        dict(target_modules=["v_proj", "embed_tokens", "down_proj"], r=3),
    ),
    "gpt2-overlapping": (
        "gpt2",
        dict(target_modules=["c_attn"]),
        dict(target_modules=["c_attn", "c_fc"], r=3, use_rslora=True),
    ),
    "conv": ("conv", dict(target_modules=["c1", "c2"]), dict(target_modules=["c2", "c3", "fc"], r=2, lora_alpha=5)),
}


@pytest.mark.parametrize("case", MULTI)
def test_several_adapters_sum_like_peft_active_list(case):
    name, cfg_a, cfg_b = MULTI[case]
    pm, tree_a, ref, _ = twins(name, **cfg_a)
    tree_b = add_twin(pm, ref, "b", **cfg_b)
    x, both = inputs(name), {"default": tree_a, "b": tree_b}
    got = run(pm.fn, pm.base, both, x)
    torch.testing.assert_close(got, peft_out(ref, x, ["default", "b"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(pm.fn, pm.base, {"b": tree_b}, x), peft_out(ref, x, "b"), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(pm.fn, pm.base, tree_a, x), peft_out(ref, x, "default"), atol=1e-5, rtol=0)
    # merging both (PEFT merges its active adapters) gives the same function
    merged = funcpeft.merge(pm, pm.base, both)
    torch.testing.assert_close(run(pm.fn, merged, None, x), got, atol=1e-5, rtol=0)
    for k, v in pm.base.items():
        torch.testing.assert_close(funcpeft.unmerge(pm, merged, both)[k], v, atol=1e-6, rtol=0)
    new = funcpeft.merge_and_unload(pm, both)
    ref.base_model.set_adapter(["default", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(out(new(x)), out(want(x)), atol=1e-5, rtol=0)
        torch.testing.assert_close(out(new(x)), got, atol=1e-5, rtol=0)


# -- add_weighted_adapter ------------------------------------------------------------------------------------
@contextlib.contextmanager
def peft_masks_seeded(seed: int) -> Iterator[None]:
    """PEFT draws DARE's masks from the global RNG after initialising the new adapter's layers (which draws too):
    seed the global RNG at its first per-layer combine, so its masks are those of `torch.Generator().manual_seed(seed)`
    in funcpeft (the same draws, in the same order, from then on)."""
    from peft.tuners.lora.model import LoraModel

    names = ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter")
    originals = {n: getattr(LoraModel, n) for n in names}
    first = [True]

    def seeding(f):  # noqa: ANN001, ANN202
        def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if first[0]:
                torch.manual_seed(seed)
                first[0] = False
            return f(self, *args, **kwargs)

        return wrapped

    try:
        for n, f in originals.items():
            setattr(LoraModel, n, seeding(f))
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for n, f in originals.items():
            setattr(LoraModel, n, f)


def check_weighted(pm, ref, trees, weights, new: str, x: torch.Tensor, seed: int | None = None, **kw):  # noqa: ANN001, ANN201
    """Our tree/config vs PEFT's add_weighted_adapter, leaf by leaf and in the forward.

    seed: for the DARE types, funcpeft gets `generator=torch.Generator().manual_seed(seed)` and PEFT's global RNG
    is seeded with it at its first mask draw (`peft_masks_seeded`).
    """
    leaves = [t for t in optree.tree_leaves(trees) if isinstance(t, torch.Tensor)]
    snap = [t.clone() for t in leaves]
    rng = torch.random.get_rng_state()
    gen: dict[str, Any] = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    tree, cfg = funcpeft.add_weighted_adapter(pm, trees, weights, adapter_name=new, **kw, **gen)
    assert all(torch.equal(a, b) for a, b in zip(leaves, snap))
    assert torch.equal(torch.random.get_rng_state(), rng) or seed is None  # a generator leaves the global RNG alone
    names = [n for n, _ in trees] if isinstance(trees, list) else list(trees)
    with peft_masks_seeded(seed) if seed is not None else contextlib.nullcontext():
        ref.base_model.add_weighted_adapter(names, list(weights), new, **kw)
    want = ref.peft_config[new]
    for field in (
        "r",
        "lora_alpha",
        "target_modules",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
    ):
        assert getattr(cfg, field) == getattr(want, field), field
    named = dict(ref.named_parameters())
    ours = {}
    for path, entry in tree.items():
        for key, value in entry.items():
            ours[peft_param_name(path, key, pm.plans[new][path], new)] = value
            assert not value.requires_grad
    assert ours.keys() == {n for n in named if f".{new}." in n or n.endswith(f".{new}")}
    for n, v in ours.items():
        assert v.shape == named[n].shape, n
        torch.testing.assert_close(v, named[n].detach(), atol=1e-6, rtol=0, msg=n)
    torch.testing.assert_close(run(pm.fn, pm.base, {new: tree}, x), peft_out(ref, x, new), atol=1e-5, rtol=0)
    return tree, cfg


WEIGHTED = {
    "llama-cat": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["v_proj", "k_proj"], lora_alpha=16),
        dict(combination_type="cat"),
    ),
    "llama-linear-negative": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["v_proj", "k_proj"], lora_alpha=16),
        dict(combination_type="linear"),
    ),
    "llama-svd-default": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["v_proj", "k_proj"], lora_alpha=16),
        {},
    ),
    "llama-embed-svd-options": (
        "llama",
        dict(target_modules=["embed_tokens", "q_proj"], r=4),
        dict(target_modules=["embed_tokens", "lm_head"], r=6),
        dict(combination_type="svd", svd_rank=3, svd_clamp=0.9, svd_full_matrices=False),
    ),
    "llama-cat-rank_pattern-rslora": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"], r=2, rank_pattern={"v_proj": 5}, use_rslora=True),
        dict(target_modules=["v_proj"], r=3),
        dict(combination_type="cat"),
    ),
    "llama-regex-targets": (
        "llama",
        dict(target_modules=r".*\.q_proj"),
        dict(target_modules=r".*\.(v|o)_proj"),
        dict(combination_type="cat"),
    ),
    "gpt2-conv1d-svd": (
        "gpt2",
        dict(target_modules=["c_attn"]),
        dict(target_modules=["c_attn", "c_fc"], r=3),
        dict(combination_type="svd"),
    ),
    "gpt2-conv1d-linear": (
        "gpt2",
        dict(target_modules=["c_attn"]),
        dict(target_modules=["c_attn", "c_fc"], lora_alpha=3),
        dict(combination_type="linear"),
    ),
    "conv-cat": (
        "conv",
        dict(target_modules=["c1", "c3"]),
        dict(target_modules=["c1", "c2", "fc"], r=3),
        dict(combination_type="cat"),
    ),
    "conv2d-svd": (
        "conv",
        dict(target_modules=["c1", "c2"]),
        dict(target_modules=["c1"], r=3),
        dict(combination_type="svd"),
    ),
    "modules_to_save-copied-from-base": (
        "llama",
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj"]),
        dict(combination_type="cat"),
    ),
    # PEFT's pruning types (peft/utils/merge_utils.py); DARE draws its masks from a seeded generator (see check_weighted)
    **{
        # PEFT's SVD handles conv deltas of nn.Conv2d only: the *_svd rows leave out the Conv1d c3
        f"{kind}-{ct}": (
            kind,
            cfg_a,
            cfg_b if kind != "conv" or not ct.endswith("svd") else {**cfg_b, "target_modules": ["c1"]},
            dict(combination_type=ct, density=density, majority_sign_method=sign, seed=seed),
        )
        for kind, cfg_a, cfg_b in (
            (
                "llama",
                dict(target_modules=["q_proj", "v_proj", "embed_tokens"]),
                dict(target_modules=["v_proj", "k_proj", "embed_tokens"], lora_alpha=16),
            ),
            ("gpt2", dict(target_modules=["c_attn"]), dict(target_modules=["c_attn", "c_fc"], lora_alpha=3)),
            ("conv", dict(target_modules=["c1", "c2"]), dict(target_modules=["c1", "c2", "c3"], lora_alpha=5)),
        )
        for ct, density, sign, seed in (
            ("ties", 0.5, "total", None),
            ("ties_svd", 0.3, "frequency", None),
            ("magnitude_prune", 0.6, "total", None),
            ("magnitude_prune_svd", 0.5, "total", None),
            ("dare_linear", 0.5, "total", 11),
            ("dare_ties", 0.4, "frequency", 12),
            ("dare_linear_svd", 0.7, "total", 13),
            ("dare_ties_svd", 0.5, "total", 14),
        )
    },
}


@pytest.mark.parametrize("case", WEIGHTED)
def test_add_weighted_adapter_equals_peft(case):
    name, cfg_a, cfg_b, kw = WEIGHTED[case]
    pm, tree_a, ref, _ = twins(name, **cfg_a)
    tree_b = add_twin(pm, ref, "b", **cfg_b)
    tree, _ = check_weighted(pm, ref, {"default": tree_a, "b": tree_b}, [1.0, -0.7], "w", inputs(name), **kw)
    if "modules_to_save" in case:  # PEFT's new adapter gets a fresh copy of the original module
        assert torch.equal(tree["lm_head"]["weight"], pm.base["lm_head.weight"])
        assert tree["lm_head"]["weight"].data_ptr() != pm.base["lm_head.weight"].data_ptr()


def test_single_adapter_is_linear_and_pairs_may_repeat_a_name():
    pm, tree_a, ref, _ = twins("llama", target_modules=["q_proj", "v_proj"])
    check_weighted(pm, ref, {"default": tree_a}, [0.5], "one", inputs("llama"), combination_type="svd")
    check_weighted(
        pm,
        ref,
        [("default", tree_a), ("default", tree_a)],
        [0.3, 0.4],
        "twice",
        inputs("llama"),
        combination_type="svd",
    )


def test_weighted_adapter_without_a_name_leaves_pm_alone_and_can_be_registered():
    pm, tree_a, _, _ = twins("llama", target_modules=["q_proj"])
    plans, configs = dict(pm.plans), dict(pm.peft_config)
    tree, cfg = funcpeft.add_weighted_adapter(pm, {"default": tree_a}, [1.0], combination_type="linear")
    assert pm.plans == plans and pm.peft_config == configs
    pm.add_adapter("w", cfg)
    torch.testing.assert_close(
        run(pm.fn, pm.base, {"w": tree}, inputs("llama")),
        run(pm.fn, pm.base, tree_a, inputs("llama")),
        atol=1e-5,
        rtol=0,
    )  # weight 1: the same delta
    assert cfg.r == cfg.lora_alpha == 8


ERRORS = {
    "linear-unequal-ranks": (dict(r=4), dict(r=2), dict(combination_type="linear"), ValueError, "same r value"),
    "invalid-type": ({}, {}, dict(combination_type="bogus"), ValueError, "Invalid combination_type: bogus"),
    "mixed-target-types": ({}, dict(target_modules=r".*q_proj"), {}, ValueError, "same target modules type"),
    "modules_to_save-twice": (
        dict(modules_to_save=["lm_head"]),
        dict(modules_to_save=["lm_head"]),
        {},
        ValueError,
        "same module with modules_to_save",
    ),
    "bias-on-first": (dict(bias="lora_only"), {}, {}, ValueError, "supports only 1 adapter with bias"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_add_weighted_adapter_errors_like_peft(case):
    extra_a, extra_b, kw, exc, msg = ERRORS[case]
    pm, tree_a, ref, _ = twins("llama", **{"target_modules": ["q_proj"], **extra_a})
    tree_b = add_twin(pm, ref, "b", **{"target_modules": ["q_proj"], **extra_b})
    with pytest.raises(exc, match=msg):
        funcpeft.add_weighted_adapter(pm, {"default": tree_a, "b": tree_b}, [1.0, 1.0], adapter_name="w", **kw)
    assert "w" not in pm.peft_config and "w" not in pm.plans
    with pytest.raises(exc, match=msg):
        ref.base_model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "w", **kw)


def test_add_weighted_adapter_rejects_bad_arguments():
    pm, tree_a, _, _ = twins("llama", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        funcpeft.add_weighted_adapter(pm, {"nope": tree_a}, [1.0])
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        funcpeft.add_weighted_adapter(pm, [("default", tree_a), ("default", tree_a)], [1.0])
    with pytest.raises(ValueError, match="'ties' prunes the adapters: pass density"):
        funcpeft.add_weighted_adapter(
            pm, [("default", tree_a), ("default", tree_a)], [1.0, 1.0], combination_type="ties"
        )
    with pytest.raises(ValueError, match="already exists"):
        funcpeft.add_weighted_adapter(pm, {"default": tree_a}, [1.0], adapter_name="default")
    with pytest.raises(TypeError, match="registered_adapter_name"):
        funcpeft.add_weighted_adapter(pm, [tree_a], [1.0])
    with pytest.raises(ValueError, match="lora_B is missing"):
        funcpeft.add_weighted_adapter(pm, {"default": {p: {"lora_A": e["lora_A"]} for p, e in tree_a.items()}}, [1.0])


def test_svd_driver_is_passed_to_torch_like_peft():
    """torch accepts `driver=` only for CUDA inputs: on these CPU tensors both raise torch's error."""
    pm, tree_a, ref, _ = twins("llama", target_modules=["q_proj"])
    tree_b = add_twin(pm, ref, "b", target_modules=["q_proj"])
    with pytest.raises(RuntimeError) as ours:
        funcpeft.add_weighted_adapter(pm, {"default": tree_a, "b": tree_b}, [1.0, 1.0], svd_driver="gesvd")
    with pytest.raises(RuntimeError) as theirs:
        ref.base_model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "w", svd_driver="gesvd")
    assert "driver" in str(ours.value) and str(ours.value) == str(theirs.value)
