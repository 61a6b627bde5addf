"""Quantised bases (QLoRA): bitsandbytes Linear4bit (NF4 / FP4, double quantisation, fp32 / bf16 compute) and
Linear8bitLt as LoRA / DoRA targets, against PEFT 0.21.2's `lora.bnb` layers on the same quantised model.

The model is a tiny Llama saved once and loaded through transformers' BitsAndBytesConfig (how PEFT's users and
PEFT's own tests get one; it runs on CPU with bitsandbytes 0.50). funcpeft and PEFT each get their own copy of
the same quantised model (4-bit: deep copies of one load; 8-bit: separate loads of the same file, as an
Int8Params does not survive a deep copy). IA3 is here too (PEFT's ia3.bnb layers).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pytest
import torch
from helpers import LoraKwargs, as_type, capture_stdout
from torch import nn

import funcpeft
from funcpeft.testing import random_like
from funcpeft.testing._peft import copy_into_peft, peft_grads

if TYPE_CHECKING:  # the installed packages' own types (importorskip's module is untyped)
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM
else:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test extra (quantised bases)")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


class IA3Kwargs(TypedDict):
    """`IA3Config(**kw)` keyword arguments of funcpeft and PEFT alike."""

    target_modules: list[str]
    feedforward_modules: list[str]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float Llama on disk (with a bias-free and a biased layer: Llama has none, so o_proj gets one)."""
    from funcpeft.testing import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    return path


def _load(
    path: Path, bits: str = "nf4", compute: torch.dtype = torch.float32, double: bool = False
) -> LlamaForCausalLM:
    """A fresh quantised load of the saved model: a deep copy of one cached load for 4-bit (as PEFT's own tests
    copy 4-bit models), a new load for 8-bit (an Int8Params loses its scales in a deep copy)."""
    if bits == "int8":
        return _from_disk(path, bits, compute, double)
    return copy.deepcopy(_cached(path, bits, compute, double))


@functools.lru_cache(maxsize=8)
def _cached(path: Path, bits: str, compute: torch.dtype, double: bool) -> LlamaForCausalLM:
    return _from_disk(path, bits, compute, double)


def _from_disk(path: Path, bits: str, compute: torch.dtype, double: bool) -> LlamaForCausalLM:
    if bits == "int8":
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=bits,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=double,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    return model.eval()


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _quant_state(weight: bnb.nn.Params4bit) -> bnb.functional.QuantState:
    """A 4-bit weight's quantisation state (absmax, blocksize, nesting), present once the weight is quantised."""
    assert weight.quant_state is not None, "a Params4bit without a quant_state: not quantised"
    return weight.quant_state


def _pair(path: Path, config: LoraKwargs, **load: Any) -> tuple[Any, Any, Any]:
    """(funcpeft model, PEFT model, adapter values): the same quantised model twice, the same random adapter."""
    ours = funcpeft.get_peft_model(_load(path, **load), funcpeft.LoraConfig(**config))
    theirs = peft.get_peft_model(_load(path, **load), peft.LoraConfig(**config))
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    return ours, theirs, adapter


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().pow(2).mean()


def _assert_equal_peft(ours: Any, theirs: Any, adapter: Any, tol: float = 1e-5) -> None:
    """Outputs and every adapter gradient within `tol` relative (max |diff| / max |PEFT's|)."""
    expected = theirs(input_ids=IDS).logits
    _loss(expected).backward()
    got, grads = funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    assert _rel(ours.fn(ours.base, adapter, input_ids=IDS).logits, expected.detach()) <= tol
    assert torch.allclose(got, _loss(expected.detach()), rtol=tol)
    want = peft_grads(theirs, adapter, ours.plans["default"])
    for path, leaves in grads.items():
        for name, g in leaves.items():
            assert want[path][name] is not None, (path, name)
            assert _rel(g, want[path][name]) <= tol, (path, name, _rel(g, want[path][name]))


