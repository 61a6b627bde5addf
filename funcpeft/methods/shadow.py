"""ShadowPEFT (`ShadowConfig`): a small trainable shadow network rides the frozen decoder's block loop.

PEFT 0.21.2 (`peft/tuners/shadow/{layers,model}.py`) wraps each targeted decoder block in a `ShadowLayer` and keeps
a shadow backbone on its tuner. Per forward: the backbone (for `shadow_model="mirror"` the base decoder's own class
with `shadow_num_hidden_layers` layers, driven by the frozen base input embeddings when `share_embeddings`) maps the
call's inputs to s0 (B, T, d) (projected to the base width d when its width differs). The first targeted block's
input h is paired with s0; each targeted block l runs on

    h + shadow_alpha * W_up(Dropout(W_down(h - s)))                  (Eq. 2-4; W_down (r, d), W_up (d, r))

and advances the state from its output h_out:  s = (1 - g) * s + g * T(h_out),  g = sigmoid(G(h_out))  (Eq. 5-7;
T and G are Linear(d, u) -> GELU -> Linear(u, d), u = update_hidden_size or r). Between blocks the pair travels
through the decoder loop as one object in the hidden-states slot (so gradient checkpointing recomputes a block with
its own state); the last block returns the plain hidden states. With `labels` and task_type CAUSAL_LM, the output's
loss gains `auxiliary_loss_weight * CE(lm_head(s0), labels)` (shifted, ignore_index -100) and `output.shadow_loss`
holds that cross entropy, detached.

funcpeft does the same functionally: the blocks are whole-module targets whose forward the method runs itself
(`Method.module_around`), and the backbone runs once per model call around the model's forward
(`Method.model_around`), its parameters being the adapter's shared trainable leaves (`SharedParams`, tree path
'<shared>', named like PEFT's files: `shadow_backbone.default.{name}`, `shadow_projection.default.weight`). The
carried state lives in the call's `AroundContext.scope`, made fresh for each call: fn keeps nothing between calls.
The backbone module is built once per (architecture, device) as a template with meta parameters and real buffers
(rotary frequencies) and run on the adapter's tensors on a per-call skeleton (funcpeft's call skeletons;
`functional_call` when traced). Nothing weight-sized is
materialised. Merging is refused (PEFT: no weight represents an input-dependent trajectory), and so are per-example
routing, several Shadow adapters in one call (PEFT: exactly one active adapter), explicit `shadow_model`
checkpoints, sequence classification, half-precision bases and Diffusers models (see `_unsupported`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from .._config import TaskType
from ..configs.shadow import ShadowConfig, backbone_of, refuse_diffusers
from ._registry import register
from .base import (
    AroundContext,
    KeyRules,
    LayerKind,
    LayerSpec,
    MergeHooks,
    Method,
    Params,
    SharedParams,
    Target,
    UnsupportedLayerError,
)

_SEED = "shadow_seed"  # AroundContext.scope key of the initial shadow state s0 (B, T, d)
_BACKBONE = "shadow_backbone.default."
_PROJECTION = "shadow_projection.default.weight"
_MLPS = ("shadow_update_transform", "shadow_update_gate")
_MLP_LEAVES = tuple(f"{m}.{i}.{w}" for m in _MLPS for i in (0, 2) for w in ("weight", "bias"))
_LEAVES = ("shadow_down", "shadow_up", *_MLP_LEAVES)


# -- the model's decoder stack (PEFT's _get_backbone / _get_decoder_layers) ---------------------------------------
def _hidden_size(config: Any) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise AttributeError("Unable to infer the hidden size from the model config.")


def _set_config_attr(config: Any, names: tuple[str, ...], value: int) -> None:
    for attr in names:
        if hasattr(config, attr):
            setattr(config, attr, int(value))
            return
    raise AttributeError(
        f"Unable to update the model config: none of the expected attributes {names} are defined. "
        'This is required when building a mirrored shadow backbone (`shadow_model="mirror"`). '
        "Please use a supported decoder architecture, or set `shadow_model` to a pretrained model "
        "id/path instead."
    )


def _normalize_layer_config(config: Any) -> None:
    """PEFT's `_normalize_layer_config`: per-layer lists (Qwen3's `layer_types`) fit the reduced layer count."""
    try:
        num_layers = int(config.num_hidden_layers)
    except Exception:
        return
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        layer_types = list(layer_types)
        if not layer_types:
            layer_types = ["full_attention"] * num_layers
        elif len(layer_types) > num_layers:
            layer_types = layer_types[:num_layers]
        else:
            layer_types = layer_types + [layer_types[-1]] * (num_layers - len(layer_types))
        config.layer_types = layer_types
    max_window = getattr(config, "max_window_layers", None)
    if max_window is not None:
        with contextlib.suppress(Exception):
            if int(max_window) > num_layers:
                config.max_window_layers = num_layers


# -- hyper-parameters ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """The mirrored shadow backbone: `cls(config_cls.from_dict(json.loads(config)))` with attention `attn`.

    share: driven by the base input embeddings (`inputs_embeds`), its own `embed_tokens` removed (PEFT's rule:
    share_embeddings, a mirror of the base width whose forward takes inputs_embeds). width: its hidden size;
    base_width: the model's (a bias-free projection width -> base_width follows when they differ).
    lm_loss: the auxiliary loss uses the model's output embeddings (task_type CAUSAL_LM).
    """

    cls: type
    config_cls: type  # a transformers PretrainedConfig subclass
    config: str
    attn: str | None
    share: bool
    width: int
    base_width: int
    lm_loss: bool

    def build(self) -> nn.Module:
        cfg: Any = self.config_cls.from_dict(json.loads(self.config))  # type: ignore[attr-defined]
        if self.attn is not None:
            cfg._attn_implementation = self.attn
        module = self.cls(cfg)
        if self.share and isinstance(getattr(module, "embed_tokens", None), nn.Module):
            del module.embed_tokens
        return module


@dataclass(frozen=True)
class ShadowHyper:
    """One wrapped block (d: the base hidden size; u: the update MLPs' width) and the adapter's backbone."""

    r: int
    alpha: float
    dropout: float
    init_weights: bool
    d: int
    u: int
    aux_weight: float
    backbone: Backbone


Spec = LayerSpec[ShadowHyper]


def _unsupported(model: nn.Module, config: ShadowConfig) -> None:
    """Clear errors for what funcpeft does not implement (PEFT supports them)."""
    refuse_diffusers(model)
    if config.shadow_model != "mirror":
        raise NotImplementedError(
            f"ShadowConfig(shadow_model={config.shadow_model!r}): funcpeft builds mirrored shadow backbones only "
            '(shadow_model="mirror"); loading a pretrained shadow backbone (whose embeddings PEFT keeps frozen inside '
            "the adapter) is not implemented"
        )
    if config.task_type == TaskType.SEQ_CLS:
        raise NotImplementedError(
            "ShadowConfig(task_type='SEQ_CLS'): PEFT's trainable copy of the classifier (`shadow_head`) and its "
            "pooled auxiliary loss are not implemented in funcpeft; use task_type='CAUSAL_LM' or None"
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise NotImplementedError(
            f"ShadowPEFT on a model with {sorted(str(d) for d in dtypes)} parameters: PEFT keeps the shadow backbone "
            "in the model's dtype but upcasts the block adapters to float32; funcpeft reproduces float32 models only"
        )


def module_targets(model: nn.Module, config: ShadowConfig, match: Callable[[], list[str]]) -> list[str]:
    """The targeted blocks (`match`: PEFT's name matching); more than one must be consecutive items of one
    ModuleList, as the shadow state rides the loop from the first to the last (PEFT crashes on a gap)."""
    _unsupported(model, config)
    names = match()
    wanted = config.layers_to_transform
    if wanted is not None:
        keep = {wanted} if isinstance(wanted, int) else set(wanted)
        if any(n.rpartition(".")[2].isdigit() and int(n.rpartition(".")[2]) not in keep for n in names):
            warnings.warn(
                f"ShadowConfig(layers_to_transform={wanted!r}) selects nothing here: PEFT matches the blocks by "
                f"their full names (target_modules {sorted(config.target_modules or [])[:3]}...), which bypasses "
                "layers_to_transform, so every targeted block is wrapped (as in PEFT 0.21.2). Choose the blocks "
                "with target_modules instead.",
                UserWarning,
                stacklevel=3,
            )
    if len(names) > 1:
        parents = {n.rpartition(".")[0] for n in names}
        parent = next(iter(parents))
        holder = model.get_submodule(parent) if len(parents) == 1 else None
        leaves = [n.rpartition(".")[2] for n in names]
        indices = [int(i) for i in leaves if i.isdigit()]
        if (
            not isinstance(holder, nn.ModuleList)
            or len(indices) != len(names)
            or indices != list(range(indices[0], indices[0] + len(names)))
        ):
            raise ValueError(
                f"ShadowConfig targets {names[:6]}{' ...' if len(names) > 6 else ''}: the wrapped blocks must be "
                "contiguous items of one nn.ModuleList (the decoder blocks), because the shadow state rides the "
                "decoder loop from the first wrapped block to the last"
            )
    return names


def _backbone_spec(model: nn.Module, config: ShadowConfig) -> Backbone:
    """PEFT's `_build_shadow_backbone` config and its embedding-sharing rule, as hashable data."""
    base = backbone_of(model)
    for holder in (base, model):
        if getattr(holder, "config", None) is None:
            path = next((n for n, m in model.named_modules() if m is holder), "") or "<root>"
            raise AttributeError(
                f"ShadowPEFT mirrors the decoder from its transformers config (shadow_model='mirror'), but "
                f"{path!r} ({type(holder).__name__}) has no `config`: the model must be a transformers decoder "
                "(a PreTrainedModel such as LlamaForCausalLM, whose backbone, e.g. LlamaModel, holds the blocks)"
            )
    cfg: Any = copy.deepcopy(base.config)
    _set_config_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers"), config.shadow_num_hidden_layers or 1)
    if config.shadow_hidden_size is not None:
        _set_config_attr(cfg, ("hidden_size", "n_embd", "d_model"), config.shadow_hidden_size)
    if config.shadow_intermediate_size is not None:
        _set_config_attr(cfg, ("intermediate_size", "ffn_dim", "n_inner"), config.shadow_intermediate_size)
    if config.shadow_num_attention_heads is not None:
        _set_config_attr(cfg, ("num_attention_heads", "n_head", "num_heads"), config.shadow_num_attention_heads)
    _normalize_layer_config(cfg)
    cls = type(base)
    width, base_width = _hidden_size(cfg), _hidden_size(model.config)
    try:
        takes_embeds = "inputs_embeds" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        takes_embeds = False
    share = config.share_embeddings and takes_embeds and width == base_width
    return Backbone(
        cls,
        type(cfg),
        cfg.to_json_string(use_diff=False),
        getattr(cfg, "_attn_implementation", None),
        share,
        width,
        base_width,
        config.task_type == TaskType.CAUSAL_LM,
    )


def hyper(config: ShadowConfig, target: Target) -> ShadowHyper:
    model = target.root
    if model is None:
        raise UnsupportedLayerError(f"ShadowPEFT needs the whole model to adapt {target.name!r}")
    r = config.r
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
    p = config.shadow_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p!r} (`shadow_dropout`)")
    u = config.update_hidden_size or r
    backbone = _backbone_spec(model, config)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    _template(backbone, device)  # built outside any call (a traced call must only look it up)
    return ShadowHyper(
        r,
        float(config.shadow_alpha),
        float(p),
        bool(config.init_weights),
        _hidden_size(model.config),
        int(u),
        float(config.auxiliary_loss_weight),
        backbone,
    )


def param_names(spec: Spec) -> tuple[str, ...]:
    return _LEAVES


# -- init: PEFT's draws, in its order -----------------------------------------------------------------------------
@contextlib.contextmanager
def _drawing(generator: torch.Generator | None) -> Iterator[None]:
    """Draw with the global RNG (generator None: PEFT's stream) or, for a generator, a private one seeded from it
    (the modules below draw with the global RNG; the process-global state is restored afterwards)."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's `ShadowLayer.update_layer`: nn.Linear draws for W_down (r, d), W_up (d, r) (zeroed when init_weights),
    then T and G (Linear(d, u), Linear(u, d) each, with biases)."""
    h = spec.hyper
    with _drawing(generator):
        down = nn.Linear(h.d, h.r, bias=False)
        up = nn.Linear(h.r, h.d, bias=False)
        if h.init_weights:
            nn.init.zeros_(up.weight)
        mlps = [nn.Sequential(nn.Linear(h.d, h.u), nn.GELU(), nn.Linear(h.u, h.d)) for _ in _MLPS]
    out = {"shadow_down": down.weight.detach(), "shadow_up": up.weight.detach()}
    for name, mlp in zip(_MLPS, mlps):
        out.update({f"{name}.{k}": v.detach() for k, v in mlp.named_parameters()})
    return out


def shared_init(spec: Spec, generator: torch.Generator | None) -> Params:
    """PEFT's `_init_shadow_backbone` (drawn before the first block's layers): the mirrored backbone's own init
    (`cls(config)`), minus `embed_tokens` when it shares the base embeddings, then the projection's nn.Linear draw
    when the widths differ."""
    bb = spec.hyper.backbone
    with _drawing(generator):
        module = bb.build()
        projection = nn.Linear(bb.width, bb.base_width, bias=False) if bb.width != bb.base_width else None
    out = {f"{_BACKBONE}{k}": v.detach() for k, v in module.named_parameters()}
    if projection is not None:
        out[_PROJECTION] = projection.weight.detach()
    return out


# -- the call -----------------------------------------------------------------------------------------------------
class Carrier:
    """The base hidden states and the shadow state, travelling together through the decoder loop (PEFT's
    ShadowCarrier) between the first and the last wrapped block."""

    def __init__(self, hidden: torch.Tensor, shadow: torch.Tensor) -> None:
        self.hidden = hidden
        self.shadow = shadow


_SKELETONS: dict[Backbone, nn.Module] = {}
_TEMPLATES: dict[tuple[Backbone, str], nn.Module] = {}


def _skeleton(bb: Backbone) -> nn.Module:
    """The backbone module on CPU with meta parameters (functional_call supplies the adapter's) and real buffers
    (rotary frequencies), built once per architecture without touching the global RNG. `hyper` builds it at
    get_peft_model time, outside any call's randomness redirect (funcpeft.rng refuses global draws there)."""
    module = _SKELETONS.get(bb)
    if module is None:
        with torch.random.fork_rng(devices=[]):
            module = bb.build()
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None:
                    sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
        _SKELETONS[bb] = module
    return module


def _template(bb: Backbone, device: torch.device) -> nn.Module:
    """`_skeleton(bb)` in eval mode with its buffers on `device` (copied once per device, no draws)."""
    key = (bb, str(device))
    module = _TEMPLATES.get(key)
    if module is None:
        module = copy.deepcopy(_skeleton(bb)).eval()
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None:
                    sub._buffers[name] = buf.to(device)
        _TEMPLATES[key] = module
    return module


def _run_backbone(
    ctx: AroundContext, template: nn.Module, weights: dict[str, torch.Tensor], training: bool, kwargs: dict[str, Any]
) -> Any:
    """The backbone on the adapter's tensors. Eagerly on a call skeleton of the shared template (`ctx.run`:
    funcpeft's own per-call module copies: concurrent calls never see each other's tensors, and training mode is
    the call's); a traced call (torch.compile, eval mode only) uses functional_call, whose swaps are symbolic there."""
    if torch.compiler.is_dynamo_compiling():
        return torch.func.functional_call(template, weights, (), kwargs)
    assert ctx.run is not None, "an AroundContext without `run`"
    return ctx.run(template, weights, training, kwargs)


def _mlp(params: Params, name: str, x: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, params[f"{name}.0.weight"], params[f"{name}.0.bias"]))
    return F.linear(hidden, params[f"{name}.2.weight"], params[f"{name}.2.bias"])


