"""Quantised (bitsandbytes) bases for the methods beyond LoRA / DoRA / IA3 (tests/test_qlora.py has those), against
PEFT 0.21.2's per-method bnb layers (peft/tuners/<method>/bnb.py) on the same quantised tiny Llama.

One row per (method, quantisation) in ROWS; every test runs on every row, so a method gets its quantised support
checked by adding rows: outputs and every adapter gradient equal PEFT's, parameter counts and
print_trainable_parameters, the base tree holding the quantised weights as they are, files both ways, and merging
(`Row.merge`: "equal" = funcpeft's merged weights equal PEFT's merged weights bit for bit, with PEFT's warning;
"refused" = PEFT cannot merge into such layers and funcpeft refuses too; "peft_broken" = PEFT's bnb merge fails (its
merge or the merged model's forward raises), and funcpeft's merged weights equal PEFT's plain-layer merge arithmetic
applied to the dequantised weight and quantised again: `quantise(dequantise(W) + <method>.layer.Linear.get_delta_weight)`).

The models: a tiny Llama saved once and loaded with transformers' BitsAndBytesConfig (CPU, bitsandbytes 0.50); 4-bit
loads are deep copies of one cached load, 8-bit ones fresh loads (an Int8Params loses its scales in a deep copy).
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from helpers import capture_stdout
from test_qlora import IDS, _load, _loss, _rel  # the bitsandbytes model loads, shared
from test_qlora import _quiet as _quiet  # autouse: bitsandbytes' 8-bit warnings
from test_qlora import saved as saved  # the fixture
from torch import nn

import funcpeft
from funcpeft._quant import dequantize, is_quantised, requantize
from funcpeft.testing import random_like
from funcpeft.testing._peft import copy_into_peft, peft_grads

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test extra (quantised bases)")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, wide-in and tall-in layers (64x64, 32x64, 64x128)

Merge = Literal["equal", "refused", "peft_broken"]


@dataclass(frozen=True)
class Row:
    """One method on one quantisation. config: the config class's name (funcpeft's and PEFT's); kwargs: valid for
    both; bits: "nf4" (4-bit NF4, fp32 compute) or "int8"; merge: see the module docstring."""

    method: str
    config: str
    bits: str
    merge: Merge
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.method}-{self.bits}"


def _rows(
    method: str, config: str, merge: Merge, merge_int8: Merge | None = None, slow_int8: bool = True, **kwargs: Any
) -> list[Any]:
    """The method's rows for 4-bit NF4 and 8-bit (merge_int8: the 8-bit row's merge, when not `merge`; slow_int8:
    the 8-bit row is in the slow tier, as each of its models is a fresh load from disk)."""
    out = []
    for bits in ("nf4", "int8"):
        how = merge_int8 if bits == "int8" and merge_int8 is not None else merge
        row = Row(method, config, bits, how, {"target_modules": TARGETS, **kwargs})
        marks = [pytest.mark.slow] if slow_int8 and bits == "int8" else []
        out.append(pytest.param(row, id=row.id, marks=marks))
    return out


ROWS = [
    *_rows("adalora", "AdaLoraConfig", "refused", init_r=4, target_r=2, total_step=10),
    *_rows("hira", "HiraConfig", "equal", r=4),
    *_rows("pvera", "PveraConfig", "peft_broken", merge_int8="equal", r=4),
    *_rows("randlora", "RandLoraConfig", "peft_broken", r=4),
    *_rows("road", "RoadConfig", "equal", group_size=8),
]


def _pair(path: Path, row: Row) -> tuple[Any, Any, Any]:
    """(funcpeft model, PEFT model, adapter values): the same quantised model twice, the same random adapter."""
    ours = funcpeft.get_peft_model(_load(path, row.bits), getattr(funcpeft, row.config)(**row.kwargs))
    # eval: PEFT's model comes back in training mode here, where PVeRA samples (funcpeft's call without dropout_rng)
    theirs = peft.get_peft_model(_load(path, row.bits), getattr(peft, row.config)(**row.kwargs)).eval()
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    return ours, theirs, adapter


def _dense(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantised weight dequantised (what the model computes with)."""
    modules = dict(model.named_modules())
    return {
        name: dequantize(p, modules[name.rpartition(".")[0]]) for name, p in model.named_parameters() if is_quantised(p)
    }


