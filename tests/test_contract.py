"""The method contract, table-driven (optax's `alias_test.py` style): every registered method runs the same checks.

Adding a method = one row in `CONTRACT_ROWS` (see CONTRIBUTING.md). Each row runs PEFT's differential checks from
tests/peft_matrix/harness.py on a tiny random transformers model (outputs, every gradient, counts and the
print line, files both ways, merge_and_unload), plus funcpeft's functional laws: a zero/identity init is the
base model, an ensemble under vmap equals a loop, per-example routing equals running each adapter alone.
`test_every_registered_method_has_a_row` fails for a method registered without a row.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import optree
import pytest
import torch
from peft_matrix import models
from peft_matrix.cases import Case, Sub, build_config
from peft_matrix.harness import check_row

import funcpeft
from funcpeft import testing as T
from funcpeft._config import PeftConfig, validated_init
from funcpeft.methods import METHODS, Method, register, unregister
from funcpeft.methods import lora as lora_method
from funcpeft.methods.base import KeyRules

# (row id, method name, model id, config class, config kwargs); PEFT's own rows are in tests/test_peft_matrix.py
CONTRACT_ROWS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("lora-llama", "lora", "tiny-llama", "LoraConfig", dict(r=4, target_modules="all-linear", use_rslora=True)),
    ("lora-gpt2", "lora", "tiny-gpt2", "LoraConfig", dict(r=4, target_modules=["c_attn", "c_fc", "wte"])),
    ("lora-bert-seq-cls", "lora", "tiny-bert-seq-cls", "LoraConfig", dict(r=4, task_type="SEQ_CLS", bias="lora_only")),
    (
        "dora-llama",
        "dora",
        "tiny-llama",
        "LoraConfig",
        dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True),
    ),
    ("dora-gpt2", "dora", "tiny-gpt2", "LoraConfig", dict(r=4, target_modules=["c_attn"], use_dora=True)),
    ("ia3-llama", "ia3", "tiny-llama", "IA3Config", dict()),
    ("ia3-gpt2", "ia3", "tiny-gpt2", "IA3Config", dict()),
    ("loha-llama", "loha", "tiny-llama", "LoHaConfig", dict(r=4, target_modules="all-linear")),
    ("lokr-llama", "lokr", "tiny-llama", "LoKrConfig", dict(r=4, target_modules="all-linear", decompose_both=True)),
    ("vera-llama", "vera", "tiny-llama", "VeraConfig", dict(r=16, target_modules=["q_proj", "v_proj", "o_proj"])),
    ("vera-gpt2", "vera", "tiny-gpt2", "VeraConfig", dict(r=16, target_modules=["c_attn", "c_fc"])),
    ("pvera-llama", "pvera", "tiny-llama", "PveraConfig", dict(r=8, target_modules=["q_proj", "v_proj", "o_proj"])),
    ("pvera-gpt2", "pvera", "tiny-gpt2", "PveraConfig", dict(r=8, target_modules=["c_attn", "c_fc"])),
    (
        "unilora-llama",
        "unilora",
        "tiny-llama",
        "UniLoraConfig",
        dict(r=4, theta_d_length=300, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    ),
    ("unilora-gpt2", "unilora", "tiny-gpt2", "UniLoraConfig", dict(r=4, theta_d_length=64, target_modules=["c_attn"])),
    # GLoRA: PEFT supports plain nn.Linear only (no GPT-2 Conv1D); BERT's linears have a bias (paths C, D, E)
    ("glora-llama", "glora", "tiny-llama", "GloraConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    (
        "glora-bert-seq-cls",
        "glora",
        "tiny-bert-seq-cls",
        "GloraConfig",
        dict(r=2, task_type="SEQ_CLS", config_A_B="vector", config_C="vector", config_D_E="vector", init_weights=False),
    ),
    (
        "mica-llama",
        "mica",
        "tiny-llama",
        "LoraConfig",
        dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights="mica"),
    ),
    (
        "mica-gpt2",
        "mica",
        "tiny-gpt2",
        "LoraConfig",
        dict(r=4, target_modules=["c_attn", "wte"], init_lora_weights="mica"),
    ),
    (
        "kasa-llama",
        "kasa",
        "tiny-llama",
        "LoraConfig",
        dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], kasa_config={"beta": 0.01}),
    ),
    (
        "bdlora-llama",
        "bdlora",
        "tiny-llama",
        "LoraConfig",
        dict(
            r=4,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            lora_dropout=0.1,
            use_bdlora={
                "target_modules_bd_a": ["o_proj", "down_proj"],
                "target_modules_bd_b": ["q_proj", "v_proj"],
                "nblocks": 2,
            },
        ),
    ),
    # MiSS and C3A: PEFT supports nn.Linear only (no GPT-2 Conv1D)
    ("miss-llama", "miss", "tiny-llama", "MissConfig", dict(r=6, target_modules="all-linear")),
    (
        "miss-mini-llama",
        "miss",
        "tiny-llama",
        "MissConfig",
        dict(r=8, init_weights="mini", mini_r=16, target_modules=["q_proj", "down_proj"]),
    ),
    (
        "miss-bat-llama",
        "miss_bat",
        "tiny-llama",
        "MissConfig",
        dict(r=8, init_weights="bat", target_modules="all-linear"),
    ),
    (
        "fourierft-llama",
        "fourierft",
        "tiny-llama",
        "FourierFTConfig",
        dict(
            n_frequency=64,
            target_modules=["q_proj", "v_proj", "down_proj"],
            n_frequency_pattern={"down_proj": 32},
            init_weights=True,
        ),
    ),
    (
        "fourierft-gpt2",
        "fourierft",
        "tiny-gpt2",
        "FourierFTConfig",
        dict(n_frequency=50, target_modules=["c_attn", "mlp.c_proj"], init_weights=True),
    ),
    (
        "waveft-llama",
        "waveft",
        "tiny-llama",
        "WaveFTConfig",
        dict(n_frequency=64, target_modules=["q_proj", "v_proj", "down_proj"], n_frequency_pattern={"down_proj": 32}),
    ),
    (
        "waveft-gpt2",
        "waveft",
        "tiny-gpt2",
        "WaveFTConfig",
        dict(n_frequency=50, target_modules=["c_attn", "mlp.c_proj"], wavelet_family="sym2"),
    ),
    # DeLoRA: PEFT supports nn.Linear only (no GPT-2 Conv1D)
    (
        "delora-llama",
        "delora",
        "tiny-llama",
        "DeloraConfig",
        dict(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2}, lambda_pattern={"q_proj": 3.0}),
    ),
    # PSOFT: PEFT supports nn.Linear only (no GPT-2 Conv1D)
    ("psoft-llama", "psoft", "tiny-llama", "PsoftConfig", dict(r=4, psoft_alpha=8, target_modules="all-linear")),
    (
        "psoft-llama-options",
        "psoft",
        "tiny-llama",
        "PsoftConfig",
        dict(
            r=3,
            target_modules=["q_proj", "v_proj", "down_proj"],
            ab_svd_init="pissa_init",
            psoft_svd="lowrank",
            random_seed=5,
            use_cayley_neumann=True,
            num_cayley_neumann_terms=4,
            cayley_neumann_eps=0.5,
            psoft_mag_a=False,
        ),
    ),
    # OSF: PEFT adapts nn.Linear only (it silently skips GPT-2's Conv1D, its own default targets there)
    ("osf-llama", "osf", "tiny-llama", "OSFConfig", dict(effective_rank=0.75)),
    (
        "osf-llama-patterns",
        "osf",
        "tiny-llama",
        "OSFConfig",
        dict(target_modules=["q_proj", "up_proj", "down_proj"], effective_rank=40, rank_pattern={"down": 0.5}),
    ),
    (
        "c3a-llama",
        "c3a",
        "tiny-llama",
        "C3AConfig",
        dict(block_size=16, target_modules="all-linear", block_size_pattern={"v_proj": 32}, init_weights=True),
    ),
    (
        "randlora-llama",
        "randlora",
        "tiny-llama",
        "RandLoraConfig",
        dict(r=8, target_modules="all-linear", randlora_alpha=16),
    ),
    (
        "randlora-gpt2",
        "randlora",
        "tiny-gpt2",
        "RandLoraConfig",
        dict(r=8, target_modules=["c_attn", "c_fc"], sparse=True, bias="randlora_only"),
    ),
    (
        "oft-llama",
        "oft",
        "tiny-llama",
        "OFTConfig",
        dict(oft_block_size=8, target_modules="all-linear", coft=True, eps=0.1),
    ),
    (
        "oft-llama-embedding",
        "oft",
        "tiny-llama",
        "OFTConfig",
        dict(
            r=4, oft_block_size=0, target_modules=["embed_tokens", "v_proj"], use_cayley_neumann=False, block_share=True
        ),
    ),
    (
        "oft-gpt2",
        "oft",
        "tiny-gpt2",
        "OFTConfig",
        dict(oft_block_size=4, target_modules=["wte"]),
    ),  # Conv1D: not in PEFT
    (
        "boft-llama",
        "boft",
        "tiny-llama",
        "BOFTConfig",
        dict(boft_block_size=4, target_modules="all-linear", bias="boft_only"),
    ),
    (
        "boft-gpt2",
        "boft",
        "tiny-gpt2",
        "BOFTConfig",
        dict(boft_block_num=8, boft_block_size=0, target_modules=["lm_head"]),
    ),
    ("hra-llama", "hra", "tiny-llama", "HRAConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    (
        "hra-llama-gs",
        "hra",
        "tiny-llama",
        "HRAConfig",
        dict(r=3, apply_GS=True, init_weights=False, target_modules=["o_proj", "up_proj"]),
    ),
    ("hra-gpt2", "hra", "tiny-gpt2", "HRAConfig", dict(r=2, target_modules=["lm_head"])),
    ("shira-llama", "shira", "tiny-llama", "ShiraConfig", dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    # GPT-2's blocks are Conv1D, which PEFT's SHiRA refuses; its lm_head (tied to wte) is an nn.Linear
    ("shira-gpt2-lm_head", "shira", "tiny-gpt2", "ShiraConfig", dict(r=4, target_modules=["lm_head"], random_seed=3)),
    (
        "vblora-llama",
        "vblora",
        "tiny-llama",
        "VBLoRAConfig",
        dict(r=4, vector_length=16, num_vectors=32, target_modules=["q_proj", "v_proj", "up_proj"]),
    ),
    (
        "vblora-gpt2",
        "vblora",
        "tiny-gpt2",
        "VBLoRAConfig",
        dict(r=2, vector_length=32, num_vectors=16, topk=3, target_modules=["c_attn", "c_fc"], bias="vblora_only"),
    ),
    ("ln_tuning-llama", "ln_tuning", "tiny-llama", "LNTuningConfig", dict()),
    ("ln_tuning-gpt2", "ln_tuning", "tiny-gpt2", "LNTuningConfig", dict()),
    (
        "trainable_tokens-llama",
        "trainable_tokens",
        "tiny-llama",
        "TrainableTokensConfig",
        dict(token_indices=[12, 94, 3]),
    ),
    (
        "trainable_tokens-llama-tied",
        "trainable_tokens",
        "tiny-llama-tied",
        "TrainableTokensConfig",
        dict(token_indices=[3, 43, 95, 120]),
    ),
    ("trainable_tokens-gpt2", "trainable_tokens", "tiny-gpt2", "TrainableTokensConfig", dict(token_indices=[15, 7])),
    (
        "lora+tokens-llama-tied",
        "lora",
        "tiny-llama-tied",
        "LoraConfig",
        dict(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 43, 95]),
    ),
    (
        "lora+tokens-gpt2",
        "lora",
        "tiny-gpt2",
        "LoraConfig",
        dict(r=4, target_modules=["c_attn"], trainable_token_indices={"wte": [15, 7]}),
    ),
    (
        "adalora-llama",
        "adalora",
        "tiny-llama",
        "AdaLoraConfig",
        dict(init_r=6, target_r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], total_step=10),
    ),
    (
        "adalora-gpt2",
        "adalora",
        "tiny-gpt2",
        "AdaLoraConfig",
        dict(init_r=4, target_modules=["c_attn", "c_fc"], total_step=10),
    ),
    (
        "velora-llama",
        "velora",
        "tiny-llama",
        "LoraConfig",
        dict(
            r=4, target_modules=["q_proj", "v_proj", "down_proj"], velora_config=Sub("VeloraConfig", {"num_groups": 4})
        ),
    ),
    (
        "monteclora-llama",
        "monteclora",
        "tiny-llama",
        "LoraConfig",
        dict(r=4, target_modules=["q_proj", "up_proj"], monteclora_config=Sub("MontecloraConfig", {"num_samples": 3})),
    ),
    # input_ids row 0 holds the invocation [48, 65] (adapted from it on), row 1 does not (never adapted)
    (
        "alora-llama",
        "alora",
        "tiny-llama",
        "LoraConfig",
        dict(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[48, 65], task_type="CAUSAL_LM"),
    ),
    (
        "alora-gpt2",
        "alora",
        "tiny-gpt2",
        "LoraConfig",
        dict(r=4, target_modules=["c_attn"], alora_invocation_tokens=[48, 65], task_type="CAUSAL_LM"),
    ),
    (
        "adaption-prompt-llama",
        "adaption_prompt",
        "tiny-llama",
        "AdaptionPromptConfig",
        dict(adapter_len=3, adapter_layers=2),
    ),
    (
        "adaption-prompt-gpt2",
        "adaption_prompt",
        "tiny-gpt2",
        "AdaptionPromptConfig",
        dict(adapter_len=3, adapter_layers=2),
    ),
    (
        "hira-llama",
        "hira",
        "tiny-llama",
        "HiraConfig",
        dict(r=4, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    ),
    (
        "hira-gpt2",
        "hira",
        "tiny-gpt2",
        "HiraConfig",
        dict(r=4, target_modules=["c_attn", "c_fc", "wte"], hira_dropout=0.1),
    ),
    ("gralora-llama", "gralora", "tiny-llama", "GraloraConfig", dict(r=4, hybrid_r=2, target_modules="all-linear")),
    ("gralora-gpt2", "gralora", "tiny-gpt2", "GraloraConfig", dict(r=4, target_modules=["c_attn", "c_fc"])),
    (
        "tinylora-llama",
        "tinylora",
        "tiny-llama",
        "TinyLoraConfig",
        dict(r=2, u=8, weight_tying=0.5, target_modules="all-linear"),
    ),
    (
        "tinylora-gpt2",
        "tinylora",
        "tiny-gpt2",
        "TinyLoraConfig",
        dict(r=2, u=4, target_modules=["c_attn", "wte"], tinylora_dropout=0.1),
    ),
    # BEFT: PEFT supports nn.Linear only; Llama's projections have no bias (merging is refused, like PEFT), BERT's do
    ("beft-llama", "beft", "tiny-llama", "BeftConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("beft-bert-seq-cls", "beft", "tiny-bert-seq-cls", "BeftConfig", dict(task_type="SEQ_CLS")),
    # Super-Tuning: PEFT supports nn.Linear only
    (
        "supertuning-llama",
        "supertuning",
        "tiny-llama",
        "SupertuningConfig",
        dict(sparsity=0.9, target_modules="all-linear"),
    ),
    (
        "supra-llama",
        "supertuning",
        "tiny-llama",
        "SupertuningConfig",
        dict(sparsity=0.5, select_top=False, r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    # RoAd: PEFT supports nn.Linear only (no GPT-2 Conv1D); group_size must divide every out_features (k_proj: 32)
    ("road-llama", "road", "tiny-llama", "RoadConfig", dict(group_size=32, target_modules="all-linear")),
    (
        "road4-llama",
        "road",
        "tiny-llama",
        "RoadConfig",
        dict(variant="road_4", group_size=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    ("deft-llama", "deft", "tiny-llama", "DeftConfig", dict(r=4, target_modules="all-linear", alpha=8)),
    (
        "deft-gpt2",
        "deft",
        "tiny-gpt2",
        "DeftConfig",
        dict(r=4, target_modules=["c_attn", "c_fc"], decomposition_method="qr", deft_dropout=0.1),
    ),
    (
        "adamss-llama",
        "adamss",
        "tiny-llama",
        "AdamssConfig",
        dict(r=8, num_subspaces=3, subspace_rank=2, target_modules="all-linear"),
    ),
    (
        "adamss-llama-dynamic",
        "adamss",
        "tiny-llama",
        "AdamssConfig",
        dict(r=6, num_subspaces=4, subspace_rank=3, use_dynamic_rank=True, target_modules=["q_proj", "down_proj"]),
    ),
    (
        "peanut-llama",
        "peanut",
        "tiny-llama",
        "PeanutConfig",
        dict(r=4, depth=1, act_fn="gelu", target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    # GPT-2's blocks are Conv1D, which PEFT's PEANuT refuses; its lm_head (tied to wte) is an nn.Linear
    ("peanut-gpt2-lm_head", "peanut", "tiny-gpt2", "PeanutConfig", dict(r=4, target_modules=["lm_head"])),
    (
        "lily-llama",
        "lily",
        "tiny-llama",
        "LilyConfig",
        dict(r=4, stride_A=2, num_B=3, scaling=0.5, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    ("lily-llama-regex", "lily", "tiny-llama", "LilyConfig", dict(r=2, target_modules=r".*\.(k_proj|o_proj)")),
    # GPT-2's blocks are Conv1D, which PEFT's Lily refuses; its lm_head (tied to wte) is an nn.Linear
    ("lily-gpt2-lm_head", "lily", "tiny-gpt2", "LilyConfig", dict(r=4, target_modules=["lm_head"])),
    (
        "frod-llama",
        "frod",
        "tiny-llama",
        "FrodConfig",
        dict(target_modules=["q_proj", "v_proj", "down_proj"], sparse_rate=0.05, init_weights=False),
    ),
    ("frod-gpt2", "frod", "tiny-gpt2", "FrodConfig", dict(target_modules=["c_attn", "c_fc"], frod_dropout=0.1)),
    ("shadow-llama", "shadow", "tiny-llama", "ShadowConfig", dict(task_type="CAUSAL_LM", init_weights=False)),
    (
        "shadow-gpt2",
        "shadow",
        "tiny-gpt2",
        "ShadowConfig",
        dict(r=4, shadow_alpha=0.5, update_hidden_size=6, init_weights=False, shadow_num_hidden_layers=2),
    ),
]
# methods a one-config row cannot build, with the test file that checks them against PEFT instead
TESTED_ELSEWHERE: dict[str, str] = {
    "arrow": "test_lora_var2.py",  # a router over trained LoRA experts: funcpeft.create_arrow_model
    "poly": "test_method_poly.py",  # every call needs task_ids (B,), which the generic rows do not pass
    # X-LoRA's mixing layers read LoRA experts and need the scalings of its two-pass call (funcpeft._xlora)
    "xlora": "test_method_xlora.py",
    # input-level methods (prompt learning): no layers for the per-layer checks; differential tests of their own
    "prompt_tuning": "test_prompt_learning.py",
    "multitask_prompt_tuning": "test_prompt_learning.py",
    "p_tuning": "test_prompt_learning.py",
    "prefix_tuning": "test_prompt_learning.py",
    "cpt": "test_method_cpt_cartridge.py",
    "cartridge": "test_method_cpt_cartridge.py",
}
# rows whose fresh adapter is not the base model (DoRA's init is f * (W + 0) up to rounding; KaSA truncates W;
# VB-LoRA's logits start random)
NOT_NOOP_INIT = {"dora", "kasa", "vblora", "unilora"}  # UniLoRA: A and B both gather the small random theta_d
# methods whose output for one example depends on the whole batch (Lily's router averages over it): per-example
# routing raises NotImplementedError naming the method
NOT_PER_EXAMPLE = {"lily": "Lily", "shadow": r"\(SHADOW\)"}  # ShadowPEFT: a state carried through the whole call
ROW_IDS = [row[0] for row in CONTRACT_ROWS]

# rows where PEFT's own gradients are wrong: funcpeft's are checked against finite differences of PEFT's forward
# (and the check fails if PEFT's gradients become right); see tests/test_peft_matrix.py DEVIATIONS
CONTRACT_DEVIATIONS: dict[str, str] = {
    "c3a-llama": "PEFT's hand-written BlockCircularConvolution backward gives a wrong input gradient "
    "(tests/test_method_c3a.py), so every C3A kernel below another C3A layer gets a wrong gradient",
}


def _config(row: tuple[str, str, str, str, dict[str, Any]]) -> PeftConfig:
    return build_config(funcpeft, row[3], row[4])


def test_every_registered_method_has_a_row() -> None:
    covered = {row[1] for row in CONTRACT_ROWS}
    for method, test_file in TESTED_ELSEWHERE.items():  # the named file exists and compares the method with PEFT
        text = (Path(__file__).parent / test_file).read_text()
        assert f"def test_{method}_" in text and "import peft" in text, (method, test_file)
        covered.add(method)
    missing = sorted(set(METHODS) - covered)
    assert not missing, f"registered methods without a CONTRACT_ROWS row: {missing} (see CONTRIBUTING.md)"
    for row in CONTRACT_ROWS:  # each row really exercises the method it names
        assert funcpeft.methods.method_for(_config(row)).name == row[1], row[0]


@pytest.mark.parametrize("row", CONTRACT_ROWS, ids=ROW_IDS)
def test_row_matches_peft(row: tuple[str, str, str, str, dict[str, Any]]) -> None:
    name, _, model_id, config_cls, kwargs = row
    with tempfile.TemporaryDirectory() as tmp:
        grads = "finite_differences" if name in CONTRACT_DEVIATIONS else "autograd"
        check_row(Case(name, model_id, config_cls, kwargs), tmp, grads=grads)


def _random_tree(fresh: Any, seed: int) -> Any:
    """Non-trivial values around the init (multiplicative methods such as DoRA/IA3 must stay near it)."""
    noise = T.random_like(fresh, torch.Generator().manual_seed(seed), scale=0.2)
    return optree.tree_map(lambda f, n: f.detach() + n.detach(), fresh, noise)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("row", CONTRACT_ROWS, ids=ROW_IDS)
def test_row_functional_laws(row: tuple[str, str, str, str, dict[str, Any]]) -> None:
    """Init is a no-op where PEFT's is; vmap over stacked adapters == loop; per-example routing == each alone."""
    model = models.build(row[2])
    x = models.inputs(row[2])
    pm = funcpeft.get_peft_model(model, _config(row), generator=torch.Generator().manual_seed(0))
    fn, base, fresh = pm
    with torch.no_grad():
        plain = _logits(model(**x))
        no_op_init = row[1] not in NOT_NOOP_INIT and not (row[1] == "lora" and "wte" in str(row[4]))
        if no_op_init and row[4].get("init_weights", True) is not False:  # their init is a no-op
            torch.testing.assert_close(_logits(fn(base, fresh, **x)), plain, atol=1e-6, rtol=0)
        trees = [_random_tree(fresh, s) for s in range(3)]
        alone = [_logits(fn(base, t, **x)) for t in trees]
        assert not torch.allclose(alone[0], alone[1]), "different adapters should give different outputs"
        stacked = funcpeft.stack_adapters(trees)
        vmapped = torch.func.vmap(lambda a: _logits(fn(base, a, **x)))(stacked)
        for k in range(3):
            torch.testing.assert_close(vmapped[k], alone[k], atol=1e-5, rtol=1e-5)
        if any(e.overrides for e in pm.plans["default"].values()):
            return  # modules_to_save / trainable biases cannot be routed per example (documented limit)
        batch = x["input_ids"].shape[0]
        index = torch.tensor([2, 0][:batch])
        if row[1] in NOT_PER_EXAMPLE:
            with pytest.raises(NotImplementedError, match=f"per-example adapters .* {NOT_PER_EXAMPLE[row[1]]}"):
                fn(base, funcpeft.per_example(stacked, index), **x)
            return
        routed = _logits(fn(base, funcpeft.per_example(stacked, index), **x))
        for i, k in enumerate(index.tolist()):
            torch.testing.assert_close(routed[i], alone[k][i], atol=1e-5, rtol=1e-5)


