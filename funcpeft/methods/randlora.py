"""RandLoRA (`RandLoraConfig`): a full-rank update from frozen random bases scaled by trained vectors.

Per layer (k = min(in, out), K = max(in, out), n = ceil(k / r) bases):
    A_s = lambda[:, :, None] * A[:, :n, :k] * gamma[None]      (r, n, k) -> (r * n, k)
    B_s = B[:K, :n, :]                                         (K, n, r) -> (K, n * r)
    y = base(x) + s * x @ A_s^T @ B_s^T   if k == in, else   s * x @ B_s @ A_s     (s = randlora_alpha / r)
(B_s's columns are flattened (n, r) but A_s's rows (r, n): PEFT pairs them that way, and so does funcpeft.)
Like PEFT, every call builds A_s and B_s (together about as large as the weight); dW itself is not built.
Trainable: randlora_lambda (r, n), init zeros (init_weights=True) or randn; randlora_gamma (n, k), init
1 / max(n, k) (True) or 1 / K.

A (r, 1, k_max) and B (K_max, n_max, r) are drawn once per adapter from `projection_prng_key` at the largest
target dims (PEFT's `_find_dim`): kaiming-uniform in bfloat16 (PEFT's dtype where bf16 is available: CPU and
bf16-capable GPUs; float16 on older GPUs), divided by their std; or ternary {-1, 0, 1} / std (`sparse`:
P(+-1) = 1/6; `very_sparse`: 1 / (2 sqrt(k_max))). They are *frozen*: kept in `base` under reserved keys (not
counted, like PEFT's buffers), as float32 (PEFT casts them to the layer's dtype; for fp16/bf16 models its
files hold them in that dtype). With save_projection PEFT saves them as `base_model.randlora_A/B` and once
more under every adapted layer; so does funcpeft.

bitsandbytes 4-bit / 8-bit layers (LayerKind.QUANT_LINEAR, PEFT's randlora.bnb): the layer's own kernel gives
`result`, the term is cast to its dtype before the scaling and the sum to the adapter's dtype, as there. Merging
dequantises, adds dW (the plain layer's delta) and quantises again. PEFT 0.21.2's bnb merge computes its delta as
`first @ second` (the plain layer's is `(first^T @ second^T)^T`): a shape error for a non-square layer and a wrong
delta for a square one (tests/test_quant_methods.py shows both); funcpeft merges the delta its forward computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._trees import shared_key
from ..configs.randlora import RandLoraConfig
from ._layers import UPCAST_DTYPES, SavesInputs
from ._registry import register
from .base import (
    WEIGHT_OP_KINDS,
    KeyRules,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    SharedTensors,
    Target,
    UnsupportedLayerError,
)

LAMBDA, GAMMA = "randlora_lambda", "randlora_gamma"


@dataclass(frozen=True)
class RandLoraBases:
    """The shared bases' seed, kind and sizes, common to all layers (PEFT's `_find_dim` at the largest targets)."""

    prng_key: int
    kind: str  # "dense", "sparse" or "very_sparse"
    r: int
    max_dim: int
    min_dim: int
    num_bases: int

    @property
    def shape_A(self) -> tuple[int, int, int]:
        return (self.r, 1, self.min_dim)

    @property
    def shape_B(self) -> tuple[int, int, int]:
        return (self.max_dim, self.num_bases, self.r)


@dataclass(frozen=True)
class RandLoraHyper:
    r: int
    scaling: float  # randlora_alpha / r
    dropout: float  # randlora_dropout
    init: bool  # init_weights
    num_bases: int  # ceil(min(in, out) / r)
    bases: RandLoraBases


Spec = LayerSpec[RandLoraHyper]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _kind(config: Any) -> str:
    return "very_sparse" if config.very_sparse else "sparse" if config.sparse else "dense"


def common_hyper(config: Any, targets: Mapping[str, nn.Module]) -> RandLoraBases:
    """PEFT's `_find_dim`: the element-wise largest (out, in) over the Linear / Conv1D targets."""
    shapes: list[tuple[int, int]] = []  # (out, in)
    for m in targets.values():
        shape: Any = m.weight.shape
        if isinstance(m, nn.Linear):  # its own dims: a quantised subclass's weight is packed data
            shapes.append((m.out_features, m.in_features))
        elif type(m).__name__ == "Conv1D":
            shapes.append((int(shape[1]), int(shape[0])))
    if not shapes:
        raise ValueError(
            "No layers types compatible with RandLora were found. Please check `peft_config.target_modules`."
        )
    out_dim, in_dim = max(s[0] for s in shapes), max(s[1] for s in shapes)
    min_dim = min(out_dim, in_dim)
    return RandLoraBases(
        config.projection_prng_key, _kind(config), config.r, max(out_dim, in_dim), min_dim, _ceil_div(min_dim, config.r)
    )


