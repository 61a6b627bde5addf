"""Facts about a model's module tree that the configs and the targeting both read (no funcpeft imports)."""

from __future__ import annotations

from typing import Any

from torch import nn


def module_name(model: nn.Module, module: Any) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def tied_to_embedding(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is tied to the input embedding (e.g. ["lm_head"]): PEFT's
    `_get_module_names_tied_with_embedding` (transformers' `_tied_weights_keys`; none if tie_word_embeddings=False)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    keys = getattr(model, "_tied_weights_keys", None)
    if keys is None:
        return []
    if isinstance(keys, dict):
        get = getattr(model, "get_input_embeddings", None)
        if get is None:
            raise ValueError(
                "The supplied model implements `_tied_weights_keys` as a dict but doesn't implement "
                "'get_input_embeddings' so we can't determine which weights are tied to embeddings."
            )
        pairs: dict[str, str] = {}
        for name, module in model.named_modules():
            own = getattr(module, "_tied_weights_keys", None)
            if own and isinstance(own, dict):
                pairs.update({f"{name}.{k}" if name else k: f"{name}.{v}" if name else v for k, v in own.items()})
        embedding = {id(p) for p in get().parameters()}
        sources = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in embedding}
        tied = [k for k, v in pairs.items() if v in sources]
    else:
        tied = list(keys)
    return sorted({n.rpartition(".")[0] for n in tied})


__all__ = ["module_name", "tied_to_embedding"]
