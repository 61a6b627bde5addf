"""X-LoRA (funcpeft._xlora, funcpeft.methods.xlora) against PEFT 0.21.2's XLoraModel.

PEFT's tests/test_xlora.py uses facebook/opt-125m from the hub; here tiny random Llama / GPT-2 models from configs,
with LoRA experts made and saved by peft first (one of them adapts other layers, one the input embedding).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import capture_stdout, in_threads
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import funcpeft
from funcpeft._xlora import CLASSIFIER_PREFIX, XLoraModel

PREFIX = "base_model.internal_xlora_classifier."
LLAMA = LlamaConfig(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=50,
    use_cache=False,
)
GPT2 = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32, use_cache=False)
LLAMA_EXPERTS = [["q_proj", "v_proj"], ["k_proj", "q_proj", "v_proj"], ["embed_tokens", "down_proj"]]
GPT2_EXPERTS = [["c_attn"], ["c_attn", "mlp.c_proj"]]
IDS = torch.tensor([[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]])


def _model(family: str) -> Any:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (LlamaForCausalLM(LLAMA) if family == "llama" else GPT2LMHeadModel(GPT2)).eval()


def _save_experts(root: Path, family: str, targets: list[list[str]]) -> list[str]:
    paths = []
    for i, t in enumerate(targets):
        torch.manual_seed(i + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(_model(family), peft.LoraConfig(target_modules=t, init_lora_weights=False, r=4))
            pm.save_pretrained(str(root / f"expert{i}"))
        paths.append(str(root / f"expert{i}"))
    return paths


@pytest.fixture(scope="module")
def llama_experts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _save_experts(tmp_path_factory.mktemp("xlora_llama"), "llama", LLAMA_EXPERTS)


@pytest.fixture(scope="module")
def gpt2_experts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _save_experts(tmp_path_factory.mktemp("xlora_gpt2"), "gpt2", GPT2_EXPERTS)


def _kwargs(paths: list[str], **extra: Any) -> dict[str, Any]:
    return {"task_type": "CAUSAL_LM", "hidden_size": 16, "adapters": {str(i): p for i, p in enumerate(paths)}, **extra}


def _peft(family: str, kwargs: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_model(family), peft.XLoraConfig(**kwargs)).eval()


def _pair(family: str, kwargs: dict[str, Any]) -> tuple[Any, XLoraModel]:
    """PEFT's X-LoRA model and funcpeft's, with funcpeft's classifier set to PEFT's values."""
    theirs = _peft(family, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = funcpeft.get_peft_model(_model(family), funcpeft.XLoraConfig(**kwargs))
    assert isinstance(ours, XLoraModel)
    named = dict(theirs.named_parameters())
    classifier = ours.adapter["classifier"]
    assert {f"{PREFIX}{p}.{leaf}" for p, leaves in classifier.items() for leaf in leaves} == {
        n for n in named if "internal_xlora_classifier" in n
    }
    for path, leaves in classifier.items():
        for leaf in leaves:
            leaves[leaf] = named[f"{PREFIX}{path}.{leaf}"].detach().clone().requires_grad_()
    return theirs, ours


def _expert_param(theirs: Any, i: str, path: str, leaf: str) -> torch.Tensor:
    name = f"base_model.lora_model.model.{path}.{leaf}.{i}"
    return dict(theirs.named_parameters())[name + ("" if "embedding" in leaf else ".weight")]


VARIANTS = {
    "defaults": {},
    "deep-layerwise-topk": dict(
        xlora_depth=3,
        xlora_size=8,
        layerwise_scalings=True,
        scaling_pass_value=0.3,
        top_k_lora=2,
        global_scaling_weight=1.3,
    ),
    "softmax-topk": dict(enable_softmax=False, enable_softmax_topk=True, top_k_lora=2, scaling_pass_value=0.5),
    "temperature-no-dropout": dict(xlora_depth=2, xlora_size=6, xlora_dropout_p=0.0, softmax_temperature=0.4),
    "no-softmax": dict(enable_softmax=False, scaling_pass_value=0.7, layerwise_scalings=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_xlora_outputs_scalings_and_classifier_grads_equal_pefts(llama_experts: list[str], variant: str) -> None:
    theirs, ours = _pair("llama", _kwargs(llama_experts, **VARIANTS[variant]))
    fn, base, adapter = ours
    weights = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(3))
    ref = theirs(input_ids=IDS).logits
    out = fn(base, adapter, input_ids=IDS).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - _model("llama")(input_ids=IDS).logits).abs().max() > 1e-3  # the experts really act
    torch.testing.assert_close(
        fn.scalings(base, adapter, input_ids=IDS), theirs.get_latest_scalings(), atol=1e-6, rtol=0
    )
    (ref * weights).sum().backward()
    grads = torch.func.grad(lambda a: (fn(base, a, input_ids=IDS).logits * weights).sum())(adapter)
    named = dict(theirs.named_parameters())
    assert set(grads) == {"classifier"}  # frozen experts are not in the tree
    for path, leaves in grads["classifier"].items():
        for leaf, g in leaves.items():
            peft_grad = named[f"{PREFIX}{path}.{leaf}"].grad
            assert peft_grad is not None and peft_grad.abs().max() > 0
            torch.testing.assert_close(g, peft_grad, atol=1e-5, rtol=0)


def test_xlora_gpt2_conv1d_experts(gpt2_experts: list[str]) -> None:
    """PEFT's X-LoRA cannot load GPT-2 experts (its loader rewrites keys to start with 'model.': 'Got unexpected
    keys!'); funcpeft's Conv1D layers are checked by a law: with a zero classifier weight, no softmax and bias b,
    every token's scalings are b, so the output is the experts applied together with lora_B scaled by b_e."""
    kwargs = _kwargs(gpt2_experts, enable_softmax=False, global_scaling_weight=0.7)
    with pytest.raises(ValueError, match="Got unexpected keys"):
        _peft("gpt2", kwargs)
    fn, base, adapter = funcpeft.get_peft_model(_model("gpt2"), funcpeft.XLoraConfig(**kwargs))
    assert fn.n_layers == 4  # c_attn and mlp.c_proj of 2 blocks
    b = torch.tensor([0.5, -1.2])
    adapter["classifier"]["layers.0"] = {"weight": torch.zeros(2, 16), "bias": b}
    plain = funcpeft.from_pretrained(_model("gpt2"), gpt2_experts[0], "0")
    trees = {"0": plain.adapter, "1": plain.load_adapter(gpt2_experts[1], "1")}
    scaled = {n: {p: {**ls, "lora_B": ls["lora_B"] * b[int(n)] * 0.7} for p, ls in t.items()} for n, t in trees.items()}
    expected = plain.fn(plain.base, scaled, input_ids=IDS).logits
    torch.testing.assert_close(fn(base, adapter, input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    assert (expected - _model("gpt2")(input_ids=IDS).logits).abs().max() > 1e-3


def test_xlora_trainable_experts_grads_equal_pefts(llama_experts: list[str]) -> None:
    kwargs = _kwargs(llama_experts, use_trainable_adapters=True, layerwise_scalings=True, scaling_pass_value=0.4)
    theirs, ours = _pair("llama", kwargs)
    fn, base, adapter = ours
    assert fn.experts is None and sorted(adapter["experts"]) == ["0", "1", "2"]
    # PEFT's experts start from the same files: the trees hold their values
    for i, tree in adapter["experts"].items():
        for path, leaves in tree.items():
            for leaf, t in leaves.items():
                torch.testing.assert_close(t, _expert_param(theirs, i, path, leaf), atol=0, rtol=0)
    ref = theirs(input_ids=IDS).logits
    torch.testing.assert_close(fn(base, adapter, input_ids=IDS).logits, ref, atol=1e-5, rtol=0)
    ref.pow(2).sum().backward()
    grads = torch.func.grad(lambda a: fn(base, a, input_ids=IDS).logits.pow(2).sum())(adapter)
    checked = 0
    for i, tree in grads["experts"].items():
        for path, leaves in tree.items():
            for leaf, g in leaves.items():
                peft_grad = _expert_param(theirs, i, path, leaf).grad
                assert peft_grad is not None
                torch.testing.assert_close(g, peft_grad, atol=1e-5, rtol=0)
                checked += int(peft_grad.abs().max() > 0)
    assert checked >= 10
    named = dict(theirs.named_parameters())
    for path, leaves in grads["classifier"].items():
        for leaf, g in leaves.items():
            torch.testing.assert_close(g, named[f"{PREFIX}{path}.{leaf}"].grad, atol=1e-5, rtol=0)


def test_xlora_frozen_experts_are_held_by_fn_and_get_no_gradient(llama_experts: list[str]) -> None:
    _, ours = _pair("llama", _kwargs(llama_experts, scaling_pass_value=0.5))
    fn, base, adapter = ours
    assert fn.experts is not None and sorted(fn.experts) == ["0", "1", "2"]
    leaves = [t for tree in fn.experts.values() for ls in tree.values() for t in ls.values()]
    assert leaves and not any(t.requires_grad for t in leaves)
    before = [t.clone() for t in leaves]
    loss = fn(base, adapter, input_ids=IDS).logits.sum()
    loss.backward()
    assert all(t.grad is None for t in leaves)
    assert all(torch.equal(a, b) for a, b in zip(before, leaves))
    with pytest.raises(ValueError, match="frozen and held by fn"):
        fn(base, {**adapter, "experts": fn.experts}, input_ids=IDS)
    with pytest.raises(TypeError, match="'classifier'"):
        fn(base, {"0": 1}, input_ids=IDS)


def test_xlora_scaling_pass_uses_the_experts_and_no_gradient(llama_experts: list[str]) -> None:
    """Both passes: the classifier reads the hidden states of a pass where the experts act with
    `scaling_pass_value` (0 and 0.8 give other scalings), and that pass carries no gradient (PEFT: no_grad)."""
    outs = {}
    for v in (0.0, 0.8):
        theirs, ours = _pair("llama", _kwargs(llama_experts, scaling_pass_value=v))
        fn, base, adapter = ours
        outs[v] = fn.scalings(base, adapter, input_ids=IDS)
        theirs(input_ids=IDS)
        torch.testing.assert_close(outs[v], theirs.get_latest_scalings(), atol=1e-6, rtol=0)
    assert (outs[0.0] - outs[0.8]).abs().max() > 1e-4
    hidden = torch.randn(2, 5, 16, requires_grad=True)  # the classifier alone is differentiable in its input
    s = fn.classify(adapter["classifier"], hidden, None)
    assert s.requires_grad
    # the hidden states of the scaling pass are constants: the input embedding (an expert's layer) gets no
    # gradient through them when the real pass's scalings are held fixed
    emb = base["model.embed_tokens.weight"].clone().requires_grad_()
    s = fn.scalings({**base, "model.embed_tokens.weight": emb}, adapter, input_ids=IDS)
    assert not s.requires_grad or torch.autograd.grad(s.sum(), emb, allow_unused=True)[0] is None


def test_xlora_parameter_counts_and_print_line_equal_pefts(llama_experts: list[str]) -> None:
    for extra in ({}, {"use_trainable_adapters": True, "xlora_depth": 3, "xlora_size": 8}):
        theirs, ours = _pair("llama", _kwargs(llama_experts, **extra))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        assert capture_stdout(ours.print_trainable_parameters) == capture_stdout(theirs.print_trainable_parameters)


def test_xlora_save_is_read_by_peft_and_funcpeft(llama_experts: list[str], tmp_path: Path) -> None:
    kwargs = _kwargs(llama_experts, xlora_depth=3, xlora_size=8, layerwise_scalings=True, scaling_pass_value=0.2)
    _, ours = _pair("llama", kwargs)
    fn, base, adapter = ours
    for leaves in adapter["classifier"].values():  # a trained classifier, not the fresh one
        for leaf in leaves:
            leaves[leaf] = (leaves[leaf] + 0.1 * torch.randn_like(leaves[leaf])).detach()
    expected = fn(base, adapter, input_ids=IDS).logits
    ours.save_pretrained(tmp_path, adapter)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert set(state) == {
        f"{CLASSIFIER_PREFIX}{p}.{leaf}" for p in adapter["classifier"] for leaf in ("weight", "bias")
    }
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "XLORA" and saved["xlora_depth"] == 3 and saved["adapters"] == kwargs["adapters"]
    subdirs = {str(i): str(tmp_path / str(i)) for i in range(3)}
    for d in subdirs.values():  # each expert as a plain LoRA adapter
        assert json.loads(Path(d, "adapter_config.json").read_text())["peft_type"] == "LORA"
    # PEFT reads funcpeft's files (experts from the subfolders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_model("llama"), str(tmp_path), adapters=subdirs).eval()
    torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    # funcpeft reads them back: experts from the subfolders, or from the given paths
    for adapters in (None, kwargs["adapters"]):
        loaded = funcpeft.from_pretrained(_model("llama"), tmp_path, adapters=adapters)
        assert isinstance(loaded, XLoraModel)
        lfn, lbase, ladapter = loaded
        torch.testing.assert_close(lfn(lbase, ladapter, input_ids=IDS).logits, expected, atol=1e-6, rtol=0)
        assert not any(t.requires_grad for ls in ladapter["classifier"].values() for t in ls.values())
    trainable = funcpeft.from_pretrained(_model("llama"), tmp_path, is_trainable=True)
    assert all(t.requires_grad for ls in trainable.adapter["classifier"].values() for t in ls.values())


def test_xlora_reads_pefts_save_and_reports_the_keys_peft_drops(llama_experts: list[str], tmp_path: Path) -> None:
    """PEFT's save filters out keys containing '.<expert name>.': `layers.0.*` is missing from its file."""
    kwargs = _kwargs(llama_experts, xlora_depth=3, xlora_size=8)
    theirs = _peft("llama", kwargs)
    theirs.save_pretrained(str(tmp_path))
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(state) == [f"{PREFIX}layers.{i}.{leaf}" for i in (3, 6) for leaf in ("bias", "weight")]
    with pytest.raises(ValueError, match=r"layers\.0\.bias.*missing.*strict=False"):
        funcpeft.from_pretrained(_model("llama"), tmp_path, adapters=kwargs["adapters"])
    with pytest.warns(UserWarning, match="keeping freshly drawn values"):
        loaded = funcpeft.from_pretrained(_model("llama"), tmp_path, adapters=kwargs["adapters"], strict=False)
    assert isinstance(loaded, XLoraModel)
    for key, t in state.items():
        path, _, leaf = key.removeprefix(PREFIX).rpartition(".")
        torch.testing.assert_close(loaded.adapter["classifier"][path][leaf], t, atol=0, rtol=0)
    # with the one dropped layer copied over, the loaded model is PEFT's
    named = dict(theirs.named_parameters())
    for leaf in ("weight", "bias"):
        loaded.adapter["classifier"]["layers.0"][leaf] = named[f"{PREFIX}layers.0.{leaf}"].detach()
    fn, base, adapter = loaded
    torch.testing.assert_close(fn(base, adapter, input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="`adapters` must be passed"):
        funcpeft.from_pretrained(_model("llama"), _no_subdirs(tmp_path))
    with pytest.raises(AttributeError, match="XLoraConfig has no target_modules.*load_adapter"):
        funcpeft.load_adapter(tmp_path, model=_model("llama"))


def _no_subdirs(src: Path) -> Path:
    d = src.parent / (src.name + "_bare")
    d.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (d / f).write_bytes((src / f).read_bytes())
    return d


def test_xlora_config_warnings_and_defaults_are_pefts() -> None:
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({}, ["hidden_size", "adapters"]),
        ({"hidden_size": 8, "adapters": {}, "enable_softmax_topk": True}, ["top_k_lora` is not set", "both enabled"]),
        ({"hidden_size": 8, "adapters": {}, "top_k_lora": 0}, ["must be at least 1"]),
    ]
    for kwargs, expected in cases:
        for lib in (peft, funcpeft):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = lib.XLoraConfig(**kwargs)
            text = " ".join(str(w.message) for w in caught)
            assert all(e in text for e in expected), (lib.__name__, text)
            assert config.peft_type.value == "XLORA"
        assert funcpeft.XLoraConfig(**kwargs).to_dict().keys() == peft.XLoraConfig(**kwargs).to_dict().keys()
    assert funcpeft.XLoraConfig().hidden_size == 4096 and funcpeft.XLoraConfig().adapters == {}
    with pytest.raises(TypeError, match="xlora_dept"):
        funcpeft.XLoraConfig(xlora_dept=2)  # type: ignore[call-arg]


def test_xlora_errors(llama_experts: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="X-LoRA depth must be strictly positive"):
        funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**_kwargs(llama_experts, xlora_depth=0)))
    with pytest.raises(ValueError, match="adapters is empty"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(hidden_size=16))
    cached = _model("llama")
    cached.config = copy.deepcopy(cached.config)  # the tiny models share LLAMA
    cached.config.use_cache = True
    with pytest.raises(ValueError, match="`use_cache` must be False"):
        funcpeft.get_peft_model(cached, funcpeft.XLoraConfig(**_kwargs(llama_experts)))
    with pytest.raises(NotImplementedError, match="mixed"):
        funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**_kwargs(llama_experts)), mixed=True)
    # DoRA experts (PEFT: "X-LoRA currently does not support LoRA layers with DoRA") and non-LoRA experts
    torch.manual_seed(0)
    dora = peft.get_peft_model(_model("llama"), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(NotImplementedError, match="DoRA"):
        funcpeft.get_peft_model(
            _model("llama"), funcpeft.XLoraConfig(**_kwargs([llama_experts[0], str(tmp_path / "dora")]))
        )
    ia3 = peft.get_peft_model(_model("llama"), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(TypeError, match="IA3Config adapter; X-LoRA's experts are LoRA adapters"):
        funcpeft.get_peft_model(
            _model("llama"), funcpeft.XLoraConfig(**_kwargs([llama_experts[0], str(tmp_path / "ia3")]))
        )
    _, ours = _pair("llama", _kwargs(llama_experts))
    fn, base, adapter = ours
    with pytest.raises(ValueError, match="`input_ids` or `inputs_embeds`"):
        fn(base, adapter)
    with pytest.raises(TypeError, match="computed by the X-LoRA call itself"):
        fn(base, adapter, input_ids=IDS, xlora_scalings=torch.zeros(2, 5, 9, 3))


def test_xlora_expert_names_other_than_indices(llama_experts: list[str]) -> None:
    """PEFT works only with experts named "0".."n-1" (its layers hold those names, its set_adapter uses the
    config's, and its forward fails with a KeyError); funcpeft mixes the experts in order whatever their names."""
    named = {"a": llama_experts[0], "b": llama_experts[1]}
    theirs = _peft("llama", {"task_type": "CAUSAL_LM", "hidden_size": 16, "adapters": named})
    with pytest.raises(KeyError, match="'a'"):
        theirs(input_ids=IDS)
    by_index = {str(i): p for i, p in enumerate(named.values())}
    _, ours_index = _pair("llama", {"hidden_size": 16, "adapters": by_index})
    ours_named = funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(hidden_size=16, adapters=named))
    fn, base, adapter = ours_named
    out = fn(base, ours_index.adapter, input_ids=IDS).logits
    torch.testing.assert_close(out, ours_index.fn(ours_index.base, ours_index.adapter, input_ids=IDS).logits)
    assert (out - _model("llama")(input_ids=IDS).logits).abs().max() > 1e-3
    del adapter


def test_xlora_training_mode_classifier_dropout_is_seeded(llama_experts: list[str]) -> None:
    _, ours = _pair("llama", _kwargs(llama_experts, xlora_depth=3, xlora_size=8, xlora_dropout_p=0.5))
    fn, base, adapter = ours
    a = fn(base, adapter, input_ids=IDS, dropout_rng=1).logits
    b = fn(base, adapter, input_ids=IDS, dropout_rng=1).logits
    c = fn(base, adapter, input_ids=IDS, dropout_rng=2).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, fn(base, adapter, input_ids=IDS).logits)


