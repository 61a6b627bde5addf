"""torchao and HQQ quantised bases as LoRA / DoRA targets, against PEFT 0.21.2's `TorchaoLoraLinear` and
`HqqLoraLinear` on the same quantised model (tests/test_qlora.py does bitsandbytes).

torchao: a tiny Llama saved once and loaded through transformers' TorchAoConfig(Int8WeightOnlyConfig()) (how
PEFT's users get one, and the only way PEFT can re-quantise after a merge: `get_apply_tensor_subclass`).
HQQ: transformers 5.25 cannot load HQQ models ("not available yet"), so the float model's linears are replaced by
`hqq.core.quantize.HQQLinear` layers, as hqq's own API does (o_proj gets a bias: Llama has none).

Where PEFT is wrong, the tests show it and funcpeft keeps the maths: PEFT's torchao merge adds the plain LoRA
delta for DoRA too (the magnitude is dropped: its merged model leaves its own unmerged outputs), and its HQQ
merge builds the new HQQLinear without the layer's bias.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import LoraKwargs, capture_stdout
from torch import nn

import funcpeft
from funcpeft.testing import random_like, tiny_llama
from funcpeft.testing._peft import copy_into_peft, peft_grads

torchao = pytest.importorskip("torchao", reason="torchao is a test extra (quantised bases)")
hqq_quantize = pytest.importorskip("hqq.core.quantize", reason="hqq is a test extra (quantised bases)")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        warnings.filterwarnings("ignore", message=".*may get different generations due to rounding.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    return path


def _torchao(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh load of the saved model with int8 weights (torchao Int8Tensor), as transformers makes it."""
    config = transformers.TorchAoConfig(torchao.quantization.Int8WeightOnlyConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=dtype, device_map="cpu"
        )
    return model.eval()


def _hqq(path: Path, dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Module:
    """The saved model with its TARGETS replaced by 4-bit HQQLinear layers (group 16); o_proj with a bias."""
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    config = hqq_quantize.BaseQuantizeConfig(nbits=4, group_size=16)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            leaf = name.rpartition(".")[2]
            if leaf not in TARGETS:
                continue
            if bias and leaf == "o_proj":
                biased = nn.Linear(module.in_features, module.out_features, bias=True, dtype=dtype)
                biased.weight.copy_(module.weight)
                biased.bias.copy_(torch.randn(module.out_features, generator=torch.Generator().manual_seed(7)))
                module = biased
            layer = hqq_quantize.HQQLinear(module, config, compute_dtype=dtype, device="cpu")
            model.set_submodule(name, layer)
    return model


LOADERS = {"torchao": _torchao, "hqq": _hqq}


def _pair(path: Path, backend: str, config: LoraKwargs, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Any]:
    ours = funcpeft.get_peft_model(LOADERS[backend](path, dtype), funcpeft.LoraConfig(**config))
    theirs = peft.get_peft_model(LOADERS[backend](path, dtype), peft.LoraConfig(**config))
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    return ours, theirs, adapter


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        (a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max().clamp_min(1e-30)
    )


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().pow(2).mean()


# -- outputs, every gradient, counts --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("backend", ["torchao", "hqq"])
def test_outputs_grads_and_counts_equal_peft(saved: Path, backend: str, dora: bool, dtype: torch.dtype) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora)
    ours, theirs, adapter = _pair(saved, backend, config, dtype)
    kind = "TorchaoLoraLinear" if backend == "torchao" else "HqqLoraLinear"
    assert type(theirs.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__name__ == kind
    expected = theirs(input_ids=IDS).logits
    got = ours.fn(ours.base, adapter, input_ids=IDS).logits
    assert got.dtype == expected.dtype
    # bf16 DoRA: funcpeft computes f * (result - bias + s B A x) + bias, PEFT result + (f - 1) * (result - bias)
    # + f * s B A x: the same sum rounded in another order (one bf16 step); LoRA is bitwise PEFT's in bf16
    assert _rel(got, expected) <= (1e-6 if dtype == torch.float32 else 8e-3 if dora else 0.0)
    grads = torch.func.grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    _loss(expected).backward()
    want = peft_grads(theirs, adapter, ours.plans["default"])
    # bf16: relative to the largest gradient of the tree (a layer whose gradients are ~1e-10 of the others' is
    # all rounding noise there); fp32: relative to each leaf's own
    scale = max(float(w.detach().float().abs().max()) for leaves in want.values() for w in leaves.values())
    for path, leaves in grads.items():
        for name, g in leaves.items():
            w = want[path][name]
            assert w is not None, (path, name)
            if dtype == torch.float32:
                assert _rel(g, w) <= 2e-5, (path, name, _rel(g, w))
            else:
                assert float((g.float() - w.float()).abs().max()) <= 2e-2 * scale, (path, name)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert capture_stdout(ours.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)


@pytest.mark.parametrize("backend", ["torchao", "hqq"])
def test_base_holds_the_quantised_weights_as_they_are(saved: Path, backend: str) -> None:
    model = LOADERS[backend](saved)
    ours = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=TARGETS))
    layer: Any = model.get_submodule("model.layers.0.self_attn.q_proj")
    leaf: Any
    if backend == "torchao":
        leaf = ours.base["model.layers.0.self_attn.q_proj.weight"]
        assert type(leaf) is type(layer.weight) and type(leaf).__name__ == "Int8Tensor"
        assert leaf.qdata.data_ptr() == layer.weight.qdata.data_ptr()  # the same int8 codes: nothing copied
    else:
        leaf = ours.base["model.layers.0.self_attn.q_proj.W_q"]
        assert leaf.dtype == torch.uint8 and leaf.data_ptr() == layer.W_q.data_ptr()
        assert "model.layers.0.self_attn.q_proj.weight" not in ours.base
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))

    def plain(t: torch.Tensor) -> torch.Tensor:  # an Int8Tensor's codes (it has no aten.equal / clone of its own)
        return (t.qdata if hasattr(t, "qdata") else t).detach().clone()

    before = {k: plain(v) for k, v in model.named_parameters()}
    torch.func.grad(lambda a: _loss(ours.fn(ours.base, a, input_ids=IDS).logits))(adapter)
    assert all(torch.equal(before[k], plain(v)) for k, v in model.named_parameters())  # the model is never written


