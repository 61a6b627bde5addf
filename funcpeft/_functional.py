"""The pure function `fn(base, adapter, *args, **kwargs)`.

`base` is `{param_name: Tensor}` (the model's parameters, detached, sharing storage), plus, for methods
with frozen tensors shared by all their layers (VeRA's vera_A / vera_B), entries under reserved keys
starting with `trees.SHARED_PREFIX` (e.g. '<shared>.vera_A.prng0.256x64'): frozen like the weights, never in
the adapter tree, and not counted as parameters (PEFT keeps them as buffers). `adapter` is the
plain adapter tree `{module_path: {param_name: Tensor}}` (see `funcpeft._trees`), `None` for the base
model, or `{adapter_name: tree, ...}` for several registered adapters at once (their terms are summed,
like PEFT's list of active adapters).

Each eager call runs the model on its own *call skeleton*: a shallow copy of the module tree, built from
the model when the call starts (~3 us per module), whose modules hold this call's tensors (base weights,
AdaptedWeights, overrides) in their own `_parameters` dicts and share every other attribute value with the
model's modules. Nothing is swapped on a shared module, so concurrent calls (threads, compiled or eager)
cannot see each other, and the call's tensors stay bound until its autograd graph is gone (gradient
checkpointing recomputes with them).

What the model may change after `get_peft_model` — one rule, the same in every thread: module attributes
(`config`, flags such as `gradient_checkpointing`, `_gradient_checkpointing_func`, ...), forward /
pre-forward (with_kwargs too) / backward hooks (registered before or after `get_peft_model`; removing the
handle stops them) and the module structure are read from the model at call time. Parameters come from
`base` and the adapter, buffers from the model. Hooks receive the skeleton module as `module`. Attribute
values are the model's own objects: a forward that rebinds an attribute (`self.x = ...`) changes only the
skeleton, one that mutates a shared object in place changes the model's.

Under `torch.compile` (dynamo cannot trace module objects created while tracing) the call traces
`functional_call` on the model itself; the swaps and the eval-mode switch are symbolic and undone inside
the traced code, so the model is never changed. The model is read when the call is traced and dynamo
guards on what it read: a changed attribute retraces; hooks added or removed later are seen only if
torch guards on hooks (`torch._dynamo.config.skip_nnmodule_hook_guards` defaults to True, ignoring them, as
for any compiled model), and compiled hooks receive the model's modules. Compiled and eager calls run in
different threads at once, and so does a compile, except for models using `kernels`'
CompileableContextVar (transformers' Llama, Mistral, Qwen2, ...): an eager call of such a model in
another thread during a compile breaks the compile, with or without funcpeft (it follows the process-wide
`torch.compiler.is_compiling()` flag).

A model sharded with FSDP2's `fully_shard` runs as itself instead of on call skeletons, as FSDP gathers
weights into the model's own modules (funcpeft._fsdp; one call at a time per model).

Gradient checkpointing (`model.gradient_checkpointing_enable()`, before or after `get_peft_model`) works
as in transformers: layers are checkpointed when the model runs in training mode, i.e. when `fn` gets a
`dropout_rng` (PEFT's `model.train()`; in eval mode fn warns once that nothing is checkpointed). funcpeft
always runs it with `use_reentrant=False`, whatever the model was given: the reentrant variant needs
inputs that require grad and cannot be used with `torch.autograd.grad` (which `funcpeft.value_and_grad`
uses); the gradients are the same. transformers' `enable_input_require_grads` hook, which only the
reentrant variant needs, is left out of call skeletons (torch.func rejects its `requires_grad_`). A
recompute redraws the forward's dropout masks from copies of the call's generators (`funcpeft.rng`).
Inside torch.func transforms torch cannot checkpoint (grad/vjp reject saved-tensor hooks; a backward after
vmap cannot replay a vmapped layer): that raises a clear error.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ._fsdp import ShardedModel, check_not_sharded, check_plain_base
from ._plan import (
    LeafShapes,
    Plan,
    check_adapter_structure,
    check_leaves,
    check_stack,
    input_entry,
    input_method,
    layer_params,
    leaf_shapes,
    shared_params,
    with_shared,
)
from ._quant import bound_for_call, dequantize
from ._trees import PROMPT_PATH, SHARED_PATH
from ._weights import AdaptedWeight, Applied, apply_module, nesting_order
from .methods import weight_method
from .methods.base import (
    AroundContext,
    CallInputs,
    Generators,
    InputContext,
    LayerKind,
    LayerSpec,
    Method,
    ModelCall,
    ModuleAroundFn,
    ModuleForwardFn,
    Params,
    no_dropout,
    no_generator,
)
from .rng import CallRandomness, redirect
from .routing import PerExample, batch_size, check_batch, route_layer, route_module, split_routed

_MISSING = object()
_MODULE_TRAIN = nn.Module.train
_new = object.__new__


class Wrapped(NamedTuple):
    """A whole-module adapter applied in one call: `forward` (`Method.module_forward`: AdaptionPrompt's gated
    attention) post-processes the module's output; `around` (`Method.module_around` / `model_around`: ShadowPEFT)
    runs the module itself, with `ctx`."""

    spec: LayerSpec[Any]
    params: Params
    forward: ModuleForwardFn | None
    around: ModuleAroundFn | None = None
    ctx: AroundContext | None = None


Wraps = dict[str, list[Wrapped]]  # module path -> its whole-module adapters, in activation order
# a weight adapted inside its owner's forward: (module, parameter name, adapted weight, the model's own parameter)
Adapted = tuple[nn.Module, str, AdaptedWeight, Any]


class PeftFunction:
    """`fn(base, adapter, *args, dropout_rng=None, **kwargs) -> model(*args, **kwargs)` with the adapter applied.

    dropout_rng: None (default) runs the model in eval mode with no dropout anywhere: `fn` is
    deterministic. An `int` seed or a `torch.Generator` runs the model in training mode (its own dropout,
    the adapters' lora_dropout, gradient checkpointing if enabled on the model), reproducibly given the
    seed/generator and without touching the process-global RNG (see `funcpeft.rng`). An int seed is
    thread-safe; both work under `torch.func.vmap(randomness="different" | "same")`.
    """

    def __init__(
        self,
        model: nn.Module,
        plans: dict[str, Plan],
        default_adapter: str,
        mixed: bool = False,
        layer_replication: list[list[int]] | None = None,
    ):
        self.plans = plans
        self.default_adapter = default_adapter
        self.mixed = mixed  # PeftMixedModel semantics: adapters apply in registration order
        # `model` is then the replicated structure (funcpeft._replicate); merging is refused, as in PEFT
        self.layer_replication = layer_replication
        self.model = model
        canon = {id(p): n for n, p in model.named_parameters()}
        # (every parameter name, its canonical name): tied weights appear once in `base`, under the first name
        self.aliases: tuple[tuple[str, str], ...] = tuple(
            (n, canon[id(p)]) for n, p in model.named_parameters(remove_duplicate=False)
        )
        self._model = model
        # filled here, not on first use: a compiled call must find it in the same state every time (no recompile)
        self._shapes: dict[str, tuple[Plan, LeafShapes]] = {n: (p, leaf_shapes(p)) for n, p in plans.items()}
        self._warned_eval_checkpointing = False
        names: dict[int, list[str]] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            names.setdefault(id(m), []).append(path)
        # module path -> its other names, for modules registered under several (one Linear as `a` and `b`)
        self._aliased: dict[str, list[str]] = {
            p: [q for q in ps if q != p] for ps in names.values() if len(ps) > 1 for p in ps
        }
        # a model sharded with FSDP2's fully_shard runs as itself, not on call skeletons (funcpeft._fsdp)
        self.sharded = ShardedModel.of(model)
        self.capturing = OutputCapturing.of(model)

    # -- the call ------------------------------------------------------------------------------------------
    def split_adapters(self, adapter: Any) -> list[tuple[str, Mapping[str, Any]]]:
        """[(adapter_name, tree)] for a single tree, a {name: tree} dict, or None."""
        if adapter is None:
            return []
        routed = split_routed(adapter, self.plans, self.default_adapter)  # per-example adapters (funcpeft.routing)
        if routed is not None:
            return routed
        if not isinstance(adapter, Mapping):
            raise TypeError(
                f"adapter must be a dict tree, a dict of adapter name -> tree, or None; got {type(adapter).__name__}"
            )
        default_plan = self.plans.get(self.default_adapter, {})
        if adapter and all(k in self.plans for k in adapter) and not any(k in default_plan for k in adapter):
            names = [name for name in (self.plans if self.mixed else adapter) if adapter.get(name) is not None]
            self._check_copies(names)
            return [(name, adapter[name]) for name in names]
        return [(self.default_adapter, adapter)]

    def _check_copies(self, names: list[str]) -> None:
        """PEFT's LN tuning runs and merges one adapter at a time (`Method.copies_modules`)."""
        copying = [n for n in names if any(e.copied_by for e in self.plans[n].values())]
        if copying and len(names) > 1:
            method = next(e.copied_by for e in self.plans[copying[0]].values() if e.copied_by)
            raise ValueError(
                f"Trying to use {len(names)} adapters at once ({names}), but {weight_method(method).peft_type} "
                f"({copying}) replaces whole modules' parameters and does not allow inference or merging with more "
                "than one adapter at a time (PEFT's rule)"
            )

    def has_input_adapter(self, adapter: Any) -> bool:
        """Whether the call's adapters include an input-level (prompt-learning) one."""
        return any(n in self.plans and input_entry(self.plans[n]) is not None for n, _ in self.split_adapters(adapter))

    def _leaf_shapes(self, name: str) -> LeafShapes:
        """The shapes adapter `name`'s leaves must have (computed once per registered plan)."""
        plan = self.plans[name]
        cached = self._shapes.get(name)
        if cached is None or cached[0] is not plan:
            cached = (plan, leaf_shapes(plan))
            if not torch.compiler.is_dynamo_compiling():  # a traced write would make dynamo guard on the cache's state
                self._shapes[name] = cached
        return cached[1]

    def check_tree(self, name: str, tree: Any, base: Mapping[str, torch.Tensor], lead: tuple[int, ...] = ()) -> None:
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

    def call_kwargs(self) -> frozenset[str]:
        """Keyword arguments of `fn` that the registered adapters' methods consume (PEFT's special forward
        arguments, e.g. aLoRA's `alora_offsets`): they never reach the model, as in PEFT."""
        out: frozenset[str] = frozenset()
        for plan in self.plans.values():
            for e in plan.values():
                if e.spec is not None:
                    out |= e.method.call_kwargs
                elif e.prompt is not None:
                    out |= input_method(e).call_kwargs
        return out

    def apply_inputs(
        self,
        base: Mapping[str, torch.Tensor],
        adapter: Any,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        training: bool = False,
        dropout: Any = no_dropout,
        generating: bool = False,
    ) -> tuple[ModelCall, Any]:
        """The model call rewritten by the call's input-level adapter (prompt learning; see `InputMethod`), and
        `output -> output` to finish it; the call unchanged (and the identity) when there is none.

        A `per_example` prompt adapter: each example gets the prompts of its stacked tree (`encode` vmapped over
        the K trees); the virtual-token counts of all examples are equal by construction, but "no adapter" (-1)
        for some examples would change their length, and is refused. generating: rewrite the arguments of the
        model's `generate` instead (`InputMethod.prepare_generate`; funcpeft.generate).
        """
        call = ModelCall(tuple(args), dict(kwargs))
        prompted = [
            (name, tree)
            for name, tree in self.split_adapters(adapter)
            if name in self.plans and input_entry(self.plans[name]) is not None
        ]
        if not prompted:
            return call, _identity
        if len(self.split_adapters(adapter)) > 1:
            names = [n for n, _ in self.split_adapters(adapter)]
            raise NotImplementedError(
                f"a prompt-learning adapter ({prompted[0][0]!r}) runs alone: got adapters {names} in one call (PEFT "
                "applies one active prompt-learning adapter per forward)"
            )
        if self.sharded is not None:
            self.sharded.refuse("a prompt-learning adapter")
        self._check_base(base)
        name, tree = prompted[0]
        entry = input_entry(self.plans[name])
        assert entry is not None and entry.prompt is not None
        method, spec = input_method(entry), entry.prompt[1]
        ctx = InputContext(self._model, base, training, dropout)
        if isinstance(tree, PerExample):
            routing = tree
            self.check_tree(name, routing.stacked, base, lead=(routing.k,))
            batch = check_batch(routing, batch_size(args, kwargs))
            below = routing.index is not None and (not _value_checks() or bool((routing.index < 0).any()))
            if routing.any_base and below:
                raise NotImplementedError(
                    f"per-example prompt-learning adapter {name!r}: some examples use no adapter (-1), which would give "
                    "them a different length (no virtual tokens); route every example to a prompt, or call fn twice"
                )
            stacked = routing.stacked[PROMPT_PATH]
            encoded = torch.func.vmap(lambda p: method.encode(spec, p, call, ctx), randomness="different")(stacked)
            index = routing.index if routing.index is not None else torch.arange(routing.k, device=encoded.device)
            prompts = encoded[index, torch.arange(batch, device=encoded.device)]
        else:
            self.check_tree(name, tree, base)
            prompts = method.encode(spec, tree[PROMPT_PATH], call, ctx)
        if generating:
            if method.prepare_generate is None:
                raise NotImplementedError(f"funcpeft.generate: {method.peft_type} adapters cannot generate")
            return method.prepare_generate(spec, prompts, call, ctx), functools.partial(
                method.finish_generate, spec, call
            )
        new = method.prepare(spec, prompts, call, ctx)
        return new, functools.partial(method.finish, spec, new)

    def build_params(
        self,
        base: Mapping[str, torch.Tensor],
        adapter: Any,
        dropout: Any = no_dropout,
        inputs: tuple[tuple[Any, ...], Mapping[str, Any]] = ((), {}),
        generator: Generators = no_generator,
        wrapped: Wraps | None = None,
    ) -> dict[str, torch.Tensor]:
        """The `{name: tensor}` dict handed to functional_call: base values, overrides, adapted weights.

        inputs: the model call's (args, kwargs), to check per-example routing against the batch size and for
        methods' per-call data (`Method.prepare_call`); generator: the call's randomness (OpContext.generator).
        wrapped: filled with the whole-module adapters of the call (`Method.module_forward`) for the caller to
        apply around their modules' forwards; None: the caller cannot, and such an adapter raises.
        """
        self._check_base(base)
        # a tied name's own entry (a tie broken by a merge, see funcpeft.merge) wins over its canonical one
        params = {alias: base[alias] if alias in base else base[canon] for alias, canon in self.aliases}
        carried: dict[str, list[Applied]] = {}
        applies_in: dict[str, str] = {}  # weight name -> the module whose forward uses it, when not its own
        targeted: dict[str, list[tuple[Method, LayerSpec[Any], Params]]] = {}  # bare parameters (target_parameters)
        adapters = self.split_adapters(adapter)
        read = self._read_adapters(adapters)
        for name, tree in adapters:
            if name in read and name in self.plans and not isinstance(tree, PerExample):
                self.check_tree(name, tree, params)
        model_kwargs = {k: v for k, v in inputs[1].items() if k not in self.call_kwargs()}
        call = CallInputs(inputs[0], inputs[1], dropout is not no_dropout, generator)
        for name, tree in adapters:
            if name in read:  # applied through the adapter that reads it (Arrow's experts), as in PEFT
                continue
            plan = self.plans.get(name)
            if plan is None:
                raise KeyError(f"Unknown adapter name {name!r}; registered: {sorted(self.plans)}")
            routing = tree if isinstance(tree, PerExample) else None
            tree = routing.stacked if routing is not None else tree
            batch = check_batch(routing, batch_size(inputs[0], model_kwargs)) if routing is not None else 0
            self.check_tree(name, tree, params, lead=(routing.k,) if routing is not None else ())
            prepared: dict[str, Mapping[str, Any]] = {}
            scope: dict[str, Any] = {}  # this adapter's arounds' per-call state (AroundContext.scope)
            arounds = [p for p, e in plan.items() if e.spec is not None and e.method.module_around is not None]
            for path, leaves in tree.items():
                entry = plan[path]
                if routing is not None and entry.overrides:
                    what = "modules_to_save or a trainable bias"
                    if entry.copied_by:
                        what = f"{weight_method(entry.copied_by).peft_type} replaces its parameters"
                    raise NotImplementedError(
                        f"per-example adapters: {path} overrides {entry.overrides} ({what}); only method parameters "
                        "can be routed per example"
                    )
                for pname in entry.overrides:
                    params[entry.base_key(path, pname)] = leaves[pname]
                if entry.spec is None:
                    continue
                method = entry.method
                own = {k: leaves[k] for k in entry.params}
                own.update({k: tree[SHARED_PATH][k] for k in entry.shared})  # trainable, so routed with the rest
                own.update({k: tree[source][k] for k, source in entry.borrowed})  # another layer's (Method.shares)
                frozen = shared_params(entry, base)  # the same for every example: never routed
                if entry.spec.kind is LayerKind.MODULE:
                    ctx = None
                    if method.module_around is not None:
                        ctx = AroundContext(scope, arounds.index(path), len(arounds), dropout, generator, _run_module)
                    self._wrap(wrapped, name, path, entry.spec, {**own, **frozen}, method, routing, ctx)
                    continue
                if entry.parameter is not None:
                    if routing is not None:  # PEFT: "lora.ParamWrapper does not support mixed adapter batches yet."
                        raise NotImplementedError(
                            f"per-example adapters: {path} adapts the bare parameter {entry.parameter!r} "
                            "(target_parameters), whose value is one tensor for the whole batch; PEFT's "
                            "lora.ParamWrapper does not support mixed adapter batches either"
                        )
                    targeted.setdefault(entry.parameter, []).append((method, entry.spec, {**own, **frozen}))
                    continue
                data = None
                if method.prepare_call is not None:
                    if method.name not in prepared:
                        prepared[method.name] = method.prepare_call(self._layers(name, tree, base, method), call)
                    data = prepared[method.name].get(path)
                peers = self._peers(name, path, entry.spec, method, adapters)
                if routing is not None and peers:
                    raise NotImplementedError(
                        f"per-example adapters: adapter {name!r} ({method.name}) reads the adapters "
                        f"{sorted(peers)} at {path}; it cannot be routed per example"
                    )
                # the layer itself, then layers tied to it applying its params through `Method.tie` (PlanEntry.tied)
                layers = [(path, entry.spec, own)]
                if entry.tied:
                    assert method.tie is not None
                    tied_own = method.tie.params(own)
                    layers += [(tie.path, tie.spec, tied_own) for tie in entry.tied]
                for lpath, spec, mine in layers:
                    if routing is not None:
                        applied = route_layer(spec, method, mine, frozen, routing, batch)._replace(
                            call=data, path=lpath
                        )
                    else:
                        applied = Applied(
                            spec, {**mine, **frozen}, method.forward, method.uses_result(spec), data, lpath, peers
                        )
                    carried.setdefault(f"{lpath}.{spec.weight_name}", []).append(applied)
                if entry.applies_in is not None:
                    applies_in[f"{path}.{entry.spec.weight_name}"] = entry.applies_in
            owner = plan[SHARED_PATH].owner if SHARED_PATH in plan else None
            if owner is not None and weight_method(owner.method).model_around is not None:  # around the whole model
                ctx = AroundContext(scope, 0, 0, dropout, generator, _run_module)
                self._wrap(wrapped, name, "", owner, dict(tree[SHARED_PATH]), weight_method(owner.method), routing, ctx)
        for wraps in (wrapped or {}).values():
            check_stack(tuple(w.spec for w in wraps))
        for wname, applied_list in carried.items():
            check_stack(tuple(a.spec for a in applied_list))
            params[wname] = AdaptedWeight.wrap(
                params[wname], nesting_order(applied_list), dropout, generator, applies_in.get(wname)
            )
        for pname, on_param in targeted.items():
            params[pname] = parameter_value(pname, on_param, params[pname])
        return params

    @staticmethod
    def _wrap(
        wrapped: Wraps | None,
        name: str,
        path: str,
        spec: LayerSpec[Any],
        params: Params,
        method: Method,
        routing: PerExample | None,
        ctx: AroundContext | None = None,
    ) -> None:
        """Record adapter `name`'s whole-module adapter at `path` (`Method.module_forward`, or with `ctx` the
        `module_around` / at path "" the `model_around`) for the call."""
        forward = method.module_forward
        around = (method.model_around if path == "" else method.module_around) if ctx is not None else None
        if routing is not None:
            if around is not None:
                raise NotImplementedError(
                    f"per-example adapters cannot route adapter {name!r} ({method.peft_type}): it runs the whole "
                    f"module {path or '(the model)'!r} itself with a state carried through the call (call fn with "
                    "one adapter tree per batch)"
                )
            if method.module_forward_per_example is None:
                raise NotImplementedError(
                    f"per-example adapters: adapter {name!r} ({method.peft_type}) adapts the whole module {path!r} "
                    "and has no per-example forward; call fn with one adapter tree (or vmap over stacked trees)"
                )
            forward = route_module(method.module_forward_per_example, routing)
        if wrapped is None:
            raise NotImplementedError(
                f"adapter {name!r} ({method.peft_type}) adapts the whole module {path!r} by wrapping its forward, "
                "which this way of running the model (an FSDP2-sharded model, or a helper reading only the tensors) "
                "does not support"
            )
        if around is not None:
            wrapped.setdefault(path, []).append(Wrapped(spec, params, None, around, ctx))
            return
        assert forward is not None
        wrapped.setdefault(path, []).append(Wrapped(spec, params, forward))

    def _layers(
        self, name: str, tree: Mapping[str, Any], base: Mapping[str, torch.Tensor], method: Method
    ) -> dict[str, tuple[LayerSpec[Any], Params]]:
        """Adapter `name`'s layers of `method` with their params (own, shared and frozen), for prepare_call."""
        plan = self.plans[name]
        out: dict[str, tuple[LayerSpec[Any], Params]] = {}
        for path in tree:
            e = plan[path]
            if e.spec is not None and e.method is method:
                out[path] = (e.spec, layer_params(e, with_shared(tree, path, e), base))
        return out

    def _read_adapters(self, adapters: list[tuple[str, Any]]) -> set[str]:
        """The adapters of this call that another one of the call reads (`Method.reads_adapters`)."""
        read: set[str] = set()
        for name, _ in adapters:
            for e in self.plans.get(name, {}).values():
                if e.spec is not None and e.method.reads_adapters is not None:
                    read.update(e.method.reads_adapters(e.spec))
        return read

    def _peers(
        self, name: str, path: str, spec: LayerSpec[Any], method: Method, adapters: list[tuple[str, Any]]
    ) -> dict[str, tuple[LayerSpec[Any], Params]]:
        """{peer: (its spec, its params) at `path`} for the adapters `method` reads (empty for most methods)."""
        if method.reads_adapters is None:
            return {}
        trees = dict(adapters)
        out = {}
        for peer in method.reads_adapters(spec):
            tree = trees.get(peer)
            if tree is None or isinstance(tree, PerExample):
                raise ValueError(
                    f"adapter {name!r} ({method.name}) reads adapter {peer!r} at {path}, but the call does not pass "
                    f"its tree: call fn(base, {{{name!r}: tree, {peer!r}: tree_{peer}, ...}}, ...) with every adapter "
                    f"it reads ({list(method.reads_adapters(spec))}); registered: {sorted(self.plans)}"
                )
            entry = self.plans[peer].get(path)
            if entry is None or entry.spec is None or path not in tree:
                raise ValueError(
                    f"adapter {name!r} ({method.name}) reads adapter {peer!r} at {path}, which {peer!r} does not adapt"
                )
            out[peer] = (entry.spec, {k: tree[path][k] for k in entry.params})
        return out

    def __call__(
        self, base: Mapping[str, torch.Tensor], adapter: Any, *args: Any, dropout_rng: Any = None, **kwargs: Any
    ) -> Any:
        rng = _randomness(dropout_rng)
        generator: Generators = no_generator if rng is None else rng.generator
        dropout = no_dropout if rng is None else rng.dropout
        call, finish = self.apply_inputs(base, adapter, args, kwargs, rng is not None, dropout)
        if finish is not _identity:
            return finish(self._call(base, adapter, call.args, dict(call.kwargs), rng, generator, dropout))
        return self._call(base, adapter, args, kwargs, rng, generator, dropout)

    def _call(
        self,
        base: Mapping[str, torch.Tensor],
        adapter: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rng: CallRandomness | None,
        generator: Generators,
        dropout: Any,
    ) -> Any:
        consumed = self.call_kwargs()  # methods' own arguments (aLoRA's alora_offsets) never reach the model
        model_kwargs = {k: v for k, v in kwargs.items() if k not in consumed}
        if self.sharded is not None:
            build = functools.partial(
                self.build_params, adapter=adapter, dropout=dropout, inputs=(args, kwargs), generator=generator
            )
            return self.sharded.call(build, base, args, model_kwargs, rng, _checkpoint, _owner_forward)
        check_not_sharded(self._model)
        if not torch.compiler.is_dynamo_compiling():
            check_plain_base(base, self._model)
            if self.capturing is not None:
                self.capturing.install_if_asked(model_kwargs)
        wrapped: Wraps = {}
        params = self.build_params(base, adapter, dropout, (args, kwargs), generator, wrapped)
        kwargs = model_kwargs
        # is_dynamo_compiling, not is_compiling: the latter is True process-wide, in every thread, while any
        # thread compiles (torch 2.13), and would send other threads' eager calls down the traced path
        if torch.compiler.is_dynamo_compiling():
            if self._aliased and any(
                type(t) is AdaptedWeight and n.rpartition(".")[0] in self._aliased for n, t in params.items()
            ):
                return self._eager_call(params, rng, args, kwargs, wrapped)  # a graph break, see _eager_call
            return _traced_call(self._model, params, args, kwargs, wrapped)
        return self._run(params, rng, args, kwargs, wrapped)

    def _run(
        self, params: dict[str, torch.Tensor], rng: CallRandomness | None, args: tuple, kwargs: dict, wrapped: Wraps
    ) -> Any:
        """The eager call: the model run on a call skeleton holding `params` (and `wrapped` around its modules)."""
        call = _Call(params, rng, wrapped)
        skel = call.skeleton(self._model)
        if call.checkpointing and rng is None and not self._warned_eval_checkpointing and torch.is_grad_enabled():
            self._warned_eval_checkpointing = True
            warnings.warn(
                "funcpeft: gradient checkpointing is enabled on the model, but fn runs it in eval mode (no dropout_rng), "
                "where transformers does not checkpoint: no activation memory is saved. Pass dropout_rng=<seed> to "
                "train in training mode (with checkpointing), as PEFT does after model.train().",
                stacklevel=2,
            )
        if rng is None:
            return skel(*args, **kwargs)
        with redirect(rng):
            return skel(*args, **kwargs)

    def bound_model(
        self,
        base: Mapping[str, torch.Tensor],
        adapter: Any,
        inputs: tuple[tuple[Any, ...], Mapping[str, Any]] = ((), {}),
    ) -> nn.Module:
        """The model with `base` and `adapter` bound, in eval mode: a fresh call skeleton (see the module docstring).

        For code that calls the model's other methods (`generate`) rather than its forward. Like a call of fn,
        it reads the model now and shares every attribute value and buffer with it; setting an attribute on it
        changes only the skeleton. inputs: the calls' (args, kwargs), to check per-example routing's length.
        """
        if self.sharded is not None:
            self.sharded.refuse("generate (a bound model)")
        if self.capturing is not None:
            self.capturing.install_if_asked(inputs[1])
        wrapped: Wraps = {}
        params = self.build_params(base, adapter, no_dropout, inputs, wrapped=wrapped)
        return _Call(params, None, wrapped).skeleton(self._model)

    @torch.compiler.disable(
        reason="funcpeft: a targeted module is registered in the model under several names; PEFT adapts it only under "
        "the targeted one, which a traced call (running the model's own modules) cannot tell apart: run eagerly"
    )
    def _eager_call(
        self, params: dict[str, torch.Tensor], rng: CallRandomness | None, args: tuple, kwargs: dict, wrapped: Wraps
    ) -> Any:
        return self._run(params, rng, args, kwargs, wrapped)


def _identity(output: Any) -> Any:
    return output


def _value_checks() -> bool:
    """Value checks need concrete tensors: not while compiling or inside a torch.func transform."""
    return not torch.compiler.is_dynamo_compiling() and torch._C._functorch.peek_interpreter_stack() is None


def _run_module(module: nn.Module, weights: dict[str, torch.Tensor], training: bool, kwargs: dict[str, Any]) -> Any:
    """`AroundContext.run`: `module(**kwargs)` on a call skeleton holding `weights` (the module is not changed)."""
    skel = _Call(weights, None).skeleton(module)
    if training:
        skel.train(True)
    return skel(**kwargs)


def _traced_call(
    model: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict, wrapped: Wraps | None = None
) -> Any:
    """The eval-mode call as torch.compile traces it: functional_call on the model itself.

    Dynamo cannot trace a call skeleton (module objects created while tracing have no source). Under
    dynamo, functional_call's swaps (and the eval-mode switch) are symbolic and undone inside the traced
    code, so the model is never changed, at trace time or when the compiled code runs; and dynamo guards on
    the model's attributes and hooks it read, so a later change retraces.
    """
    flipped = [m for m in model.modules() if m.training]
    hooked = [
        (m, m._forward_hooks) for m in model.modules() if any(_input_grad_hook(h) for h in m._forward_hooks.values())
    ]
    owners: dict[str, list[Adapted]] = {}
    for name, t in params.items():
        if type(t) is AdaptedWeight:  # as in call skeletons: adapted only inside the owner's forward
            path, _, pname = name.rpartition(".")
            m = model.get_submodule(path)
            owners.setdefault(t.applies_in or path, []).append((m, pname, t, m._parameters[pname]))
    for path in wrapped or {}:  # whole-module adapters wrap their module's forward the same way
        owners.setdefault(path, [])
    plain = {name: t.weight if type(t) is AdaptedWeight else t for name, t in params.items()}
    swapped = [(m, m.__dict__.get("forward", _MISSING)) for m in (model.get_submodule(p) for p in owners)]
    for m in flipped:
        m.training = False
    for m, hooks in hooked:  # as in call skeletons (see _input_grad_hook)
        m._forward_hooks = type(hooks)((k, h) for k, h in hooks.items() if not _input_grad_hook(h))
    for (m, own), (path, adapted) in zip(swapped, owners.items()):
        wraps = (wrapped or {}).get(path, [])
        m.__dict__["forward"] = _owner_forward(adapted, m.forward if own is _MISSING else own, wraps, m)
    try:
        return torch.func.functional_call(model, plain, args, kwargs, tie_weights=False, strict=False)
    finally:
        for m in flipped:
            m.training = True
        for m, hooks in hooked:
            m._forward_hooks = hooks
        for m, own in swapped:
            if own is _MISSING:
                m.__dict__.pop("forward")
            else:
                m.__dict__["forward"] = own


def _randomness(dropout_rng: Any) -> CallRandomness | None:
    if dropout_rng is None:
        return None
    if torch.compiler.is_dynamo_compiling():
        raise NotImplementedError(
            "funcpeft: fn(..., dropout_rng=...) cannot be compiled (torch.compile does not trace private "
            "torch.Generators); compile the eval-mode call (no dropout_rng), or run the training-mode call eagerly"
        )
    if isinstance(dropout_rng, torch.Generator):
        return CallRandomness(user_generator=dropout_rng)
    if isinstance(dropout_rng, CallRandomness):  # a caller's own, shared by several calls (X-LoRA's two passes)
        return dropout_rng
    if isinstance(dropout_rng, bool) or not isinstance(dropout_rng, int):
        raise TypeError(f"dropout_rng must be None, an int seed or a torch.Generator, got {dropout_rng!r}")
    return CallRandomness(seed=dropout_rng)


class _Call:
    """One call's skeleton builder: the tensors to bind, the randomness, and what the build saw."""

    def __init__(self, params: dict[str, torch.Tensor], rng: CallRandomness | None, wrapped: Wraps | None = None):
        self.params = params
        self.wrapped = dict(wrapped or {})  # popped as their modules are copied: what is left was not found
        self.rng = rng
        self.training = rng is not None
        self.bound = 0
        self.checkpointing = False
        self.custom_train = False
        # owner path -> [(skeleton module, parameter name, adapted weight, the model's own parameter)]: filled by a
        # module and its children
        self.adapted: dict[str, list[Adapted]] = {}

    def skeleton(self, model: nn.Module) -> nn.Module:
        skel = self._copy(model, "")
        if self.bound != len(self.params) or self.wrapped:
            self._unbound(model)
        if self.custom_train:  # a module overrides train() (e.g. keeps a frozen part in eval): let it decide
            skel.train(self.training)
        return skel

    def _copy(self, module: nn.Module, prefix: str) -> nn.Module:
        # hot path (~3 us a module): plain dict operations on the module's __dict__
        cls = type(module)
        skel = _new(cls)
        own = module.__dict__
        d = own.copy()
        params = own["_parameters"]
        path = prefix[:-1]
        if params:
            bound = params.copy()
            for name in params:
                t = self.params.get(prefix + name, _MISSING)
                if t is not _MISSING:
                    if type(t) is AdaptedWeight:  # bound as the plain weight; adapted inside its owner's forward
                        self.adapted.setdefault(t.applies_in or path, []).append((skel, name, t, params[name]))
                        t = t.weight
                    bound[name] = t
                    self.bound += 1
            d["_parameters"] = bound
        else:
            d["_parameters"] = {}
        buffers = own["_buffers"]
        d["_buffers"] = buffers.copy() if buffers else {}
        d["_non_persistent_buffers_set"] = set(own["_non_persistent_buffers_set"])
        children = own["_modules"]
        d["_modules"] = (
            {n: None if c is None else self._copy(c, f"{prefix}{n}.") for n, c in children.items()} if children else {}
        )
        d["training"] = self.training
        hooks = own["_forward_hooks"]
        if hooks and any(_input_grad_hook(h) for h in hooks.values()):
            d["_forward_hooks"] = type(hooks)((k, h) for k, h in hooks.items() if not _input_grad_hook(h))
        if "_gradient_checkpointing_func" in own:
            d["_gradient_checkpointing_func"] = functools.partial(
                _checkpoint, own["_gradient_checkpointing_func"], self.rng
            )
            self.checkpointing = self.checkpointing or own.get("gradient_checkpointing") is True
        for key in ("forward", "_old_forward"):  # per-instance forwards (e.g. accelerate's hooks) bound to the module
            if key in own:
                d[key] = _rebind(own[key], module, skel)
        adapted = self.adapted.pop(path, None)  # its own weights and its children's it uses (see _owner_forward)
        wraps = self.wrapped.pop(path, None) if self.wrapped else None  # whole-module adapters (Method.module_forward)
        if adapted is not None or wraps is not None:
            forward = d.get("forward") or types.MethodType(cls.forward, skel)
            d["forward"] = _owner_forward(adapted or [], forward, wraps or [], skel)
        train = cls.train
        if train is not _MODULE_TRAIN and getattr(train, "__qualname__", None) != "PreTrainedModel.train":
            self.custom_train = True  # transformers' own override only switches kernels modes: not for a skeleton
        object.__setattr__(skel, "__dict__", d)
        return skel

    def _unbound(self, model: nn.Module) -> None:
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        lost = sorted(set(self.params) - names) + sorted(f"{p} (a module)" for p in self.wrapped)
        raise RuntimeError(
            f"funcpeft: the model no longer has the parameter(s) {lost[:5]}{' ...' if len(lost) > 5 else ''} that fn "
            "was built for: its module structure changed after get_peft_model. Call get_peft_model on the model as it is now."
        )


class OutputCapturing:
    """transformers' output-capturing hooks (`output_hidden_states`, `output_attentions`, ... of models whose
    forward is decorated with `capture_outputs`), installed once on the model itself.

    transformers installs them lazily, on the first call asking for such outputs, and marks the module
    installed. On a call skeleton the mark would land on the skeleton (lost after the call) while the hooks land
    in the model's hook dicts (shared with the skeleton): every call would add another set, and
    `hidden_states` would grow by one entry per layer per call (silently wrong indices, a leak). So the first
    call asking for them installs them on the model, as a plain call of the model would, and the skeletons
    copy the mark. A traced call cannot install them (dynamo cannot trace transformers' lock): a compiled fn
    asking for them needs them installed first (`install`; X-LoRA's fn does it when it is built).
    """

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.flags = tuple(
            sorted({f"output_{k}" for m in modules for k in getattr(m, "_can_record_outputs", None) or {}})
        )
        self.installed = False

    @staticmethod
    def of(model: nn.Module) -> OutputCapturing | None:
        modules = [m for m in model.modules() if _captures_outputs(type(m).forward)]
        return OutputCapturing(modules) if modules else None

    def install(self) -> None:
        if self.installed:
            return
        from transformers.utils.output_capturing import maybe_install_capturing_hooks

        for m in self.modules:
            maybe_install_capturing_hooks(m)  # type: ignore[arg-type]  # idempotent, thread-safe (its lock)
        self.installed = True

    def install_if_asked(self, kwargs: Mapping[str, Any]) -> None:
        """Install on the first call whose kwargs (or a decorated module's config) ask for captured outputs."""
        if self.installed:
            return
        if any(k.startswith("output_") and v for k, v in kwargs.items()) or any(
            getattr(getattr(m, "config", None), f, False) for m in self.modules for f in self.flags
        ):
            self.install()


def _captures_outputs(forward: Any) -> bool:
    """Whether a forward is wrapped by transformers' `capture_outputs` (its wrapper's code, behind functools.wraps)."""
    while forward is not None:
        code = getattr(forward, "__code__", None)
        if code is not None and code.co_qualname.startswith("capture_outputs."):
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False


def parameter_value(
    name: str, applied: list[tuple[Method, LayerSpec[Any], Params]], weight: torch.Tensor
) -> torch.Tensor:
    """The value the model reads for bare parameter `name` with these adapters active (their method's rule)."""
    method = applied[0][0]
    if any(m is not method for m, _, _ in applied):
        raise NotImplementedError(
            f"adapters of different methods ({sorted({m.name for m, _, _ in applied})}) target the parameter {name!r}; "
            "a bare parameter takes one method's adapters"
        )
    assert method.parameter_value is not None  # planning refused the method otherwise
    return method.parameter_value([(spec, params) for _, spec, params in applied], weight)


def _owner_forward(
    adapted: list[Adapted],
    forward: Any,
    wraps: list[Wrapped] | None = None,
    module: nn.Module | None = None,
) -> Any:
    """`forward` of a targeted module that sees its adapted weight(s) only while it runs.

    As in PEFT, where the adapter term is added by the layer's own forward: anything else that reads the
    weight (a parent's `F.linear(x, self.proj.weight)`, a hook, a tied module) gets the plain tensor.
    adapted: (module, parameter name, adapted weight): the module's own, and children's its forward reads
    (`PlanEntry.applies_in`: a MultiheadAttention's out_proj). wraps: whole-module adapters of `module` (the
    skeleton, or the model's module in a traced call), applied in order to its output (`Method.module_forward`),
    as PEFT's wrapper modules (AdaptedAttention) run the wrapped module and then add their term.
    """

    module_level = [w for _, _, w, _ in adapted if w.adapters[0].spec.kind.module_level]
    if module_level:  # a quantised layer: its own forward is the base op, the adapters act on its output
        (weight,) = module_level
        owner, name, _, own = adapted[0]

        def adapted_module(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            packed = owner._parameters[name]
            assert packed is not None
            # HQQLinear keeps its bias as a plain attribute (not a parameter): read either
            bias = owner._parameters["bias"] if "bias" in owner._parameters else getattr(owner, "bias", None)
            with bound_for_call(weight.adapters[0].path, owner, name, packed, own):
                return apply_module(
                    weight, x, lambda x: forward(x, *args, **kwargs), bias, lambda: dequantize(packed, owner)
                )

        return adapted_module

    def run(*args: Any, **kwargs: Any) -> Any:
        plain: list[tuple[nn.Module, str, Any]] = [(m, n, m._parameters[n]) for m, n, _, _ in adapted]
        for m, n, w, _ in adapted:
            m._parameters[n] = w  # type: ignore[assignment]  # a private skeleton (or a traced call): undone below
        try:
            return forward(*args, **kwargs)
        finally:
            for m, n, p in plain:
                m._parameters[n] = p

    for wrap in wraps or ():  # arounds run the module themselves: the first registered innermost
        if wrap.around is not None:
            assert module is not None and wrap.ctx is not None
            run = functools.partial(_around, wrap, module, run)

    def adapted_forward(*args: Any, **kwargs: Any) -> Any:
        out = run(*args, **kwargs)
        for wrap in wraps or ():
            if wrap.forward is not None:
                assert module is not None
                out = wrap.forward(wrap.spec, wrap.params, module, args, kwargs, out)
        return out

    return adapted_forward


def _around(wrap: Wrapped, module: nn.Module, inner: Any, *args: Any, **kwargs: Any) -> Any:
    """One `Method.module_around` / `model_around` of a module, running `inner` (the module, or the next around)."""
    assert wrap.around is not None and wrap.ctx is not None
    return wrap.around(wrap.spec, wrap.params, module, inner, args, kwargs, wrap.ctx)


def _input_grad_hook(hook: Any) -> bool:
    """transformers' / PEFT's `enable_input_require_grads` hook: `output.requires_grad_(True)` on the embeddings.

    Only reentrant checkpointing needs it, which funcpeft never runs; and torch.func transforms reject
    `requires_grad_`. Call skeletons leave it out (the model keeps it).
    """
    return getattr(hook, "__name__", None) in _INPUT_GRAD_HOOKS and str(getattr(hook, "__module__", "")).startswith(
        ("transformers.", "peft.", "funcpeft.")  # funcpeft.prepare_model_for_kbit_training registers PEFT's
    )


_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def _rebind(value: Any, module: nn.Module, skel: nn.Module) -> Any:
    """A bound method or functools.partial of `module` -> the same bound to `skel` (anything else as is)."""
    if isinstance(value, types.MethodType) and value.__self__ is module:
        return types.MethodType(value.__func__, skel)
    if isinstance(value, functools.partial) and any(a is module for a in value.args):
        args = tuple(skel if a is module else a for a in value.args)
        return functools.update_wrapper(functools.partial(value.func, *args, **value.keywords), value)
    return value


def _checkpoint(model_func: Any, rng: CallRandomness | None, function: Any, *args: Any, **kwargs: Any) -> Any:
    """A layer's `_gradient_checkpointing_func` in a call skeleton: the model's, non-reentrant, same masks on recompute.

    `function` runs the layer on this call's skeleton, whose tensors stay bound until backward, so the
    recompute sees the adapter. Dropout masks are redrawn from copies of the call's generators as they were
    when the layer first ran; the global RNG is never saved or restored (`preserve_rng_state=False`): no
    draw of the call uses it.
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            "funcpeft: gradient checkpointing is enabled on the model (gradient_checkpointing_enable()), and torch's "
            "checkpointing cannot run inside torch.func transforms: grad/vjp do not support its saved-tensor hooks, and "
            "a backward after vmap cannot replay a vmapped layer. Take gradients with funcpeft.value_and_grad or "
            "loss.backward() outside torch.func transforms, or disable checkpointing (model.gradient_checkpointing_disable())."
        )
    if rng is None:
        run = function
    else:
        state = rng.snapshot()
        calls = 0

        def run(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return function(*a, **kw)
            with rng.replay(state):
                return function(*a, **kw)

    return model_func(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def peft_function(pm: Any) -> PeftFunction:
    """The `PeftFunction` of what get_peft_model returned (or `pm` itself when it is one)."""
    fn = pm if isinstance(pm, PeftFunction) else getattr(pm, "fn", None)
    if not isinstance(fn, PeftFunction):
        raise TypeError(f"expected what funcpeft.get_peft_model returned (or its `fn`), got {type(pm).__name__}")
    return fn