def test_xlora_model_is_not_mutated(llama_experts: list[str]) -> None:
    model = _model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.XLoraConfig(**_kwargs(llama_experts)))
    fn(base, adapter, input_ids=IDS).logits.sum().backward()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    assert os.path.isdir(llama_experts[0])


@pytest.mark.parametrize("extra", [{}, {"xlora_depth": 3, "xlora_size": 8, "layerwise_scalings": True}])
def test_xlora_fresh_classifier_equals_pefts_for_the_same_seed(llama_experts: list[str], extra: dict[str, Any]) -> None:
    """PEFT draws each expert's LoRA init (then overwritten by its file) before the classifier: funcpeft replays
    those draws, so the fresh classifier is PEFT's."""
    kwargs = _kwargs(llama_experts, **extra)
    m1, m2 = _model("llama"), _model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(7)
        theirs = peft.get_peft_model(m1, peft.XLoraConfig(**kwargs))
        torch.manual_seed(7)
        ours = funcpeft.get_peft_model(m2, funcpeft.XLoraConfig(**kwargs))
    assert isinstance(ours, XLoraModel)
    named = dict(theirs.named_parameters())
    for path, leaves in ours.adapter["classifier"].items():
        for leaf, t in leaves.items():
            assert t.requires_grad
            torch.testing.assert_close(t, named[f"{PREFIX}{path}.{leaf}"], atol=0, rtol=0)


