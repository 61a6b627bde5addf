"""`init_lora_weights` beyond True / False / "gaussian": PiSSA, OLoRA, orthogonal, EVA, CorDA, LoftQ, LoRA-GA.

Differential against PEFT 0.21.2 (the fresh adapter AND the base weights PEFT writes into the model, which
funcpeft puts into a new `pm.base`; the model itself stays bitwise untouched), the conversion to plain LoRA
(`path_initial_model_for_weight_conversion`), laws of each init, and the errors for what PEFT refuses or
gets wrong. PEFT's LoftQ needs bitsandbytes on a CUDA/XPU device: it runs here on CPU with its compute
device set to "cpu" and bitsandbytes replaced by funcpeft's own quantisers (checked separately against the
NF4 construction and, where bitsandbytes is installed, against it).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.machinery
import inspect
import json
import os
import sys
import textwrap
import types
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch
from helpers import MODELS, assert_unchanged, examples, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcpeft
from funcpeft import testing as T
from funcpeft.methods import _loftq
from funcpeft.methods.base import UnsupportedLayerError

if TYPE_CHECKING:
    from peft import PeftModel

TOL = 1e-5
BATCHES = [torch.randint(1, T.VOCAB, (1, 10), generator=torch.Generator().manual_seed(i)) for i in range(5)]
TARGETS = {"llama": ["q_proj", "k_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Both libraries warn alike (defaults filled in, fan_in_fan_out, ...): not the point here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _peft_config(kwargs: dict[str, Any]) -> Any:
    import peft
    from peft.tuners.lora import config as pc

    kw = dict(kwargs)
    for name, cls in (
        ("eva_config", pc.EvaConfig),
        ("corda_config", pc.CordaConfig),
        ("lora_ga_config", pc.LoraGAConfig),
    ):
        if isinstance(kw.get(name), dict):
            kw[name] = cls(**kw[name])
    return peft.LoraConfig(**kw)


def _peft_layer_weights(twin: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT model's base parameters under the plain model's names (`.base_layer` dropped)."""
    out = {}
    for n, p in twin.named_parameters():
        if "lora_" not in n:
            out[n.removeprefix("base_model.model.").replace(".base_layer", "")] = p.detach()
    return out


def assert_equal_to_peft(pm: Any, twin: nn.Module, model: nn.Module, *, changes_base: bool) -> None:
    """pm's fresh adapter and base weights equal PEFT's (<= TOL); the base changed exactly where PEFT's did."""
    named: dict[str, torch.Tensor] = dict(twin.named_parameters())
    plan = pm.plans["default"]
    for path, entry in pm.adapter.items():
        for key, ours in entry.items():
            theirs = named[T.peft_param_name(path, key, plan[path])]
            assert ours.shape == theirs.shape, f"{path}.{key}: {tuple(ours.shape)} vs PEFT {tuple(theirs.shape)}"
            torch.testing.assert_close(ours.detach(), theirs.detach(), atol=TOL, rtol=0, msg=f"{path}.{key}")
    original = dict(model.named_parameters())
    changed = set()
    for name, theirs in _peft_layer_weights(twin).items():
        torch.testing.assert_close(pm.base[name], theirs, atol=TOL, rtol=0, msg=f"base {name}")
        if not torch.equal(pm.base[name], original[name]):
            changed.add(name)
    adapted = {f"{p}.weight" for p, e in plan.items() if e.spec is not None}
    assert changed == (adapted if changes_base else set()), sorted(changed ^ adapted)[:4]


def _pair(
    kind: str, kwargs: dict[str, Any], init_data: Any = None, seed: int = 3
) -> tuple[funcpeft.FunctionalPeftModel, PeftModel, nn.Module, dict]:
    """(funcpeft pm, PEFT twin, model, model snapshot before), both from the same global RNG state."""
    import peft

    model = MODELS[kind]()
    snap = snapshot(model)
    with _quiet():
        torch.manual_seed(seed)
        pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs), init_data=init_data)
        torch.manual_seed(seed)
        twin = peft.get_peft_model(copy.deepcopy(model), _peft_config(kwargs))
    return pm, twin, model, snap


# -- the inits that need no data ------------------------------------------------------------------------------
PLAIN = [
    ("llama", "pissa", True),
    ("llama", "pissa_niter_2", True),
    ("llama", "olora", True),
    ("llama", "OLoRA", True),
    ("llama", "orthogonal", False),
    ("llama", "eva", False),
    ("gpt2", "pissa", True),
    ("gpt2", "pissa_niter_3", True),
    ("gpt2", "orthogonal", False),
    ("gpt2", "eva", False),
]


