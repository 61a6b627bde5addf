"""AdaMSS (`AdamssConfig`): low-rank updates in k-means clustered subspaces of the weight's SVD, PEFT 0.21.2's.

At get_peft_model time, per layer (weight W (out, in), bias b; Wb = [W | b] (out, in + 1), or W without a bias):

    U (out, r'), V (in (+1), r') = svd_lowrank(Wb, q=r', niter=2)   r' = min(r, out, in (+1)); seeded by random_seed
    newB = V^T (r', in (+1))      frozen, saved (`adamss_newB`)
    labels = KMeans(min(num_subspaces, out), init="random", n_init=1, max_iter=10, random_state=123456789)(U rows)
    subspace i: the rows S_i with label i; A_i (k_i, r') = qr(U[S_i]^T U_gram).Q^T, U_gram the top-k_i left
    singular vectors of U[S_i] U[S_i]^T (a randomized SVD); B_i (|S_i|, k_i) zeros ("orthogonal") or 0.01 randn

    y = base(x) + scatter(concat_i(([x | 1] newB^T) A_i^T B_i^T))      delta W = scatter(B_i A_i newB)[:, :in]

The subspaces partition the output rows, so the scatter is a gather by the inverse permutation (exact). The k-means
labels and ranks are static facts of the layer (in `spec.hyper`), computed from the base weight when the adapter is
planned, so loading a saved adapter rebuilds the same layer shapes from the same weight and seed (PEFT rebuilds
them the same way). k_i = min(|S_i|, subspace_rank), at least 1; with use_dynamic_rank, the count of the Gram
matrix's singular values above svd_threshold * the largest (funcpeft: an exact SVD; PEFT: a randomized one of full
rank, equal up to rounding), at most subspace_rank, at least 1.
The random draws (each subspace's randomized SVDs, B's randn) come from the adapter's generator (the global RNG
without one) in PEFT's order; the SVD of Wb draws from its own generator seeded with random_seed, as PEFT's fork.
The forward runs in the layer's dtype, as PEFT's; merging adds delta W to W and the last column of the update to b.
Materialised per call, as in PEFT: (..., r') and (..., out) activations, nothing weight-sized. Supported layers,
as in PEFT: nn.Linear only. Needs scikit-learn (k-means), as PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs.adamss import MAX_SUBSPACES, AdamssConfig
from ._registry import register
from .base import KeyRules, LayerFrozen, LayerKind, LayerSpec, MergeHooks, Method, OpContext, Params, Target

NEW_B = "adamss_newB"


def a_name(i: int) -> str:
    return f"adamss_A_{i}"


def b_name(i: int) -> str:
    return f"adamss_B_{i}"


@dataclass(frozen=True)
class AdamssHyper:
    rank: int  # r' = min(r, out, in (+1))
    bias: bool  # the layer has a bias: newB has its extra column
    rows: tuple[tuple[int, ...], ...]  # subspace i's output rows (k-means label i), ascending
    ranks: tuple[int, ...]  # k_i
    init: str | None  # init_weights: "orthogonal" (B zeros) or None (B random)
    dynamic: bool  # use_dynamic_rank: replay PEFT's extra randomized SVD per subspace
    seed: int  # random_seed of the SVD of [W | b]

    @property
    def order(self) -> tuple[int, ...]:
        """PEFT's scatter_index: the subspaces' rows, concatenated."""
        return tuple(j for rows in self.rows for j in rows)


Spec = LayerSpec[AdamssHyper]


def svd_lowrank(
    a: torch.Tensor, q: int, niter: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank (M=None) drawing its random projection from `generator` (None: the global RNG, as torch):
    the same arithmetic and draws as torch 2.13's `_svd_lowrank`. a (m, n) -> U (m, q), S (q,), V (n, q)."""
    m, n = a.shape[-2:]
    if m < n:
        a = a.mH
    r = torch.randn(a.shape[-1], q, dtype=a.dtype, device=a.device, generator=generator)
    basis = torch.linalg.qr(a @ r).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mH @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mH @ a, full_matrices=False)
    u, v = basis @ u, vh.mH
    return (v, s, u) if m < n else (u, s, v)


