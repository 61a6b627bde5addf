"""Adapter methods, one small module each; importing this package registers them."""

from . import dora, ia3, loha, lokr, lora, vera
from .base import METHODS, LayerSpec

__all__ = ["METHODS", "LayerSpec", "dora", "ia3", "loha", "lokr", "lora", "vera"]
