"""Adapter methods: the contract (`base`), the registry, and one small module per method.

Importing this package registers the built-in methods. Method authors: see funcpeft.methods.base and
CONTRIBUTING.md ("Adding a method").
"""

from . import adalora, boft, c3a, dora, fourierft, hra, ia3, loha, lokr, lora, miss, oft, randlora, vera
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
    InputMethod,
    KeyRules,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    ModelCall,
    OpContext,
    SharedTensors,
    Target,
)

__all__ = [
    "CONFIG_CLASSES",
    "METHODS",
    "ConvGeometry",
    "EmbeddingGeometry",
    "InputMethod",
    "KeyRules",
    "LayerKind",
    "LayerSpec",
    "MergeHooks",
    "Method",
    "ModelCall",
    "OpContext",
    "SharedTensors",
    "Target",
    "adalora",
    "boft",
    "c3a",
    "dora",
    "fourierft",
    "hra",
    "ia3",
    "loha",
    "lokr",
    "lora",
    "method_for",
    "miss",
    "mixed_compatible_types",
    "oft",
    "randlora",
    "register",
    "unregister",
    "vera",
    "weight_method",
]
