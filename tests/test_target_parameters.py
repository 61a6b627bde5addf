"""`LoraConfig(target_parameters=...)`: LoRA on bare nn.Parameters (MoE expert stacks), against PEFT 0.21.2's
`lora.ParamWrapper`.

The differential rows run PEFT's matrix harness (tests/peft_matrix/harness.py: outputs, every gradient by
checkpoint key, counts, files both ways, merge) on tiny transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE,
GPT-OSS) and on small custom expert models (several parameters of one module: PEFT nests its wrappers). The rest
checks two active adapters, bf16 and float8 weights, PEFT's transformers-v5 MoE config rewrite, PEFT's errors,
and the functional laws (the model is never parametrized; vmap; compile without recompiles).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import Any

import optree
import peft
import pytest
import torch
from peft_matrix import cases, harness, models
from torch import nn
from torch.nn.utils import parametrize

import funcpeft
import funcpeft.io
from funcpeft import testing as T

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


# -- small custom expert models (PEFT's matrix input: X = arange(90).view(9, 10)) ------------------------------
class _Experts(nn.Module):
    """Three experts as stacked bare parameters, averaged; `transposed`: (E, in, out) like GPT-OSS, else (E, out, in)."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        up, down = (
            (torch.randn(3, 10, 8), torch.randn(3, 8, 2))
            if transposed
            else (torch.randn(3, 8, 10), torch.randn(3, 2, 8))
        )
        self.up = nn.Parameter(up / 3)
        self.down = nn.Parameter(down / 3)
        self.bias = nn.Parameter(torch.full((8,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = (self.up, self.down) if self.is_transposed else (self.up.transpose(1, 2), self.down.transpose(1, 2))
        h = torch.relu(torch.einsum("bi,eio->ebo", x, up) + self.bias)
        return torch.einsum("ebo,eoj->bj", h, down) / 3


class ExpertsModel(nn.Module):
    def __init__(self, transposed: bool = True) -> None:
        super().__init__()
        self.experts = _Experts(transposed)
        self.head = nn.Linear(2, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.sm(self.head(self.experts(X.float() / 90)))


@pytest.fixture(autouse=True)
def _expert_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.MODELS, "ExpertsTransposed", lambda: ExpertsModel(True))
    monkeypatch.setitem(models.MODELS, "ExpertsStacked", lambda: ExpertsModel(False))


def _quiet(fn: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# -- PEFT's matrix checks on MoE rows ---------------------------------------------------------------------------
ROWS = [
    ("tiny-mixtral", {"target_modules": [], "target_parameters": EXPERTS, "init_lora_weights": False, "r": 2}),
    ("tiny-mixtral", {"target_modules": ["w1", "w3", "w2", "gate", "q_proj"], "r": 2}),  # PEFT's v4 -> v5 rewrite
    (
        "tiny-qwen2-moe",
        {
            "target_modules": ["q_proj", "shared_expert.down_proj"],
            "target_parameters": ["experts.gate_up_proj"],
            "r": 2,
        },
    ),
    ("tiny-qwen3-moe", {"target_modules": "all-linear", "r": 2, "use_rslora": True}),
    (
        "tiny-gpt-oss",
        {"target_modules": ["q_proj"], "target_parameters": EXPERTS, "r": 2, "rank_pattern": {"down_proj": 3}},
    ),
    ("ExpertsTransposed", {"target_modules": ["head"], "target_parameters": ["experts.up", "experts.down"], "r": 2}),
    ("ExpertsStacked", {"target_parameters": ["experts.up", "experts.down"], "r": 2, "bias": "lora_only"}),
    ("ExpertsStacked", {"target_parameters": ["up"], "r": 2, "bias": "all", "alpha_pattern": {"up": 4}}),
    ("ExpertsTransposed", {"target_parameters": ["experts.down"], "r": 3, "modules_to_save": ["head"]}),
    (
        "MLP",
        {"target_modules": [], "target_parameters": ["lin0.weight", "lin1.weight"], "init_lora_weights": "gaussian"},
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model_id", "kwargs"), ROWS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ROWS)])
def test_row_matches_peft(model_id: str, kwargs: dict[str, Any], tmp_path: Any) -> None:
    notes = harness.check_row(cases.Case(f"{model_id} {kwargs}", model_id, "LoraConfig", kwargs), tmp_path)
    assert not any(n.startswith("merge not checked") for n in notes), notes


def test_nested_parameters_use_peft_paths() -> None:
    """Several parameters of one module: PEFT nests one ParamWrapper per parameter, the first innermost."""
    fpm = _quiet(
        lambda: funcpeft.get_peft_model(ExpertsModel(), funcpeft.LoraConfig(target_parameters=["up", "down"], r=2))
    )
    plan = fpm.plans["default"]
    assert {p: e.parameter for p, e in plan.items()} == {"experts.base_layer": "experts.up", "experts": "experts.down"}
    assert fpm.adapter["experts.base_layer"]["lora_A"].shape == (2 * 3, 10)  # (r * E, in)
    assert fpm.adapter["experts"]["lora_B"].shape == (2, 2 * 3)  # (out, r * E)


# -- several adapters at once ------------------------------------------------------------------------------------
def _set_active(pm: nn.Module, names: list[str]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in pm.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(names)


@pytest.mark.slow
@pytest.mark.parametrize("build", [T.tiny_gpt_oss, T.tiny_mixtral], ids=["gpt_oss", "mixtral"])
def test_two_active_adapters_match_peft(build: Any, tmp_path: Any) -> None:
    """Both adapters on the same expert stacks (PEFT sums their deltas): outputs, gradients, each alone, merge."""
    model = build()
    names = ["a", "b"]
    kwargs: list[dict[str, Any]] = [
        dict(target_parameters=EXPERTS, r=2, target_modules=["k_proj"]),
        dict(target_parameters=EXPERTS, r=3, target_modules=[]),
    ]
    torch.manual_seed(0)
    pm = _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs[0]), adapter_name="a"))
    _quiet(lambda: pm.add_adapter("b", peft.LoraConfig(**kwargs[1])))
    _set_active(pm, names)
    harness._perturb(pm, harness.PERTURB_SEED)
    pm.eval()
    _quiet(lambda: pm.save_pretrained(str(tmp_path)))
    x = models.inputs("tiny-llama")
    fpm = _quiet(lambda: funcpeft.from_pretrained(model, str(tmp_path), "a", is_trainable=True))
    tree_b, config_b = _quiet(lambda: funcpeft.load_adapter(str(tmp_path), "b", model=model, is_trainable=True))
    fpm.add_adapter("b", config_b)
    trees = {"a": fpm.adapter, "b": tree_b}
    with torch.no_grad():
        harness._close("both active", fpm.fn(fpm.base, trees, **x), pm(**x))
    want = harness._peft_grads(pm, names, x)
    _, grads = funcpeft.value_and_grad(lambda t: harness._loss(fpm.fn(fpm.base, t, **x)))(trees)
    for n in names:
        got = funcpeft.io.checkpoint_state(grads[n], fpm.peft_config[n], model, base_params=fpm.base, adapter_name=n)
        harness._close_dicts(f"gradients of {n}", got, want[n])
    harness._check_counts(pm, fpm, trees)
    with torch.no_grad():
        merged_want = _quiet(lambda: copy.deepcopy(pm).merge_and_unload(adapter_names=names)(**x))
        harness._close("merged", _quiet(lambda: funcpeft.merge_and_unload(fpm, trees))(**x), merged_want)
        for n in names:
            pm.set_adapter(n)
            harness._close(f"{n} alone", fpm.fn(fpm.base, {n: trees[n]}, **x), pm(**x))


# -- dtypes -------------------------------------------------------------------------------------------------------
def _peft_and_funcpeft(model: nn.Module, kwargs: dict[str, Any], tmp: str, scale_b: float = 1.0) -> tuple[Any, Any]:
    torch.manual_seed(0)
    pm = _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(scale_b)
    _quiet(lambda: pm.save_pretrained(tmp))
    return pm.eval(), _quiet(lambda: funcpeft.from_pretrained(model, tmp))


@pytest.mark.parametrize("build", [T.tiny_gpt_oss, T.tiny_mixtral], ids=["gpt_oss", "mixtral"])
def test_bf16_experts_equal_peft(build: Any, tmp_path: Any) -> None:
    """bf16 stacks: fp32 adapters, the fold `baddbmm(W, lhs, rhs)` in bf16 as PEFT does it: equal outputs."""
    model = build().to(torch.bfloat16)
    pm, fpm = _peft_and_funcpeft(
        model, dict(target_parameters=EXPERTS, target_modules=[], r=2, init_lora_weights=False), str(tmp_path)
    )
    assert {t.dtype for e in fpm.adapter.values() for t in e.values()} == {torch.float32}
    ids = models.inputs("tiny-llama")["input_ids"]
    with torch.no_grad():
        got, want = fpm.fn(fpm.base, fpm.adapter, input_ids=ids).logits, pm(input_ids=ids).logits
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want)
        assert not torch.equal(got, model(input_ids=ids).logits)  # the adapter does something


class _Float8Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 6).to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eio->bo", x, self.w.float())


class _Float8Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ex = _Float8Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ex(x)


def test_float8_experts_add_in_high_precision_like_peft(tmp_path: Any) -> None:
    """float8 W: delta added in fp32, clamped to float8's range, cast back (PEFT's `_low_prec_add`); funcpeft's
    merge does the same (PEFT's own float8 merge raises a dtype-promotion error: docs/usage.md "Limits")."""
    torch.manual_seed(1)
    model = _Float8Model()
    kwargs: dict[str, Any] = dict(target_modules=[], target_parameters=["ex.w"], r=2, init_lora_weights=False)
    pm, fpm = _peft_and_funcpeft(model, kwargs, str(tmp_path), scale_b=5000.0)  # some entries leave float8's range
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = fpm.fn(fpm.base, fpm.adapter, x)
        assert torch.equal(got, pm(x))
        merged = funcpeft.merge_and_unload(fpm, fpm.adapter)
        assert merged.get_parameter("ex.w").dtype == torch.float8_e4m3fn
        assert torch.equal(merged(x), got)
        assert not torch.equal(got, model(x))
        assert torch.isfinite(got).all()
        assert (funcpeft.merge(fpm, fpm.base, fpm.adapter)["ex.w"].float().abs() == 448).any()  # clamped
    with pytest.raises(RuntimeError, match="Promotion for Float8"):
        _quiet(lambda: copy.deepcopy(pm).merge_and_unload())


# -- PEFT's transformers-v5 MoE config rewrite ---------------------------------------------------------------------
CONVERSIONS = [
    ("mixtral", {"target_modules": ["w1", "w3", "w2", "gate", "q_proj"]}),
    ("mixtral", {"target_modules": "all-linear"}),
    ("mixtral", {"target_modules": r".*\.(q_proj|w2)"}),
    ("mixtral", {"target_modules": ["q_proj"], "target_parameters": EXPERTS, "rank_pattern": {"q_proj": 4}}),
    ("qwen3_moe", {"target_modules": ["gate_proj", "up_proj", "down_proj", "q_proj"], "lora_alpha": 16}),
    ("qwen3_moe", {"target_modules": "all-linear", "exclude_modules": ["k_proj"]}),
    ("qwen2_moe", {"target_modules": ["gate_proj", "down_proj"]}),  # no rewrite for qwen2_moe itself (PEFT's table)
    ("gpt_oss", {"target_modules": ["q_proj"], "target_parameters": EXPERTS}),
]
FIELDS = ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern")


@pytest.mark.parametrize(("kind", "kwargs"), CONVERSIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CONVERSIONS)])
def test_moe_config_rewrite_matches_peft(kind: str, kwargs: dict[str, Any]) -> None:
    """The resolved config (targets, patterns) and the adapter's checkpoint keys equal PEFT's; the user's config
    is not mutated."""
    model = T.TINY_MOE_MODELS[kind]()
    config = funcpeft.LoraConfig(**kwargs)
    before = copy.deepcopy(dataclasses.asdict(config))
    fpm = _quiet(lambda: funcpeft.get_peft_model(model, config))
    pm = _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)))
    ours, theirs = fpm.peft_config["default"], pm.peft_config["default"]
    for f in FIELDS:
        want = getattr(theirs, f)
        assert getattr(ours, f) == want, f
    assert dataclasses.asdict(config) == before
    keys = set(funcpeft.io.checkpoint_state(fpm.adapter, ours, model))
    assert keys == set(peft.utils.get_peft_model_state_dict(pm))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"target_modules": ["w1", "q_proj"]}],
    ids=["default-targets", "half-a-fused-pair"],
)
def test_moe_config_rewrite_errors_like_peft(kwargs: dict[str, Any]) -> None:
    """Mixtral: PEFT empties `target_modules=None` (no default) and refuses half of a fused pair."""
    model = T.tiny_mixtral()
    with pytest.raises(ValueError) as theirs:  # noqa: PT011 - compared below
        _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)))
    with pytest.raises(ValueError) as ours:  # noqa: PT011
        _quiet(lambda: funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs)))
    assert str(ours.value) == str(theirs.value)