# -- files ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torchao", "hqq"])
def test_files_both_ways(saved: Path, backend: str, tmp_path: Path) -> None:
    config: LoraKwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    ours, theirs, adapter = _pair(saved, backend, config)
    expected = ours.fn(ours.base, adapter, input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "ours", adapter)
    loaded = peft.PeftModel.from_pretrained(LOADERS[backend](saved), tmp_path / "ours")
    assert _rel(loaded(input_ids=IDS).logits, expected) <= 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    back = funcpeft.from_pretrained(LOADERS[backend](saved), tmp_path / "theirs")
    assert _rel(back.fn(back.base, back.adapter, input_ids=IDS).logits, expected) <= 1e-6


# -- merging: torchao -----------------------------------------------------------------------------------------
def test_torchao_lora_merge_and_unload_equals_peft(saved: Path) -> None:
    ours, theirs, adapter = _pair(saved, "torchao", dict(r=4, lora_alpha=8, target_modules=TARGETS))
    unmerged = ours.fn(ours.base, adapter, input_ids=IDS).logits
    with pytest.warns(UserWarning, match="rounding"):
        merged = funcpeft.merge_and_unload(ours, adapter)
    theirs_merged = theirs.merge_and_unload()
    for name, p in merged.named_parameters():
        q = theirs_merged.get_parameter(name)
        assert type(p) is type(q) or type(p.data) is type(q.data), name
        if type(q).__name__ == "Int8Tensor" or type(q.data).__name__ == "Int8Tensor":
            assert torch.equal(p.dequantize(), q.dequantize()), name  # re-quantised alike, bit for bit
        else:
            assert torch.equal(p, q), name
    assert type(merged.get_parameter("model.layers.0.self_attn.q_proj.weight")).__name__ == "Int8Tensor"
    out = merged(input_ids=IDS).logits
    assert _rel(out, theirs_merged(input_ids=IDS).logits) == 0.0
    assert _rel(out, unmerged) <= 2e-2  # re-quantising the merged weight in int8 rounds


def test_torchao_merge_tree_and_unmerge(saved: Path) -> None:
    ours, _, adapter = _pair(saved, "torchao", dict(r=4, lora_alpha=8, target_modules=TARGETS))
    with pytest.warns(UserWarning, match="rounding"):
        merged = funcpeft.merge(ours, ours.base, adapter)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert type(merged[key]).__name__ == "Int8Tensor" and merged[key] is not ours.base[key]
    assert merged["model.embed_tokens.weight"] is ours.base["model.embed_tokens.weight"]
    expected = ours.fn(ours.base, adapter, input_ids=IDS).logits
    assert _rel(ours.fn(merged, None, input_ids=IDS).logits, expected) <= 2e-2
    with pytest.warns(UserWarning, match="rounding"):
        back = funcpeft.unmerge(ours, merged, adapter)
    assert _rel(back[key].dequantize(), ours.base[key].dequantize()) <= 2e-2


