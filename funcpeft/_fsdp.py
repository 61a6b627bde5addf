"""`fn` on a model whose frozen base is sharded with FSDP2's `fully_shard` (the user API is funcpeft.distributed).

FSDP2 keeps each parameter of a sharded module as a DTensor shard. In a pre-forward hook on each module
`fully_shard` was applied to (a *unit*), it all-gathers the unit's parameters and writes the whole tensors
into the model's own module slots; after the unit it frees them, and gathers them again in its backward.
A copy of the module tree (funcpeft's usual call path) would never see those gathered tensors, so a sharded
model runs as itself, and for the call funcpeft:

- wraps, in a forward pre-hook on each adapted module (the last pre-hook), the weight FSDP has just gathered
  into that module in an `AdaptedWeight` (or puts an override leaf, modules_to_save or a trainable bias, in its
  slot); a post-hook (the first) puts FSDP's tensor back: as in a call skeleton, the adapted weight is seen only
  while the module's own forward runs;
- for a quantised layer (bitsandbytes Linear4bit, `LayerKind.module_level`), whose kernel reads the packed
  weight, leaves FSDP's gathered data in the slot (bitsandbytes restores the quant state from the layer) and
  replaces the layer's forward for the call: its own forward, with the adapters applied to its output;
- puts the call's tensors into the slots of parameters FSDP does not manage (restored after);
- sets every module's `training` flag to the call's mode (restored after);
- on modules with transformers' gradient checkpointing, runs the checkpoint non-reentrantly and redoes all of
  the above around a layer's recompute in the backward pass, so the recompute sees the adapter.

Everything is undone when the call returns or raises; between calls the model is exactly as `fully_shard`
left it. Two calls on one sharded model at once (threads) are refused, as FSDP's own state is per model.
The base is checked on every call: each managed entry of `base` must be the shard FSDP holds (a merged or
modified base cannot be used: FSDP gathers from its own shards), frozen (`requires_grad=False`: FSDP would
otherwise compute and reduce-scatter base gradients), and the process group must be initialized. Quantised
layers FSDP cannot gather intact are refused (`check_sharded_quant`: 8-bit; a float-stored 4-bit weight that a
MixedPrecisionPolicy casts).

Reads torch's FSDP2 internals (FSDPParam.sharded_param, `_module_info`), tested with torch 2.13.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ._quant import check_sharded_quant, is_dtensor, is_quant_linear
from ._weights import AdaptedWeight
from .rng import CallRandomness, redirect


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (no communication); any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def is_fsdp_module(module: Any) -> bool:
    mod = sys.modules.get("torch.distributed.fsdp")
    return mod is not None and isinstance(module, mod.FSDPModule)


def model_class(model: nn.Module) -> type:
    """The model's own class: fully_shard swaps in an `FSDP<Class>` subclass, which saved files must not name."""
    mod = sys.modules.get("torch.distributed.fsdp")
    if mod is None or not isinstance(model, mod.FSDPModule):
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, mod.FSDPModule))


def _describe(path: str, module: nn.Module) -> str:
    return f"module {path or '<root>'!r} ({type(module).__name__})"


