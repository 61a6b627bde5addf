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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._constants import DEFAULT_TARGET_MODULES

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
        return (
            isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
            if args
            else isinstance(value, (list, tuple))
        )
    if container is set:
        return (
            isinstance(value, (set, frozenset)) and all(_matches(v, args[0]) for v in value)
            if args
            else isinstance(value, (set, frozenset))
        )
    if container is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
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

    # each config class sets its own; `peft_type` is set from it. One of PEFT's (PeftType), or, for a method outside
    # PEFT, a str of its own (e.g. "HALF_LORA": tests/test_contract.py's throwaway method)
    PEFT_TYPE: ClassVar[PeftType | str]

    @classmethod
    def type_name(cls) -> str:
        """`PEFT_TYPE` as the str adapter_config.json holds ("LORA")."""
        kind = cls.PEFT_TYPE
        return kind.value if isinstance(kind, PeftType) else kind

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
    # whether PEFT's dispatch writes the forced `fan_in_fan_out` (True for Conv1D, False for nn.Linear) back into the
    # config it saves (LoRA and most); False: it only warns, per layer (HiRA)
    WRITES_FAN_IN_FAN_OUT: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.peft_version is None:  # PEFT auto-fills it (peft.config.PeftConfig.__post_init__)
            self.peft_version = PEFT_VERSION
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(f"task_type {self.task_type!r} is not one of {[t.value for t in TaskType]}") from None
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

    def check_new_adapter_config(self, others: Mapping[str, PeftConfig]) -> None:
        """Raise when this config cannot join a model holding adapters `others` ({name: config}); PEFT's
        `_check_new_adapter_config` (e.g. KaSA with non-KaSA LoRA adapters)."""

    def default_targets(self, model: Any) -> Any:
        """target_modules PEFT derives from the model itself when none are given (None: the per-model_type table)."""
        return None

    def auxiliary_configs(self, model: Any) -> list[AuxiliaryConfig]:
        """Adapters of other methods this config applies next to its own layers, in the same adapter (tree, name,
        files): PEFT's auxiliary wrappers other than modules_to_save (LoRA's `trainable_token_indices`)."""
        return []

    def auxiliary_keys(self) -> tuple[tuple[str, str], ...]:
        """(leaf name, key tail) of the auxiliary parts' parameters in PEFT's files (`KeyRules.renamed`), known
        without a model: e.g. ("trainable_tokens_delta", "token_adapter.trainable_tokens_delta")."""
        return ()

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


# -- LoRA variant sub-configs (peft/tuners/lora/config.py): same names, fields, defaults and checks ----------
class AuxiliaryConfig(typing.NamedTuple):
    """An auxiliary part of an adapter (`PeftConfig.auxiliary_configs`): the config of the method it applies
    (e.g. a `TrainableTokensConfig`) and whether the layers tied to the input embedding take its adapter
    (`Method.tie`). PEFT's auxiliary wrappers do not save the tied layers' copies (`Tie.saved` False)."""

    config: PeftConfig
    tie: bool
    key_part: str  # PEFT's wrapper keeps the method's layer under this attribute: `{path}.{key_part}.{param}` keys


@dataclass
class LoraRuntimeConfig:
    """PEFT's `LoraRuntimeConfig`: runtime-only settings, never saved (PEFT drops `runtime_config` from its files).

    ephemeral_gpu_offload: PEFT copies CPU-resident adapter data to the GPU for DoRA's init only; numerically a
    no-op, so funcpeft accepts it and computes where the weights are (see `LoraConfig`).
    """

    ephemeral_gpu_offload: bool = False

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class VeloraConfig:
    """PEFT's `VeloraConfig` (VeLoRA: compressed activations for lora_A's gradient; see funcpeft.methods.velora)."""

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"

    def __post_init__(self) -> None:
        check_types(self)
        if self.num_groups <= 0:
            raise ValueError(f"`num_groups` should be positive, got {self.num_groups}.")
        if self.scale <= 0:
            raise ValueError(f"`scale` should be positive, got {self.scale}.")
        if self.init_type not in {"batch_average_once", "batch_average", "random"}:
            raise ValueError(
                "Unsupported `init_type` "
                f"{self.init_type!r}. Supported values are 'batch_average_once', "
                "'batch_average', and 'random'."
            )