def test_torchao_merge_into_a_dequantised_base_tree_stays_float(saved: Path) -> None:
    """A base tree whose int8 weights were replaced by their float values (the user's choice) merges as floats:
    the quantised layers' merge does not mistake a plain tensor for packed data."""
    ours, _, adapter = _pair(saved, "torchao", dict(r=4, lora_alpha=8, target_modules=TARGETS))
    dense = {k: v.dequantize() if type(v).__name__ == "Int8Tensor" else v for k, v in ours.base.items()}
    with pytest.warns(UserWarning, match="rounding"):
        merged = funcpeft.merge(ours, dense, adapter)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert type(merged[key]) is torch.Tensor
    expected = ours.fn(dense, adapter, input_ids=IDS).logits
    assert _rel(ours.fn(merged, None, input_ids=IDS).logits, expected) <= 1e-5


def test_torchao_dora_merge_keeps_the_magnitude_where_peft_drops_it(saved: Path) -> None:
    """PEFT's TorchaoLoraLinear.merge adds `get_delta_weight` (s B A) for every adapter, DoRA's too: its merged
    model loses the magnitude rescaling and leaves its own unmerged outputs far behind. funcpeft merges
    `m / ||W + s B A|| * (W + s B A)` (DoRA's merge, as PEFT's plain and bnb DoRA layers do)."""
    ours, theirs, adapter = _pair(saved, "torchao", dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    unmerged = theirs(input_ids=IDS).logits.detach()
    assert _rel(ours.fn(ours.base, adapter, input_ids=IDS).logits, unmerged) <= 1e-6
    merged = funcpeft.merge_and_unload(ours, adapter)(input_ids=IDS).logits
    theirs_merged = theirs.merge_and_unload()(input_ids=IDS).logits
    ours_err, theirs_err = _rel(merged, unmerged), _rel(theirs_merged, unmerged)
    assert ours_err <= 2e-2  # int8 rounding only
    assert theirs_err > 20 * ours_err, (ours_err, theirs_err)


def test_torchao_merge_without_a_transformers_config_is_refused_like_peft(saved: Path) -> None:
    model = tiny_llama(seed=0)
    torchao.quantization.quantize_(model.model, torchao.quantization.Int8WeightOnlyConfig())
    ours = funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=TARGETS))
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    assert torch.isfinite(ours.fn(ours.base, adapter, input_ids=IDS).logits).all()  # forward and training work
    with pytest.raises(ValueError, match="get_apply_tensor_subclass.*TorchAoConfig"):
        funcpeft.merge(ours, ours.base, adapter)
    theirs = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="get_apply_tensor_subclass"):
        theirs.merge_adapter()


# -- merging: HQQ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_hqq_merge_and_unload_equals_peft_except_the_bias_peft_drops(saved: Path, dora: bool) -> None:
    ours, theirs, adapter = _pair(saved, "hqq", dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora))
    unmerged = ours.fn(ours.base, adapter, input_ids=IDS).logits
    with pytest.warns(UserWarning, match="rounding"):
        merged = funcpeft.merge_and_unload(ours, adapter)
    theirs_merged = theirs.merge_and_unload()
    for name, layer in merged.named_modules():
        if isinstance(layer, hqq_quantize.HQQLinear):
            other = theirs_merged.get_submodule(name)
            assert isinstance(other, hqq_quantize.HQQLinear), name
            assert layer is not ours.fn.model.get_submodule(name)  # a new layer, as PEFT's merge makes
            assert torch.equal(layer.dequantize(), other.dequantize()), name  # re-quantised alike
    o_proj = "model.layers.0.self_attn.o_proj"
    assert merged.get_submodule(o_proj).bias is not None
    assert theirs_merged.get_submodule(o_proj).bias is None  # PEFT's HQQ merge: HQQLinear(None, ...) has no bias
    assert ours.fn.model.get_submodule(o_proj).bias is not None  # the model is untouched
    assert _rel(merged(input_ids=IDS).logits, unmerged) <= 0.1  # 4-bit re-quantisation rounds
    peft_err = _rel(theirs_merged(input_ids=IDS).logits, unmerged)
    assert peft_err > 5 * _rel(merged(input_ids=IDS).logits, unmerged)  # the lost bias