def hyper(config: Any, target: Target) -> RandLoraHyper:
    if target.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.QUANT_LINEAR):
        raise UnsupportedLayerError(
            f"Target module {target.name!r} ({type(target.module).__name__}) is not supported. Currently, only the "
            "following modules are supported: `torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`."
        )
    m = target.module
    shape = (m.out_features, m.in_features) if isinstance(m, nn.Linear) else m.weight.shape  # packed when quantised
    return RandLoraHyper(
        r=config.r,
        scaling=config.randlora_alpha / config.r,
        dropout=float(config.randlora_dropout),
        init=bool(config.init_weights),
        num_bases=_ceil_div(min(shape), config.r),
        bases=target.common,
    )


def _keys(bases: RandLoraBases) -> tuple[str, str]:
    a = shared_key("randlora_A", f"prng{bases.prng_key}", bases.kind, "x".join(map(str, bases.shape_A)))
    b = shared_key("randlora_B", f"prng{bases.prng_key}", bases.kind, "x".join(map(str, bases.shape_B)))
    return a, b


def frozen_params(spec: Spec) -> tuple[tuple[str, str], ...]:
    """(param name, base key) of the shared bases, e.g. ('randlora_A', '<shared>.randlora_A.prng0.dense.32x1x20')."""
    a, b = _keys(spec.hyper.bases)
    return (("randlora_A", a), ("randlora_B", b))


def basis_dtype() -> torch.dtype:
    """PEFT's draw dtype: bfloat16 where accelerate's `is_bf16_available()` (CPU, bf16-capable CUDA), else float16."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init` (randlora/model.py): kaiming_uniform_(a=sqrt(5)) on a new bf16 tensor."""
    return torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=basis_dtype()), a=math.sqrt(5), generator=generator)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def make_bases(spec: Spec) -> Params:
    """{base key: tensor} for randlora_A then randlora_B, drawn like PEFT from `projection_prng_key` (float32)."""
    bases = spec.hyper.bases
    generator = torch.Generator(device="cpu").manual_seed(bases.prng_key)
    with torch.no_grad():
        if bases.kind == "dense":
            a = _kaiming(bases.shape_A, generator)
            b = torch.cat([_kaiming((bases.max_dim, 1, bases.r), generator) for _ in range(bases.num_bases)], dim=1)
        else:
            sparsity = math.sqrt(bases.min_dim) if bases.kind == "very_sparse" else 3
            a = _ternary(torch.rand(bases.shape_A, generator=generator), sparsity)
            b = _ternary(torch.rand(bases.shape_B, generator=generator), sparsity)
        a, b = a / a.std(), b / b.std()
    key_a, key_b = _keys(bases)
    return {key_a: a.float(), key_b: b.float()}


def _found_keys(config: Any, base_keys: list[str]) -> tuple[str, str] | None:
    """The base keys of this config's bases among `base_keys` (their shapes depend on the model: matched by prefix)."""
    found = []
    for name, lead in (("randlora_A", f"{config.r}x1x"), ("randlora_B", "")):
        prefix = shared_key(name, f"prng{config.projection_prng_key}", _kind(config), lead)
        keys = [k for k in base_keys if k.startswith(prefix) and (lead or k.endswith(f"x{config.r}"))]
        if len(keys) > 1:
            raise ValueError(f"several shared RandLoRA bases match this config: {keys}; pass only this adapter's base")
        found.append(keys[0] if keys else None)
    return (found[0], found[1]) if found[0] and found[1] else None


def peft_shared_keys(config: Any, base_keys: list[str]) -> dict[str, str]:
    """{checkpoint key: base key}: PEFT saves the bases as `base_model.randlora_A/B` when save_projection."""
    found = _found_keys(config, base_keys) if config.save_projection else None
    return {} if found is None else {"base_model.randlora_A": found[0], "base_model.randlora_B": found[1]}


def peft_layer_keys(config: Any, base_keys: list[str], paths: list[str]) -> dict[str, str]:
    """PEFT's layers hold the bases as submodule buffers, so its files repeat them under every adapted layer."""
    found = _found_keys(config, base_keys) if config.save_projection else None
    if found is None:
        return {}
    return {f"base_model.model.{p}.{n}": k for p in paths for n, k in zip(("randlora_A", "randlora_B"), found)}