def _block_hidden(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    for attr in ("hidden_states", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)  # type: ignore[no-any-return]
    raise TypeError(f"Unsupported decoder block output type: {type(out)}. Expected a Tensor or a tuple.")


def block_around(
    spec: Spec,
    params: Params,
    module: nn.Module,
    run: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    ctx: AroundContext,
) -> Any:
    """One wrapped block: inject the discrepancy into its input, run it, advance the shadow state (Eq. 2-7)."""
    h = spec.hyper
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, Carrier):
        x, s = hidden.hidden, hidden.shadow
    else:
        seed = ctx.scope.get(_SEED) if ctx.index == 0 else None
        if seed is None or not isinstance(hidden, torch.Tensor):  # PEFT: a plain block when the path is inactive
            return run(*args, **kwargs)
        x, s = hidden, seed
        if x.shape[:-1] != s.shape[:-1]:
            raise ValueError(
                f"Shadow state sequence shape {tuple(s.shape[:-1])} does not match base hidden states "
                f"{tuple(x.shape[:-1])}."
            )
    dtype = params["shadow_down"].dtype
    delta = (x - s).to(dtype)  # Eq. 2
    if h.dropout:
        delta = ctx.dropout(delta, h.dropout)
    delta = F.linear(F.linear(delta, params["shadow_down"]), params["shadow_up"])  # Eq. 3
    injected = x + (h.alpha * delta).to(x.dtype)  # Eq. 4
    if args:
        out = run(injected, *args[1:], **kwargs)
    else:
        out = run(*args, **{**kwargs, "hidden_states": injected})
    new_hidden = _block_hidden(out)
    mlp_dtype = params["shadow_update_transform.0.weight"].dtype
    hid = new_hidden.to(mlp_dtype)
    candidate = _mlp(params, "shadow_update_transform", hid)  # Eq. 5
    gate = torch.sigmoid(_mlp(params, "shadow_update_gate", hid))  # Eq. 6
    new_shadow = ((1.0 - gate) * s.to(mlp_dtype) + gate * candidate).to(s.dtype)  # Eq. 7
    if ctx.index == ctx.count - 1:  # the exit: the decoder's final norm gets plain hidden states
        return out if isinstance(out, (torch.Tensor, tuple)) else new_hidden
    carrier = Carrier(new_hidden, new_shadow)
    return (carrier, *out[1:]) if isinstance(out, tuple) else carrier


