"""Adapter configurations: PEFT's field names and defaults, validated, as plain dataclasses.

A config is data. funcpeft never mutates a config passed in: `get_peft_model` resolves it
(all-linear expansion, forced `fan_in_fan_out`, ...) into a *new* config with `dataclasses.replace`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import json
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .constants import DEFAULT_TARGET_MODULES

PEFT_VERSION = "0.21.2"  # the PEFT release whose behaviour and file format funcpeft reproduces


class TaskType(str, enum.Enum):
    """PEFT's task types (`peft.TaskType`)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """`peft.PeftType`: all 45 of PEFT 0.21.2's adapter types (funcpeft.methods.METHODS says which are implemented)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"


class ConfigTypeError(TypeError, ValueError):
    """A config field holds a value of the wrong type.

    A TypeError, and also a ValueError like every other config check, so `except ValueError` still catches it.
    """


def _type_name(hint: Any) -> str:
    """`list[str] | set[str] | str | None` as written in the class, without module prefixes."""
    if hint is type(None):
        return "None"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits the field annotation `hint`. An int is a float; a bool is not an int;
    a tuple is a list (JSON has no tuples; PEFT treats both alike)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    container = origin or hint
    if container is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args)))
    if container is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if container is set:
        return isinstance(value, (set, frozenset)) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, (set, frozenset))
    if container is dict:
        return isinstance(value, dict) and (not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if origin is None and isinstance(hint, type):  # str, an Enum
        return isinstance(value, hint)
    raise TypeError(f"funcpeft cannot check values against the annotation {hint!r}")  # a new kind of field type


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return _FIELD_TYPES[cls]


def check_types(config: Any) -> None:
    """Every field against its dataclass annotation: one generic rule for all config classes."""
    for name, hint in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, hint):
            note = " (true or false, not a string)" if hint is bool else " (an int is fine)" if hint is float else ""
            raise ConfigTypeError(
                f"{type(config).__name__}.{name} must be {_type_name(hint)}{note}, got {value!r} ({type(value).__name__})"
            )