# -- the path CONTRIBUTING.md describes, followed for a throwaway method ----------------------------------------
@validated_init
@dataclass
class HalfLoraConfig(PeftConfig):
    """A throwaway method: LoRA whose term is halved (no PEFT counterpart; exists to prove the extension path)."""

    # a type of its own: every one of PEFT's 45 is taken, and a method outside PEFT names its own (any str)
    PEFT_TYPE: ClassVar[str] = "HALF_LORA"
    r: int = 4
    target_modules: Any = None
    exclude_modules: Any = None
    modules_to_save: Any = None
    use_rslora: bool = False
    lora_alpha: float = 4
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()


def _half_forward(spec: Any, params: Any, x: torch.Tensor, result: torch.Tensor | None, ctx: Any) -> torch.Tensor:
    assert result is not None
    return result + 0.5 * (lora_method.forward(spec, params, x, result, ctx) - result)


def _half_delta(spec: Any, params: Any) -> torch.Tensor:
    return 0.5 * lora_method.delta_weight(spec, params)


@pytest.fixture
def half_lora() -> Any:
    method = Method(
        name="half_lora",
        config=HalfLoraConfig,
        hyper=lora_method.hyper,
        param_names=lora_method.param_names,
        init=lora_method.init,
        forward=_half_forward,
        delta_weight=_half_delta,
        keys=KeyRules(param_prefix="lora_"),
    )
    try:
        yield register(method)
    finally:
        unregister("half_lora")


