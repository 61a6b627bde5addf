"""funcpeft: HuggingFace PEFT's adapters as pure functions over parameter pytrees (torch.func).

    fn, base, adapter = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=8, target_modules="all-linear"))
    out = fn(base, adapter, **inputs)        # pure; the model is never mutated

The public API is what this module exports, plus the public submodules `optim`, `distributed`, `io`,
`methods` (for method authors), `testing` and `strategies`. Modules whose names start with `_` are internal.
"""

from importlib.metadata import PackageNotFoundError, version

from . import corda, distributed, eva, loraga, optim
from ._arrow import create_arrow_model
from ._checks import AdapterMismatchError
from ._config import (
    BdLoraConfig,
    ConfigTypeError,
    CordaConfig,
    EvaConfig,
    KasaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    PeftConfig,
    PeftType,
    TaskType,
)
from ._decode import Decoder, generate
from ._functional import PeftFunction
from ._loading import load_adapter
from ._merge import merge, merge_and_unload, unmerge
from ._model import FunctionalPeftModel, from_pretrained, get_peft_model
from ._quant import prepare_model_for_kbit_training
from ._trees import AdapterTree, BaseTree, stack_adapters, unstack_adapters
from ._weighted import add_weighted_adapter
from ._weights import AdaptedWeight, UnsupportedWeightOp
from ._xlora import XLoraModel
from .configs import (
    AdaLoraConfig,
    AdamssConfig,
    AdaptionPromptConfig,
    ArrowConfig,
    BeftConfig,
    BOFTConfig,
    C3AConfig,
    CartridgeConfig,
    CPTConfig,
    DeftConfig,
    DeloraConfig,
    FourierFTConfig,
    FrodConfig,
    GloraConfig,
    GraloraConfig,
    HiraConfig,
    HRAConfig,
    IA3Config,
    LilyConfig,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraRuntimeConfig,
    MissConfig,
    MontecloraConfig,
    MultitaskPromptTuningConfig,
    OFTConfig,
    OSFConfig,
    PeanutConfig,
    PolyConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PsoftConfig,
    PveraConfig,
    RandLoraConfig,
    RoadConfig,
    ShadowConfig,
    ShiraConfig,
    SupertuningConfig,
    TinyLoraConfig,
    TrainableTokensConfig,
    UniLoraConfig,
    VBLoRAConfig,
    VeloraConfig,
    VeraConfig,
    WaveFTConfig,
    XLoraConfig,
)
from .corda import preprocess_corda
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .grad import value_and_grad
from .io import InterruptedSaveError, save_adapter
from .loraga import preprocess_loraga
from .methods.adalora_allocator import (
    RankAllocatorState,
    orthogonal_regularizer,
    rank_allocator,
    rank_pattern,
    with_rank_pattern,
)
from .methods.alora import invocation_offsets as alora_offsets
from .methods.monteclora import monteclora_loss
from .methods.velora import velora_update
from .routing import MixedBatch, PerExample, mixed_batch, per_example, per_sample_grads

try:
    __version__ = version("funcpeft")  # one source: pyproject.toml
except PackageNotFoundError:  # pragma: no cover - running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "MultitaskPromptTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "AdaLoraConfig",
    "AdamssConfig",
    "AdaptionPromptConfig",
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraGAConfig",
    "corda",
    "eva",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "loraga",
    "preprocess_corda",
    "preprocess_loraga",
    "prepare_model_for_kbit_training",
    "AdaptedWeight",
    "ArrowConfig",
    "AdapterMismatchError",
    "AdapterTree",
    "BOFTConfig",
    "BeftConfig",
    "BaseTree",
    "BdLoraConfig",
    "ConfigTypeError",
    "C3AConfig",
    "CartridgeConfig",
    "CPTConfig",
    "FourierFTConfig",
    "FrodConfig",
    "GloraConfig",
    "WaveFTConfig",
    "XLoraConfig",
    "DeftConfig",
    "DeloraConfig",
    "OSFConfig",
    "PsoftConfig",
    "FunctionalPeftModel",
    "HRAConfig",
    "GraloraConfig",
    "TinyLoraConfig",
    "HiraConfig",
    "PolyConfig",
    "IA3Config",
    "KasaConfig",
    "InterruptedSaveError",
    "LNTuningConfig",
    "LilyConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LoraRuntimeConfig",
    "MissConfig",
    "MixedBatch",
    "MontecloraConfig",
    "OFTConfig",
    "PeanutConfig",
    "PeftConfig",
    "PeftFunction",
    "PeftType",
    "PerExample",
    "PveraConfig",
    "RandLoraConfig",
    "RoadConfig",
    "RankAllocatorState",
    "ShadowConfig",
    "ShiraConfig",
    "SupertuningConfig",
    "TaskType",
    "TrainableTokensConfig",
    "UniLoraConfig",
    "UnsupportedWeightOp",
    "VBLoRAConfig",
    "VeloraConfig",
    "VeraConfig",
    "__version__",
    "add_weighted_adapter",
    "alora_offsets",
    "create_arrow_model",
    "XLoraModel",
    "distributed",
    "from_pretrained",
    "generate",
    "Decoder",
    "get_peft_model",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "monteclora_loss",
    "optim",
    "orthogonal_regularizer",
    "per_example",
    "per_sample_grads",
    "rank_allocator",
    "rank_pattern",
    "save_adapter",
    "stack_adapters",
    "unmerge",
    "unstack_adapters",
    "value_and_grad",
    "velora_update",
    "with_rank_pattern",
]