def _weight_with_bias(module: nn.Module) -> torch.Tensor:
    """[W | b] (out, in + 1) in float32, or W (out, in) without a bias (PEFT's `weight_with_bias`)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if weight.is_meta:
        raise NotImplementedError(
            "AdaMSS builds its subspaces from an SVD of the base weight, which is on the meta device here: load the "
            "model's weights first."
        )
    weight = weight.detach()
    bias = module.bias
    if isinstance(bias, torch.Tensor):
        weight = torch.cat((weight, bias.detach().unsqueeze(1).to(weight.dtype)), dim=1)
    return weight.to(torch.float32)


def slice_pca(module: nn.Module, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's seeded `slice_pca` on one matrix: (U (out, rank), V^T (rank, in (+1))), float32."""
    wb = _weight_with_bias(module)
    generator = torch.Generator(device=wb.device).manual_seed(seed)
    u, _, v = svd_lowrank(wb, q=rank, niter=2, generator=generator)
    return u[:, :rank], v[:, :rank].T


def _kmeans(u: torch.Tensor, k: int) -> list[int]:
    """PEFT's `clustering_Z`: scikit-learn's KMeans labels of U's rows."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise ImportError(
            "scikit-learn is required for AdaMSS initialization. Please install it with: pip install scikit-learn"
        ) from None
    vt = u.detach().cpu().numpy().astype("float32")
    kmeans = KMeans(n_clusters=k, init="random", n_init=1, max_iter=10, random_state=123456789)
    return [int(v) for v in kmeans.fit_predict(vt)]


def _dynamic_rank(data: torch.Tensor, subspace_rank: int, threshold: float) -> int:
    s = torch.linalg.svdvals(data @ data.T)
    return max(min(int((s > threshold * s[0]).sum()), subspace_rank, len(s)), 1)


def hyper(config: Any, target: Target) -> AdamssHyper:
    """The SVD, k-means and ranks of one layer (PEFT's `update_layer`, without its random draws)."""
    m = target.module
    out, inp = m.weight.shape
    has_bias = isinstance(m.bias, torch.Tensor)
    rank = min(config.r, out, inp + has_bias)
    u, _ = slice_pca(m, rank, config.random_seed)
    labels = _kmeans(u, min(config.num_subspaces, out))
    k = max(labels) + 1
    rows = tuple(tuple(j for j, label in enumerate(labels) if label == i) for i in range(k))
    if any(not r for r in rows) or k != min(config.num_subspaces, out):
        raise RuntimeError(
            f"AdaMSS on {target.name!r}: k-means left a subspace empty ({[len(r) for r in rows]} rows per subspace); "
            "PEFT fails on such a layer too. Use fewer num_subspaces."
        )
    if config.use_dynamic_rank:
        ranks = tuple(_dynamic_rank(u[list(r)], config.subspace_rank, config.svd_threshold) for r in rows)
    else:
        ranks = tuple(max(min(len(r), config.subspace_rank), 1) for r in rows)
    if max(ranks) > rank:
        raise ValueError(
            f"AdaMSS on {target.name!r}: a subspace rank of {max(ranks)} exceeds the SVD rank {rank} (r capped at the "
            "layer's shape); PEFT builds mismatched A / B there and fails in its forward. Lower subspace_rank."
        )
    return AdamssHyper(
        rank=rank,
        bias=has_bias,
        rows=rows,
        ranks=ranks,
        init=config.init_weights,
        dynamic=bool(config.use_dynamic_rank),
        seed=int(config.random_seed),
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    n = len(spec.hyper.rows)
    return (*(a_name(i) for i in range(n)), *(b_name(i) for i in range(n)))


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """Shapes only (zeros): the values need the base module and are drawn by `init_from_module`."""
    h = spec.hyper
    out = {a_name(i): torch.zeros(k, h.rank) for i, k in enumerate(h.ranks)}
    out.update({b_name(i): torch.zeros(len(rows), k) for i, (rows, k) in enumerate(zip(h.rows, h.ranks))})
    return out


def init_from_module(spec: Spec, params: Params, module: nn.Module, generator: torch.Generator | None) -> Params:
    """PEFT's values and draws, subspace by subspace: [the dynamic-rank randomized SVD], the Gram matrix's randomized
    SVD, A = qr(U_i^T U_gram).Q^T, then B (zeros, or 0.01 randn in the weight's dtype)."""
    h = spec.hyper
    u, _ = slice_pca(module, h.rank, h.seed)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    out = dict(params)
    for i, (rows, k) in enumerate(zip(h.rows, h.ranks)):
        data = u[list(rows)]
        gram = data @ data.T
        if h.dynamic:  # PEFT's rank from a randomized SVD of the Gram matrix: only its draws matter here
            svd_lowrank(gram, q=min(gram.shape), niter=2, generator=generator)
        u_gram, _, _ = svd_lowrank(gram, q=min(gram.shape[0], k), niter=2, generator=generator)
        q, _ = torch.linalg.qr(data.T @ u_gram[:, :k], mode="reduced")
        a = q.T.contiguous().to(weight.dtype)
        if h.init == "orthogonal":
            b = torch.zeros(len(rows), k, dtype=weight.dtype, device=weight.device)
        else:
            b = torch.randn(len(rows), k, dtype=weight.dtype, device=weight.device, generator=generator) * 0.01
        target = params[a_name(i)]
        out[a_name(i)] = a.to(target.device, target.dtype)
        out[b_name(i)] = b.to(target.device, target.dtype)
    return out


def make_new_b(
    spec: Spec, module: nn.Module, generator: torch.Generator | None = None, shared: Params | None = None
) -> Params:
    """{adamss_newB: V^T (r', in (+1))} in the weight's dtype and on its device (PEFT's persistent buffer)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if weight.is_meta:
        return {NEW_B: torch.empty(spec.hyper.rank, spec.in_features + spec.hyper.bias, device="meta")}
    _, vt = slice_pca(module, spec.hyper.rank, spec.hyper.seed)
    return {NEW_B: vt.to(weight.device, weight.dtype)}


def _inverse(spec: Spec, device: torch.device) -> torch.Tensor:
    """The gather index undoing PEFT's scatter (the subspaces' rows partition the outputs): (out,) long."""
    order = torch.tensor(spec.hyper.order, dtype=torch.long)
    return torch.argsort(order).to(device)


def forward(spec: Spec, params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext) -> torch.Tensor:
    """PEFT's `Linear.forward` for one adapter, in the layer's dtype."""
    assert result is not None
    previous_dtype = x.dtype
    dtype = ctx.weight.dtype
    x = x.to(dtype)
    if spec.hyper.bias:
        x = torch.cat((x, torch.ones(*x.shape[:-1], 1, device=x.device, dtype=dtype)), dim=-1)
    projected = F.linear(x, params[NEW_B].to(dtype))  # (..., r')
    chunks = [
        F.linear(F.linear(projected, params[a_name(i)].to(dtype)), params[b_name(i)].to(dtype))
        for i in range(len(spec.hyper.rows))
    ]
    delta = torch.cat(chunks, dim=-1).index_select(-1, _inverse(spec, x.device))
    return (result + delta).to(previous_dtype)


def _full_delta(spec: Spec, params: Params) -> torch.Tensor:
    """scatter(B_i A_i newB): (out, in (+1)); half precision on CPU computes in float32 and comes back (PEFT)."""
    new_b = params[NEW_B]
    dtype = new_b.dtype
    half = new_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    compute = torch.float32 if half else dtype
    chunks = [
        params[b_name(i)].to(compute) @ params[a_name(i)].to(compute) @ new_b.to(compute)
        for i in range(len(spec.hyper.rows))
    ]
    delta = torch.cat(chunks, dim=0).index_select(0, _inverse(spec, new_b.device))
    return delta.to(dtype) if half else delta


def delta_weight(spec: Spec, params: Params) -> torch.Tensor:
    """PEFT's `get_delta_weight`: (out, in), the update without its bias column."""
    delta = _full_delta(spec, params)
    return delta[:, :-1] if spec.hyper.bias else delta


def merge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    """PEFT's merge adds `get_delta_bias` (the update's last column) to the bias."""
    return bias + _full_delta(spec, params)[:, -1].to(bias.dtype)


def unmerge_bias(spec: Spec, params: Params, bias: torch.Tensor) -> torch.Tensor:
    return bias - _full_delta(spec, params)[:, -1].to(bias.dtype)


_LEAVES = tuple(n for i in range(MAX_SUBSPACES) for n in (a_name(i), b_name(i)))

ADAMSS = register(
    Method(
        name="adamss",
        config=AdamssConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        init_from_module=init_from_module,
        forward=forward,
        delta_weight=delta_weight,
        merge=MergeHooks(bias=merge_bias, unbias=unmerge_bias),
        layer_frozen=LayerFrozen(names=(NEW_B,), make=make_new_b, autocast=True),
        # PEFT keeps each subspace's A / B in a ParameterList: in memory `adamss_A.<adapter>.<i>`, in files
        # `adamss_A.<i>`; funcpeft's leaves are adamss_A_<i> / adamss_B_<i>
        keys=KeyRules(
            param_prefix="adamss_",
            unsuffixed=frozenset({NEW_B}),
            renamed=tuple((leaf, leaf[: len("adamss_A")] + "." + leaf[len("adamss_A_") :]) for leaf in _LEAVES),
        ),
        kinds=frozenset({LayerKind.LINEAR}),
    )
)
