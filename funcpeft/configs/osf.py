"""PEFT's `OSFConfig` (`peft.tuners.osf.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._config import PeftConfig, PeftType, validated_init

# PEFT's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING
OSF_TARGET_MODULES: dict[str, list[str] | str] = {
    **{
        t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
        for t in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi")
    },
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}


@validated_init
@dataclass
class OSFConfig(PeftConfig):
    """OSF (orthogonal subspace fine-tuning): each targeted W = U S Vh is split at `effective_rank` k into a frozen
    top-k part and a trainable rest (U_low (out, m-k), S_low (m-k,), V_low (m-k, in), m = min(out, in)):
    W' = W + U_low S_low V_low - (their values at init); the gradients of U_low / V_low are projected orthogonal to
    the frozen top-k singular vectors (PEFT's gradient hooks).

    effective_rank: k, an int or a fraction in (0, 1] of m; None: m // 2. rank_pattern: {module regex: k} (first
    `re.search` match). target_modules None: PEFT's per-model_type table, else all linear layers. init_weights=False:
    U_low, S_low, V_low drawn from N(0, 1) instead (PEFT's test mode). target_svd_config: accepted and ignored, as in
    PEFT. PEFT adapts nn.Linear only; modules_to_save is refused (PEFT freezes everything but the OSF parameters).
    """

    effective_rank: int | float | None = None
    target_modules: list[str] | set[str] | str | None = None
    rank_pattern: dict | None = None
    init_weights: bool | None = True
    modules_to_save: list[str] | None = None
    target_svd_config: dict | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.OSF
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = OSF_TARGET_MODULES
    # PEFT's OSFModel marks only `osf_svd_params` trainable, which would freeze a modules_to_save copy
    _unimplemented: ClassVar[dict[str, Any]] = {"modules_to_save": None}

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        targets = self.target_modules  # PEFT keeps a list as given (its file too): checked, not made a set
        if not (targets is None or isinstance(targets, str)):
            if not isinstance(targets, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"`target_modules` must be a str, a list of str or None; got {targets!r}")
        for name in ("rank_pattern", "target_svd_config"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, dict) or not all(isinstance(k, str) for k in value)):
                raise ValueError(f"`{name}` must be a dict with str keys or None, got {value!r}")

    def default_targets(self, model: Any) -> Any:
        """PEFT's `_prepare_adapter_config`: the model type's table entry, else every linear layer."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return None if model_type in OSF_TARGET_MODULES else "all-linear"