# -- outputs, gradients, counts --------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_outputs_grads_and_counts_equal_peft(saved: Path, row: Row) -> None:
    ours, theirs, adapter = _pair(saved, row)
    layers = {type(theirs.get_submodule(f"base_model.model.{p}")).__module__ for p in adapter}
    assert layers == {f"peft.tuners.{row.method}.bnb"}  # PEFT really used its bnb layers
    expected = theirs(input_ids=IDS).logits
    _loss(expected).backward()
    value, grads = funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    assert _rel(ours.fn(ours.base, adapter, input_ids=IDS).logits, expected.detach()) <= 1e-5
    assert torch.allclose(value, _loss(expected.detach()), rtol=1e-5)
    want = peft_grads(theirs, adapter, ours.plans["default"])
    assert {p: set(leaves) for p, leaves in grads.items()} == {p: set(leaves) for p, leaves in want.items()}
    for path, leaves in grads.items():
        for name, g in leaves.items():
            assert want[path][name] is not None, (path, name)
            assert _rel(g, want[path][name]) <= 1e-5, (path, name, _rel(g, want[path][name]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert capture_stdout(ours.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)


@pytest.mark.parametrize("row", ROWS)
def test_base_holds_the_quantised_weights_unchanged(saved: Path, row: Row) -> None:
    model = _load(saved, row.bits)
    pm = funcpeft.get_peft_model(model, getattr(funcpeft, row.config)(**row.kwargs))
    packed = {n: p for n, p in model.named_parameters() if is_quantised(p)}
    assert len(packed) == 14  # every linear layer of the two blocks
    before = {n: p.data.clone() for n, p in packed.items()}
    adapter = random_like(pm.adapter, torch.Generator().manual_seed(1))
    _, grads = funcpeft.value_and_grad(lambda a: _loss(pm.fn(pm.base, a, input_ids=IDS, dropout_rng=0).logits))(adapter)
    assert grads.keys() == adapter.keys()
    for name, p in packed.items():
        assert pm.base[name] is p and model.get_parameter(name) is p
        assert not p.requires_grad and p.grad is None and torch.equal(p.data, before[name])


# -- files both ways --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_files_both_ways(saved: Path, tmp_path: Path, row: Row) -> None:
    ours, theirs, adapter = _pair(saved, row)
    expected = ours.fn(ours.base, adapter, input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "ours", adapter)
    loaded = peft.PeftModel.from_pretrained(_load(saved, row.bits), tmp_path / "ours")
    assert _rel(loaded(input_ids=IDS).logits, expected) <= 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    back = funcpeft.from_pretrained(_load(saved, row.bits), tmp_path / "theirs")
    assert _rel(back.fn(back.base, back.adapter, input_ids=IDS).logits, expected) <= 1e-6


# -- merging ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_merge_and_unload_against_peft(saved: Path, row: Row) -> None:
    ours, theirs, adapter = _pair(saved, row)
    ours.fn(ours.base, adapter, input_ids=IDS)  # 8-bit: bitsandbytes moves the row scales into the module on a call
    theirs(input_ids=IDS)
    if row.merge == "refused":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(NotImplementedError):
                theirs.merge_and_unload()
        with pytest.raises(NotImplementedError, match=r"cannot merge into a bitsandbytes 4-bit / 8-bit layer"):
            funcpeft.merge_and_unload(ours, adapter)
        return
    with pytest.warns(UserWarning, match=rf"Merge {row.method} module to 4-bit / 8-bit linear .* rounding errors"):
        merged = funcpeft.merge_and_unload(ours, adapter)
    mine = _dense(merged)
    assert len(mine) == 14 and all(type(merged.get_parameter(n)) is type(ours.base[n]) for n in mine)
    assert all(ours.model.get_parameter(n) is ours.base[n] for n in mine)  # the model and base are untouched
    if row.merge == "equal":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_merged = theirs.merge_and_unload()
        want = _dense(peft_merged)
        assert mine.keys() == want.keys()
        for name in mine:
            assert torch.equal(mine[name], want[name]), name
        assert torch.equal(merged(input_ids=IDS).logits, peft_merged(input_ids=IDS).logits)
    else:  # PEFT's bnb merge fails (see the method's module docstring): its plain layers' merge is the reference
        plain = importlib.import_module(f"peft.tuners.{row.method}.layer").Linear
        for path in adapter:
            layer = theirs.get_submodule(f"base_model.model.{path}")
            weight = ours.base[f"{path}.weight"]
            dense = dequantize(weight, ours.model.get_submodule(path))
            with torch.no_grad():
                expected = dequantize(requantize(weight, dense + plain.get_delta_weight(layer, "default")))
            assert torch.equal(mine[f"{path}.weight"], expected), path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError):
                theirs.merge_and_unload()(input_ids=IDS)


def test_peft_randlora_bnb_delta_is_wrong_on_a_square_layer(saved: Path) -> None:
    """PEFT's randlora.bnb `get_delta_weight` is `first @ second`, its plain layer's `(first^T @ second^T)^T`: on a
    square layer (q_proj, 64 x 64) the bnb one runs and differs from the delta its forward adds (a wrong merge)."""
    row = Row("randlora", "RandLoraConfig", "nf4", "peft_broken", {"target_modules": ["q_proj"], "r": 4})
    ours, theirs, adapter = _pair(saved, row)
    layer = theirs.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        bnb_delta = layer.get_delta_weight("default")
        plain_delta = peft.tuners.randlora.layer.Linear.get_delta_weight(layer, "default")
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
        first, second = layer.get_scaled_bases("default")
        term = F.linear(F.linear(x, first), second) * layer.scaling["default"]  # what its forward adds
    assert bnb_delta.shape == plain_delta.shape == (64, 64)
    assert _rel(x @ plain_delta.T, term) <= 1e-5 and _rel(x @ bnb_delta.T, term) > 0.1
