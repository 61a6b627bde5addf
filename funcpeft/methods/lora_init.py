"""LoRA's inits beyond True / False / "gaussian": PEFT 0.21.2's `LoraLayer.*_init`, same arithmetic, same RNG draws.

Per linear / GPT-2 Conv1D layer (W the base weight in nn.Linear orientation (out, in), s the scaling):

    pissa          W = V S U^T (SVD; "pissa_niter_K": torch.svd_lowrank with K iterations); with S' = S[:r] / s:
                   A = diag(sqrt S') U^T[:r], B = V[:, :r] diag(sqrt S'); new W = W - (s B) A
    olora          W = Q R (QR); A = R[:r], B = Q[:, :r]; new W = W - (s B) A
    corda          from preprocess_corda's (U, S, V) (funcpeft.corda): A = V^T sqrt(S/s), B = U sqrt(S/s); new W = W - (s B) A
    loftq          alternating NF4 / int8 quantisation and rank-r SVD of the residual (funcpeft.methods._loftq);
                   new W = the dequantised weight
    lora_ga        from preprocess_loraga's averaged gradient G (funcpeft.loraga): rank-2r svd_lowrank of G split
                   between A and B, rescaled; new W = W - s (B A)
    orthogonal     A, B from random orthogonal rows (no change to W); r must be even
    eva            A kaiming-uniform, B = 0 until funcpeft.eva.initialize_lora_eva_weights sets A

Every change to W is returned as a new tensor (`WeightInit.weight`): funcpeft puts it in `base`, the model's
own weight is never written. Embedding layers get PEFT's default embedding init under all of these (PEFT's
own fallback), conv layers too under "lora_ga"; PEFT refuses (or crashes on) the other inits on conv layers,
and LoftQ on embeddings: funcpeft raises `UnsupportedLayerError` for them when planning.

PEFT's OLoRA and LoftQ ignore `fan_in_fan_out`: on GPT-2's Conv1D they decompose the (in, out) weight as if it
were (out, in), which gives lora_A/lora_B of the wrong shapes (a crash at the first call) or, for a square
weight, an adapter that does not reproduce the base model. funcpeft refuses those two on Conv1D.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .._config import LoraGAConfig, init_mode
from ._loftq import loftq_init
from .base import NO_INIT_DATA, LayerKind, LayerSpec, Params, Target, UnsupportedLayerError, WeightInit

WEIGHT_INITS = ("eva", "pissa", "olora", "corda", "loftq", "orthogonal", "lora_ga")
BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga")  # inits that write a new base weight


def changes_base(spec: LayerSpec[Any]) -> bool:
    """Whether this layer's init replaces its base weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA on a linear layer)."""
    init = getattr(spec.hyper, "init", None)
    return (
        init is not None and init_mode(init) in BASE_CHANGING and spec.kind in (LayerKind.LINEAR, LayerKind.CONV1D_HF)
    )


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_target(init: bool | str, r: int, target: Target) -> None:
    """Raise for a layer PEFT cannot apply `init` to; warn where PEFT silently falls back to its default init."""
    mode = init_mode(init)
    if mode not in WEIGHT_INITS:
        return
    module = target.module
    what = f"{target.name!r} ({type(module).__module__}.{type(module).__name__})"
    if target.kind is LayerKind.QUANT_LINEAR:
        raise NotImplementedError(
            f"init_lora_weights={init!r} on the quantised layer {what}: funcpeft's weight-reading inits need a plain "
            "float weight. Initialise on the unquantised model (LoftQ: funcpeft's own quantisers, see docs/usage.md) "
            "or use init_lora_weights=True."
        )
    if target.kind is LayerKind.CONV and mode not in ("lora_ga",):
        raise UnsupportedLayerError(
            f"init_lora_weights={init!r} cannot initialise the conv layer {what}: PEFT 0.21.2 supports it on "
            f"nn.Linear and GPT-2 Conv1D only (on conv layers it raises ValueError: Unknown initialization "
            f"init_lora_weights={init!r}). Do not target this module, or use init_lora_weights=True."
        )
    if target.kind is LayerKind.EMBEDDING:
        if mode == "loftq":
            raise UnsupportedLayerError(
                f"init_lora_weights='loftq' cannot initialise the embedding layer {what}: PEFT 0.21.2 crashes on it "
                "(TypeError in Embedding.loftq_init). Do not target this module with LoftQ."
            )
        warnings.warn(
            f"init_lora_weights={init!r} does not apply to the embedding layer {target.name!r}: it gets PEFT's default "
            "embedding init (lora_embedding_A = 0, lora_embedding_B normal), as in PEFT.",
            stacklevel=4,
        )
        return
    if target.kind is LayerKind.CONV1D_HF and mode in ("olora", "loftq"):
        raise UnsupportedLayerError(
            f"init_lora_weights={init!r} on the GPT-2 Conv1D layer {what}: PEFT 0.21.2's {mode} ignores fan_in_fan_out "
            "and decomposes the (in, out) weight as (out, in): lora_A/lora_B get the wrong shapes (a crash) or, for a "
            "square weight, the adapted model no longer equals the base model. funcpeft refuses it instead."
        )
    if target.kind is not LayerKind.CONV:
        weight_shape = tuple(module.weight.shape)
        low = min(weight_shape)
        need = 2 * r if mode == "lora_ga" else r
        if mode in ("pissa", "olora", "loftq", "lora_ga") and need > low:
            raise ValueError(
                f"init_lora_weights={init!r} on {what}: needs {'2 * r' if mode == 'lora_ga' else 'r'} = {need} <= "
                f"min(in_features, out_features) = {low} (the decomposition has only {low} components)"
            )
    if mode == "orthogonal" and r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")