def param_names(spec: Spec) -> tuple[str, ...]:
    return (LAMBDA, GAMMA)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT draws lambda ~ randn(r, n) in every case (zeroed for init_weights=True): the same RNG use."""
    h = spec.hyper
    k, big = min(spec.in_features, spec.out_features), max(spec.in_features, spec.out_features)
    lam = torch.randn(h.r, h.num_bases, generator=generator)
    if h.init:
        return {LAMBDA: torch.zeros_like(lam), GAMMA: torch.full((h.num_bases, k), 1 / max(h.num_bases, k))}
    return {LAMBDA: lam, GAMMA: torch.ones(h.num_bases, k) / big}


class _ScaledBasis(SavesInputs):
    """`lam[:, :, None] * a * gamma[None]`: a (r, 1, k), lam (r, n), gamma (n, k) -> (r, n, k), saving only its
    inputs (PEFT's `UniqueBaseGrad`, with its einsums). Plain autograd would also keep `lam[:, :, None] * a`, an
    (r, n, k) tensor per layer until backward (1.24x PEFT's training peak on the benchmark Llama)."""

    @staticmethod
    def forward(a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return lam[:, :, None] * a * gamma[None]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        a, lam, gamma = (t.to(grad.dtype) for t in ctx.saved_tensors)
        grad_a = torch.einsum("kbj,kb,bj->kj", grad, lam, gamma)[:, None, :] if ctx.needs_input_grad[0] else None
        grad_lam = torch.einsum("kbj,kvj,bj->kb", grad, a, gamma)  # v: A's singleton dim (PEFT's einsum)
        grad_gamma = torch.einsum("kbj,kvj,kb->bj", grad, a, lam)
        return grad_a, grad_lam, grad_gamma

    @staticmethod
    def jvp(ctx: Any, ta: Any, tlam: Any, tgamma: Any) -> torch.Tensor:
        a, lam, gamma = ctx.saved_tensors
        out = torch.zeros(torch.broadcast_shapes(a.shape, (*lam.shape, 1)), dtype=a.dtype, device=a.device)
        if ta is not None:
            out = out + lam[:, :, None] * ta * gamma[None]
        if tlam is not None:
            out = out + tlam[:, :, None] * a * gamma[None]
        if tgamma is not None:
            out = out + lam[:, :, None] * a * tgamma[None]
        return out


def scaled_bases(spec: Spec, params: Params, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `get_scaled_bases`: (first, second) with `x @ first^T @ second^T` the unscaled update."""
    a, b = params["randlora_A"], params["randlora_B"]
    lam, gamma = params[LAMBDA].to(device), params[GAMMA].to(device)
    if device.type == "cpu" and b.dtype in UPCAST_DTYPES:  # PEFT: slow half matmuls on CPU
        a, b, lam, gamma = a.float(), b.float(), lam.float(), gamma.float()
    n = spec.hyper.num_bases
    k, big = min(spec.in_features, spec.out_features), max(spec.in_features, spec.out_features)
    update_b = b[:big, :n, :].to(device).flatten(start_dim=1)  # (K, n * r)
    update_a = _ScaledBasis.run(a[:, :n, :k].to(device), lam, gamma).flatten(end_dim=1)  # (r * n, k)
    if k == spec.in_features:
        return update_a, update_b
    return update_b.T, update_a.T


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    assert result is not None
    previous_dtype = x.dtype
    first, second = scaled_bases(spec, params, x.device)
    x = ctx.dropout(x.to(second.dtype), spec.hyper.dropout)
    if spec.kind is LayerKind.QUANT_LINEAR:  # PEFT's bnb layers: term in result's dtype, scaled, sum in x's (cast)
        return (result + F.linear(F.linear(x, first), second).to(result.dtype) * spec.hyper.scaling).to(x.dtype)
    return (result + F.linear(F.linear(x, first), second) * spec.hyper.scaling).to(previous_dtype)


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """s * (first^T @ second^T)^T in the base weight's layout (PEFT's order of operations)."""
    first, second = scaled_bases(spec, params, params["randlora_B"].device)
    update = (first.T @ second.T).T
    return (update.T if spec.kind is LayerKind.CONV1D_HF else update) * spec.hyper.scaling


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT: `W += delta.to(W.dtype)` (the delta is cast before the add)."""
    return weight + delta_weight(spec, params).to(weight.device, weight.dtype)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    return weight - delta_weight(spec, params).to(weight.device, weight.dtype)


RANDLORA = register(
    Method(
        name="randlora",
        config=RandLoraConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        delta_weight=delta_weight,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight),
        shared=SharedTensors(
            common_hyper=common_hyper,
            frozen_params=frozen_params,
            make=make_bases,
            file_keys=peft_shared_keys,
            layer_file_keys=peft_layer_keys,
        ),
        keys=KeyRules(param_prefix="randlora_lambda", unsuffixed=frozenset({LAMBDA, GAMMA})),
        kinds=WEIGHT_OP_KINDS | {LayerKind.QUANT_LINEAR},
    )
)
