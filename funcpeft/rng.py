"""Randomness of one `fn` call: private generators, never the process-global RNG.

`fn(..., dropout_rng=seed_or_generator)` runs the model in training mode. Every random draw of that call
— the adapters' dropout and the model's own (`nn.Dropout`, `F.dropout*`, attention dropout inside
`F.scaled_dot_product_attention`, `torch.rand*`, `Tensor.bernoulli_`, ...) — comes from a `CallRandomness`:
an int seed becomes a fresh `torch.Generator` per device (seeded with it) that only this call sees, so
seeded calls are reproducible from any thread and leave the global RNG alone; a `torch.Generator` is used
as given. While the call runs, a thread-local `TorchFunctionMode` redirects the model's random ops to
that generator (kernels as torch's own, so masks equal PEFT's under `torch.manual_seed(seed)` on CPU when
draws happen in the same order) and raises `GlobalRNGError` for random ops it cannot redirect.

Redirected: F.dropout / dropout1d/2d/3d / alpha_dropout / feature_alpha_dropout, torch.dropout and its
feature/alpha/in-place/native variants, F.rrelu, F.scaled_dot_product_attention with dropout_p > 0 (torch's
math path with the mask drawn here), and every op taking `generator=` (torch.rand*, randn*, randint*,
randperm, bernoulli, multinomial, normal, poisson, binomial, the distributions' gamma/dirichlet samplers,
Tensor.bernoulli_/uniform_/normal_/random_/exponential_/..., nn.init.*). Refused: F.gumbel_softmax,
F.fractional_max_pool* without _random_samples, F.multi_head_attention_forward with dropout in training.
The mode sees top-level torch calls only: a torch function not listed here that draws random numbers
*inside* itself would still use the global RNG. On CUDA the masks are torch's bernoulli draws from the
call's generator, not the fused dropout kernel's (which takes no generator): reproducible, but not equal
to PEFT's under `torch.manual_seed`. While a seeded call runs, every torch op in it passes through the mode
(a few microseconds each).

`snapshot()` / `replay(state)` let gradient checkpointing re-run a layer in backward with the same masks
(see `funcpeft._functional`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SELU_ALPHA = 1.7580993408473766  # torch's alpha_dropout constant (aten Dropout.cpp)


class GlobalRNGError(RuntimeError):
    """A random op inside a `dropout_rng` call would use the process-global RNG."""


class CallRandomness:
    """All random draws of one call: `generator(device)` is this call's generator for `device`.

    seed: an int (a fresh generator per device, seeded with it) or None with `user_generator` given
    (used as is, on its own device only).
    """

    def __init__(self, seed: int | None = None, user_generator: torch.Generator | None = None):
        self.seed = seed
        self.gens: dict[torch.device, torch.Generator] = {}
        if user_generator is not None:
            self.gens[torch.device(user_generator.device)] = user_generator

    def generator(self, device: Any) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self.gens.get(device)
        if gen is None:
            if self.seed is None:
                have = ", ".join(str(d) for d in self.gens)
                raise GlobalRNGError(
                    f"funcpeft: dropout_rng is a torch.Generator on {have}, but the call draws random numbers for a "
                    f"tensor on {device}; pass a generator on {device} or an int seed"
                )
            gen = self.gens[device] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Training-mode dropout of the adapter input (the `Dropout` that adapters call)."""
        return _dropout(self, x, p, True)

    # -- checkpointing: re-draw the same numbers in a recompute ------------------------------------------------
    def snapshot(self) -> dict[torch.device, torch.Tensor]:
        """The state of every generator used so far (devices first used later restart from the seed)."""
        return {device: gen.get_state() for device, gen in self.gens.items()}

    @contextlib.contextmanager
    def replay(self, state: dict[torch.device, torch.Tensor]) -> Iterator[None]:
        """Draw from copies of the generators as they were at `snapshot()`; the live ones are left as they are."""
        live = self.gens
        copies = {}
        for device, st in state.items():
            copies[device] = torch.Generator(device=device)
            copies[device].set_state(st)
        self.gens = copies
        try:
            with redirect(self):
                yield
        finally:
            self.gens = live


def redirect(rng: CallRandomness) -> TorchFunctionMode:
    """The mode that sends the model's random ops in this thread to `rng` (use as a context manager)."""
    return _Redirect(rng)


class _Redirect(TorchFunctionMode):
    def __init__(self, rng: CallRandomness):
        super().__init__()
        self.rng = rng

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self.rng, func, args, kwargs or {})


