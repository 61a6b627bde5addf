"""FRoD (`FrodConfig`): the adapted weight reparameterised over a basis shared by the layers of one role, PEFT
0.21.2's arithmetic.

    W' = U (S + diag(lambda_l)) V^T          V (in, in): the role's basis; U (out, in) frozen; S (in, in) sparse
    y = base(x) + h V (S^T + diag(lambda_l)) U^T - h W^T        h = dropout(x)

A role ("category", PEFT's `_category_from_key`: `q_proj`, `self_attn_q_proj`, ...) groups the targeted layers
across blocks; V is PEFT's joint decomposition of their weights (`_projection_from_weights`: an SVD when the stacked
weights are wide, else QR, a ridge-regularised mean of inverses and an eigendecomposition), and S's pattern draws
from `projection_prng_key` in sorted role order. Trainable: frod_lambda_l (in,) and frod_lambda_s_values (nnz,), S's
values at that pattern. U and lambda_l's start come from solving `V B^T = W^T` in float64 (`B = U diag(lambda_l)`).
V, S's pattern (`frod_s_indices`) and its size are frozen tensors shared by a role's layers, made once per plan from
all the targeted weights (`SharedTensors.from_layers`, before any layer's init) and kept in `base` under
`<shared>.frod.{name}.{role}.{V | s_indices | s_size}` (`name`: a digest of the config fields that decide them),
saved like PEFT's `base_model.frod_V.{role}` when save_projection; U is a frozen per-layer tensor (`LayerFrozen`,
not saved, as in PEFT). U's and lambda_l's init read the layer's V from the hooks' `shared` argument; the spec holds
only static facts (the role, S's size, the projection settings).

Per call nothing weight-sized is built. As in PEFT's forward, a layer's first FRoD adapter that draws no dropout
computes `h V (S^T + diag(lambda_l)) U^T + bias` without running the base layer; otherwise (dropout drawn, or an
adapter stacked on another) it runs the layer below and subtracts `h W^T` (PEFT's multi-adapter / dropout path;
PEFT subtracts `base(x) - bias` when no dropout is drawn: equal up to rounding). S acts through a row gather and
a row index_add over its nnz entries (PEFT: `torch.sparse.mm`, not traceable by vmap / torch.compile), in an
autograd Function that saves only z = h V and S's values and reads S's gradient off `grad^T z` like PEFT's sparse
backward. Merging builds the dense `U (S + diag) V^T - W0` from the weight before the merge (PEFT keeps it);
unmerging needs it (`funcpeft.unmerge(..., base=...)`). nn.Linear and GPT-2 Conv1D only, like PEFT.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._trees import shared_key
from ..configs.frod import FrodConfig
from ._layers import SavesInputs
from ._registry import register
from .base import (
    KeyRules,
    LayerFrozen,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    OpContext,
    Params,
    SharedTensors,
    Target,
    WeightInit,
)

LAMBDA_L, LAMBDA_S = "frod_lambda_l", "frod_lambda_s_values"
V, INDICES, U = "frod_V", "frod_s_indices", "frod_U"
_SAVED = {"V": "frod_V", "s_indices": "frod_s_indices", "s_size": "frod_s_size"}  # base key part -> PEFT's name


Targets = str | tuple[str, ...] | None


@dataclass(frozen=True)
class FrodProjection:
    """The config fields that decide an adapter's shared bases and sparse patterns, besides the weights (static).

    targets / layers_to_transform / layers_pattern: which layers make up each role (target names sorted, lists as
    tuples);
    prng_key: seeds S's patterns; sparse_rate: S's density; regularization_alpha: the basis' ridge term.
    """

    targets: Targets
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: Targets
    prng_key: int
    sparse_rate: float
    regularization_alpha: float

    @property
    def name(self) -> str:
        """Names the tensors in `base`: the same for the same settings (adapters on one model share them)."""
        fields = [
            self.targets,
            self.layers_to_transform,
            self.layers_pattern,
            self.prng_key,
            self.sparse_rate,
            self.regularization_alpha,
        ]
        return hashlib.sha1(json.dumps(fields, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FrodHyper:
    """role: PEFT's category of the layer (its V and S's pattern); nnz: S's number of entries."""

    role: str
    dropout: float
    init: bool
    nnz: int
    projection: FrodProjection


