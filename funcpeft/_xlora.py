"""X-LoRA (PEFT's XLoraModel, peft/tuners/xlora/model.py + classifier.py), functionally.

    pm = funcpeft.get_peft_model(model, funcpeft.XLoraConfig(hidden_size=h, adapters={"0": dir0, "1": dir1}))
    fn, base, adapter = pm          # adapter: {"classifier": {...}} (+ "experts" with use_trainable_adapters)
    out = fn(base, adapter, input_ids=ids)            # both passes, one pure call
    s = fn.scalings(base, adapter, input_ids=ids)     # PEFT's get_latest_scalings(): (B, T, n_layers, n_experts)

The LoRA experts are the saved adapters of `config.adapters`, loaded in order as adapters "0", "1", ... (PEFT's
names). One call of `fn` runs, like PEFT's forward pre-hook:

1. the scaling pass, without gradient (PEFT: torch.no_grad): the model with every X-LoRA layer mixing the experts
   with the constant scalings `scaling_pass_value` (B, T, n_layers, n_experts) (top-k and softmax-top-k applied
   as in the real pass), `output_hidden_states=True`;
2. the classifier on the last hidden state (B, T, hidden): Linear layers (ReLU, Dropout between when
   xlora_depth > 1) -> logits (B, T, n_experts) or, layerwise, (B, T, n_layers * n_experts); broadcast / reshaped
   to (B, T, n_layers, n_experts); softmax(logits / softmax_temperature) with enable_softmax;
3. the real pass with those scalings (funcpeft.methods.xlora mixes the experts at each layer).

Trees: the classifier is `adapter["classifier"]` = {"layers.<i>": {"weight", "bias"}} (PEFT's Sequential indices).
Frozen experts (use_trainable_adapters=False, PEFT's default, requires_grad=False there) are not in the tree: `fn`
holds them (`fn.experts`), so no gradient or optimizer can reach them. With use_trainable_adapters=True they are
`adapter["experts"]` = {"0": LoRA tree, ...}, trained with the classifier.

Files (PEFT's layout): `adapter_config.json` (the XLoraConfig), `adapter_model.safetensors` with the classifier
as `base_model.internal_xlora_classifier.layers.<i>.{weight,bias}`, and each expert as a LoRA adapter in
`<directory>/<i>/`. Deviation: PEFT's save drops every classifier key containing `.<i>.` for an expert name i
(its adapter-name filter), e.g. `layers.0.*` (all of a depth-1 classifier); funcpeft writes every key, and
loading a file that misses some raises (strict) or keeps the fresh ones with a warning (strict=False, PEFT's silent
behaviour). PEFT works only with experts named "0".."n-1" (its set_adapter uses the names of `adapters`, its layers hold
"0".."n-1": its forward fails with KeyError); funcpeft mixes the experts of `adapters` in order whatever their
names. PEFT cannot load experts of models whose layers are not under `model.` (GPT-2's `transformer.`: 'Got
unexpected keys!'); funcpeft can.

Compile: `torch.compile(fn, fullgraph=True)` is one graph; building installs transformers' output-capturing hooks on
the model (what its first plain call with output_hidden_states does; dynamo cannot). Generation (`generate`): both
passes over the whole sequence per step, no KV cache, as PEFT. Training mode: one randomness per call, drawn by the
scaling pass, the classifier and the real pass in turn (PEFT's order). Saves are one unit (funcpeft.io.save_files).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ._config import LoraConfig, PeftConfig
from ._counting import count_parameters, format_trainable
from ._functional import PeftFunction
from ._generation import generation_randomness
from ._model import FunctionalPeftModel, from_pretrained
from ._plan import Plan, PlanEntry, init_adapter, layer_spec
from ._trees import tree_numel
from .configs.xlora import XLoraConfig
from .io import adapter_files, config_dict, read_config, read_tensors, save_files
from .methods._registry import register_model_level
from .methods.base import LayerKind, Target
from .methods.xlora import SCALINGS_KWARG, XLORA, XLoraLayers
from .rng import CallRandomness, redirect
from .routing import MixedBatch, PerExample

LAYERS = "xlora"  # the parameterless adapter of the mixing layers
CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier."
_MIXABLE = (LayerKind.LINEAR, LayerKind.CONV1D_HF, LayerKind.EMBEDDING)


def classifier_layout(config: XLoraConfig, n_layers: int, n_experts: int) -> list[tuple[str, int, int]]:
    """[(Sequential index path, in, out)] of the classifier's Linear layers, as PEFT's XLoraClassifier builds them."""
    if config.xlora_depth <= 0:
        raise ValueError("X-LoRA depth must be strictly positive.")
    hidden = config.hidden_size
    assert hidden is not None  # __post_init__ fills it
    out = n_experts * n_layers if config.layerwise_scalings else n_experts
    if config.xlora_depth == 1:
        return [("layers.0", hidden, out)]
    step = 3 if config.xlora_dropout_p > 0.0 else 2  # Linear, ReLU(, Dropout)
    sizes = [hidden] + [config.xlora_size] * (config.xlora_depth - 1) + [out]
    return [(f"layers.{i * step}", sizes[i], sizes[i + 1]) for i in range(config.xlora_depth)]


def init_classifier(
    layout: list[tuple[str, int, int]],
    dtype: torch.dtype,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, torch.Tensor]]:
    """nn.Linear's default init (kaiming_uniform a=sqrt(5): U(+-1/sqrt(in)) for weight and bias), in order, drawn on
    the CPU (PEFT's values for the same seed) and put on `device` (the model's)."""
    tree = {}
    for path, fan_in, fan_out in layout:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        w = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)
        b = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        tree[path] = {
            "weight": w.to(device=device, dtype=dtype).requires_grad_(),
            "bias": b.to(device=device, dtype=dtype).requires_grad_(),
        }
    return tree


def _call_randomness(dropout_rng: Any) -> CallRandomness | None:
    """One randomness for the whole X-LoRA call (None in eval mode): the scaling pass, the classifier's dropout and
    the real pass draw from it in turn, as PEFT's do from the global RNG (an int seed: on CPU the masks equal
    PEFT's train-mode masks after torch.manual_seed(seed)). Each pass seeding its own generator from the same int
    would give the real pass the scaling pass's masks again."""
    if dropout_rng is None or isinstance(dropout_rng, CallRandomness):
        return dropout_rng
    if isinstance(dropout_rng, torch.Generator):
        return CallRandomness(user_generator=dropout_rng)
    if isinstance(dropout_rng, bool) or not isinstance(dropout_rng, int):
        raise TypeError(f"dropout_rng must be None, an int seed or a torch.Generator, got {dropout_rng!r}")
    return CallRandomness(seed=dropout_rng)


