"""Quantised bases for the methods PEFT 0.21.2 adapts through its generic quantisation backend
(peft/utils/quantization_utils.py: `resolve_quantization_backend`, `Bnb4bitBackend` / `Bnb8bitBackend`): VeRA,
MiSS, BOFT, OFT and SHiRA on bitsandbytes Linear4bit (NF4) and Linear8bitLt layers, against PEFT's own layers on the
same quantised model.

One row per (method, backend): a later method or backend is one more row of ROWS. Each row checks outputs and every
adapter gradient (<= 1e-5 relative), parameter counts, that the base tree holds the quantised weights as they are,
how many 4-bit dequantisations a call and a training step run (a call: one per layer, by the layer's kernel or, for
MiSS 'bat' and SHiRA, by the method; a step: PEFT's count), the fresh adapter (rounded through a 4-bit layer's compute
dtype, as PEFT's), files both ways, and merge / unmerge / merge_and_unload
(dequantise, apply, quantise again; like PEFT's generic backend, without the rounding warning of PEFT's
bnb layers) against PEFT's.

The quantised tiny Llama and its loader are test_qlora's (a saved float model loaded with a BitsAndBytesConfig).
The torchao (int8, transformers' TorchAoConfig) and HQQ (4-bit HQQLinear) rows (AO_ROWS) use test_qlora_backends'
builders; see that section for what they check and where PEFT's generic backend is wrong.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from helpers import as_type, capture_stdout
from test_qlora import IDS, _assert_equal_peft, _dequantisations, _load, _loss, _rel
from test_qlora import saved as saved  # the fixture
from torch import nn

import funcpeft
from funcpeft.testing import random_like
from funcpeft.testing._peft import copy_into_peft, peft_grads, peft_param_name

if TYPE_CHECKING:
    import bitsandbytes as bnb
else:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test extra (quantised bases)")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # (64, 64), (32, 64), (64, 128): shapes differ (VeRA slices)
BACKEND = {"nf4": "bnb 4bit", "int8": "bnb 8bit"}  # PEFT's QuantizationBackend.backend_name


@dataclass(frozen=True)
class Row:
    """One (method, backend) case: `<config>(**kwargs)` for funcpeft and PEFT alike on a `bits` base."""

    config: str
    kwargs: dict[str, Any]
    bits: str  # "nf4" (Linear4bit) or "int8" (Linear8bitLt)
    compute: torch.dtype = torch.float32  # bnb_4bit_compute_dtype (4-bit only)
    marks: tuple[Any, ...] = field(default=())

    @property
    def id(self) -> str:
        extra = "-" + str(self.kwargs["init_weights"]) if "init_weights" in self.kwargs else ""
        compute = "-bf16" if self.compute is torch.bfloat16 else ""
        return f"{self.config.removesuffix('Config').lower()}{extra}-{self.bits}{compute}"


_SLOW = (pytest.mark.slow,)
_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("VeraConfig", dict(r=4, target_modules=TARGETS)),
    ("MissConfig", dict(r=4, target_modules=TARGETS)),
    ("MissConfig", dict(r=4, mini_r=8, init_weights="mini", target_modules=TARGETS)),
    ("MissConfig", dict(r=4, init_weights="bat", target_modules=TARGETS)),  # reads the dequantised weight
    ("BOFTConfig", dict(boft_block_size=4, target_modules=TARGETS)),
    ("OFTConfig", dict(r=0, oft_block_size=8, target_modules=TARGETS)),
    ("ShiraConfig", dict(r=2, target_modules=TARGETS)),  # reads the dequantised weight
]
# every method on NF4; the 8-bit rows (a fresh load from disk each: an Int8Params does not survive a deep copy) and
# MiSS's extra variants are the slow tier
ROWS = [
    Row(c, kw, bits, marks=_SLOW if bits == "int8" or "init_weights" in kw else ())
    for bits in ("nf4", "int8")
    for c, kw in _METHODS
] + [  # bf16 compute (QLoRA's usual setting); VeRA: see test_vera_with_a_bf16_compute_dtype_rounds_its_projections
    Row(c, kw, "nf4", torch.bfloat16, marks=_SLOW)
    for c, kw in _METHODS
    if c != "VeraConfig" and "init_weights" not in kw
]
PARAMS = [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS]


def _fast(*ids: str) -> list[Any]:
    """ROWS with only the rows `ids` in the fast tier (for checks that mostly exercise generic code)."""
    return [pytest.param(r, id=r.id, marks=() if r.id in ids else _SLOW) for r in ROWS]


def _pair(path: Path, row: Row) -> tuple[Any, Any, Any]:
    """(funcpeft model, PEFT model, adapter values): the same quantised model twice, the same random adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = funcpeft.get_peft_model(
            _load(path, bits=row.bits, compute=row.compute), getattr(funcpeft, row.config)(**row.kwargs)
        )
        theirs = peft.get_peft_model(
            _load(path, bits=row.bits, compute=row.compute), getattr(peft, row.config)(**row.kwargs)
        )
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    return ours, theirs, adapter


