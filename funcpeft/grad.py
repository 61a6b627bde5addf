"""`value_and_grad`: gradients of a loss with respect to an adapter tree, lean on memory at top level.

`torch.func.grad` wraps every tensor in the forward for its transform level, which measured 2.3x PEFT's
peak training memory on the benchmark Llama. At top level (no torch.func transform active, not being
compiled) this helper instead detaches the adapter leaves, marks them `requires_grad` and calls
`torch.autograd.grad`: the same numbers at PEFT's memory. Inside `vmap`/`grad`/`jvp` or code traced by
`torch.compile` it is `torch.func.grad_and_value`, so it still composes (e.g. `vmap(value_and_grad(loss))`
trains an ensemble, or gives per-sample gradients). "Traced" is `torch.compiler.is_dynamo_compiling()`:
`is_compiling()` is also True in other threads' eager code while any thread compiles.

Gradient checkpointing enabled on the model (funcpeft._functional) works at top level, where this uses
`torch.autograd.grad` (checkpointing is always run non-reentrant, which autograd.grad needs); inside
torch.func transforms it raises a clear error (torch cannot checkpoint there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch


def _inside_functorch() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def value_and_grad(fn: Callable[..., Any], argnums: int = 0, has_aux: bool = False) -> Callable[..., Any]:
    """`value_and_grad(loss_fn)(*args) -> (loss, grads)` (or `((loss, aux), grads)` with has_aux).

    Leaves the loss does not depend on get zeros (like torch.func.grad). At top level it uses
    `torch.autograd.grad` (PEFT's memory); inside torch.func transforms and torch.compile, `torch.func`.

    Args:
        fn: `loss_fn(*args, **kwargs)` returning a scalar tensor (or `(scalar, aux)` with has_aux).
        argnums: which positional argument to differentiate (a tree of tensors, e.g. the adapter).
        has_aux: loss_fn returns `(loss, aux)`; aux is returned untouched.

    Returns:
        A function of loss_fn's arguments returning `(loss, grads)` (or `((loss, aux), grads)`); grads has the
        structure of `args[argnums]`, each leaf shaped like its parameter.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling() or _inside_functorch() or not torch.is_grad_enabled():
            grads, value = torch.func.grad_and_value(fn, argnums=argnums, has_aux=has_aux)(*args, **kwargs)
            return value, grads
        leaves, spec = optree.tree_flatten(args[argnums])
        fresh = [leaf.detach().requires_grad_(True) for leaf in leaves]
        call_args = list(args)
        call_args[argnums] = optree.tree_unflatten(spec, fresh)
        out = fn(*call_args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"value_and_grad: the function must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        raw = torch.autograd.grad(loss, fresh, allow_unused=True)
        grads = [torch.zeros_like(f) if g is None else g for f, g in zip(fresh, raw)]
        result: Any = loss.detach()
        if has_aux:
            result = (result, optree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux))  # type: ignore[arg-type]
        return result, optree.tree_unflatten(spec, grads)

    return wrapped
