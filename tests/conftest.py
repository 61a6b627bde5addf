"""Shared test helpers (imported with `from conftest import ...`): tiny models and their inputs, a funcpeft-vs-PEFT pair builder, model snapshots.

Tests are differential: everything PEFT 0.21.2 has is computed both ways and compared.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from torch import nn

import funcpeft
from funcpeft import testing as T

# Two xdist workers on 2 cores: one torch thread each, or they oversubscribe the CPU 3-4x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Hypothesis profiles (README "Tests"): CI must not depend on a random draw, local runs should explore.
#   ci       derandomized (the same examples on every run), no example database; chosen when CI=true
#   dev      random draws, the tests' own example counts (the default locally)
#   explore  random draws, 10x the examples (HYPOTHESIS_PROFILE=explore)
# Tests size their runs with helpers.examples(n), which scales n for the explore profile.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("dev", **_COMMON)
settings.register_profile("explore", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

# The fast tier (`make test-fast`, -m "not slow") leaves out, besides tests marked slow where they are defined,
# what costs seconds per test by nature: torch.compile (tests named *compile*), thread stress tests (*thread*),
# and whole files of drawn or tabulated PEFT comparisons. `make test` (CI) runs everything.
SLOW_FILES = frozenset({"test_peft_matrix_data.py", "test_strategies.py"})
SLOW_NAME_PARTS = ("compile", "thread")


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        name = item.name.lower()
        if item.path.name in SLOW_FILES or any(part in name for part in SLOW_NAME_PARTS):
            item.add_marker("slow")


# -- small custom models (PEFT supports custom nn.Modules too) -------------------------------------------------
class ConvNet(nn.Module):
    """x (B, 3, 6, 6) -> (B, 5): Conv2d (3x3, stride 2, padding 1) -> Conv1d (k=3, padding 1) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x))  # (B, 4, 3, 3)
        h = torch.relu(self.conv1d(h.flatten(2)))  # (B, 6, 9)
        return self.fc(h.flatten(1))


class MLP(nn.Module):
    """x (B, 8) -> (B, 4); no dropout of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


class WeightSum(nn.Module):
    """A layer that reads its weight with an op other than F.linear (funcpeft cannot add the LoRA term)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lin.weight
        if self.op == "sum":
            return x.sum(-1, keepdim=True) * w.sum()
        return x @ w.T  # "T"


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": T.tiny_llama,
    "llama3": lambda: T.tiny_llama(layers=3),  # 21 linear layers: all-linear gets compressed to suffixes
    "mistral": T.tiny_mistral,
    "qwen2": T.tiny_qwen2,
    "gpt2": T.tiny_gpt2,
    "bert": T.tiny_bert_seq_cls,
    "t5": T.tiny_t5,
    "conv": lambda: _seeded(ConvNet),
    "mlp": lambda: _seeded(MLP),
}


def make_inputs(kind: str, batch: int = 2, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model kwargs for a model of MODELS."""
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        return {"x": torch.randn(batch, 3, 6, 6, generator=g)}
    if kind == "mlp":
        return {"x": torch.randn(batch, 8, generator=g)}
    ids = torch.randint(1, T.VOCAB, (batch, seq), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, T.VOCAB, (batch, 4), generator=g)}
    return {"input_ids": ids}


def out_tensor(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def capture_stdout(fn: Callable[[], Any]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def peft_lora_modules(peft_model: nn.Module) -> set[str]:
    """Names (in the base model's namespace) of the modules PEFT wrapped as LoRA layers."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def funcpeft_lora_modules(fpm: funcpeft.FunctionalPeftModel, adapter_name: str = "default") -> set[str]:
    return {path for path, entry in fpm.plans[adapter_name].items() if entry.spec is not None}


class Pair:
    """funcpeft and PEFT on copies of one model with the same config, and the same random non-zero adapter."""

    def __init__(self, kind: str, config: dict[str, Any], seed: int = 1) -> None:
        import peft

        self.kind, self.config = kind, config
        torch.manual_seed(seed)  # both libraries draw their fresh init from the global RNG
        self.model = MODELS[kind]()
        with warnings.catch_warnings(record=True) as self.f_warnings:
            warnings.simplefilter("always")
            self.fpm = funcpeft.get_peft_model(self.model, funcpeft.LoraConfig(**config))
        self.fn, self.base, fresh = self.fpm
        self.fresh = fresh
        self.adapter = T.random_like(fresh, torch.Generator().manual_seed(seed))
        with warnings.catch_warnings(record=True) as self.p_warnings:
            warnings.simplefilter("always")
            self.peft_model = peft.get_peft_model(copy.deepcopy(self.model), peft.LoraConfig(**config))
        self.peft_fresh = {n: p.detach().clone() for n, p in self.peft_model.named_parameters()}  # PEFT's own init
        T.copy_into_peft(self.peft_model, self.adapter, self.plan)
        self.peft_model.eval()
        self.inputs = make_inputs(kind)

    @property
    def plan(self) -> dict[str, Any]:
        return self.fpm.plans["default"]

    def loss_weights(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=torch.Generator().manual_seed(7))

    def funcpeft_loss(self, adapter: Any) -> torch.Tensor:
        out = out_tensor(self.fn(self.base, adapter, **self.inputs))
        return (out * self.loss_weights(out)).mean()

    def peft_out_and_grads(self) -> tuple[torch.Tensor, Any]:
        self.peft_model.zero_grad(set_to_none=True)
        out = out_tensor(self.peft_model(**self.inputs))
        (out * self.loss_weights(out)).mean().backward()
        return out.detach(), T.peft_grads(self.peft_model, self.adapter, self.plan)


# -- model snapshots: "the model is untouched" ----------------------------------------------------------------
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "hooks": [(n, h, len(getattr(m, h))) for n, m in model.named_modules() for h in _HOOK_DICTS],
        "training": [(n, m.training) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    now = snapshot(model)
    for key in ("types", "ptrs", "requires_grad", "hooks", "training"):
        assert now[key] == snap[key], f"model {key} changed"
    assert all(g is None for g in now["grads"].values()), "a model parameter received a .grad"
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"state_dict[{k!r}] changed"