def _quantised(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params))}


@pytest.mark.parametrize("row", PARAMS)
def test_outputs_grads_counts_and_base_equal_peft(saved: Path, row: Row) -> None:
    ours, theirs, adapter = _pair(saved, row)
    for path in adapter:  # PEFT really adapted the quantised layer through its generic backend
        layer = theirs.get_submodule(f"base_model.model.{path}")
        assert layer.quantization_backend.backend_name == BACKEND[row.bits], path
    _assert_equal_peft(ours, theirs, adapter)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert capture_stdout(ours.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)
    # the base tree holds the model's quantised weights themselves, untouched by a training step
    weights = _quantised(ours.model)
    assert len(weights) == 14  # every linear layer of the two decoder layers
    before = {n: p.data.clone() for n, p in weights.items()}
    funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS, dropout_rng=0).logits))(adapter)
    for name, p in weights.items():
        assert ours.base[name] is p and not p.requires_grad and p.grad is None, name
        assert torch.equal(p.data, before[name]), name


@pytest.mark.parametrize("row", [p for p in _fast("shira-nf4") if p.values[0].bits == "nf4"])  # type: ignore[union-attr]
def test_a_step_dequantises_what_peft_s_does(saved: Path, row: Row) -> None:
    """A call dequantises each quantised weight once, like the bare model (a layer whose method reads the weight,
    MiSS 'bat' and SHiRA, is dequantised by the method instead of by the layer's kernel), and a training step runs
    as many 4-bit dequantisations as PEFT's: nothing weight-sized beyond what PEFT materialises."""
    ours, theirs, adapter = _pair(saved, row)
    n_bare = _dequantisations(lambda: _load(saved)(input_ids=IDS))
    assert _dequantisations(lambda: ours.fn(ours.base, adapter, input_ids=IDS)) == n_bare == 14
    n_peft = _dequantisations(lambda: _loss(theirs(input_ids=IDS).logits).backward())
    step = _dequantisations(
        lambda: funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    )
    assert step == n_peft


@pytest.mark.parametrize("row", _fast("vera-nf4", "shira-nf4"))
def test_files_both_ways(saved: Path, tmp_path: Path, row: Row) -> None:
    ours, theirs, adapter = _pair(saved, row)
    expected = ours.fn(ours.base, adapter, input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "ours", adapter)
    loaded = peft.PeftModel.from_pretrained(_load(saved, bits=row.bits, compute=row.compute), tmp_path / "ours")
    assert _rel(loaded(input_ids=IDS).logits, expected) <= 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    back = funcpeft.from_pretrained(_load(saved, bits=row.bits, compute=row.compute), tmp_path / "theirs")
    assert _rel(back.fn(back.base, back.adapter, input_ids=IDS).logits, expected) <= 1e-6