# -- LoRA and DoRA equal PEFT's bnb layers ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "load",
    [
        {"bits": "nf4"},
        {"bits": "fp4"},
        {"bits": "nf4", "double": True},
        {"bits": "nf4", "compute": torch.bfloat16},
        {"bits": "fp4", "double": True, "compute": torch.bfloat16},
        {"bits": "int8"},
    ],
    ids=["nf4", "fp4", "nf4-double", "nf4-bf16", "fp4-double-bf16", "int8"],
)
def test_qlora_outputs_grads_and_counts_equal_peft(saved: Path, load: dict[str, Any]) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    ours, theirs, adapter = _pair(saved, config, **load)
    assert {type(theirs.get_submodule(f"base_model.model.{p}")).__module__ for p in adapter} == {
        "peft.tuners.lora.bnb"
    }  # PEFT really used its bnb layers
    _assert_equal_peft(ours, theirs, adapter)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert capture_stdout(ours.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)


@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_qdora_equals_peft(saved: Path, bits: str) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    ours, theirs, adapter = _pair(saved, config, bits=bits)
    fresh = peft.get_peft_model(_load(saved, bits=bits), peft.LoraConfig(**config))
    mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
    init = ours.adapter["model.layers.0.self_attn.q_proj"]["lora_magnitude_vector"]  # ||W_dequantised||_row
    assert _rel(init, dict(fresh.named_parameters())[mag].detach()) <= 1e-6
    _assert_equal_peft(ours, theirs, adapter)


def test_lora_bias_equals_peft(saved: Path) -> None:
    """lora_bias=True on quantised layers (lora_B's bias, added after the layer's own kernel)."""
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True)
    ours, theirs, adapter = _pair(saved, config)
    _assert_equal_peft(ours, theirs, adapter)


