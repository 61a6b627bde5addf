"""LoRA options and variants against PEFT 0.21.2: lora_bias, nn.MultiheadAttention, KaSA, MiCA, BD-LoRA and
ensure_weight_tying.

PEFT's own rows for them run in tests/test_peft_matrix.py and the variant methods' rows in tests/test_contract.py
(outputs, every gradient, counts, files both ways, merges, vmap, per-example routing). Here: PEFT's validation
errors (same exception type, PEFT's message), init equal to PEFT's, mixed batches against PEFT's `adapter_names`
(and PEFT's refusals), weight tying end to end, PEFT's MultiheadAttention quirks, KaSA's regulariser.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Callable
from typing import Any, cast

import optree
import peft
import pytest
import torch
from peft_matrix import harness, models
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.testing import CompileCounter

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import layer_frozen_key
from funcpeft.methods import kasa
from funcpeft.methods.base import UnsupportedLayerError


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _peft_model(model: nn.Module, kwargs: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)))


def _funcpeft_model(model: nn.Module, kwargs: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return _quiet(lambda: funcpeft.get_peft_model(copy.deepcopy(model), funcpeft.LoraConfig(**kwargs)))


def _out(x: Any) -> torch.Tensor:
    return x.logits if hasattr(x, "logits") else x


MLP, CONV, MHA = models.build("MLP"), models.build("Conv2d"), models.build("MHA")
X = models.inputs("MLP")


# -- PEFT's validation errors ---------------------------------------------------------------------------------
CONFIG_ERRORS = [  # (kwargs, exception, PEFT's message): LoraConfig itself raises, in both libraries
    (dict(lora_bias=True, use_dora=True), ValueError, "lora_bias=True is not supported for DoRA"),
    (
        dict(lora_bias=True, init_lora_weights="gaussian"),
        ValueError,
        "only supported with init_lora_weights=True or False",
    ),
    (dict(lora_bias=True, init_lora_weights="mica"), ValueError, "only supported with init_lora_weights=True or False"),
    (dict(kasa_config={"beta": -1.0}), ValueError, "`beta` must be non-negative"),
    (dict(kasa_config={"gamma": -0.5}), ValueError, "`gamma` must be non-negative"),
    (
        dict(use_bdlora={"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin0"]}),
        ValueError,
        "overlapping modules",
    ),
]


def _peft_sub(kwargs: dict[str, Any]) -> dict[str, Any]:
    """PEFT's sub-config objects for a row's dicts (funcpeft takes both)."""
    out = dict(kwargs)
    if isinstance(out.get("kasa_config"), dict):
        out["kasa_config"] = peft.tuners.lora.config.KasaConfig(**out["kasa_config"])
    if isinstance(out.get("use_bdlora"), dict):
        out["use_bdlora"] = peft.tuners.lora.config.BdLoraConfig(**out["use_bdlora"])
    return out


@pytest.mark.parametrize(("kwargs", "exc", "message"), CONFIG_ERRORS, ids=[m for _, _, m in CONFIG_ERRORS])
def test_config_errors_are_peft_errors(kwargs: dict[str, Any], exc: type, message: str) -> None:
    with pytest.raises(exc, match=message):
        peft.LoraConfig(target_modules=["lin0"], **_peft_sub(kwargs))
    with pytest.raises(exc, match=message):
        funcpeft.LoraConfig(target_modules=["lin0"], **kwargs)


VARIANT_COMBOS = [
    dict(use_dora=True, kasa_config={}),
    dict(init_lora_weights="mica", use_bdlora={"target_modules_bd_a": ["lin0"]}),
    dict(use_dora=True, init_lora_weights="mica"),
]


@pytest.mark.parametrize("kwargs", VARIANT_COMBOS, ids=lambda k: "+".join(sorted(k)))
def test_two_variants_are_refused_like_peft(kwargs: dict[str, Any]) -> None:
    """PEFT raises when it builds the first layer; funcpeft already in the config (the config alone decides it)."""
    with pytest.raises(ValueError, match="Invalid or unsupported variant combination"):
        _peft_model(MLP, _peft_sub(dict(target_modules=["lin0"], **kwargs)))
    with pytest.raises(ValueError, match="Invalid or unsupported variant combination"):
        funcpeft.LoraConfig(target_modules=["lin0"], **kwargs)


class _Emb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lin = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


class _Kdim(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.mha(q, kv, kv)[0]


LAYER_ERRORS = [  # (model, kwargs, PEFT's message): raised when the layers are built, in both libraries
    ("embedding", dict(target_modules=["emb"], lora_bias=True), "lora_bias=True is not supported for Embedding"),
    ("MLP", dict(target_modules=["lin1"], r=4, init_lora_weights="mica"), "MiCA requires `r` <= min"),
    ("MLP", dict(target_modules=["lin1"], r=2, kasa_config={}), "KaSA requires `r` .* to be smaller than"),
    ("gpt2", dict(target_modules=["c_attn"], r=2, kasa_config={}), "KaSA does not support `fan_in_fan_out=True`"),
    ("embedding", dict(target_modules=["emb"], r=2, kasa_config={}), "Invalid or unsupported variant combination"),
    (
        "Conv2d",
        dict(target_modules=["conv2d"], r=2, init_lora_weights="mica"),
        "Invalid or unsupported variant combination",
    ),
    (
        "Conv2d",
        dict(target_modules=["conv2d"], use_bdlora={"target_modules_bd_a": ["conv2d"]}),
        "Invalid or unsupported variant combination",
    ),
    (
        "MLP",
        dict(target_modules=["lin0", "lin1"], use_bdlora={"target_modules_bd_a": ["lin0"]}),
        "matches neither A nor B",
    ),
    (
        "MLP",
        dict(target_modules=["lin0"], use_bdlora={"target_modules_bd_a": ["lin0"], "nblocks": 3}),
        "not divisible by 3",
    ),
    ("MHA", dict(target_modules=["mha"], use_dora=True), "MultiheadAttention|DoRA"),
    ("MHA", dict(target_modules=["mha"], r=2, kasa_config={}), "MultiheadAttention|KaSA|kasa"),
    ("kdim", dict(target_modules=["mha"]), "Only same embed for query/key/value"),
]
LAYER_MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": lambda: models.build("MLP"),
    "Conv2d": lambda: models.build("Conv2d"),
    "MHA": lambda: models.build("MHA"),
    "gpt2": T.tiny_gpt2,
    "kdim": _Kdim,
    "embedding": _Emb,
}


@pytest.mark.parametrize(
    ("model", "kwargs", "message"), LAYER_ERRORS, ids=[f"{m}-{msg[:30]}" for m, _, msg in LAYER_ERRORS]
)
def test_layer_errors_are_peft_errors(model: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message if "|" not in message else None):
        _peft_model(LAYER_MODELS[model](), _peft_sub(kwargs))
    with pytest.raises(ValueError) as e:
        _funcpeft_model(LAYER_MODELS[model](), kwargs)
    assert re.search(message, str(e.value), re.IGNORECASE), str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "path", "kind"),
    [
        (dict(target_modules=["conv2d"], r=2, init_lora_weights="mica"), "conv2d", "Conv2d"),
        (dict(target_modules=["emb"], r=2, kasa_config={}), "emb", "Embedding"),
        (dict(target_modules=["mha"], use_dora=True), "mha", "MultiheadAttention"),
        (dict(target_modules=["mha"], init_lora_weights="mica"), "mha", "MultiheadAttention"),
    ],
)
def test_unsupported_layers_name_the_module_and_its_type(kwargs: dict[str, Any], path: str, kind: str) -> None:
    model = {"conv2d": CONV, "emb": _Emb(), "mha": MHA}[path]
    with pytest.raises(UnsupportedLayerError) as e:
        _funcpeft_model(model, kwargs)
    assert repr(path) in str(e.value) and kind in str(e.value)


def test_kasa_does_not_mix_with_other_adapters_like_peft() -> None:
    pm = _peft_model(MLP, dict(target_modules=["lin0"], r=2, kasa_config=peft.tuners.lora.config.KasaConfig()))
    fpm = _funcpeft_model(MLP, dict(target_modules=["lin0"], r=2, kasa_config={}))
    with pytest.raises(ValueError, match="KaSA cannot be combined with adapters that don't use KaSA"):
        pm.add_adapter("plain", peft.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="KaSA cannot be combined with adapters that don't use KaSA"):
        fpm.add_adapter("plain", funcpeft.LoraConfig(target_modules=["lin0"]))
    plain = _funcpeft_model(MLP, dict(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="the new adapter uses KaSA but adapter 'default' does not"):
        plain.add_adapter("k", funcpeft.LoraConfig(target_modules=["lin0"], r=2, kasa_config={}))
    # PEFT truncates the weight again for a second KaSA adapter: funcpeft refuses it (one KaSA adapter per model)
    with pytest.raises(NotImplementedError, match="one KaSA adapter per model"):
        fpm.add_adapter("k2", funcpeft.LoraConfig(target_modules=["lin0"], r=2, kasa_config={}))


def test_sub_configs_take_peft_objects_dicts_and_warn_about_unknown_keys() -> None:
    a = funcpeft.LoraConfig(kasa_config=funcpeft.KasaConfig(beta=0.5))
    b = funcpeft.LoraConfig(kasa_config={"beta": 0.5})
    assert a.kasa_config == b.kasa_config == {"beta": 0.5, "gamma": 1e-3}  # what PEFT writes to adapter_config.json
    with pytest.warns(UserWarning, match=r"'betta' \(did you mean 'beta'\?\)"):
        c = funcpeft.LoraConfig(kasa_config={"betta": 0.5})
    assert c.kasa_config == {"beta": 1e-4, "gamma": 1e-3}  # PEFT's _get_lora_subconfig drops it too
    # PEFT annotates kasa_config as KasaConfig | None but takes its dict too (_get_lora_subconfig)
    theirs = peft.LoraConfig(kasa_config={"betta": 0.5})  # type: ignore[arg-type]
    assert theirs.kasa_config == peft.tuners.lora.config.KasaConfig()
    with pytest.raises(TypeError, match="KasaConfig"):
        funcpeft.LoraConfig(kasa_config=cast(Any, [0.5]))  # the wrong type, on purpose
    d = funcpeft.LoraConfig(use_bdlora={"target_modules_bd_a": ["q"]})
    assert d.use_bdlora == {
        "target_modules_bd_a": ["q"],
        "target_modules_bd_b": None,
        "nblocks": 1,
        "match_strict": True,
    }


def test_lora_bias_without_a_base_bias_cannot_merge_like_peft() -> None:
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    kwargs: dict[str, Any] = dict(target_modules=["0"], lora_bias=True)
    with pytest.warns(UserWarning, match="has no bias. This means that merging LoRA weights won't be possible"):
        fpm = funcpeft.get_peft_model(copy.deepcopy(model), funcpeft.LoraConfig(**kwargs))
    pm = _peft_model(model, kwargs)
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        pm.merge_and_unload()
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        funcpeft.merge_and_unload(fpm, fpm.adapter)
    assert fpm.fn(fpm.base, fpm.adapter, torch.ones(2, 4)).shape == (2, 3)  # the forward itself works, like PEFT's


# -- init equal to PEFT's ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", ["MLP", "Conv2d"])
def test_lora_bias_init_false_draws_exactly_peft_values(model_id: str) -> None:
    """init_lora_weights=False keeps nn.Linear / nn.ConvNd's default draws: A, B, then B's bias, like PEFT's layers."""
    model = models.build(model_id)
    kwargs = dict(
        target_modules=["lin0", "lin1"] if model_id == "MLP" else ["conv2d"], lora_bias=True, init_lora_weights=False
    )
    pm, fpm = _peft_model(model, kwargs, seed=3), _funcpeft_model(model, kwargs, seed=3)
    named = dict(pm.named_parameters())
    plan = fpm.plans["default"]
    leaves = [(p, k, v) for p, e in fpm.adapter.items() for k, v in e.items()]
    assert {k for _, k, _ in leaves} == {"lora_A", "lora_B", "lora_B_bias"}
    for p, k, v in leaves:
        assert torch.equal(v, named[T.peft_param_name(p, k, plan[p])]), (p, k)
    fresh = _funcpeft_model(model, {**kwargs, "init_lora_weights": True})
    assert all(not e["lora_B_bias"].any() and not e["lora_B"].any() for e in fresh.adapter.values())


