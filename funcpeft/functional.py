"""The pure function `fn(base, adapter, *args, **kwargs)`.

`base` is `{param_name: Tensor}` (the model's parameters, detached, sharing storage), plus, for methods
with frozen tensors shared by all their layers (VeRA's vera_A / vera_B), entries under reserved keys
starting with `trees.SHARED_PREFIX` (e.g. '<shared>.vera_A.prng0.256x64'): frozen like the weights, never in
the adapter tree, and not counted as parameters (PEFT keeps them as buffers). `adapter` is the
plain adapter tree `{module_path: {param_name: Tensor}}` (see `funcpeft.trees`), `None` for the base
model, or `{adapter_name: tree, ...}` for several registered adapters at once (their terms are summed,
like PEFT's list of active adapters).

Each call runs `torch.func.functional_call` on a private *skeleton* of the model (a copy of the module
tree that shares every parameter and buffer with the model, so no weight is copied): the user's model is
never touched, and each thread gets its own skeleton, so concurrent calls cannot see each other's swaps.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._plan import LeafShapes, Plan, check_adapter_structure, check_leaves, leaf_shapes, shared_params
from .methods.base import LayerSpec, Method, Params, no_dropout
from .routing import PerExample, batch_size, check_batch, route_layer, split_routed
from .weights import AdaptedWeight, Applied


def _skeleton(model: nn.Module, training: bool) -> nn.Module:
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    skel = copy.deepcopy(model, memo)
    skel.train(training)
    return skel


class _Dropout:
    """Training-mode dropout on the adapter input, driven by an explicit generator or seed."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def __call__(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if p == 0.0:
            return x
        if self.generator is None:  # global RNG inside a seeded fork: works under vmap(randomness=...)
            return F.dropout(x, p, training=True)
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=self.generator)
        return x * keep / (1.0 - p)