def test_a_new_method_is_one_registration(half_lora: Method) -> None:
    """get_peft_model, fn, gradients, merge, save/load and counts work for a method defined in 20 lines."""
    model = T.tiny_llama()
    config = HalfLoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    pm = funcpeft.get_peft_model(model, config)
    fn, base, fresh = pm
    tree = _random_tree(fresh, 0)
    ids = models.inputs("tiny-llama")["input_ids"]
    # reference: the same tree as a plain LoRA adapter with alpha halved gives the same output
    ref = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        want = ref.fn(ref.base, tree, input_ids=ids).logits
        got = fn(base, tree, input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        merged = funcpeft.merge_and_unload(pm, tree)(input_ids=ids).logits
        torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    _, grads = funcpeft.value_and_grad(lambda a: fn(base, a, input_ids=ids).logits.square().mean())(tree)
    assert all(g.abs().sum() > 0 for g in optree.tree_leaves(grads))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == funcpeft._trees.tree_numel(fresh) and total == trainable + sum(t.numel() for t in base.values())
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d, tree)
        back, back_config = funcpeft.load_adapter(d, model=model)
        assert isinstance(back_config, HalfLoraConfig)
        assert all(torch.equal(back[p][k], tree[p][k]) for p in tree for k in tree[p])
        assert os.path.isfile(os.path.join(d, "adapter_config.json"))
    spec = pm.plans["default"]["model.layers.0.self_attn.q_proj"].spec
    assert spec is not None and math.isclose(spec.hyper.scaling, 2.0)


