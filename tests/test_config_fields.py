"""Every registered config class has PEFT's fields, defaults and `to_dict` (one table over all methods)."""

from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Any

import peft
import pytest

import funcpeft
from funcpeft.methods import CONFIG_CLASSES

# fields funcpeft's class has on purpose and PEFT's does not, or the reverse: {class name: (extra, missing)}
DIFFERENCES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # PEFT sets `config.mask_fn` in __post_init__ (a plain attribute); funcpeft declares it (never saved either)
    "ShiraConfig": (frozenset({"mask_fn"}), frozenset()),
}
# the least a class needs to be constructed (PEFT's own requirements)
REQUIRED: dict[str, dict[str, Any]] = {"AdaLoraConfig": {"total_step": 10}}


def _value(v: Any) -> Any:
    """Enums by value, sub-configs (their own dataclass in each library) by their fields."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    return v.value if isinstance(v, enum.Enum) else v


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            out[f.name] = _value(f.default_factory())
        elif f.default is not dataclasses.MISSING:
            out[f.name] = _value(f.default)
        else:
            out[f.name] = dataclasses.MISSING
    return out


NAMES = sorted({cls.__name__ for cls in CONFIG_CLASSES.values()})


def test_the_table_covers_every_exported_config() -> None:
    assert NAMES and all(hasattr(funcpeft, n) and hasattr(peft, n) for n in NAMES), NAMES


@pytest.mark.parametrize("name", NAMES)
def test_fields_and_defaults_are_pefts(name: str) -> None:
    ours, theirs = _defaults(getattr(funcpeft, name)), _defaults(getattr(peft, name))
    extra, missing = DIFFERENCES.get(name, (frozenset(), frozenset()))
    assert set(ours) - set(theirs) == extra, f"{name}: fields PEFT does not have"
    assert set(theirs) - set(ours) == missing, f"{name}: PEFT's fields funcpeft lacks"
    shared = sorted((set(ours) & set(theirs)) - {"peft_version"})
    differ = {k: (ours[k], theirs[k]) for k in shared if ours[k] != theirs[k]}
    assert not differ, f"{name}: defaults differ (funcpeft, PEFT): {differ}"


@pytest.mark.parametrize("name", NAMES)
def test_to_dict_is_pefts(name: str) -> None:
    """A default config serialises like PEFT's (adapter_config.json), apart from the version stamp."""
    kwargs = REQUIRED.get(name, {})
    if "num_virtual_tokens" in _defaults(getattr(peft, name)):  # prompt learning: PEFT needs a task and a length
        kwargs = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(peft, name)(**kwargs)
        ours = getattr(funcpeft, name)(**kwargs)
    assert ours.to_dict()["peft_version"] == funcpeft._config.PEFT_VERSION  # the release funcpeft reproduces
    a = {k: _value(v) for k, v in ours.to_dict().items() if k != "peft_version"}
    b = {k: _value(v) for k, v in theirs.to_dict().items() if k != "peft_version"}
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert not differ, f"{name}: to_dict differs (funcpeft, PEFT): {differ}"


def _table(mapping: Any) -> dict[str, Any]:
    return {k: v if isinstance(v, str) else sorted(v) for k, v in mapping.items()}


def test_default_target_tables_are_pefts() -> None:
    """Each config's per-model-type default targets equal PEFT's `TRANSFORMERS_MODELS_TO_<TYPE>_TARGET_MODULES_MAPPING`
    (funcpeft keeps PEFT's tables as data in `_constants` and the configs; this catches a copy drifting)."""
    import peft.utils.constants as peft_constants

    compared = []
    for peft_type, cls in CONFIG_CLASSES.items():
        theirs = getattr(peft_constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_TARGET_MODULES_MAPPING", None)
        ours = getattr(cls, "DEFAULT_TARGET_MODULES", None)
        if theirs is None or ours is None:
            continue
        assert _table(ours) == _table(theirs), f"{cls.__name__}: default target modules differ from PEFT's {peft_type}"
        compared.append(peft_type)
    assert len(compared) >= 10, compared  # the table really covers the methods with PEFT mappings