@pytest.mark.parametrize(
    ("build", "targets", "b_names"),
    [
        (lambda: models.build("MLP"), ["lin0"], {"lin0": "lora_B"}),
        (
            T.tiny_gpt2,
            ["c_attn", "wte"],
            {"transformer.h.0.attn.c_attn": "lora_B", "transformer.wte": "lora_embedding_B"},
        ),
        (
            T.tiny_llama,
            ["embed_tokens", "v_proj"],
            {"model.embed_tokens": "lora_embedding_B", "model.layers.1.self_attn.v_proj": "lora_B"},
        ),
    ],
    ids=["linear", "gpt2-conv1d-embedding", "llama-embedding"],
)
def test_mica_init_equals_peft(build: Callable[[], nn.Module], targets: list[str], b_names: dict[str, str]) -> None:
    """A = 0 and the frozen B (in `base`) is exactly PEFT's: the minor left singular vectors of W (W^T, Conv1D W)."""
    model = build()
    kwargs = dict(r=4, target_modules=targets, init_lora_weights="mica")
    pm, fpm = _peft_model(model, kwargs), _funcpeft_model(model, kwargs)
    named = dict(pm.named_parameters())
    for path, b in b_names.items():
        a = "lora_embedding_A" if b == "lora_embedding_B" else "lora_A"
        assert set(fpm.adapter[path]) == {a} and not fpm.adapter[path][a].any()
        suffix = ".default" if b == "lora_embedding_B" else ".default.weight"
        theirs = named[f"base_model.model.{path}.{b}{suffix}"]
        assert not theirs.requires_grad  # PEFT freezes it
        assert torch.equal(fpm.base[layer_frozen_key("default", path, b)], theirs.detach()), path
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_kasa_truncation_equals_peft_and_leaves_the_model_alone() -> None:
    model = models.build("MLP")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = _peft_model(model, dict(target_modules=["lin0"], r=4, kasa_config=peft.tuners.lora.config.KasaConfig()))
    fpm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=["lin0"], r=4, kasa_config={}))
    truncated = fpm.base[layer_frozen_key("default", "lin0", kasa.TRUNCATED)]
    assert torch.equal(truncated, pm.base_model.model.lin0.base_layer.weight.detach())
    assert torch.linalg.matrix_rank(truncated).item() == 10 - 4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # PEFT truncated its copy only
    assert fpm.adapter["lin0"]["lora_diag"].shape == (4,) and not fpm.adapter["lin0"]["lora_B"].any()