# -- PEFT's errors ---------------------------------------------------------------------------------------------------
def _both_raise(model: nn.Module, kwargs: dict[str, Any]) -> tuple[BaseException, BaseException]:
    with pytest.raises(Exception) as theirs:  # noqa: PT011 - the type is compared below
        _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)))
    with pytest.raises(Exception) as ours:  # noqa: PT011
        _quiet(lambda: funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs)))
    return ours.value, theirs.value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_parameters": ["experts.up"], "lora_dropout": 0.1},
        {"target_parameters": ["experts.up"], "fan_in_fan_out": True},
        {"target_parameters": ["experts.up"], "use_dora": True},
        {"target_parameters": ["experts.bias"]},  # 1-D
        {"target_parameters": ["head.weight"], "target_modules": ["head"]},  # also a LoRA layer
    ],
    ids=["dropout", "fan_in_fan_out", "dora", "1-d", "also-a-layer"],
)
def test_unsupported_targets_raise_peft_errors(kwargs: dict[str, Any]) -> None:
    ours, theirs = _both_raise(ExpertsModel(), kwargs)
    assert isinstance(ours, ValueError) and isinstance(theirs, ValueError)
    assert str(ours).split(" (")[0].rstrip(".") in str(theirs), (str(ours), str(theirs))