@dataclass
class MontecloraConfig:
    """PEFT's `MontecloraConfig` (Monte Carlo LoRA; see funcpeft.methods.monteclora)."""

    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150

    def __post_init__(self) -> None:
        check_types(self)
        if self.num_samples <= 0:
            raise ValueError("`num_samples` must be greater than 0.")
        if self.dirichlet_prior <= 0:
            raise ValueError("`dirichlet_prior` must be greater than 0.")
        if self.buffer_size <= 0:
            raise ValueError("`buffer_size` must be greater than 0.")


@dataclass
class ArrowConfig:
    """PEFT's `ArrowConfig` (Arrow routing among LoRA experts, GenKnowSub; see funcpeft._arrow).

    task_adapter_names / gks_adapter_names are set by `create_arrow_model` (not __init__ arguments, as in PEFT).
    """

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    task_adapter_names: list[str] | None = field(default=None, init=False)
    gks_adapter_names: list[str] | None = field(default=None, init=False)
    rng_seed: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.top_k <= 0:
            raise ValueError("top_k cannot be negative.")
        if self.router_temperature <= 0:
            raise ValueError("router_temperature must be greater than 0.")


# -- LoRA init sub-configs (peft/tuners/lora/config.py): same names, fields, defaults and checks ---------------
@dataclass
class LoftQConfig:
    """PEFT's `LoftQConfig`: quantisation bits (4: NF4, 8: int8) and alternating iterations."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class EvaConfig:
    """PEFT's `EvaConfig` (Explained Variance Adaptation; see funcpeft.eva)."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")


@dataclass
class CordaConfig:
    """PEFT's `CordaConfig` (see funcpeft.corda.preprocess_corda)."""

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.corda_method not in ("ipm", "kpm"):  # PEFT raises this in preprocess_corda; here at once
            raise ValueError(f"Invalid corda_method found: {self.corda_method}, it should be 'ipm' or 'kpm'.")


@dataclass
class LoraGAConfig:
    """PEFT's `LoraGAConfig` (see funcpeft.loraga.preprocess_loraga)."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16

    def __post_init__(self) -> None:
        check_types(self)
        # PEFT leaves these unchecked (an unknown value fails later with a NameError in lora_ga_init)
        if self.direction not in ("ArBr", "A2rBr", "ArB2r", "random"):
            raise ValueError(f"`direction` must be 'ArBr', 'A2rBr', 'ArB2r' or 'random', got {self.direction!r}")
        if self.scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise ValueError(f"`scale` must be 'stable', 'weight_svd', 'gd_scale' or 'unit', got {self.scale!r}")


_SUB_CONFIGS: dict[str, type] = {"eva_config": EvaConfig, "corda_config": CordaConfig, "lora_ga_config": LoraGAConfig}


def _sub_config(owner: str, name: str, value: Any, cls: type, strict: bool = False) -> Any:
    """PEFT's `_get_lora_subconfig`: None, an instance, or a dict (as loaded from adapter_config.json).

    A dict's `init=False` fields (ArrowConfig's adapter names) are set after construction: PEFT drops them, which
    leaves a reloaded Arrow router without its experts. strict: unknown keys are an error (PEFT's
    `MontecloraConfig(**dict)`), else ignored (PEFT's filter).
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigTypeError(
            f"{owner}.{name}: `{cls.__name__}` must be a `{cls.__name__}`, a dict, or None, got {value!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if strict:
        _check_init_kwargs(cls, {k: v for k, v in value.items() if k not in fields or fields[k].init})
    out = cls(**{k: v for k, v in value.items() if k in fields and fields[k].init})
    for k, v in value.items():
        if k in fields and not fields[k].init:
            setattr(out, k, v)
    check_types(out)
    return out


# (field, sub-config class, strict) for LoraConfig's variant sub-configs
_VARIANT_SUB_CONFIGS: tuple[tuple[str, type, bool], ...] = (
    ("velora_config", VeloraConfig, False),
    ("monteclora_config", MontecloraConfig, True),
    ("arrow_config", ArrowConfig, False),
    ("runtime_config", LoraRuntimeConfig, False),
)
# init_lora_weights values: True/False and these strings ("pissa_niter_<K>" too)
INIT_LORA_WEIGHTS = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "lora_ga")
# inits that change the base weights (PiSSA, OLoRA, CorDA, LoRA-GA): their adapters convert to plain LoRA on save
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")


def normalize_init(value: Any) -> bool | str:
    """`init_lora_weights` as funcpeft handles it: True/False, one of INIT_LORA_WEIGHTS or 'pissa_niter_<K>'.

    PEFT compares 'olora' and 'gaussian' case-insensitively (so 'OLoRA' is OLoRA); other values are exact.
    """
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"`init_lora_weights` must be True, False or a str, got {value!r}")
    low = value.lower()
    if low in ("olora", "gaussian"):
        return value
    if value in INIT_LORA_WEIGHTS:
        return value
    if value.startswith("pissa_niter_"):
        niter = value[len("pissa_niter_") :]
        if niter.isdigit():
            return value
        raise ValueError(
            f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]' with a non-negative integer "
            f"number of iterations, got {value!r}"
        )
    if value == "mica":  # a LoRA variant (funcpeft.methods.mica)
        return value
    close = difflib.get_close_matches(value, [*INIT_LORA_WEIGHTS, "pissa_niter_16"], n=2)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"Unknown initialization init_lora_weights={value!r}: expected True, False, 'gaussian', 'eva', 'olora', "
        f"'pissa', 'pissa_niter_[number of iters]', 'corda', 'loftq', 'orthogonal' or 'lora_ga'.{hint}"
    )