def test_xlora_vmap_over_classifiers_equals_a_loop(llama_experts: list[str]) -> None:
    """An ensemble of classifiers in one vmapped call (both passes inside), as funcpeft does for any adapter."""
    kwargs = _kwargs(llama_experts[:2], layerwise_scalings=True, xlora_depth=2, xlora_size=4, xlora_dropout_p=0.0)
    fn, base, adapter = funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**kwargs))
    trees = [
        {
            "classifier": {
                p: {leaf: t.detach() * (1 + k) for leaf, t in ls.items()} for p, ls in adapter["classifier"].items()
            }
        }
        for k in range(3)
    ]
    stacked = torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *trees)
    out = torch.func.vmap(lambda a: fn(base, a, input_ids=IDS).logits)(stacked)
    ref = torch.stack([fn(base, t, input_ids=IDS).logits for t in trees])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (ref[0] - ref[2]).abs().max() > 1e-5


@pytest.mark.parametrize(
    "extra",
    [
        {"layerwise_scalings": True, "top_k_lora": 2, "scaling_pass_value": 0.3},
        {"use_trainable_adapters": True, "xlora_depth": 2, "xlora_size": 4, "enable_softmax_topk": True},
    ],
)
def test_xlora_compiles_to_one_graph_and_its_gradients_equal_eager(llama_experts: list[str], extra: Any) -> None:
    """torch.compile(fullgraph=True) of both passes: new adapter values of the same shapes never recompile, and
    the compiled call's outputs and gradients equal the eager call's (the scaling pass needs transformers'
    output-capturing hooks, which dynamo cannot install: fn installs them on the model when it is built)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, base, adapter = funcpeft.get_peft_model(
            _model("llama"), funcpeft.XLoraConfig(**_kwargs(llama_experts, **extra))
        )
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for k in range(3):
        tree = optree.tree_map(lambda t, f=1 + 0.5 * k: (t.detach() * f).requires_grad_(), adapter)
        leaves = optree.tree_leaves(tree)
        got = compiled(base, tree, input_ids=IDS).logits
        want = fn(base, tree, input_ids=IDS).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        g_got = torch.autograd.grad(got.square().sum(), leaves)
        g_want = torch.autograd.grad(want.square().sum(), leaves)
        assert sum(int(g.abs().max() > 0) for g in g_want) >= len(leaves) // 2
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def test_xlora_generate_equals_pefts(llama_experts: list[str]) -> None:
    """PEFT's XLoraModel.generate runs generate with use_cache=False, both passes over the whole sequence at every
    step; funcpeft.generate (and the model's generate) does the same: greedy tokens (left-padded prompts) and
    sampled tokens (rng=seed vs torch.manual_seed(seed)) equal PEFT's, and differ from the plain model's."""
    kwargs = _kwargs(llama_experts, layerwise_scalings=True, scaling_pass_value=0.3, global_scaling_weight=3.0)
    theirs, ours = _pair("llama", kwargs)
    fn, base, adapter = ours
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    greedy: dict[str, Any] = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = theirs.generate(input_ids=IDS, attention_mask=mask, **greedy)
    assert torch.equal(funcpeft.generate(ours, base, adapter, input_ids=IDS, attention_mask=mask, **greedy), ref)
    assert torch.equal(ours.generate(base, adapter, input_ids=IDS, attention_mask=mask, **greedy), ref)
    plain = _model("llama").generate(input_ids=IDS, attention_mask=mask, use_cache=False, **greedy)
    assert not torch.equal(plain, ref)
    sampling: dict[str, Any] = dict(max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(5)
    ref = theirs.generate(input_ids=IDS, **sampling)
    assert torch.equal(funcpeft.generate(ours, base, adapter, input_ids=IDS, rng=5, **sampling), ref)
    with pytest.raises(ValueError, match="without a KV cache.*use_cache=True"):
        funcpeft.generate(ours, base, adapter, input_ids=IDS, use_cache=True, **greedy)
    with pytest.raises(NotImplementedError, match="without a KV cache.*without compile"):
        funcpeft.generate(ours, base, adapter, input_ids=IDS, compile="aot_eager", **greedy)
    with pytest.raises(ValueError, match="needs explicit randomness"):
        funcpeft.generate(ours, base, adapter, input_ids=IDS, **sampling)
    with pytest.raises(TypeError, match="'classifier'"):
        funcpeft.generate(ours, base, adapter["classifier"], input_ids=IDS, **greedy)


def test_xlora_training_mode_masks_equal_pefts_under_manual_seed(tmp_path: Path) -> None:
    """Training mode draws the scaling pass's dropout masks (the experts' lora_dropout), the classifier's, then the
    real pass's, in PEFT's order from one randomness: with dropout_rng=seed the outputs and gradients equal PEFT's
    train mode after torch.manual_seed(seed). (Each pass seeding its own generator from the int gave the real pass
    the scaling pass's masks again.)"""
    paths = []
    for i, t in enumerate([["q_proj", "v_proj"], ["v_proj", "down_proj"]]):
        torch.manual_seed(i + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = peft.LoraConfig(target_modules=t, init_lora_weights=False, r=4, lora_dropout=0.3)
            peft.get_peft_model(_model("llama"), lora).save_pretrained(str(tmp_path / f"e{i}"))
        paths.append(str(tmp_path / f"e{i}"))
    theirs, ours = _pair("llama", _kwargs(paths, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.4))
    fn, base, adapter = ours
    theirs.train()
    for seed in (3, 4):
        torch.manual_seed(seed)
        ref = theirs(input_ids=IDS).logits
        out = fn(base, adapter, input_ids=IDS, dropout_rng=seed).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out, fn(base, adapter, input_ids=IDS).logits, atol=1e-4)  # dropout acts
    theirs.zero_grad()
    torch.manual_seed(5)
    theirs(input_ids=IDS).logits.square().sum().backward()
    grads = torch.func.grad(lambda a: fn(base, a, input_ids=IDS, dropout_rng=5).logits.square().sum())(adapter)
    named = dict(theirs.named_parameters())
    for path, leaves in grads["classifier"].items():
        for leaf, g in leaves.items():
            torch.testing.assert_close(g, named[f"{PREFIX}{path}.{leaf}"].grad, atol=1e-5, rtol=0)


def test_xlora_wrong_trees_and_configs_are_refused_clearly(llama_experts: list[str]) -> None:
    """A classifier bias of shape (1,) broadcast silently and an extra classifier layer was ignored; a missing one
    was a bare KeyError; top_k_lora above the number of experts and a wrong hidden_size failed deep in torch;
    per-example routing failed as a wrong tree type."""
    kwargs = _kwargs(llama_experts, xlora_depth=2, xlora_size=8, use_trainable_adapters=True)
    fn, base, adapter = funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**kwargs))
    classifier = adapter["classifier"]
    last = sorted(classifier)[-1]
    cases = {
        r"shape: \['layers\.3\.bias \(1,\) \(expected \(3,\)\)'\]": {
            **classifier,
            last: {**classifier[last], "bias": torch.zeros(1)},
        },
        r"unexpected: \['layers\.9\.weight'\]": {**classifier, "layers.9": {"weight": torch.zeros(3, 8)}},
        r"missing: \['layers\.3\.bias', 'layers\.3\.weight'\]": {k: v for k, v in classifier.items() if k != last},
    }
    for message, tree in cases.items():
        with pytest.raises(ValueError, match=r"does not fit this X-LoRA classifier \(depth 2, 3 experts.*" + message):
            fn(base, {**adapter, "classifier": tree}, input_ids=IDS)
    experts = adapter["experts"]
    with pytest.raises(ValueError, match=r"must hold the experts \['0', '1', '2'\]"):
        fn(base, {**adapter, "experts": {k: v for k, v in experts.items() if k != "2"}}, input_ids=IDS)
    path = sorted(experts["0"])[0]
    short = {**experts["0"][path], "lora_A": experts["0"][path]["lora_A"][:1]}
    with pytest.raises(ValueError, match=r"lora_A has shape \(1, 16\), expected \(4, 16\)"):
        fn(base, {**adapter, "experts": {**experts, "0": {**experts["0"], path: short}}}, input_ids=IDS)
    stacked = funcpeft.stack_adapters([adapter, adapter])
    with pytest.raises(NotImplementedError, match="X-LoRA does not route adapters per example"):
        fn(base, funcpeft.per_example(stacked, torch.tensor([0, 1])), input_ids=IDS)
    with pytest.raises(ValueError, match="top_k_lora=4 is more than the 3 experts"):
        funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**_kwargs(llama_experts, top_k_lora=4)))
    fn, base, adapter = funcpeft.get_peft_model(
        _model("llama"), funcpeft.XLoraConfig(**_kwargs(llama_experts, hidden_size=8))
    )
    with pytest.raises(ValueError, match="hidden_size=8, but the model's last hidden state has size 16"):
        fn(base, adapter, input_ids=IDS)