# -- the base tree holds the quantised weights as they are; nothing weight-sized per call ----------------------
def test_base_holds_the_quantised_weights_unchanged(saved: Path) -> None:
    model = _load(saved, double=True)
    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            assert pm.base[name] is p and not p.requires_grad and p.quant_state is not None
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    weight = as_type(q.weight, bnb.nn.Params4bit)
    before = (weight.data.clone(), _quant_state(weight).absmax.clone())
    funcpeft.value_and_grad(lambda a: _loss(pm.fn(pm.base, a, input_ids=IDS, dropout_rng=0).logits))(pm.adapter)
    assert q.weight is weight and weight is pm.base["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(weight.data, before[0]) and torch.equal(_quant_state(weight).absmax, before[1])
    assert q.weight.grad is None and not q.weight.requires_grad


def _dequantisations(step: Any) -> int:
    """How many 4-bit dequantisations bitsandbytes runs in `step` (its ops, as the profiler records them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.name == "bitsandbytes::dequantize_4bit" for e in prof.events())


def test_no_weight_is_dequantised_beyond_the_kernels_own(saved: Path) -> None:
    """A QLoRA training step dequantises exactly what PEFT's does (the 4-bit matmul's own forward and backward
    dequantisation), and a forward exactly what the bare quantised model does: funcpeft adds none."""
    config: LoraKwargs = dict(r=4, target_modules=TARGETS)
    ours, theirs, adapter = _pair(saved, config)
    bare = _load(saved)
    n_bare = _dequantisations(lambda: bare(input_ids=IDS))
    assert n_bare == 14  # one per quantised layer (2 x 7)
    assert _dequantisations(lambda: ours.fn(ours.base, adapter, input_ids=IDS)) == n_bare
    n_peft = _dequantisations(lambda: _loss(theirs(input_ids=IDS).logits).backward())
    n_ours = _dequantisations(
        lambda: funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    )
    assert n_ours == n_peft > n_bare


def test_peak_memory_of_a_step_is_peft_s(saved: Path) -> None:
    """The profiler's peak CPU allocation of a QLoRA training step is at most PEFT's (+2 %)."""
    from torch.profiler import ProfilerActivity, profile

    config: LoraKwargs = dict(r=4, target_modules=TARGETS)
    ours, theirs, adapter = _pair(saved, config)

    def peak(step: Any) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        live, top = 0, 0
        for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += ev.cpu_memory_usage
            top = max(top, live)
        return top

    ours_peak = peak(
        lambda: funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    )
    theirs_peak = peak(lambda: _loss(theirs(input_ids=IDS).logits).backward())
    assert ours_peak <= 1.02 * theirs_peak, (ours_peak, theirs_peak)


# -- files both ways --------------------------------------------------------------------------------------------
def test_files_both_ways(saved: Path, tmp_path: Path) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    ours, theirs, adapter = _pair(saved, config)
    ours.save_pretrained(tmp_path / "ours", adapter)
    loaded = peft.PeftModel.from_pretrained(_load(saved), tmp_path / "ours")
    expected = ours.fn(ours.base, adapter, input_ids=IDS).logits
    assert _rel(loaded(input_ids=IDS).logits, expected) <= 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    back = funcpeft.from_pretrained(_load(saved), tmp_path / "theirs")
    assert _rel(back.fn(back.base, back.adapter, input_ids=IDS).logits, expected) <= 1e-6


# -- merging ---------------------------------------------------------------------------------------------------
def _dense(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantised weight dequantised (what the merged model computes with)."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            out[name] = bnb.functional.dequantize_4bit(p.data, p.quant_state)
    return out


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unload_equals_peft(saved: Path, dora: bool) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora)
    ours, theirs, adapter = _pair(saved, config, double=True)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged = funcpeft.merge_and_unload(ours, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = theirs.merge_and_unload()
    mine, want = _dense(merged), _dense(peft_merged)
    assert mine.keys() == want.keys() and len(mine) == 14  # every linear layer is 4-bit
    for name in mine:
        assert torch.equal(mine[name], want[name]), name
    q = merged.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, bnb.nn.Linear4bit) and isinstance(q.weight, bnb.nn.Params4bit)
    assert (
        _quant_state(q.weight).nested
        == _quant_state(as_type(ours.base["model.layers.0.self_attn.q_proj.weight"], bnb.nn.Params4bit)).nested
    )
    assert torch.equal(merged(input_ids=IDS).logits, peft_merged(input_ids=IDS).logits)
    # the original model and base are untouched
    orig = ours.model.model.layers[0].self_attn.q_proj.weight
    assert ours.base["model.layers.0.self_attn.q_proj.weight"] is orig and orig is not q.weight


def test_merge_unmerge_round_trip_equals_peft(saved: Path) -> None:
    """funcpeft.merge then unmerge of a 4-bit base: PEFT's merge_adapter / unmerge_adapter (two roundings)."""
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    ours, theirs, adapter = _pair(saved, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = funcpeft.merge(ours, ours.base, adapter)
        theirs.merge_adapter()
        assert torch.equal(ours.fn(merged, None, input_ids=IDS).logits, theirs(input_ids=IDS).logits)
        back = funcpeft.unmerge(ours, merged, adapter)
        theirs.unmerge_adapter()
    name = "model.layers.1.mlp.down_proj.weight"
    peft_w = theirs.get_submodule("base_model.model.model.layers.1.mlp.down_proj.base_layer").weight
    weight = as_type(back[name], bnb.nn.Params4bit)
    got = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(got, bnb.functional.dequantize_4bit(peft_w.data, peft_w.quant_state))


def test_int8_merge_and_unload_equals_peft(saved: Path) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    ours, theirs, adapter = _pair(saved, config, bits="int8")
    ours.fn(ours.base, adapter, input_ids=IDS)  # funcpeft's call leaves the row scales on the weight
    theirs(input_ids=IDS)  # PEFT's moves them into the module's state (bitsandbytes' init_8bit_state)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged = funcpeft.merge_and_unload(ours, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = theirs.merge_and_unload()
    assert torch.equal(merged(input_ids=IDS).logits, peft_merged(input_ids=IDS).logits)


# -- prepare_model_for_kbit_training and a checkpointed QLoRA step ----------------------------------------------
def test_prepare_model_for_kbit_training_changes_what_peft_changes(saved: Path) -> None:
    ours, theirs = _load(saved), _load(saved)
    for m in (ours, theirs):  # a half-precision norm / head, as bf16 checkpoints give
        m.model.norm.to(torch.bfloat16)
        m.lm_head.to(torch.float16)
    assert funcpeft.prepare_model_for_kbit_training(ours) is ours
    peft.prepare_model_for_kbit_training(theirs)
    mine, want = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert {n: (type(p), p.dtype, p.requires_grad) for n, p in mine.items()} == {
        n: (type(p), p.dtype, p.requires_grad) for n, p in want.items()
    }
    assert mine["model.norm.weight"].dtype == torch.float32 and not mine["lm_head.weight"].requires_grad
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    hooks = [len(m.get_input_embeddings()._forward_hooks) for m in (ours, theirs)]
    assert hooks[0] == hooks[1] > 0
    plain = _load(saved)
    funcpeft.prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False)
    assert not plain.is_gradient_checkpointing and not plain.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["default", "non-reentrant"])
