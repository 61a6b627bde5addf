"""funcpeft: HuggingFace PEFT's adapters as pure functions over parameter pytrees (torch.func)."""

from .config import LoraConfig, PeftConfig, PeftType, TaskType
from .functional import PeftFunction
from .mapping import FunctionalPeftModel, get_peft_model
from .trees import stack_adapters, unstack_adapters
from .weights import AdaptedWeight, UnsupportedWeightOp

__version__ = "0.1.0"

__all__ = [
    "AdaptedWeight",
    "FunctionalPeftModel",
    "LoraConfig",
    "PeftConfig",
    "PeftFunction",
    "PeftType",
    "TaskType",
    "UnsupportedWeightOp",
    "get_peft_model",
    "stack_adapters",
    "unstack_adapters",
]