Spec = LayerSpec[FrodHyper]


def _category_from_key(key: str) -> str:
    """PEFT's role of a module path: the last part after a block index, else the last two parts joined by `_`."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def _layer_index_from_key(key: str, fallback: int) -> int:
    """PEFT's block index of a module path: after `layers`, else the first integer part, else `fallback`."""
    parts = key.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    for part in parts:
        if part.isdigit():
            return int(part)
    return fallback


def _projection_from_weights(matrices: list[torch.Tensor], regularization_alpha: float) -> torch.Tensor:
    """PEFT's joint basis (in, in) of a role's weights (each (out_i, in), float32)."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        _, _, vh = torch.linalg.svd(stacked, full_matrices=True)
        return vh.T
    q_matrix, r_matrix = torch.linalg.qr(stacked)
    dim = r_matrix.shape[1]
    t_pi = torch.zeros((dim, dim), dtype=r_matrix.dtype)
    start = 0
    for matrix in matrices:
        q_slice = q_matrix[start : start + matrix.shape[0], :]
        start += matrix.shape[0]
        t_pi += torch.linalg.inv(q_slice.T @ q_slice + regularization_alpha * torch.eye(dim, dtype=r_matrix.dtype))
    t_pi /= len(matrices)
    _, eigenvectors = torch.linalg.eigh(t_pi)
    return r_matrix.T @ eigenvectors


def _as_tuple(value: Any) -> Any:
    """A list config field as a tuple (hashable), other values as they are."""
    return tuple(value) if isinstance(value, list) else value


def _projection(config: Any) -> FrodProjection:
    targets = config.target_modules
    return FrodProjection(
        targets=tuple(sorted(targets)) if isinstance(targets, (set, frozenset, list, tuple)) else targets,
        layers_to_transform=_as_tuple(config.layers_to_transform),
        layers_pattern=_as_tuple(config.layers_pattern),
        prng_key=int(config.projection_prng_key),
        sparse_rate=float(config.sparse_rate),
        regularization_alpha=float(config.regularization_alpha),
    )


def _nnz(in_dim: int, sparse_rate: float) -> int:
    """PEFT's number of S's entries: the off-diagonal (in, in) positions times sparse_rate, at least one if > 0."""
    off_diagonal = in_dim * in_dim - in_dim
    nnz = min(int(in_dim * in_dim * sparse_rate), off_diagonal)
    return max(1, nnz) if sparse_rate > 0 and off_diagonal > 0 else nnz


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear layout (out, in)."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return weight.T if isinstance(module, Conv1D) else weight


def common_hyper(config: Any, targets: Mapping[str, nn.Module]) -> FrodProjection:
    """The projection settings (`Target.common`); PEFT's error when no target is a layer FRoD adapts."""
    if not any(isinstance(module, (nn.Linear, Conv1D)) for module in targets.values()):
        raise ValueError("No layer types compatible with FRoD were found. Please check `peft_config.target_modules`.")
    return _projection(config)


def hyper(config: Any, target: Target) -> FrodHyper:
    in_dim = _weight(target.module).shape[1] if isinstance(target.module, (nn.Linear, Conv1D)) else 0
    return FrodHyper(
        role=_category_from_key(target.name),
        dropout=float(config.frod_dropout),
        init=bool(config.init_weights),
        nnz=_nnz(in_dim, float(config.sparse_rate)),
        projection=target.common,
    )