class _TopLevel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)


def test_top_level_parameter_and_saved_owner_are_refused_like_peft() -> None:
    ours, theirs = _both_raise(_TopLevel(), {"target_parameters": ["w"]})
    assert type(ours) is type(theirs) is ValueError and str(ours) == str(theirs)
    ours, theirs = _both_raise(ExpertsModel(), {"target_parameters": ["experts.up"], "modules_to_save": ["experts"]})
    assert isinstance(ours, TypeError) and isinstance(theirs, TypeError)
    assert "ParamWrapper" in str(ours) and "ParamWrapper" in str(theirs)


def test_no_targets_at_all_is_peft_error() -> None:
    ours, theirs = _both_raise(ExpertsModel(), {"target_modules": [], "target_parameters": []})
    assert (
        str(ours)
        == str(theirs)
        == (
            "No `target_modules` passed but also no `target_parameters` found. Please check the values for these arguments."
        )
    )


def test_one_side_matching_nothing_warns_like_peft() -> None:
    rows: list[tuple[dict[str, Any], str]] = [
        ({"target_modules": ["nope"], "target_parameters": ["experts.up"]}, "target_modules=.* no module was matched"),
        ({"target_modules": ["head"], "target_parameters": ["nope"]}, "target_parameters=.* no parameter was matched"),
    ]
    for kwargs, what in rows:
        with pytest.warns(RuntimeWarning, match=what):
            funcpeft.get_peft_model(ExpertsModel(), funcpeft.LoraConfig(**kwargs))
        with pytest.warns(RuntimeWarning, match=what):
            peft.get_peft_model(ExpertsModel(), peft.LoraConfig(**kwargs))