def init_mode(value: bool | str) -> bool | str:
    """The init family of a normalized `init_lora_weights`: 'pissa_niter_4' -> 'pissa', 'OLoRA' -> 'olora'."""
    if isinstance(value, bool):
        return value
    if value.startswith("pissa"):
        return "pissa"
    return value.lower() if value.lower() in ("olora", "gaussian") else value


@dataclass
class KasaConfig:
    """PEFT's `KasaConfig` (KaSA, `LoraConfig(kasa_config=...)`): the regulariser weights of `kasa_loss`.

    beta: weight of `sum(lora_diag ** 2)`; gamma: weight of `||B^T B - I|| + ||A A^T - I||` (both >= 0).
    LoraConfig stores it as the dict PEFT writes to adapter_config.json.
    """

    beta: float = 1e-4
    gamma: float = 1e-3

    def __post_init__(self) -> None:
        check_types(self)
        if self.beta < 0:
            raise ValueError(f"`beta` must be non-negative, got {self.beta}.")
        if self.gamma < 0:
            raise ValueError(f"`gamma` must be non-negative, got {self.gamma}.")


@dataclass
class BdLoraConfig:
    """PEFT's `BdLoraConfig` (BD-LoRA, `LoraConfig(use_bdlora=...)`): which layers get a block-diagonal lora_A or lora_B.

    A target whose full name contains a `target_modules_bd_a` entry (substring match, PEFT's rule) gets a
    block-diagonal lora_A of `nblocks` blocks, one matching `target_modules_bd_b` a block-diagonal lora_B;
    with `match_strict`, every target must match one of them. LoraConfig stores it as the dict PEFT writes.
    """

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ValueError(
                "Found overlapping modules in target_modules_bd lists:"
                f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B)."
            )
        if self.nblocks <= 0:
            raise ValueError(f"`nblocks` must be a positive integer, got {self.nblocks}")


def _sub_config_dict(config: Any, name: str, cls: Any) -> None:
    """A nested sub-config as the dict PEFT saves (`dataclasses.asdict`), from an instance or a dict (PEFT's
    `_get_lora_subconfig`, which drops keys the class does not know: funcpeft warns about them, with close matches)."""
    value = getattr(config, name)
    if value is None:
        return
    if isinstance(value, cls):
        setattr(config, name, dataclasses.asdict(value))
        return
    if not isinstance(value, dict):
        raise ConfigTypeError(
            f"`{cls.__name__}` must be a `{cls.__name__}`, a dict, or None (LoraConfig.{name}), got {value!r}"
        )
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k in value if k not in known)
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = ", ".join(f"{k!r} (did you mean {c[0]!r}?)" if c else repr(k) for k, c in close.items())
        warnings.warn(
            f"LoraConfig.{name}: unexpected keys {hints} for {cls.__name__} are ignored (PEFT drops them too; "
            f"known: {sorted(known)})",
            UserWarning,
            stacklevel=4,
        )
    setattr(config, name, dataclasses.asdict(cls(**{k: v for k, v in value.items() if k in known})))


