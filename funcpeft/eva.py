"""EVA (Explained Variance Adaptation, PEFT's `peft.tuners.lora.eva`), functionally.

    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=8, init_lora_weights="eva", ...))
    adapter = funcpeft.initialize_lora_eva_weights(pm, pm.base, dataloader)

For every adapted nn.Linear / GPT-2 Conv1D layer, an incremental PCA of the layer's inputs (the base model
runs on the dataloader's batches, cycled until the components converge: cosine similarity >= tau between
steps) gives its right-singular vectors; the rank budget (sum of the layers' r) is redistributed across
layers by explained variance, each layer getting at most round(r * rho). A layer's lora_A is its top
components (new_rank, in), lora_B is zero; a layer given rank 0 is no longer adapted. As in PEFT, the
adapter's config is updated: rank_pattern / alpha_pattern (alpha scaled by new_rank / r when
adjust_scaling_factors) and target_modules; funcpeft records the new config and plan in `pm` (for that
adapter name) and returns the new tree. The model is never hooked or modified (funcpeft._capture).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from itertools import cycle
from typing import Any

import torch
import torch.distributed as dist

from ._capture import hooked_forward
from ._config import EvaConfig, LoraConfig, init_mode
from ._ipca import IncrementalPCA
from ._plan import init_adapter, plan_adapter
from ._trees import AdapterTree
from .methods._patterns import rank_and_alpha
from .methods.base import LayerKind

RHO_THRESHOLD = 1000


# -- PEFT's default input preparation for language modelling ----------------------------------------------------
def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: Any) -> torch.Tensor:
    """Indices (n, 2) of the (batch, position) items used for the SVD: attention mask, and labels != label_mask_value."""
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and ("labels" in model_input):
        mask = torch.logical_and(mask, model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise TypeError(
        f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
        "please provide a custom prepare_layer_inputs_fn"
    )


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """The layer's input rows at the indices `prepare_model_inputs_fn_language_modeling` chose: (n, in)."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def prepare_layer_inputs_fn_default(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """All of the layer's input rows, flattened to (n, in) (PEFT's default without a prepare function)."""
    x = _first_tensor(layer_input, layer_name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


def forward_fn_dict(model: Callable[..., Any], inputs: Any) -> Any:
    return model(**inputs)


# -- hooks ----------------------------------------------------------------------------------------------------
class _Hook:
    def __init__(self, name: str, prepare: Callable[..., torch.Tensor], gather: bool):
        self.name, self.prepare, self.gather = name, prepare, gather
        self.model_input: Any = None

    def inputs(self, layer_input: Any) -> torch.Tensor:
        with torch.no_grad():
            x = self.prepare(layer_input, self.model_input, self.name)
        if not (dist.is_initialized() and self.gather):
            return x
        world = dist.get_world_size()
        local = torch.tensor([x.shape[0]], device=x.device)
        sizes = torch.empty(world, dtype=local.dtype, device=x.device)
        dist.all_gather_into_tensor(sizes, local)
        sizes_list = sizes.tolist()
        padded = x.new_zeros((max(sizes_list), *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([t[:n] for t, n in zip(gathered, sizes_list)], dim=0)


class _HashHook(_Hook):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self.hashes: list[int] = []

    def __call__(self, module: Any, layer_input: Any, output: Any) -> None:
        self.hashes.append(hash(tuple(self.inputs(layer_input).cpu().view(-1).tolist())))


class _SVDHook(_Hook):
    def __init__(self, n_components: int, sim_thresh: float, *args: Any):
        super().__init__(*args)
        self.n_components = n_components
        self.sim_thresh = sim_thresh
        self.svd = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: Any, layer_input: Any, output: Any) -> None:
        previous = None if self.svd.components_ is None else self.svd.components_.clone().detach()
        states = self.inputs(layer_input)
        if states.size(0) < self.n_components:
            print(f"skipping SVD for {self.name} because there are less than {self.n_components} examples")
            return
        self.svd.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        components = self.svd.components_
        assert components is not None
        if len(components.shape) == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = torch.nn.functional.cosine_similarity(components, previous) >= self.sim_thresh


class _Switch:
    """The forward hook on a layer: calls the current EVA hook while it is enabled (PEFT removes and re-adds handles)."""

    def __init__(self) -> None:
        self.hook: Any = None
        self.enabled = False

    def __call__(self, module: Any, layer_input: Any, output: Any) -> None:
        if self.enabled and self.hook is not None:
            self.hook(module, layer_input, output)


def _move(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})  # type: ignore[call-arg]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device", stacklevel=3)
    return inputs


def _eva_config(config: Any) -> EvaConfig:
    cfg = getattr(config, "eva_config", None)
    if not isinstance(config, LoraConfig) or not isinstance(cfg, EvaConfig):
        raise ValueError("EVA needs a funcpeft.LoraConfig with init_lora_weights='eva' (which sets its eva_config).")
    return cfg


# -- the SVD over the data ------------------------------------------------------------------------------------
@torch.no_grad()
def get_eva_state_dict(
    pm: Any,
    base: Mapping[str, torch.Tensor],
    dataloader: Iterable[Any],
    *,
    forward_fn: Callable[[Callable[..., Any], Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[..., torch.Tensor] | Mapping[str, Callable[..., torch.Tensor]] | None = (
        prepare_layer_inputs_fn_language_modeling
    ),
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = False,
) -> dict[str, torch.Tensor]:
    """Each adapted linear layer's top input components after EVA's rank redistribution (PEFT's
    `get_eva_state_dict`). The base model (`base`, no adapter) runs on the batches; nothing is modified.

    Args:
        pm: a FunctionalPeftModel whose adapter `adapter_name` has init_lora_weights="eva".
        base: `{param_name: Tensor}`, the base tree the batches run on (usually `pm.base`).
        dataloader: a sized iterable of batches (PEFT's `dataloader`); must not be empty.
        forward_fn: `forward_fn(model, inputs)` runs one batch; `model` is the model's call (default:
            `model(**inputs)`).
        prepare_model_inputs_fn: `(inputs, config) -> model_input`, PEFT's hook run once per batch (default:
            the language-modelling one, which keeps the attention mask's non-padding positions).
        prepare_layer_inputs_fn: `(layer_input, model_input, layer_name) -> (n, in)` rows of a layer's input
            used for the SVD, or a dict mapping module paths to such functions.
        adapter_name: the adapter whose config (eva_config, r, rank_pattern) and plan are used.
        gather_distributed_inputs: under torch.distributed, gather the rows of all ranks (PEFT's warning).
        show_progress_bar: print a tqdm progress bar over the batches.

    Returns:
        `{module path: components (new_rank, in)}`, the rows of lora_A for each adapted linear layer; ranks
        follow EVA's redistribution (a layer given rank 0 is no longer adapted).
    """
    config = pm.peft_config[adapter_name]
    eva = _eva_config(config)
    plan = pm.plans[adapter_name]
    forward_fn = forward_fn_dict if forward_fn is None else forward_fn
    if len(dataloader) == 0:  # type: ignore[arg-type]
        raise ValueError("dataloader is empty")
    if dist.is_initialized() and gather_distributed_inputs:
        warnings.warn(
            "torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA initialization "
            "will gather tensors from all ranks. Ensure the model does not receive the same inputs on different ranks.",
            stacklevel=2,
        )
    rho = eva.rho
    if rho > RHO_THRESHOLD:
        max_dim = max(max(t.shape) for t in base.values() if t.dim() > 0)
        rho = min(rho, max_dim // config.r)
    devices = {t.device for t in base.values() if t.device.type != "meta"}
    device = next(iter(devices)) if len(devices) == 1 else None
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}", stacklevel=2)

    def model_inputs(inputs: Any) -> Any:
        return prepare_model_inputs_fn(inputs, config) if prepare_model_inputs_fn is not None else deepcopy(inputs)

    layers = [
        p
        for p, e in plan.items()
        if e.spec is not None and not e.auxiliary and e.spec.kind in (LayerKind.LINEAR, LayerKind.CONV1D_HF)
    ]
    layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    switches = {p: _Switch() for p in layers}
    max_components: dict[str, int] = {}
    rank_budget = 0
    inputs = _move(next(iter(dataloader)), device)
    first_input = model_inputs(inputs)
    for name in layers:
        if layer_fns is not None:
            prepare = layer_fns.pop(name, None) or prepare_layer_inputs_fn_default
        else:
            prepare = prepare_layer_inputs_fn or prepare_layer_inputs_fn_default  # type: ignore[assignment]
        switches[name].hook = _HashHook(name, prepare, gather_distributed_inputs)
        switches[name].hook.model_input = first_input
        switches[name].enabled = True
        layer_rank = rank_and_alpha(config, name)[0]
        max_components[name] = round(layer_rank * rho)
        rank_budget += layer_rank
    if layer_fns:
        raise ValueError(
            "prepare_layer_inputs_fn is a mapping but the following module names were not found in the model: "
            f"{layer_fns.keys()}"
        )
    params = pm.fn.build_params(base, None)
    with hooked_forward(pm.model, params, training=False, forward_hooks=switches) as model_call:
        forward_fn(model_call, inputs)
        by_hash: dict[int, list[str]] = defaultdict(list)
        for name in layers:
            by_hash[switches[name].hook.hashes[0]].append(name)
        equal_inputs = [names for names in by_hash.values() if len(names) > 1]
        equal_inputs_map = {other: names[0] for names in equal_inputs for other in names[1:]}
        for names in equal_inputs:
            top = max(max_components[n] for n in names)
            for n in names:
                max_components[n] = top
        hooks: dict[str, _SVDHook] = {}
        for name in layers:
            switches[name].enabled = False
            if name in equal_inputs_map:
                continue
            hooks[name] = _SVDHook(
                max_components[name], eva.tau, name, switches[name].hook.prepare, gather_distributed_inputs
            )
            switches[name].hook, switches[name].enabled = hooks[name], True
        layer_hook_map = {**{n: n for n in hooks}, **equal_inputs_map}
        batches: Iterable[Any] = cycle(dataloader)
        bar = None
        if show_progress_bar and (not dist.is_initialized() or dist.get_rank() == 0):
            from tqdm import tqdm  # optional (the `examples` extra)

            batches = bar = tqdm(iter(batches), position=0, leave=False)
        convergence = dict.fromkeys(hooks, False)
        rank_dist = max_components.copy()
        for batch in batches:
            batch = _move(batch, device)
            hook_input = model_inputs(batch)
            for name, hook in hooks.items():
                converged = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not convergence[name] and converged and switches[name].enabled:
                    switches[name].enabled, convergence[name] = False, True
                    continue
                if convergence[name] and not converged:
                    switches[name].enabled, convergence[name] = True, False
                hook.model_input = hook_input
            if bar is not None:
                done = list(convergence.values()) + [convergence[v] for v in equal_inputs_map.values()]
                bar.set_description(f"{sum(done)}/{len(done)} layers have converged")
            if all(convergence.values()):
                break
            forward_fn(model_call, batch)
            if not all(h.svd.components_ is not None for h in hooks.values()):
                continue
            rank_dist = _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components)
    out = {}
    for name, rank in rank_dist.items():
        hook = hooks[layer_hook_map[name]]
        if not torch.all(hook.converged[:rank]):
            raise ValueError(f"Layer {name} has not converged but was assigned rank {rank}.")
        assert hook.svd.components_ is not None
        u = hook.svd.components_[:rank]
        if eva.whiten:
            u /= hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[name] = u if device is None else u.to(device)
    return out


def _rank_distribution(
    hooks: Mapping[str, _SVDHook],
    layer_hook_map: Mapping[str, str],
    equal_inputs_map: Mapping[str, str],
    rank_budget: int,
    max_components: Mapping[str, int],
) -> dict[str, int]:
    """PEFT's rank redistribution: the `rank_budget` components with the largest explained variance ratio."""
    exp_vars = {k: h.svd.explained_variance_ratio_[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook_map.items() for c in exp_vars[name]])
    idx = torch.stack(values).argsort(descending=True)
    counted = Counter([keys[i] for i in idx[:rank_budget]])
    counts = {k: counted.get(k, 0) for k in layer_hook_map}
    for k, k_hook in equal_inputs_map.items():  # the layer carrying the hook keeps the higher rank
        rank, rank_hook = counts[k], counts[k_hook]
        if rank_hook >= rank:
            continue
        counts[k_hook], counts[k] = rank, rank_hook
    return counts


# -- applying it ----------------------------------------------------------------------------------------------
def initialize_lora_eva_weights(
    pm: Any,
    base: Mapping[str, torch.Tensor],
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    forward_fn: Callable[[Callable[..., Any], Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable[..., torch.Tensor] | Mapping[str, Callable[..., torch.Tensor]] | None = (
        prepare_layer_inputs_fn_language_modeling
    ),
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = False,
    generator: torch.Generator | None = None,
) -> AdapterTree:
    """PEFT's `initialize_lora_eva_weights`: the EVA-initialised adapter tree for `pm`'s adapter `adapter_name`.

    Each adapted linear layer gets lora_A = its EVA components (new_rank, in) and lora_B = 0 (out, new_rank);
    other adapted layers (embeddings, convs: EVA does not support them) a fresh init_lora_weights=True init, with
    PEFT's warning. `pm.peft_config[adapter_name]` and `pm.plans[adapter_name]` are replaced by the updated config
    (rank_pattern, alpha_pattern, target_modules) and its plan, so that `pm.fn` and `pm.save_pretrained` take the
    returned tree. `eva_state_dict` (from `get_eva_state_dict`) skips the data pass. The model is not modified.

    Args:
        pm: a FunctionalPeftModel whose adapter `adapter_name` has init_lora_weights="eva".
        base: `{param_name: Tensor}`, the base tree the batches run on (usually `pm.base`).
        dataloader: the batches (see `get_eva_state_dict`); required unless `eva_state_dict` is given.
        eva_state_dict: `{module path: components (new_rank, in)}` from `get_eva_state_dict`.
        forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn, gather_distributed_inputs,
            show_progress_bar: as in `get_eva_state_dict`.
        adapter_name: the adapter to initialise.
        generator: the random generator for the fresh (non-EVA) layers' init.

    Returns:
        The adapter tree `{module path: {"lora_A": (new_rank, in), "lora_B": (out, new_rank), ...}}` for the
        updated config now in `pm.peft_config[adapter_name]`.
    """
    config = pm.peft_config[adapter_name]
    if not isinstance(config, LoraConfig) or init_mode(config.init_lora_weights) != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    eva = _eva_config(config)
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(
            pm,
            base,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    plan = pm.plans[adapter_name]
    adapted = [p for p, e in plan.items() if e.spec is not None and not e.auxiliary]  # trainable tokens stay
    unknown = sorted(set(eva_state_dict) - set(adapted))
    if unknown:
        raise ValueError(
            f"eva_state_dict has entries for modules adapter {adapter_name!r} does not adapt: {unknown[:5]}"
        )
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets, missing = [], []
    for name in adapted:
        r, alpha = rank_and_alpha(config, name)
        if name in eva_state_dict:
            new_rank = eva_state_dict[name].size(0)
            if new_rank == 0:
                continue
            if new_rank != r and eva.adjust_scaling_factors:
                alpha *= new_rank / r
            targets.append(name)
        else:
            missing.append(name)
            new_rank = r
        if new_rank != config.r:
            rank_pattern[name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config's own warnings were given when it was first made
        new_config = dataclasses.replace(
            config, target_modules=targets + missing, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
        )
        resolved_any, new_plan = plan_adapter(pm.model, new_config)
    resolved: Any = resolved_any
    resolved.modules_to_save = config.modules_to_save  # already resolved once (task-type modules included)
    resolved.base_model_name_or_path = config.base_model_name_or_path
    trainable = not config.inference_mode
    tree = init_adapter(pm.model, new_plan, pm.autocast_adapter_dtype, generator, trainable)
    for name in targets:
        a = tree[name]["lora_A"]
        tree[name]["lora_A"] = eva_state_dict[name].to(device=a.device, dtype=a.dtype).clone().requires_grad_(trainable)
        tree[name]["lora_B"] = torch.zeros_like(tree[name]["lora_B"]).requires_grad_(trainable)
    if missing:
        warnings.warn(
            "the following layers were initialized with init_lora_weights=True because they were not found in the eva "
            f"state_dict: {missing}\ncurrently the following lora modules are not supported by EVA: embedding, "
            "multi-head attention and conv layers",
            stacklevel=2,
        )
    pm.peft_config[adapter_name] = resolved
    pm.plans[adapter_name] = new_plan
    return tree