def test_bdlora_init_and_shapes() -> None:
    """A block-diagonal A: PEFT's BlockDiagonalLinear kaiming draw (a=0, bound sqrt(6 / (in / n))); a block-diagonal
    B: zeros; the other factor is LoRA's."""
    kwargs = dict(
        r=8,
        target_modules=["lin0", "lin1"],
        use_bdlora={"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
    )
    fpm = _funcpeft_model(MLP, kwargs)
    pm = _peft_model(MLP, _peft_sub(kwargs))
    named = dict(pm.named_parameters())
    for path, leaves in fpm.adapter.items():
        for k, v in leaves.items():
            assert v.shape == named[f"base_model.model.{path}.{k}.default.weight"].shape, (path, k)
    a = fpm.adapter["lin0"]["lora_A"]  # (8, 10 / 2)
    bound = (6 / 5) ** 0.5
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound and a.std() > 0.3 * bound
    assert not fpm.adapter["lin1"]["lora_B"].any() and fpm.adapter["lin1"]["lora_A"].any()


# -- mixed batches and per-example routing ------------------------------------------------------------------------
MIXED_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "lora_bias": (
        dict(target_modules=["lin0", "lin1"], lora_bias=True),
        dict(target_modules=["lin0"], r=2, lora_bias=True),
    ),
    "mica": (
        dict(target_modules=["lin0"], r=4, init_lora_weights="mica"),
        dict(target_modules=["lin0"], r=2, init_lora_weights="mica"),
    ),
    "bdlora": (
        dict(
            target_modules=["lin0", "lin1"],
            use_bdlora={"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
        ),
        dict(target_modules=["lin0"], use_bdlora={"target_modules_bd_b": ["lin0"], "nblocks": 4}),
    ),
}


@pytest.mark.parametrize("variant", sorted(MIXED_CONFIGS))
def test_mixed_batch_matches_peft_adapter_names(variant: str) -> None:
    first, second = MIXED_CONFIGS[variant]
    fpm = _funcpeft_model(MLP, first)
    pm = _peft_model(MLP, _peft_sub(first))
    fresh = {"default": fpm.adapter, "other": _quiet(lambda: fpm.add_adapter("other", funcpeft.LoraConfig(**second)))}
    _quiet(lambda: pm.add_adapter("other", peft.LoraConfig(**_peft_sub(second))))
    trees = {n: T.random_like(t, torch.Generator().manual_seed(i)) for i, (n, t) in enumerate(fresh.items())}
    for name, tree in trees.items():
        T.copy_into_peft(pm, tree, fpm.plans[name], name)
    pm.eval()
    x = {"X": torch.arange(50).view(5, 10)}
    names = ["default", "__base__", "other", "other", "default"]
    with torch.no_grad():
        want = pm(**x, adapter_names=names)
        got = fpm.fn(fpm.base, funcpeft.mixed_batch(trees, names), **x)
        alone = {n: fpm.fn(fpm.base, {n: trees[n]}, **x) for n in trees}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], fpm.fn(fpm.base, None, **x)[1])
    for row, name in enumerate(names):
        if name != "__base__":
            torch.testing.assert_close(got[row], alone[name][row], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(got[row], got[1] if row else got[2])


def test_lora_bias_per_example_routing_equals_each_adapter_alone() -> None:
    """LoRA's batched per-example forward adds each example's own lora_B bias (scaled)."""
    fpm = _funcpeft_model(MLP, dict(target_modules=["lin0", "lin1"], lora_bias=True))
    trees = [T.random_like(fpm.adapter, torch.Generator().manual_seed(s)) for s in range(3)]
    x = {"X": torch.arange(40).view(4, 10)}
    index = [2, -1, 0, 2]
    with torch.no_grad():
        got = fpm.fn(fpm.base, funcpeft.per_example(funcpeft.stack_adapters(trees), index), **x)
        alone = {i: fpm.fn(fpm.base, trees[i] if i >= 0 else None, **x) for i in set(index)}
    for row, i in enumerate(index):
        torch.testing.assert_close(got[row], alone[i][row], atol=1e-6, rtol=1e-6)
    no_bias = {p: {k: v for k, v in e.items()} for p, e in trees[0].items()}
    for e in no_bias.values():
        e["lora_B_bias"] = torch.zeros_like(e["lora_B_bias"])
    with torch.no_grad():
        assert not torch.allclose(fpm.fn(fpm.base, no_bias, **x), alone[0])  # the bias term counts


def test_kasa_mixed_batch_matches_peft_and_refuses_base_examples() -> None:
    """PEFT's KaSA runs mixed batches; its "__base__" examples see the truncated weight, funcpeft's base model
    is the untruncated one, so routing an example to no adapter is refused, naming KaSA."""
    kwargs = dict(target_modules=["lin0"], r=4, kasa_config={})
    fpm = _funcpeft_model(MLP, kwargs)
    pm = _peft_model(MLP, _peft_sub(kwargs))
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    T.copy_into_peft(pm, tree, fpm.plans["default"])
    pm.eval()
    x = {"X": torch.arange(30).view(3, 10)}
    with torch.no_grad():
        want = pm(**x, adapter_names=["default"] * 3)
        got = fpm.fn(fpm.base, funcpeft.mixed_batch({"default": tree}, ["default"] * 3), **x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        truncated_base = pm(**x, adapter_names=["__base__"] * 3)
        assert not torch.allclose(truncated_base, fpm.fn(fpm.base, None, **x))  # the ambiguity
        with pytest.raises(NotImplementedError, match="kasa"):
            fpm.fn(fpm.base, funcpeft.mixed_batch({"default": tree}, ["default", "__base__", "default"]), **x)
        with pytest.raises(NotImplementedError, match="kasa"):
            fpm.fn(fpm.base, funcpeft.per_example([tree, tree], [0, -1, 1]), **x)


def _mha_pair() -> tuple[Any, Any, Any]:
    pm = _peft_model(MHA, dict(target_modules=["mha"]))
    harness._perturb(pm, 5)
    fpm = _funcpeft_model(MHA, dict(target_modules=["mha"]))
    named = dict(pm.named_parameters())
    plan = fpm.plans["default"]
    wrapped = {p for p, e in plan.items() if e.spec is not None}
    tree = {
        p: {k: named[T.peft_param_name(p, k, plan[p], "default", wrapped)].detach().clone() for k in e}
        for p, e in fpm.adapter.items()
    }
    return pm.eval(), fpm, tree


def test_mha_refuses_mixed_batches_like_peft_and_vmaps_over_adapters() -> None:
    pm, fpm, tree = _mha_pair()
    x = models.inputs("MHA")["X"].float()
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, tree, X=x), pm(X=x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        pm(X=x, adapter_names=["default"] * 9)
    with pytest.raises(NotImplementedError, match="lora.MultiheadAttention does not support mixed adapter batches"):
        fpm.fn(fpm.base, funcpeft.per_example([tree, tree], [0, 1, 0, 1, 0, 1, 0, 1, 0]), X=x)
    trees = [optree.tree_map(lambda t, s=s: t + 0.1 * s, tree) for s in range(3)]
    with torch.no_grad():
        stacked = torch.func.vmap(lambda a: fpm.fn(fpm.base, a, X=x))(funcpeft.stack_adapters(trees))
        for k, t in enumerate(trees):
            torch.testing.assert_close(stacked[k], fpm.fn(fpm.base, t, X=x), atol=1e-5, rtol=1e-5)


# -- nn.MultiheadAttention: PEFT's behaviour, reproduced and documented ------------------------------------------
def test_mha_out_proj_delta_is_merged_twice_like_peft() -> None:
    """PEFT's lora.MultiheadAttention merges out_proj's delta twice (docs/usage.md "Limits"): funcpeft's forward is
    the attention with W_in + s B A and W_out + 2 s B A; PEFT's forward too."""
    pm, fpm, tree = _mha_pair()
    x = models.inputs("MHA")["X"].float()
    s = fpm.plans["default"]["mha"].spec.hyper.scaling
    assert fpm.plans["default"]["mha.out_proj"].spec.hyper.scaling == 2 * s
    explicit = copy.deepcopy(MHA).eval()
    with torch.no_grad():
        mha = cast(nn.MultiheadAttention, explicit.get_submodule("mha"))
        mha.in_proj_weight.add_(s * tree["mha"]["lora_B"] @ tree["mha"]["lora_A"])
        mha.out_proj.weight.add_(2 * s * tree["mha.out_proj"]["lora_B"] @ tree["mha.out_proj"]["lora_A"])
        torch.testing.assert_close(fpm.fn(fpm.base, tree, X=x), explicit(X=x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pm(X=x), explicit(X=x), atol=1e-5, rtol=1e-5)


def test_mha_out_proj_alone_or_twice_is_refused() -> None:
    """PEFT silently ignores a LoRA on out_proj alone (the attention never calls out_proj): funcpeft raises."""
    x = models.inputs("MHA")["X"].float()
    pm = _peft_model(MHA, dict(target_modules=["out_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(X=x), MHA(X=x))  # the adapter had no effect in PEFT
    with pytest.raises(NotImplementedError, match="out_proj alone would have no effect"):
        _funcpeft_model(MHA, dict(target_modules=["out_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="both targeted"):
        _funcpeft_model(MHA, dict(target_modules=["mha", "mha.out_proj"]))
    with pytest.raises(NotImplementedError, match="lora_bias=True on the nn.MultiheadAttention 'mha'"):
        _funcpeft_model(MHA, dict(target_modules=["mha"], lora_bias=True))


# -- ensure_weight_tying -----------------------------------------------------------------------------------------
TIE_TARGETS = [["embed_tokens", "q_proj"], ["embed_tokens", "lm_head"], ["lm_head"]]


@pytest.mark.parametrize("targets", TIE_TARGETS, ids=["+".join(t) for t in TIE_TARGETS])
def test_ensure_weight_tying_matches_peft(targets: list[str], tmp_path: Any) -> None:
    """tiny Llama with tied embeddings: lm_head gets the embedding's LoRA, transposed (PEFT's tied parameters).

    Outputs, counts, files both ways and merged outputs equal PEFT's. funcpeft keeps the tied adapter once, so its
    gradient of the embedding's leaves is the sum of PEFT's two tied parameters' gradients (what an SGD step on
    PEFT's shared storage applies).
    """
    model = T.tiny_llama(tie=True)
    x = models.inputs("tiny-llama")
    kwargs = dict(r=4, target_modules=targets, ensure_weight_tying=True)
    pm = _peft_model(model, kwargs)
    harness._perturb(pm, 1)
    pm.eval()
    _quiet(lambda: pm.save_pretrained(tmp_path / "peft"))
    fpm = _quiet(lambda: funcpeft.from_pretrained(copy.deepcopy(model), tmp_path / "peft", is_trainable=True))
    fn, base, tree = fpm
    emb = "model.embed_tokens"
    assert emb in tree and "lm_head" not in tree and [t.path for t in fpm.plans["default"][emb].tied] == ["lm_head"]
    with torch.no_grad():
        want = pm(**x).logits
        torch.testing.assert_close(fn(base, tree, **x).logits, want, atol=1e-5, rtol=1e-5)
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    direct = _funcpeft_model(model, kwargs)
    assert direct.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert direct.peft_config["default"].target_modules == pm.peft_config["default"].target_modules

    # gradients: PEFT's tied pair summed
    pm.zero_grad()
    loss_w = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    (pm(**x).logits * loss_w).sum().backward()
    named = dict(pm.named_parameters())
    _, grads = funcpeft.value_and_grad(lambda a: (fn(base, a, **x).logits * loss_w).sum())(tree)
    head_a, head_b = (
        named["base_model.model.lm_head.lora_A.default.weight"],
        named["base_model.model.lm_head.lora_B.default.weight"],
    )
    emb_a, emb_b = (named[f"base_model.model.{emb}.lora_embedding_{k}.default"] for k in "AB")
    torch.testing.assert_close(grads[emb]["lora_embedding_A"], emb_a.grad + head_b.grad.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[emb]["lora_embedding_B"], emb_b.grad + head_a.grad.T, atol=1e-4, rtol=1e-4)
    assert head_a.grad.abs().sum() > 0 and emb_a.grad.abs().sum() > 0  # both uses contribute
    for path in tree:
        if path != emb:
            torch.testing.assert_close(
                grads[path]["lora_A"], named[T.peft_param_name(path, "lora_A", fpm.plans["default"][path])].grad
            )

    # files both ways
    _quiet(lambda: fpm.save_pretrained(tmp_path / "funcpeft", tree))
    mine, theirs = (load_file(os.path.join(tmp_path, d, "adapter_model.safetensors")) for d in ("funcpeft", "peft"))
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert "base_model.model.lm_head.lora_A.weight" in mine
    back = _quiet(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "funcpeft").eval())
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, want, atol=1e-5, rtol=1e-5)

    # merging writes both deltas into the shared weight, as PEFT does
    merged = _quiet(lambda: funcpeft.merge_and_unload(fpm, tree))
    with torch.no_grad():
        peft_merged = _quiet(pm.merge_and_unload)(**x).logits
        torch.testing.assert_close(merged.eval()(**x).logits, peft_merged, atol=1e-4, rtol=1e-5)
        assert (peft_merged - want).abs().max() > 1e-2  # PEFT's merged model is not its unmerged one here


def test_ensure_weight_tying_routes_and_vmaps_like_each_adapter_alone() -> None:
    fpm = _funcpeft_model(
        T.tiny_llama(tie=True), dict(r=4, target_modules=["embed_tokens", "v_proj"], ensure_weight_tying=True)
    )
    trees = [T.random_like(fpm.adapter, torch.Generator().manual_seed(s)) for s in range(3)]
    ids = models.inputs("tiny-llama")["input_ids"]
    index = [2, -1]
    with torch.no_grad():
        got = fpm.fn(fpm.base, funcpeft.per_example(funcpeft.stack_adapters(trees), index), input_ids=ids).logits
        vm = torch.func.vmap(lambda a: fpm.fn(fpm.base, a, input_ids=ids).logits)(funcpeft.stack_adapters(trees))
        alone = [fpm.fn(fpm.base, t, input_ids=ids).logits for t in trees]
        plain = fpm.fn(fpm.base, None, input_ids=ids).logits
    torch.testing.assert_close(got[0], alone[2][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], plain[1], atol=1e-5, rtol=1e-5)
    for k in range(3):
        torch.testing.assert_close(vm[k], alone[k], atol=1e-5, rtol=1e-5)


def test_ensure_weight_tying_warnings_and_refusals() -> None:
    with pytest.warns(UserWarning, match="no tied modules were found in the model"):
        funcpeft.get_peft_model(
            T.tiny_llama(), funcpeft.LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True)
        )
    with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
        funcpeft.get_peft_model(T.tiny_llama(tie=True), funcpeft.LoraConfig(target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="no tied modules are added in either"):
        funcpeft.get_peft_model(
            T.tiny_llama(tie=True), funcpeft.LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True)
        )
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        funcpeft.get_peft_model(
            T.tiny_llama(tie=True),
            funcpeft.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
        )
    with pytest.raises(NotImplementedError, match=r"ensure_weight_tying=True with LoraConfig \(dora\)"):
        _funcpeft_model(
            T.tiny_llama(tie=True), dict(target_modules=["embed_tokens"], use_dora=True, ensure_weight_tying=True)
        )


def test_tied_values_that_differ_in_a_checkpoint_are_an_error(tmp_path: Any) -> None:
    model = T.tiny_llama(tie=True)
    fpm = _funcpeft_model(model, dict(r=4, target_modules=["embed_tokens"], ensure_weight_tying=True))
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    _quiet(lambda: fpm.save_pretrained(tmp_path, tree))
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    state = load_file(path)
    state["base_model.model.lm_head.lora_A.weight"] = state["base_model.model.lm_head.lora_A.weight"] + 1
    from safetensors.torch import save_file

    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(funcpeft.AdapterMismatchError, match="lm_head.lora_A.weight"):
        _quiet(lambda: funcpeft.from_pretrained(copy.deepcopy(model), tmp_path))


# -- KaSA's regulariser, MiCA's frozen B ------------------------------------------------------------------------------
def test_kasa_loss_equals_peft() -> None:
    kwargs = dict(target_modules=["lin0", "lin1"], r=1, kasa_config={"beta": 0.3, "gamma": 0.7})
    fpm = _funcpeft_model(MLP, kwargs)
    pm = _peft_model(MLP, _peft_sub(kwargs))
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    T.copy_into_peft(pm, tree, fpm.plans["default"])
    want = pm.base_model._get_kasa_loss()
    got = kasa.kasa_loss(tree, fpm.peft_config["default"])
    torch.testing.assert_close(got, want.detach())
    with pytest.raises(ValueError, match="kasa_config"):
        kasa.kasa_loss(tree, funcpeft.LoraConfig())


def test_mica_trains_only_a_and_its_frozen_b_needs_base_to_save(tmp_path: Any) -> None:
    fpm = _funcpeft_model(MLP, dict(target_modules=["lin0"], r=4, init_lora_weights="mica"))
    tree = T.random_like(fpm.adapter, torch.Generator().manual_seed(0))
    _, grads = funcpeft.value_and_grad(lambda a: fpm.fn(fpm.base, a, **X).sum())(tree)
    assert set(grads["lin0"]) == {"lora_A"} and grads["lin0"]["lora_A"].abs().sum() > 0
    with pytest.raises(ValueError, match="frozen .*lora_B.* live in `base`"):
        funcpeft.save_adapter(tmp_path, tree, fpm.peft_config["default"], model=fpm.model)
    assert not os.listdir(tmp_path)
    out = funcpeft.save_adapter(tmp_path, tree, fpm.peft_config["default"], model=fpm.model, base_params=fpm.base)
    assert "base_model.model.lin0.lora_B.weight" in load_file(os.path.join(out, "adapter_model.safetensors"))


# -- torch.compile -----------------------------------------------------------------------------------------------------
COMPILE_CONFIGS: dict[str, dict[str, Any]] = {
    "mica": dict(target_modules=["lin0"], r=4, init_lora_weights="mica"),
    "kasa": dict(target_modules=["lin0"], r=4, kasa_config={}),
    "bdlora": dict(
        target_modules=["lin0", "lin1"], use_bdlora={"target_modules_bd_a": ["lin0"], "match_strict": False}
    ),
    "lora_bias": dict(target_modules=["lin0", "lin1"], lora_bias=True),
    "mha": dict(target_modules=["mha"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(COMPILE_CONFIGS))
def test_compiles_to_one_graph_without_recompiles(variant: str) -> None:
    model = MHA if variant == "mha" else MLP
    fpm = _funcpeft_model(model, COMPILE_CONFIGS[variant])
    trees = [
        optree.tree_map(torch.Tensor.detach, T.random_like(fpm.adapter, torch.Generator().manual_seed(s)))
        for s in range(3)
    ]
    x = models.inputs("MHA")["X"].float() if variant == "mha" else X["X"]
    with torch.no_grad():
        fpm.fn(fpm.base, trees[0], X=x)  # fills fn's per-plan shape cache (a first compiled call would guard on it)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fpm.fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        for tree in trees:
            torch.testing.assert_close(compiled(fpm.base, tree, X=x), fpm.fn(fpm.base, tree, X=x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1 and counter.op_count > 0
