"""funcpeft: HuggingFace PEFT's adapters as pure functions over parameter pytrees (torch.func)."""

from . import distributed, optim
from .config import LoraConfig, PeftConfig, PeftType, TaskType
from .configs import IA3Config, LoHaConfig, LoKrConfig, VeraConfig
from .functional import PeftFunction
from .grad import value_and_grad
from .io import save_adapter
from .loading import AdapterMismatchError, from_pretrained, load_adapter
from .mapping import FunctionalPeftModel, get_peft_model
from .merge import merge, merge_and_unload, unmerge
from .routing import MixedBatch, PerExample, mixed_batch, per_example, per_sample_grads
from .trees import stack_adapters, unstack_adapters
from .weighted import add_weighted_adapter
from .weights import AdaptedWeight, UnsupportedWeightOp

__version__ = "0.1.0"

__all__ = [
    "AdaptedWeight",
    "AdapterMismatchError",
    "FunctionalPeftModel",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MixedBatch",
    "PeftConfig",
    "PeftFunction",
    "PeftType",
    "PerExample",
    "TaskType",
    "UnsupportedWeightOp",
    "VeraConfig",
    "add_weighted_adapter",
    "distributed",
    "from_pretrained",
    "get_peft_model",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "optim",
    "per_example",
    "per_sample_grads",
    "save_adapter",
    "stack_adapters",
    "unmerge",
    "unstack_adapters",
    "value_and_grad",
]
