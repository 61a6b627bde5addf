"""Bad input gets a specific error, and leaves the model as it was."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from helpers import MODELS, assert_unchanged, make_inputs, snapshot

import funcpeft
import funcpeft.io as fio
from funcpeft._config import ConfigTypeError
from funcpeft.configs import IA3Config, LoHaConfig, LoKrConfig, VeraConfig

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return MODELS["llama"]()


# -- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "close"), [("lora_alhpa", "lora_alpha"), ("target_module", "target_modules"), ("rank", None)]
)
def test_unknown_config_field_is_a_type_error_with_close_matches(field: str, close: str | None) -> None:
    unknown: dict[str, Any] = {field: 1}
    with pytest.raises(TypeError, match=re.escape(field)) as info:
        funcpeft.LoraConfig(**unknown)
    if close is not None:
        assert close in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"r": 0}, "r"),
        ({"r": -2}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": 3}, "lora_dropout"),
        ({"target_modules": 5}, "target_modules"),
        ({"target_modules": ["q_proj", 3]}, "target_modules"),
        ({"target_modules": {"q_proj": 1}}, "target_modules"),
        ({"exclude_modules": 1.5}, "exclude_modules"),
    ],
)
def test_invalid_values_are_value_errors(kwargs: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        funcpeft.LoraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron"),
        ({"use_qalora": True}, "use_qalora"),
    ],
)
def test_unimplemented_options_are_not_implemented_errors(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(NotImplementedError, match=name):
        funcpeft.LoraConfig(**kwargs)


# Wrong types, for every config class, derived from the field annotations: the value each scalar kind must refuse.
CONFIG_CLASSES = [funcpeft.LoraConfig, IA3Config, LoHaConfig, LoKrConfig, VeraConfig]
WRONG: dict[type, list[Any]] = {
    float: ["16", True, None, [1.0]],
    int: ["8", True, 2.5, None],
    bool: ["false", "true", 0, 1, None],
    str: [3, None, ["x"]],
}


def _scalar_fields(cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init and hints[f.name] in WRONG]


def _wrong_cases() -> list[Any]:
    return [
        pytest.param(cls, name, kind, bad, id=f"{cls.__name__}.{name}={bad!r}")
        for cls in CONFIG_CLASSES
        for name, kind in _scalar_fields(cls)
        for bad in WRONG[kind]
    ]


@pytest.mark.parametrize(("cls", "name", "kind", "bad"), _wrong_cases())
def test_wrong_types_name_field_type_and_value(cls: type, name: str, kind: type, bad: Any) -> None:
    with pytest.raises(ConfigTypeError) as info:
        cls(**{name: bad})
    assert f"{cls.__name__}.{name} must be {kind.__name__}" in str(info.value) and repr(bad) in str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_every_config_class_has_checked_fields_of_each_kind() -> None:
    for cls in CONFIG_CLASSES:  # guards _wrong_cases against silently testing nothing
        kinds = {kind for _, kind in _scalar_fields(cls)}
        assert bool in kinds and (cls is IA3Config or {int, float} <= kinds), (cls, kinds)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank_pattern": {"q_proj": "2"}}, r"rank_pattern must be dict\[str, int\].*'2'"),
        ({"alpha_pattern": {"q_proj": "x"}}, r"alpha_pattern must be dict\[str, float\]"),
        ({"layers_to_transform": [0, "1"]}, r"layers_to_transform must be list\[int\] \| int \| None"),
        ({"layers_to_transform": [True]}, r"layers_to_transform"),
        ({"modules_to_save": "lm_head"}, r"modules_to_save must be list\[str\] \| None"),
        ({"task_type": 3}, r"task_type must be TaskType \| str \| None"),
    ],
)
def test_wrong_types_inside_containers(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigTypeError, match=match):
        funcpeft.LoraConfig(**kwargs)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_what_funcpeft_accepts_peft_accepts(cls: type) -> None:
    """Ints for every float field, tuples for lists: funcpeft's file loads in PEFT with the same values."""
    kwargs: dict[str, Any] = {name: 0 for name, kind in _scalar_fields(cls) if kind is float}
    kwargs["target_modules"] = ("q_proj", "v_proj")
    if cls is IA3Config:
        kwargs["feedforward_modules"] = ("v_proj",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VeRA warns about save_projection... only when False
        config = cls(**kwargs)
    data = json.loads(config.to_json_string())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = getattr(peft, cls.__name__).from_peft_type(**data)
    ours = theirs.to_dict()
    for name in kwargs:
        want = getattr(config, name)
        got = ours[name]
        assert (sorted(got) if isinstance(got, (set, list)) else got) == (
            sorted(want) if isinstance(want, set) else want
        ), name


# -- config files ------------------------------------------------------------------------------------------------
PEFT_CONFIGS = {
    "LoraConfig": dict(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        bias="lora_only",
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 8},
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        modules_to_save=["lm_head"],
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
        exclude_modules=["x"],
        fan_in_fan_out=False,
        use_dora=True,
    ),
    "IA3Config": dict(
        target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
        exclude_modules="nothing",
    ),
    "LoHaConfig": dict(
        r=4,
        alpha=16,
        rank_dropout=0.1,
        module_dropout=0.2,
        use_effective_conv2d=True,
        target_modules=["q_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 3},
        init_weights=False,
        layers_to_transform=1,
        layers_pattern=["layers"],
    ),
    "LoKrConfig": dict(
        r=4,
        alpha=16,
        decompose_both=True,
        decompose_factor=4,
        rank_dropout_scale=True,
        init_weights="lycoris",
        target_modules="q_proj|v_proj",
        module_dropout=0.1,
    ),
    "VeraConfig": dict(
        r=16,
        projection_prng_key=3,
        vera_dropout=0.1,
        d_initial=0.2,
        target_modules=["q_proj", "v_proj"],
        bias="vera_only",
        init_weights=False,
        layers_to_transform=[1],
        layers_pattern="layers",
    ),
}


def _peft_config_dir(name: str, root: Path) -> Path:
    d = root / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(peft, name)(**PEFT_CONFIGS[name]).save_pretrained(d)
    return d


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_configs_peft_writes_load_unchanged(name: str, tmp_path: Path) -> None:
    d = _peft_config_dir(name, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even an unknown-key warning
        config = fio.read_config(d)
    assert type(config).__name__ == name
    written = json.loads((d / fio.CONFIG_NAME).read_text())
    written.pop("runtime_config", None)
    ours = {
        k: sorted(v) if isinstance(v, (set, list)) and k.endswith("modules") else v for k, v in config.to_dict().items()
    }
    written = {k: sorted(v) if isinstance(v, list) and k.endswith("modules") else v for k, v in written.items()}
    assert ours == written


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize(("field", "bad"), [("inference_mode", "false"), ("peft_version", 21), ("target_modules", 7)])
def test_a_wrong_type_in_a_config_file_names_the_file(name: str, field: str, bad: Any, tmp_path: Path) -> None:
    d = _peft_config_dir(name, tmp_path)
    path = d / fio.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), field: bad}))
    with pytest.raises(ConfigTypeError) as info:
        fio.read_config(d)
    assert str(info.value).startswith(f"{path}: {name}.{field} must be ") and repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("field", "bad", "expected"),
    [
        ("lora_alpha", "16", "float"),
        ("use_rslora", "false", "bool"),
        ("r", 4.0, "int"),
        ("lora_dropout", "0.1", "float"),
    ],
)
def test_lora_config_file_with_wrong_types(field: str, bad: Any, expected: str, tmp_path: Path) -> None:
    d = _peft_config_dir("LoraConfig", tmp_path)
    path = d / fio.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), field: bad}))
    with pytest.raises(ConfigTypeError, match=re.escape(f"{path}: LoraConfig.{field} must be {expected}")):
        fio.read_config(d)


def test_config_file_in_utf16_is_named(tmp_path: Path) -> None:
    d = _peft_config_dir("LoraConfig", tmp_path)
    path = d / fio.CONFIG_NAME
    text = path.read_text(encoding="utf-8")
    for encoding, what in (
        ("utf-16", "UTF-16 byte-order mark"),
        ("utf-16-le", "NUL characters"),
        ("latin-1", "not UTF-8"),
    ):
        path.write_bytes(
            (text.replace('"layers"', '"l\u00e4yers"') if encoding == "latin-1" else text).encode(encoding)
        )
        with pytest.raises(ValueError) as info:
            fio.read_config(d)
        assert str(path) in str(info.value) and what in str(info.value), (encoding, str(info.value))


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


@pytest.mark.parametrize(
    ("kind", "target", "name", "type_name"),
    [
        ("gpt2", "ln_1", "transformer.h.0.ln_1", "LayerNorm"),
        ("llama", "input_layernorm", "model.layers.0.input_layernorm", "LlamaRMSNorm"),
    ],
)
def test_unsupported_layer_type_is_a_type_error_naming_module_and_type(
    kind: str, target: str, name: str, type_name: str
) -> None:
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
