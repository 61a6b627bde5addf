"""AdaLoRA's training-time state as pure functions: the rank allocator and the orthogonal regulariser.

PEFT keeps both inside the model: `AdaLoraModel.update_and_allocate(step)` runs its `RankAllocator` (which
masks `lora_E` in place), and `AdaLoraModel.forward` adds `orth_reg_weight * regu_loss` to `outputs.loss`.
funcpeft makes them functions of the adapter tree, optax-style:

    pm = funcpeft.get_peft_model(model, funcpeft.AdaLoraConfig(init_r=12, target_r=8, total_step=T, ...))
    fn, base, adapter = pm
    config = pm.peft_config["default"]
    opt = funcpeft.optim.adamw(1e-3)
    opt_state = opt.init(adapter)
    alloc = funcpeft.rank_allocator(config)
    alloc_state = alloc.init(adapter)

    def loss_fn(adapter, batch):  # PEFT's loss (for a task-type PeftModel, see `orthogonal_regularizer`)
        return fn(base, adapter, **batch).loss + funcpeft.orthogonal_regularizer(adapter, config)

    for step, batch in enumerate(batches):
        loss, grads = funcpeft.value_and_grad(loss_fn)(adapter, batch)
        updates, opt_state = opt.update(grads, opt_state, adapter)
        adapter = funcpeft.optim.apply_updates(adapter, updates)
        alloc_state, adapter = alloc.update(alloc_state, adapter, grads, step)  # PEFT: update_and_allocate(step)

    pm.peft_config["default"] = funcpeft.with_rank_pattern(config, alloc_state)
    pm.save_pretrained(directory, adapter)  # writes only the kept ranks, like PEFT

With torch.optim on the leaves instead, `alloc.update` returns new `lora_E` tensors: copy them into the
optimiser's leaves (`with torch.no_grad(): leaf.copy_(new)`), as PEFT's in-place `masked_fill_` does.

Why here, beside the method, and not in funcpeft.optim: both read AdaLoRA's own leaves (lora_A / lora_B /
lora_E) and its config, while funcpeft.optim is method-agnostic (any tree, no config).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..configs import AdaLoraConfig, PeftConfig
from ..configs.adalora import RANK_PATTERN_SUFFIX

Tree = dict[str, dict[str, torch.Tensor]]
LEAVES = ("lora_A", "lora_B", "lora_E")  # PEFT's order of a layer's parameters (named_parameters)


class RankAllocatorState(NamedTuple):
    """The allocator's state (PEFT's `RankAllocator.exp_avg_ipt`, `exp_avg_unc` and `rank_pattern`).

    For each AdaLoRA layer `path` of rank r (in, out: the layer's input / output features):
      exp_avg_ipt[path]: {"lora_A": (r, in), "lora_B": (out, r), "lora_E": (r, 1)}: the EMA (beta1) of the
          sensitivity |p * grad| of each entry;
      exp_avg_unc[path]: the same shapes: the EMA (beta2) of the uncertainty |ipt - exp_avg_ipt|;
      rank_pattern[path]: (r,) bool, the ranks kept by the last allocation; None before the first one.
    Same dtype and device as the adapter's leaves; zeros after `init` and after the final allocation.
    """

    exp_avg_ipt: Tree
    exp_avg_unc: Tree
    rank_pattern: dict[str, torch.Tensor] | None


class RankAllocator(NamedTuple):
    """`init(adapter) -> state`, `update(state, adapter, grads, step) -> (state, adapter)` (see `rank_allocator`)."""

    init: Callable[[Mapping[str, Mapping[str, torch.Tensor]]], RankAllocatorState]
    update: Callable[..., tuple[RankAllocatorState, Tree]]


def _layers(adapter: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """Paths of the AdaLoRA layers of a tree (entries with a lora_E), in tree order (the model's)."""
    if not isinstance(adapter, Mapping):
        raise TypeError(
            f"expected an AdaLoRA adapter tree {{module path: {{'lora_A': ..., ...}}}}, got {type(adapter).__name__}"
        )
    return [p for p, e in adapter.items() if isinstance(e, Mapping) and "lora_E" in e]


def budget_schedule(config: AdaLoraConfig, init_bgt: int, target_bgt: int, step: int) -> tuple[int, bool]:
    """PEFT's `RankAllocator.budget_schedule`: (total rank budget, whether to mask at `step`).

    init_bgt until `tinit`, then a cubic decrease to target_bgt at `total_step - tfinal` (masking every
    `deltaT` steps), then target_bgt with masking on every step.
    """
    tinit, tfinal, total_step = config.tinit, config.tfinal, config.total_step
    assert total_step is not None  # AdaLoraConfig requires it
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % config.deltaT == 0


def _zeros(adapter: Mapping[str, Mapping[str, torch.Tensor]], layers: list[str]) -> Tree:
    return {p: {n: torch.zeros_like(adapter[p][n]).detach() for n in LEAVES} for p in layers}


def _check_step(step: Any) -> int:
    if (
        isinstance(step, torch.Tensor)
        and step.numel() == 1
        and not step.dtype.is_floating_point
        and step.dtype != torch.bool
    ):
        return int(step.item())
    if not isinstance(step, bool):
        try:
            return operator.index(step)  # int, numpy integers
        except TypeError:
            pass
    raise TypeError(f"step must be an int (PEFT's global_step), got {step!r}")


def _check_like(what: str, tree: Any, state: Tree) -> None:
    """`tree` has a tensor of the state's shape at every AdaLoRA leaf."""
    for path, entry in state.items():
        got = tree.get(path) if isinstance(tree, Mapping) else None
        for name, ref in entry.items():
            t = got.get(name) if isinstance(got, Mapping) else None
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape:
                found = f"Tensor{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"rank allocator: {what}[{path!r}][{name!r}] should be a tensor of shape {tuple(ref.shape)} "
                    f"(the adapter the state was made for), got {found}"
                )


def _scores(state: RankAllocatorState) -> dict[str, torch.Tensor]:
    """Each layer's triplet importance (r,): score(E) + mean score(A row) + mean score(B column) (PEFT's order)."""
    out = {}
    for path, ipt in state.exp_avg_ipt.items():
        unc = state.exp_avg_unc[path]
        comb_a = torch.mean(ipt["lora_A"] * unc["lora_A"], dim=1, keepdim=True)
        comb_b = torch.mean(ipt["lora_B"] * unc["lora_B"], dim=0, keepdim=False).view(-1, 1)
        ipt_ab = torch.cat([comb_a, comb_b], dim=1).sum(dim=1, keepdim=False)
        out[path] = (ipt["lora_E"] * unc["lora_E"]).view(-1) + ipt_ab.view(-1)
    return out


def _mask_to_budget(state: RankAllocatorState, init_bgt: int, budget: int) -> dict[str, torch.Tensor]:
    """PEFT's `mask_to_budget`: keep the ranks scoring above the (init_bgt - budget)-th smallest score."""
    scores = _scores(state)
    threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=init_bgt - budget)[0]
    return {path: ~(s <= threshold) for path, s in scores.items()}