def test_adapters_must_target_the_same_parameters() -> None:
    """PEFT's add_adapter rule, and funcpeft's refusal of a layer one adapter adapts and another wraps."""
    fpm = funcpeft.get_peft_model(ExpertsModel(), funcpeft.LoraConfig(target_parameters=["experts.up"]))
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        fpm.add_adapter("other", funcpeft.LoraConfig(target_parameters=["experts.down"]))
    fpm.add_adapter("same", funcpeft.LoraConfig(target_parameters=["experts.up"], r=3))
    fpm = funcpeft.get_peft_model(models.build("MLP"), funcpeft.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="Trying to wrap an `nn.Parameter` of layer 'lin0'"):
        fpm.add_adapter("p", funcpeft.LoraConfig(target_parameters=["lin0.weight"]))
    fpm = funcpeft.get_peft_model(models.build("MLP"), funcpeft.LoraConfig(target_parameters=["lin0.weight"]))
    with pytest.raises(NotImplementedError, match="'lin0' holds 'lin0.weight'"):
        fpm.add_adapter("m", funcpeft.LoraConfig(target_modules=["lin0"]))


def test_mixed_batches_and_weighted_merges_are_refused_like_peft() -> None:
    fpm = funcpeft.get_peft_model(
        ExpertsModel(), funcpeft.LoraConfig(target_parameters=["experts.up"], init_lora_weights=False)
    )
    x = models.inputs("MLP")["X"][:2]
    stacked = funcpeft.stack_adapters([fpm.adapter, fpm.adapter])
    with pytest.raises(NotImplementedError, match="does not support mixed adapter batches"):
        fpm.fn(fpm.base, funcpeft.per_example(stacked, torch.tensor([0, 1])), x)
    with pytest.raises(
        ValueError,
        match=r"add_weighted_adapter does not support targeting nn.Parameter \(problematic adapter 'default'\)",
    ):
        funcpeft.add_weighted_adapter(fpm, {"default": fpm.adapter}, [1.0])


