"""torch.compile and per-example routing for the methods, table-driven: a method gets both checks by a row.

COMPILE_ROWS: `torch.compile(fn, fullgraph=True)` (aot_eager) equals eager for three adapter values, the compiled
call's backward reaches every adapter leaf, and new values never recompile (one frame). PER_EXAMPLE_ROWS: one batch
whose examples use different adapters (`per_example(stacked, index)`, -1 = the base model where the row allows it)
equals running each adapter alone on the whole batch. The methods' PEFT comparisons live in test_method_<name>.py
and test_contract.py (which also routes per example on the tiny transformers models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optree
import pytest
import torch
from helpers import MODELS, make_inputs, out_tensor
from method_checks import random_trees
from method_helpers import CONV_X, MLP_X, OrthConv, OrthMLP, quiet, seeded
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import funcpeft
from funcpeft import testing as T


def _llama_ids() -> dict[str, Any]:
    return {"input_ids": make_inputs("llama")["input_ids"]}


# model id -> (model builder, inputs builder)
MODELS_AND_INPUTS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, Any]]]] = {
    "mlp": (MODELS["mlp"], lambda: make_inputs("mlp", batch=4)),
    "orth-mlp": (lambda: seeded(OrthMLP), lambda: dict(MLP_X)),
    "orth-conv": (lambda: seeded(OrthConv), lambda: dict(CONV_X)),
    "llama-1": (lambda: T.tiny_llama(layers=1), _llama_ids),
    "llama-1-tied": (lambda: T.tiny_llama(layers=1, tie=True), _llama_ids),
}


@dataclass(frozen=True)
class Row:
    id: str
    model: str  # a key of MODELS_AND_INPUTS
    config: str  # a funcpeft config class
    kwargs: dict[str, Any] = field(default_factory=dict)
    scale: float = 0.2  # the adapters' distance from the init (orthogonal methods stay near it)
    base_rows: bool = False  # per-example: some examples use the base model (index -1)

    def build(self) -> tuple[Any, Any, Any, dict[str, Any]]:
        make_model, make_inputs_ = MODELS_AND_INPUTS[self.model]
        fn, base, fresh = quiet(funcpeft.get_peft_model, make_model(), getattr(funcpeft, self.config)(**self.kwargs))
        return fn, base, fresh, make_inputs_()


MLP_BOTH = ["lin0", "lin1"]
COMPILE_ROWS = [
    Row("lora", "mlp", "LoraConfig", dict(r=2, target_modules=MLP_BOTH)),
    Row("dora", "mlp", "LoraConfig", dict(r=2, target_modules=MLP_BOTH, use_dora=True)),
    Row("ia3", "mlp", "IA3Config", dict(target_modules=MLP_BOTH, feedforward_modules=["lin1"])),
    Row("loha", "mlp", "LoHaConfig", dict(r=2, target_modules=MLP_BOTH)),
    Row("lokr", "mlp", "LoKrConfig", dict(r=2, target_modules=MLP_BOTH)),
    Row("vera", "mlp", "VeraConfig", dict(r=4, target_modules=MLP_BOTH)),
    Row("pvera", "mlp", "PveraConfig", dict(r=4, target_modules=MLP_BOTH)),
    Row("unilora", "mlp", "UniLoraConfig", dict(r=2, theta_d_length=20, target_modules=MLP_BOTH)),
    Row("glora", "mlp", "GloraConfig", dict(r=2, target_modules=MLP_BOTH, init_weights=False)),
    Row("c3a", "mlp", "C3AConfig", dict(block_size=4, target_modules=MLP_BOTH)),
    Row("fourierft", "mlp", "FourierFTConfig", dict(n_frequency=16, target_modules=MLP_BOTH)),
    Row("waveft", "mlp", "WaveFTConfig", dict(n_frequency=16, wavelet_family="db2", target_modules=MLP_BOTH)),
    Row("delora", "mlp", "DeloraConfig", dict(r=2, target_modules=MLP_BOTH, init_weights=False)),
    Row("psoft", "mlp", "PsoftConfig", dict(r=2, psoft_alpha=4, target_modules=MLP_BOTH, init_weights=False)),
    Row(
        "psoft-neumann",
        "mlp",
        "PsoftConfig",
        dict(r=2, target_modules=MLP_BOTH, use_cayley_neumann=True, cayley_neumann_eps=0.5, psoft_dropout=0.1),
    ),
    Row("osf", "mlp", "OSFConfig", dict(target_modules=MLP_BOTH, init_weights=False), scale=0.05),
    Row("randlora", "mlp", "RandLoraConfig", dict(r=4, target_modules=MLP_BOTH)),
    Row("shira", "mlp", "ShiraConfig", dict(r=1, target_modules=MLP_BOTH)),
    Row("miss", "mlp", "MissConfig", dict(r=4, target_modules=MLP_BOTH)),
    Row("miss-mini", "mlp", "MissConfig", dict(r=4, init_weights="mini", mini_r=4, target_modules=MLP_BOTH)),
    Row("miss-bat", "mlp", "MissConfig", dict(r=4, init_weights="bat", target_modules=MLP_BOTH)),
    Row("vblora", "mlp", "VBLoRAConfig", dict(r=2, vector_length=4, num_vectors=6, target_modules=MLP_BOTH)),
    Row("oft-coft", "orth-mlp", "OFTConfig", dict(oft_block_size=4, target_modules=MLP_BOTH, coft=True), scale=0.3),
    Row("boft", "orth-mlp", "BOFTConfig", dict(boft_block_size=4, target_modules=MLP_BOTH), scale=0.3),
    Row("hra-gs", "orth-mlp", "HRAConfig", dict(r=4, apply_GS=True, target_modules=MLP_BOTH)),
    Row("trainable_tokens-tied", "llama-1-tied", "TrainableTokensConfig", dict(token_indices=[3, 43])),
    Row("ln_tuning", "llama-1", "LNTuningConfig"),
    Row("hira", "mlp", "HiraConfig", dict(r=2, target_modules=MLP_BOTH, hira_dropout=0.1)),
    Row("deft", "mlp", "DeftConfig", dict(r=2, target_modules=MLP_BOTH, decomposition_method="qr", deft_dropout=0.1)),
    Row("adamss", "mlp", "AdamssConfig", dict(r=6, num_subspaces=3, subspace_rank=2, target_modules=MLP_BOTH)),
    Row("gralora", "mlp", "GraloraConfig", dict(r=2, hybrid_r=2, target_modules=MLP_BOTH, gralora_dropout=0.1)),
    Row("frod", "mlp", "FrodConfig", dict(target_modules=MLP_BOTH, sparse_rate=0.1, frod_dropout=0.1)),
    Row("lily", "mlp", "LilyConfig", dict(r=2, num_B=3, target_modules=MLP_BOTH)),
    Row("peanut", "mlp", "PeanutConfig", dict(r=2, depth=1, act_fn="gelu", target_modules=MLP_BOTH)),
    Row(
        "tinylora",
        "mlp",
        "TinyLoraConfig",
        dict(u=4, target_modules=MLP_BOTH, weight_tying=0.5, init_weights="uniform"),
    ),
]
# RoAd, BEFT and Super-Tuning (Supra: sparse + LoRA) adapt nn.Linear only: a one-layer Llama
LINEAR_ROWS = [
    Row(
        "road",
        "llama-1",
        "RoadConfig",
        dict(variant="road_4", group_size=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        0.2,
        True,
    ),
    Row("beft", "llama-1", "BeftConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"]), 0.2, True),
    Row(
        "supra",
        "llama-1",
        "SupertuningConfig",
        dict(sparsity=0.75, r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
        0.2,
        True,
    ),
]
COMPILE_ROWS += LINEAR_ROWS
PER_EXAMPLE_ROWS = [
    *(row for row in COMPILE_ROWS if row.id in ("c3a", "fourierft", "randlora", "shira", "miss", "miss-bat")),
    Row("oft-conv", "orth-conv", "OFTConfig", dict(r=2, oft_block_size=0, target_modules=["conv"]), 0.3, True),
    Row("boft-conv", "orth-conv", "BOFTConfig", dict(boft_block_size=3, target_modules=["conv", "lin"]), 0.3),
    Row("hra-conv", "orth-conv", "HRAConfig", dict(r=2, target_modules=["conv"])),
    *(row for row in COMPILE_ROWS if row.id == "waveft"),
    *(row for row in COMPILE_ROWS if row.id == "delora"),
    *(row for row in COMPILE_ROWS if row.id.startswith("psoft") or row.id == "osf"),
    *(row for row in COMPILE_ROWS if row.id == "deft"),
    Row("deft-para", "mlp", "DeftConfig", dict(r=3, target_modules=MLP_BOTH, para=True), 0.2, True),
    Row("adamss-base", "mlp", "AdamssConfig", dict(r=6, num_subspaces=2, target_modules=MLP_BOTH), 0.2, True),
    *(row for row in COMPILE_ROWS if row.id in ("peanut", "frod")),
    *(row for row in COMPILE_ROWS if row.id in ("pvera", "unilora", "glora")),
    *LINEAR_ROWS,
]


@pytest.mark.parametrize("row", COMPILE_ROWS, ids=[r.id for r in COMPILE_ROWS])
def test_compiles_to_one_graph_for_new_adapter_values(row: Row) -> None:
    fn, base, fresh, x = row.build()
    trees = [
        optree.tree_map(lambda t: t.detach().requires_grad_(True), tree)
        for tree in random_trees(fresh, 3, scale=row.scale)
    ]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for tree in trees:
        got = out_tensor(compiled(base, tree, **x))
        with torch.no_grad():
            torch.testing.assert_close(got, out_tensor(fn(base, tree, **x)), atol=1e-5, rtol=1e-5)
        got.float().square().sum().backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in optree.tree_leaves(tree)), row.id
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for {len(trees)} adapter values"


@pytest.mark.parametrize("row", PER_EXAMPLE_ROWS, ids=[r.id for r in PER_EXAMPLE_ROWS])
def test_per_example_adapters_equal_each_alone(row: Row) -> None:
    fn, base, fresh, x = row.build()
    trees = random_trees(fresh, 3, scale=row.scale)
    batch = out_tensor(fn(base, trees[0], **x)).shape[0]
    index = ([2, -1, 0, 1] if row.base_rows else [2, 0, 1, 2])[:batch]
    with torch.no_grad():
        routed = out_tensor(fn(base, funcpeft.per_example(funcpeft.stack_adapters(trees), torch.tensor(index)), **x))
        alone = [out_tensor(fn(base, t, **x)) for t in trees]
        plain = out_tensor(fn(base, None, **x))
        assert not torch.allclose(alone[0], alone[1]), "different adapters should give different outputs"
        for i, k in enumerate(index):
            torch.testing.assert_close(routed[i], (alone[k] if k >= 0 else plain)[i], atol=1e-5, rtol=1e-5)