def _masked(adapter: Mapping[str, Mapping[str, torch.Tensor]], pattern: Mapping[str, torch.Tensor]) -> Tree:
    """A new tree with lora_E zeroed where `pattern` is False (PEFT's `masked_fill_`); other leaves shared."""
    out = {p: dict(e) for p, e in adapter.items()}
    with torch.no_grad():
        for path, keep in pattern.items():
            e = adapter[path]["lora_E"]
            out[path]["lora_E"] = e.detach().masked_fill(~keep.view(-1, 1), 0.0).requires_grad_(e.requires_grad)
    return out


def rank_allocator(config: PeftConfig) -> RankAllocator:
    """PEFT's `RankAllocator` + `AdaLoraModel.update_and_allocate`, as a pair of pure functions.

    init(adapter) -> RankAllocatorState: zero EMAs shaped like the adapter's AdaLoRA leaves, no rank_pattern.

    update(state, adapter, grads, step) -> (state, adapter): call after the optimiser step, with the adapter
    AFTER the step and the gradients that step used (PEFT's `update_and_allocate(step)` after
    `optimizer.step()`, before `zero_grad()`). step: PEFT's global_step (an int). It
      - while step < total_step - tfinal: updates the EMAs, and on the budget schedule's masking steps
        zeroes the lora_E entries of the least important ranks, keeping `budget_schedule(step)` of them;
      - at step == total_step - tfinal: the final allocation to target_r * (number of layers) ranks (its
        mask is the final rank_pattern), and resets the EMAs;
      - after: zeroes lora_E with the final rank_pattern.
    The returned adapter is a new tree (only masked lora_E leaves are new tensors). `rank_pattern(state)`
    and `with_rank_pattern(config, state)` give the mask in PEFT's form.

    Args:
        config: the AdaLoraConfig (target_r, init_r, tinit, tfinal, deltaT, beta1, beta2, total_step).

    Returns:
        A `RankAllocator(init, update)` of pure functions; the state (`RankAllocatorState`) holds, per layer of
        rank r, EMAs shaped like lora_A (r, in), lora_B (out, r), lora_E (r, 1) and the kept ranks (r,) bool.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"rank_allocator needs an AdaLoraConfig, got {type(config).__name__}")
    if config.inference_mode:
        raise ValueError(
            "rank_allocator: config.inference_mode is True, so the adapter is frozen (PEFT creates no rank allocator "
            "for it); load it with is_trainable=True to keep training"
        )
    for name in ("beta1", "beta2"):  # PEFT asserts 0 < beta < 1 when it builds its allocator
        value = getattr(config, name)
        if not 0 < value < 1:
            raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1) for the rank allocator, got {value!r}")
    if config.deltaT <= 0:
        raise ValueError(
            f"AdaLoraConfig.deltaT must be a positive int (steps between allocations), got {config.deltaT}"
        )
    total_step = config.total_step
    assert total_step is not None
    final_step = total_step - config.tfinal
    beta1, beta2 = config.beta1, config.beta2

    def budgets(adapter: Mapping[str, Mapping[str, torch.Tensor]], layers: list[str]) -> tuple[int, int]:
        init_bgt = sum(int(adapter[p]["lora_A"].shape[0]) for p in layers)
        return init_bgt, config.target_r * len(layers)

    def init(adapter: Mapping[str, Mapping[str, torch.Tensor]]) -> RankAllocatorState:
        layers = _layers(adapter)
        if not layers:
            raise ValueError("rank_allocator.init: the adapter tree has no AdaLoRA layer (no entry holds a lora_E)")
        init_bgt, target_bgt = budgets(adapter, layers)
        if not 0 <= target_bgt < init_bgt:
            raise ValueError(
                f"rank_allocator: the final budget target_r * layers = {config.target_r} * {len(layers)} = {target_bgt} "
                f"must be >= 0 and smaller than the adapter's total rank {init_bgt} (init_r={config.init_r}): there is "
                "nothing to prune otherwise (PEFT fails at its first allocation)"
            )
        zeros = _zeros(adapter, layers)
        return RankAllocatorState(zeros, _zeros(adapter, layers), None)

    def update_ipt(state: RankAllocatorState, adapter: Any, grads: Any) -> RankAllocatorState:
        """PEFT's `update_ipt`: ipt = |p * grad|, then the two EMAs (the uncertainty uses the new exp_avg_ipt)."""
        _check_like("grads", grads, state.exp_avg_ipt)
        avg_ipt: Tree = {}
        avg_unc: Tree = {}
        with torch.no_grad():
            for path, entry in state.exp_avg_ipt.items():
                avg_ipt[path], avg_unc[path] = {}, {}
                for name in LEAVES:
                    ipt = (adapter[path][name] * grads[path][name]).abs().detach()
                    avg = beta1 * entry[name] + (1 - beta1) * ipt
                    avg_ipt[path][name] = avg
                    avg_unc[path][name] = beta2 * state.exp_avg_unc[path][name] + (1 - beta2) * (ipt - avg).abs()
        return RankAllocatorState(avg_ipt, avg_unc, state.rank_pattern)

    def update(state: RankAllocatorState, adapter: Any, grads: Any, step: Any) -> tuple[RankAllocatorState, Tree]:
        step = _check_step(step)
        _check_like("adapter", adapter, state.exp_avg_ipt)
        layers = list(state.exp_avg_ipt)
        init_bgt, target_bgt = budgets(adapter, layers)
        if step < final_step:
            state = update_ipt(state, adapter, grads)
            budget, mask_now = budget_schedule(config, init_bgt, target_bgt, step)
            if not mask_now:
                return state, {p: dict(e) for p, e in adapter.items()}
            pattern = _mask_to_budget(state, init_bgt, budget)
            return state._replace(rank_pattern=pattern), _masked(adapter, pattern)
        if step == final_step:  # PEFT: force_mask=True, then reset_ipt()
            budget, _ = budget_schedule(config, init_bgt, target_bgt, step)
            pattern = _mask_to_budget(state, init_bgt, budget)
            return RankAllocatorState(_zeros(adapter, layers), _zeros(adapter, layers), pattern), _masked(
                adapter, pattern
            )
        if state.rank_pattern is None:
            raise ValueError(
                f"rank allocator: step {step} is past total_step - tfinal = {final_step}, but no allocation has run yet "
                f"(the final one runs at step {final_step}): call update at every training step"
            )
        return state, _masked(adapter, state.rank_pattern)

    return RankAllocator(init, update)


