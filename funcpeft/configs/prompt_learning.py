"""PEFT's prompt-learning configs (`peft.config.PromptLearningConfig` and its subclasses in
`peft.tuners.{prompt_tuning,p_tuning,prefix_tuning,multitask_prompt_tuning}.config`): same names, fields,
defaults and checks."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from .._config import PeftConfig, PeftType, validated_init


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning config has. None values are filled from the model's config by
    get_peft_model (PEFT's `_prepare_prompt_learning_config`): num_layers, token_dim, num_attention_heads
    (prefix tuning on a grouped-query model: the key/value heads), num_transformer_submodules (2 for
    SEQ_2_SEQ_LM, else 1) and, where the config has it, encoder_hidden_size (= token_dim)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    @property
    def is_prompt_learning(self) -> bool:
        return True


@validated_init
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: `num_virtual_tokens` trainable embeddings prepended to the input embeddings.

    prompt_tuning_init: RANDOM (normal(0, 1), nn.Embedding's init), SAMPLE_VOCAB (rows of the word embedding
    at random token ids) or TEXT (the word embeddings of `prompt_tuning_init_text`, tokenized with the
    tokenizer at `tokenizer_name_or_path`, repeated or cut to the number of virtual tokens).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PROMPT_TUNING
    _INIT: ClassVar[type[enum.Enum]] = PromptTuningInit

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        try:
            self.prompt_tuning_init = self._INIT(self.prompt_tuning_init)  # type: ignore[assignment]
        except ValueError:
            raise ValueError(
                f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of {[m.value for m in self._INIT]}"
            ) from None
        text = self.prompt_tuning_init == PromptTuningInit.TEXT.value
        if text and not self.tokenizer_name_or_path:
            raise ValueError(
                f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', "
                f"tokenizer_name_or_path can't be {self.tokenizer_name_or_path}."
            )
        if text and self.prompt_tuning_init_text is None:
            raise ValueError(
                f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', "
                f"prompt_tuning_init_text can't be {self.prompt_tuning_init_text}."
            )
        if self.tokenizer_kwargs and not text:
            raise ValueError(
                f"tokenizer_kwargs only valid when using prompt_tuning_init='{PromptTuningInit.TEXT.value}'."
            )


@validated_init
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: a shared prompt times a per-task rank-`num_ranks` matrix (task_ids= in the call).

    The source-task inits (AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK, ONLY_SOURCE_SHARED) read
    `prompt_tuning_init_state_dict_path` (a safetensors file or torch.load-able file with weights_only).
    """

    prompt_tuning_init: MultitaskPromptTuningInit | str = MultitaskPromptTuningInit.RANDOM  # type: ignore[assignment]
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    PEFT_TYPE: ClassVar[PeftType] = PeftType.MULTITASK_PROMPT_TUNING
    _INIT: ClassVar[type[enum.Enum]] = MultitaskPromptTuningInit


@validated_init
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings passed through an MLP (or a bidirectional LSTM + MLP) encoder.

    encoder_hidden_size: None takes token_dim. encoder_num_layers: the LSTM's layers (the MLP always has 3
    Linear layers; PEFT warns when this is not 2 with MLP). encoder_dropout: the LSTM's inter-layer dropout.
    """

    encoder_reparameterization_type: str | PromptEncoderReparameterizationType = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    PEFT_TYPE: ClassVar[PeftType] = PeftType.P_TUNING

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                self.encoder_reparameterization_type
            )
        except ValueError:
            # PEFT raises this when the encoder is built
            raise ValueError(
                "Prompt encoder type not recognized. Please use one of MLP (recommended) or LSTM "
                f"(got encoder_reparameterization_type={self.encoder_reparameterization_type!r})."
            ) from None


@validated_init
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trainable key/value prefixes for every attention layer, passed as `past_key_values`.

    prefix_projection: the prefixes are an MLP (token_dim -> encoder_hidden_size -> num_layers * 2 * token_dim,
    Tanh) of `num_virtual_tokens` embeddings; otherwise they are the embedding itself. init_weights="zero":
    zero prefixes (the projection's last layer zero).
    """

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


PROMPT_LEARNING_CONFIGS: tuple[type[Any], ...] = (
    PromptTuningConfig,
    MultitaskPromptTuningConfig,
    PromptEncoderConfig,
    PrefixTuningConfig,
)