def test_xlora_gradient_checkpointing_gradients_equal_without(llama_experts: list[str]) -> None:
    """transformers' gradient checkpointing on the base model (training mode: layers recomputed in the backward,
    with the same dropout masks): the gradients of the classifier and of trainable experts equal those without."""
    kwargs = _kwargs(llama_experts, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.3, use_trainable_adapters=True)
    ckpt = _model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: renamed activation_checkpointing_enable
        ckpt.gradient_checkpointing_enable()
    runs = []
    for model in (_model("llama"), ckpt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.XLoraConfig(**kwargs))
        runs.append(
            funcpeft.value_and_grad(
                lambda a, fn=fn, base=base: fn(base, a, input_ids=IDS, dropout_rng=3).logits.square().sum()
            )(adapter)
        )
    (loss, grads), (loss_ck, grads_ck) = runs
    torch.testing.assert_close(loss_ck, loss, atol=0, rtol=0)
    leaves, leaves_ck = optree.tree_leaves(grads), optree.tree_leaves(grads_ck)
    assert len(leaves) == len(leaves_ck) and sum(int(g.abs().max() > 0) for g in leaves) > len(leaves) // 2
    for g, g_ck in zip(leaves, leaves_ck):
        torch.testing.assert_close(g_ck, g, atol=1e-6, rtol=1e-6)