@pytest.mark.parametrize(("kind", "init", "changes_base"), PLAIN, ids=[f"{k}-{i}" for k, i, _ in PLAIN])
def test_init_equals_peft(kind: str, init: str, changes_base: bool) -> None:
    pm, twin, model, snap = _pair(kind, dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init))
    assert_equal_to_peft(pm, twin, model, changes_base=changes_base)
    assert_unchanged(model, snap)
    inputs = {"input_ids": BATCHES[0]}
    with (
        torch.no_grad()
    ):  # the adapted model at init: PiSSA & co. rebuild W exactly (up to rounding), orthogonal's B A = 0
        got = pm.fn(pm.base, pm.adapter, **inputs).logits
        torch.testing.assert_close(got, twin.eval()(**inputs).logits, atol=1e-4, rtol=0)
        if init not in ("eva",):
            torch.testing.assert_close(got, model(**inputs).logits, atol=1e-4, rtol=0)


def test_dora_with_pissa_takes_its_magnitude_from_the_residual_weight() -> None:
    pm, twin, model, snap = _pair(
        "llama", dict(r=4, target_modules=["q_proj"], init_lora_weights="pissa", use_dora=True)
    )
    assert_equal_to_peft(pm, twin, model, changes_base=True)
    assert_unchanged(model, snap)


def test_second_pissa_adapter_decomposes_the_first_ones_residual() -> None:
    """PEFT's second adapter sees the base weights the first one changed; pm.add_adapter reads them from pm.base."""
    kwargs: dict[str, Any] = dict(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    pm, twin, model, snap = _pair("llama", kwargs)
    with _quiet():
        tree = pm.add_adapter("second", funcpeft.LoraConfig(**kwargs))
        twin.add_adapter("second", _peft_config(kwargs))
    named: dict[str, torch.Tensor] = dict(twin.named_parameters())
    for path, entry in tree.items():
        for key, ours in entry.items():
            theirs = named[T.peft_param_name(path, key, pm.plans["second"][path], "second")]
            torch.testing.assert_close(ours.detach(), theirs.detach(), atol=TOL, rtol=0)
    for name, theirs in _peft_layer_weights(twin).items():
        torch.testing.assert_close(pm.base[name], theirs, atol=TOL, rtol=0)
    assert_unchanged(model, snap)


# -- LoftQ -----------------------------------------------------------------------------------------------------
def _peft_loftq_on_cpu(monkeypatch: pytest.MonkeyPatch, real_bnb: bool) -> None:
    """PEFT's own loftq_init, run on CPU: compute device "cpu", bitsandbytes = the real one or funcpeft's quantisers."""
    from peft.tuners.lora import layer as lora_layer
    from peft.utils import loftq_utils

    if real_bnb:
        bnb = pytest.importorskip("bitsandbytes")
    else:
        bnb = types.ModuleType("bitsandbytes")
        bnb.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
        bnb.nn = types.SimpleNamespace(Params4bit=_StandIn4bit, Int8Params=_StandIn8bit)  # type: ignore[attr-defined]
        bnb.functional = types.SimpleNamespace(  # type: ignore[attr-defined]
            dequantize_4bit=lambda data, state: data, int8_vectorwise_dequant=lambda data, scb: data
        )
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    source = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    assert source.count('"cuda"') == 1, "PEFT's loftq_init changed: this test must be adapted"
    source = source.replace('"cuda"', '"cpu"')
    scope = {**vars(loftq_utils), "is_bnb_available": lambda: True, "is_bnb_4bit_available": lambda: True}
    exec(compile(source, loftq_utils.__file__, "exec"), scope)
    monkeypatch.setattr(lora_layer, "loftq_init", scope["loftq_init"])


class _StandIn4bit:
    """bitsandbytes.nn.Params4bit's role in PEFT's loftq_init: `.data` is the quantised-dequantised weight."""

    def __init__(self, w: torch.Tensor, **kwargs: Any):
        assert kwargs == {"requires_grad": False, "compress_statistics": False, "quant_type": "nf4"}, kwargs
        self.data, self.quant_state = _loftq.nf4_roundtrip(w), None

    def to(self, device: Any) -> _StandIn4bit:
        return self


class _StandIn8bit(_StandIn4bit):
    def __init__(self, w: torch.Tensor, **kwargs: Any):
        assert kwargs == {"requires_grad": False}, kwargs
        self.data, self.SCB = _loftq.int8_roundtrip(w), None


@pytest.mark.parametrize(("bits", "iters"), [(4, 1), (4, 2), (8, 1), (8, 3)])
@pytest.mark.parametrize("real_bnb", [False, True], ids=["standin-quantiser", "bitsandbytes"])
def test_loftq_equals_peft(monkeypatch: pytest.MonkeyPatch, bits: int, iters: int, real_bnb: bool) -> None:
    _peft_loftq_on_cpu(monkeypatch, real_bnb)
    kwargs = dict(
        r=4,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": iters},
    )
    pm, twin, model, snap = _pair("llama", kwargs)
    assert_equal_to_peft(pm, twin, model, changes_base=True)
    assert_unchanged(model, snap)


def test_nf4_code_is_qloras_normal_map() -> None:
    """bitsandbytes' NF4 table = QLoRA's create_normal_map(offset=0.9677083, use_extra_value=True) (scipy)."""
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].tolist()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].tolist())).tolist()
    values = torch.tensor(sorted([*pos, 0.0, *neg]), dtype=torch.float64)
    values = values / values.abs().max()
    torch.testing.assert_close(torch.tensor(_loftq.NF4_CODE, dtype=torch.float64), values, atol=1e-6, rtol=0)