def make_projections(layers: Mapping[str, tuple[Spec, nn.Module]]) -> dict[str, torch.Tensor]:
    """PEFT's `_init_frod_projections` (`SharedTensors.from_layers`): {base key: tensor} with each role's V (in, in)
    in the weights' dtype from the role's weights in block order (a later module with the same block index and role
    replaces an earlier one, as in PEFT), S's pattern (2, nnz) long from one generator seeded with projection_prng_key,
    roles in sorted order, and S's size (PEFT's frod_s_size, only saved); on the device of the role's first layer.
    layers: {module path: (spec, module)} of every layer of the adapter, in plan (target) order."""
    weights: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    devices: dict[str, torch.device] = {}
    for fallback, (path, (spec, module)) in enumerate(layers.items()):
        weights[_layer_index_from_key(path, fallback)][spec.hyper.role] = _weight(module)
        devices.setdefault(spec.hyper.role, _weight(module).device)
    specs = {spec.hyper.role: spec for spec, _ in layers.values()}
    settings = next(iter(specs.values())).hyper.projection
    generator = torch.Generator(device="cpu").manual_seed(settings.prng_key)
    out: dict[str, torch.Tensor] = {}
    for role in sorted(specs):
        matrices = [layer[role].detach() for _, layer in sorted(weights.items()) if role in layer]
        example = next(layer[role] for layer in weights.values() if role in layer)
        in_dim, nnz = matrices[0].shape[1], specs[role].hyper.nnz
        if any(m.is_meta for m in matrices):
            v = torch.empty((in_dim, in_dim), dtype=example.dtype, device="meta")
        else:
            v = _projection_from_weights([m.to(torch.float32).cpu() for m in matrices], settings.regularization_alpha)
        if nnz:
            rows, cols = torch.meshgrid(torch.arange(in_dim), torch.arange(in_dim), indexing="ij")
            mask = torch.stack([rows.flatten(), cols.flatten()], dim=1)
            off_diagonal = mask[mask[:, 0] != mask[:, 1]]
            perm = torch.randperm(off_diagonal.shape[0], generator=generator)[:nnz]
            pattern = off_diagonal[perm].t().contiguous()
        else:
            pattern = torch.empty(2, 0, dtype=torch.long)
        size = torch.tensor([in_dim, in_dim], dtype=torch.long)
        device = torch.device("cpu") if v.is_meta else devices[role]
        out[_key(settings, role, "V")] = v.to(dtype=example.dtype) if v.is_meta else v.to(device, example.dtype)
        out[_key(settings, role, "s_indices")] = pattern.to(device)
        out[_key(settings, role, "s_size")] = size.to(device)
    return out


def _key(projection: FrodProjection, role: str, part: str) -> str:
    return shared_key("frod", projection.name, role, part)


def frozen_params(spec: Spec) -> tuple[tuple[str, str], ...]:
    p, role = spec.hyper.projection, spec.hyper.role
    return ((V, _key(p, role, "V")), (INDICES, _key(p, role, "s_indices")))


def file_keys(config: Any, keys: list[str]) -> dict[str, str]:
    """{checkpoint key: base key}: PEFT's `base_model.frod_V.{role}` (and s_indices, s_size) when save_projection."""
    if not config.save_projection:
        return {}
    prefix = shared_key("frod", _projection(config).name) + "."
    out = {}
    for key in keys:
        if key.startswith(prefix):
            role, _, part = key[len(prefix) :].rpartition(".")
            out[f"base_model.{_SAVED[part]}.{role}"] = key
    return out


