"""Configs of the adapter methods beyond LoRA: PEFT's class names, fields, defaults and checks.

Importing this package registers them in `funcpeft.config.CONFIG_CLASSES` (by peft_type).
"""

from ..config import CONFIG_CLASSES
from .ia3 import IA3Config
from .lycoris import LoHaConfig, LoKrConfig
from .vera import VeraConfig

CONFIG_CLASSES.update({"IA3": IA3Config, "LOHA": LoHaConfig, "LOKR": LoKrConfig, "VERA": VeraConfig})

__all__ = ["IA3Config", "LoHaConfig", "LoKrConfig", "VeraConfig"]