@settings(max_examples=examples(20))
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_nf4_roundtrip_picks_the_nearest_level_of_each_block(rows: int, cols: int, seed: int, scale: float) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q = _loftq.nf4_roundtrip(w).reshape(-1)
    flat = w.reshape(-1)
    code = torch.tensor(_loftq.NF4_CODE)
    for start in range(0, flat.numel(), _loftq.NF4_BLOCKSIZE):
        block, got = flat[start : start + 64], q[start : start + 64]
        absmax = block.abs().max()
        levels = code * absmax
        dist = (block.view(-1, 1) - levels.view(1, -1)).abs()
        nearest = dist.min(dim=1).values
        mine = (block - got).abs()
        assert torch.all(mine <= nearest + 1e-6 * absmax), "not the nearest NF4 level"
        assert torch.all((got.view(-1, 1) - levels.view(1, -1)).abs().min(dim=1).values <= 1e-6 * absmax)


@settings(max_examples=examples(20))
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_int8_roundtrip_error_is_half_a_step_per_row(rows: int, cols: int, seed: int) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    half = w.half().float()
    step = half.abs().max(dim=1, keepdim=True).values / 127
    err = (_loftq.int8_roundtrip(w) - half).abs()
    assert torch.all(err <= step / 2 + 1e-6), err.max()


def test_quantisers_equal_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    for shape in [(64, 48), (33, 17), (7, 3)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.1
        p4 = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        assert torch.equal(bnb.functional.dequantize_4bit(p4.data, p4.quant_state), _loftq.nf4_roundtrip(w))
        p8 = bnb.nn.Int8Params(w, requires_grad=False).to("cpu")
        assert torch.equal(bnb.functional.int8_vectorwise_dequant(p8.data, p8.SCB), _loftq.int8_roundtrip(w))


# -- CorDA -------------------------------------------------------------------------------------------------------
def _run(forward: Any) -> None:
    for ids in BATCHES:
        forward(input_ids=ids)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(kind: str, method: str) -> None:
    from peft.tuners.lora.corda import preprocess_corda

    kwargs: dict[str, Any] = dict(
        r=4, target_modules=TARGETS[kind], init_lora_weights="corda", corda_config={"corda_method": method}
    )
    model = MODELS[kind]()
    snap = snapshot(model)
    with _quiet():
        eigens = funcpeft.preprocess_corda(model, funcpeft.LoraConfig(**kwargs), _run)
    assert_unchanged(model, snap)  # no hooks left, no attributes, no mode change
    twin_model = copy.deepcopy(model)
    config = _peft_config(kwargs)
    with _quiet():
        pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs), init_data=eigens)
        preprocess_corda(twin_model, config, run_model=lambda: _run(twin_model))
        import peft

        twin = peft.get_peft_model(twin_model, config)
    assert_equal_to_peft(pm, twin, model, changes_base=True)
    assert_unchanged(model, snap)