def require_process_group(what: str) -> None:
    """`what` (a sharded tensor, described) needs torch.distributed: a clear error when it is not initialized."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"funcpeft: {what} is a DTensor shard (FSDP2 fully_shard), but torch.distributed has no initialized "
            "process group: call torch.distributed.init_process_group first, on every rank (torchrun sets the "
            "environment for it; see docs/distributed.md). A sharded base cannot be used after "
            "destroy_process_group."
        )


def check_not_sharded(model: nn.Module) -> None:
    """For fn built on an unsharded model: raise if `fully_shard` was applied to its root since (O(1))."""
    if is_fsdp_module(model):
        raise RuntimeError(
            f"funcpeft: the model ({type(model).__name__}) was sharded with fully_shard after get_peft_model captured "
            "its parameters: fn and its `base` hold the unsharded tensors, so nothing would be sharded. Call "
            "get_peft_model (or from_pretrained) on the sharded model, after fully_shard (docs/distributed.md)."
        )


def reshard(model: nn.Module) -> None:
    """Registers the shards again where FSDP2 left a unit's parameters gathered (`FSDPModule.reshard()`).

    FSDP keeps the root unit's parameters gathered after a forward (until the backward), and every unit's under
    `reshard_after_forward=False`; funcpeft must capture and plan from the shards, not from those gathered
    tensors (in a MixedPrecisionPolicy's param_dtype, not the base's own). `reshard()` is what FSDP itself does
    after a unit: the same values, the model's slots hold its shards again (no communication).
    """
    for m in model.modules():
        if is_fsdp_module(m):
            m.reshard()  # type: ignore[operator]


def check_plain_base(base: Mapping[str, Any], model: nn.Module) -> None:
    """For fn built on an unsharded model: a clear error for a `base` holding DTensor shards (another model's)."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return
    for name, t in base.items():
        if isinstance(t, mod.DTensor):
            path = name.rpartition(".")[0]
            module = dict(model.named_modules(remove_duplicate=False)).get(path)
            where = f" (the model's {_describe(path, module)} holds a plain tensor)" if module is not None else ""
            raise ValueError(
                f"funcpeft: base[{name!r}] is a DTensor {_sharding(t)}, but this fn was built on an unsharded "
                f"model{where}: a sharded base runs only with the fn get_peft_model (or from_pretrained) returned for "
                "the model sharded with fully_shard, which gathers the weights. Use that fn, or pass whole tensors "
                "(t.full_tensor()) to this one."
            )


@dataclasses.dataclass(frozen=True)
class Managed:
    """A parameter FSDP manages: its FSDPParam, the module that owns it, and the unit that gathers it."""

    name: str  # canonical parameter name (model.named_parameters())
    fsdp_param: Any
    owner: str  # module path
    owner_type: str
    unit: str  # path of the fully_shard'ed module whose hooks gather it
    unit_type: str

    def where(self) -> str:
        return (
            f"parameter {self.name!r} of module {self.owner or '<root>'!r} ({self.owner_type}), sharded by "
            f"fully_shard on {self.unit or '<root>'!r} ({self.unit_type})"
        )

    @property
    def shard(self) -> Any:
        return self.fsdp_param.sharded_param


def managed_params(model: nn.Module) -> dict[str, Managed]:
    """{parameter name (every alias): Managed} for each parameter of `model` that FSDP2 shards."""
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    out: dict[str, Managed] = {}
    for unit_path, unit in model.named_modules():
        if not is_fsdp_module(unit):
            continue
        try:
            groups = unit._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
            found = [
                (
                    fp,
                    [(fp._module_info.module, fp._module_info.param_name)]
                    + list(zip(fp._module_info.shared_modules, fp._module_info.shared_param_names)),
                )
                for group in groups
                for fp in group.fsdp_params
            ]
        except AttributeError as e:
            raise RuntimeError(
                f"funcpeft reads FSDP2's parameter bookkeeping, which this torch ({torch.__version__}) lays out "
                f"differently than torch 2.13 ({e}); a sharded base is not supported with it"
            ) from e
        for fp, owners in found:
            names = [f"{paths[id(m)]}.{n}".lstrip(".") for m, n in owners if id(m) in paths]
            owner = owners[0][0]
            info = Managed(names[0], fp, paths[id(owner)], type(owner).__name__, unit_path, type(unit).__name__)
            out.update({n: info for n in names})
    return out


class ShardedModel:
    """Runs a model sharded with `fully_shard` for `PeftFunction` (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.managed = managed_params(model)
        self._lock = threading.Lock()
        for path, module in self.modules.items():
            check_sharded_quant(path, module)
        for info in self.managed.values():
            module = self.modules[info.owner]
            cast = getattr(info.fsdp_param, "param_dtype", None)  # None: gathered in its own dtype
            if cast is not None and is_quant_linear(module) and info.name == f"{info.owner}.weight".lstrip("."):
                raise NotImplementedError(
                    f"funcpeft: {_describe(info.owner, module)} is a bitsandbytes 4-bit layer whose packed weight is "
                    f"stored as {info.fsdp_param.orig_dtype} (bnb_4bit_quant_storage), and fully_shard's "
                    f"MixedPrecisionPolicy(param_dtype={cast}) casts it to {cast} when it gathers it: that rewrites the "
                    "packed 4-bit codes (other weights, or a shape error in bitsandbytes). Load the base with "
                    f"bnb_4bit_quant_storage=torch.uint8 (FSDP2 never casts integer data) or ={cast} (docs/distributed.md)."
                )
        for name, p in model.named_parameters(remove_duplicate=False):
            path = name.rpartition(".")[0]
            if is_dtensor(p) and name not in self.managed:
                raise NotImplementedError(
                    f"funcpeft: parameter {name!r} of {_describe(path, self.modules[path])} is a DTensor that fully_shard "
                    "does not manage (tensor parallelism or a hand-made DTensor?); funcpeft supports DTensor parameters "
                    "only as FSDP2 shards"
                )
        if self.managed:
            first = next(iter(self.managed.values()))
            require_process_group(first.where())

    @staticmethod
    def of(model: nn.Module) -> ShardedModel | None:
        """The runner for `model` if any of its modules is sharded with `fully_shard`, else None."""
        if "torch.distributed.fsdp" not in sys.modules or not any(is_fsdp_module(m) for m in model.modules()):
            if any(is_dtensor(p) for p in model.parameters()):
                return ShardedModel(model)  # raises: DTensors without FSDP
            return None
        return ShardedModel(model)

    # -- checks ----------------------------------------------------------------------------------------------
    def refuse(self, what: str) -> None:
        raise NotImplementedError(
            f"funcpeft: {what} is not supported on a model sharded with FSDP2 (fully_shard): FSDP gathers the weights "
            "into the model's own modules, which only fn's forward call runs with the adapter applied"
        )

    def check_base(self, base: Mapping[str, torch.Tensor]) -> None:
        """Each managed entry of `base` is the shard FSDP holds now, frozen; a clear error otherwise."""
        first = next(iter(self.managed.values()), None)
        if first is not None:
            require_process_group(first.where())
        seen: set[str] = set()
        for info in self.managed.values():
            if info.name in seen:
                continue
            seen.add(info.name)
            shard = info.shard
            given = base.get(info.name)
            if shard.requires_grad:
                raise RuntimeError(
                    f"funcpeft: {info.where()} requires grad, so FSDP would compute and reduce-scatter a gradient for "
                    "the frozen base on every backward. Freeze the base: model.requires_grad_(False) (before or after "
                    "fully_shard; funcpeft never changes your model's flags)."
                )
            if given is None:
                continue  # reported by fn's own check of base
            if not is_dtensor(given):
                raise ValueError(
                    f"funcpeft: base[{info.name!r}] is a plain {type(given).__name__} {tuple(given.shape)}, but the model's "
                    f"{info.where()} is a DTensor shard: this base was captured before the model was sharded (or from "
                    "another model). Call get_peft_model on the sharded model and use the `base` it returns."
                )
            if not _same_shard(given, shard):
                raise ValueError(
                    f"funcpeft: base[{info.name!r}] is a DTensor {_sharding(given)}, not the shard FSDP holds for the "
                    f"model's {info.where()}: {_sharding(shard)}. With a sharded base, FSDP gathers the weights from "
                    "the model's own shards, so `base` must be the one get_peft_model returned for the model as it is "
                    "sharded now (not a merged or modified copy, not one built for another sharding or mesh)."
                )

    # -- the call --------------------------------------------------------------------------------------------
    def call(
        self,
        build: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
        base: Mapping[str, torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rng: CallRandomness | None,
        checkpoint: Callable[..., Any],
        module_forward: Callable[..., Any],
    ) -> Any:
        """`model(*args, **kwargs)` with the tensors `build(base)` returns (fn's build_params).

        rng: the call's randomness (None: eval mode); checkpoint: `functional._checkpoint(model_func, rng,
        function, *args, **kwargs)`, which a checkpointed layer's `_gradient_checkpointing_func` becomes (it
        recomputes with the same dropout masks); module_forward: `functional._owner_forward(adapted, forward)`, the
        forward of a quantised layer with its adapters (`LayerKind.module_level`).
        """
        if torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling():
            raise NotImplementedError(
                "funcpeft: a sharded base (FSDP2) runs FSDP's collectives in module hooks, which torch.func transforms "
                "(grad, vmap) and torch.compile of fn do not trace; take gradients with funcpeft.value_and_grad or "
                "loss.backward() at top level"
            )
        self.check_base(base)
        local = {k: local_tensor(v) for k, v in base.items()}
        params = build(local)
        install = _Install(self, params, local, rng, checkpoint, module_forward)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "funcpeft: another call is running on this sharded model (another thread?). FSDP keeps one gather "
                "state per model: run one call at a time."
            )
        try:
            with redirect(rng) if rng is not None else nullcontext(), install.installed():
                return self.model(*args, **kwargs)
        finally:
            self._lock.release()


def _sharding(t: Any) -> str:
    local = t.to_local()
    return (
        f"with placements {tuple(t.placements)} on a mesh of {t.device_mesh.size()} rank(s) ({t.device_mesh!r}), "
        f"local shape {tuple(local.shape)}"
    )


def _same_shard(a: Any, b: Any) -> bool:
    la, lb = a.to_local(), b.to_local()
    return (
        a.device_mesh == b.device_mesh
        and tuple(a.placements) == tuple(b.placements)
        and a.shape == b.shape
        and la.shape == lb.shape
        and la.dtype == lb.dtype
        and la.device == lb.device
        and la.untyped_storage().data_ptr() == lb.untyped_storage().data_ptr()
        and la.storage_offset() == lb.storage_offset()
    )


class _Install:
    """One call's changes to the model (hooks, unmanaged slots, training flags, checkpoint functions), undoable."""

    def __init__(
        self,
        runner: ShardedModel,
        params: dict[str, torch.Tensor],
        local: Mapping[str, torch.Tensor],
        rng: CallRandomness | None,
        checkpoint: Callable[..., Any],
        module_forward: Callable[..., Any],
    ):
        self.runner = runner
        self.module_forward = module_forward
        self.training = rng is not None
        self.rng = rng
        self.checkpoint = checkpoint
        self.active = False
        # module path -> [(param name, AdaptedWeight or override tensor)] applied after FSDP gathers
        self.late: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self.slots: list[tuple[nn.Module, str, torch.Tensor]] = []  # unmanaged: (module, name, tensor)
        # (module path, parameter name, adapted weight) of quantised layers, adapted around their own forward
        self.quant: list[tuple[str, str, AdaptedWeight]] = []
        base_ids = {id(v) for v in local.values()}
        for name, value in params.items():
            path, _, pname = name.rpartition(".")
            module = runner.modules[path]
            is_base = id(value) in base_ids
            quant = isinstance(value, AdaptedWeight) and value.adapters[0].spec.kind.module_level
            if name not in runner.managed:
                self.slots.append((module, pname, value.weight if quant else value))  # type: ignore[attr-defined]
                if is_base:
                    continue
            elif is_base:
                continue  # FSDP's gathered weight is the base value
            if isinstance(value, AdaptedWeight):
                leaves = {k: v for a in value.adapters for k, v in a.params.items()}
            else:
                leaves = {pname: value}
            for leaf, t in leaves.items():
                if is_dtensor(t):
                    raise TypeError(
                        f"funcpeft: the adapter's {path}.{leaf} is a DTensor, for {_describe(path, module)}; with a base "
                        "sharded by fully_shard the adapter is replicated: pass plain tensors, the same on every rank "
                        "(e.g. leaf.full_tensor()), as get_peft_model makes them"
                    )
            if quant:  # its kernel reads the packed weight: it stays in the slot, the adapters act on the output
                self.quant.append((path, pname, value))  # type: ignore[arg-type]
            elif name in runner.managed:
                self.late.setdefault(path, []).append((pname, value))

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The call's changes applied (a no-op when they already are: a recompute inside the first forward)."""
        if self.active:
            yield
            return
        model = self.runner.model
        flags = [(m, m.training) for m in model.modules()]
        undo: list[Callable[[], None]] = []
        self.active = True
        try:
            for m, _ in flags:
                m.training = self.training
            for module, pname, value in self.slots:
                undo.append(functools.partial(module._parameters.__setitem__, pname, module._parameters[pname]))
                module._parameters[pname] = value  # type: ignore[assignment]
            for path, items in self.late.items():
                module = self.runner.modules[path]
                gathered: list[list[tuple[str, torch.Tensor, torch.Tensor]]] = []
                undo.append(
                    module.register_forward_pre_hook(functools.partial(self._pre, path, items, gathered)).remove
                )
                undo.append(
                    module.register_forward_hook(
                        functools.partial(self._post, gathered), prepend=True, always_call=True
                    ).remove
                )
            for path, pname, value in self.quant:
                module = self.runner.modules[path]
                own = module.__dict__.get("forward")
                module.__dict__["forward"] = functools.partial(
                    self._quant_forward, module, path, pname, value, module.forward
                )
                undo.append(
                    functools.partial(module.__dict__.pop, "forward")
                    if own is None
                    else functools.partial(module.__dict__.__setitem__, "forward", own)
                )
            for m in model.modules():
                func = m.__dict__.get("_gradient_checkpointing_func")
                if func is not None:
                    m.__dict__["_gradient_checkpointing_func"] = functools.partial(self._checkpoint, func)
                    undo.append(functools.partial(m.__dict__.__setitem__, "_gradient_checkpointing_func", func))
            yield
        finally:
            for step in reversed(undo):
                step()
            for m, flag in flags:
                m.training = flag
            self.active = False

    def _pre(
        self, path: str, items: list[tuple[str, torch.Tensor]], gathered: list[Any], module: nn.Module, args: Any
    ) -> None:
        done = []
        for pname, value in items:
            current = module._parameters[pname]
            if is_dtensor(current):
                info = self.runner.managed[f"{path}.{pname}".lstrip(".")]
                raise RuntimeError(
                    f"funcpeft: {_describe(path, module)} ran while its {info.where()} was not gathered: FSDP gathers "
                    "it in the forward of that unit, and this module was called outside it"
                )
            assert current is not None
            new = value
            if isinstance(value, AdaptedWeight):  # the gathered weight, with the call's adapters and randomness
                new = AdaptedWeight.wrap(current, value.adapters, value.dropout, value.generator, value.applies_in)
            module._parameters[pname] = new  # type: ignore[assignment]
            done.append((pname, current, new))
        gathered.append(done)

    def _quant_forward(
        self,
        module: nn.Module,
        path: str,
        pname: str,
        value: AdaptedWeight,
        forward: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """A quantised layer's forward during the call: its own forward on the weight FSDP gathered (bitsandbytes
        restores the 4-bit quant state from the layer), with the adapters applied to its output, as in a skeleton."""
        current = module._parameters[pname]
        if is_dtensor(current):
            info = self.runner.managed[f"{path}.{pname}".lstrip(".")]
            raise RuntimeError(
                f"funcpeft: {_describe(path, module)} ran while its {info.where()} was not gathered: FSDP gathers "
                "it in the forward of that unit, and this module was called outside it"
            )
        assert current is not None
        adapted = AdaptedWeight.wrap(current, value.adapters, value.dropout, value.generator, value.applies_in)
        return self.module_forward([(module, pname, adapted, current)], forward)(*args, **kwargs)

    @staticmethod
    def _post(gathered: list[Any], module: nn.Module, args: Any, output: Any) -> None:
        if not gathered:
            return
        for pname, current, new in gathered.pop():
            if module._parameters.get(pname) is new:  # FSDP may have resharded the slot already
                module._parameters[pname] = current  # type: ignore[assignment]

    def _checkpoint(self, func: Callable[..., Any], function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A layer's `_gradient_checkpointing_func` during the call: its recompute runs with the call's changes."""

        def run(*a: Any, **kw: Any) -> Any:
            with self.installed():
                return function(*a, **kw)

        return self.checkpoint(func, self.rng, run, *args, **kwargs)