# -- functional laws ------------------------------------------------------------------------------------------------
def test_model_is_never_parametrized_and_every_read_sees_the_adapted_value() -> None:
    """The parameter is replaced in the call only: the user's module keeps its plain parameter, and an op other
    than the layer's own (here einsum on a transposed view) reads W + s * B @ A."""
    model = ExpertsModel()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    fpm = funcpeft.get_peft_model(
        model, funcpeft.LoraConfig(target_parameters=["experts.up"], init_lora_weights=False, r=2)
    )
    x = models.inputs("MLP")["X"]
    adapted = fpm.fn(fpm.base, fpm.adapter, x)
    assert not parametrize.is_parametrized(model.experts)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    merged = funcpeft.merge(fpm, fpm.base, fpm.adapter)
    want = torch.func.functional_call(model, merged, (x,))
    assert (adapted - want).abs().max().item() <= 1e-6
    assert (adapted - model(x)).abs().max().item() > 1e-3


def test_vmap_over_stacked_adapters_equals_each() -> None:
    fpm = funcpeft.get_peft_model(
        ExpertsModel(), funcpeft.LoraConfig(target_parameters=["up", "down"], init_lora_weights=False)
    )
    trees = [T.random_like(fpm.adapter, torch.Generator().manual_seed(s)) for s in range(3)]
    x = models.inputs("MLP")["X"]
    out = torch.func.vmap(lambda t: fpm.fn(fpm.base, t, x))(funcpeft.stack_adapters(trees))
    for i, tree in enumerate(trees):
        assert (out[i] - fpm.fn(fpm.base, tree, x)).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_compiles_to_one_graph_without_recompiling_for_new_values() -> None:
    from torch._dynamo.testing import CompileCounter

    fn, base, fresh = funcpeft.get_peft_model(
        models.build("MlpUsingParameters"), funcpeft.LoraConfig(target_parameters=["lin0.weight", "lin1.weight"])
    )
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    trees = [
        optree.tree_map(torch.Tensor.detach, T.random_like(fresh, torch.Generator().manual_seed(s))) for s in range(3)
    ]
    fn(base, trees[0], x)  # fills fn's per-adapter shape cache before tracing
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        for tree in trees:
            assert (compiled(base, tree, x) - fn(base, tree, x)).abs().max().item() <= 1e-6
    assert counter.frame_count == 1


def test_fresh_init_is_peft_s() -> None:
    """Shapes, dtypes, zero B and the spread of A (U(+-1/sqrt(in)) for True; N(0, 1/r) for "gaussian")."""
    model = T.tiny_gpt_oss()
    for init in (True, "gaussian"):
        kwargs: dict[str, Any] = dict(target_parameters=EXPERTS, target_modules=[], r=4, init_lora_weights=init)
        fresh = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs)).adapter
        pm = _quiet(lambda kwargs=kwargs: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)))
        state = peft.utils.get_peft_model_state_dict(pm)
        keys = funcpeft.io.checkpoint_state(fresh, funcpeft.LoraConfig(**kwargs), model)
        assert set(keys) == set(state)
        for key, ours in keys.items():
            theirs = state[key]
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, key
            assert bool((ours == 0).all()) == bool((theirs == 0).all()), key
            if not (theirs == 0).all():
                assert 0.8 < (ours.std() / theirs.std()).item() < 1.25, key


def test_files_load_without_a_model_at_peft_paths(tmp_path: Any) -> None:
    """`load_adapter` without a model reads the same tree paths get_peft_model uses (PEFT's wrapper paths)."""
    fpm = funcpeft.get_peft_model(
        ExpertsModel(), funcpeft.LoraConfig(target_parameters=["up", "down"], init_lora_weights=False)
    )
    fpm.save_pretrained(str(tmp_path), fpm.adapter)
    tree, config = funcpeft.load_adapter(str(tmp_path))
    assert set(tree) == set(fpm.adapter) == {"experts", "experts.base_layer"}
    assert getattr(config, "target_parameters", None) == ["up", "down"]
    assert all(torch.equal(tree[p][n], fpm.adapter[p][n]) for p in tree for n in tree[p])
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
