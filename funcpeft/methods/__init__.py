"""Adapter methods: the contract (`base`), the registry, and one small module per method.

Importing this package registers the built-in methods. Method authors: see funcpeft.methods.base and
CONTRIBUTING.md ("Adding a method").
"""

from . import dora, ia3, ln_tuning, loha, lokr, lora, shira, trainable_tokens, vblora, vera
from ._registry import (
    CONFIG_CLASSES,
    METHODS,
    method_for,
    mixed_compatible_types,
    register,
    unregister,
    weight_method,
)
from .base import (
    ConvGeometry,
    EmbeddingGeometry,
    FileCodec,
    InputMethod,
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    ModelCall,
    OpContext,
    SharedParams,
    SharedTensors,
    Target,
)

__all__ = [
    "CONFIG_CLASSES",
    "METHODS",
    "ConvGeometry",
    "EmbeddingGeometry",
    "FileCodec",
    "InputMethod",
    "KeyRules",
    "LayerFrozen",
    "LayerKind",
    "LayerSpec",
    "MergeHooks",
    "Method",
    "ModelCall",
    "OpContext",
    "SharedParams",
    "SharedTensors",
    "Target",
    "dora",
    "ia3",
    "ln_tuning",
    "loha",
    "lokr",
    "lora",
    "method_for",
    "mixed_compatible_types",
    "register",
    "shira",
    "trainable_tokens",
    "unregister",
    "vblora",
    "vera",
    "weight_method",
]