def test_hqq_merge_and_unload_without_bias_equals_peft_exactly(saved: Path) -> None:
    ours = funcpeft.get_peft_model(_hqq(saved, bias=False), funcpeft.LoraConfig(target_modules=TARGETS))
    theirs = peft.get_peft_model(_hqq(saved, bias=False), peft.LoraConfig(target_modules=TARGETS))
    adapter = random_like(ours.adapter, torch.Generator().manual_seed(1))
    copy_into_peft(theirs, adapter, ours.plans["default"])
    merged = funcpeft.merge_and_unload(ours, adapter)(input_ids=IDS).logits
    assert torch.equal(merged, theirs.merge_and_unload()(input_ids=IDS).logits)


def test_hqq_tree_merge_is_refused_with_the_reason(saved: Path) -> None:
    ours, _, adapter = _pair(saved, "hqq", dict(target_modules=TARGETS))
    with pytest.raises(NotImplementedError, match=r"HQQ-quantised layer \(HQQLinear\).*merge_and_unload"):
        funcpeft.merge(ours, ours.base, adapter)
    with pytest.raises(NotImplementedError, match="HQQ"):
        funcpeft.unmerge(ours, ours.base, adapter)


# -- what is refused ------------------------------------------------------------------------------------------
def test_hqq_base_tree_with_another_layer_s_w_q_is_refused(saved: Path) -> None:
    """HQQ decodes W_q with the scales and zeros on its module (`meta`): another layer's W_q of the same shape ran
    silently with this layer's scales (neither layer's weight). torchao / bitsandbytes weights carry their own
    scales: a swapped weight runs as that weight."""
    ours = funcpeft.get_peft_model(_hqq(saved), funcpeft.LoraConfig(target_modules=TARGETS))
    key = "model.layers.0.self_attn.q_proj.W_q"
    swapped = {**ours.base, key: ours.base[key.replace("layers.0", "layers.1")]}
    assert swapped[key].shape == ours.base[key].shape
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' \(HQQLinear\).*W_q.*not this layer's own"):
        ours.fn(swapped, ours.adapter, input_ids=IDS)
    ours.fn(ours.base, ours.adapter, input_ids=IDS)  # its own still runs


def test_modules_to_save_on_a_torchao_layer_is_refused_where_peft_trains_nothing(saved: Path) -> None:
    config: LoraKwargs = dict(r=4, target_modules=["q_proj"], modules_to_save=["v_proj"])
    theirs = peft.get_peft_model(_torchao(saved), peft.LoraConfig(**config))
    _loss(theirs(input_ids=IDS).logits).backward()
    copy = theirs.get_submodule("base_model.model.model.layers.0.self_attn.v_proj.modules_to_save.default")
    assert copy.weight.requires_grad and copy.weight.grad is None  # PEFT: a "trainable" copy that never learns
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn.v_proj'.*torchao-quantised"):
        funcpeft.get_peft_model(_torchao(saved), funcpeft.LoraConfig(**config))


@pytest.mark.parametrize("backend", ["torchao", "hqq"])
def test_lora_bias_is_refused_like_peft(saved: Path, backend: str) -> None:
    cls = "TorchaoLoraLinear" if backend == "torchao" else "HqqLoraLinear"
    with pytest.raises(ValueError, match=f"{cls} does not support lora_bias.*'model.layers.0.self_attn.q_proj'"):
        funcpeft.get_peft_model(LOADERS[backend](saved), funcpeft.LoraConfig(target_modules=TARGETS, lora_bias=True))
    with pytest.raises(ValueError, match=f"{cls} does not support lora_bias"):
        peft.get_peft_model(LOADERS[backend](saved), peft.LoraConfig(target_modules=TARGETS, lora_bias=True))


def test_int4_torchao_weights_are_refused_like_peft() -> None:
    """PEFT's TorchaoLoraLinear takes int8 weights only (Int4Tensor: TypeError). torchao's int4 quantiser needs
    the `mslk` kernels (not on this CPU), so the weight is built from its parts."""
    layer = nn.Linear(32, 16, bias=False)
    weight = torchao.quantization.Int4Tensor(
        torch.zeros(16, 16, dtype=torch.uint8),
        torch.ones(1, 16),
        torch.zeros(1, 16),
        [1, 32],
        torch.Size([16, 32]),
    )
    layer.weight = nn.Parameter(weight, requires_grad=False)
    model = nn.Sequential(layer)
    with pytest.raises(TypeError, match="only supports int8 weights.*'0'.*Int4Tensor"):
        funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("backend", ["torchao", "hqq"])
def test_other_methods_are_refused_by_layer_and_library(saved: Path, backend: str) -> None:
    with pytest.raises(NotImplementedError, match=rf"on 'model.layers.0.self_attn.q_proj'.*\({backend} quant_linear"):
        funcpeft.get_peft_model(LOADERS[backend](saved), funcpeft.IA3Config(target_modules=TARGETS))