def test_corda_cache_and_covariance_files_are_peft_s(tmp_path: Any) -> None:
    """PEFT writes the cache; funcpeft reads it (and the other way round) with equal results."""
    from peft.tuners.lora.corda import preprocess_corda

    cache, cov = str(tmp_path / "c" / "cache.pt"), str(tmp_path / "c" / "cov.pt")
    kwargs: dict[str, Any] = dict(
        r=2,
        target_modules=["q_proj"],
        init_lora_weights="corda",
        corda_config={"cache_file": cache, "covariance_file": cov},
    )
    model = MODELS["llama"]()
    twin_model = copy.deepcopy(model)
    with _quiet():
        preprocess_corda(twin_model, _peft_config(kwargs), run_model=lambda: _run(twin_model))
        from_peft_files = funcpeft.preprocess_corda(model, funcpeft.LoraConfig(**kwargs))  # no run_model: the cache
        os.remove(cache)
        from_covariance = funcpeft.preprocess_corda(model, funcpeft.LoraConfig(**kwargs))  # the covariance file
        fresh = funcpeft.preprocess_corda(
            model, funcpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda"), _run
        )
    for path, e in fresh.items():
        for other in (from_peft_files[path], from_covariance[path]):
            for k in ("S_WC", "U_WC", "V_WC"):
                torch.testing.assert_close(getattr(other, k), getattr(e, k), atol=TOL, rtol=0)


# -- LoRA-GA ------------------------------------------------------------------------------------------------------
def _train(forward: Any) -> None:
    for ids in BATCHES[:3]:
        forward(input_ids=ids, labels=ids).loss.backward()


GA = [("ArBr", "stable"), ("A2rBr", "weight_svd"), ("ArB2r", "gd_scale"), ("random", "unit"), ("ArB2r", "stable")]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(("direction", "scale"), GA)
def test_lora_ga_equals_peft(kind: str, direction: str, scale: str) -> None:
    import peft
    from peft.tuners.lora.loraga import preprocess_loraga

    kwargs: dict[str, Any] = dict(
        r=2,
        target_modules=TARGETS[kind],
        init_lora_weights="lora_ga",
        lora_ga_config={"direction": direction, "scale": scale},
    )
    model = MODELS[kind]()
    snap = snapshot(model)
    with _quiet():
        torch.manual_seed(7)  # training mode: GPT-2's dropout draws from the global RNG, as in PEFT
        grads = funcpeft.preprocess_loraga(model, funcpeft.LoraConfig(**kwargs), _train)
    assert_unchanged(model, snap)  # no .grad, requires_grad, mode or buffer changed
    twin_model = copy.deepcopy(model)
    config = _peft_config(kwargs)
    with _quiet():
        torch.manual_seed(7)
        preprocess_loraga(twin_model, config, lambda: _train(twin_model))
        torch.manual_seed(11)
        twin = peft.get_peft_model(twin_model, config)
        torch.manual_seed(11)
        pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs), init_data=grads)
    assert_equal_to_peft(pm, twin, model, changes_base=True)
    assert_unchanged(model, snap)


def test_lora_ga_layer_without_gradient_falls_back_like_peft() -> None:
    """A targeted layer no backward pass reached gets PEFT's init_lora_weights=True (and keeps its weight)."""
    kwargs: dict[str, Any] = dict(
        r=2, target_modules=["q_proj", "lm_head"], init_lora_weights="lora_ga", lora_ga_config={}
    )
    model = MODELS["llama"]()
    with _quiet():
        grads = funcpeft.preprocess_loraga(
            model, funcpeft.LoraConfig(**kwargs), lambda f: f(input_ids=BATCHES[0]).logits[..., :3].sum().backward()
        )
        grads["lm_head"] = None
        pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs), init_data=grads)
    assert torch.equal(pm.base["lm_head.weight"], model.get_parameter("lm_head.weight"))
    assert not torch.equal(
        pm.base["model.layers.0.self_attn.q_proj.weight"], model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    )
    assert bool((pm.adapter["lm_head"]["lora_B"] == 0).all()) and not bool((pm.adapter["lm_head"]["lora_A"] == 0).all())


# -- EVA ----------------------------------------------------------------------------------------------------------
def _eva_data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(1, T.VOCAB, (4, 16), generator=g),
            "attention_mask": torch.ones(4, 16, dtype=torch.long),
        }
        for _ in range(6)
    ]
    for b in data:
        b["attention_mask"][0, 10:] = 0
    return data


EVA = [("llama", ["q_proj", "k_proj", "v_proj", "down_proj"], 2.0), ("gpt2", ["c_attn", "c_fc"], 1.0)]


