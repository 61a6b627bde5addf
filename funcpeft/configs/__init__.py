"""Adapter configurations: PEFT's class names, fields, defaults and checks, as plain dataclasses.

A config is data. funcpeft never mutates a config passed in: `get_peft_model` resolves it (all-linear
expansion, forced `fan_in_fan_out`, ...) into a *new* config with `dataclasses.replace`.
"""

from ..config import (
    PEFT_VERSION,
    CordaConfig,
    EvaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    PeftConfig,
    PeftType,
    TaskType,
)
from .ia3 import IA3Config
from .lycoris import LoHaConfig, LoKrConfig, LycorisConfig
from .vera import VeraConfig

__all__ = [
    "PEFT_VERSION",
    "CordaConfig",
    "EvaConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LycorisConfig",
    "PeftConfig",
    "PeftType",
    "TaskType",
    "VeraConfig",
]
