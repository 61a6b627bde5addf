"""Adapter methods: the contract (`base`), the registry, and one small module per method.

Importing this package registers the built-in methods. Method authors: see funcpeft.methods.base and
CONTRIBUTING.md ("Adding a method").
"""

from . import dora, ia3, loha, lokr, lora, vera
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
    ParameterGeometry,
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
    "ParameterGeometry",
    "SharedTensors",
    "Target",
    "dora",
    "ia3",
    "loha",
    "lokr",
    "lora",
    "method_for",
    "mixed_compatible_types",
    "register",
    "unregister",
    "vera",
    "weight_method",
]