def _cache_length(past: Any) -> int:
    get = getattr(past, "get_seq_length", None)
    return int(get()) if callable(get) else 1


def _initial_state(
    spec: Spec, params: Params, module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], ctx: AroundContext
) -> torch.Tensor:
    """s0 (B, T, d): the backbone on the call's inputs, projected to the base width (PEFT's
    `_compute_initial_shadow_state`). A function of its own so that the shared input embeddings it computes die
    with its frame: they do not require grad, so nothing in the graph keeps them, and PEFT's pre-hook frees them
    before the base model runs (held here until the loss, they were funcpeft's 1 MB above PEFT's peak)."""
    bb = spec.hyper.backbone
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args:
        input_ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    if input_ids is None and embeds is None:
        raise ValueError("Either `input_ids` or `inputs_embeds` must be provided.")
    if bb.share and embeds is None:
        embeds = module.get_input_embeddings()(input_ids)
    backbone_kwargs: dict[str, Any] = {"attention_mask": kwargs.get("attention_mask"), "use_cache": False}
    if kwargs.get("position_ids") is not None:
        backbone_kwargs["position_ids"] = kwargs["position_ids"]
    if embeds is not None:
        backbone_kwargs["inputs_embeds"] = embeds
    else:
        backbone_kwargs["input_ids"] = input_ids
    source: Any = embeds if embeds is not None else input_ids
    device = source.device
    weights = {k[len(_BACKBONE) :]: v for k, v in params.items() if k.startswith(_BACKBONE)}
    out = _run_backbone(ctx, _template(bb, device), weights, module.training, {**backbone_kwargs, "return_dict": True})
    seed: torch.Tensor = out.last_hidden_state
    return F.linear(seed, params[_PROJECTION]) if _PROJECTION in params else seed