@pytest.mark.parametrize(("kind", "targets", "rho"), EVA, ids=[k for k, _, _ in EVA])
def test_eva_equals_peft(kind: str, targets: list[str], rho: float, tmp_path: Any) -> None:
    """Same components, ranks (k_proj and v_proj share their input), alpha / rank patterns; the files load in PEFT."""
    import peft
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    kwargs = dict(r=4, target_modules=targets, init_lora_weights="eva", eva_config={"rho": rho, "tau": 0.9})
    pm, twin, model, snap = _pair(kind, kwargs)
    data = _eva_data()
    tree = funcpeft.initialize_lora_eva_weights(pm, pm.base, data)
    assert_unchanged(model, snap)
    initialize_lora_eva_weights(twin, data, show_progress_bar=False)
    named = dict(twin.named_parameters())
    ours = {T.peft_param_name(p, k, pm.plans["default"][p]) for p, e in tree.items() for k in e}
    assert ours == {n for n, t in twin.named_parameters() if t.requires_grad}
    for path, entry in tree.items():
        for key, value in entry.items():
            torch.testing.assert_close(
                value, named[T.peft_param_name(path, key, pm.plans["default"][path])].detach(), atol=TOL, rtol=0
            )
    ours_c, theirs_c = pm.peft_config["default"], twin.peft_config["default"]
    assert isinstance(ours_c, funcpeft.LoraConfig) and isinstance(theirs_c, peft.LoraConfig)
    assert ours_c.rank_pattern == theirs_c.rank_pattern and ours_c.alpha_pattern == theirs_c.alpha_pattern
    ours_t, theirs_t = ours_c.target_modules, theirs_c.target_modules
    assert isinstance(ours_t, (list, set)) and isinstance(theirs_t, (list, set))
    assert set(ours_t) == set(theirs_t)
    if kind == "llama":
        assert len(set(ours_c.rank_pattern.values())) > 1, "the case should redistribute ranks"
    ids = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pm.fn(pm.base, tree, input_ids=ids).logits, model(input_ids=ids).logits)  # B = 0
    pm.save_pretrained(tmp_path, tree)
    with _quiet():
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    for path, entry in tree.items():
        for key, value in entry.items():
            torch.testing.assert_close(
                value, dict(loaded.named_parameters())[T.peft_param_name(path, key, pm.plans["default"][path])]
            )


def test_eva_components_are_orthonormal_rows() -> None:
    pm, _, _, _ = _pair("llama", dict(r=3, target_modules=["q_proj", "o_proj"], init_lora_weights="eva"))
    tree = funcpeft.initialize_lora_eva_weights(pm, pm.base, _eva_data())
    for path, entry in tree.items():
        a = entry["lora_A"]
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0, msg=path)