def _tensors_in(value: Any, where: str, seen: set[int]) -> list[str]:
    """Where `value` (a spec, recursively: dataclass fields, containers) holds a torch.Tensor or an nn.Module."""
    if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)):
        return []
    seen.add(id(value))
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return [f"{where}: {type(value).__name__}"]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [
            h for f in dataclasses.fields(value) for h in _tensors_in(getattr(value, f.name), f"{where}.{f.name}", seen)
        ]
    if isinstance(value, dict) or hasattr(value, "items"):
        return [
            h for k, v in value.items() for h in _tensors_in(k, where, seen) + _tensors_in(v, f"{where}[{k!r}]", seen)
        ]
    if isinstance(value, (tuple, list, set, frozenset)):
        return [h for i, v in enumerate(value) for h in _tensors_in(v, f"{where}[{i}]", seen)]
    return []


@pytest.mark.parametrize("row", CONTRACT_ROWS, ids=ROW_IDS)
def test_row_specs_are_static_metadata(row: tuple[str, str, str, str, dict[str, Any]]) -> None:
    """Every LayerSpec (and input-level spec) of a plan is hashable and holds no tensor or module: specs are the
    static half of `fn` (compile guards, plan equality, caching); tensors belong in `base` or the adapter tree.
    Planning the same model twice gives equal plans (a new adapter reuses what was compiled for the first)."""
    from funcpeft._plan import plan_adapter

    model = models.build(row[2])
    _, plan = plan_adapter(model, _config(row))
    specs = [(path, e.spec) for path, e in plan.items() if e.spec is not None]
    specs += [(path, e.prompt[1]) for path, e in plan.items() if e.prompt is not None]
    found = [h for path, spec in specs for h in _tensors_in(spec, path, set())]
    for _, spec in specs:
        hash(spec)  # raises TypeError for an unhashable one
    assert not found, f"{row[0]}: specs hold tensors / modules: {found[:5]}"
    _, again = plan_adapter(model, _config(row))
    assert again == plan and [hash(e) for e in again.values()] == [hash(e) for e in plan.values()], row[0]