class XLoraFunction:
    """`fn(base, adapter, *args, dropout_rng=None, **kwargs)`: X-LoRA's two passes (module docstring), pure."""

    def __init__(
        self,
        inner: PeftFunction,
        config: XLoraConfig,
        experts: tuple[str, ...],
        n_layers: int,
        frozen: dict[str, Any] | None,
        dtype: torch.dtype,
    ):
        self.inner = inner
        self.config = config
        self.expert_names = experts
        self.n_layers = n_layers
        self.experts = frozen  # the frozen experts' trees (None when they are trained: then in the adapter)
        self.dtype = dtype
        self.layer_tree: dict[str, dict[str, torch.Tensor]] = {p: {} for p in inner.plans[LAYERS]}
        self.layout = classifier_layout(config, n_layers, len(experts))
        # the scaling pass always asks for hidden states: transformers' capturing hooks go on the model now, as
        # its first plain call with output_hidden_states would do, so that a compiled fn (which cannot install
        # them: dynamo cannot trace transformers' lock) traces as one graph
        if inner.capturing is not None:
            inner.capturing.install()

    @property
    def plans(self) -> dict[str, Plan]:
        return self.inner.plans

    def _adapters(self, adapter: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(adapter, (PerExample, MixedBatch)):
            raise NotImplementedError(
                "X-LoRA does not route adapters per example (per_example / mixed_batch): its classifier already "
                "mixes the experts per token; for several classifiers at once, vmap fn over stacked adapter trees"
            )
        if not isinstance(adapter, Mapping) or "classifier" not in adapter:
            raise TypeError(
                "an X-LoRA adapter is {'classifier': tree} (and 'experts': {name: tree} with use_trainable_adapters); "
                f"got {type(adapter).__name__}"
                + (f" with keys {sorted(adapter)}" if isinstance(adapter, Mapping) else "")
            )
        if self.experts is None:
            experts = adapter.get("experts")
            if not isinstance(experts, Mapping) or sorted(experts) != sorted(self.expert_names):
                raise ValueError(
                    f"use_trainable_adapters=True: adapter['experts'] must hold the experts {list(self.expert_names)}"
                )
        else:
            if "experts" in adapter:
                raise ValueError(
                    "use_trainable_adapters=False: the experts are frozen and held by fn (fn.experts); the adapter "
                    "holds only the classifier"
                )
            experts = self.experts
        self._check_classifier(adapter["classifier"])
        return {LAYERS: self.layer_tree, **{n: experts[n] for n in self.expert_names}}

    def _check_classifier(self, classifier: Any) -> None:
        """The classifier tree has exactly the layout's layers, leaves and shapes (a (1,) bias would broadcast)."""
        want = {
            f"{p}.{leaf}": shape
            for p, fan_in, fan_out in self.layout
            for leaf, shape in (("weight", (fan_out, fan_in)), ("bias", (fan_out,)))
        }
        got = (
            {f"{p}.{leaf}": t for p, ls in classifier.items() if isinstance(ls, Mapping) for leaf, t in ls.items()}
            if isinstance(classifier, Mapping)
            else {}
        )
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        if isinstance(classifier, Mapping):
            unexpected += sorted(p for p, ls in classifier.items() if not isinstance(ls, Mapping))
        shapes = sorted(
            f"{k} {tuple(got[k].shape)} (expected {want[k]})"
            for k in set(want) & set(got)
            if not isinstance(got[k], torch.Tensor) or tuple(got[k].shape) != want[k]
        )
        if missing or unexpected or shapes:
            raise ValueError(
                "adapter['classifier'] does not fit this X-LoRA classifier "
                f"(depth {self.config.xlora_depth}, {len(self.expert_names)} experts, {self.n_layers} layers): "
                + "; ".join(
                    f"{what}: {items}"
                    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                    if items
                )
            )

    @staticmethod
    def _batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[int, int, torch.device]:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("X-LoRA needs `input_ids` or `inputs_embeds` (B, T, ...) for its scalings")
        return int(x.shape[0]), int(x.shape[1]), x.device

    def classify(
        self, classifier: Mapping[str, Mapping[str, torch.Tensor]], hidden: torch.Tensor, dropout: Any
    ) -> torch.Tensor:
        """PEFT's XLoraClassifier.forward: hidden (B, T, hidden_size) -> scalings (B, T, n_layers, n_experts)."""
        c = self.config
        n = len(self.expert_names)
        layout = self.layout
        if hidden.shape[-1] != c.hidden_size:
            raise ValueError(
                f"XLoraConfig.hidden_size={c.hidden_size}, but the model's last hidden state has size "
                f"{hidden.shape[-1]}: set hidden_size to the model's hidden size"
            )
        h = hidden
        for i, (path, _, _) in enumerate(layout):
            h = F.linear(h, classifier[path]["weight"], classifier[path]["bias"])
            if i < len(layout) - 1:
                h = torch.relu(h)
                if c.xlora_dropout_p > 0.0 and dropout is not None:
                    h = dropout(h, c.xlora_dropout_p)
        b, t = hidden.shape[0], hidden.shape[1]
        if not c.layerwise_scalings:
            h = h.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        s = h.reshape(b, t, self.n_layers, n)
        if c.enable_softmax:
            s = torch.softmax(s / c.softmax_temperature, dim=-1)
        return s

    def scalings(
        self, base: Mapping[str, torch.Tensor], adapter: Any, *args: Any, dropout_rng: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        """The scaling pass and the classifier: (B, T, n_layers, n_experts) (PEFT's get_latest_scalings())."""
        adapters = self._adapters(adapter)
        rng = _call_randomness(dropout_rng)
        b, t, device = self._batch(args, kwargs)
        dummy = torch.full((b, t, self.n_layers, len(self.expert_names)), self.config.scaling_pass_value)
        dummy = dummy.to(device=device, dtype=self.dtype)
        pass_kwargs = {**kwargs, "output_hidden_states": True, "return_dict": True, SCALINGS_KWARG: dummy}
        with torch.no_grad():
            out = self.inner(base, adapters, *args, dropout_rng=rng, **pass_kwargs)
        return self.classify(adapter["classifier"], out.hidden_states[-1], None if rng is None else rng.dropout)

    def __call__(
        self, base: Mapping[str, torch.Tensor], adapter: Any, *args: Any, dropout_rng: Any = None, **kwargs: Any
    ) -> Any:
        """Both passes: the model's output with the experts mixed by the classifier's scalings."""
        if SCALINGS_KWARG in kwargs:
            raise TypeError(f"`{SCALINGS_KWARG}` is computed by the X-LoRA call itself (its scaling pass)")
        rng = _call_randomness(dropout_rng)
        s = self.scalings(base, adapter, *args, dropout_rng=rng, **kwargs)
        adapters = self._adapters(adapter)
        return self.inner(base, adapters, *args, dropout_rng=rng, **{**kwargs, SCALINGS_KWARG: s})

    def generate(
        self, base: Mapping[str, torch.Tensor], adapter: Any, *, rng: int | torch.Generator | None = None, **kwargs: Any
    ) -> Any:
        """PEFT's `XLoraModel.generate`: transformers' generate where every forward runs both passes (this fn).

        Like PEFT, without a KV cache (`use_cache=False`): each step runs the scaling pass and the real pass over
        the whole sequence so far. use_cache=True is refused (PEFT silently overrides it). rng: sampling's
        randomness (funcpeft.generate). Returns what the model's generate returns: token ids (B, L + new).
        """
        if kwargs.get("use_cache"):
            raise ValueError(
                "X-LoRA generates without a KV cache (PEFT's XLoraModel.generate sets use_cache=False: every step "
                "runs the scaling pass over the whole sequence); drop use_cache=True"
            )
        self._adapters(adapter)  # a wrong tree is refused before generate starts
        model = self.inner.model
        config, randomness = generation_randomness(model, kwargs, rng)
        skel = self.inner.bound_model(base, None)
        fn = self

        def forward(*args: Any, **call_kwargs: Any) -> Any:
            return fn(base, adapter, *args, **call_kwargs)

        skel.forward = forward  # the skeleton only: generate's model calls run both passes
        with redirect(randomness):
            return skel.generate(**{**kwargs, "use_cache": False})  # type: ignore[operator]


@dataclasses.dataclass(repr=False)
class XLoraModel:
    """What `get_peft_model(model, XLoraConfig(...))` returns; unpacks to `(fn, base, adapter)`.

    experts: the FunctionalPeftModel holding the loaded LoRA experts (their configs, plans, saving).
    """

    fn: XLoraFunction
    base: dict[str, torch.Tensor]
    adapter: dict[str, Any]
    peft_config: dict[str, PeftConfig]
    adapter_name: str
    model: nn.Module
    experts: FunctionalPeftModel

    def __iter__(self) -> Iterator[Any]:
        return iter((self.fn, self.base, self.adapter))

    def __repr__(self) -> str:
        return (
            f"XLoraModel({type(self.model).__name__}, experts={list(self.fn.expert_names)}, "
            f"{self.fn.n_layers} X-LoRA layers, {tree_numel(self.adapter):,} adapter values)"
        )

    def generate(self, base: Mapping[str, torch.Tensor], adapter: Any, **kwargs: Any) -> Any:
        """PEFT's `XLoraModel.generate` (XLoraFunction.generate: both passes each step, no KV cache)."""
        return self.fn.generate(base, adapter, **kwargs)

    def get_nb_trainable_parameters(self, adapter: Any = None) -> tuple[int, int]:
        """(trainable, all) like PEFT: the classifier (+ the experts when trainable); all adds the model and experts."""
        tree = self.adapter if adapter is None else adapter
        base_all = count_parameters(self.base, None, {})[1]
        trainable = tree_numel(tree)
        frozen = tree_numel(self.fn.experts) if self.fn.experts is not None else 0
        return trainable, base_all + trainable + frozen

    def print_trainable_parameters(self, adapter: Any = None) -> None:
        """PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
        print(format_trainable(*self.get_nb_trainable_parameters(adapter)))

    def save_pretrained(
        self, directory: str | os.PathLike[str], adapter_params: Any = None, fsync: bool = True, **kwargs: Any
    ) -> str:
        """PEFT's layout (module docstring): the config and classifier in `directory` (or `directory/<adapter_name>`
        for a non-default name), each expert as a LoRA adapter in `<that>/<i>/`."""
        if adapter_params is None:
            raise TypeError("save_pretrained(directory, adapter_params): pass the trained X-LoRA adapter to save")
        adapters = self.fn._adapters(adapter_params)
        out = os.fspath(directory)
        if self.adapter_name != "default":
            out = os.path.join(out, self.adapter_name)
        # one unit: every expert's files, the classifier, then the config that marks the save (a failure while
        # writing replaces nothing; an earlier save is never left with some experts new and the classifier old)
        writers: dict[str, Any] = {}
        for name in self.fn.expert_names:
            _, files = adapter_files(
                out,
                adapters[name],
                self.experts.peft_config[name],
                name,
                model=self.experts.model,
                base_params=self.experts.base,
                plan=self.experts.plans[name],
                **kwargs,
            )
            writers.update(files)
        state = {
            f"{CLASSIFIER_PREFIX}{path}.{leaf}": t.detach().contiguous().cpu()
            for path, leaves in adapter_params["classifier"].items()
            for leaf, t in leaves.items()
        }
        text = json.dumps(config_dict(self.peft_config[self.adapter_name], self.model), indent=2, sort_keys=True)
        writers[os.path.join(out, "adapter_model.safetensors")] = lambda p: save_file(
            state, p, metadata={"format": "pt"}
        )
        writers[os.path.join(out, "adapter_config.json")] = lambda p: _write_text(p, text)
        save_files(writers, fsync=fsync)
        return out


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _layer_paths(model: nn.Module, pm: FunctionalPeftModel, experts: tuple[str, ...]) -> list[str]:
    """Every layer some expert adapts, in module order (PEFT's layer numbers); refuses what PEFT cannot mix."""
    adapted: dict[str, str] = {}
    for name in experts:
        config = pm.peft_config[name]
        for path, e in pm.plans[name].items():
            if e.spec is None:
                continue
            if e.spec.method != "lora":
                raise NotImplementedError(
                    f"X-LoRA expert {name!r} ({config.adapters if isinstance(config, XLoraConfig) else type(config).__name__}) "
                    f"adapts {path!r} with {e.spec.method!r}: X-LoRA mixes plain LoRA layers only (PEFT: 'X-LoRA "
                    "currently does not support LoRA layers with DoRA'; other LoRA variants are not X-LoRA layers)"
                )
            if e.spec.kind not in _MIXABLE or e.parameter is not None or e.spec.hyper.lora_bias:
                raise NotImplementedError(
                    f"X-LoRA expert {name!r} adapts {path!r} ({e.spec.kind.name}"
                    + (", lora_bias" if e.spec.hyper.lora_bias else "")
                    + "): funcpeft's X-LoRA mixes LoRA on Linear, GPT-2 Conv1D and Embedding layers (PEFT's "
                    "XLoraLinearLayer / XLoraEmbeddingLayer; its Conv2d layer scales (B, C, H, W) inputs by "
                    "(B, T) scalings, which only broadcasts by accident)"
                )
            adapted[path] = name
    order = [p for p, _ in model.named_modules()]
    return [p for p in order if p in adapted]


def _build(
    model: nn.Module,
    config: XLoraConfig,
    adapter_name: str,
    autocast_adapter_dtype: bool,
    generator: torch.Generator | None,
    strict_experts: bool = True,
) -> XLoraModel:
    if not isinstance(config.adapters, Mapping) or not config.adapters:
        raise ValueError(
            "XLoraConfig.adapters is empty: X-LoRA mixes trained LoRA experts, pass {name: directory of a saved LoRA "
            "adapter} (PEFT builds a classifier over zero experts and fails at the first forward)"
        )
    if config.top_k_lora is not None and config.top_k_lora > len(config.adapters):
        raise ValueError(
            f"XLoraConfig.top_k_lora={config.top_k_lora} is more than the {len(config.adapters)} experts in `adapters` "
            "(PEFT fails at the first forward: 'selected index k out of range')"
        )
    if getattr(getattr(model, "config", None), "use_cache", False):
        raise ValueError("`use_cache` must be False")
    trainable = bool(config.use_trainable_adapters)
    names = tuple(str(i) for i in range(len(config.adapters)))
    paths = [os.fspath(p) for p in config.adapters.values()]
    for name, path in zip(names, paths):
        kind = type(read_config(path))
        if kind is not LoraConfig:
            raise TypeError(
                f"X-LoRA expert {name!r} ({path}) is a {kind.__name__} adapter; X-LoRA's experts are LoRA adapters "
                "(PEFT loads them with LoraConfig.from_pretrained)"
            )
    pm = from_pretrained(
        model, paths[0], names[0], is_trainable=trainable, autocast_adapter_dtype=autocast_adapter_dtype
    )
    trees = {names[0]: pm.adapter}
    for name, path in zip(names[1:], paths[1:]):
        trees[name] = pm.load_adapter(path, name, is_trainable=trainable, autocast_adapter_dtype=autocast_adapter_dtype)
    layer_paths = _layer_paths(pm.model, pm, names)
    if not layer_paths:
        raise ValueError(f"the X-LoRA experts {paths} adapt no layer of {type(model).__name__}")
    resolved = copy.deepcopy(config)
    present = tuple(tuple(n for n in names if (e := pm.plans[n].get(p)) is not None and e.spec) for p in layer_paths)
    common = XLoraLayers(tuple(layer_paths), names, present)
    modules = dict(pm.model.named_modules())
    plan: Plan = {}
    for path in layer_paths:
        first = pm.plans[present[len(plan)][0]][path].spec
        assert first is not None
        target = Target(path, modules[path], first.kind, common)
        plan[path] = PlanEntry(spec=layer_spec(target, resolved, XLORA))
    plans = {**pm.plans, LAYERS: plan}
    inner = PeftFunction(pm.model, plans, LAYERS)
    dtype = next(iter(model.parameters())).dtype
    fn = XLoraFunction(inner, resolved, names, len(layer_paths), None if trainable else trees, dtype)
    # PEFT creates each expert's LoRA layers (drawing their init) before loading the files, then the classifier:
    # the same draws first give the classifier PEFT's values for the same seed
    for name in names:
        init_adapter(pm.model, pm.plans[name], autocast_adapter_dtype, generator, False)
    layout = classifier_layout(resolved, len(layer_paths), len(names))
    # the classifier reads the last hidden state: on the device of the model's last parameters (final norm / head)
    classifier = init_classifier(layout, dtype, generator, list(model.parameters())[-1].device)
    adapter: dict[str, Any] = {"classifier": classifier}
    if trainable:
        adapter["experts"] = trees
    return XLoraModel(fn, pm.base, adapter, {adapter_name: resolved}, adapter_name, pm.model, pm)


def get_xlora_model(
    model: nn.Module,
    config: XLoraConfig,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> XLoraModel:
    """`get_peft_model(model, XLoraConfig(...))`: load the experts, draw the classifier (see the module docstring).

    Args:
        model: the plain base model (never mutated); its config's use_cache must be False (PEFT's check).
        config: an XLoraConfig with `adapters` = {name: directory of a saved LoRA adapter}.
        generator: the classifier's init draws (default: the global RNG).

    Returns:
        An XLoraModel: `fn, base, adapter = pm`; adapter = {"classifier": {"layers.<i>": {"weight" (out, in),
        "bias" (out,)}}} (+ "experts": {"0": LoRA tree, ...} with use_trainable_adapters).
    """
    unknown = set(kwargs) - {"mixed", "revision", "init_data"}
    if unknown or kwargs.get("mixed") or kwargs.get("init_data"):
        raise NotImplementedError(
            f"get_peft_model(XLoraConfig) does not take {sorted(unknown or {'mixed', 'init_data'})}: an X-LoRA model "
            "is built from its LoRA experts (PEFT: XLoraConfig is not mixed-compatible)"
        )
    return _build(model, config, adapter_name, autocast_adapter_dtype, generator)


def load_xlora(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    adapters: Mapping[str, str] | None = None,
    autocast_adapter_dtype: bool = True,
    strict: bool = True,
    **kwargs: Any,
) -> XLoraModel:
    """PEFT's `PeftModel.from_pretrained(model, directory, adapters=...)` for an X-LoRA save.

    adapters: {name: directory} of the experts (PEFT requires it for a local directory); None: the experts saved
    with the classifier, `directory/<i>/` (funcpeft's save; PEFT's own subfolders also hold stray keys). strict:
    a classifier key missing from the file raises (PEFT's save drops some, see the module docstring); False
    keeps the fresh values with a warning, as PEFT does silently. is_trainable: PEFT's inference_mode; the
    experts' trainability is the saved `use_trainable_adapters`.
    """
    if kwargs:
        raise TypeError(f"unexpected arguments for an X-LoRA load: {sorted(kwargs)}")
    root = os.fspath(directory)
    if adapter_name != "default" and os.path.isdir(os.path.join(root, adapter_name)):
        root = os.path.join(root, adapter_name)
    config = read_config(root)
    if not isinstance(config, XLoraConfig):
        raise TypeError(f"{root} holds a {type(config).__name__} adapter, not an X-LoRA one")
    if adapters is None:
        saved = list(config.adapters or {})
        subdirs = [os.path.join(root, str(i)) for i in range(len(saved))]
        if not saved or not all(os.path.isfile(os.path.join(d, "adapter_config.json")) for d in subdirs):
            raise ValueError(
                "If model_id is a local path, then `adapters` must be passed in kwargs. (funcpeft also looks for the "
                f"experts saved with the classifier in {root}/<i>/, and found none for {saved})"
            )
        adapters = dict(zip(saved, subdirs))
    config.adapters = dict(adapters)
    config.inference_mode = not is_trainable
    pm = _build(model, config, adapter_name, autocast_adapter_dtype, None)
    state = read_tensors(root)
    fresh = pm.adapter["classifier"]
    wanted = {f"{CLASSIFIER_PREFIX}{p}.{leaf}": (p, leaf) for p, leaves in fresh.items() for leaf in leaves}
    unexpected = sorted(set(state) - set(wanted))
    if unexpected:
        raise ValueError(f"{root}: unexpected keys for this X-LoRA classifier: {unexpected}; expected {sorted(wanted)}")
    missing = sorted(set(wanted) - set(state))
    if missing:
        message = (
            f"{root}: the X-LoRA classifier keys {missing} are missing (PEFT's save_pretrained drops the keys "
            "containing '.<i>.' for an expert name i, e.g. 'layers.0')"
        )
        if strict:
            raise ValueError(message + "; load with strict=False to keep freshly drawn values there, as PEFT does")
        warnings.warn(message + "; keeping freshly drawn values there, as PEFT does", stacklevel=2)
    for key, (p, leaf) in wanted.items():
        if key in state:
            t = state[key]
            if tuple(t.shape) != tuple(fresh[p][leaf].shape):
                raise ValueError(f"{root}: {key} has shape {tuple(t.shape)}, expected {tuple(fresh[p][leaf].shape)}")
            fresh[p][leaf] = t.to(device=fresh[p][leaf].device, dtype=fresh[p][leaf].dtype).requires_grad_(is_trainable)
    for leaves in fresh.values():
        for leaf, t in leaves.items():
            leaves[leaf] = t.detach().requires_grad_(is_trainable)
    return pm


register_model_level("XLORA", get_xlora_model, load_xlora)
