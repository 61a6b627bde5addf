"""PEFT's custom-model test matrix as data: every row of `TEST_CASES` and `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`.

Transcribed row by row, in PEFT's order and with PEFT's names and comments, from huggingface/peft
`tests/test_custom_models.py` (Apache-2.0) at `PEFT_REVISION`. The repository snapshot available had no
v0.21.2 tag and no commit with `__version__ = "0.21.2"`; its newest main (0.20.1.dev0, 2026-08-21) is the
closest source of the installed 0.21.2 (which adds ShadowConfig and a sub-config loading fix on top) and
its matrix has 331 rows over 35 config classes, the counts known for 0.21.2.
The config class is named, not imported, so one row builds `peft.<config_cls>` and `funcpeft.<config_cls>`
alike (`build_config`). A nested config object (`KasaConfig()`, `VeloraConfig(...)`, `BdLoraConfig(...)`)
is a `Sub(class name, kwargs)`: PEFT gets the object, funcpeft gets the kwargs dict (what it would read
back from adapter_config.json). PEFT repeats some names; `case_ids` makes them unique (`name (2)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

PEFT_REVISION = "5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40"


class Sub(NamedTuple):
    """A nested config object inside a row's kwargs, e.g. `LoraConfig(kasa_config=KasaConfig())`."""

    config_cls: str
    kwargs: dict[str, Any]


class Case(NamedTuple):
    """One row of PEFT's `TEST_CASES`: (test name, model id of `models.build`, config class name, config kwargs)."""

    name: str
    model_id: str
    config_cls: str
    config_kwargs: dict[str, Any]


class MultiCase(NamedTuple):
    """One row of PEFT's `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`; `tuner_method` picks the model (`models.build_multi`)."""

    name: str
    tuner_method: str
    config_cls: str
    config_kwargs_1: dict[str, Any]
    config_kwargs_2: dict[str, Any]