def test_eva_refuses_other_inits() -> None:
    pm, _, _, _ = _pair("llama", dict(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        funcpeft.initialize_lora_eva_weights(pm, pm.base, _eva_data())


# -- laws -------------------------------------------------------------------------------------------------------
class _Lin(nn.Module):
    def __init__(self, i: int, o: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.lin = nn.Linear(i, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@settings(max_examples=examples(12))
@given(
    i=st.integers(4, 24),
    o=st.integers(4, 24),
    r=st.integers(1, 4),
    alpha=st.sampled_from([1, 8, 16]),
    init=st.sampled_from(["pissa", "pissa_niter_2", "olora"]),
    seed=st.integers(0, 1000),
    rslora=st.booleans(),
)
def test_residual_plus_adapter_is_the_original_weight(
    i: int, o: int, r: int, alpha: int, init: str, seed: int, rslora: bool
) -> None:
    """PiSSA / OLoRA: base' + s * B @ A == W, and base' has no component in the adapter's subspace (PiSSA)."""
    model = _Lin(i, o, seed)
    with _quiet():
        pm = funcpeft.get_peft_model(
            model,
            funcpeft.LoraConfig(
                r=r, lora_alpha=alpha, target_modules=["lin"], init_lora_weights=init, use_rslora=rslora
            ),
        )
    a, b = pm.adapter["lin"]["lora_A"].detach(), pm.adapter["lin"]["lora_B"].detach()
    spec = pm.plans["default"]["lin"].spec
    assert spec is not None
    s = spec.hyper.scaling
    torch.testing.assert_close(pm.base["lin.weight"] + s * b @ a, model.lin.weight.detach(), atol=1e-5, rtol=1e-5)
    if init == "pissa":  # the residual holds the minor singular values only
        sv = torch.linalg.svdvals(model.lin.weight.detach())
        torch.testing.assert_close(
            torch.linalg.svdvals(pm.base["lin.weight"])[: min(i, o) - r], sv[r:], atol=1e-4, rtol=1e-4
        )


@settings(max_examples=examples(10))
@given(i=st.integers(2, 20), o=st.integers(2, 20), half=st.integers(1, 4), seed=st.integers(0, 1000))
def test_orthogonal_init_is_a_no_op(i: int, o: int, half: int, seed: int) -> None:
    """B @ A = 0 (the rows of A and the columns of B come from orthogonal halves of one Q), A and B are not 0."""
    model = _Lin(i, o, seed)
    pm = funcpeft.get_peft_model(
        model,
        funcpeft.LoraConfig(r=2 * half, target_modules=["lin"], init_lora_weights="orthogonal"),
        generator=torch.Generator().manual_seed(seed),
    )
    a, b = pm.adapter["lin"]["lora_A"].detach(), pm.adapter["lin"]["lora_B"].detach()
    torch.testing.assert_close(b @ a, torch.zeros(o, i), atol=1e-6, rtol=0)
    assert a.abs().max() > 0 and b.abs().max() > 0
    assert pm.base["lin.weight"] is not None and torch.equal(pm.base["lin.weight"], model.lin.weight)


def test_corda_and_lora_ga_residual_laws() -> None:
    """CorDA / LoRA-GA: base' + s * B @ A == W for every adapted layer."""
    model = MODELS["gpt2"]()
    kw: dict[str, Any] = dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"])
    with _quiet():
        c = funcpeft.LoraConfig(**kw, init_lora_weights="corda")
        pm_c = funcpeft.get_peft_model(model, c, init_data=funcpeft.preprocess_corda(model, c, _run))
        g = funcpeft.LoraConfig(**kw, init_lora_weights="lora_ga", lora_ga_config={})
        pm_g = funcpeft.get_peft_model(model, g, init_data=funcpeft.preprocess_loraga(model, g, _train))
    for pm in (pm_c, pm_g):
        for path, entry in pm.adapter.items():
            spec = pm.plans["default"][path].spec
            assert spec is not None
            delta = spec.hyper.scaling * (entry["lora_B"] @ entry["lora_A"]).detach().T  # Conv1D layout
            torch.testing.assert_close(
                pm.base[f"{path}.weight"] + delta, dict(model.named_parameters())[f"{path}.weight"], atol=1e-5, rtol=0
            )


# -- conversion to plain LoRA -----------------------------------------------------------------------------------
def _trained(tree: Any, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return {
        p: {k: v.detach() + 0.05 * torch.randn(v.shape, generator=g) for k, v in e.items()} for p, e in tree.items()
    }


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "lora_ga"])
def test_conversion_equals_peft_and_loads_in_peft(init: str, tmp_path: Any) -> None:
    import peft
    from safetensors.torch import load_file

    kwargs: dict[str, Any] = dict(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    if init == "lora_ga":
        kwargs["lora_ga_config"] = {}
    model = MODELS["llama"]()
    config = funcpeft.LoraConfig(**kwargs)
    with _quiet():
        data = (
            funcpeft.preprocess_corda(model, config, _run)
            if init == "corda"
            else funcpeft.preprocess_loraga(model, config, _train)
            if init == "lora_ga"
            else None
        )
        pm = funcpeft.get_peft_model(model, config, init_data=data)
    fn, base, fresh = pm
    pm.save_pretrained(tmp_path / "init", fresh)
    trained = _trained(fresh)
    with _quiet():
        pm.save_pretrained(tmp_path / "lora", trained, path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ids = BATCHES[1]
    with torch.no_grad():
        want = fn(base, trained, input_ids=ids).logits
        with _quiet():
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "lora")).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=TOL, rtol=0)  # on the ORIGINAL weights
        ours = funcpeft.from_pretrained(model, tmp_path / "lora")
        torch.testing.assert_close(ours.fn(ours.base, ours.adapter, input_ids=ids).logits, want, atol=TOL, rtol=0)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["init_lora_weights"], saved["r"], saved["lora_alpha"]) == (True, 4, 12)
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True
    funcpeft.load_adapter(tmp_path / "init", model=model)  # the rewritten initial adapter still loads (one save)
    # PEFT's own conversion of the same trained values gives the same file
    twin = peft.get_peft_model(
        copy.deepcopy(model),
        _peft_config({k: v for k, v in kwargs.items() if k != "lora_ga_config"} | {"init_lora_weights": True}),
    )
    T.copy_into_peft(twin, fresh, pm.plans["default"])
    twin.save_pretrained(str(tmp_path / "pinit"))
    T.copy_into_peft(twin, trained, pm.plans["default"])
    with _quiet():
        twin.save_pretrained(str(tmp_path / "plora"), path_initial_model_for_weight_conversion=str(tmp_path / "pinit"))
    a, b = (
        load_file(str(tmp_path / "lora" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "plora" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_conversion_refusals(tmp_path: Any) -> None:
    model = MODELS["llama"]()
    with _quiet():
        pm = funcpeft.get_peft_model(
            model,
            funcpeft.LoraConfig(
                r=2, target_modules=["q_proj"], init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2}
            ),
        )
    pm.save_pretrained(tmp_path / "init", pm.adapter)
    with pytest.raises(ValueError, match="use_rslora=True"):
        pm.save_pretrained(
            tmp_path / "out", pm.adapter, path_initial_model_for_weight_conversion=str(tmp_path / "init")
        )
    with _quiet():
        pm = funcpeft.get_peft_model(
            model, funcpeft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa")
        )
    pm.save_pretrained(tmp_path / "init2", pm.adapter)
    with pytest.raises(ValueError, match="embedding LoRA"):
        pm.save_pretrained(
            tmp_path / "out", pm.adapter, path_initial_model_for_weight_conversion=str(tmp_path / "init2")
        )
    assert not (tmp_path / "out").exists()


def test_from_pretrained_reapplies_pissa_like_peft(tmp_path: Any) -> None:
    """PEFT's from_pretrained runs the saved init again on the model's weights; so does funcpeft's."""
    import peft

    pm, twin, model, snap = _pair("llama", dict(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path, pm.adapter)
    with _quiet():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    ours = funcpeft.from_pretrained(model, tmp_path)
    for name, w in _peft_layer_weights(theirs).items():
        assert torch.equal(ours.base[name], w), name
    assert not torch.equal(
        ours.base["model.layers.0.self_attn.q_proj.weight"],
        model.get_parameter("model.layers.0.self_attn.q_proj.weight"),
    )
    assert_unchanged(model, snap)


# -- configs and errors -----------------------------------------------------------------------------------------
def test_sub_configs_serialise_like_peft() -> None:
    cases: list[dict[str, Any]] = [
        dict(init_lora_weights="eva", eva_config={"rho": 1.5}),
        dict(init_lora_weights="corda", corda_config={"corda_method": "kpm"}),
        dict(init_lora_weights="lora_ga", lora_ga_config={"direction": "ArBr"}),
        dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 2}),
    ]
    for kw in cases:
        with _quiet():
            ours, theirs = (
                funcpeft.LoraConfig(target_modules=["q"], **kw).to_dict(),
                _peft_config(dict(target_modules=["q"], **kw)).to_dict(),
            )
            for key in ("eva_config", "corda_config", "lora_ga_config", "loftq_config", "init_lora_weights"):
                assert ours[key] == theirs[key], key
            assert funcpeft.LoraConfig.from_dict(json.loads(json.dumps(ours))).to_dict() == ours  # through JSON


@pytest.mark.parametrize(
    ("kind", "kwargs", "error", "match"),
    [
        (
            "conv",
            dict(target_modules=["conv2d"], init_lora_weights="pissa"),
            UnsupportedLayerError,
            "'conv2d'.*nn.Linear",
        ),
        ("gpt2", dict(target_modules=["c_attn"], init_lora_weights="olora"), UnsupportedLayerError, "fan_in_fan_out"),
        (
            "llama",
            dict(
                target_modules=["embed_tokens"],
                init_lora_weights="loftq",
                loftq_config={"loftq_bits": 4, "loftq_iter": 1},
            ),
            UnsupportedLayerError,
            "embed_tokens",
        ),
        ("llama", dict(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"), ValueError, "even"),
        (
            "llama",
            dict(r=80, target_modules=["q_proj"], init_lora_weights="pissa"),
            ValueError,
            "min\\(in_features, out_features\\) = 64",
        ),
        ("llama", dict(target_modules=["q_proj"], init_lora_weights="corda"), ValueError, "preprocess_corda"),
        (
            "llama",
            dict(target_modules=["q_proj"], init_lora_weights="lora_ga", lora_ga_config={}),
            ValueError,
            "preprocess_loraga",
        ),
    ],
)
def test_refusals(kind: str, kwargs: dict[str, Any], error: type, match: str) -> None:
    model = MODELS[kind]()
    snap = snapshot(model)
    with _quiet(), pytest.raises(error, match=match):
        funcpeft.get_peft_model(model, funcpeft.LoraConfig(**kwargs))
    assert_unchanged(model, snap)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="Did you mean 'pissa'"):
        funcpeft.LoraConfig(init_lora_weights="pisa")
    with pytest.raises(ValueError, match="non-negative integer"):
        funcpeft.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="`loftq_config` must be specified"):
        funcpeft.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="Only nf4 and int8"):
        funcpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1})
    with pytest.raises(ValueError, match="rho"):
        funcpeft.EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="direction"):
        funcpeft.LoraGAConfig(direction="AB")
    assert funcpeft.LoraConfig(init_lora_weights="mica").requested_variants() == (
        "mica",
    )  # a variant (methods/mica.py)


