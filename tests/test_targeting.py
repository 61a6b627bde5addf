"""Property: for generated target specs, funcpeft adapts exactly the modules PEFT wraps, or both raise."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from helpers import MODELS, examples, funcpeft_lora_modules, peft_lora_modules
from hypothesis import given, settings
from hypothesis import strategies as st

import funcpeft

NAMES = {  # exact names, suffixes and near-misses per model
    "llama": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj",
        "gate_proj",
        "self_attn.q_proj",
        "mlp.up_proj",
        "layers.0.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
        "lm_head",
        "embed_tokens",
        "proj",
        "q",
        "nonexistent",
    ],
    "gpt2": [
        "c_attn",
        "c_proj",
        "c_fc",
        "attn.c_proj",
        "mlp.c_proj",
        "h.1.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "wte",
        "wpe",
        "attn",
        "proj",
        "nonexistent",
    ],
}
REGEXES = {
    "llama": [
        r".*\.(q_proj|v_proj)",
        r".*attn.*",
        r"model\.layers\.0\..*_proj",
        r".*mlp\.(up|down)_proj",
        r".*_proj",
        "lm_head",
        r"nothing.*",
    ],
    "gpt2": [
        r".*\.c_attn",
        r".*\.h\.1\..*",
        r".*c_(fc|proj)",
        r"transformer\.h\.0\.attn\.c_proj",
        r".*\.wte",
        r"nothing.*",
    ],
}
MODULES_TO_SAVE = {
    "llama": ["lm_head", "embed_tokens", "norm", "q_proj", "down_proj", "proj"],
    "gpt2": ["ln_f", "c_fc", "proj", "lm_head"],
}
LAYERS_PATTERNS = {"llama": ["layers", ["layers"], "h"], "gpt2": ["h", ["h", "layers"], "layers"]}

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")


@st.composite
def target_specs(draw: Any, kind: str) -> dict[str, Any]:
    names = NAMES[kind]
    is_regex = draw(st.booleans())
    spec: dict[str, Any] = {"r": 2}
    if is_regex:
        spec["target_modules"] = draw(st.sampled_from(REGEXES[kind] + ["all-linear"]))
    else:
        spec["target_modules"] = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    if draw(st.booleans()):
        spec["exclude_modules"] = draw(
            st.sampled_from(REGEXES[kind]) | st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)
        )
    if draw(st.integers(0, 12 if is_regex else 2)) == 0:  # a str target with layers_* raises: keep that rare
        spec["layers_to_transform"] = draw(st.integers(0, 2) | st.lists(st.integers(0, 2), max_size=2, unique=True))
        if draw(st.booleans()):
            spec["layers_pattern"] = draw(st.sampled_from(LAYERS_PATTERNS[kind]))
    if draw(st.integers(0, 2)) == 0:
        spec["modules_to_save"] = draw(
            st.lists(st.sampled_from(MODULES_TO_SAVE[kind]), min_size=1, max_size=2, unique=True)
        )
    return spec


_MODELS: dict[str, torch.nn.Module] = {}


def _model(kind: str) -> torch.nn.Module:
    if kind not in _MODELS:
        _MODELS[kind] = MODELS[kind]()
    return _MODELS[kind]


def _peft(kind: str, spec: dict[str, Any]) -> set[str] | Exception:
    import peft

    try:
        return peft_lora_modules(peft.get_peft_model(copy.deepcopy(_model(kind)), peft.LoraConfig(**spec)))
    except (ValueError, TypeError) as e:
        return e


def _funcpeft(kind: str, spec: dict[str, Any]) -> set[str] | Exception:
    try:
        return funcpeft_lora_modules(funcpeft.get_peft_model(_model(kind), funcpeft.LoraConfig(**spec)))
    except (ValueError, TypeError) as e:
        return e


def _expected_error(peft_error: Exception) -> type[Exception]:
    """PEFT's ValueError for an unsupported layer type is a TypeError in funcpeft (by design); the rest match."""
    if isinstance(peft_error, ValueError) and "is not supported" in str(peft_error):
        return TypeError
    return TypeError if isinstance(peft_error, TypeError) else ValueError


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@settings(max_examples=examples(60))
@given(data=st.data())
def test_targeted_modules_match_peft(kind: str, data: st.DataObject) -> None:
    spec = data.draw(target_specs(kind), label="spec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = _peft(kind, spec), _funcpeft(kind, spec)
    if isinstance(theirs, Exception):
        assert isinstance(ours, _expected_error(theirs)), f"PEFT raised {theirs!r}, funcpeft gave {ours!r}"
    else:
        assert not isinstance(ours, Exception), f"funcpeft raised {ours!r}, PEFT targeted {sorted(theirs)}"
        assert ours == theirs


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["proj"]}),  # wrapping a LoRA layer: TypeError
        ("llama", {"target_modules": ["lm_head"], "modules_to_save": ["layers"]}),  # a ModuleList: TypeError
        ("llama", {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}),  # all excluded: ValueError
        ("llama", {"target_modules": ".*", "layers_to_transform": [0]}),  # str target + layers: ValueError
        ("llama", {"target_modules": ["q_proj"], "layers_to_transform": [7]}),  # no such layer: ValueError
        ("llama", {"target_modules": ["q_proj"], "layers_pattern": "layers"}),  # pattern without layers: ValueError
        ("gpt2", {"target_modules": ["attn"]}),  # GPT2Attention is not adaptable: TypeError
    ],
)
def test_error_cases_match_peft(kind: str, spec: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = _peft(kind, spec), _funcpeft(kind, spec)
    assert isinstance(theirs, Exception), f"PEFT accepted {spec}"
    assert isinstance(ours, _expected_error(theirs)), f"PEFT raised {theirs!r}, funcpeft gave {ours!r}"