# fmt: off
TEST_CASES: tuple[Case, ...] = (
    # GLoRA #
    Case("Vanilla MLP 1 GLoRA", "MLP", "GloraConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 GLoRA", "MLP", "GloraConfig", {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"]}),
    # LoRA #
    Case("Vanilla MLP 1 LoRA", "MLP", "LoraConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    Case("Vanilla MLP 7 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "use_dora": True}),
    Case("Vanilla MLP 8 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    Case("Vanilla MLP 1 LoRA with KaSA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "kasa_config": Sub("KasaConfig", {}), "r": 4}),
    Case("Vanilla MLP 1 LoRA with MiCA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    Case("Vanilla MLP 9 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    Case("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", "LoraConfig", {"target_modules": ["lin0"], "velora_config": Sub("VeloraConfig", {"num_groups": 2, "init_type": "random"})}),
    Case("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "velora_config": Sub("VeloraConfig", {"num_groups": 2, "init_type": "batch_average"})}),
    Case("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", "LoraConfig", {"target_modules": ["lin0"], "velora_config": Sub("VeloraConfig", {"num_groups": 2, "init_type": "batch_average_once"})}),
    Case("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["conv1d"]}),
    Case("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb"]}),
    Case("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"]}),
    Case("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["conv1d"], "use_dora": True}),
    Case("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb"], "use_dora": True}),
    Case("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    Case("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", "LoraConfig", {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    Case("Conv1d LoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"]}),
    Case("Conv1d LoRA with DoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"], "use_dora": True}),
    Case("Conv2d 1 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d 2 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv2d 1 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}),
    Case("Conv2d 2 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    Case("Conv2d Groups LoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d Groups2 LoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d Groups LoRA with DoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}),
    Case("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}),
    Case("Conv3d 1 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"]}),
    Case("Conv3d 2 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"]}),
    Case("Conv3d 1 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "use_dora": True}),
    Case("Conv3d 2 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    # LoRA with lora_B bias enabled (note: embedding is not supported)
    # It's important to set lora_alpha != r to ensure that scaling is taken into account correctly
    Case("Vanilla MLP 1 LoRA with lora_b bias", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    Case("Conv2d 1 LoRA with lora_b bias", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    Case("Conv3d 1 LoRA with lora_b bias", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    Case("MHA 1 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha"]}),
    Case("MHA 2 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha", "lin0"]}),
    # targeting parameters directly
    Case("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", "LoraConfig", {"target_parameters": ["lin0.weight"]}),
    Case("MLP 2 using nn.Parameter LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    # MonteCLoRA #
    Case("Vanilla MLP 1 LoRA with Monteclora", "MLP", "LoraConfig", {"target_modules": ["lin0"], "monteclora_config": Sub("MontecloraConfig", {"num_samples": 2})}),
    # IA³ #
    Case("Vanilla MLP 1 IA3", "MLP", "IA3Config", {"target_modules": "lin0", "feedforward_modules": []}),
    Case("Vanilla MLP 2 IA3", "MLP", "IA3Config", {"target_modules": "lin0", "feedforward_modules": "lin0"}),
    Case("Vanilla MLP 3 IA3", "MLP", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": []}),
    Case("Vanilla MLP 4 IA3", "MLP", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
    Case("Vanilla MLP 5 IA3", "MLP", "IA3Config", {"target_modules": ["lin1"], "feedforward_modules": []}),
    Case("Vanilla MLP 6 IA3", "MLP", "IA3Config", {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
    Case("Vanilla MLP 7 IA3", "MLP", "IA3Config", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    Case("Vanilla MLP 8 IA3", "MLP", "IA3Config", {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 9 IA3", "MLP", "IA3Config", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]}),
    Case("transformers Conv1D 1 IA3", "EmbConv1D", "IA3Config", {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
    Case("transformers Conv1D 2 IA3", "EmbConv1D", "IA3Config", {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]}),
    Case("transformers Conv1D 1 IA3", "EmbConv1D", "IA3Config", {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]}),
    Case("Conv2d 1 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": []}),
    Case("Conv2d 2 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    Case("Conv2d 3 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
    Case("Conv2d 4 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}),
    Case("Conv2d 5 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}),
    Case("Conv3d 1 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": []}),
    Case("Conv3d 2 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
    Case("Conv3d 3 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
    Case("Conv3d 4 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}),
    Case("Conv3d 5 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}),
    # BEFT #
    Case("Vanilla MLP 1 BEFT", "MLP", "BeftConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 BEFT", "MLP", "BeftConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    # LoHa #
    Case("Vanilla MLP 1 LOHA", "MLP", "LoHaConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 LOHA", "MLP", "LoHaConfig", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    Case("Vanilla MLP 7 LOHA", "MLP", "LoHaConfig", {"target_modules": "lin0", "rank_dropout": 0.5}),
    Case("Conv2d 1 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d 2 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv2d 3 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    Case("Conv2d 4 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    Case("Conv1d LOHA", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"]}),
    Case("Conv1d LOHA 1", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"]}),
    Case("Conv1d LOHA 2", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"], "r": 2}),
    Case("Conv1d Groups LOHA", "Conv1dGroups", "LoHaConfig", {"target_modules": ["conv1d"], "r": 4}),
    Case("Conv1d LOHA 3", "Conv1dBigger", "LoHaConfig", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    Case("Conv1d LOHA 4", "Conv1dBigger", "LoHaConfig", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    Case("Conv2d 1x1 LOHA", "Conv2d1x1", "LoHaConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d Groups LOHA", "Conv2dGroups", "LoHaConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d Groups2 LOHA", "Conv2dGroups2", "LoHaConfig", {"target_modules": ["conv2d"]}),
    # LoKr
    Case("Vanilla MLP 1 LOKR", "MLP", "LoKrConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 LOKR", "MLP", "LoKrConfig", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    Case("Vanilla MLP 7 LOKR", "MLP", "LoKrConfig", {"target_modules": "lin0", "rank_dropout": 0.5}),
    Case("Vanilla MLP 8 LOKR", "MLP", "LoKrConfig", {"target_modules": "lin0", "decompose_both": True, "r": 1, "alpha": 1}),
    Case("Conv1d LOKR 1", "Conv1d", "LoKrConfig", {"target_modules": ["conv1d"]}),
    Case("Conv1d LOKR 2", "Conv1d", "LoKrConfig", {"target_modules": ["conv1d"], "r": 2}),
    Case("Conv1d Groups LOKR", "Conv1dGroups", "LoKrConfig", {"target_modules": ["conv1d"], "r": 4}),
    Case("Conv1d LOKR 3", "Conv1dBigger", "LoKrConfig", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    Case("Conv1d LOKR 4", "Conv1dBigger", "LoKrConfig", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    Case("Conv2d 1 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d 2 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv2d 3 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    Case("Conv2d 4 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    Case("Conv2d 1x1 LOKR", "Conv2d1x1", "LoKrConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d 5 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True}),
    Case("Conv2d 6 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_factor": 4}),
    Case("Conv2d 7 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True, "decompose_factor": 4}),
    Case("Conv2d Groups LOKR", "Conv2dGroups", "LoKrConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d Groups2 LOKR", "Conv2dGroups2", "LoKrConfig", {"target_modules": ["conv2d"]}),
    # OFT #
    Case("Vanilla MLP 1 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": "lin0", "use_cayley_neumann": False}),
    Case("Vanilla MLP 2 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "use_cayley_neumann": False}),
    Case("Vanilla MLP 5 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "use_cayley_neumann": False}),
    Case("Vanilla MLP 6 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "module_dropout": 0.1, "use_cayley_neumann": False}),
    Case("Vanilla MLP 7 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 0.01}),
    Case("Vanilla MLP 8 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "block_share": True, "use_cayley_neumann": False}),
    Case("Vanilla MLP 9 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 0.01, "block_share": True}),
    Case("Vanilla MLP 10 OFT", "MLP", "OFTConfig", {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": True}),
    Case("Vanilla MLP 11 OFT", "MLP", "OFTConfig", {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": False}),
    Case("Vanilla MLP 12 OFT", "MLP", "OFTConfig", {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "coft": True, "eps": 0.01, "block_share": True, "use_cayley_neumann": True}),
    Case("Vanilla MLP 13 OFT", "MLP", "OFTConfig", {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "coft": True, "eps": 0.01, "block_share": True, "use_cayley_neumann": False}),
    Case("Embedding + transformers Conv1D 1 OFT", "EmbConv1D", "OFTConfig", {"r": 1, "oft_block_size": 0, "target_modules": ["emb"]}),
    Case("Embedding + transformers Conv1D 2 OFT", "EmbConv1D", "OFTConfig", {"r": 1, "oft_block_size": 0, "target_modules": ["emb"], "block_share": True}),
    Case("Conv2d 1 OFT", "Conv2d", "OFTConfig", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}),
    Case("Conv2d 3 OFT", "Conv2d", "OFTConfig", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True}),
    Case("Conv2d 4 OFT", "Conv2d", "OFTConfig", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "block_share": True}),
    Case("Conv2d 5 OFT", "Conv2d", "OFTConfig", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True, "block_share": True}),
    # DEFT #
    Case("Vanilla MLP 1 DEFT", "MLP", "DeftConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 DEFT", "MLP", "DeftConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 DEFT", "MLP", "DeftConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 4 DEFT qr", "MLP", "DeftConfig", {"target_modules": ["lin0"], "decomposition_method": "qr"}),
    Case("Vanilla MLP 5 DEFT", "MLP", "DeftConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 7 DEFT alpha", "MLP", "DeftConfig", {"target_modules": ["lin0"], "decomposition_method": "qr", "alpha": 16}),
    Case("Vanilla MLP 8 DEFT PaRa relu", "MLP", "DeftConfig", {"target_modules": ["lin0"], "decomposition_method": "relu", "para": True}),
    Case("Vanilla MLP 9 DEFT PaRa qr", "MLP", "DeftConfig", {"target_modules": ["lin0"], "decomposition_method": "qr", "para": True}),
    Case("Embedding + transformers Conv1D 1 DEFT", "EmbConv1D", "DeftConfig", {"target_modules": ["conv1d"]}),
    # HRA #
    Case("Vanilla MLP 1 HRA", "MLP", "HRAConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 HRA", "MLP", "HRAConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 HRA", "MLP", "HRAConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 HRA", "MLP", "HRAConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Conv2d 1 HRA", "Conv2d", "HRAConfig", {"target_modules": ["conv2d"]}),
    # MiSS #
    Case("Vanilla MLP 1 MiSS", "MLP", "MissConfig", {"target_modules": "lin0", "r": 2}),
    Case("Vanilla MLP 2 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0"], "r": 2}),
    Case("Vanilla MLP 3 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0", "lin1"], "r": 2}),
    Case("Vanilla MLP 5 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2}),
    Case("Vanilla MLP 1 MiSS", "MLP", "MissConfig", {"target_modules": "lin0", "r": 2, "init_weights": "bat"}),
    Case("Vanilla MLP 2 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0"], "r": 2, "init_weights": "bat"}),
    Case("Vanilla MLP 3 MiSS with bat", "MLP", "MissConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "init_weights": "bat"}),
    Case("Vanilla MLP 5 MiSS", "MLP", "MissConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2, "init_weights": "bat"}),
    # LN Tuning #
    Case("LayerNorm 1 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": "layernorm0"}),
    Case("LayerNorm 2 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": ["layernorm0"]}),
    Case("LayerNorm 3 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": ["layernorm0"], "modules_to_save": ["layernorm1"]}),
    Case("Linear 4 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": "lin0"}),
    Case("Linear 5 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": ["lin0"]}),
    # BOFT #
    Case("Vanilla MLP 1 BOFT", "MLP", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 2}),
    Case("Vanilla MLP 2 BOFT", "MLP", "BOFTConfig", {"target_modules": ["lin1"], "modules_to_save": ["lin0"], "boft_block_size": 2}),
    Case("Vanilla MLP 3 BOFT", "MLP", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_dropout": 0.1}),
    Case("Vanilla MLP 4 BOFT", "MLP", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 1}),
    Case("Vanilla MLP 5 BOFT", "MLP", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 1}),
    Case("Vanilla MLP 6 BOFT", "MLP", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 10, "boft_block_num": 0, "boft_n_butterfly_factor": 2}),
    Case("Conv2d 1 BOFT", "Conv2d", "BOFTConfig", {"target_modules": ["conv2d"], "boft_block_size": 45, "boft_block_num": 0, "boft_n_butterfly_factor": 1}),
    Case("Conv2d 2 BOFT", "Conv2d", "BOFTConfig", {"target_modules": ["conv2d"], "boft_block_size": 0, "boft_block_num": 1, "boft_n_butterfly_factor": 1}),
    Case("MLP2 1 BOFT", "MLP2", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3}),
    Case("MLP2 2 BOFT", "MLP2", "BOFTConfig", {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3}),
    Case("Conv2d2 1 BOFT", "Conv2d2", "BOFTConfig", {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 2}),
    Case("Conv2d2 1 BOFT", "Conv2d2", "BOFTConfig", {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3}),
    # SHiRA #
    Case("Vanilla MLP 1 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": "lin0"}),
    Case("Vanilla MLP 2 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin0", "lin1"], "random_seed": 56}),
    Case("Vanilla MLP 5 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": ["lin0"]}),
    # Supertuning #
    Case("Vanilla MLP 1 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": "lin0"}),
    Case("Vanilla MLP 2 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 Supertuning bottom-k", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin0", "lin1"], "select_top": False}),
    Case("Vanilla MLP 5 Supertuning Supra (r=2)", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin0"], "r": 2}),
    # VeRA #
    Case("Vanilla MLP 1 VeRA", "MLP", "VeraConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 VeRA", "MLP", "VeraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Embedding + transformers Conv1D 1 VeRA", "EmbConv1D", "VeraConfig", {"target_modules": ["conv1d"]}),
    # TinyLoRA #
    Case("Vanilla MLP 1 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": "lin0", "r": 2, "u": 16}),
    Case("Vanilla MLP 2 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": ["lin0"], "r": 2, "u": 16}),
    Case("Vanilla MLP 3 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": ["lin1"], "r": 2, "u": 16}),
    Case("Vanilla MLP 4 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "u": 32}),
    Case("Vanilla MLP 5 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2, "u": 16}),
    Case("Vanilla MLP TinyLoRA weight_tying", "MLP", "TinyLoraConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "u": 8, "weight_tying": 1.0}),
    Case("Embedding + transformers Conv1D 1 TinyLoRA", "EmbConv1D", "TinyLoraConfig", {"target_modules": ["conv1d"], "r": 2, "u": 16, "init_v_bound": 0.5}),
    Case("Embedding + transformers Conv1D 2 TinyLoRA", "EmbConv1D", "TinyLoraConfig", {"target_modules": ["emb"], "r": 2, "u": 16}),
    # PVERA #
    Case("Vanilla MLP 1 PVeRA", "MLP", "PveraConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 PVeRA", "MLP", "PveraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Embedding + transformers Conv1D 1 PVeRA", "EmbConv1D", "PveraConfig", {"target_modules": ["conv1d"]}),
    # FourierFT #
    # FourierFT is not initialized as an identity transform by default, hence set init_weights=True
    Case("Vanilla MLP 1 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": "lin0", "init_weights": True}),
    Case("Vanilla MLP 2 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": ["lin0"], "init_weights": True}),
    Case("Vanilla MLP 3 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": ["lin1"], "init_weights": True}),
    Case("Vanilla MLP 5 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "init_weights": True}),
    Case("Vanilla MLP 6 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "init_weights": True}),
    Case("Vanilla MLP 7 FourierFT", "MLP", "FourierFTConfig", {"n_frequency_pattern": {"lin0": 5, "lin1": 10}, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "init_weights": True}),
    # GraLoRA #
    Case("Vanilla MLP 1 GraLoRA", "MLP", "GraloraConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 7 Hybrid GraLoRA", "MLP", "GraloraConfig", {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "hybrid_r": 4}),
    Case("Embedding + transformers Conv1D 1 GraLoRA", "EmbConv1D", "GraloraConfig", {"target_modules": ["conv1d"], "gralora_k": 1}),
    # VBLoRA #
    Case("Vanilla MLP 1 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": "lin0", "vector_length": 1, "num_vectors": 5}),
    Case("Vanilla MLP 2 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": ["lin0"], "vector_length": 1, "num_vectors": 5}),
    Case("Vanilla MLP 3 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": ["lin1"], "vector_length": 2, "num_vectors": 5}),
    Case("Vanilla MLP 4 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": ["lin0", "lin1"], "vector_length": 1, "num_vectors": 5}),
    Case("Vanilla MLP 5 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "vector_length": 1, "num_vectors": 5}),
    Case("Embedding + transformers Conv1D 1 VBLoRA", "EmbConv1D", "VBLoRAConfig", {"target_modules": ["conv1d"], "vector_length": 1, "num_vectors": 2}),
    # TrainableTokens #
    Case("Embedding + transformers Conv1D 1 trainable_tokens", "EmbConv1D", "TrainableTokensConfig", {"target_modules": ["emb"], "token_indices": [0, 1, 3], "init_weights": False}),
    # Orthogonal Subspace Learning #
    Case("Vanilla MLP 1 OSF", "MLP", "OSFConfig", {}),
    Case("Vanilla MLP 2 OSF", "MLP", "OSFConfig", {"target_svd_config": {"lin0.weight": 5, "lin1.weight": 1}}),
    # RandLora #
    # We have to reduce the default scaling parameter to avoid nans when using large learning rates
    Case("Vanilla MLP 1 RandLora", "MLP", "RandLoraConfig", {"target_modules": "lin0", "randlora_alpha": 1}),
    Case("Vanilla MLP 2 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin0"], "randlora_alpha": 1}),
    Case("Vanilla MLP 3 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin1"], "randlora_alpha": 1}),
    Case("Vanilla MLP 4 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin0", "lin1"], "randlora_alpha": 1}),
    Case("Vanilla MLP 5 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin0", "lin1"], "sparse": True, "randlora_alpha": 1}),
    Case("Vanilla MLP 6 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin0", "lin1"], "very_sparse": True, "randlora_alpha": 1}),
    Case("Vanilla MLP 7 RandLora", "MLP", "RandLoraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "randlora_alpha": 1}),
    # FRoD #
    Case("Vanilla MLP 1 FRoD", "MLP", "FrodConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 FRoD", "MLP", "FrodConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    # UniLora #
    Case("Vanilla MLP 1 UniLora", "MLP", "UniLoraConfig", {"target_modules": "lin0", "theta_d_length": 101}),
    Case("Vanilla MLP 2 UniLora", "MLP", "UniLoraConfig", {"target_modules": ["lin0"], "theta_d_length": 101}),
    Case("Vanilla MLP 3 UniLora", "MLP", "UniLoraConfig", {"target_modules": ["lin1"], "theta_d_length": 101}),
    Case("Vanilla MLP 4 UniLora", "MLP", "UniLoraConfig", {"target_modules": ["lin0", "lin1"], "theta_d_length": 101}),
    Case("Vanilla MLP 5 UniLora", "MLP", "UniLoraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "theta_d_length": 101}),
    Case("Embedding + transformers Conv1D 1 UniLora", "EmbConv1D", "UniLoraConfig", {"target_modules": ["conv1d"], "theta_d_length": 101}),
    # C3A #
    # note: C3A is not initialized as an identity transform by default, hence set init_weights=True
    Case("Vanilla MLP 1 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": "lin0", "init_weights": True}),
    Case("Vanilla MLP 2 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": ["lin0"], "init_weights": True}),
    Case("Vanilla MLP 3 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": ["lin1"], "init_weights": True}),
    Case("Vanilla MLP 5 C3A", "MLP", "C3AConfig", {"block_size": 10, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "init_weights": True}),
    Case("Vanilla MLP 6 C3A", "MLP", "C3AConfig", {"block_size": 10, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "init_weights": True}),
    Case("Vanilla MLP 7 C3A", "MLP", "C3AConfig", {"block_size_pattern": {"lin0": 5, "lin1": 10}, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "init_weights": True}),
    # WaveFT #
    Case("Vanilla MLP 1 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 8}),
    Case("Vanilla MLP 2 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0"], "n_frequency": 8}),
    Case("Vanilla MLP 3 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin1"], "n_frequency": 8}),
    Case("Vanilla MLP 4 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0", "lin1"], "n_frequency": 8}),
    Case("Vanilla MLP 5 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "n_frequency": 8}),
    Case("Vanilla MLP 6 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0"], "n_frequency": 8, "scaling": 25.0, "wavelet_family": "db1"}),
    Case("Vanilla MLP 7 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin1", "n_frequency": 8, "use_idwt": False}),
    Case("Vanilla MLP 8 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2"}),
    Case("Vanilla MLP 9 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2", "use_idwt": False}),
    Case("Vanilla MLP 10 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "db1", "proportional_parameters": True}),
    # RoAd #
    Case("Vanilla MLP 1 RoAd", "MLP", "RoadConfig", {"target_modules": "lin0", "group_size": 2}),
    Case("Vanilla MLP 2 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0"], "group_size": 2}),
    Case("Vanilla MLP 3 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin1"], "group_size": 2}),
    Case("Vanilla MLP 4 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0", "lin1"], "group_size": 2}),
    Case("Vanilla MLP 5 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0"], "variant": "road_2", "group_size": 2}),
    Case("Vanilla MLP 6 RoAd", "MLP", "RoadConfig", {"target_modules": ["lin0"], "variant": "road_4", "group_size": 2}),
    # WaveFT #
    Case("Vanilla MLP 1 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 8}),
    Case("Vanilla MLP 2 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0"], "n_frequency": 8}),
    Case("Vanilla MLP 3 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin1"], "n_frequency": 8}),
    Case("Vanilla MLP 4 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0", "lin1"], "n_frequency": 8}),
    Case("Vanilla MLP 5 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "n_frequency": 8}),
    Case("Vanilla MLP 6 WaveFT", "MLP", "WaveFTConfig", {"target_modules": ["lin0"], "n_frequency": 8, "scaling": 25.0, "wavelet_family": "db1"}),
    Case("Vanilla MLP 7 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin1", "n_frequency": 8, "use_idwt": False}),
    Case("Vanilla MLP 8 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2"}),
    Case("Vanilla MLP 9 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "sym2", "use_idwt": False}),
    Case("Vanilla MLP 10 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin0", "n_frequency": 16, "wavelet_family": "db1", "proportional_parameters": True}),
    # DeLoRA #
    Case("Vanilla MLP 1 DeLoRA", "MLP", "DeloraConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 DeLoRA", "MLP", "DeloraConfig", {"target_modules": ["lin0"], "module_dropout": 0.1}),
    # BD-LoRA #
    Case("BD-LoRA A only", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "use_bdlora": Sub("BdLoraConfig", {"target_modules_bd_a": ["lin0"], "match_strict": False})}),
    Case("BD-LoRA B only", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "use_bdlora": Sub("BdLoraConfig", {"target_modules_bd_b": ["lin1"], "nblocks": 2, "match_strict": False})}),
    Case("BD-LoRA both A and B", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "use_bdlora": Sub("BdLoraConfig", {"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2})}),
    # PSOFT #
    Case("Vanilla MLP 1 PSOFT", "MLP", "PsoftConfig", {"target_modules": "lin0", "r": 4, "psoft_alpha": 4}),
    Case("Vanilla MLP 2 PSOFT", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4}),
    Case("Vanilla MLP 3 PSOFT", "MLP", "PsoftConfig", {"target_modules": ["lin1"], "r": 2, "psoft_alpha": 2}),
    Case("Vanilla MLP 4 PSOFT", "MLP", "PsoftConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "psoft_alpha": 2}),
    Case("Vanilla MLP 5 PSOFT (modules_to_save)", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 4, "psoft_alpha": 4}),
    Case("Vanilla MLP PSOFT-SO (PSOFT with strict orthogonality)", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "psoft_mag_a": False, "psoft_mag_b": False}),
    Case("Vanilla MLP PSOFT lowrank SVD niter 10", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 10}),
    Case("Vanilla MLP PSOFT Cayley-Neumann approximation term 5", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5, "cayley_neumann_eps": 0.9}),
    Case("Vanilla MLP PSOFT non-orthogonal R", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "psoft_orth": False, "psoft_mag_a": False, "psoft_mag_b": False}),
    Case("Vanilla MLP PSOFT PiSSA init", "MLP", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "ab_svd_init": "pissa_init"}),
    # Lily  #
    Case("Vanilla MLP 1 Lily", "MLP", "LilyConfig", {"target_modules": "lin0", "r": 2, "stride_A": 1, "num_B": 2}),
    Case("Vanilla MLP 2 Lily", "MLP", "LilyConfig", {"target_modules": ["lin0"], "r": 2, "stride_A": 1, "num_B": 2}),
    Case("Vanilla MLP 3 Lily", "MLP", "LilyConfig", {"target_modules": ["lin1"], "r": 2, "stride_A": 1, "num_B": 2}),
    Case("Vanilla MLP 4 Lily", "MLP", "LilyConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "stride_A": 1, "num_B": 2}),
    Case("Vanilla MLP 5 Lily", "MLP", "LilyConfig", {"target_modules": ["lin0"], "r": 4, "stride_A": 1, "num_B": 2}),
    # Peanut #
    Case("Vanilla MLP 1 Peanut", "MLP", "PeanutConfig", {"target_modules": "lin0", "r": 2, "depth": 0, "act_fn": "relu"}),
    Case("Vanilla MLP 2 Peanut", "MLP", "PeanutConfig", {"target_modules": ["lin0"], "r": 2, "depth": 0, "act_fn": "relu"}),
    Case("Vanilla MLP 3 Peanut", "MLP", "PeanutConfig", {"target_modules": ["lin1"], "r": 2, "depth": 0, "act_fn": "relu"}),
    Case("Vanilla MLP 4 Peanut", "MLP", "PeanutConfig", {"target_modules": ["lin0", "lin1"], "r": 2, "depth": 0, "act_fn": "relu"}),
    Case("Vanilla MLP 5 Peanut", "MLP", "PeanutConfig", {"target_modules": "lin0", "r": 2, "depth": 1, "act_fn": "gelu"}),
    # HIRA #
    Case("Vanilla MLP 1 HiRA", "MLP", "HiraConfig", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 HiRA", "MLP", "HiraConfig", {"target_modules": ["lin0"], "hira_dropout": 0.1}),
    Case("Embedding + transformers Conv1D 1 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["conv1d"]}),
    Case("Embedding + transformers Conv1D 2 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["emb"]}),
    Case("Embedding + transformers Conv1D 3 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["emb", "conv1d"]}),
    Case("Conv1d HiRA", "Conv1d", "HiraConfig", {"target_modules": ["conv1d"]}),
    Case("Conv2d 1 HiRA", "Conv2d", "HiraConfig", {"target_modules": ["conv2d"]}),
    Case("Conv2d 2 HiRA", "Conv2d", "HiraConfig", {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv3d 1 HiRA", "Conv3d", "HiraConfig", {"target_modules": ["conv3d"]}),
    Case("Conv3d 2 HiRA", "Conv3d", "HiraConfig", {"target_modules": ["conv3d", "lin0"]}),
    # Adamss #
    Case("Vanilla MLP 1 Adamss", "MLP", "AdamssConfig", {"target_modules": "lin0", "r": 8}),
    Case("Vanilla MLP 2 Adamss", "MLP", "AdamssConfig", {"target_modules": ["lin0"], "r": 8}),
    Case("Vanilla MLP 3 Adamss", "MLP", "AdamssConfig", {"target_modules": ["lin1"], "r": 2}),
    Case("Vanilla MLP 4 Adamss", "MLP", "AdamssConfig", {"target_modules": ["lin0", "lin1"], "r": 8}),
    Case("Vanilla MLP 5 Adamss with custom params", "MLP", "AdamssConfig", {"target_modules": ["lin0", "lin1"], "r": 8, "num_subspaces": 3, "subspace_rank": 2}),
    Case("Vanilla MLP 6 Adamss with ASA", "MLP", "AdamssConfig", {"target_modules": ["lin0", "lin1"], "r": 8, "num_subspaces": 6, "use_asa": True, "asa_target_subspaces": 3}),
    Case("Vanilla MLP 7 Adamss with dynamic rank", "MLP", "AdamssConfig", {"target_modules": ["lin0"], "r": 8, "num_subspaces": 3, "use_dynamic_rank": True, "svd_threshold": 0.1}),
    # AdaLoRA #
    Case("Vanilla MLP 1 AdaLoRA", "MLP", "AdaLoraConfig", {"target_modules": ["lin0"], "init_lora_weights": False, "total_step": 1, "orth_reg_weight": 0}),
    Case("Vanilla MLP 2 AdaLoRA", "MLP", "AdaLoraConfig", {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "total_step": 1}),
    Case("Conv2d 1 AdaLoRA", "Conv2d", "AdaLoraConfig", {"target_modules": ["conv2d"], "init_lora_weights": False, "total_step": 1}),
    Case("Conv2d 2 AdaLoRA", "Conv2d", "AdaLoraConfig", {"target_modules": ["conv2d", "lin0"], "init_lora_weights": False, "total_step": 1}),
)

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: tuple[MultiCase, ...] = (
    MultiCase("LoRA Same", "lora", "LoraConfig", {"target_modules": ["lin0"], "init_lora_weights": False}, {"target_modules": ["lin0"], "init_lora_weights": False}),
    MultiCase("LoRA Different", "lora", "LoraConfig", {"target_modules": ["lin0"], "init_lora_weights": False}, {"target_modules": ["lin1"], "init_lora_weights": False}),
    MultiCase("LoRA + trainable tokens Same", "lora+trainable_tokens", "LoraConfig", {"target_modules": ["lin0"], "init_lora_weights": False, "trainable_token_indices": {"emb": [0, 1, 2]}}, {"target_modules": ["lin0"], "init_lora_weights": False, "trainable_token_indices": {"emb": [3, 4, 5, 6]}}),
    MultiCase("LoRA + trainable tokens Different", "lora+trainable_tokens", "LoraConfig", {"target_modules": ["lin0"], "init_lora_weights": False, "trainable_token_indices": {"emb": [0, 1, 2]}}, {"target_modules": ["conv1d"], "init_lora_weights": False, "trainable_token_indices": {"emb": [3, 4, 5, 6]}}),
    MultiCase("LoRA targeting nn.Parameter Same", "lora", "LoraConfig", {"target_parameters": ["lin0.weight"], "init_lora_weights": False}, {"target_parameters": ["lin0.weight"], "init_lora_weights": False}),
    MultiCase("LoRA targeting nn.Parameter Different", "lora", "LoraConfig", {"target_parameters": ["lin0.weight"], "init_lora_weights": False}, {"target_parameters": ["lin1.weight"], "init_lora_weights": False}),
    MultiCase("IA3 Same", "ia3", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"], "init_ia3_weights": False}, {"target_modules": ["lin0"], "feedforward_modules": ["lin0"], "init_ia3_weights": False}),
    MultiCase("IA3 Different", "ia3", "IA3Config", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"], "init_ia3_weights": False}, {"target_modules": ["lin1"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}),
    MultiCase("BEFT Same", "beft", "BeftConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("BEFT Different", "beft", "BeftConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    MultiCase("AdaLora Same", "adalora", "AdaLoraConfig", {"target_modules": ["lin0"], "init_lora_weights": False, "inference_mode": True, "total_step": 1}, {"target_modules": ["lin0"], "init_lora_weights": False, "inference_mode": True, "total_step": 1}),
    MultiCase("AdaLora Different", "adalora", "AdaLoraConfig", {"target_modules": ["lin0"], "init_lora_weights": False, "inference_mode": True, "total_step": 1}, {"target_modules": ["lin1"], "init_lora_weights": False, "inference_mode": True, "total_step": 1}),
    MultiCase("FourierFT Same", "fourierft", "FourierFTConfig", {"n_frequency": 10, "target_modules": ["lin0"]}, {"n_frequency": 10, "target_modules": ["lin0"]}),
    MultiCase("FourierFT Different", "fourierft", "FourierFTConfig", {"n_frequency": 10, "target_modules": ["lin0"]}, {"n_frequency": 10, "target_modules": ["lin1"]}),
    MultiCase("GraLoRA Same", "gralora", "GraloraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("GraLoRA Different", "gralora", "GraloraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    MultiCase("GLoRA Same", "glora", "GloraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("GLoRA Different", "glora", "GloraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    MultiCase("SHiRA Same", "shira", "ShiraConfig", {"r": 1, "target_modules": ["lin0"], "init_weights": False}, {"r": 1, "target_modules": ["lin0"], "init_weights": False}),
    MultiCase("SHiRA Different", "shira", "ShiraConfig", {"r": 1, "target_modules": ["lin0"], "init_weights": False}, {"r": 1, "target_modules": ["lin1"], "init_weights": False}),
    # Check Supra (r set) here: if the hybrid works with multiple adapters, pure Super does too.
    MultiCase("Supertuning Same", "supertuning", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin0"], "r": 2, "init_weights": False}, {"sparsity": 0.5, "target_modules": ["lin0"], "r": 2, "init_weights": False}),
    MultiCase("Supertuning Different", "supertuning", "SupertuningConfig", {"sparsity": 0.5, "target_modules": ["lin0"], "r": 2, "init_weights": False}, {"sparsity": 0.5, "target_modules": ["lin1"], "r": 2, "init_weights": False}),
    # Note: Currently, we cannot target lin0 and lin1 with different adapters when using VeRA. The reason is that the
    # first adapter being created will result in a vera_A or vera_B shape that is too small for the next adapter
    # (remember that VeRA shares these parameters across all layers), which results in an error.
    MultiCase("VeRA Same", "vera", "VeraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("FRoD Same", "frod", "FrodConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    # Note: PVeRA presents the same problem mentioned above for VeRA.
    MultiCase("PVeRA Same", "pvera", "PveraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    # Note: RandLora may present the same problem mentioned above for Vera.
    MultiCase("RandLora Same", "randlora", "RandLoraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("UniLora Same", "unilora", "UniLoraConfig", {"target_modules": ["lin0"], "theta_d_length": 101, "init_weights": False}, {"target_modules": ["lin0"], "theta_d_length": 101, "init_weights": False}),
    MultiCase("HRA Same", "hra", "HRAConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("HRA Different", "hra", "HRAConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    MultiCase("DEFT Same", "deft", "DeftConfig", {"target_modules": ["lin0"], "init_weights": False, "decomposition_method": "qr"}, {"target_modules": ["lin0"], "init_weights": False, "decomposition_method": "qr"}),
    MultiCase("DEFT Different", "deft", "DeftConfig", {"target_modules": ["lin0"], "init_weights": False, "decomposition_method": "qr"}, {"target_modules": ["lin1"], "init_weights": False, "decomposition_method": "qr"}),
    MultiCase("MiSS Same", "miss", "MissConfig", {"target_modules": ["lin0"], "init_weights": False, "r": 2}, {"target_modules": ["lin0"], "init_weights": False, "r": 2}),
    MultiCase("MiSS Different", "miss", "MissConfig", {"target_modules": ["lin0"], "init_weights": False, "r": 2}, {"target_modules": ["lin1"], "init_weights": False, "r": 2}),
    # Not testing "mini" initialization targeting the same layer, because The matrix is initialized to all zeros in MiSS-mini mode.
    MultiCase("VBLoRA Same", "vblora", "VBLoRAConfig", {"target_modules": ["lin0"], "vector_length": 2, "init_vector_bank_bound": 0.1}, {"target_modules": ["lin0"], "vector_length": 2, "init_vector_bank_bound": 0.1}),
    MultiCase("VBLoRA Different", "vblora", "VBLoRAConfig", {"target_modules": ["lin0"], "vector_length": 2, "init_vector_bank_bound": 0.1}, {"target_modules": ["lin1"], "vector_length": 2, "init_vector_bank_bound": 0.1}),
    MultiCase("BOFT Same", "boft", "BOFTConfig", {"target_modules": ["lin0"], "init_weights": False, "boft_block_size": 2}, {"target_modules": ["lin0"], "init_weights": False, "boft_block_size": 2}),
    MultiCase("BOFT Different", "boft", "BOFTConfig", {"target_modules": ["lin0"], "init_weights": False, "boft_block_size": 2}, {"target_modules": ["lin1"], "init_weights": False, "boft_block_size": 2}),
    MultiCase("WaveFT Same", "waveft", "WaveFTConfig", {"target_modules": ["lin0"], "init_weights": False, "n_frequency": 8}, {"target_modules": ["lin0"], "init_weights": False, "n_frequency": 8}),
    MultiCase("WaveFT Different", "waveft", "WaveFTConfig", {"target_modules": ["lin0"], "init_weights": False, "n_frequency": 8}, {"target_modules": ["lin1"], "init_weights": False, "n_frequency": 8}),
    MultiCase("RoAd Same", "road", "RoadConfig", {"target_modules": ["lin0"], "init_weights": False, "group_size": 2}, {"target_modules": ["lin0"], "init_weights": False, "group_size": 2}),
    MultiCase("RoAd Different", "road", "RoadConfig", {"target_modules": ["lin0"], "init_weights": False, "group_size": 2}, {"target_modules": ["lin1"], "init_weights": False, "group_size": 2}),
    MultiCase("RoAd 2 Different", "road", "RoadConfig", {"target_modules": ["lin0"], "init_weights": False, "variant": "road_1", "group_size": 2}, {"target_modules": ["lin1"], "init_weights": False, "variant": "road_2", "group_size": 2}),
    MultiCase("RoAd 4 Different", "road", "RoadConfig", {"target_modules": ["lin0"], "init_weights": False, "variant": "road_1", "group_size": 2}, {"target_modules": ["lin1"], "init_weights": False, "variant": "road_4", "group_size": 2}),
    MultiCase("WaveFT Same", "waveft", "WaveFTConfig", {"target_modules": ["lin0"], "init_weights": False, "n_frequency": 8}, {"target_modules": ["lin0"], "init_weights": False, "n_frequency": 8}),
    MultiCase("WaveFT Different", "waveft", "WaveFTConfig", {"target_modules": ["lin0"], "init_weights": False, "n_frequency": 8}, {"target_modules": ["lin1"], "init_weights": False, "n_frequency": 8}),
    MultiCase("DeLoRA Same", "delora", "DeloraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("DeLoRA Different", "delora", "DeloraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    MultiCase("PSOFT Same", "psoft", "PsoftConfig", {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "init_weights": False}, {"target_modules": ["lin0"], "r": 4, "psoft_alpha": 4, "init_weights": False}),
    MultiCase("PSOFT Different", "psoft", "PsoftConfig", {"target_modules": ["lin0"], "r": 2, "psoft_alpha": 2, "init_weights": False}, {"target_modules": ["lin1"], "r": 2, "psoft_alpha": 2, "init_weights": False}),
    MultiCase("Lily Same", "lily", "LilyConfig", {"target_modules": ["lin0"], "r": 2, "stride_A": 1, "num_B": 2, "init_weights": False}, {"target_modules": ["lin0"], "r": 2, "stride_A": 1, "num_B": 2, "init_weights": False}),
    MultiCase("Lily Different", "lily", "LilyConfig", {"target_modules": ["lin0"], "r": 2, "stride_A": 1, "num_B": 2, "init_weights": False}, {"target_modules": ["lin1"], "r": 2, "stride_A": 1, "num_B": 2, "init_weights": False}),
    MultiCase("Peanut Same", "peanut", "PeanutConfig", {"target_modules": ["lin0"], "r": 2, "depth": 1, "act_fn": "relu", "init_weights": False}, {"target_modules": ["lin0"], "r": 2, "depth": 1, "act_fn": "relu", "init_weights": False}),
    MultiCase("Peanut Different", "peanut", "PeanutConfig", {"target_modules": ["lin0"], "r": 2, "depth": 1, "act_fn": "relu", "init_weights": False}, {"target_modules": ["lin1"], "r": 2, "depth": 1, "act_fn": "relu", "init_weights": False}),
    MultiCase("HiRA Same", "hira", "HiraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("HiRA Different", "hira", "HiraConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    # BD-LoRA different encounters issues as the adapter weights have different shapes then
    # for TinyLoRA, use uniform init, which allows the different adapters to be sufficiently different that they don't
    # produce identical results within allowed tolerance
    MultiCase("TinyLoRA Same", "tinylora", "TinyLoraConfig", {"target_modules": ["lin0"], "init_weights": "uniform"}, {"target_modules": ["lin0"], "init_weights": "uniform"}),
    MultiCase("TinyLoRA Different", "tinylora", "TinyLoraConfig", {"target_modules": ["lin0"], "init_weights": "uniform"}, {"target_modules": ["lin1"], "init_weights": "uniform"}),
    MultiCase("LoHa Same", "loha", "LoHaConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("LoHa Different", "loha", "LoHaConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    MultiCase("LoKr Same", "lokr", "LoKrConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin0"], "init_weights": False}),
    MultiCase("LoKr Different", "lokr", "LoKrConfig", {"target_modules": ["lin0"], "init_weights": False}, {"target_modules": ["lin1"], "init_weights": False}),
    MultiCase("OFT Same", "oft", "OFTConfig", {"target_modules": ["lin0"], "init_weights": False, "oft_block_size": 2}, {"target_modules": ["lin0"], "init_weights": False, "oft_block_size": 2}),
    MultiCase("OFT Different", "oft", "OFTConfig", {"target_modules": ["lin0"], "init_weights": False, "oft_block_size": 2}, {"target_modules": ["lin1"], "init_weights": False, "oft_block_size": 2}),
    # Note: Multiple C3A adapters applied to the same layer fails with shape mismatch
    MultiCase("C3A Different", "c3a", "C3AConfig", {"target_modules": ["lin0"], "init_weights": False, "block_size": 2}, {"target_modules": ["lin1"], "init_weights": False, "block_size": 2}),
    MultiCase("AdaMSS Same", "adamss", "AdamssConfig", {"target_modules": ["lin0"], "r": 8, "num_subspaces": 2, "init_weights": False}, {"target_modules": ["lin0"], "r": 8, "num_subspaces": 2, "init_weights": False}),
    MultiCase("AdaMSS Different", "adamss", "AdamssConfig", {"target_modules": ["lin0"], "r": 8, "num_subspaces": 2, "init_weights": False}, {"target_modules": ["lin1"], "r": 2, "num_subspaces": 2, "init_weights": False}),
)
# fmt: on


def case_ids(cases: tuple[Any, ...]) -> list[str]:
    """One unique id per row: PEFT's name, and `name (2)`, `name (3)` for PEFT's repeated names."""
    seen: dict[str, int] = {}
    ids = []
    for case in cases:
        seen[case.name] = seen.get(case.name, 0) + 1
        ids.append(case.name if seen[case.name] == 1 else f"{case.name} ({seen[case.name]})")
    return ids


def _resolve(lib: ModuleType, value: Any) -> Any:
    if isinstance(value, Sub):
        kwargs = {k: _resolve(lib, v) for k, v in value.kwargs.items()}
        if lib.__name__ == "peft":
            return getattr(lib, value.config_cls)(**kwargs)
        return kwargs  # funcpeft reads nested configs as adapter_config.json holds them: plain dicts
    if isinstance(value, Mapping):
        return {k: _resolve(lib, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(lib, v) for v in value]
    return value


def build_config(lib: ModuleType, config_cls: str, config_kwargs: Mapping[str, Any], **extra: Any) -> Any:
    """`lib.<config_cls>(**config_kwargs, **extra)` for `lib` = the `peft` or the `funcpeft` module (fresh copies)."""
    cls = getattr(lib, config_cls, None)
    if cls is None:
        raise AttributeError(f"{lib.__name__} has no config class {config_cls}")
    return cls(**_resolve(lib, {**config_kwargs, **extra}))