def test_checkpointed_qlora_step_equals_peft(saved: Path, kwargs: dict[str, Any] | None) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    ours_model, theirs_model = _load(saved), _load(saved)
    funcpeft.prepare_model_for_kbit_training(ours_model, gradient_checkpointing_kwargs=kwargs)
    peft.prepare_model_for_kbit_training(theirs_model, gradient_checkpointing_kwargs=kwargs)
    ours = funcpeft.get_peft_model(ours_model, funcpeft.LoraConfig(**config))
    theirs = peft.get_peft_model(theirs_model, peft.LoraConfig(**config)).train()
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    calls = {"ours": 0, "theirs": 0}
    for who, m in (("ours", ours_model), ("theirs", theirs_model)):
        m.get_submodule("model.layers.0.mlp").register_forward_pre_hook(
            lambda *_, who=who: calls.__setitem__(who, calls[who] + 1)
        )
    _loss(theirs(input_ids=IDS).logits).backward()
    # dropout_rng: training mode, where transformers checkpoints (PEFT's model.train())
    _, grads = funcpeft.value_and_grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS, dropout_rng=0).logits))(
        adapter
    )
    assert calls == {"ours": 2, "theirs": 2}  # forward + the recompute in backward: checkpointing really ran
    want = peft_grads(theirs, adapter, ours.plans["default"])
    for path, leaves in grads.items():
        for name, g in leaves.items():
            assert _rel(g, want[path][name]) <= 1e-5, (path, name)


# -- what is refused --------------------------------------------------------------------------------------------
def test_other_methods_on_quantised_layers_are_refused_by_name_and_type(saved: Path) -> None:
    with pytest.raises(
        NotImplementedError, match=r"LoHaConfig \(loha\) on 'model.layers.0.self_attn.q_proj'.*Linear4bit"
    ):
        funcpeft.get_peft_model(_load(saved), funcpeft.LoHaConfig(r=2, target_modules=["q_proj"]))


def test_weight_reading_inits_are_refused_on_quantised_layers(saved: Path) -> None:
    with pytest.raises(NotImplementedError, match=r"init_lora_weights='pissa'.*q_proj.*Linear4bit"):
        funcpeft.get_peft_model(
            _load(saved), funcpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
        )


def test_int8_weight_with_another_module_s_scales_is_refused(saved: Path) -> None:
    """bitsandbytes moves an Int8Params' scales into its module on the first call: a base tree holding another
    weight for that module would silently compute with the wrong scales."""
    ours = funcpeft.get_peft_model(_load(saved, bits="int8"), funcpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    ours.fn(ours.base, ours.adapter, input_ids=IDS)
    other = _load(saved, bits="int8")
    other(input_ids=IDS)  # its weights' scales now live in its own modules
    key = "model.layers.0.self_attn.q_proj.weight"
    swapped = {**ours.base, key: other.get_parameter(key)}
    with pytest.raises(RuntimeError, match=r"'model.layers.0.self_attn.q_proj'.*Int8Params.*scales"):
        ours.fn(swapped, ours.adapter, input_ids=IDS)


def test_a_merged_int8_tree_writes_nothing_into_the_model(saved: Path) -> None:
    """A call with another 8-bit weight (here a merged base tree) must not move its row scales into the model's
    module state: the model then silently computed with the merged weight, and its own weight no longer ran."""
    model, reference = _load(saved, bits="int8"), _load(saved, bits="int8")
    ours = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, target_modules=TARGETS))
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    before = ours.fn(ours.base, adapter, input_ids=IDS).logits
    with pytest.warns(UserWarning, match="rounding errors"):
        merged = funcpeft.merge(ours, ours.base, adapter)
    zero = {p: {n: torch.zeros_like(t) for n, t in leaves.items()} for p, leaves in adapter.items()}
    merged_out = ours.fn(merged, zero, input_ids=IDS).logits
    assert _rel(merged_out, before) < 0.05  # the merged weight really ran (int8 rounding apart)
    assert torch.equal(ours.fn(ours.base, adapter, input_ids=IDS).logits, before)
    assert torch.equal(ours.fn(merged, zero, input_ids=IDS).logits, merged_out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)


