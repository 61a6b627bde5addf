"""Helpers for the per-method test files (test_method_*.py): fresh adapters against PEFT's, and their small models."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import peft
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import funcpeft
import funcpeft.io


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def fresh_states(
    model: nn.Module,
    config_cls: str,
    kwargs: dict[str, Any],
    seed: int = 0,
    prepare: Callable[[Any], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(funcpeft's, PEFT's) freshly initialised adapter keyed like PEFT's checkpoint, each drawn after
    `torch.manual_seed(seed)` from the global RNG; `prepare(config)` runs on both configs (e.g. sets mask_fn)."""
    configs = [getattr(lib, config_cls)(**kwargs) for lib in (funcpeft, peft)]
    if prepare is not None:
        for c in configs:
            prepare(c)
    torch.manual_seed(seed)
    fpm = quiet(funcpeft.get_peft_model, copy.deepcopy(model), configs[0])
    ours = funcpeft.io.checkpoint_state(fpm.adapter, fpm.peft_config["default"], fpm.model, base_params=fpm.base)
    torch.manual_seed(seed)
    pm = quiet(peft.get_peft_model, copy.deepcopy(model), configs[1])
    theirs = quiet(get_peft_model_state_dict, pm)
    return dict(ours), {k: v.detach() for k, v in theirs.items()}


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and values (bitwise)."""
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (k, got[k].dtype, want[k].dtype)
        assert torch.equal(got[k], want[k]), k


def compiles_once(fn: Callable[[Any], torch.Tensor], trees: list[Any]) -> None:
    """torch.compile(fullgraph=True, aot_eager) of `fn(tree)` equals eager for each tree, in one frame."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        for tree in trees:
            torch.testing.assert_close(compiled(tree), fn(tree), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for {len(trees)} adapter values"


# -- the small models of the orthogonal methods' tests (OFT, BOFT, HRA) ------------------------------------------
class OrthMLP(nn.Module):
    """x (B, 8) -> (B, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


class OrthConv(nn.Module):
    """x (B, 2, 5, 5) -> (B, 4): a 3x3 conv (in_channels * 9 = 18 rotated features; `out_channels` x 25 positions,
    so PEFT's patch overlap matters), then a linear layer on the first 12 features."""

    def __init__(self, out_channels: int = 4, **conv: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, out_channels, 3, **{"padding": 1, **conv})
        self.lin = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.conv(x)).flatten(1)[:, :12])


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """`build()` in eval mode, its init drawn after `manual_seed(seed)` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


MLP_X = {"x": torch.randn(3, 8, generator=torch.Generator().manual_seed(0))}
CONV_X = {"x": torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))}
