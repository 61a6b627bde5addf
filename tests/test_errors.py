"""Bad input gets a specific error, and leaves the model as it was."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import MODELS, assert_unchanged, make_inputs, snapshot

import funcpeft

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return MODELS["llama"]()


# -- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "close"), [("lora_alhpa", "lora_alpha"), ("target_module", "target_modules"), ("rank", None)])
def test_unknown_config_field_is_a_type_error_with_close_matches(field: str, close: str | None) -> None:
    with pytest.raises(TypeError, match=re.escape(field)) as info:
        funcpeft.LoraConfig(**{field: 1})
    if close is not None:
        assert close in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"r": 0}, "r"), ({"r": -2}, "r"), ({"r": 2.5}, "r"),
        ({"lora_dropout": -0.1}, "lora_dropout"), ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_dropout": 3}, "lora_dropout"),
        ({"target_modules": 5}, "target_modules"), ({"target_modules": ["q_proj", 3]}, "target_modules"),
        ({"target_modules": {"q_proj": 1}}, "target_modules"), ({"exclude_modules": 1.5}, "exclude_modules"),
    ],
)
def test_invalid_values_are_value_errors(kwargs: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        funcpeft.LoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"layer_replication": [[0, 1]]}, "layer_replication"), ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "pissa"), ({"use_qalora": True}, "use_qalora"),
    ],
)
def test_unimplemented_options_are_not_implemented_errors(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(NotImplementedError, match=name):
        funcpeft.LoraConfig(**kwargs)


# -- targeting --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("targets", "close"), [(["q_prj"], "q_proj"), (["down_prj", "upproj"], "down_proj"), (r".*\.q_prj", "q_proj")]
)
def test_targets_matching_nothing_list_close_names(llama: torch.nn.Module, targets: Any, close: str) -> None:
    before = snapshot(llama)
    with pytest.raises(ValueError, match="not found") as info:
        funcpeft.get_peft_model(llama, funcpeft.LoraConfig(target_modules=targets))
    assert close in str(info.value)
    assert_unchanged(llama, before)


@pytest.mark.parametrize(("kind", "target", "name", "type_name"), [
    ("gpt2", "ln_1", "transformer.h.0.ln_1", "LayerNorm"),
    ("llama", "input_layernorm", "model.layers.0.input_layernorm", "LlamaRMSNorm"),
])
def test_unsupported_layer_type_is_a_type_error_naming_module_and_type(kind: str, target: str, name: str, type_name: str) -> None:
    model = MODELS[kind]()
    before = snapshot(model)
    with pytest.raises(TypeError, match=re.escape(name)) as info:
        funcpeft.get_peft_model(model, funcpeft.LoraConfig(target_modules=["q_proj", "c_attn", target]))
    assert type_name in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "", "x.y", 3])
def test_invalid_adapter_name_is_a_value_error(llama: torch.nn.Module, name: Any) -> None:
    before = snapshot(llama)
    with pytest.raises(ValueError, match="adapter_name"):
        funcpeft.get_peft_model(llama, funcpeft.LoraConfig(), adapter_name=name)
    fpm = funcpeft.get_peft_model(llama, funcpeft.LoraConfig())
    with pytest.raises(ValueError, match="adapter_name"):
        fpm.add_adapter(name, funcpeft.LoraConfig())
    assert set(fpm.peft_config) == {"default"} and set(fpm.plans) == {"default"}
    assert_unchanged(llama, before)


# -- adapter structure ------------------------------------------------------------------------------------------
Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def _drop_path(a: dict) -> str:
    del a[Q0]
    return Q0


def _extra_path(a: dict) -> str:
    a["model.layers.0.mlp.up_proj"] = dict(a[Q0])
    return "model.layers.0.mlp.up_proj"


def _drop_key(a: dict) -> str:
    del a[V1]["lora_B"]
    return f"{V1}.lora_B"


def _extra_key(a: dict) -> str:
    a[V1]["lora_C"] = a[V1]["lora_B"]
    return f"{V1}.lora_C"


@pytest.mark.parametrize("break_tree", [_drop_path, _extra_path, _drop_key, _extra_key])
def test_wrong_adapter_structure_names_the_first_differing_path(llama: torch.nn.Module, break_tree: Any) -> None:
    before = snapshot(llama)
    fn, base, adapter = funcpeft.get_peft_model(llama, funcpeft.LoraConfig())
    bad = {path: dict(entry) for path, entry in adapter.items()}
    where = break_tree(bad)
    with pytest.raises(ValueError, match=re.escape(where)):
        fn(base, bad, **make_inputs("llama"))
    assert_unchanged(llama, before)