# -- dropout: torch's kernels (aten/src/ATen/native/Dropout.cpp), drawing from the call's generator --------------
def _dropout(
    rng: CallRandomness,
    x: torch.Tensor,
    p: float,
    train: bool,
    feature: bool = False,
    alpha: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0.0 or not train or x.numel() == 0:
        return x
    if p == 1.0:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return x.mul_(zero) if inplace else x * zero
    # The mask is drawn out of place (`bernoulli.p` = empty + bernoulli_, torch's draws) from an unbatched
    # template: under vmap, randomness="different" then gives each vmapped element its own mask, "same" one mask.
    gen = rng.generator(x.device)
    if feature:
        if x.dim() < 2:
            raise RuntimeError(f"Feature dropout requires at least 2 dimensions in the input, got {x.dim()}")
        template = torch.empty((x.shape[0], x.shape[1], *[1] * (x.dim() - 2)), dtype=x.dtype, device=x.device)
    else:
        template = _template(x)
    noise = torch.bernoulli(template, 1.0 - p, generator=gen)
    if alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
        b = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
        noise.mul_(a)
        return (x.mul_(noise) if inplace else x * noise).add_(b)
    noise.div_(1.0 - p)
    return x.mul_(noise) if inplace else x * noise


def _template(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out like `x` (torch's kernels use empty_like), unbatched under torch.func transforms."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _functional(
    feature: bool, alpha: bool, train_default: bool, unbatched_dim: int | None = None
) -> Callable[..., Any]:
    """F.dropout / alpha_dropout / feature_alpha_dropout / dropout1d/2d/3d: (input, p, training, inplace)."""

    def handler(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
        x = _arg(args, kwargs, 0, "input", None)
        p = _arg(args, kwargs, 1, "p", 0.5)
        train = _arg(args, kwargs, 2, "training", train_default)
        inplace = _arg(args, kwargs, 3, "inplace", False)
        if p < 0.0 or p > 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if unbatched_dim is not None and x.dim() == unbatched_dim:  # dropout1d/3d on an unbatched input
            x = x.unsqueeze_(0) if inplace else x.unsqueeze(0)
            out = _dropout(rng, x, p, train, feature, alpha, inplace)
            return out.squeeze_(0) if inplace else out.squeeze(0)
        return _dropout(rng, x, p, train, feature, alpha, inplace)

    return handler


def _aten_dropout(feature: bool, alpha: bool, inplace: bool) -> Callable[..., Any]:
    """torch.dropout(input, p, train) and its feature/alpha/in-place variants."""

    def handler(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
        x, p, train = (_arg(args, kwargs, i, n, None) for i, n in enumerate(("input", "p", "train")))
        return _dropout(rng, x, p, train, feature, alpha, inplace)

    return handler


def _native_dropout(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
    x, p, train = (_arg(args, kwargs, i, n, None) for i, n in enumerate(("input", "p", "train")))
    if train is False or p == 0.0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    keep = torch.bernoulli(_template(x), 1.0 - p, generator=rng.generator(x.device)).bool()
    return x * keep * (1.0 / (1.0 - p)), keep


def _sdpa(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
    """F.scaled_dot_product_attention with dropout: torch's math path, the mask drawn from the call's generator."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    q, k, v, attn_mask, dropout_p, is_causal = (
        _arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, (None, None, None, None, 0.0, False)))
    )
    if not dropout_p:
        return func(*args, **kwargs)
    scale, gqa = kwargs.get("scale"), kwargs.get("enable_gqa", False)
    if gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    root = math.sqrt(scale)  # as torch's math kernel: scale q and k by sqrt(scale) each
    attn = (q * root) @ (k * root).transpose(-2, -1)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        attn = attn.masked_fill(causal.logical_not(), float("-inf"))
    if attn_mask is not None:
        attn = (
            attn.masked_fill(attn_mask.logical_not(), float("-inf"))
            if attn_mask.dtype == torch.bool
            else attn + attn_mask
        )
    softmax = getattr(torch, "_safe_softmax", None)  # fully masked rows give 0, like the kernel
    attn = softmax(attn, -1) if softmax is not None else attn.softmax(-1)
    return _dropout(rng, attn, dropout_p, True) @ v


def _with_generator(device_of: Callable[[tuple, dict], Any]) -> Callable[..., Any]:
    """A random op that takes `generator=`: give it the call's generator for its device unless one was passed."""

    def handler(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs.get("generator") is None:
            kwargs = {**kwargs, "generator": rng.generator(device_of(args, kwargs))}
        return func(*args, **kwargs)

    return handler


def _first_tensor_device(args: tuple, kwargs: dict) -> Any:
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.get_default_device()


def _factory_device(args: tuple, kwargs: dict) -> Any:
    device = kwargs.get("device")
    return torch.get_default_device() if device is None else device


def _rrelu(inplace: bool) -> Callable[..., Any]:
    """F.rrelu(input, lower, upper, training, inplace): torch.rrelu with the call's generator."""

    def handler(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
        x = _arg(args, kwargs, 0, "input", None)
        lower, upper = _arg(args, kwargs, 1, "lower", 1.0 / 8), _arg(args, kwargs, 2, "upper", 1.0 / 3)
        train = _arg(args, kwargs, 3, "training", False)
        op = torch.rrelu_ if inplace or _arg(args, kwargs, 4, "inplace", False) else torch.rrelu
        return op(x, lower, upper, train, generator=rng.generator(x.device))

    return handler


def _refuse(reason: str) -> Callable[..., Any]:
    def handler(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
        name = f"{getattr(func, '__module__', '') or ''}.{getattr(func, '__qualname__', func)}".lstrip(".")
        raise GlobalRNGError(
            f"funcpeft: `{name}` draws from the process-global RNG inside a call with dropout_rng ({reason}); funcpeft "
            "cannot give it the call's private generator, and using the global RNG would make the call irreproducible "
            "across threads. Run it outside fn, or call fn without dropout_rng (eval mode)."
        )

    return handler


def _refuse_when(active: Callable[[tuple, dict], bool], reason: str) -> Callable[..., Any]:
    refuse = _refuse(reason)

    def handler(rng: CallRandomness, func: Any, args: tuple, kwargs: dict) -> Any:
        return refuse(rng, func, args, kwargs) if active(args, kwargs) else func(*args, **kwargs)

    return handler


_HANDLERS: dict[Any, Callable[..., Any]] = {
    F.dropout: _functional(False, False, True),
    F.alpha_dropout: _functional(False, True, False),
    F.feature_alpha_dropout: _functional(True, True, False),
    F.dropout1d: _functional(True, False, True, unbatched_dim=2),
    F.dropout2d: _functional(True, False, True),
    F.dropout3d: _functional(True, False, True, unbatched_dim=4),
    torch.dropout: _aten_dropout(False, False, False),
    torch.dropout_: _aten_dropout(False, False, True),
    torch.feature_dropout: _aten_dropout(True, False, False),
    torch.feature_dropout_: _aten_dropout(True, False, True),
    torch.alpha_dropout: _aten_dropout(False, True, False),
    torch.alpha_dropout_: _aten_dropout(False, True, True),
    torch.feature_alpha_dropout: _aten_dropout(True, True, False),
    torch.feature_alpha_dropout_: _aten_dropout(True, True, True),
    torch.native_dropout: _native_dropout,
    F.scaled_dot_product_attention: _sdpa,
    F.rrelu: _rrelu(False),
    F.rrelu_: _rrelu(True),
    torch.rrelu: _with_generator(_first_tensor_device),
    torch.rrelu_: _with_generator(_first_tensor_device),
    F.gumbel_softmax: _refuse("it samples Gumbel noise internally"),
    F.multi_head_attention_forward: _refuse_when(
        lambda a, k: bool(_arg(a, k, 13, "training", True)) and bool(_arg(a, k, 10, "dropout_p", 0.0)),
        "nn.MultiheadAttention's attention dropout, drawn inside F.multi_head_attention_forward",
    ),
}
for _name in (
    "fractional_max_pool2d",
    "fractional_max_pool3d",
    "fractional_max_pool2d_with_indices",
    "fractional_max_pool3d_with_indices",
):
    _HANDLERS[getattr(F, _name)] = _refuse_when(
        lambda a, k: k.get("_random_samples") is None, f"F.{_name} without _random_samples"
    )
for _method in (
    "bernoulli",
    "bernoulli_",
    "uniform_",
    "normal_",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "multinomial",
):
    _HANDLERS[getattr(torch.Tensor, _method)] = _with_generator(lambda a, k: a[0].device)
_TAKES_INPUT: tuple[Any, ...] = (
    torch.bernoulli,
    torch.multinomial,
    torch.normal,
    torch.poisson,
    torch.binomial,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch._standard_gamma,
    torch._sample_dirichlet,
)  # torch.distributions' samplers
for _fn in _TAKES_INPUT:
    _HANDLERS[_fn] = _with_generator(_first_tensor_device)
_FACTORIES: tuple[Any, ...] = (torch.rand, torch.randn, torch.randint, torch.randperm)
for _fn in _FACTORIES:
    _HANDLERS[_fn] = _with_generator(_factory_device)
for _name in (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
):
    _HANDLERS[getattr(torch.nn.init, _name)] = _with_generator(lambda a, k: a[0].device if a else k["tensor"].device)