def rank_pattern(state: RankAllocatorState, adapter_name: str | None = "default") -> dict[str, list[bool]] | None:
    """The kept ranks in PEFT's form (what PEFT's `peft_config[adapter_name].rank_pattern` holds after
    `update_and_allocate`).

    Args:
        state: the allocator's state (`rank_allocator(config).update`'s).
        adapter_name: the name in the keys; None: keys end in `.lora_E`, as in PEFT's files.

    Returns:
        `{'<path>.lora_E.<adapter_name>': [bool] * r}` (True: rank kept), or None before the first allocation.
    """
    if state.rank_pattern is None:
        return None
    tail = RANK_PATTERN_SUFFIX + (f".{adapter_name}" if adapter_name is not None else "")
    return {path + tail: [bool(b) for b in keep.tolist()] for path, keep in state.rank_pattern.items()}


def with_rank_pattern(config: PeftConfig, state: RankAllocatorState) -> AdaLoraConfig:
    """`config` with the allocator's rank_pattern: saving with it writes only the kept ranks.

    Args:
        config: the AdaLoraConfig the allocator runs with (not modified).
        state: the allocator's state.

    Returns:
        A new AdaLoraConfig whose rank_pattern is `rank_pattern(state, None)` (`.lora_E` keys, PEFT's files).
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"with_rank_pattern needs an AdaLoraConfig, got {type(config).__name__}")
    return dataclasses.replace(config, rank_pattern=rank_pattern(state, None))


def orthogonal_regularizer(adapter: Mapping[str, Mapping[str, torch.Tensor]], config: PeftConfig) -> torch.Tensor:
    """`orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F over every layer's lora_A, lora_B)`: a 0-d tensor.

    PEFT adds exactly this to `outputs.loss` inside `AdaLoraModel.forward` whenever the model returns a loss,
    so `fn(base, adapter, **batch).loss + orthogonal_regularizer(adapter, config)` is PEFT's loss (same
    terms, same order). Note that PEFT only goes through that forward for a task-type model
    (`task_type="CAUSAL_LM"`, ...): a plain `PeftModel` (task_type None) and a `PeftMixedModel` call the base
    model directly, and their loss has no regulariser. lora_A (r, in) -> A A^T (r, r); lora_B (out, r) -> B^T B.

    Args:
        adapter: the AdaLoRA adapter tree (entries without lora_E, e.g. modules_to_save copies, are skipped).
        config: its AdaLoraConfig (orth_reg_weight).

    Returns:
        A 0-d tensor, differentiable in every lora_A and lora_B.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"orthogonal_regularizer needs an AdaLoraConfig, got {type(config).__name__}")
    regu: torch.Tensor | None = None
    num_param = 0
    for entry in adapter.values():
        if "lora_E" not in entry:  # modules_to_save copies / trainable biases
            continue
        for name in ("lora_A", "lora_B"):
            p = entry[name]
            cov = p @ p.T if name == "lora_A" else p.T @ p
            norm = torch.norm(cov - torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device), p="fro")
            regu = norm if regu is None else regu + norm
            num_param += 1
    if regu is None:
        return torch.zeros(())
    return config.orth_reg_weight * (regu / num_param)
