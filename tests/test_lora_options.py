"""LoRA options of issue 12 against PEFT 0.21.2: `FunctionalPeftModel.load_adapter` re-runs base-changing inits
(as PEFT's load_adapter, which adds the adapter with its saved config before loading the file), conversion
saves with several adapters, and the options that stay refused (each with its reason)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import pytest
import torch
from helpers import InitLoraWeights, LoraKwargs

import funcpeft
from funcpeft import testing as T

pytestmark = pytest.mark.filterwarnings("ignore")


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_base_weights(twin: Any) -> dict[str, torch.Tensor]:
    """PEFT's base weights by the model's own parameter names (`base_layer.` dropped)."""
    out = {}
    for name, p in twin.get_base_model().named_parameters():
        if "lora_" not in name:
            out[name.replace(".base_layer", "")] = p.detach()
    return out


@pytest.mark.parametrize(("first", "loaded"), [("olora", "pissa"), (True, "olora"), ("pissa", "pissa")])
def test_load_adapter_reruns_base_changing_init_like_peft(
    first: InitLoraWeights, loaded: InitLoraWeights, tmp_path: Any
) -> None:
    model = T.tiny_llama()
    x = torch.randint(1, T.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    src = _quiet(
        peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=loaded)
    )
    with torch.no_grad():  # trained values, so that the file is not the init itself
        for name, p in src.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    _quiet(src.save_pretrained, tmp_path)
    kwargs: LoraKwargs = {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": first}
    twin = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**kwargs))
    pm = _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(**kwargs))
    before = dict(pm.base)
    _quiet(twin.load_adapter, tmp_path, "p")
    tree = _quiet(pm.load_adapter, tmp_path, "p")
    want = _peft_base_weights(twin)
    changed = [n for n in want if not torch.equal(before[n], pm.base[n])]
    assert changed and all(".q_proj." in n for n in changed)  # the loaded init changed q_proj's weights again
    for name, w in want.items():
        torch.testing.assert_close(pm.base[name], w, atol=1e-6, rtol=1e-6, msg=name)
    twin.set_adapter("p")
    with torch.no_grad():
        torch.testing.assert_close(pm.fn(pm.base, {"p": tree}, input_ids=x).logits, twin(input_ids=x).logits)


def _files(directory: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import json

    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    return load_file(str(directory / "adapter_model.safetensors")), config


def test_conversion_of_a_non_default_adapter_equals_peft_selected_adapters(tmp_path: Any) -> None:
    """`save_pretrained({"p": trained}, path_initial_model_for_weight_conversion=init/p)` converts adapter "p" alone,
    as PEFT's `save_pretrained(selected_adapters=["p"], path_initial_model_for_weight_conversion=...)`; several
    adapters are refused (PEFT subtracts the one initial adapter from each: a KeyError for the other here)."""
    model = T.tiny_llama()
    plain: LoraKwargs = {"target_modules": ["q_proj", "v_proj"]}
    mutated: LoraKwargs = {"r": 2, "lora_alpha": 6, "target_modules": ["q_proj", "down_proj"]}
    pm = _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(**plain))
    fresh = _quiet(pm.add_adapter, "p", funcpeft.LoraConfig(**LoraKwargs(**mutated, init_lora_weights="pissa")))
    pm.save_pretrained(tmp_path / "init", {"p": fresh})
    g = torch.Generator().manual_seed(0)
    trained = {p: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in e.items()} for p, e in fresh.items()}
    out = pm.save_pretrained(
        tmp_path / "ours", {"p": trained}, path_initial_model_for_weight_conversion=str(tmp_path / "init" / "p")
    )
    assert out == str(tmp_path / "ours" / "p")
    # PEFT on the same values (its adapter made with init True, so that its base stays the original weights)
    twin = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**plain))
    twin.add_adapter("p", peft.LoraConfig(**LoraKwargs(**mutated, init_lora_weights=True)))
    T.copy_into_peft(twin, fresh, pm.plans["p"], "p")
    _quiet(twin.save_pretrained, str(tmp_path / "pinit"), selected_adapters=["p"])
    # PEFT loads the initial adapter under its directory's name: named "p", it overwrites adapter p, whose state
    # dict (aliasing the parameters) it then converts, [A0; A0] instead of [A; A0]; another name avoids that
    (tmp_path / "pinit" / "p").rename(tmp_path / "pinit" / "p_initial")
    T.copy_into_peft(twin, trained, pm.plans["p"], "p")
    _quiet(
        twin.save_pretrained,
        str(tmp_path / "theirs"),
        selected_adapters=["p"],
        path_initial_model_for_weight_conversion=str(tmp_path / "pinit" / "p_initial"),
    )
    (ours, ours_config), (theirs, theirs_config) = _files(tmp_path / "ours" / "p"), _files(tmp_path / "theirs" / "p")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for key in ("r", "lora_alpha", "init_lora_weights"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])  # PEFT: a set's order
    assert _files(tmp_path / "init" / "p")[1]["init_lora_weights"] is True
    # several adapters: PEFT converts "default" against p's initial adapter too and fails; funcpeft refuses first
    twin2 = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**plain))
    twin2.add_adapter("p", peft.LoraConfig(**LoraKwargs(**mutated, init_lora_weights=True)))
    _quiet(twin2.save_pretrained, str(tmp_path / "pinit2"), selected_adapters=["p"])
    with pytest.raises(KeyError):
        _quiet(
            twin2.save_pretrained,
            str(tmp_path / "theirs2"),
            path_initial_model_for_weight_conversion=str(tmp_path / "pinit2" / "p"),
        )
    with pytest.raises(NotImplementedError, match=r"several adapters \['default', 'p'\].*selected_adapters=\[name\]"):
        pm.save_pretrained(
            tmp_path / "ours2",
            {"default": pm.adapter, "p": trained},
            path_initial_model_for_weight_conversion=str(tmp_path / "init" / "p"),
        )
    assert not (tmp_path / "ours2").exists()


def test_qalora_is_gptq_only_in_peft_and_refused_here() -> None:
    """PEFT 0.21.2 resolves QALoRA only in its GPTQ dispatch: on a plain nn.Linear `use_qalora=True` silently
    trains plain LoRA (no variant on the layer, the same outputs). funcpeft refuses instead of faking it."""
    model = T.tiny_llama()
    x = torch.randint(1, T.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs: LoraKwargs = {"target_modules": ["q_proj"], "init_lora_weights": False}
    torch.manual_seed(0)
    qa = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**kwargs, use_qalora=True)).eval()
    torch.manual_seed(0)
    plain = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    layer = qa.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.lora_variant  # no QALoRA variant on a plain Linear
    with torch.no_grad():
        torch.testing.assert_close(qa(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match=r"use_qalora=True \(QALoRA\): PEFT applies it only to GPTQ"):
        funcpeft.LoraConfig(**kwargs, use_qalora=True)


def test_megatron_config_needs_megatron_core_and_empty_is_plain_lora() -> None:
    model = T.tiny_llama()
    with pytest.raises(ImportError):  # PEFT imports megatron.core (not installed; CUDA model parallelism)
        _quiet(
            peft.get_peft_model,
            copy.deepcopy(model),
            peft.LoraConfig(target_modules=["q_proj"], megatron_config={"num_layers": 2}),
        )
    with pytest.raises(NotImplementedError, match="megatron_config=.*megatron-core, CUDA"):
        funcpeft.LoraConfig(target_modules=["q_proj"], megatron_config={"num_layers": 2})
    # {} is falsy: PEFT's dispatch skips Megatron, so it is plain LoRA in both
    T.assert_matches_peft(
        model,
        {"target_modules": ["q_proj"], "megatron_config": {}},
        input_ids=torch.randint(1, T.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)),
    )
