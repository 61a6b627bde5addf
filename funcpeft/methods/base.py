"""The method contract: what an adapter method is, as typed data (optax's `GradientTransformation` style).

funcpeft has two extension points:

**Weight-level methods** (`Method`: LoRA, DoRA, IA3, LoHa, LoKr, VeRA, ...) attach to layers that own a weight
(nn.Linear, GPT-2 Conv1D, nn.Embedding, nn.ConvNd). Generic code (funcpeft._targeting, _plan) finds the targeted
layers and describes each with a `LayerSpec` (static, hashable facts: kind, shapes, the method's typed
hyper-parameters); the method then supplies pure functions of `(spec, params, ...)`:

    hyper(config, target) -> H                          # the method's frozen hyper dataclass for one layer
    param_names(spec) -> ("lora_A", "lora_B")           # its trainable leaves at that layer
    init(spec, generator) -> {name: Tensor}             # fresh float32 CPU parameters
    forward(spec, params, x, result, ctx) -> Tensor     # the layer's output with the adapter applied
    delta_weight(spec, params) -> Tensor                # additive methods: W' = W + delta (merging, export)

At call time funcpeft puts an `AdaptedWeight` where the layer's weight was; when the layer runs its own op
(`F.linear`, ...) the op calls each adapter's `forward` with `result` = the output of the layer below it.
Everything else (targeting, files, merging, counting, routing, compile, vmap) is generic and reads only this
contract. Optional hooks are typed fields with defaults, grouped: `MergeHooks` (non-additive merges),
`SharedTensors` (frozen tensors shared by all layers and kept in `base`, e.g. VeRA's projections, made before any
layer's init; the per-layer init hooks get the layer's ones),
`KeyRules` (how PEFT names the parameters in its files).

**Input-level methods** (`InputMethod`: prompt tuning, P-tuning, prefix tuning, ...) do not touch any layer:
they rewrite the model call. Their adapter tree holds the virtual-token parameters (at `trees.PROMPT_PATH`);
before the model runs, `encode(spec, params, call, ctx)` computes the virtual tokens for the batch and
`prepare(spec, prompts, call, ctx)` returns a new `ModelCall` (e.g. `inputs_embeds` with virtual tokens
prepended, a longer `attention_mask` and `labels`, or `past_key_values` for prefix tuning), and
`finish(spec, call, output)` may post-process the output. The weight-level path is not bent for them.
See CONTRIBUTING.md for the checklist to add a method.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..configs import PeftConfig

Params = dict[str, torch.Tensor]
Dropout = Callable[[torch.Tensor, float], torch.Tensor]
H = TypeVar("H")


class LayerKind(enum.Enum):
    """The layer families funcpeft adapts; each has its own weight layout."""

    LINEAR = "linear"  # nn.Linear: weight (out, in)
    CONV1D_HF = "conv1d_hf"  # transformers' GPT-2 style Conv1D: weight (in, out)
    EMBEDDING = "embedding"  # nn.Embedding: weight (num_embeddings, dim)
    CONV = "conv"  # nn.Conv1d/2d/3d: weight (out, in / groups, *kernel)
    MHA = "mha"  # nn.MultiheadAttention (one in_proj_weight): in_proj_weight (3 * embed, embed), read as data
    PARAMETER = (
        "parameter"  # a bare nn.Parameter (target_parameters): (out, in), or experts (E, in, out) / (E, out, in)
    )
    MODULE = "module"  # a whole module (an attention block) whose forward the method wraps (Method.module_forward)
    # a quantised linear layer (bitsandbytes Linear4bit / Linear8bitLt): its weight is packed data read only by
    # its own kernel, so the adapters wrap the module's forward (`result` = the layer's own output) instead of
    # a weight op; weight_shape / in / out are the logical nn.Linear ones (out, in)
    QUANT_LINEAR = "quant_linear"

    @property
    def module_level(self) -> bool:
        """The layer's own forward is the base op (its weight is not a plain tensor any op could read): funcpeft
        runs the module as it is and applies the adapters to its output (PEFT's bnb layers: `base_layer(x)` + ...)."""
        return self is LayerKind.QUANT_LINEAR

    @property
    def out_dim(self) -> int:
        """The weight dimension holding the output features (for a bare parameter: see `ParameterGeometry`)."""
        return 1 if self in (LayerKind.CONV1D_HF, LayerKind.EMBEDDING) else 0

    @property
    def weight_name(self) -> str:
        """The module attribute holding the adapted weight."""
        return "in_proj_weight" if self is LayerKind.MHA else "weight"


# the kinds a method adapts unless it says otherwise (`Method.kinds`): every kind whose layer calls its own op
WEIGHT_OP_KINDS = frozenset({LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.EMBEDDING, LayerKind.CONV})


@dataclass(frozen=True)
class ConvGeometry:
    """How a conv layer calls its op (the base op's own arguments)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class EmbeddingGeometry:
    """nn.Embedding's call arguments."""

    padding_idx: int | None
    max_norm: float | None
    norm_type: float
    scale_grad_by_freq: bool
    sparse: bool


@dataclass(frozen=True)
class ParameterGeometry:
    """A targeted bare parameter (LayerKind.PARAMETER; PEFT's `lora.ParamWrapper`): how its shape is read.

    name: the parameter's name on its module (e.g. "gate_up_proj"). experts: E of a 3-D expert stack, 1 for a 2-D
    (out, in) parameter. swapped: the stack is stored (E, out, in) (PEFT: a 3-D parameter whose module does not say
    `is_transposed=True`, e.g. Mixtral); False: (E, in, out) (GPT-OSS) or 2-D.
    """

    name: str
    experts: int
    swapped: bool


@dataclass(frozen=True)
class ModuleGeometry:
    """A targeted whole module (LayerKind.MODULE). weight: the name, relative to the module, of the parameter whose
    device and dtype the adapter's parameters take: its first one (PEFT creates a wrapper's parameters there)."""

    weight: str


@dataclass(frozen=True)
class QuantGeometry:
    """A quantised linear layer (LayerKind.QUANT_LINEAR). backend: the library that packed it ("bitsandbytes",
    "torchao", "hqq": funcpeft._quant's names); weight: the module attribute holding the packed weight ("weight";
    HQQ's "W_q")."""

    backend: str
    weight: str


@dataclass(frozen=True)
class LayerSpec(Generic[H]):
    """Static facts about one adapted layer for one adapter (hashable; never holds a tensor).

    weight_shape: the base weight's shape. in_features / out_features: in nn.Linear orientation (for an
    embedding: num_embeddings / embedding_dim; for a conv: in / out channels). hyper: the method's frozen
    hyper-parameter dataclass for this layer (e.g. `LoraHyper(r, scaling, dropout, init)`).
    """

    method: str
    kind: LayerKind
    weight_shape: tuple[int, ...]
    in_features: int
    out_features: int
    hyper: H
    geometry: ConvGeometry | EmbeddingGeometry | ParameterGeometry | ModuleGeometry | QuantGeometry | None = None

    @property
    def weight_name(self) -> str:
        """The module attribute holding the adapted weight (the kind's, or a quantised layer's packed weight)."""
        return self.geometry.weight if isinstance(self.geometry, QuantGeometry) else self.kind.weight_name

    @property
    def quant(self) -> QuantGeometry:
        if not isinstance(self.geometry, QuantGeometry):
            raise TypeError(f"{self.method} on a {self.kind.value} layer is not a quantised layer")
        return self.geometry

    @property
    def conv(self) -> ConvGeometry:
        if not isinstance(self.geometry, ConvGeometry):
            raise TypeError(f"{self.method} on a {self.kind.value} layer has no conv geometry")
        return self.geometry

    @property
    def embedding(self) -> EmbeddingGeometry:
        if not isinstance(self.geometry, EmbeddingGeometry):
            raise TypeError(f"{self.method} on a {self.kind.value} layer has no embedding geometry")
        return self.geometry

    @property
    def parameter(self) -> ParameterGeometry:
        if not isinstance(self.geometry, ParameterGeometry):
            raise TypeError(f"{self.method} on a {self.kind.value} layer is not a bare-parameter target")
        return self.geometry

    @property
    def module(self) -> ModuleGeometry:
        if not isinstance(self.geometry, ModuleGeometry):
            raise TypeError(f"{self.method} on a {self.kind.value} layer is not a whole-module target")
        return self.geometry


class UnsupportedLayerError(TypeError, ValueError):
    """A method was asked to adapt a layer type it does not support (a TypeError; also a ValueError, as PEFT
    raises for some methods, so code written against PEFT keeps catching it)."""


@dataclass(frozen=True)
class Target:
    """A module a config targets, as `Method.hyper` sees it. common: `SharedTensors.common_hyper`'s result.

    owner: the targeted module this one is adapted along with, when it is not a target itself (PEFT wraps an
    nn.MultiheadAttention's `out_proj` with LoRA together with it); rank / alpha patterns follow the owner's name.
    for_checkpoint: the plan is made to load a saved adapter (PEFT's `from_pretrained` / `load_adapter`);
    a method whose saved layers differ in shape from fresh ones plans the saved shapes (AdaLoRA's ranks
    pruned by its rank_pattern, which PEFT resizes its layers to on load but not in `get_peft_model`).
    root: the whole model being planned (read-only), for layer facts that depend on it (ShadowPEFT).
    """

    name: str
    module: Any  # the nn.Module (typed Any: its attributes differ by layer kind)
    kind: LayerKind
    common: Any = None
    owner: Target | None = None
    for_checkpoint: bool = False
    # the model being planned (read-only), for a method whose layer facts depend on the whole model (ShadowPEFT's
    # backbone class and config, the model's hidden size); None where the planner does not give it
    root: Any = None


def no_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return x


def no_generator(device: torch.device) -> torch.Generator | None:
    return None


Generators = Callable[[torch.device], "torch.Generator | None"]


@dataclass(frozen=True)
class OpContext:
    """What a method's forward may use besides its params: never mutate any of it.

    weight: the plain base weight (same storage as the model's); base_op: `x -> base layer output` with the
    plain weight and the layer's own bias/args; dropout: `(x, p) -> x` (identity unless training randomness
    was requested); bias: the base layer's bias (None if it has none); inner_op: `x -> output of the layer
    below this adapter` (the base op plus the adapters applied before this one, like PEFT's nested tuner
    layers; `base_op` when this adapter is the first). generator: the call's randomness for a device, for
    methods that sample in training (MonteCLoRA): a `torch.Generator`, or None for the call's seeded fork of
    the global RNG (an int `dropout_rng`); draw from it only when `training`. call: this layer's entry of
    `Method.prepare_call`'s result (None without the hook). path: the adapted module's path. peers: the
    adapters this one reads at this layer (`Method.reads_adapters`): {adapter name: (its spec, its params)}.
    dense: for a module-level layer, `() -> its dequantised weight` (see `float_weight`); None otherwise. For such
    a layer `weight` is the packed quantised parameter and `base_op` its own forward.
    """

    weight: torch.Tensor
    base_op: Callable[[torch.Tensor], torch.Tensor]
    dropout: Dropout
    bias: torch.Tensor | None = None
    inner_op: Callable[[torch.Tensor], torch.Tensor] | None = None
    generator: Generators = no_generator
    call: Any = None
    path: str = ""
    peers: Mapping[str, tuple[LayerSpec[Any], Params]] = field(default_factory=dict)
    dense: Callable[[], torch.Tensor] | None = None

    def float_weight(self) -> torch.Tensor:
        """The base weight as a float tensor in its layout: `weight` itself, except for a module-level layer
        (`LayerKind.module_level`, a quantised linear), whose packed weight is dequantised by `dense` on each
        request (a weight-sized temporary: PEFT's DoRA on bitsandbytes layers dequantises per call too)."""
        return self.dense() if self.dense is not None else self.weight

    @property
    def training(self) -> bool:
        """True when `fn` was called with a dropout_rng (PEFT's `module.training`)."""
        return self.dropout is not no_dropout


# -- the hook types -------------------------------------------------------------------------------------------
class HyperFn(Protocol):
    def __call__(self, config: Any, target: Target, /) -> Any:
        """The method's hyper dataclass for `target`; TypeError naming the module for an unsupported layer kind."""


class ParamNamesFn(Protocol):
    def __call__(self, spec: LayerSpec[Any], /) -> tuple[str, ...]: ...


class InitFn(Protocol):
    def __call__(self, spec: LayerSpec[Any], generator: torch.Generator | None, /) -> Params:
        """Fresh float32 parameters (`torch.device("meta")` may be active: then only shapes matter)."""


class FinishInitFn(Protocol):
    def __call__(self, spec: LayerSpec[Any], params: Params, weight: torch.Tensor, shared: Params, /) -> Params:
        """Init that needs the base weight (DoRA's magnitude); `weight` is detached, never modify it. shared: the
        layer's frozen shared tensors ({param name: Tensor} as `SharedTensors.frozen_params` names them, made before
        any layer's init; FRoD's role basis V), empty for a method without them; read-only."""


class LayerFrozenFn(Protocol):
    def __call__(
        self, spec: LayerSpec[Any], module: nn.Module, generator: torch.Generator | None, shared: Params, /
    ) -> dict[str, torch.Tensor]:
        """A layer's frozen tensors (`LayerFrozen.make`) from its spec and base module; shared: as in `FinishInitFn`
        (FRoD's U solves against its role's V)."""


class _NoInitData:
    def __repr__(self) -> str:
        return "NO_INIT_DATA"


NO_INIT_DATA: Any = _NoInitData()  # what `init_from_weight` gets for a layer `init_data` has no entry for


@dataclass(frozen=True)
class WeightInit:
    """What `Method.init_from_weight` returns for one layer.

    params: the layer's fresh parameters; weight: its new base weight (same shape, layout, dtype and device as
    the old one) for inits that change it (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), None when it is unchanged.
    """

    params: Params
    weight: torch.Tensor | None = None


class InitFromWeightFn(Protocol):
    def __call__(
        self,
        spec: LayerSpec[Any],
        params: Params,
        weight: torch.Tensor,
        data: Any,
        generator: torch.Generator | None,
        /,
    ) -> WeightInit:
        """Init that reads the base weight and per-layer data: `params` is `init`'s result (on the weight's
        device), `weight` the current base weight (detached; never modify it), `data` the layer's entry of the
        `init_data` given to get_peft_model (`NO_INIT_DATA` when there is none)."""


class ForwardFn(Protocol):
    def __call__(
        self, spec: LayerSpec[Any], params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext, /
    ) -> torch.Tensor:
        """The layer output for input x; `result` is the output of the layer below (None if `uses_result` is False)."""


class ForwardPerExampleFn(Protocol):
    def __call__(
        self, spec: LayerSpec[Any], params: Params, x: torch.Tensor, result: torch.Tensor | None, ctx: OpContext, /
    ) -> torch.Tensor | None:
        """`forward` with a different adapter per example: every param has a leading batch dim B, x is (B, ...).

        Return None to use the generic path (vmap of `forward` over the examples)."""


class ModuleForwardFn(Protocol):
    def __call__(
        self,
        spec: LayerSpec[Any],
        params: Params,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        output: Any,
        /,
    ) -> Any:
        """A targeted whole module's output with the adapter applied (LayerKind.MODULE, `Method.module_forward`).

        module: the module as this call runs it: its parameters are the call's base tensors, so calling its
        sub-modules (`module.k_proj(x)`) runs them with the frozen base weights, and it must not be changed;
        args / kwargs: the module's call's inputs; output: what its own forward returned for them. Pure: the
        result depends only on these and `params`."""


@dataclass(frozen=True)
class AroundContext:
    """What a method that runs a whole module itself (`Method.module_around` / `Method.model_around`) may use.

    scope: a dict made fresh for each call of fn (or each bound model, `funcpeft.generate`) and shared by one
      adapter's arounds in that call: the state they carry from the model-level around into the modules and from
      one module to the next (ShadowPEFT's initial shadow state). Never kept between calls, so fn stays pure.
    index / count: this module's position among the adapter's whole-module targets, in plan (module) order, and
      their number; (0, 0) for the model-level around.
    dropout / generator: the call's randomness, as in `OpContext` (identity / None unless fn got a dropout_rng).
    run: `run(module, weights, training, kwargs)` calls `module(**kwargs)` with its parameters taken from `weights`
      ({name: Tensor}) on a per-call copy (funcpeft's call skeletons: concurrent calls never see each other's
      tensors; `training` is the copy's mode), never changing `module` (ShadowPEFT's backbone).
    """

    scope: dict[str, Any]
    index: int = 0
    count: int = 0
    dropout: Dropout = no_dropout
    generator: Generators = no_generator
    run: Callable[[nn.Module, dict[str, torch.Tensor], bool, dict[str, Any]], Any] | None = None

    @property
    def training(self) -> bool:
        """True when `fn` was called with a dropout_rng (PEFT's `module.training`)."""
        return self.dropout is not no_dropout


class ModuleAroundFn(Protocol):
    def __call__(
        self,
        spec: LayerSpec[Any],
        params: Params,
        module: nn.Module,
        run: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        ctx: AroundContext,
        /,
    ) -> Any:
        """A whole module's output, the method running the module itself: `run(*args, **kwargs)` runs it (its own
        forward with the call's base tensors) on inputs the method may change, and the method may change what it
        returns (ShadowPEFT's injected block input and carried shadow state). `module`: as in `ModuleForwardFn`
        (read-only). Pure given `params`, the inputs and `ctx.scope`."""


class ModuleTargetsFn(Protocol):
    def __call__(self, model: nn.Module, config: Any, match: Callable[[], list[str]], /) -> list[str]:
        """The paths of the whole modules a resolved config adapts, in `named_modules` order (the method's own
        rule, e.g. the top N attention blocks); raises PEFT's errors for a model or config it cannot adapt.
        match: PEFT's name matching of the config's target_modules over every module (for a method whose rule
        is PEFT's matching plus checks of its own)."""


class DeltaWeightFn(Protocol):
    def __call__(self, spec: LayerSpec[Any], params: Params, /) -> torch.Tensor:
        """The additive delta in the base weight's layout and shape (`weight_shape`)."""


class SharesFn(Protocol):
    def __call__(
        self, config: Any, layers: Sequence[tuple[str, LayerSpec[Any]]], /
    ) -> Mapping[str, tuple[tuple[str, str], ...]]:
        """{layer path: ((param name, path of the layer holding the leaf), ...)} for the layers that read some of
        their params from another layer of the same adapter (`Method.shares`). layers: the adapter's layers
        (module path, spec) in the model's module order; config: the resolved config."""


def _no_frozen_params(spec: LayerSpec[Any]) -> int:
    return 0


class ParameterValueFn(Protocol):
    def __call__(self, adapters: Sequence[tuple[LayerSpec[Any], Params]], weight: torch.Tensor, /) -> torch.Tensor:
        """The value a model reads for a targeted bare parameter `weight` with these adapters active, in order.

        Computed once per call and put where the parameter was, so every op that reads it sees the adapted value."""


class MergeWeightFn(Protocol):
    def __call__(
        self, spec: LayerSpec[Any], params: Params, weight: torch.Tensor, base_weight: torch.Tensor | None, /
    ) -> torch.Tensor:
        """W' for a non-additive method; `base_weight` is the unmerged weight when known (DoRA's norm needs it)."""


class MergeBiasFn(Protocol):
    def __call__(self, spec: LayerSpec[Any], params: Params, bias: torch.Tensor, /) -> torch.Tensor: ...


class MergeBiasFromBaseFn(Protocol):
    def __call__(
        self,
        spec: LayerSpec[Any],
        params: Params,
        bias: torch.Tensor,
        base_weight: torch.Tensor,
        base_bias: torch.Tensor,
        /,
    ) -> torch.Tensor:
        """The new bias from the current one, given the layer's weight and bias from before the first adapter of
        the same merge call (GLoRA's `b + b0 * D + E + W0 @ C`)."""


@dataclass(frozen=True)
class MergeHooks:
    """How a method merges when it is not `W + delta_weight` (all None: additive).

    weight / unweight: W -> W' and back (IA3 scales, DoRA renormalises); bias / unbias: the same for the
    layer's bias (IA3's output scaling). grouped_conv: whether an additive merge is valid on a conv with
    groups > 1 (PEFT refuses it for LoRA, but LoHa / LoKr build a full grouped kernel). refuse: for a method
    no single weight can represent (aLoRA's token-selective term, Arrow's per-token routing), `"merge" |
    "unmerge" -> the exception PEFT raises`.
    """

    weight: MergeWeightFn | None = None
    unweight: MergeWeightFn | None = None
    bias: MergeBiasFn | None = None
    unbias: MergeBiasFn | None = None
    grouped_conv: bool = False
    refuse: Callable[[str], Exception] | None = None
    # PEFT refuses to merge this method into a quantised layer (`LayerKind.module_level`): "merge" | "unmerge" ->
    # its exception (IA3: "Cannot merge ia3 layers when the model is loaded in 4-bit mode")
    refuse_quantised: Callable[[str], Exception] | None = None
    # merging into (or unmerging from) a quantised layer warns about the re-quantisation's rounding, as PEFT's own bnb
    # layers do (lora.bnb: "... may get different generations due to rounding errors"); False where PEFT merges
    # through its generic quantisation backend (peft/utils/quantization_utils.py), which does not warn
    rounding_warning: bool = True
    # whether merging this layer must also write into the layer's bias (LoRA's lora_B bias): merging a layer
    # without a bias then raises (PEFT's RuntimeError) instead of dropping that term
    needs_bias: Callable[[LayerSpec[Any]], bool] = lambda spec: False
    # module path -> the exception such a merge raises (PEFT's own message); None: LoRA's lora_bias RuntimeError
    missing_bias: Callable[[str], Exception] | None = None
    # `weight` gets, as its `base_weight`, the layer's weight before the first adapter of the same merge call (HiRA
    # scales every adapter's delta by that W0: PEFT's `W + W0 * sum_i delta_i`); otherwise None
    from_base: bool = False
    # a bias merge that reads the layer's weight and bias from before the first adapter of the same merge call
    # (GLoRA's bias depends on W0); used where `bias` is None. Its unmerge needs the original base (`unmerge(base=)`)
    bias_from_base: MergeBiasFromBaseFn | None = None


@dataclass(frozen=True)
class SharedParams:
    """TRAINABLE tensors shared by all of an adapter's layers (VB-LoRA's vector bank).

    They live once in the adapter tree, under the reserved path `funcpeft._trees.SHARED_PATH` ('<shared>'), so
    they are trained, counted, stacked and routed like any leaf; every layer of the method finds them in its
    `params` (forward, delta_weight) next to its own. PEFT keeps such tensors on its tuner model and saves
    them as `base_model.{name}`.
    init(spec, generator) -> {name: Tensor}: fresh float32 values (spec: one of the adapter's layers; its hyper
      carries what the draw needs).
    per_layer_draw: PEFT draws them again before each layer's own parameters and keeps the last draw
      (VB-LoRA's `_create_and_replace`); True reproduces PEFT's random stream, so a seeded init equals PEFT's.
    """

    init: InitFn
    per_layer_draw: bool = False


@dataclass(frozen=True)
class LayerFrozen:
    """Frozen tensors of each adapted layer that belong to the adapter but are never trained (SHiRA's mask
    indices, trainable tokens' original rows, MiCA's lora_B, KaSA's truncated weight, the persistent buffers PEFT
    saves: VeLoRA's projection, MonteCLoRA's sampler state).

    They live in `base` under reserved keys (`funcpeft._trees.layer_frozen_key(adapter_name, path, name)`), not
    in the adapter tree; each layer's forward / delta_weight / merge hooks find them in `params`.
    names: every name the method keeps (a checkpoint key ending in one is such a tensor, not a leaf); names may
      be dotted (a PEFT sub-module's buffer, `sampler.gaussian_var_prior`).
    select(spec) -> the names one layer holds, when not all of `names` (MiCA: lora_B or lora_embedding_B);
    make(spec, module, generator, shared) -> {name: Tensor}: the layer's tensors, computed at get_peft_model time
      from its spec and its base module (e.g. a mask function or an SVD of the weight), on the weight's device, in the
      dtype the method needs; a random one draws from `generator` (the adapter's, None: the global RNG; VeLoRA's
      random projection) after every layer's params; meta tensors for a meta-device weight, and a meta tensor
      marks a value only a checkpoint can provide. shared: the layer's frozen shared tensors (`FinishInitFn`).
    saved: PEFT writes them into its files (`base_model.model.{path}.{KeyRules.tail(name)}`) and a checkpoint's
      values replace the computed ones (funcpeft.from_pretrained). Unsaved ones exist only in funcpeft (KaSA:
      PEFT rewrote its base weight instead).
    counted: PEFT keeps them as frozen nn.Parameters (MiCA's lora_B), counted among all (not trainable)
      parameters; otherwise buffers or plain attributes, not counted.
    autocast: `autocast_adapter_dtype` upcasts them like the adapter's parameters (PEFT's upcast covers a
      layer's own BufferDicts: VeLoRA's projection; not a sub-module's buffers: MonteCLoRA's).
    held(leaf names) -> the names a layer holds, from its adapter tree entry's leaf names, for code that has the
      tree but not the plan (saving a checkpoint); needed when a layer may hold none of `names` (GLoRA's zero
      buffers exist only for its unparametrised paths). None: a layer holds at least one of them.
    """

    names: tuple[str, ...]
    make: LayerFrozenFn
    saved: bool = True
    autocast: bool = False  # like the adapter's params, fp16/bf16 ones become float32 under autocast_adapter_dtype
    counted: bool = False
    select: Callable[[LayerSpec[Any]], tuple[str, ...]] | None = None
    held: Callable[[Collection[str]], tuple[str, ...]] | None = None

    def of(self, spec: LayerSpec[Any]) -> tuple[str, ...]:
        """The names layer `spec` holds."""
        return self.select(spec) if self.select is not None else self.names


@dataclass(frozen=True)
class Tying:
    """How a method's adapter on the input embedding also applies to the layers whose weight is tied to it
    (lm_head). Tied layers carry no leaves of their own (funcpeft._plan.PlanEntry.tied); PEFT saves their
    params under their own path too.

    params(the embedding layer's params) -> the tied layer's params (leaves may carry leading batch dims):
      LoRA transposes (lm_head's lora_A = lora_embedding_B^T), trainable tokens uses the same rows.
    on_request: True: only the layers the config asks to tie (LoraConfig(ensure_weight_tying=True): its
      `target_modules_to_tie`); False: every layer the model ties to a targeted input embedding
      (`tie_word_embeddings` and `_tied_weights_keys`: PEFT's trainable tokens rule).
    counted: PEFT gives each tied layer its own nn.Parameters (sharing storage with the embedding's: LoRA), so
      its params are counted again; False: the tied layer reuses the embedding layer's parameter objects.
    """

    params: Callable[[Params], Params]
    on_request: bool = False
    counted: bool = False


@dataclass(frozen=True)
class FileCodec:
    """How a method's tensors are stored when PEFT does not write one tensor per leaf (VB-LoRA's
    `save_only_topk_weights`). Both act on a whole `{checkpoint key: Tensor}` state and leave keys they do not
    own alone: encode(config, state) -> the file's state; decode(config, tensors) -> the state `encode` got
    (as far as the file keeps it)."""

    encode: Callable[[Any, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    decode: Callable[[Any, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SharedTensors:
    """Frozen tensors shared by all of an adapter's layers (VeRA's random projections).

    They live in `base` under reserved keys (funcpeft._trees.SHARED_PREFIX), never in the adapter tree, and
    are not counted as parameters (PEFT keeps them as buffers).
    common_hyper(config, {name: module}) -> value handed to `hyper` as `Target.common` (e.g. their shapes);
    frozen_params(spec) -> ((param name, base key), ...): what a layer's forward reads from `base`;
    make(spec) -> {base key: Tensor}: the tensors, reproducibly from the config (called for each layer whose
    `frozen_params` keys are not made yet, so per-layer tensors such as FourierFT's spectral indices work too);
    from_layers({module path: (spec, module)}) -> {base key: Tensor}: instead of `make`, for tensors that depend on
      several layers' weights (FRoD's basis V per role, from all of the role's weights): called once per plan with
      every layer of the adapter the method adapts, in plan order, on the device of the layers reading each tensor.
    Both run before any layer's own init: the per-layer hooks `Method.finish_init` and `LayerFrozen.make` get the
    layer's frozen shared tensors (`frozen_params`' names) as their `shared` argument.
    file_keys(config, shared base keys) -> {checkpoint key: base key}: the ones PEFT writes into its files;
    layer_file_keys(config, shared base keys, adapted module paths) -> {checkpoint key: base key}: copies PEFT
    also writes under each adapted layer (RandLoRA's bases, which every layer references).
    saved(config) -> bool: whether PEFT's files hold them under this config (then saving needs them from `base`).
    layer_dtype: PEFT keeps them in BufferDicts that each adapted layer moves to its base weight's dtype
      (`BaseTunerLayer._move_adapter_to_device_of_base_layer`) and that `autocast_adapter_dtype` then upcasts
      (fp16 / bf16 -> float32): on a half-precision model their floating values are rounded to it. `make` gives
      the float32 draw; `funcpeft._plan.init_shared` applies both casts. False where PEFT's layer keeps them in
      the dtype `make` gives (FRoD overrides that move).
    """

    common_hyper: Callable[[Any, Mapping[str, nn.Module]], Any]
    frozen_params: Callable[[LayerSpec[Any]], tuple[tuple[str, str], ...]]
    make: Callable[[LayerSpec[Any]], dict[str, torch.Tensor]] | None = None
    file_keys: Callable[[Any, list[str]], dict[str, str]] = lambda config, keys: {}
    saved: Callable[[Any], bool] = lambda config: False
    layer_file_keys: Callable[[Any, list[str], list[str]], dict[str, str]] = lambda config, keys, paths: {}
    layer_dtype: bool = True
    from_layers: Callable[[Mapping[str, tuple[LayerSpec[Any], nn.Module]]], dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if (self.make is None) == (self.from_layers is None):
            raise TypeError("SharedTensors: give exactly one of make (per layer) and from_layers (from all layers)")


@dataclass(frozen=True)
class CallInputs:
    """What a method's `prepare_call` sees of one `fn` call, before the model runs.

    args / kwargs: the model call's arguments (the method's own `call_kwargs` included); training: whether
    the call has training randomness (`dropout_rng`); generator: the call's randomness, as `OpContext.generator`.
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    training: bool = False
    generator: Generators = no_generator


class PrepareCallFn(Protocol):
    def __call__(self, layers: Mapping[str, tuple[LayerSpec[Any], Params]], call: CallInputs, /) -> Mapping[str, Any]:
        """Per-call data of one adapter, computed once before the model runs from the call's inputs: `{module
        path: what that layer's forward gets as ctx.call}` (aLoRA's invocation offsets from input_ids).
        layers: the adapter's layers of this method, in plan order, with their params."""


LORA_UNSUFFIXED = frozenset({"lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})


@dataclass(frozen=True)
class KeyRules:
    """How PEFT names a method's parameters in its checkpoint files (see funcpeft.io.keys).

    param_prefix: every parameter name starts with it (PEFT's `prefix`, e.g. "lora_", "hada_");
    unsuffixed: names saved without a trailing `.weight` (nn.Parameter / ParameterDict entries in PEFT);
    copies_part: set for a method whose adapter is a trainable copy of each targeted module's own parameters
    (PEFT's LN tuning): PEFT saves them as `{path}.{copies_part}.{param}` (e.g. `ln_tuning_layers`), and any
    module, not only a layer with a weight op, may be targeted (see `Method.copies_modules`);
    indexed: parts saved as ModuleLists of nn.Linear, `{path}.{part}.{i}.weight` (leaf `{part}.{i}`).
    """

    param_prefix: str = "lora_"
    unsuffixed: frozenset[str] = LORA_UNSUFFIXED
    # (leaf name, key tail) for leaves PEFT saves under another tail, e.g. ("lora_B_bias", "lora_B.bias")
    renamed: tuple[tuple[str, str], ...] = ()
    copies_part: str | None = None
    # parts PEFT keeps as `ModuleDict[adapter] -> ModuleList` of nn.Linear (PEANuT's encoders): leaf `{part}.{i}`
    # is saved as `{part}.{i}.weight`
    indexed: frozenset[str] = frozenset()

    def is_method_param(self, name: str) -> bool:
        return name in self.unsuffixed or name.startswith(self.param_prefix) or name in dict(self.renamed)

    def tail(self, name: str) -> str:
        """What follows the module path in the checkpoint key of method parameter `name`."""
        renamed = dict(self.renamed)
        if name in renamed:
            return renamed[name]
        return name if name in self.unsuffixed else f"{name}.weight"


def _always(*_: Any) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """A weight-level adapter method (see the module docstring). One instance per method, `register`ed once.

    name: unique, stored in each LayerSpec. config: its config class (PEFT's name and fields); `accepts`
    picks among methods sharing a config (DoRA is `LoraConfig(use_dora=True)`). delta_weight: None for a
    method that is not additive (it then needs `merge.weight` / `merge.unweight` to merge). uses_result:
    False for a layer where `forward` calls `ctx.inner_op` itself (IA3 scaling a feed-forward layer's input).
    mixed_compatible: whether PEFT's PeftMixedModel accepts the method's config type. outermost_first: for a
    method that transforms the layer's input (uses_result False) and whose PEFT layer applies several of its
    active adapters to the input in activation order, the first adapter's transform meeting the input first
    (OFT's loop): a run of consecutive adapters of the method on one layer is then nested outermost-first
    instead of innermost-first (funcpeft._weights.nesting_order).
    shared_trainable: trainable tensors all its layers share (`SharedParams`, VB-LoRA's vector bank).
    layer_frozen: frozen per-layer tensors of the adapter (`LayerFrozen`: SHiRA's mask indices, MiCA's lora_B).
    codec: how PEFT stores its tensors when not one per leaf (`FileCodec`).
    tie: how the adapter of an input embedding also applies to the layers whose weight is tied to it (`Tying`:
      lm_head; LoRA with ensure_weight_tying, trainable tokens); None: the method does not tie.
    nests: whether, in a mixed model, it may wrap a layer another method already adapted (PEFT's SHiRA may
      not: "SHiRA does not support nested base layers").
    check_stack: called with the specs of every adapter of this method applied to one layer in one call or
      merge (innermost first); raises to refuse the combination (trainable tokens: overlapping indices).
    prepare_call: per-call data from the call's inputs (see `PrepareCallFn`); call_kwargs: keyword arguments
      of `fn` the method consumes instead of the model (PEFT's special forward arguments, e.g. `alora_offsets`),
      read by prepare_call.
    reads_adapters(spec) -> names of other registered adapters whose layers this one reads (`OpContext.peers`)
      instead of them being applied (Arrow's router reads its experts): in a call that passes them, only the
      reader is applied (PEFT: only it is active).
    kinds: the layer kinds `hyper` handles; other targets raise UnsupportedLayerError before `hyper` sees them.
    quant_backends: with LayerKind.QUANT_LINEAR in `kinds`, the libraries whose quantised layers the method adapts
      (`QuantGeometry.backend`; PEFT's dispatchers differ by method: bitsandbytes only for most); others are refused
      with an error naming the layer, its library and the methods that take it.
    torchao_needs_requantiser: the method adapts quantised layers through PEFT's generic backend
      (`resolve_quantization_backend`), which raises ValueError when the layer is built for a torchao layer of a
      model without `get_apply_tensor_subclass` (one quantised by hand with `quantize_`, not loaded by transformers
      with a TorchAoConfig); LoRA's TorchaoLoraLinear only warns (then refuses to merge): False.
    changes_base: the adapter changes the base layer itself (KaSA truncates W), so "no adapter" is ambiguous
      for one example of a routed batch (PEFT gives it the changed base): per-example routing refuses -1.
    frozen_count: values PEFT registers per layer as frozen parameters that funcpeft keeps as constants of
      the spec (AdaLoRA's `ranknum`): counted in "all params" like PEFT's.
    init_from_weight: init from the base weight and per-layer data (get_peft_model's `init_data`), which may
      also replace the layer's base weight (the new weight goes into `base`; the model is untouched); it runs
      after `init` and before `finish_init`, which then sees the new weight.
    parameter_value: how the method adapts a bare parameter (LayerKind.PARAMETER, e.g. LoraConfig's
    `target_parameters`: MoE expert stacks that no Linear owns). Such a target has no op of its own, so `forward`
    is not used for it: `fn` computes W' = parameter_value([(spec, params), ...], W) once per call and the model
    reads W' wherever it reads the parameter; merging uses `delta_weight`. None: the method cannot target bare
    parameters (planning raises UnsupportedLayerError).
    module_forward: for a method that adapts whole modules rather than a layer's weight op (Llama-Adapter's
      gated attention over learned prompts, PEFT's AdaptionPrompt): the module's forward runs as it is, then
      `module_forward(spec, params, module, args, kwargs, output)` returns the adapted output (see
      `ModuleForwardFn`); its targets are LayerKind.MODULE, chosen by `module_targets` (not `target_modules`
      matching), and `forward` / `delta_weight` are never called.
    module_forward_per_example: `module_forward` with every param carrying a leading batch dim B (example i's
      adapter), for per-example routing (funcpeft.routing; examples routed to no adapter get the module's own
      output); None: per-example routing refuses the method.
    module_targets: the method's own target rule for whole modules (`ModuleTargetsFn`); required with
      `module_forward`.
    shares: trainable params some layers share with another layer of the same adapter (Lily: an A per
      `stride_A` consecutive layers of a target, one B for all of them; see `SharesFn`). A shared leaf lives once,
      in the tree entry of the layer holding it, and the others read it there (so it is trained, counted, stacked
      and routed once, like PEFT's shared modules, which `named_parameters` lists once); `init` still draws every
      layer's own copy (PEFT builds them all, then replaces them, so the random stream stays PEFT's) and the
      copies of the reading layers are dropped; PEFT's files hold the shared tensor under every layer's path.
    """

    name: str
    config: type[PeftConfig]
    hyper: HyperFn
    param_names: ParamNamesFn
    init: InitFn
    forward: ForwardFn
    delta_weight: DeltaWeightFn | None = None
    accepts: Callable[[Any], bool] = _always
    finish_init: FinishInitFn | None = None
    # finish_init runs on `init`'s float32 draws, before the fresh adapter is rounded through the layer's dtype
    # (PEFT computes such an init inside `update_layer`, before `_move_adapter_to_device_of_base_layer`: DeFT's R)
    finish_init_first: bool = False
    # init that reads the whole base module (weight and bias) and draws from the generator, after `init` and before
    # `init_from_weight`: (spec, params, module, generator) -> params (AdaMSS: an SVD of [W | b], then its draws)
    init_from_module: Callable[[LayerSpec[Any], Params, nn.Module, torch.Generator | None], Params] | None = None
    init_from_weight: InitFromWeightFn | None = None
    uses_result: Callable[[LayerSpec[Any]], bool] = _always
    forward_per_example: ForwardPerExampleFn | None = None
    merge: MergeHooks = field(default_factory=MergeHooks)
    shared: SharedTensors | None = None
    keys: KeyRules = field(default_factory=KeyRules)
    mixed_compatible: bool = False
    outermost_first: bool = False
    shared_trainable: SharedParams | None = None
    layer_frozen: LayerFrozen | None = None
    codec: FileCodec | None = None
    tie: Tying | None = None
    nests: bool = True
    check_stack: Callable[[tuple[LayerSpec[Any], ...]], None] | None = None
    prepare_call: PrepareCallFn | None = None
    call_kwargs: frozenset[str] = frozenset()
    reads_adapters: Callable[[LayerSpec[Any]], tuple[str, ...]] | None = None
    kinds: frozenset[LayerKind] = WEIGHT_OP_KINDS
    quant_backends: frozenset[str] = frozenset({"bitsandbytes"})
    torchao_needs_requantiser: bool = False
    changes_base: bool = False
    frozen_count: Callable[[LayerSpec[Any]], int] = _no_frozen_params
    parameter_value: ParameterValueFn | None = None
    module_forward: ModuleForwardFn | None = None
    module_targets: ModuleTargetsFn | None = None
    module_forward_per_example: ModuleForwardFn | None = None
    shares: SharesFn | None = None
    # a whole-module adapter that runs its module itself (`ModuleAroundFn`): it may change the module's inputs and
    # outputs (ShadowPEFT's decoder blocks); targets LayerKind.MODULE chosen by `module_targets`, like module_forward
    module_around: ModuleAroundFn | None = None
    # `ModuleAroundFn` around the whole model's forward, once per model call, for an adapter whose method has
    # `shared_trainable` params (they are its `params`; `spec`: the adapter's first layer): it sees the model's own
    # inputs (input_ids, labels, ...) and output, and fills `ctx.scope` for the module arounds (ShadowPEFT's shadow
    # backbone seeding the shadow state, and its auxiliary loss)
    model_around: ModuleAroundFn | None = None
    # PEFT upcasts fp16 / bf16 adapter parameters to float32 under `autocast_adapter_dtype` (BaseTuner's
    # _cast_adapter_dtype); False for a method whose PEFT model has no such cast (AdaptionPrompt keeps the model's dtype)
    autocast: bool = True

    def __post_init__(self) -> None:
        wraps = self.module_forward is not None or self.module_around is not None
        if wraps != (self.module_targets is not None):
            raise TypeError(
                f"method {self.name!r}: module_forward (or module_around) and module_targets go together "
                "(whole-module targets)"
            )
        if self.model_around is not None and self.shared_trainable is None:
            raise TypeError(f"method {self.name!r}: model_around reads the adapter's shared_trainable params")

    @property
    def peft_type(self) -> str:
        return self.config.type_name()

    @property
    def wraps_modules(self) -> bool:
        """The method adapts whole modules by wrapping their forward (`module_forward` / `module_around`), not a
        layer's weight op."""
        return self.module_forward is not None or self.module_around is not None

    @property
    def copies_modules(self) -> bool:
        """The adapter is a trainable copy of each targeted module's parameters (`KeyRules.copies_part`)."""
        return self.keys.copies_part is not None


# -- input-level methods (prompt learning) ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCall:
    """The arguments of one model call, as an input-level method sees and rewrites them.

    extra: what `prepare` hands to `finish` besides the model's arguments (never passed to the model; CPT's
    token-type mask for its loss)."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputContext:
    """What an input-level method's hooks may read besides their params (never mutate any of it).

    model: the model (read-only: its config, the word-embedding module's call arguments); base: the
    `{parameter name: Tensor}` tree of the call (read the word embedding's weight from it, not from the model);
    training: the call has training randomness (`dropout_rng`); dropout: `(x, p) -> x`, identity unless training.
    """

    model: nn.Module
    base: Mapping[str, torch.Tensor]
    training: bool = False
    dropout: Dropout = no_dropout


class InputPlanFn(Protocol):
    def __call__(self, model: nn.Module, config: Any, /) -> tuple[Any, Any]:
        """(the config resolved against `model` (a new config), the adapter's spec: hashable static facts)."""


class InputEncodeFn(Protocol):
    def __call__(self, spec: Any, params: Params, call: ModelCall, ctx: InputContext, /) -> torch.Tensor:
        """The virtual tokens' values for the call's batch, (B, ...): e.g. (B, num_virtual_tokens, token_dim)."""


class InputPrepareFn(Protocol):
    def __call__(self, spec: Any, prompts: torch.Tensor, call: ModelCall, ctx: InputContext, /) -> ModelCall:
        """The model call with the virtual tokens `prompts` (B, ...) applied (one row per example)."""


@dataclass(frozen=True)
class InputMethod:
    """An input-level adapter method (prompt learning): it rewrites the model call instead of adapting layers.

    Its adapter tree has one entry, at `funcpeft._trees.PROMPT_PATH` ('<prompt>'), holding the virtual-token
    parameters (and an encoder's), named as in PEFT's prompt encoder module (`embedding.weight`,
    `mlp_head.0.weight`, ...); modules_to_save copies (the classifier of SEQ_CLS) are entries of their own as
    for any method. A call of `fn` runs

        prompts = encode(spec, params, call, ctx)          # (B, ...), e.g. an MLP of the virtual-token embeddings
        call = prepare(spec, prompts, call, ctx)          # e.g. inputs_embeds with them prepended, longer masks
        output = finish(spec, call, model(*call.args, **call.kwargs))

    so per-example prompts (`funcpeft.per_example`) are `encode` vmapped over the stacked trees and gathered
    per example, and everything stays a pure function of (base, params, inputs): vmap, grad, compile apply.

    plan(model, config) -> (resolved config, spec). shapes(spec) -> ((leaf name, shape), ...): the tree entry's
    leaves. init(spec, model, generator) -> {leaf: float32 Tensor} with PEFT's draws (model: read-only, e.g. the
    word embedding for SAMPLE_VOCAB / TEXT inits). file_state(spec, params) -> {checkpoint key: Tensor} (PEFT's
    `prompt_embeddings`, ...); load_state(spec, tensors, fresh) -> params from a checkpoint (`fresh`: a new init,
    for leaves the file does not hold). call_kwargs: keyword arguments of `fn` it consumes (task_ids).
    prepare_generate(spec, prompts, call, ctx) -> the arguments of the model's `generate` (funcpeft.generate)
    for generate arguments `call` (None: the method cannot generate); finish_generate(spec, call, output) -> what
    PEFT's generate returns (e.g. the prompt's input_ids in front of the new tokens), `call` being the original.
    """

    name: str
    config: type[PeftConfig]
    plan: InputPlanFn
    shapes: Callable[[Any], tuple[tuple[str, tuple[int, ...]], ...]]
    init: Callable[[Any, nn.Module, torch.Generator | None], Params]
    encode: InputEncodeFn
    prepare: InputPrepareFn
    file_state: Callable[[Any, Params], dict[str, torch.Tensor]]
    load_state: Callable[[Any, Mapping[str, torch.Tensor], Params], Params]
    finish: Callable[[Any, ModelCall, Any], Any] = lambda spec, call, output: output
    prepare_generate: InputPrepareFn | None = None
    finish_generate: Callable[[Any, ModelCall, Any], Any] = lambda spec, call, output: output
    accepts: Callable[[Any], bool] = _always
    keys: KeyRules = field(default_factory=KeyRules)
    mixed_compatible: bool = False
    call_kwargs: frozenset[str] = frozenset()
    # frozen(spec) -> the leaves PEFT keeps with requires_grad=False (its prompt encoder's frozen parameters: CPT's
    # initial embedding, Cartridge's frozen tokens, and in inference mode its trained ones): created and loaded
    # with requires_grad=False and counted as frozen; `encode` must not let gradients reach the always-frozen ones
    frozen: Callable[[Any], frozenset[str]] = lambda spec: frozenset()

    @property
    def peft_type(self) -> str:
        return self.config.type_name()
