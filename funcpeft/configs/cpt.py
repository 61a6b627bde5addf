"""PEFT's `CPTConfig` (`peft.tuners.cpt.config`): Context-aware Prompt Tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._config import PeftType, TaskType, validated_init
from .prompt_learning import PromptLearningConfig

LOSS_TYPES = ("none", "decay")


@validated_init
@dataclass
class CPTConfig(PromptLearningConfig):
    """CPT (https://huggingface.co/papers/2410.17222): virtual tokens initialised from the word embeddings of
    `cpt_token_ids` (an in-context example), trained as a delta projected to an epsilon ball per token type
    (`cpt_tokens_type_mask`: 1 / 3 format (template) tokens, 2 input tokens, 4 label tokens, plus 4 per example),
    and its own loss over the label tokens, optionally decayed per example (`opt_weighted_loss_type="decay"`).

    As in PEFT: CAUSAL_LM only; num_virtual_tokens = len(cpt_token_ids); token_dim, num_layers and
    num_attention_heads are reset to None (filled from the model). funcpeft also refuses an
    `opt_weighted_loss_type` other than "none" / "decay" (PEFT treats any other value as "none").
    """

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.CPT

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        self.num_layers = None
        self.token_dim = None
        self.num_attention_heads = None
        self.num_transformer_submodules = 1
        if self.task_type != TaskType.CAUSAL_LM:
            raise ValueError(f"{self.__class__.__name__} only supports task_type = {TaskType.CAUSAL_LM.value}.")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.num_virtual_tokens = len(self.cpt_token_ids)
        if self.cpt_mask is None:
            self.cpt_mask = [1 for _ in self.cpt_token_ids]
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1 for _ in self.cpt_token_ids]
        if not (
            len(self.cpt_token_ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == self.num_virtual_tokens
        ):
            raise ValueError("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length.")
        if self.opt_weighted_loss_type not in LOSS_TYPES:
            raise ValueError(
                f"CPTConfig.opt_weighted_loss_type must be one of {list(LOSS_TYPES)}, got "
                f"{self.opt_weighted_loss_type!r} (PEFT would silently use no weighting)"
            )
        if any(t < 0 for t in self.cpt_tokens_type_mask):
            raise ValueError(f"cpt_tokens_type_mask must hold non-negative ints, got {self.cpt_tokens_type_mask}")