def _stored(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a quantised weight stores: 4-bit packed data and block scales, or int8 data and row scales."""
    if isinstance(p, bnb.nn.Params4bit):
        assert p.quant_state is not None
        return p.data, p.quant_state.absmax
    int8 = as_type(p, bnb.nn.Int8Params)
    assert int8.SCB is not None, "an Int8Params without its row scales"
    return int8.data, int8.SCB


def _assert_stored_equal(tree: dict[str, torch.Tensor], peft_model: nn.Module, names: list[str]) -> None:
    """The quantised weights `names` of a funcpeft tree store what PEFT's layers (`<name>.base_layer`) store."""
    for name in names:
        path = name.removesuffix(".weight")
        want = peft_model.get_submodule(f"base_model.model.{path}.base_layer").weight
        assert type(tree[name]) is type(want), name
        for got, value in zip(_stored(tree[name]), _stored(want), strict=True):
            assert torch.equal(got, value), name


@pytest.mark.parametrize("row", _fast("oft-nf4", "shira-nf4"))
def test_merge_unmerge_and_unload_equal_peft(saved: Path, row: Row) -> None:
    """funcpeft.merge / unmerge / merge_and_unload dequantise, apply the adapter and quantise again, giving PEFT's
    merge_adapter / unmerge_adapter / merge_and_unload weights bit for bit (PEFT's generic backend: get_base_weight,
    the method's merge, set_base_weight)."""
    ours, theirs, adapter = _pair(saved, row)
    weights = [f"{path}.weight" for path in adapter]  # the adapted layers' (the others are the base's, as they are)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = funcpeft.merge(ours, ours.base, adapter)
        theirs.merge_adapter()
    assert not [w for w in caught if "rounding" in str(w.message)]  # PEFT's generic backend merges without warning
    _assert_stored_equal(merged, theirs, weights)
    assert torch.equal(ours.fn(merged, None, input_ids=IDS).logits, theirs(input_ids=IDS).logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = funcpeft.unmerge(ours, merged, adapter)
        theirs.unmerge_adapter()
    assert not [w for w in caught if "rounding" in str(w.message)]
    _assert_stored_equal(back, theirs, weights)
    for name in set(ours.base) - set(weights):
        assert back[name] is merged[name] is ours.base[name], name
    for name, p in _quantised(ours.model).items():  # the model and its base tree are untouched
        assert ours.base[name] is p

    ours, theirs, adapter = _pair(saved, row)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = funcpeft.merge_and_unload(ours, adapter)
        peft_model = theirs.merge_and_unload()
    assert not [w for w in caught if "rounding" in str(w.message)]
    mine, want = _quantised(model), _quantised(peft_model)
    assert mine.keys() == want.keys() and len(mine) == 14
    for name in mine:
        assert type(mine[name]) is type(want[name]), name
        for a, b in zip(_stored(mine[name]), _stored(want[name]), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(model(input_ids=IDS).logits, peft_model(input_ids=IDS).logits)


@pytest.mark.parametrize(
    ("config", "kwargs"),
    [
        ("VeraConfig", dict(r=4, target_modules=TARGETS)),  # vera_lambda_d = d_initial = 0.1
        pytest.param(
            "OFTConfig", dict(r=0, oft_block_size=8, target_modules=TARGETS, init_weights=False), marks=_SLOW
        ),  # N(0, 0.1) draws
        pytest.param("BOFTConfig", dict(boft_block_size=4, target_modules=TARGETS, init_weights=False), marks=_SLOW),
    ],
    ids=["vera", "oft", "boft"],
)
def test_fresh_adapter_rounds_through_the_compute_dtype_like_peft(saved: Path, config: str, kwargs: Any) -> None:
    """PEFT moves a fresh adapter to its layer's dtype, for a 4-bit layer its compute dtype (bf16 here), before
    autocast_adapter_dtype upcasts it to float32: the fresh values are bf16-rounded, in funcpeft too."""
    torch.manual_seed(0)
    ours = funcpeft.get_peft_model(_load(saved, compute=torch.bfloat16), getattr(funcpeft, config)(**kwargs))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_load(saved, compute=torch.bfloat16), getattr(peft, config)(**kwargs))
    named = dict(theirs.named_parameters())
    plan = ours.plans["default"]
    for path, leaves in ours.adapter.items():
        for key, value in leaves.items():
            want = named[peft_param_name(path, key, plan[path], "default", set(plan))]
            assert value.dtype == want.dtype == torch.float32 and torch.equal(value, want.detach()), (path, key)


@pytest.mark.slow
def test_vera_with_a_bf16_compute_dtype_rounds_its_projections_like_peft(saved: Path) -> None:
    ours, theirs, adapter = _pair(saved, Row("VeraConfig", dict(r=4, target_modules=TARGETS), "nf4", torch.bfloat16))
    _assert_equal_peft(ours, theirs, adapter)


# -- torchao (int8 Int8Tensor, loaded by transformers with TorchAoConfig) and HQQ (4-bit HQQLinear) ----------------
# The same methods through PEFT's generic TorchaoBackend / HqqBackend; the models are test_qlora_backends' (HQQ:
# q/v/o/down_proj replaced by HQQLinear layers, o_proj with a bias). PEFT's SHiRA cannot take an HQQ layer (its
# mask_fn reads `base_layer.weight`, which HQQLinear lacks: AttributeError), so funcpeft refuses it by name.
from test_qlora_backends import _hqq, _torchao  # noqa: E402  (torchao / hqq are imported there, with importorskip)

hqq_quantize = pytest.importorskip("hqq.core.quantize")
torchao = pytest.importorskip("torchao")
AO_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # o_proj: the biased HQQ layer
AO_LOADERS = {"torchao": _torchao, "hqq": _hqq}
AO_ROWS = [
    Row(c, dict(kw, target_modules=AO_TARGETS), backend, dtype)
    for backend in ("torchao", "hqq")
    for dtype in (torch.float32, torch.bfloat16)
    for c, kw in _METHODS
    if not (backend == "hqq" and c == "ShiraConfig")
]
_AO_FAST = ("vera-torchao", "shira-torchao", "vera-hqq", "oft-hqq")  # the rest (same code paths): the slow tier
AO_PARAMS = [pytest.param(r, id=r.id, marks=() if r.id in _AO_FAST else _SLOW) for r in AO_ROWS]


def _ao_fast(*ids: str) -> list[Any]:
    """The float32 AO_ROWS with only `ids` in the fast tier."""
    return [pytest.param(r, id=r.id, marks=() if r.id in ids else _SLOW) for r in AO_ROWS if r.compute is torch.float32]


def _ao_pair(path: Path, row: Row) -> tuple[Any, Any, Any]:
    """(funcpeft model, PEFT model, adapter values) on two fresh loads of the torchao / HQQ model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load = AO_LOADERS[row.bits]
        ours = funcpeft.get_peft_model(load(path, row.compute), getattr(funcpeft, row.config)(**row.kwargs))
        theirs = peft.get_peft_model(load(path, row.compute), getattr(peft, row.config)(**row.kwargs))
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    return ours, theirs, adapter


def _codes(t: torch.Tensor) -> torch.Tensor:
    """What a torchao Int8Tensor / HQQ W_q stores (its int8 codes / packed 4-bit data), as a plain tensor."""
    return (t.qdata if hasattr(t, "qdata") else t).detach().clone()


@pytest.mark.parametrize("row", AO_PARAMS)
def test_torchao_and_hqq_outputs_grads_counts_and_base_equal_peft(saved: Path, row: Row) -> None:
    ours, theirs, adapter = _ao_pair(saved, row)
    for path in adapter:  # PEFT adapted the layer through its generic backend
        layer = theirs.get_submodule(f"base_model.model.{path}")
        assert layer.quantization_backend.backend_name == row.bits, path
    before = {k: _codes(v) for k, v in ours.model.named_parameters()}
    expected = theirs(input_ids=IDS).logits
    _loss(expected).backward()
    got, grads = funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    out = ours.fn(ours.base, adapter, input_ids=IDS).logits
    assert out.dtype == expected.dtype
    # float32: within 1e-6 (BOFT's butterfly products round in another order); bf16: bitwise
    assert _rel(out, expected.detach()) <= (1e-6 if row.compute is torch.float32 else 0.0)
    want = peft_grads(theirs, adapter, ours.plans["default"])
    # relative to each leaf's own largest gradient, with a floor at the tree's largest (leaves of layer 1's q_proj
    # get ~1e-13 gradients here: rounding noise there); bf16: the backward's own rounding, like test_qlora_backends'
    top = max(float(w.detach().abs().max()) for leaves in want.values() for w in leaves.values())
    tol = 1e-5 if row.compute is torch.float32 else 2e-2
    for path, leaves in grads.items():
        for name, g in leaves.items():
            w = want[path][name]
            assert w is not None, (path, name)
            scale = max(float(w.detach().abs().max()), top * (1e-3 if row.compute is torch.float32 else 1.0))
            assert float((g.float() - w.float()).abs().max()) <= tol * scale, (path, name)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert capture_stdout(ours.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)
    # the base tree holds the model's packed weights themselves (nothing copied), never written by the step
    packed = "weight" if row.bits == "torchao" else "W_q"
    for path in adapter:
        leaf, own = ours.base[f"{path}.{packed}"], getattr(ours.model.get_submodule(path), packed)
        assert _codes(leaf).dtype in (torch.int8, torch.uint8), path
        assert (leaf.qdata if row.bits == "torchao" else leaf).data_ptr() == (
            own.qdata if row.bits == "torchao" else own
        ).data_ptr(), path
    assert torch.allclose(got, _loss(expected.detach()), rtol=1e-5)
    assert all(torch.equal(before[k], _codes(v)) for k, v in ours.model.named_parameters())


@pytest.mark.parametrize(
    ("config", "kwargs"),
    [
        ("VeraConfig", dict(r=4, target_modules=AO_TARGETS)),
        ("OFTConfig", dict(r=0, oft_block_size=8, target_modules=AO_TARGETS, init_weights=False)),
    ],
    ids=["vera", "oft"],
)
@pytest.mark.parametrize("backend", [pytest.param("torchao", marks=_SLOW), "hqq"])  # HQQ: nothing moved
def test_fresh_adapter_on_a_bf16_torchao_or_hqq_base_equals_peft(
    saved: Path, backend: str, config: str, kwargs: Any
) -> None:
    """PEFT moves a fresh adapter to a torchao layer's weight dtype (bf16: rounded, then upcast), but finds no
    device for an HQQLinear (no `weight` / `qweight`) and moves nothing: its draws stay float32 (VeRA's shared
    projections too). funcpeft's fresh adapter and projections equal PEFT's either way."""
    load = AO_LOADERS[backend]
    torch.manual_seed(0)
    ours = funcpeft.get_peft_model(load(saved, torch.bfloat16), getattr(funcpeft, config)(**kwargs))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(saved, torch.bfloat16), getattr(peft, config)(**kwargs))
    named = dict(theirs.named_parameters())
    plan = ours.plans["default"]
    for path, leaves in ours.adapter.items():
        for key, value in leaves.items():
            want = named[peft_param_name(path, key, plan[path], "default", set(plan))]
            assert value.dtype == want.dtype == torch.float32 and torch.equal(value, want.detach()), (path, key)
    if config == "VeraConfig":
        layer = theirs.get_submodule(f"base_model.model.{next(iter(ours.adapter))}")
        for key in ("vera_A", "vera_B"):
            mine = next(v for k, v in ours.base.items() if k.startswith(f"<shared>.{key}."))
            theirs_t = getattr(layer, key)["default"]
            assert mine.dtype == theirs_t.dtype and torch.equal(mine, theirs_t), key


# the files are the bitsandbytes rows' (adapter keys only): one row per file layout (VeRA's shared projections, a
# MiSS variant, BOFT's two tensors, SHiRA's indices) on each library
_FILE_ROWS = ("vera-torchao", "vera-hqq", "miss-bat-torchao", "boft-hqq", "shira-torchao")


@pytest.mark.parametrize("row", [p for p in _ao_fast("vera-torchao", "boft-hqq") if p.id in _FILE_ROWS])
def test_torchao_and_hqq_files_both_ways(saved: Path, tmp_path: Path, row: Row) -> None:
    ours, theirs, adapter = _ao_pair(saved, row)
    load = AO_LOADERS[row.bits]
    expected = ours.fn(ours.base, adapter, input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "ours", adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(load(saved), tmp_path / "ours")
    assert _rel(loaded(input_ids=IDS).logits, expected) <= 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    back = funcpeft.from_pretrained(load(saved), tmp_path / "theirs")
    assert _rel(back.fn(back.base, back.adapter, input_ids=IDS).logits, expected) <= 1e-6


def _int8_layers(model: nn.Module) -> dict[str, Any]:
    return {n: m.weight for n, m in model.named_modules() if type(m._parameters.get("weight")).__name__ == "Int8Tensor"}


@pytest.mark.parametrize("row", [p for p in _ao_fast("oft-torchao", "shira-torchao") if p.values[0].bits == "torchao"])  # type: ignore[union-attr]
def test_torchao_merge_unmerge_and_unload_equal_peft(saved: Path, row: Row) -> None:
    """Dequantise, apply, re-quantise with the model's own torchao config (PEFT's TorchaoBackend.set_base_weight):
    PEFT's merge_adapter / unmerge_adapter / merge_and_unload int8 codes and scales bit for bit, without the
    rounding warning of PEFT's LoRA layers."""
    ours, theirs, adapter = _ao_pair(saved, row)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = funcpeft.merge(ours, ours.base, adapter)
        theirs.merge_adapter()
        assert not [w for w in caught if "rounding" in str(w.message)]
        for path in adapter:
            want: Any = theirs.get_submodule(f"base_model.model.{path}.base_layer").weight
            got: Any = merged[f"{path}.weight"]
            assert type(got) is type(want) and got is not ours.base[f"{path}.weight"], path
            assert torch.equal(got.qdata, want.qdata) and torch.equal(got.scale, want.scale), path
        assert torch.equal(ours.fn(merged, None, input_ids=IDS).logits, theirs(input_ids=IDS).logits)
        back = funcpeft.unmerge(ours, merged, adapter)
        theirs.unmerge_adapter()
        assert not [w for w in caught if "rounding" in str(w.message)]
    for path in adapter:
        want = theirs.get_submodule(f"base_model.model.{path}.base_layer").weight
        assert torch.equal(_codes(back[f"{path}.weight"]), _codes(want)), path
    for name, p in _int8_layers(ours.model).items():  # the model and its base tree are untouched
        leaf: Any = ours.base[f"{name}.weight"]
        assert leaf.qdata.data_ptr() == p.qdata.data_ptr(), name
        if name not in adapter:
            assert back[f"{name}.weight"] is merged[f"{name}.weight"] is ours.base[f"{name}.weight"], name

    ours, theirs, adapter = _ao_pair(saved, row)
    model = funcpeft.merge_and_unload(ours, adapter)
    peft_model = theirs.merge_and_unload()
    mine, want = _int8_layers(model), _int8_layers(peft_model)
    assert mine.keys() == want.keys() and len(mine) == 14
    for name in mine:
        assert torch.equal(mine[name].qdata, want[name].qdata) and torch.equal(mine[name].scale, want[name].scale)
    assert torch.equal(model(input_ids=IDS).logits, peft_model(input_ids=IDS).logits)


@pytest.mark.parametrize("row", [p for p in _ao_fast("boft-hqq") if p.values[0].bits == "hqq"])  # type: ignore[union-attr]
def test_hqq_merge_and_unload_equals_peft_s_merge_keeping_the_bias(saved: Path, row: Row) -> None:
    """funcpeft.merge_and_unload builds new HQQLinear layers from the merged weight, as PEFT's HqqBackend does.

    Two PEFT deviations, shown here: (1) PEFT's merge_and_unload (and unload) of these methods raise
    AttributeError on an HQQ layer (BaseTuner._replace_module reads `child.weight`; LoRA overrides it), so the
    comparison is with PEFT's merge_adapter(), whose HqqBackend.set_base_weight puts the new HQQLinear into
    `base_layer`; (2) that new layer is `HQQLinear(None, ...)`: the layer's bias is dropped (o_proj's here),
    which funcpeft keeps, as for LoRA. Trees cannot be merged on HQQ layers (their scales live on the module)."""
    ours, theirs, adapter = _ao_pair(saved, row)
    unmerged = ours.fn(ours.base, adapter, input_ids=IDS).logits
    with pytest.raises(NotImplementedError, match="HQQ"):
        funcpeft.merge(ours, ours.base, adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = funcpeft.merge_and_unload(ours, adapter)
        theirs.merge_adapter()
    assert not [w for w in caught if "rounding" in str(w.message)]  # PEFT's generic backend does not warn
    for path in adapter:
        layer, want = model.get_submodule(path), theirs.get_submodule(f"base_model.model.{path}.base_layer")
        assert isinstance(layer, hqq_quantize.HQQLinear) and isinstance(want, hqq_quantize.HQQLinear), path
        assert layer is not ours.model.get_submodule(path), path  # a new layer; the model's own is untouched
        assert torch.equal(layer.W_q, want.W_q) and torch.equal(layer.dequantize(), want.dequantize()), path
    o_proj = "model.layers.0.self_attn.o_proj"
    bias: Any = ours.model.get_submodule(o_proj).bias
    merged_o_proj: Any = model.get_submodule(o_proj)
    assert bias is not None and torch.equal(merged_o_proj.bias, bias)
    assert theirs.get_submodule(f"base_model.model.{o_proj}.base_layer").bias is None  # PEFT drops it
    ours_err = _rel(model(input_ids=IDS).logits, unmerged)
    peft_err = _rel(theirs(input_ids=IDS).logits, unmerged)
    assert ours_err <= 0.1  # 4-bit re-quantisation rounds
    assert peft_err > 2 * ours_err, (ours_err, peft_err)  # and PEFT loses the bias too
    with pytest.raises(AttributeError, match="'HQQLinear' object has no attribute 'weight'"):
        theirs.merge_and_unload()


@pytest.mark.parametrize(
    "config",
    [pytest.param(c, marks=() if c == "VeraConfig" else _SLOW) for c, kw in _METHODS if "init_weights" not in kw],
)
def test_torchao_without_get_apply_tensor_subclass_is_refused_at_get_peft_model_like_peft(config: str) -> None:
    """A model quantised by hand (`quantize_`) has no `get_apply_tensor_subclass`: PEFT's generic backend raises
    ValueError when it wraps the layer (LoRA's TorchaoLoraLinear only warns); funcpeft too, naming the module."""
    from funcpeft.testing import tiny_llama

    kwargs = dict(_METHODS[[c for c, _ in _METHODS].index(config)][1])
    model = tiny_llama(seed=0)
    torchao.quantization.quantize_(model.model, torchao.quantization.Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match=r"get_apply_tensor_subclass.*'model.layers.0.self_attn.q_proj'"):
        funcpeft.get_peft_model(model, getattr(funcpeft, config)(**kwargs))
    with pytest.raises(ValueError, match="'get_apply_tensor_subclass' was not provided"):
        peft.get_peft_model(model, getattr(peft, config)(**kwargs))


def test_shira_on_hqq_is_refused_by_layer_where_peft_fails(saved: Path) -> None:
    with pytest.raises(NotImplementedError, match=r"ShiraConfig \(shira\) on 'model.layers.0.self_attn.q_proj'.*hqq"):
        funcpeft.get_peft_model(_hqq(saved), funcpeft.ShiraConfig(r=2, target_modules=AO_TARGETS))
    with pytest.raises(AttributeError, match="'HQQLinear' object has no attribute 'weight'"):  # its random mask_fn
        peft.get_peft_model(_hqq(saved), peft.ShiraConfig(r=2, target_modules=AO_TARGETS))
