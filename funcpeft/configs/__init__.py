"""Adapter configurations: PEFT's class names, fields, defaults and checks, as plain dataclasses.

A config is data. funcpeft never mutates a config passed in: `get_peft_model` resolves it (all-linear
expansion, forced `fan_in_fan_out`, ...) into a *new* config with `dataclasses.replace`.
"""

from .._config import (
    PEFT_VERSION,
    ArrowConfig,
    BdLoraConfig,
    CordaConfig,
    EvaConfig,
    KasaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    LoraRuntimeConfig,
    MontecloraConfig,
    PeftConfig,
    PeftType,
    TaskType,
    VeloraConfig,
)
from .adalora import AdaLoraConfig
from .adamss import AdamssConfig
from .adaption_prompt import AdaptionPromptConfig
from .beft import BeftConfig
from .boft import BOFTConfig
from .c3a import C3AConfig
from .cartridge import CartridgeConfig
from .cpt import CPTConfig
from .deft import DeftConfig
from .delora import DeloraConfig
from .fourierft import FourierFTConfig
from .frod import FrodConfig
from .glora import GloraConfig
from .gralora import GraloraConfig
from .hira import HiraConfig
from .hra import HRAConfig
from .ia3 import IA3Config
from .lily import LilyConfig
from .ln_tuning import LNTuningConfig
from .lycoris import LoHaConfig, LoKrConfig, LycorisConfig
from .miss import MissConfig
from .oft import OFTConfig
from .osf import OSFConfig
from .peanut import PeanutConfig
from .poly import PolyConfig
from .prompt_learning import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)
from .psoft import PsoftConfig
from .pvera import PveraConfig
from .randlora import RandLoraConfig
from .road import RoadConfig
from .shadow import ShadowConfig
from .shira import ShiraConfig
from .supertuning import SupertuningConfig
from .tinylora import TinyLoraConfig
from .trainable_tokens import TrainableTokensConfig
from .unilora import UniLoraConfig
from .vblora import VBLoRAConfig
from .vera import VeraConfig
from .waveft import WaveFTConfig
from .xlora import XLoraConfig

__all__ = [
    "MultitaskPromptTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PEFT_VERSION",
    "ArrowConfig",
    "BdLoraConfig",
    "AdaLoraConfig",
    "AdamssConfig",
    "AdaptionPromptConfig",
    "BOFTConfig",
    "BeftConfig",
    "C3AConfig",
    "CartridgeConfig",
    "CPTConfig",
    "CordaConfig",
    "EvaConfig",
    "FourierFTConfig",
    "FrodConfig",
    "GloraConfig",
    "WaveFTConfig",
    "XLoraConfig",
    "DeloraConfig",
    "OSFConfig",
    "PsoftConfig",
    "DeftConfig",
    "HRAConfig",
    "GraloraConfig",
    "HiraConfig",
    "PolyConfig",
    "IA3Config",
    "KasaConfig",
    "LNTuningConfig",
    "LilyConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraRuntimeConfig",
    "LoraGAConfig",
    "LycorisConfig",
    "MissConfig",
    "MontecloraConfig",
    "OFTConfig",
    "PeanutConfig",
    "PeftConfig",
    "PeftType",
    "PveraConfig",
    "RandLoraConfig",
    "RoadConfig",
    "ShadowConfig",
    "ShiraConfig",
    "SupertuningConfig",
    "TaskType",
    "TinyLoraConfig",
    "TrainableTokensConfig",
    "UniLoraConfig",
    "VBLoRAConfig",
    "VeloraConfig",
    "VeraConfig",
]
