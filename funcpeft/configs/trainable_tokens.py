"""PEFT's `TrainableTokensConfig` (`peft.tuners.trainable_tokens.config`)."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._config import (
    AuxiliaryConfig,
    LoraConfig,
    PeftConfig,
    PeftType,
    check_token_indices,
    validated_init,
)
from .._modules import module_name, tied_to_embedding

# PEFT's TrainableTokensWrapper (LoRA's trainable_token_indices) keeps the layer as `token_adapter`
WRAPPER_PART = "token_adapter"
WRAPPED_KEYS = (("trainable_tokens_delta", f"{WRAPPER_PART}.trainable_tokens_delta"),)


@validated_init
@dataclass
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens: only the rows `token_indices` of an embedding (or a Linear's output rows) are trained.

    target_modules None: the model's input embedding (`get_input_embeddings`), else "embed_tokens". With
    `tie_word_embeddings`, layers tied to the targeted input embedding (the lm_head) use the same rows, like
    PEFT. init_weights: start from the current rows (a no-op adapter), else randn.
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.TRAINABLE_TOKENS
    SAVES_TARGETED_EMBEDDINGS: ClassVar[bool] = False  # PEFT's `using_trainable_tokens` exception

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        targets = self.target_modules  # PEFT keeps a list as a list here (no set conversion)
        if targets is not None and not isinstance(targets, str):
            if not isinstance(targets, (list, tuple, set)) or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"`target_modules` must be a str (a regex), a list of str or None; got {targets!r}")
        check_token_indices(self.token_indices, "token_indices")

    def default_targets(self, model: Any) -> Any:
        """PEFT's `_prepare_adapter_config`: the input embedding's module name, else "embed_tokens"."""
        get = getattr(model, "get_input_embeddings", None)
        if get is None:
            return "embed_tokens"
        embedding = get()
        return next((n for n, m in model.named_modules() if m is embedding), "embed_tokens")


def lora_token_configs(model: Any, config: Any) -> list[AuxiliaryConfig]:
    """PEFT's `_set_trainable` handling of `LoraConfig.trainable_token_indices` (peft.utils.other
    `set_additional_trainable_modules`): one trainable-tokens config per named layer, with PEFT's tying rules.

    A list targets the input embedding (`get_input_embeddings`' name, else "embed_tokens"); a dict's keys name
    modules by suffix (every module whose name ends with the key, PEFT's match). With `tie_word_embeddings`, the
    layers tied to the input embedding (lm_head) use the embedding's rows unless the dict gives them other
    indices (then each has its own; with ensure_weight_tying that is PEFT's ValueError).
    """
    indices = config.trainable_token_indices
    if isinstance(indices, Mapping):
        layers = {k: list(v) for k, v in indices.items()}
    else:
        get = getattr(model, "get_input_embeddings", None)
        name = module_name(model, get()) if get is not None else None
        layers = {name or "embed_tokens": list(indices)}
    for name in layers:
        if name in (config.modules_to_save or ()):
            raise ValueError(
                "The embedding layer is already marked to be trained fully, either specify "
                f"`modules_to_save=[..., \"{name}\", ...]` or `trainable_tokens={{'{name}': x}}` but not both."
            )
    weights_tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    get = getattr(model, "get_input_embeddings", None)
    embedding = module_name(model, get()) if weights_tied and get is not None else None
    skip: set[str] = set()
    mismatch = False
    if len(layers) > 1 and embedding is not None:
        tied_names = set(tied_to_embedding(model))
        tied_keys = [
            k for k in layers if embedding.endswith(k) or any(t.endswith(k) or k in t.split(".") for t in tied_names)
        ]
        if len(tied_keys) >= 2:
            mismatch = any(layers[k] != layers[tied_keys[0]] for k in tied_keys[1:])
            if mismatch and config.ensure_weight_tying:
                info = ", ".join(f"{k}: {layers[k]}" for k in tied_keys)
                raise ValueError(
                    "Cannot ensure weight tying when different token indices are specified for tied layers. "
                    f"Conflicting layers: {info}. Please use the same indices for all tied layers or set "
                    "ensure_weight_tying=False."
                )
            if not mismatch:
                skip = set(tied_keys) & tied_names
    if config.ensure_weight_tying and not weights_tied:
        warnings.warn(
            "ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). Weight "
            "tying will not be applied for trainable_token_indices.",
            stacklevel=5,
        )
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    out: list[AuxiliaryConfig] = []
    for key, token_indices in layers.items():
        if key in skip:
            continue
        found = [n for n in all_names if n.endswith(key)]  # PEFT's `_set_trainable` match
        if not found:
            close = difflib.get_close_matches(key, sorted(set(all_names)), n=3, cutoff=0.5)
            raise ValueError(
                f"Target modules {{{key!r}}} not found in the base model. Please check the target modules and try "
                f"again (LoraConfig.trainable_token_indices names modules by the end of their name"
                + (f"; close matches: {close})." if close else ").")
            )
        targets = "|".join(re.escape(n) for n in dict.fromkeys(found))
        tie = embedding is not None and embedding in found and (config.ensure_weight_tying or not mismatch)
        sub = TrainableTokensConfig(target_modules=targets, token_indices=token_indices, init_weights=True)
        out.append(AuxiliaryConfig(sub, tie, WRAPPER_PART))
    return out


# LoraConfig's trainable-tokens part (config.py cannot import this module: it is below it)
LoraConfig.AUXILIARY_PARTS = staticmethod(lora_token_configs)
LoraConfig.AUXILIARY_KEYS = WRAPPED_KEYS