def model_around(
    spec: Spec,
    params: Params,
    module: Any,
    run: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    ctx: AroundContext,
) -> Any:
    """The model call: s0 from the shadow backbone (PEFT's seed pre-hook), the model run with it in `ctx.scope`,
    then the auxiliary loss when labels are given (PEFT's `ShadowModel.forward`)."""
    bb = spec.hyper.backbone
    # Any cache is refused, empty or not (transformers 5 renames `past_key_values` to `cache`): an empty one would
    # only lead to a filled one on the next step, and a static cache (compiled decoding) reports length 0 while its
    # attention mask spans the whole cache, which the backbone (run without a cache) cannot take.
    pasts = {k: kwargs.get(k) for k in ("past_key_values", "cache") if kwargs.get(k) is not None}
    if pasts:
        (key, past), *_ = pasts.items()
        raise NotImplementedError(
            f"ShadowPEFT with a KV cache ({key}={type(past).__name__}, {_cache_length(past)} tokens): PEFT decodes "
            "incrementally with a paired base / shadow cache (ShadowCache), which funcpeft does not implement; run "
            "the full sequence each step (generate with use_cache=False; the compiled funcpeft.Decoder always "
            "decodes with a cache)"
        )
    ctx.scope[_SEED] = _initial_state(spec, params, module, args, kwargs, ctx)
    try:
        output = run(*args, **kwargs)
    finally:
        seed = ctx.scope.pop(_SEED)
    labels = kwargs.get("labels")
    if labels is not None and bb.lm_loss and getattr(output, "loss", None) is not None:
        logits = module.get_output_embeddings()(seed)
        shifted = logits[..., :-1, :].contiguous()
        loss = F.cross_entropy(
            shifted.view(-1, shifted.size(-1)), labels[..., 1:].contiguous().view(-1), ignore_index=-100
        )
        output.shadow_loss = loss.detach()
        if spec.hyper.aux_weight > 0:
            output.loss = output.loss + spec.hyper.aux_weight * loss
    return output


