"""CorDA's preprocessing (PEFT's `peft.tuners.lora.corda.preprocess_corda`), functionally.

    eigens = funcpeft.corda.preprocess_corda(model, config, run_model)   # config: init_lora_weights="corda"
    pm = funcpeft.get_peft_model(model, config, init_data=eigens)           # pm.base holds the residual weights

`run_model(forward)` gets `forward(*args, **kwargs)`, the model's own call, and runs it on the calibration
data (PEFT's `run_model()` calls the model itself). For every targeted nn.Linear / GPT-2 Conv1D layer, CorDA
averages the covariance C of its inputs (one example per call, PEFT's rule), takes the SVD of W C (W in
nn.Linear orientation, C damped until invertible) and keeps the r components with the largest singular
values ("ipm") or the smallest ("kpm"): `CordaEigens(S_WC (r,), U_WC (out, r), V_WC (in, r))` with
V_WC = (Vh C^-1)^T. The model is never hooked or modified (funcpeft._capture runs a private skeleton).
`cache_file` / `covariance_file` in the CordaConfig are PEFT's files (torch.save of tensor dicts; read
with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._capture import detached_params, hooked_forward, linear_targets
from ._config import CordaConfig, LoraConfig
from .methods._patterns import rank_and_alpha


@dataclass(frozen=True)
class CordaEigens:
    """One layer's CorDA decomposition (PEFT's `CordaEigens`): S_WC (r,), U_WC (out, r), V_WC (in, r)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _as_linear(module: nn.Module) -> torch.Tensor:
    w: Any = module.weight
    return w.detach().float().T if type(module).__name__ == "Conv1D" else w.detach().float()


def _corda_config(config: Any) -> CordaConfig:
    cfg = getattr(config, "corda_config", None)
    if not isinstance(config, LoraConfig) or not isinstance(cfg, CordaConfig):
        raise ValueError(
            "CorDA needs a funcpeft.LoraConfig with init_lora_weights='corda' (which sets its corda_config)."
        )
    return cfg


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def _save(obj: dict[str, torch.Tensor], path: str) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path)


def _exists(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


@torch.no_grad()
def covariances(
    model: nn.Module,
    config: LoraConfig,
    run_model: Callable[[Callable[..., Any]], Any],
    hooked_model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """`{path: (in, in) mean input covariance}` of the targeted layers (PEFT's `calib_cov_distribution`)."""
    targets = linear_targets(model, config)
    half = _corda_config(config).use_float16_for_covariance
    hooked = model if hooked_model is None else hooked_model
    hooked_targets = linear_targets(hooked, config)
    sums: dict[str, Any] = {}
    counts = dict.fromkeys(hooked_targets, 0)

    def make_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach().squeeze(0)
            if x.dim() != 2:
                raise ValueError(
                    f"CorDA: the input of {path!r} has shape {tuple(inputs[0].shape)}; PEFT's covariance hook takes one "
                    "example per model call ((1, seq, dim) or (seq, dim)): call the model on one example at a time."
                )
            if not half:
                x = x.float()
            x = x / torch.max(x).abs()
            if torch.isnan(x).any() or torch.isinf(x).any():
                raise ValueError(f"CorDA: invalid value found in the input of {path!r}, please check your input data.")
            cov = x.t().matmul(x)
            if torch.isnan(cov).any() or torch.isinf(cov).any():
                raise ValueError(f"CorDA: invalid value (nan or inf) found in the covariance of {path!r}.")
            counts[path] += 1
            sums[path] = cov if path not in sums else sums[path] + cov

        return hook

    with hooked_forward(
        hooked, detached_params(hooked), training=False, forward_hooks={p: make_hook(p) for p in hooked_targets}
    ) as forward:
        run_model(forward)
    silent = [p for p in targets if counts.get(p, 0) == 0]
    if silent:
        raise ValueError(
            f"CorDA: run_model never ran the targeted layers {silent[:5]}: call `forward` (the argument run_model "
            "gets) on the calibration data."
        )
    return {p: sums[p] / counts[p] for p in targets}


@torch.no_grad()
def eigens_for_layer(module: nn.Module, covariance: torch.Tensor) -> CordaEigens:
    """PEFT's `collect_eigens_for_layer`: SVD of W C (C damped until invertible), all min(in, out) components."""
    w = _as_linear(module)
    cov = covariance.float()
    damp = 0.01
    eye = torch.eye(cov.size(0), device=cov.device)
    while True:
        compensate = torch.diag(torch.ones(cov.size(0), device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        fixed = cov + compensate
        cov_inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ cov_inv, eye).item() < 0.05:
            break
        damp = damp * 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ cov_inv).transpose(0, 1)
    return CordaEigens(S_WC=S, U_WC=U.cpu(), V_WC=V.cpu())


def crop(eigens: CordaEigens, r: int, method: str, device: torch.device) -> CordaEigens:
    """PEFT's `crop_corda_eigens`: the r largest ("ipm") or smallest ("kpm") components."""
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(
        S_WC=eigens.S_WC[keep].clone(),
        U_WC=eigens.U_WC[:, keep].clone().to(device),
        V_WC=eigens.V_WC[:, keep].clone().to(device),
    )


def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[Callable[..., Any]], Any] | None = None,
    hooked_model: nn.Module | None = None,
) -> dict[str, CordaEigens]:
    """CorDA's per-layer decomposition, `{module path: CordaEigens}`: pass it as get_peft_model's `init_data`.

    Args:
        model: the base model (never modified).
        lora_config: a LoraConfig with init_lora_weights="corda" (its corda_config: method, cache files).
        run_model: called once as `run_model(forward)`; `forward` is the model's call. Needed unless the config's
            cache_file or covariance_file already exists.
        hooked_model: another model to take the layer inputs from (PEFT's argument of that name).

    Returns:
        `{module path: CordaEigens}` for every targeted linear layer, cropped to the layer's rank r: S_WC (r,),
        U_WC (out, r), V_WC (in, r). Written to the config's cache_file when one is set.
    """
    cfg = _corda_config(lora_config)
    targets = linear_targets(model, lora_config)
    device = _device(model)
    if cfg.cache_file is not None and _exists(cfg.cache_file):
        cache = torch.load(cfg.cache_file, map_location=device, weights_only=True)
        return {p: CordaEigens(*(cache[f"{p}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC"))) for p in targets}
    if cfg.covariance_file is not None and _exists(cfg.covariance_file):
        loaded = torch.load(cfg.covariance_file, map_location=device, weights_only=True)
        covs = {p: loaded[p] for p in targets}
    else:
        if run_model is None:
            raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
        covs = covariances(model, lora_config, run_model, hooked_model)
        if cfg.covariance_file is not None:
            _save(covs, cfg.covariance_file)
    out = {}
    for i, (path, module) in enumerate(targets.items()):
        if cfg.verbose:
            print(f"Collecting eigens {i + 1}/{len(targets)}: {path}")
        r = rank_and_alpha(lora_config, path)[0]
        out[path] = crop(eigens_for_layer(module, covs[path]), r, cfg.corda_method, device)
    if cfg.cache_file is not None:
        _save(
            {f"{p}.eigens.{k}": getattr(e, k) for p, e in out.items() for k in ("S_WC", "U_WC", "V_WC")}, cfg.cache_file
        )
    return out
