"""PEFT's `TrainableTokensConfig` (`peft.tuners.trainable_tokens.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import PeftConfig, PeftType, validated_init


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


def check_token_indices(indices: Any, what: str) -> None:
    """A list of distinct non-negative ints (PEFT's index_copy would pick one of duplicates at random)."""
    if not isinstance(indices, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indices
    ):
        raise ValueError(f"`{what}` must be a list of int token indices, got {indices!r}")
    negative = [i for i in indices if i < 0]
    if negative:
        raise ValueError(f"`{what}` must be non-negative token indices, got {negative}")
    seen: set[int] = set()
    dup = sorted({i for i in indices if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dup:
        raise ValueError(
            f"`{what}` has duplicates {dup}: PEFT would write one of the duplicated rows at random (index_copy); "
            "list each token once"
        )
