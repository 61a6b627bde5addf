"""Adapter methods, one small module each; importing this package registers them."""

from . import lora
from .base import METHODS, LayerSpec

__all__ = ["METHODS", "LayerSpec", "lora"]