def test_init_data_for_unknown_modules_is_refused() -> None:
    model = MODELS["llama"]()
    config = funcpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda")
    with _quiet():
        eigens = funcpeft.preprocess_corda(model, config, _run)
    with _quiet(), pytest.raises(ValueError, match="does not adapt"):
        funcpeft.get_peft_model(
            model, funcpeft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights="corda"), init_data=eigens
        )


# -- training: outputs and gradients on the new base weights ---------------------------------------------------
TRAIN: list[tuple[str, str, dict[str, Any]]] = [
    ("llama", "pissa", {}),
    ("llama", "olora", {}),
    ("llama", "orthogonal", {}),
    ("gpt2", "pissa_niter_2", {}),
    ("llama", "pissa", {"use_dora": True}),
    ("llama", "loftq", {"loftq_config": {"loftq_bits": 4, "loftq_iter": 2}}),
]


@pytest.mark.parametrize(
    ("kind", "init", "extra"), TRAIN, ids=[f"{k}-{i}-{'-'.join(e) or 'plain'}" for k, i, e in TRAIN]
)
def test_trained_loss_and_gradients_equal_peft(
    monkeypatch: pytest.MonkeyPatch, kind: str, init: str, extra: dict[str, Any]
) -> None:
    """A moved adapter on pm.base: loss and every adapter gradient equal PEFT's on its mutated layers."""
    if init == "loftq":
        _peft_loftq_on_cpu(monkeypatch, real_bnb=False)
    pm, twin, model, snap = _pair(
        kind, dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init, **extra)
    )
    plan = pm.plans["default"]
    trained = {p: {k: v.requires_grad_(True) for k, v in e.items()} for p, e in _trained(pm.adapter, seed=5).items()}
    T.copy_into_peft(twin, trained, plan)
    ids = BATCHES[2]
    loss = pm.fn(pm.base, trained, input_ids=ids, labels=ids).loss
    loss.backward()
    twin.eval()
    want = twin(input_ids=ids, labels=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want, atol=TOL, rtol=0)
    theirs = T.peft_grads(twin, trained, plan)
    for path, entry in trained.items():
        for key, leaf in entry.items():
            assert leaf.grad is not None and theirs[path][key] is not None, f"{path}.{key}: no gradient"
            torch.testing.assert_close(leaf.grad, theirs[path][key], atol=1e-5, rtol=1e-4, msg=f"{path}.{key}")
    assert all(not t.requires_grad or t.grad is None for t in pm.base.values()), "gradients reached the base tree"
    assert_unchanged(model, snap)


def test_peft_saved_olora_adapter_loads_in_funcpeft(tmp_path: Any) -> None:
    """PEFT's file (init_lora_weights='olora' saved unconverted): funcpeft re-derives the same residual and outputs."""
    pm, twin, model, snap = _pair("llama", dict(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights="olora"))
    T.copy_into_peft(twin, _trained(pm.adapter, seed=9), pm.plans["default"])
    twin.save_pretrained(str(tmp_path))
    with _quiet():
        theirs = type(twin).from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    ours = funcpeft.from_pretrained(model, tmp_path)
    for name, w in _peft_layer_weights(theirs).items():
        torch.testing.assert_close(ours.base[name], w, atol=TOL, rtol=0, msg=name)
    ids = BATCHES[3]
    with torch.no_grad():
        torch.testing.assert_close(
            ours.fn(ours.base, ours.adapter, input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=0
        )
    assert_unchanged(model, snap)
