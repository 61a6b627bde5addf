"""Helpers shared by the tests (conftest.py holds only fixtures and session setup)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, Literal, TypedDict, TypeVar

import optree
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import funcpeft
from funcpeft import testing as T

_SCALE = {"explore": 10}


def examples(n: int) -> int:
    """A test's hypothesis example count under the active profile (10x with HYPOTHESIS_PROFILE=explore)."""
    return n * _SCALE.get(os.environ.get("HYPOTHESIS_PROFILE", ""), 1)


def tree_leaves(tree: Any) -> list[torch.Tensor]:
    """optree.tree_leaves of a tensor tree; typed here because mypy cannot match optree's recursive `PyTree[T]`
    alias against concrete dicts and tuples."""
    return optree.tree_leaves(tree)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """optree.tree_map over tensor trees (typed as `tree_leaves` is)."""
    return optree.tree_map(fn, tree, *rest)


_T = TypeVar("_T")


def msg_prefixed(prefix: str) -> Callable[[str], str]:
    """A `torch.testing.assert_close(msg=...)` that puts `prefix` (e.g. the checked key) before torch's message."""
    return lambda message: f"{prefix}: {message}"


def as_type(value: object, cls: type[_T]) -> _T:
    """`value`, checked to be a `cls`: narrows a base-typed value (e.g. `fpm.peft_config[name]`) for mypy."""
    assert isinstance(value, cls), f"expected a {cls.__name__}, got {type(value).__name__}"
    return value


_M = TypeVar("_M", bound=nn.Module)


def cast_model(model: _M, dtype: torch.dtype) -> _M:
    """`model.to(dtype)`: cast in place and returned, as `to` does. Typed here because transformers'
    `PreTrainedModel.to` is a `functools.wraps` of nn.Module.to and typeshed's `_Wrapped` does not bind `self`,
    so mypy rejects `hf_model.to(dtype)`; the call still dispatches to the model's own `to`."""
    module: nn.Module = model
    cast = module.to(dtype)
    assert cast is model, f"{type(model).__name__}.to returned another object"
    return model


# PEFT's `init_lora_weights` values that both libraries type (PEFT's Literal also spells "pissa_niter_[number of
# iters]" literally, which no real value matches)
InitLoraWeights = bool | Literal["gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica"]


class LoraKwargs(TypedDict, total=False):
    """Keyword arguments for `funcpeft.LoraConfig(**kw)` and `peft.LoraConfig(**kw)` alike: the fields the tests
    pass, each with a type both libraries accept (a plain dict literal would be inferred as `dict[str, object]`)."""

    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str] | str
    init_lora_weights: InitLoraWeights
    task_type: str
    alora_invocation_tokens: list[int]
    trainable_token_indices: list[int] | dict[str, list[int]]
    ensure_weight_tying: bool
    megatron_config: dict[str, Any]
    use_dora: bool
    lora_bias: bool
    modules_to_save: list[str]


def hf(model: nn.Module) -> PreTrainedModel:
    """`model`, checked to be a transformers model (MODELS also holds plain nn.Modules)."""
    assert isinstance(model, PreTrainedModel), f"{type(model).__name__} is not a transformers model"
    return model


def hf_config(model: nn.Module) -> PretrainedConfig:
    """A transformers model's config (nn.Module's `__getattr__` types `model.config` as `Tensor | Module`)."""
    config = model.config
    assert isinstance(config, PretrainedConfig), f"{type(model).__name__} has no transformers config"
    return config


def method_pair(
    model: Any, config_cls: str, kwargs: dict[str, Any], seed: int = 1, scale: float = 0.3
) -> tuple[Any, Any, Any]:
    """(funcpeft model, PEFT model, adapter): one config on copies of `model`, both sharing a random adapter.

    The adapter is the fresh funcpeft tree plus N(0, scale) noise (multiplicative methods stay near their
    init); it is copied into the PEFT model, which is put in eval mode. Warnings of both libraries are muted.
    """
    import copy
    import warnings

    import optree
    import peft
    import torch

    import funcpeft
    from funcpeft import testing as T

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpm = funcpeft.get_peft_model(model, getattr(funcpeft, config_cls)(**kwargs))
        peft_model = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_cls)(**kwargs))
    noise = T.random_like(fpm.adapter, torch.Generator().manual_seed(seed), scale=scale)
    fresh: Any = fpm.adapter
    adapter = optree.tree_map(lambda f, n: (f.detach() + n.detach()).requires_grad_(True), fresh, noise)
    T.copy_into_peft(peft_model, adapter, fpm.plans["default"])
    return fpm, peft_model.eval(), adapter


def assert_forward_and_grads_equal_peft(
    fpm: Any, peft_model: Any, adapter: Any, inputs: dict[str, Any], atol: float = 1e-5
) -> None:
    """Same output and the same gradient of a fixed random-weighted loss for every adapter leaf."""
    import torch

    import funcpeft
    from funcpeft import testing as T

    def out(o: Any) -> Any:
        return o.logits if hasattr(o, "logits") else o

    peft_model.zero_grad(set_to_none=True)
    want = out(peft_model(**inputs))
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(7)).to(want.dtype)
    (want * weights).sum().backward()
    got = out(fpm.fn(fpm.base, adapter, **inputs))
    torch.testing.assert_close(got, want.detach(), atol=atol, rtol=0)
    _, grads = funcpeft.value_and_grad(lambda a: (out(fpm.fn(fpm.base, a, **inputs)) * weights).sum())(adapter)
    T.assert_trees_close(grads, T.peft_grads(peft_model, adapter, fpm.plans["default"]), atol=atol)


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
    return {n[len(prefix) :] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


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
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
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


def in_threads(n: int, work: Callable[[int], None]) -> None:
    """Run `work(0..n-1)` in n threads released together (a barrier), join them, and fail with every exception a
    thread raised (an exception in a plain Thread is only printed: the test would pass without it)."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as e:  # noqa: B036 - re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