# -- the rest of the contract -------------------------------------------------------------------------------------
def _no_weight_op(*args: Any) -> NoReturn:
    raise NotImplementedError("ShadowPEFT wraps whole decoder blocks (module_around): it has no weight op")


def _refuse(what: str) -> Exception:
    if what == "unmerge":
        return NotImplementedError("ShadowPEFT does not support merging, so there is nothing to unmerge.")
    return NotImplementedError(
        "ShadowPEFT cannot be merged into the base model: the adaptation is an input-dependent, layer-space "
        "trajectory, not a static weight-space delta. Use `unload()` to recover the plain base model, or "
        "`unload_shadow()` for a standalone shadow model."
    )


def check_stack(specs: tuple[LayerSpec[Any], ...]) -> None:
    raise ValueError(
        f"ShadowPEFT requires exactly one active adapter, but got {len(specs)} adapters: call fn with one of them"
    )


def _renamed() -> tuple[tuple[str, str], ...]:
    """PEFT keeps the adapter name inside its keys, canonicalised to `default` (`_remove_adapter_name_from_key`)."""
    out = [(n, f"{n}.default.weight") for n in ("shadow_down", "shadow_up")]
    for leaf in _MLP_LEAVES:
        part, _, rest = leaf.partition(".")
        out.append((leaf, f"{part}.default.{rest}"))
    return tuple(out)


SHADOW = register(
    Method(
        name="shadow",
        config=ShadowConfig,
        hyper=hyper,
        param_names=param_names,
        init=init,
        forward=_no_weight_op,
        merge=MergeHooks(refuse=_refuse),
        keys=KeyRules(param_prefix="shadow_", unsuffixed=frozenset(), renamed=_renamed()),
        check_stack=check_stack,
        kinds=frozenset({LayerKind.MODULE}),
        module_targets=module_targets,
        module_around=block_around,
        model_around=model_around,
        shared_trainable=SharedParams(init=shared_init),
    )
)