def _u_and_lambda(v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_calculate_frod_u_and_lambda`: B with V B^T = W^T (float64; pinv when V is singular), lambda_l its
    column norms, U = B / lambda_l (zero columns where lambda_l ~ 0). U (out, in), lambda_l (in,), float32."""
    w64, v64 = w.detach().to(torch.float64).cpu(), v.detach().to(torch.float64).cpu()
    try:
        bi = torch.linalg.solve(v64, w64.T).T
    except RuntimeError:
        bi = w64 @ torch.linalg.pinv(v64, rtol=1e-6).T
    lambda_l = torch.linalg.norm(bi, dim=0)
    u = torch.zeros_like(bi)
    nonzero = lambda_l > 1e-12
    u[:, nonzero] = bi[:, nonzero] / lambda_l[nonzero]
    return u.float(), lambda_l.float()


def make_u(spec: Spec, module: nn.Module, generator: torch.Generator | None, shared: Params) -> dict[str, torch.Tensor]:
    """The layer's frozen U (out, in) in the weight's dtype, on its device, from its role's V (`shared`)."""
    w = _weight(module)
    if w.is_meta:
        return {U: torch.empty((spec.out_features, spec.in_features), dtype=w.dtype, device="meta")}
    v = shared[V].to(dtype=w.dtype)
    return {U: _u_and_lambda(v, w)[0].to(device=w.device, dtype=w.dtype)}


def param_names(spec: Spec) -> tuple[str, ...]:
    return (LAMBDA_L, LAMBDA_S)


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """Zeros: PEFT's lambda_s (init_weights=True), and the offset `finish_init` adds lambda_l's start to; the
    random draws of init_weights=False need the weight's dtype (`init_from_weight`)."""
    return {LAMBDA_L: torch.zeros(spec.in_features), LAMBDA_S: torch.zeros(spec.hyper.nnz)}


def init_from_weight(
    spec: Spec, params: Params, weight: torch.Tensor, data: Any, generator: torch.Generator | None
) -> WeightInit:
    """init_weights=False: PEFT's draws on its parameters, in the weight's dtype (bf16 draws consume the random
    stream differently): lambda_s ~ N(0, 0.1^2), then lambda_l's offset randn * 0.1."""
    if spec.hyper.init:
        return WeightInit(params)
    device = weight.device if generator is None else generator.device
    nnz = params[LAMBDA_S].shape[0]
    s = torch.nn.init.normal_(torch.empty(nnz, dtype=weight.dtype, device=device), std=0.1, generator=generator)
    offset = torch.randn(spec.in_features, dtype=weight.dtype, device=device, generator=generator) * 0.1
    like = params[LAMBDA_L]
    return WeightInit({LAMBDA_L: offset.to(like), LAMBDA_S: s.to(params[LAMBDA_S])})


def finish_init(spec: Spec, params: Params, weight: torch.Tensor, shared: Params) -> Params:
    """lambda_l = the column norms of W V^-T (in the weight's dtype, as PEFT's parameter) + init's offset; V: the
    role's basis (`shared`)."""
    if weight.is_meta:
        return params
    w = weight.T if spec.kind is LayerKind.CONV1D_HF else weight
    v = shared[V].to(dtype=w.dtype)
    lam = _u_and_lambda(v, w)[1].to(device=w.device, dtype=w.dtype)
    offset = params[LAMBDA_L]
    if not spec.hyper.init:
        lam = lam + offset.to(lam.dtype)
    return {**params, LAMBDA_L: lam.to(offset.dtype)}


def _s_rows(zt: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`S zt` for the sparse S (in, in) with `values` at (`rows`, `cols`): zt (in, N) -> (in, N). A row gather and a
    row index_add over S's entries (PEFT: `torch.sparse.mm(S, z^T)`, which walks the entries row by row too)."""
    return torch.zeros_like(zt).index_add(0, rows, zt.index_select(0, cols) * values.unsqueeze(-1))


def _s_apply(z: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`z S^T` for z (..., in): (..., in)."""
    zt = z.reshape(-1, z.shape[-1]).t().contiguous()
    return _s_rows(zt, values, rows, cols).t().reshape(z.shape)


class _SparseProduct(SavesInputs):
    """`z S^T` saving only z and S's values and pattern. Plain autograd of the gather keeps the (tokens, nnz)
    `z[:, cols]` for S's gradient (86 MB on the benchmark Llama: 2.7x PEFT's training peak). Bilinear in (z,
    values): backward applies S^T to the output gradient and reads S's gradient off the dense (in, in) `grad^T z`
    (as PEFT's sparse backward does); `jvp` is the product of the tangents."""

    @staticmethod
    def forward(z: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return _s_apply(z, values, rows, cols).contiguous()  # not a view: forward AD wants the tangent's layout

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        z, values, rows, cols = ctx.saved_tensors
        gt = grad.reshape(-1, grad.shape[-1]).t().contiguous()
        grad_z = _s_rows(gt, values, cols, rows).t().reshape(z.shape) if ctx.needs_input_grad[0] else None
        grad_values = None
        if ctx.needs_input_grad[1]:  # PEFT's: the dense (in, in) grad^T z at S's entries (faster than per-entry sums)
            grad_values = (gt @ z.reshape(-1, z.shape[-1]))[rows, cols]
        return grad_z, grad_values, None, None

    @staticmethod
    def jvp(ctx: Any, tz: Any, tvalues: Any, trows: Any, tcols: Any) -> torch.Tensor:
        z, values, rows, cols = ctx.saved_tensors
        out = torch.zeros_like(z)
        if tz is not None:
            out = out + _s_apply(tz, values, rows, cols)
        if tvalues is not None:
            out = out + _s_apply(z, tvalues, rows, cols)
        return out


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """`h V (S^T + diag(lambda_l)) U^T + bias` when this adapter is the layer's first and draws no dropout (PEFT's
    single-adapter path: the base layer is not run); otherwise `below(x) + h V (S^T + diag) U^T - h W^T` with
    h = dropout(x) (PEFT's multi-adapter / dropout path). In x's dtype (PEFT casts U, V, S and lambda_l to it)."""
    assert result is None and ctx.inner_op is not None
    dtype = x.dtype
    u, v = params[U].to(dtype), params[V].to(dtype)
    values, lam = params[LAMBDA_S].to(dtype), params[LAMBDA_L].to(dtype)
    indices = params[INDICES].to(x.device)
    h = ctx.dropout(x, spec.hyper.dropout)
    z = torch.matmul(h, v)
    out_add = F.linear(_SparseProduct.run(z, values, indices[0], indices[1]) + z * lam, u)
    if ctx.inner_op is ctx.base_op and not (ctx.training and spec.hyper.dropout > 0):
        return (out_add if ctx.bias is None else out_add + ctx.bias).to(dtype)
    w = ctx.weight.T if spec.kind is LayerKind.CONV1D_HF else ctx.weight
    return (ctx.inner_op(x) + out_add - F.linear(h, w.to(dtype))).to(dtype)


def _adapted_weight(spec: Spec, params: Params, dtype: torch.dtype) -> torch.Tensor:
    """U (S + diag(lambda_l)) V^T (out, in), dense, in `dtype` (PEFT's get_delta_weight)."""
    u, v = params[U].to(dtype), params[V].to(dtype)
    indices = params[INDICES].to(u.device)
    s = torch.zeros(v.shape[0], v.shape[0], dtype=dtype, device=u.device)
    s = s.index_put((indices[0], indices[1]), params[LAMBDA_S].to(dtype), accumulate=True)
    return u @ (s + torch.diag_embed(params[LAMBDA_L].to(dtype))) @ v.T


def merge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT's merge: `W + (U (S + diag) V^T - W0)`, W0 the weight before the merge (default: `weight`)."""
    w0 = (weight if base_weight is None else base_weight).to(weight.dtype)
    w0 = w0.T if spec.kind is LayerKind.CONV1D_HF else w0
    delta = _adapted_weight(spec, params, weight.dtype) - w0
    return weight + (delta.T if spec.kind is LayerKind.CONV1D_HF else delta)


def unmerge_weight(spec: Spec, params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """PEFT restores its saved pre-merge weight; FRoD's delta is relative to it, so funcpeft needs it too."""
    if base_weight is None:
        raise ValueError(
            "FRoD cannot unmerge without the pre-merge weight: its merged weight is U (S + diag) V^T + (W - W0), "
            "relative to the weight W0 before merging (PEFT keeps W0 on the layer). Pass the unmerged weights: "
            "funcpeft.unmerge(..., base=<the base tree before merging>)."
        )
    return base_weight.to(weight.dtype)


FROD = register(
    Method(
        name="frod",
        config=FrodConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=forward,
        uses_result=lambda spec: False,  # the first adapter skips the base layer, as PEFT does
        init_from_weight=init_from_weight,
        finish_init=finish_init,
        merge=MergeHooks(weight=merge_weight, unweight=unmerge_weight, from_base=True),
        shared=SharedTensors(
            common_hyper=common_hyper,
            frozen_params=frozen_params,
            from_layers=make_projections,
            file_keys=file_keys,
            saved=lambda config: bool(config.save_projection),
            layer_dtype=False,  # PEFT's FRoD layer moves only its trainable tensors; make gives V's dtype
        ),
        layer_frozen=LayerFrozen(names=(U,), make=make_u, saved=False),
        keys=KeyRules(param_prefix="frod_", unsuffixed=frozenset({LAMBDA_L, LAMBDA_S})),
        kinds=frozenset({LayerKind.LINEAR, LayerKind.CONV1D_HF}),
    )
)
