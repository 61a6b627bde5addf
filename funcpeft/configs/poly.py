"""PEFT's `PolyConfig` (`peft.tuners.poly.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, check_rank, validated_init


@validated_init
@dataclass
class PolyConfig(PeftConfig):
    """Polytropon (Poly) / Multi-Head Routing (MHR): per task, a learned soft mixture of `n_skills` LoRA modules
    in each of `n_splits` heads (funcpeft.methods.poly). The model is called with `task_ids` (B,).

    r: each skill's rank. n_tasks: the number of task ids the router knows (0 .. n_tasks - 1). n_skills: LoRA
    modules per head. n_splits: heads; > 1 is MHR (each targeted layer's in / out features must divide by it).
    init_weights: True: every lora_B zero (a no-op adapter); False: lora_B kaiming-uniform like lora_A.
    poly_type: only "poly" (PEFT's only router; PEFT raises when it builds a layer, funcpeft when the config
    is made).
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    poly_type: Literal["poly"] = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    PEFT_TYPE: ClassVar[PeftType] = PeftType.POLY

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_rank(self)
        check_module_names(self, "target_modules", "exclude_modules")
        check_layers_and_saved(self)
        for name in ("n_tasks", "n_skills", "n_splits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
