"""funcpeft: HuggingFace PEFT's adapters as pure functions over parameter pytrees (torch.func).

    fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=8, target_modules="all-linear"))
    out = fn(base, adapter, **inputs)        # pure; the model is never mutated

The public API is what this module exports, plus the public submodules `optim`, `distributed`, `io`,
`methods` (for method authors), `testing` and `strategies`. Modules whose names start with `_` are internal.
"""

from importlib.metadata import PackageNotFoundError, version

from . import distributed, optim
from ._checks import AdapterMismatchError
from .config import ConfigTypeError, LoraConfig, PeftConfig, PeftType, TaskType
from .configs import (
    BOFTConfig,
    C3AConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    MissConfig,
    OFTConfig,
    RandLoraConfig,
    ShiraConfig,
    TrainableTokensConfig,
    VBLoRAConfig,
    VeraConfig,
)
from .functional import PeftFunction
from .generation import generate
from .grad import value_and_grad
from .io import InterruptedSaveError, save_adapter
from .loading import load_adapter
from .merge import merge, merge_and_unload, unmerge
from .model import FunctionalPeftModel, from_pretrained, get_peft_model
from .routing import MixedBatch, PerExample, mixed_batch, per_example, per_sample_grads
from .trees import AdapterTree, BaseTree, stack_adapters, unstack_adapters
from .weighted import add_weighted_adapter
from .weights import AdaptedWeight, UnsupportedWeightOp

try:
    __version__ = version("funcpeft")  # one source: pyproject.toml
except PackageNotFoundError:  # pragma: no cover - running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AdaptedWeight",
    "AdapterMismatchError",
    "AdapterTree",
    "BOFTConfig",
    "BaseTree",
    "ConfigTypeError",
    "C3AConfig",
    "FourierFTConfig",
    "FunctionalPeftModel",
    "HRAConfig",
    "IA3Config",
    "InterruptedSaveError",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MissConfig",
    "MixedBatch",
    "OFTConfig",
    "PeftConfig",
    "PeftFunction",
    "PeftType",
    "PerExample",
    "RandLoraConfig",
    "ShiraConfig",
    "TaskType",
    "TrainableTokensConfig",
    "UnsupportedWeightOp",
    "VBLoRAConfig",
    "VeraConfig",
    "__version__",
    "add_weighted_adapter",
    "distributed",
    "from_pretrained",
    "generate",
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
