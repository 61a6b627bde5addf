"""`__post_init__` checks the configs of MiSS, FourierFT, WaveFT, C3A and RandLoRA share (PEFT's rules, or clearer
ones)."""

from __future__ import annotations

from typing import Any

from .._config import check_layers_and_saved, check_module_names


def check_regex_targets(config: Any) -> None:
    """PEFT: a regex `target_modules` cannot be combined with `layers_to_transform` / `layers_pattern`."""
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if isinstance(config.target_modules, str) and config.layers_pattern is not None:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")


def check_bias(config: Any) -> None:
    """PEFT trains no bias ("none"), every bias ("all") or the adapted layers' ("<method>_only", any such name)."""
    bias = config.bias
    if not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only")):
        raise NotImplementedError(
            f"Requested bias: {bias!r}, is not implemented (expected 'none', 'all' or '<method>_only', e.g. "
            f"{type(config).__name__.removesuffix('Config').lower()}_only)."
        )


def check_positive_int(config: Any, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` should be a positive integer value but the value passed is {value!r}")


def check_int_pattern(config: Any, name: str) -> None:
    """A `{module name regex: positive int}` dict (n_frequency_pattern, block_size_pattern)."""
    pattern = getattr(config, name)
    if pattern is None:
        setattr(config, name, {})
        return
    if not isinstance(pattern, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in pattern.items()
    ):
        raise ValueError(f"`{name}` must be a dict of module name regex -> positive int, got {pattern!r}")


def check_saved(config: Any) -> None:
    """modules_to_save: None or a list of str."""
    saved = config.modules_to_save
    if saved is not None:
        if isinstance(saved, str) or not all(isinstance(m, str) for m in saved):
            raise ValueError(f"`modules_to_save` must be a list of str, got {saved!r}")
        config.modules_to_save = list(saved)


def check_sparse_spectrum(config: Any) -> None:
    """FourierFT's and WaveFT's shared checks: n_frequency and n_frequency_pattern positive ints, the targeting
    fields (module names, a regex with no layer selection, layers_pattern with layers_to_transform,
    modules_to_save) and bias."""
    check_positive_int(config, "n_frequency")
    check_int_pattern(config, "n_frequency_pattern")
    check_module_names(config, "target_modules", "exclude_modules")
    check_regex_targets(config)
    check_layers_and_saved(config)
    check_bias(config)