class PeftFunction:
    """`fn(base, adapter, *args, dropout_rng=None, **kwargs) -> model(*args, **kwargs)` with the adapter applied.

    dropout_rng: None (default) runs the model in eval mode with no dropout anywhere: `fn` is
    deterministic. An `int` seed or a `torch.Generator` runs the model and the adapters' lora_dropout in
    training mode, reproducibly given the seed/generator. Use an int seed under `torch.func.vmap`
    (randomness="different" or "same"); a Generator is not supported by vmap's random ops.
    """

    def __init__(self, model: nn.Module, plans: dict[str, Plan], default_adapter: str, mixed: bool = False):
        self.plans = plans
        self.default_adapter = default_adapter
        self.mixed = mixed  # PeftMixedModel semantics: adapters apply in registration order
        self.model = model
        canon = {id(p): n for n, p in model.named_parameters()}
        # (every parameter name, its canonical name): tied weights appear once in `base`, under the first name
        self.aliases: tuple[tuple[str, str], ...] = tuple(
            (n, canon[id(p)]) for n, p in model.named_parameters(remove_duplicate=False)
        )
        self._model = model
        self._shapes: dict[str, tuple[Plan, LeafShapes]] = {}
        self._main = {t: _skeleton(model, t) for t in (False, True)}
        self._local = threading.local()  # per-thread skeletons, freed with their thread
        self._local.skeletons = dict(self._main)  # the creating thread uses the main ones

    def _get_skeleton(self, training: bool) -> nn.Module:
        """This thread's private copy of the module tree (compiled code uses the creating thread's)."""
        if torch.compiler.is_compiling():
            return self._main[training]
        skeletons = getattr(self._local, "skeletons", None)
        if skeletons is None:
            skeletons = self._local.skeletons = {}
        if training not in skeletons:
            skeletons[training] = _skeleton(self._model, training)  # reads the model only: no lock needed
        return skeletons[training]

    # -- the call ------------------------------------------------------------------------------------------
    def split_adapters(self, adapter: Any) -> list[tuple[str, Mapping[str, Any]]]:
        """[(adapter_name, tree)] for a single tree, a {name: tree} dict, or None."""
        if adapter is None:
            return []
        routed = split_routed(adapter, self.plans, self.default_adapter)  # per-example adapters (funcpeft.routing)
        if routed is not None:
            return routed
        if not isinstance(adapter, Mapping):
            raise TypeError(f"adapter must be a dict tree, a dict of adapter name -> tree, or None; got {type(adapter).__name__}")
        default_plan = self.plans.get(self.default_adapter, {})
        if adapter and all(k in self.plans for k in adapter) and not any(k in default_plan for k in adapter):
            names = [name for name in (self.plans if self.mixed else adapter) if adapter.get(name) is not None]
            return [(name, adapter[name]) for name in names]
        return [(self.default_adapter, adapter)]

    def _leaf_shapes(self, name: str) -> LeafShapes:
        """The shapes adapter `name`'s leaves must have (computed once per registered plan)."""
        plan = self.plans[name]
        cached = self._shapes.get(name)
        if cached is None or cached[0] is not plan:
            cached = self._shapes[name] = (plan, leaf_shapes(plan))
        return cached[1]

    def check_tree(
        self, name: str, tree: Any, base: Mapping[str, torch.Tensor], lead: tuple[int, ...] = ()
    ) -> None:
        """Adapter `name`'s tree has the plan's structure, and every leaf the right shape, dtype and device.

        base: `{parameter name: Tensor}` with every alias (for the layers' devices); lead: leading dims (K when routed).
        """
        plan = self.plans[name]
        check_adapter_structure(tree, plan, name)
        keys = {p: e.weight_key(p) for p, e in plan.items() if e.spec is not None}
        devices = {p: base[k].device for p, k in keys.items() if k in base}
        check_leaves(tree, self._leaf_shapes(name), devices, name, lead)

    def _check_base(self, base: Any) -> None:
        """A clear error for a base tree that is not one (e.g. base and adapter swapped) or lacks parameters."""
        if not isinstance(base, Mapping):
            raise TypeError(f"base must be a dict {{parameter name: Tensor}}, got {type(base).__name__}")
        first = next(iter(base.values()), None)
        if isinstance(first, Mapping):
            raise TypeError(
                "base looks like an adapter tree (its values are dicts of tensors): did you swap the arguments? "
                "Call fn(base, adapter, ...), with `base` the {parameter name: Tensor} dict get_peft_model returned."
            )
        missing = [alias for alias, canon in self.aliases if alias not in base and canon not in base]
        if missing:
            raise KeyError(
                f"base is missing {len(missing)} of the model's parameters, e.g. {missing[:3]}; pass the `base` "
                "get_peft_model returned (or a merged / modified copy of it with the same keys)"
            )

    def build_params(
        self, base: Mapping[str, torch.Tensor], adapter: Any, dropout: Any = no_dropout,
        inputs: tuple[tuple[Any, ...], Mapping[str, Any]] = ((), {}),
    ) -> dict[str, torch.Tensor]:
        """The `{name: tensor}` dict handed to functional_call: base values, overrides, adapted weights.

        inputs: the model call's (args, kwargs), to check per-example routing against the batch size.
        """
        self._check_base(base)
        # a tied name's own entry (a tie broken by a merge, see funcpeft.merge) wins over its canonical one
        params = {alias: base[alias] if alias in base else base[canon] for alias, canon in self.aliases}
        carried: dict[str, list[Applied]] = {}
        targeted: dict[str, list[tuple[Method, LayerSpec[Any], Params]]] = {}  # bare parameters (target_parameters)
        for name, tree in self.split_adapters(adapter):
            plan = self.plans.get(name)
            if plan is None:
                raise KeyError(f"Unknown adapter name {name!r}; registered: {sorted(self.plans)}")
            routing = tree if isinstance(tree, PerExample) else None
            tree = routing.stacked if routing is not None else tree
            batch = check_batch(routing, batch_size(*inputs)) if routing is not None else 0
            self.check_tree(name, tree, params, lead=(routing.k,) if routing is not None else ())
            for path, leaves in tree.items():
                entry = plan[path]
                if routing is not None and entry.overrides:
                    raise NotImplementedError(
                        f"per-example adapters: {path} overrides {entry.overrides} (modules_to_save or a trainable "
                        "bias); only method parameters can be routed per example"
                    )
                for pname in entry.overrides:
                    params[entry.base_key(path, pname)] = leaves[pname]
                if entry.spec is None:
                    continue
                method = entry.method
                own = {k: leaves[k] for k in entry.params}
                frozen = shared_params(entry, base)  # the same for every example: never routed
                if entry.parameter is not None:
                    if routing is not None:  # PEFT: "lora.ParamWrapper does not support mixed adapter batches yet."
                        raise NotImplementedError(
                            f"per-example adapters: {path} adapts the bare parameter {entry.parameter!r} "
                            "(target_parameters), whose value is one tensor for the whole batch; PEFT's "
                            "lora.ParamWrapper does not support mixed adapter batches either"
                        )
                    targeted.setdefault(entry.parameter, []).append((method, entry.spec, {**own, **frozen}))
                    continue
                if routing is not None:
                    applied = route_layer(entry.spec, method, own, frozen, routing, batch)
                else:
                    applied = Applied(entry.spec, {**own, **frozen}, method.forward, method.uses_result(entry.spec))
                carried.setdefault(f"{path}.weight", []).append(applied)
        for wname, adapters in carried.items():
            params[wname] = AdaptedWeight.wrap(params[wname], tuple(adapters), dropout)
        for pname, on_param in targeted.items():
            params[pname] = parameter_value(pname, on_param, params[pname])
        return params

    def __call__(self, base: Mapping[str, torch.Tensor], adapter: Any, *args: Any, dropout_rng: Any = None, **kwargs: Any) -> Any:
        training = dropout_rng is not None
        dropout: Any
        ctx: Any
        if isinstance(dropout_rng, torch.Generator):
            dropout, ctx = _Dropout(dropout_rng), nullcontext()
        elif training:
            if isinstance(dropout_rng, bool) or not isinstance(dropout_rng, int):
                raise TypeError(f"dropout_rng must be None, an int seed or a torch.Generator, got {dropout_rng!r}")
            dropout, ctx = _Dropout(None), _seeded(dropout_rng)
        else:
            dropout, ctx = no_dropout, nullcontext()
        params = self.build_params(base, adapter, dropout, (args, kwargs))
        skel = self._get_skeleton(training)
        with ctx:
            return torch.func.functional_call(skel, params, args, kwargs, tie_weights=False, strict=False)


def parameter_value(name: str, applied: list[tuple[Method, LayerSpec[Any], Params]], weight: torch.Tensor) -> torch.Tensor:
    """The value the model reads for bare parameter `name` with these adapters active (their method's rule)."""
    method = applied[0][0]
    if any(m is not method for m, _, _ in applied):
        raise NotImplementedError(
            f"adapters of different methods ({sorted({m.name for m, _, _ in applied})}) target the parameter {name!r}; "
            "a bare parameter takes one method's adapters"
        )
    assert method.parameter_value is not None  # planning refused the method otherwise
    return method.parameter_value([(spec, params) for _, spec, params in applied], weight)


class _seeded:
    """Fork the global RNG (CPU and the current accelerator) and seed it; restore on exit."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


def peft_function(pm: Any) -> PeftFunction:
    """The `PeftFunction` of what get_peft_model returned (or `pm` itself when it is one)."""
    fn = pm if isinstance(pm, PeftFunction) else getattr(pm, "fn", None)
    if not isinstance(fn, PeftFunction):
        raise TypeError(f"expected what funcpeft.get_peft_model returned (or its `fn`), got {type(pm).__name__}")
    return fn
