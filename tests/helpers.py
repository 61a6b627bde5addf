"""Helpers shared by the tests (conftest.py holds only fixtures and session setup)."""

from __future__ import annotations

import os
from typing import Any

_SCALE = {"explore": 10}


def examples(n: int) -> int:
    """A test's hypothesis example count under the active profile (10x with HYPOTHESIS_PROFILE=explore)."""
    return n * _SCALE.get(os.environ.get("HYPOTHESIS_PROFILE", ""), 1)


def method_pair(model: Any, config_cls: str, kwargs: dict[str, Any], seed: int = 1, scale: float = 0.3) -> tuple[Any, Any, Any]:
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


def assert_forward_and_grads_equal_peft(fpm: Any, peft_model: Any, adapter: Any, inputs: dict[str, Any], atol: float = 1e-5) -> None:
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