def _kaiming(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def init(spec: LayerSpec[Any], generator: torch.Generator | None) -> Params:
    """Fresh lora_A (r, in), lora_B (out, r) of a linear / Conv1D layer, drawing what PEFT draws.

    PEFT first builds lora_A and lora_B as nn.Linear (two kaiming-uniform draws), then runs the init: EVA keeps
    that A and zeroes B; orthogonal draws its own; the weight-based inits overwrite both (`init_from_weight`).
    """
    r, mode = spec.hyper.r, init_mode(spec.hyper.init)
    a, b = _kaiming((r, spec.in_features), generator), _kaiming((spec.out_features, r), generator)
    if mode == "orthogonal":  # PEFT's orthogonal_init (datta0.github.io/posts/rethink-lora-init)
        q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
        a = torch.randn(spec.in_features, r // 2, generator=generator).mm(q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, spec.out_features, generator=generator).T.mm(q[1::2, :]) / 10.0
        return {"lora_A": a.contiguous(), "lora_B": b.contiguous()}
    if mode in ("eva", "lora_ga"):  # lora_ga: B = 0 is the fallback when there is no gradient
        b = torch.zeros_like(b)
    return {"lora_A": a, "lora_B": b}


def _as_linear(weight: torch.Tensor, spec: LayerSpec[Any]) -> torch.Tensor:
    """The weight in nn.Linear orientation (out, in) (PEFT's `transpose(weight, fan_in_fan_out)`)."""
    return weight.T if spec.kind is LayerKind.CONV1D_HF else weight


def _check_dtype(weight: torch.Tensor, name: str) -> None:
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"Please initialize {name} under float32, float16, or bfloat16. Subsequently, re-quantize the residual "
            f"model to help minimize quantization errors. (got a {weight.dtype} weight)"
        )


def _pissa(spec: LayerSpec[Any], weight: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    _check_dtype(weight, "PiSSA")
    r, s, init = spec.hyper.r, spec.hyper.scaling, spec.hyper.init
    w = _as_linear(weight.to(torch.float32), spec)
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
    else:
        with _rng_from(generator, w.device):
            Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=int(init.split("_niter_")[-1]))
        Sr, Uhr = Sr / s, Ur.t()
    a = torch.diag(torch.sqrt(Sr)) @ Uhr
    b = Vr @ torch.diag(torch.sqrt(Sr))
    return a, b, _as_linear((w - s * b @ a).to(weight.dtype), spec)


def _olora(spec: LayerSpec[Any], weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"Unsupported data type for the base layer. Got {weight.dtype}.")
    r, s = spec.hyper.r, spec.hyper.scaling
    w = weight.to(torch.float32)
    Q, R = torch.linalg.qr(w)
    a, b = R[:r].contiguous(), Q[:, :r].contiguous()
    return a, b, (w - s * b @ a).to(weight.dtype)


def _corda(spec: LayerSpec[Any], weight: torch.Tensor, eigens: Any, where: str) -> tuple[torch.Tensor, ...]:
    _check_dtype(weight, "CorDA")
    if eigens is NO_INIT_DATA or eigens is None:
        raise ValueError(
            f"{where}: no CorDA eigens for this layer. Run funcpeft.corda.preprocess_corda(model, config, run_model) "
            "first and pass its result: funcpeft.get_peft_model(model, config, init_data=eigens)."
        )
    U, S, V = eigens.U_WC, eigens.S_WC, eigens.V_WC
    r, s = spec.hyper.r, spec.hyper.scaling
    for name, t in (("S", S), ("U", U), ("V", V)):
        if torch.isnan(t).any() or torch.isinf(t).any():
            raise ValueError(f"{where}: invalid value (nan or inf) found in CorDA's matrix {name}.")
    out_dim, in_dim = spec.out_features, spec.in_features
    hint = (
        "Please make sure the config and model given to preprocess_corda are the ones given to get_peft_model "
        "(same rank), and that a cache file was built with them."
    )
    if U.shape != (out_dim, r):
        raise ValueError(f"{where}: Matrix U size mismatch: {tuple(U.shape)} vs. ({out_dim}, {r}). {hint}")
    if S.shape != (r,):
        raise ValueError(f"{where}: Matrix S size mismatch: {tuple(S.shape)} vs. ({r},). {hint}")
    if V.shape != (in_dim, r):
        raise ValueError(f"{where}: Matrix V size mismatch: {tuple(V.shape)} vs. ({in_dim}, {r}). {hint}")
    dev = weight.device
    U, S, V = U.to(dev), S.to(dev) / s, V.to(dev)
    a = V.t().mul(S.sqrt().view(-1, 1)).contiguous()
    b = U.mul(S.sqrt()).contiguous()
    delta = _as_linear(s * b @ a, spec)
    return a, b, (weight.to(torch.float32) - delta).to(weight.dtype)


def _lora_ga(
    spec: LayerSpec[Any], weight: torch.Tensor, grad: torch.Tensor, config: Any, generator: torch.Generator | None
) -> tuple[torch.Tensor, ...]:
    r, s, dtype = spec.hyper.r, spec.hyper.scaling, weight.dtype
    g = _as_linear(grad.to(device=weight.device, dtype=torch.float32), spec)
    with _rng_from(generator, weight.device):
        U, S, V = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
        Vh, U, S = V.t()[: 2 * r, :], U[:, : 2 * r], S[: 2 * r]
        if config.direction == "ArBr":
            a, b, s_b = Vh[1 : 2 * r : 2, :], U[:, 0 : 2 * r : 2], S[0 : 2 * r : 2]
        elif config.direction == "A2rBr":
            a, b, s_b = Vh[r : 2 * r, :], U[:, :r], S[:r]
        elif config.direction == "ArB2r":
            a, b, s_b = Vh[:r, :], U[:, r : 2 * r], S[r : 2 * r]
        else:  # "random"
            indices = torch.randperm(2 * r)[:r]
            a, b, s_b = Vh[indices, :], U[:, indices], S[indices]
        b = b @ torch.diag(s_b)
        if config.scale == "stable":
            b = b * ((weight.shape[0] ** 0.25) / (config.stable_gamma**0.5))  # PEFT: the raw weight's shape[0]
        elif config.scale == "weight_svd":
            _, weight_s, _ = torch.svd_lowrank(_as_linear(weight.to(torch.float32), spec), q=r, niter=4)
            if s_b[0] > 0:
                b = b * (weight_s[0] / s_b[0])
        elif config.scale == "gd_scale":
            a, b = a / s, b / s
    a, b = a.to(dtype), b.to(dtype)
    new = _as_linear(weight.to(torch.float32), spec) - s * (b.float() @ a.float())
    return a, b, _as_linear(new.to(dtype), spec)


class _rng_from:
    """Draw from `generator` where PEFT calls the global RNG (torch.svd_lowrank, randperm); global RNG when None."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.generator, self.device = generator, device

    def __enter__(self) -> None:
        if self.generator is None:
            return
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))

    def __exit__(self, *exc: Any) -> None:
        if self.generator is not None:
            self._fork.__exit__(*exc)


def init_args(config: Any) -> tuple[Any, ...]:
    """The init's own settings as hashable data for `LoraHyper.init_args`: LoftQ's (bits, iterations), LoRA-GA's
    (direction, scale, stable_gamma); () for the other inits."""
    mode = init_mode(config.init_lora_weights)
    if mode == "loftq":
        return (config.loftq_config["loftq_bits"], config.loftq_config["loftq_iter"])
    if mode == "lora_ga":
        ga = config.lora_ga_config
        return () if ga is None else (ga.direction, ga.scale, ga.stable_gamma)
    return ()


def init_from_weight(
    spec: LayerSpec[Any], params: Params, weight: torch.Tensor, data: Any, generator: torch.Generator | None
) -> WeightInit:
    """PEFT's weight-based init of one layer: new lora_A / lora_B (in `params`' dtypes) and the new base weight."""
    mode = init_mode(spec.hyper.init)
    if mode not in WEIGHT_INITS or spec.kind not in (LayerKind.LINEAR, LayerKind.CONV1D_HF):
        return WeightInit(params)
    where = f"LoRA layer with weight {tuple(spec.weight_shape)}"
    w = weight.detach()
    if mode == "orthogonal":  # PEFT casts to the base weight's dtype
        return WeightInit({**params, **{k: params[k].to(w.dtype).to(params[k].dtype) for k in ("lora_A", "lora_B")}})
    if mode == "eva":
        return WeightInit(params)
    if mode == "pissa":
        a, b, new = _pissa(spec, w, generator)
    elif mode == "olora":
        a, b, new = _olora(spec, w)
    elif mode == "corda":
        a, b, new = _corda(spec, w, data, where)
    elif mode == "loftq":
        bits, iters = spec.hyper.init_args
        new, a, b = loftq_init(w, bits, spec.hyper.r, iters)
    else:  # lora_ga
        if data is NO_INIT_DATA:
            raise ValueError(
                f"{where}: no LoRA-GA gradient for this layer. Run funcpeft.loraga.preprocess_loraga(model, config, "
                "train_step) first and pass its result: funcpeft.get_peft_model(model, config, init_data=grads)."
            )
        if data is None:  # PEFT's fallback for a layer that got no gradient: init_lora_weights=True
            return WeightInit({**params, "lora_A": _kaiming(params["lora_A"].shape, generator).to(params["lora_A"])})
        if not spec.hyper.init_args:
            raise ValueError(
                "lora_ga_config must be provided when init_lora_weights='lora_ga'. "
                "Please pass lora_ga_config=LoraGAConfig(...) to LoraConfig."
            )
        a, b, new = _lora_ga(spec, w, data, LoraGAConfig(*spec.hyper.init_args), generator)
    out = {**params, "lora_A": a.to(params["lora_A"].dtype), "lora_B": b.to(params["lora_B"].dtype)}
    return WeightInit(out, new)