def test_xlora_threads_with_different_adapters_and_seeds_equal_each_alone(llama_experts: list[str]) -> None:
    kwargs = _kwargs(llama_experts, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.3)
    fn, base, adapter = funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**kwargs))
    trees = [optree.tree_map(lambda t, f=1 + 0.5 * k: t.detach() * f, adapter) for k in range(3)]
    seeds = [None, 1, 2]
    with torch.no_grad():
        alone = [fn(base, t, input_ids=IDS, dropout_rng=s).logits for t, s in zip(trees, seeds)]
    assert not torch.equal(alone[1], alone[2])
    failures: list[int] = []

    def work(k: int) -> None:
        with torch.no_grad():
            for _ in range(10):
                if not torch.equal(fn(base, trees[k], input_ids=IDS, dropout_rng=seeds[k]).logits, alone[k]):
                    failures.append(k)

    in_threads(3, work)
    assert not failures


def test_xlora_save_interrupted_while_writing_leaves_the_earlier_save(
    llama_experts: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save over an earlier one that fails while writing (here: the config, written last) replaces nothing: the
    experts and the classifier were written first, each on its own, so the directory held new experts next to
    the old classifier and config and loaded as neither save."""
    kwargs = _kwargs(llama_experts, use_trainable_adapters=True, xlora_depth=2, xlora_size=8)
    pm = funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**kwargs))
    assert isinstance(pm, XLoraModel)
    fn, base, adapter = pm
    first = optree.tree_map(lambda t: t.detach() + 0.05, adapter)
    second = optree.tree_map(lambda t: t.detach() - 0.05, adapter)
    pm.save_pretrained(tmp_path, first)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert len(before) == 2 + 2 * 3

    def crash(path: str, text: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(funcpeft._xlora, "_write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(tmp_path, second)
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before  # nothing replaced, no temporary file left
    monkeypatch.undo()
    loaded = funcpeft.from_pretrained(_model("llama"), tmp_path)
    lfn, lbase, ladapter = loaded
    torch.testing.assert_close(
        lfn(lbase, ladapter, input_ids=IDS).logits, fn(base, first, input_ids=IDS).logits, atol=1e-6, rtol=0
    )
    fresh = tmp_path / "new"
    with pytest.raises(OSError, match="disk full"), monkeypatch.context() as m:
        m.setattr(funcpeft._xlora, "_write_text", crash)
        pm.save_pretrained(fresh, second)
    assert not fresh.exists()  # the directories it created are removed


def test_xlora_load_with_another_number_of_experts_is_refused(llama_experts: list[str], tmp_path: Path) -> None:
    """A save of 3 experts loaded over 2 (or 2 over 3): the classifier's shapes name the mismatch."""
    pm = funcpeft.get_peft_model(_model("llama"), funcpeft.XLoraConfig(**_kwargs(llama_experts)))
    pm.save_pretrained(tmp_path / "three", pm.adapter)
    with pytest.raises(ValueError, match=r"layers\.0\.weight has shape \(3, 16\), expected \(2, 16\)"):
        funcpeft.from_pretrained(
            _model("llama"), tmp_path / "three", adapters=dict(list(_kwargs(llama_experts)["adapters"].items())[:2])
        )


def test_xlora_bf16_model_keeps_the_experts_files_where_peft_rounds_them(llama_experts: list[str]) -> None:
    """A bf16 model (one expert on the input embedding): funcpeft's embedding layer returned fp32 hidden states
    (the next bf16 Linear failed); now each expert's term is added and rounded to the layer's dtype, like PEFT's
    in-place `result +=`. Deviation: PEFT's X-LoRA loads the experts' fp32 files through the bf16 model, so its
    (fp32) expert weights are the files' values rounded to bf16, unlike its own LoRA from_pretrained; funcpeft keeps
    the files' values. With the experts rounded the same way, the outputs are PEFT's bit for bit."""
    kwargs = _kwargs(llama_experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_model("llama").to(torch.bfloat16), peft.XLoraConfig(**kwargs)).eval()
        pm = funcpeft.get_peft_model(_model("llama").to(torch.bfloat16), funcpeft.XLoraConfig(**kwargs))
    fn, base, adapter = pm
    named = dict(theirs.named_parameters())
    for path, leaves in adapter["classifier"].items():
        for leaf in leaves:
            leaves[leaf] = named[f"{PREFIX}{path}.{leaf}"].detach().clone()
    assert fn.experts is not None
    file = load_file(Path(llama_experts[0]) / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ours_a = fn.experts["0"]["model.layers.0.self_attn.q_proj"]["lora_A"]
    peft_a = _expert_param(theirs, "0", "model.layers.0.self_attn.q_proj", "lora_A")
    assert ours_a.dtype == peft_a.dtype == torch.float32
    assert torch.equal(ours_a, file[key]) and not torch.equal(peft_a, file[key])
    assert torch.equal(peft_a, file[key].bfloat16().float())
    ref = theirs(input_ids=IDS).logits
    out = fn(base, adapter, input_ids=IDS).logits
    assert out.dtype == torch.bfloat16 and adapter["classifier"]["layers.0"]["weight"].dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05, rtol=0.02)
    fn.experts = optree.tree_map(lambda t: t.bfloat16().float(), fn.experts)
    assert torch.equal(fn(base, adapter, input_ids=IDS).logits, ref)
