"""PEFT's `LNTuningConfig` (`peft.tuners.ln_tuning.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, validated_init
from .._constants import LNTUNING_TARGET_MODULES


@validated_init
@dataclass
class LNTuningConfig(PeftConfig):
    """LN tuning: each targeted module (LayerNorm / RMSNorm, or any module) gets a trainable copy of its own
    parameters, which replaces them. Unlike most configs, PEFT keeps a list target_modules as a list."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LN_TUNING
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = LNTUNING_TARGET_MODULES

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"`{name}` must be a str (a regex), a list of str or None; got {value!r}")
        check_layers_and_saved(self)