@pytest.mark.parametrize("backend", ["torchao", "hqq"])
def test_weight_reading_inits_are_refused(saved: Path, backend: str) -> None:
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa' on the quantised layer"):
        funcpeft.get_peft_model(
            LOADERS[backend](saved), funcpeft.LoraConfig(target_modules=TARGETS, init_lora_weights="pissa")
        )


# -- functional transforms ------------------------------------------------------------------------------------
@pytest.fixture
def hqq_pytorch_backend() -> Iterator[None]:
    """HQQ's plain-PyTorch forward (`HQQBackend.PYTORCH_FORWARD`: no autograd.Function; a class-wide setting: restored after the test)."""
    cls = hqq_quantize.HQQLinear
    old = cls.backend
    cls.set_backend(hqq_quantize.HQQBackend.PYTORCH_FORWARD)
    try:
        yield
    finally:
        cls.backend = old


def _vmapped(ours: Any) -> None:
    trees = [random_like(ours.adapter, torch.Generator().manual_seed(s)) for s in (1, 2)]
    stacked = {p: {n: torch.stack([t[p][n] for t in trees]) for n in ours.adapter[p]} for p in ours.adapter}
    out = torch.vmap(lambda a: ours.fn(ours.base, a, input_ids=IDS).logits)(stacked)
    for i, tree in enumerate(trees):
        assert _rel(out[i], ours.fn(ours.base, tree, input_ids=IDS).logits) <= 1e-6


def test_vmap_over_stacked_adapters_torchao(saved: Path) -> None:
    _vmapped(funcpeft.get_peft_model(_torchao(saved), funcpeft.LoraConfig(target_modules=TARGETS)))


def test_vmap_over_stacked_adapters_hqq(saved: Path, hqq_pytorch_backend: None) -> None:
    _vmapped(funcpeft.get_peft_model(_hqq(saved), funcpeft.LoraConfig(target_modules=TARGETS)))


def test_hqq_default_backend_under_vmap_names_its_autograd_function(saved: Path) -> None:
    """HQQ's default forward is an autograd.Function without a vmap rule (docs/usage.md: use HQQBackend.PYTORCH_FORWARD)."""
    ours = funcpeft.get_peft_model(_hqq(saved), funcpeft.LoraConfig(target_modules=TARGETS))
    assert hqq_quantize.HQQLinear.backend != hqq_quantize.HQQBackend.PYTORCH_FORWARD
    with pytest.raises(RuntimeError, match="HQQMatmulNoCacheMul.*vmap"):
        _vmapped(ours)


def _per_example_oft(saved: Path) -> tuple[torch.Tensor, list[torch.Tensor]]:
    config = funcpeft.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS)
    pm = funcpeft.get_peft_model(_hqq(saved), config)
    trees = [random_like(pm.adapter, torch.Generator().manual_seed(s)) for s in (1, 2)]
    alone = [pm.fn(pm.base, trees[k], input_ids=IDS[i : i + 1]).logits for i, k in enumerate([1, 0])]
    return pm.fn(pm.base, funcpeft.per_example(funcpeft.stack_adapters(trees), [1, 0]), input_ids=IDS).logits, alone


def test_per_example_oft_on_hqq_names_the_layer_or_equals_the_loop(saved: Path) -> None:
    """OFT runs the quantised layer on each example's rotated input under vmap: HQQ's default autograd.Function has
    no vmap rule (torch's bare error before); its plain-PyTorch backend routes like the loop."""
    with pytest.raises(
        NotImplementedError, match=r"per-example adapters: oft on 'model.layers.0.self_attn.q_proj'.*hqq"
    ):
        _per_example_oft(saved)
    cls = hqq_quantize.HQQLinear
    old = cls.backend
    cls.set_backend(hqq_quantize.HQQBackend.PYTORCH_FORWARD)
    try:
        routed, alone = _per_example_oft(saved)
    finally:
        cls.backend = old
    for i, want in enumerate(alone):
        assert _rel(routed[i : i + 1], want) <= 1e-5


def test_torchao_compiles_fullgraph_without_recompiles(saved: Path) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    ours = funcpeft.get_peft_model(_torchao(saved), funcpeft.LoraConfig(target_modules=["q_proj"]))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours.fn, backend=counter, fullgraph=True)
    for seed in (1, 2):
        adapter = random_like(ours.adapter, torch.Generator().manual_seed(seed))
        got = compiled(ours.base, adapter, input_ids=IDS).logits
        assert _rel(got, ours.fn(ours.base, adapter, input_ids=IDS).logits) <= 1e-6
    assert counter.frame_count == 1