# PEFT's LoRA variants (`LoraLayer.resolve_lora_variant`): config fields tagged `is_lora_variant`, and the
# init_lora_weights values that select one; a layer takes at most one
LORA_VARIANT_FIELDS = (
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
LORA_VARIANT_INITS = ("mica",)


def check_token_indices(indices: Any, what: str) -> None:
    """A list of distinct non-negative ints (PEFT's index_copy would pick one of duplicates at random)."""
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indices
    ):
        raise ValueError(f"`{what}` must be a list of int token indices, got {indices!r}")
    negative = [i for i in indices if i < 0]
    if negative:
        raise ValueError(f"`{what}` must be non-negative token indices, got {negative}")
    seen: set[int] = set()
    dup = sorted({i for i in indices if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dup:
        raise ValueError(
            f"`{what}` has duplicates {dup}: PEFT would write one of the duplicated rows at random (index_copy); "
            "list each token once"
        )


def check_lora_token_indices(value: Any) -> None:
    """LoraConfig.trainable_token_indices: a list of token indices, or {embedding module name: token indices}."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("`trainable_token_indices` is an empty dict: name at least one embedding module")
        for name, indices in value.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"`trainable_token_indices` keys must be module names (str), got {name!r}")
            check_token_indices(indices, f"trainable_token_indices[{name!r}]")
    else:
        check_token_indices(value, "trainable_token_indices")


@dataclass
class LoraConfig(PeftConfig):
    """PEFT's `LoraConfig`: same field names, same defaults, same validation.

    Implemented: r, lora_alpha, lora_dropout, target_modules, exclude_modules, fan_in_fan_out, bias,
    use_rslora, use_dora (funcpeft.methods.dora), modules_to_save, init_lora_weights (all of PEFT's: True/False/
    "gaussian"/"mica"/PiSSA/OLoRA/orthogonal/LoftQ/EVA/CorDA/LoRA-GA), layers_to_transform, layers_pattern,
    rank_pattern, alpha_pattern, lora_bias, kasa_config (a `KasaConfig` or its dict), use_bdlora (a `BdLoraConfig`
    or its dict), ensure_weight_tying, trainable_token_indices (a trainable-tokens part of the adapter,
    `auxiliary_configs`), target_parameters (bare nn.Parameters such as MoE expert stacks;
    funcpeft.methods.lora), velora_config, monteclora_config, alora_invocation_tokens, arrow_config
    (funcpeft.methods: velora, monteclora, alora, arrow), layer_replication, runtime_config (a no-op, as in PEFT
    on CPU), task_type, base_model_name_or_path, revision, inference_mode. use_qalora and megatron_config raise
    NotImplementedError with the reason (GPTQ / Megatron layers, GPU-only); every other field is implemented.
    Nested sub-configs are stored as the dicts PEFT writes.
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
    loftq_config: LoftQConfig | dict = field(default_factory=dict)
    eva_config: EvaConfig | dict | None = None
    corda_config: CordaConfig | dict | None = None
    lora_ga_config: LoraGAConfig | dict | None = None
    use_dora: bool = False
    velora_config: VeloraConfig | dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: MontecloraConfig | dict | None = None
    layer_replication: list[list[int]] | None = None
    runtime_config: LoraRuntimeConfig | dict | None = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = False
    target_parameters: list[str] | set[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: ArrowConfig | dict | None = None
    kasa_config: KasaConfig | dict | None = None
    ensure_weight_tying: bool = False

    # its trainable-tokens part (`trainable_token_indices`): set by funcpeft.configs.trainable_tokens, which
    # builds TrainableTokensConfigs and so cannot be imported here (it is above this module)
    AUXILIARY_PARTS: ClassVar[Callable[[Any, Any], list[AuxiliaryConfig]] | None] = None
    AUXILIARY_KEYS: ClassVar[tuple[tuple[str, str], ...]] = ()
    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA
    CONVERTS_MOE_TARGETS: ClassVar[bool] = True  # PEFT converts only LoRA configs

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        _sub_config_dict(self, "kasa_config", KasaConfig)
        _sub_config_dict(self, "use_bdlora", BdLoraConfig)
        super().__post_init__()
        check_rank(self)
        check_probability(self, "lora_dropout")
        check_module_names(self, "target_modules", "exclude_modules")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self.init_lora_weights = normalize_init(self.init_lora_weights)
        for name, cls in _SUB_CONFIGS.items():
            setattr(self, name, _sub_config(type(self).__name__, name, getattr(self, name), cls))
        for name, cls, strict in _VARIANT_SUB_CONFIGS:
            setattr(self, name, _sub_config(type(self).__name__, name, getattr(self, name), cls, strict))
        self._check_init_sub_configs()
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    f"The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={self.init_lora_weights} instead."
                )
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        variants = self.requested_variants()
        if len(variants) > 1:  # PEFT raises this when it builds the first layer; the config alone decides it
            raise ValueError(
                f"Invalid or unsupported variant combination: {variants} (a LoRA layer takes at most one of the "
                f"variants {sorted(LORA_VARIANT_FIELDS + LORA_VARIANT_INITS)})"
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
        self._check_variant_options()
        if self.trainable_token_indices is not None:
            check_lora_token_indices(self.trainable_token_indices)

    def auxiliary_configs(self, model: Any) -> list[AuxiliaryConfig]:
        """`trainable_token_indices` as trainable tokens on the named embeddings (PEFT's TrainableTokensWrapper)."""
        if self.trainable_token_indices is None:
            return []
        parts = type(self).__dict__.get("AUXILIARY_PARTS") or LoraConfig.__dict__["AUXILIARY_PARTS"]
        assert parts is not None, "funcpeft.configs.trainable_tokens registers LoraConfig's parts"
        return list(parts.__func__(model, self) if isinstance(parts, staticmethod) else parts(model, self))

    def auxiliary_keys(self) -> tuple[tuple[str, str], ...]:
        if self.trainable_token_indices is None:
            return ()
        return self.AUXILIARY_KEYS

    def _check_variant_options(self) -> None:
        """PEFT's rules for the variant options, raised here rather than when the layers are built."""
        if self.use_dora and self.megatron_config:
            raise ValueError("DoRA does not support megatron_core, please set `use_dora=False`.")
        if self.megatron_config:  # PEFT's dispatch tests truthiness: {} is plain LoRA there too
            raise NotImplementedError(
                f"LoraConfig.megatron_config={self.megatron_config!r}: PEFT then builds Megatron tensor-parallel LoRA "
                f"layers from the `{self.megatron_core}` package (megatron-core, CUDA and torch.distributed model "
                "parallelism); funcpeft adapts plain layers only and cannot run or test Megatron layers here. Load the "
                "model without Megatron parallelism, or leave megatron_config=None."
            )
        if self.use_qalora:
            raise NotImplementedError(
                "LoraConfig.use_qalora=True (QALoRA): PEFT applies it only to GPTQ-quantised layers (gptqmodel's "
                "BaseQuantLinear, CUDA kernels), where lora_A reads the input pooled in groups of qalora_group_size; on "
                "any other layer PEFT silently trains plain LoRA. funcpeft adapts plain floating-point layers only, so "
                "QALoRA could only be that silent no-op here: set use_qalora=False for plain LoRA."
            )
        if self.alora_invocation_tokens is not None:
            tokens = self.alora_invocation_tokens
            if not tokens or any(t < 0 for t in tokens):
                raise ValueError(
                    f"`alora_invocation_tokens` must be a non-empty list of token ids (>= 0), got {tokens!r}: PEFT "
                    "treats an empty list as plain LoRA, which would silently drop the activation."
                )
            self.alora_invocation_tokens = list(tokens)
            if self.task_type != TaskType.CAUSAL_LM:
                warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", stacklevel=4)
        if self.layer_replication is not None:
            pairs = self.layer_replication
            if not pairs or any(len(p) != 2 or not 0 <= p[0] < p[1] for p in pairs):
                raise ValueError(
                    "`layer_replication` must be a non-empty list of [start, end) layer ranges with 0 <= start < end, "
                    f"e.g. [[0, 4], [2, 5]]; got {pairs!r}"
                )
            self.layer_replication = [[int(a), int(b)] for a, b in pairs]

    def requested_variants(self) -> tuple[str, ...]:
        """PEFT's requested LoRA variant keys, sorted (`resolve_lora_variant`): e.g. () for plain LoRA, ("use_dora",)."""
        names = [f for f in LORA_VARIANT_FIELDS if getattr(self, f)]
        names += [v for v in LORA_VARIANT_INITS if self.init_lora_weights == v]
        return tuple(sorted(names))

    @property
    def lora_variant(self) -> str | None:
        """The one LoRA variant this config selects (a `requested_variants` key), None for plain LoRA."""
        variants = self.requested_variants()
        return variants[0] if variants else None

    def check_new_adapter_config(self, others: Mapping[str, PeftConfig]) -> None:
        """PEFT's rule: KaSA truncates the base weight, so it cannot share a model with non-KaSA adapters. funcpeft
        also refuses a second KaSA adapter (PEFT truncates the weight again, so each sees another base)."""
        uses_kasa = self.kasa_config is not None
        for name, other in others.items():
            other_kasa = getattr(other, "kasa_config", None) is not None
            if uses_kasa is not other_kasa:
                raise ValueError(
                    "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base "
                    f"weights: the new adapter {'uses' if uses_kasa else 'does not use'} KaSA but adapter "
                    f"'{name}' {'does not' if uses_kasa else 'does'}."
                )
            if uses_kasa:
                raise NotImplementedError(
                    f"A second KaSA adapter next to {name!r}: PEFT truncates the base weight once more for each KaSA "
                    "adapter it adds, so the base each adapter sees depends on the order they were added; funcpeft "
                    "supports one KaSA adapter per model (stack several trees of one adapter for ensembles instead)."
                )

    def _check_init_sub_configs(self) -> None:
        """PEFT's rules for init_lora_weights and its sub-configs (one `elif` chain, warnings included)."""
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dict(vars(self.loftq_config))
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
            if bits not in (4, 8):  # PEFT raises these in loftq_init, at get_peft_model time
                raise ValueError(f"Only nf4 and int8 quantization is supported (loftq_bits 4 or 8), got {bits!r}")
            if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
                raise ValueError(f"Number of iterations must be greater than 0 (loftq_iter), got {iters!r}")
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn(
                "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.", stacklevel=4
            )
        elif self.init_lora_weights == "eva" and self.eva_config is None:
            warnings.warn(
                "`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.",
                stacklevel=4,
            )
            self.eva_config = EvaConfig()
        elif self.init_lora_weights != "eva" and self.eva_config is not None:
            warnings.warn(
                "`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.", stacklevel=4
            )
        elif self.init_lora_weights == "corda" and self.corda_config is None:
            warnings.warn(
                "`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA config.",
                stacklevel=4,
            )
            self.corda_config = CordaConfig()
        elif self.init_lora_weights != "corda" and self.corda_config is not None:
            warnings.warn(
                "`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.", stacklevel=4
            )
        if (
            self.use_rslora
            and (self.rank_pattern or self.alpha_pattern)
            and init_mode(self.init_lora_weights) in MUTATING_INITS
        ):
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
                "base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values of the "
                "base weights; if you intend to do this, please ensure not to use rslora or rank_pattern/alpha_pattern.",
                stacklevel=4,
            )

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict: sub-configs become dicts (PEFT's `asdict`)."""
        out = super().to_dict()
        for name in [*_SUB_CONFIGS, *(name for name, _, _ in _VARIANT_SUB_CONFIGS)]:
            if dataclasses.is_dataclass(out.get(name)):
                out[name] = dataclasses.asdict(out[name])
        return out


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


for _cls in (LoraConfig, LoftQConfig, EvaConfig, CordaConfig, LoraGAConfig):
    validated_init(_cls)
