"""PEFT's per-module rank / alpha overrides (`rank_pattern`, `alpha_pattern`): pure functions over names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def pattern_key(pattern_keys: Iterable[str], key: str) -> str | None:
    """The first key (dict order) whose regex matches `key` at a dot boundary: PEFT's `get_pattern_key`."""
    for k in pattern_keys:
        if re.match(rf"(.*\.)?({k})$", key):
            return k
    return None


def rank_and_alpha(config: Any, key: str, alpha_field: str = "lora_alpha") -> tuple[int, float]:
    """(r, alpha) for module `key` after rank_pattern / alpha_pattern (LoHa/LoKr call their alpha `alpha`)."""
    rk = pattern_key(config.rank_pattern.keys(), key)
    ak = pattern_key(config.alpha_pattern.keys(), key)
    return config.rank_pattern.get(rk, config.r), config.alpha_pattern.get(ak, getattr(config, alpha_field))


def dotted_pattern_value(pattern: Mapping[str, Any], key: str, default: Any) -> Any:
    """FourierFT's / C3A's per-module override (n_frequency_pattern, block_size_pattern), PEFT's rule exactly:
    the first pattern key k with `re.match(rf".*\\.{k}$", key)`, else the module name `key` itself looked up."""
    found = next((k for k in pattern if re.match(rf".*\.{k}$", key)), key)
    return pattern.get(found, default)
