"""PEFT's `IA3Config` (`peft.tuners.ia3.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init
from .._constants import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES


@validated_init
@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: learned vectors scaling a layer's output, or its input on `feedforward_modules`.

    feedforward_modules: like target_modules (regex str or list of names/suffixes; a list must be a subset
    of a list target_modules); None takes PEFT's per-model-type default. init_ia3_weights: True = ones
    (a no-op adapter), False = randn.
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    feedforward_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.IA3
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = IA3_TARGET_MODULES
    COMPRESS_TARGET_MODULES: ClassVar[bool] = False  # PEFT never compresses IA3's target_modules

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules", "feedforward_modules")
        check_layers_and_saved(self)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            if not self.feedforward_modules.issubset(self.target_modules):
                raise ValueError("`feedforward_modules` should be a subset of `target_modules`")

    def model_defaults(self, model_type: str | None) -> dict[str, Any]:
        """PEFT's `_prepare_adapter_config`: feedforward_modules from the model type when None."""
        if self.feedforward_modules is not None:
            return {}
        if model_type not in IA3_FEEDFORWARD_MODULES:
            raise ValueError(
                "Please specify `feedforward_modules` in `peft_config`: there is no default for "
                f"model_type {model_type!r} (known: {sorted(IA3_FEEDFORWARD_MODULES)[:8]}...)"
            )
        return {"feedforward_modules": set(IA3_FEEDFORWARD_MODULES[model_type])}