@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_a_dequantised_base_tree_is_refused_by_name(saved: Path, bits: str) -> None:
    """A float (out, in) weight where the packed one goes: bitsandbytes failed with a bare AssertionError, a
    shape error or "no attribute 'CB'" (torchao layers take it: tests/test_qlora_backends.py)."""
    model = _load(saved, bits=bits)
    ours = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, target_modules=TARGETS))
    key = "model.layers.0.self_attn.q_proj.weight"
    dense = {**ours.base, key: peft.utils.integrations.dequantize_module_weight(model.get_submodule(key[:-7])).float()}
    match = r"'model.layers.0.self_attn.q_proj' \(Linear(4bit|8bitLt)\).*plain torch.float32 weight of shape \(64, 64\)"
    with pytest.raises(TypeError, match=match):
        ours.fn(dense, ours.adapter, input_ids=IDS)
    with pytest.raises(TypeError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        funcpeft.merge(ours, dense, ours.adapter)


def test_modules_to_save_on_a_quantised_layer_is_refused_by_name(saved: Path) -> None:
    """PEFT fails with torch's bare 'only Tensors of floating point dtype can require gradients'."""
    config: LoraKwargs = dict(r=4, target_modules=["q_proj"], modules_to_save=["v_proj"])
    with pytest.raises(RuntimeError, match="floating point dtype"):
        peft.get_peft_model(_load(saved), peft.LoraConfig(**config))
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn.v_proj'.*bitsandbytes-quantised.*Linear4bit"):
        funcpeft.get_peft_model(_load(saved), funcpeft.LoraConfig(**config))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_per_example_adapters_on_quantised_layers(saved: Path, dora: bool) -> None:
    """Per-example routing over a 4-bit base: each example's output is that example run with its own adapter."""
    pm = funcpeft.get_peft_model(_load(saved), funcpeft.LoraConfig(r=4, target_modules=TARGETS, use_dora=dora))
    trees = [random_like(pm.adapter, torch.Generator().manual_seed(s)) for s in (1, 2)]
    routed = pm.fn(pm.base, funcpeft.per_example(funcpeft.stack_adapters(trees), [1, 0]), input_ids=IDS).logits
    for i, k in enumerate([1, 0]):
        alone = pm.fn(pm.base, trees[k], input_ids=IDS[i : i + 1]).logits
        assert _rel(routed[i : i + 1], alone) <= 1e-5


@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_ia3_equals_peft_and_its_merge_is_refused_like_peft(saved: Path, bits: str) -> None:
    """IA3 on quantised layers (PEFT's ia3.bnb): output scaling and feed-forward input scaling; PEFT refuses to
    merge IA3 into a k-bit model, and so does funcpeft."""
    config = IA3Kwargs(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours = funcpeft.get_peft_model(_load(saved, bits=bits), funcpeft.IA3Config(**config))
    theirs = peft.get_peft_model(_load(saved, bits=bits), peft.IA3Config(**config))
    assert (
        type(theirs.get_submodule("base_model.model.model.layers.0.mlp.down_proj")).__module__ == "peft.tuners.ia3.bnb"
    )
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    _assert_equal_peft(ours, theirs, adapter)
    assert capture_stdout(ours.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)
    with pytest.raises(ValueError, match=r"Cannot merge ia3 layers when the model is loaded in (4|8)-bit mode"):
        theirs.merge_and_unload()
    with pytest.raises(ValueError, match="Cannot merge ia3 layers when the model is loaded in 4-bit / 8-bit mode"):
        funcpeft.merge_and_unload(ours, adapter)