def _check_init_kwargs(cls: type, kwargs: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TypeError(f"{cls.__name__} got an unexpected field {k!r}.{hint}")


@dataclass
class PeftConfig:
    """Fields every PEFT config has (`peft.config.PeftConfig`)."""

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    PEFT_TYPE: ClassVar[PeftType]  # each config class sets its own; `peft_type` is set from it
    # per-model_type targets when target_modules is None (PEFT's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING)
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = DEFAULT_TARGET_MODULES
    # whether >= 20 matched names are compressed to suffixes (PEFT skips it for IA3, coupled to feedforward_modules)
    COMPRESS_TARGET_MODULES: ClassVar[bool] = True
    # whether PEFT rewrites the targets for transformers-v5 MoE models (funcpeft._targeting.convert_moe_targets)
    CONVERTS_MOE_TARGETS: ClassVar[bool] = False

    # fields that exist for file compatibility but whose non-default values funcpeft does not implement
    _unimplemented: ClassVar[dict[str, Any]] = {}
    # fields PEFT drops when it writes adapter_config.json
    _not_saved: ClassVar[frozenset[str]] = frozenset({"runtime_config"})
    # PEFT's save_embedding_layers="auto" saves a targeted embedding, except for trainable tokens
    SAVES_TARGETED_EMBEDDINGS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.peft_version is None:  # PEFT auto-fills it (peft.config.PeftConfig.__post_init__)
            self.peft_version = PEFT_VERSION
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(
                    f"task_type {self.task_type!r} is not one of {[t.value for t in TaskType]}"
                ) from None
        for name, default in self._unimplemented.items():
            value = getattr(self, name)
            if value != default and not (value is None and default in ({}, [], None)):
                raise NotImplementedError(
                    f"{type(self).__name__}.{name}={value!r} is not implemented in funcpeft yet "
                    f"(only the default {default!r} is supported)."
                )

    def model_defaults(self, model_type: str | None) -> dict[str, Any]:
        """Fields PEFT fills in from the model type at get_peft_model time (e.g. IA3's feedforward_modules)."""
        return {}

    def default_targets(self, model: Any) -> Any:
        """target_modules PEFT derives from the model itself when none are given (None: the per-model_type table)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it (sets become sorted lists, enums their values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in self._not_saved:
                continue
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """`to_dict()` as PEFT writes adapter_config.json: indent 2, sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build from a saved dict; keys this version does not know are warned about and ignored (PEFT's rule)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. "
                "This probably means that you're loading a configuration file that was saved using a "
                "higher version of the library.",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class LoraConfig(PeftConfig):
    """PEFT's `LoraConfig`: same field names, same defaults, same validation.

    Implemented: r, lora_alpha, lora_dropout, target_modules, exclude_modules, fan_in_fan_out, bias,
    use_rslora, use_dora (funcpeft.methods.dora), modules_to_save, init_lora_weights (True/False/"gaussian"), layers_to_transform,
    target_parameters (bare nn.Parameters such as MoE expert stacks; funcpeft.methods.lora),
    layers_pattern, rank_pattern, alpha_pattern, task_type, base_model_name_or_path, revision,
    inference_mode. Every other field must keep its default: a non-default value raises
    NotImplementedError naming the field.
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[list[int]] | None = None
    runtime_config: dict | None = None
    lora_bias: bool = False
    target_parameters: list[str] | set[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA
    CONVERTS_MOE_TARGETS: ClassVar[bool] = True  # PEFT converts only LoRA configs
    _unimplemented: ClassVar[dict[str, Any]] = {
        "megatron_config": None,
        "trainable_token_indices": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "monteclora_config": None,
        "layer_replication": None,
        "lora_bias": False,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "ensure_weight_tying": False,
    }

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        check_probability(self, "lora_dropout")
        check_module_names(self, "target_modules", "exclude_modules")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            if isinstance(self.init_lora_weights, str):
                raise NotImplementedError(
                    f"init_lora_weights={self.init_lora_weights!r} is not implemented in funcpeft yet "
                    "(supported: True, False, 'gaussian')."
                )
            raise ValueError(f"`init_lora_weights` must be True, False or a str, got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)


# -- checks shared by the configs (PEFT's __post_init__ rules; lists become sets) -----------------------------
def check_rank(config: Any) -> None:
    """`r` a positive int; rank_pattern / alpha_pattern dicts (when the config has them)."""
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {config.r!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if hasattr(config, name) and not isinstance(getattr(config, name), dict):
            raise ValueError(f"`{name}` must be a dict of regex -> value, got {getattr(config, name)!r}")
    pattern = getattr(config, "rank_pattern", {})
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pattern.values()):
        raise ValueError(f"`rank_pattern` values must be positive integers, got {pattern!r}")


def check_probability(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")


def check_module_names(config: Any, *names: str) -> None:
    """Module-name fields: a regex str, a list of str (turned into a set, like PEFT) or None."""
    for name in names:
        value = getattr(config, name)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
            raise ValueError(
                f"`{name}` must be a str (a regex matched with re.fullmatch), a list of str "
                f"(exact names or name suffixes) or None; got {value!r}"
            )
        setattr(config, name, set(value))


def check_layers_and_saved(config: Any) -> None:
    """layers_pattern needs layers_to_transform; modules_to_save is a list of str."""
    if getattr(config, "layers_pattern", None) and getattr(config, "layers_to_transform", None) is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
    if config.modules_to_save is not None:
        if isinstance(config.modules_to_save, str) or not all(isinstance(m, str) for m in config.modules_to_save):
            raise ValueError(f"`modules_to_save` must be a list of str, got {config.modules_to_save!r}")
        config.modules_to_save = list(config.modules_to_save)


def validated_init(cls: type) -> type:
    """Wrap a config's dataclass __init__ so that unknown fields raise a TypeError with close matches."""
    init: Any = cls.__init__  # type: ignore[misc]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _check_init_kwargs(cls, kwargs)
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    __init__.__signature__ = __import__("inspect").signature(init)  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign,misc]
    return cls


validated_init(LoraConfig)
