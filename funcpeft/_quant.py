"""Quantised base layers (QLoRA): bitsandbytes `Linear4bit` (NF4 / FP4, double quantisation) and `Linear8bitLt`,
torchao-quantised linears (a `TorchAOBaseTensor` weight, e.g. `Int8Tensor`) and HQQ's `HQQLinear`.

Such a layer's weight is packed data (`Params4bit` with its `quant_state`, `Int8Params` with its row scales, a
torchao tensor subclass, HQQ's `W_q` with the scales / zeros in the module's `meta`) that only its own kernel
reads, so funcpeft adapts it at module level (`LayerKind.QUANT_LINEAR`): the layer's forward runs as it is and the
adapters act on its output, as PEFT's `lora.bnb.Linear4bit` / `Linear8bitLt`, `TorchaoLoraLinear` and
`HqqLoraLinear` do (`result = base_layer(x)` + the adapter terms). The `base` tree holds these weights as they are
(the model's own objects, with their quantisation state; never copied or dequantised for a call). Merging
dequantises, adds and re-quantises like PEFT's `merge` (a rounding step: PEFT's warning).

No quantisation library is imported here: a module can only be one of their layers if the library was imported
(by whoever built it), so `sys.modules` is asked.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_LAYER_TYPES = ("Linear4bit", "Linear8bitLt")  # bitsandbytes.nn's quantised linear layers (their subclasses too)

# the libraries a QUANT_LINEAR layer can come from (`QuantGeometry.backend`)
BITSANDBYTES = "bitsandbytes"
TORCHAO = "torchao"
HQQ = "hqq"
QUANT_BACKENDS = frozenset({BITSANDBYTES, TORCHAO, HQQ})


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def _bnb_types(names: tuple[str, ...]) -> tuple[type, ...]:
    """The classes `bitsandbytes.nn.<name>` of an imported bitsandbytes (none when it is not imported, or when a
    stand-in module without them is, as some tests and tools install)."""
    bnb_nn = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    return tuple(t for t in (getattr(bnb_nn, n, None) for n in names) if isinstance(t, type))


def _torchao_tensor(t: Any) -> bool:
    """Whether `t` is a torchao quantised tensor (`torchao.utils.TorchAOBaseTensor`: Int8Tensor, Int4Tensor, ...)."""
    base = getattr(sys.modules.get("torchao.utils"), "TorchAOBaseTensor", None)
    return isinstance(base, type) and isinstance(t, base)


def _hqq_linear() -> type | None:
    cls = getattr(sys.modules.get("hqq.core.quantize"), "HQQLinear", None)
    return cls if isinstance(cls, type) else None


def quant_backend(module: nn.Module) -> str | None:
    """The library whose quantised linear layer `module` is (BITSANDBYTES, TORCHAO, HQQ), None for any other module.

    bitsandbytes: a `Linear4bit` / `Linear8bitLt` (or subclass, e.g. LinearNF4); torchao: a module whose `weight`
    is a torchao tensor subclass (what `torchao.quantize_` / transformers' TorchAoConfig make of an nn.Linear; PEFT's
    `dispatch_torchao` test); HQQ: an `hqq.core.quantize.HQQLinear`.
    """
    types = _bnb_types(_LAYER_TYPES)
    if types and isinstance(module, types):
        return BITSANDBYTES
    if _torchao_tensor(module._parameters.get("weight")):
        return TORCHAO
    hqq = _hqq_linear()
    if hqq is not None and isinstance(module, hqq):
        return HQQ
    return None


def is_quant_linear(module: nn.Module) -> bool:
    """Whether `module` is a quantised linear layer funcpeft adapts at module level (see `quant_backend`)."""
    return quant_backend(module) is not None


def packed_name(module: nn.Module) -> str:
    """The name under which a quantised linear layer holds its packed weight (HQQ: `W_q`; else `weight`)."""
    return "W_q" if quant_backend(module) == HQQ else "weight"


def check_quant_layer(path: str, module: nn.Module, config_name: str, lora_bias: bool) -> None:
    """PEFT's refusals for torchao / HQQ LoRA layers, with the module named.

    `TorchaoLoraLinear` / `HqqLoraLinear` raise for `lora_bias=True`; `TorchaoLoraLinear` only takes int8 weights
    (an `Int4Tensor` raises TypeError: torchao's int4 layout has no dequantise for merging, PEFT's note).
    """
    backend = quant_backend(module)
    if backend not in (TORCHAO, HQQ):
        return
    cls = "TorchaoLoraLinear" if backend == TORCHAO else "HqqLoraLinear"
    if lora_bias:
        raise ValueError(
            f"{cls} does not support lora_bias yet, set it to False ({config_name} on {path!r}, a {backend} layer)"
        )
    weight = module._parameters.get("weight")
    if backend == TORCHAO and type(weight).__name__ == "Int4Tensor":
        raise TypeError(
            f"{cls} only supports int8 weights for now ({config_name} on {path!r}: its weight is a torchao "
            "Int4Tensor). Quantise with Int8WeightOnlyConfig / Int8DynamicActivationInt8WeightConfig, or do not "
            "target this module."
        )


def is_quantised(t: Any) -> bool:
    """Whether `t` is a bitsandbytes quantised parameter (`Params4bit`, `Int8Params`)."""
    types = _bnb_types(("Params4bit", "Int8Params"))
    return bool(types) and isinstance(t, types)


def base_tensor(p: torch.Tensor) -> torch.Tensor:
    """A model parameter as the `base` tree holds it: detached, except a quantised one, kept as it is (a frozen
    Params4bit / Int8Params whose quantisation state lives on the object; detaching would drop it)."""
    if is_quantised(p):
        if p.requires_grad:
            raise ValueError(
                f"a quantised {type(p).__name__} requires grad: bitsandbytes weights are frozen (call "
                "funcpeft.prepare_model_for_kbit_training or set requires_grad=False)"
            )
        return p
    return p.detach()


def counted_numel(t: torch.Tensor) -> int:
    """PEFT's `get_nb_trainable_parameters` count of one parameter: a Params4bit packs two 4-bit values per
    byte of its storage (`numel * 2 * element_size`)."""
    n = int(t.numel())
    return n * 2 * t.element_size() if type(t).__name__ == "Params4bit" else n


def check_packed(module: nn.Module, weight: torch.Tensor, model: nn.Module | None) -> None:
    """The clear error of `_dense_in_bnb_place` for a merge, naming the layer's path in `model`."""
    try:
        _dense_in_bnb_place("", module, weight)
    except TypeError as exc:
        name = _named(model, module)  # looked up only for the message
        raise TypeError(str(exc).replace("'a layer'", name.removeprefix(" of ") or "'a layer'", 1)) from None


def _dense_in_bnb_place(path: str, module: nn.Module, weight: torch.Tensor) -> None:
    """A clear error for a plain float weight (out, in) where a bitsandbytes layer's packed weight goes (a
    dequantised base tree): its kernel reads only packed codes with their quantisation state (it failed with a bare
    AssertionError, a shape error or "no attribute 'CB'"). A FSDP2-gathered 4-bit weight is a plain tensor too,
    but of packed data, shaped (n, 1)."""
    if quant_backend(module) != BITSANDBYTES or is_quantised(weight) or not weight.is_floating_point():
        return
    shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if tuple(weight.shape) == shape:
        raise TypeError(
            f"funcpeft: {path or 'a layer'!r} ({type(module).__name__}) gets a plain {weight.dtype} weight of shape "
            f"{tuple(weight.shape)} in the base tree where its packed bitsandbytes weight goes (a dequantised base "
            "tree?): a bitsandbytes layer runs and merges only its own quantised weight (Params4bit / Int8Params). "
            "For a float base, load the model unquantised (or `model.dequantize()` a copy) and build its own fn."
        )


@contextlib.contextmanager
def bound_for_call(path: str, module: nn.Module, name: str, weight: torch.Tensor, own: Any) -> Iterator[None]:
    """While the block runs, `module` (a quantised layer: a call's skeleton, or the model in a traced call) computes
    with the base tree's `weight` (its parameter `name`) and its forward writes nothing the model keeps.

    own: the model's own parameter in that slot. Linear8bitLt moves an Int8Params' row scales into the module's
    `state` on its first call (`init_8bit_state`) and reads them from there afterwards; that state is the model's,
    so a weight other than the model's own (a merged base tree) would overwrite the model's scales: the model
    itself then silently computed with that weight, and its own weight no longer ran. Here the layer runs with a
    private copy of the state holding the scales of `weight`, on a private Int8Params of its codes (bitsandbytes
    clears the scales of the one it runs); a weight whose scales are already gone runs only where the model's
    state holds them. HQQLinear keeps the scales and zeros of its own `W_q` on the module (`meta`): another
    `W_q` would be decoded with them, so only the model's own is taken.
    """
    if quant_backend(module) == HQQ and weight is not own and not is_dtensor(own):
        if not isinstance(own, torch.Tensor) or weight.data_ptr() != own.data_ptr() or weight.shape != own.shape:
            raise ValueError(
                f"funcpeft: {path!r} (HQQLinear) gets a {name} in the base tree that is not this layer's own: HQQ "
                "keeps the scales and zeros of its packed weight on the module (`meta`), so another weight would "
                "be decoded with this layer's scales (silently wrong). Use the base tree of this model; a merged "
                "HQQ weight is a new layer (funcpeft.merge_and_unload)."
            )
    if weight is not own:
        _dense_in_bnb_place(path, module, weight)
    if type(weight).__name__ != "Int8Params":
        yield
        return
    int8: Any = weight  # bitsandbytes' Int8Params (untyped)
    state: Any = copy.copy(module.__dict__["state"])  # Linear8bitLt's MatmulLtState
    if int8.CB is not None:  # the scales still on the weight: this call's state
        state.CB, state.SCB = int8.CB, int8.SCB
    elif state.CB is None or state.CB.data_ptr() != weight.data_ptr():
        raise RuntimeError(
            f"funcpeft: {path!r} ({type(module).__name__}) gets an Int8Params weight whose row scales bitsandbytes "
            "has moved into another module's state (Linear8bitLt.init_8bit_state): it would compute with the wrong "
            "scales. Use the base tree of this model (8-bit weights cannot be swapped between calls), or a fresh "
            "Int8Params (quantised, with its CB / SCB)."
        )
    saved = module.__dict__["state"], module._parameters[name]
    module.__dict__["state"] = state
    module._parameters[name] = type(int8)(
        int8.data, requires_grad=False, has_fp16_weights=getattr(int8, "has_fp16_weights", False)
    )
    try:
        yield
    finally:
        module.__dict__["state"], module._parameters[name] = saved


def _float_in_torchao_place(t: torch.Tensor, module: nn.Module | None) -> bool:
    """A plain float tensor where a torchao layer's quantised weight was. Only there: a bitsandbytes 4-bit weight
    gathered by FSDP2 is a plain tensor too, of packed data in a float storage dtype (bnb_4bit_quant_storage)."""
    is_plain = type(t) in (torch.Tensor, nn.Parameter) and t.dtype.is_floating_point
    return is_plain and module is not None and quant_backend(module) == TORCHAO


def _hqq_dequantize(module: Any, w_q: torch.Tensor) -> torch.Tensor:
    """`HQQLinear.dequantize()` for the packed data `w_q` (the base tree's, not necessarily the module's own),
    without writing into the module: hqq's own method adds and deletes keys of `module.meta` while it runs (a
    race between threads); here a shallow copy of the dict is used, the arithmetic is hqq's."""
    quantizer = sys.modules["hqq.core.quantize"].Quantizer
    meta = dict(module.meta)
    device = w_q.device
    if "zero_scale" in meta:
        zero_scale = meta["zero_scale"].to(device=device)
        if zero_scale.dtype == torch.uint8:
            meta["zero_q"], meta["scale_q"] = zero_scale[0], zero_scale[1]
        else:
            meta["zero"], meta["scale"] = zero_scale[0], zero_scale[1]
    if meta["quant_zero"]:
        meta["zero"] = quantizer.dequantize(meta["zero_q"].to(device=device), meta["meta_zero"])
    if meta["quant_scale"]:
        meta["scale"] = quantizer.dequantize(meta["scale_q"].to(device=device), meta["meta_scale"])
    return quantizer.dequantize(w_q, meta)


def dequantize(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """The float weight (out, in) a quantised parameter stands for (PEFT's `dequantize_module_weight`: bitsandbytes'
    `dequantize_bnb_weight`, torchao's `weight.dequantize()`, HQQ's `layer.dequantize()`).

    module: the layer holding it, for an Int8Params whose scales bitsandbytes moved into `module.state`, and for
    the packed data of a Linear4bit sharded with FSDP2 (gathered as a plain tensor: the layer keeps the quant
    state, as bitsandbytes' own `fix_4bit_weight_quant_state_from_module` reads it).
    """
    if _float_in_torchao_place(weight, module):  # a base tree whose torchao layer got a float weight: dense already
        return weight
    if _torchao_tensor(weight):
        try:
            return weight.dequantize()  # type: ignore[no-any-return]
        except NotImplementedError as exc:  # PEFT's message
            raise NotImplementedError(
                f"Weights of type {type(weight).__name__} do not support dequantization (yet), which is needed to "
                "support merging."
            ) from exc
    if module is not None and quant_backend(module) == HQQ:
        return _hqq_dequantize(module, weight)
    if module is not None:
        _dense_in_bnb_place("", module, weight)
    bnb = _bnb()
    assert bnb is not None
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if isinstance(module, bnb.nn.Linear4bit):
        state = getattr(module, "quant_state", None)
        if state is None:
            raise ValueError(
                f"a 4-bit weight ({type(weight).__name__}) whose layer has no quant_state: cannot dequantise it"
            )
        return bnb.functional.dequantize_4bit(weight.detach(), state)
    scb = getattr(weight, "SCB", None)
    if scb is None and module is not None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ValueError("an 8-bit weight without its row scales (SCB): cannot dequantise it")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))


def torchao_requantizer(model: nn.Module | None) -> Any:
    """PEFT's `get_apply_tensor_subclass`: the torchao config a transformers model was loaded with
    (`model.hf_quantizer.quantization_config.get_apply_tensor_subclass`), None when the model has none."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return getattr(config, "get_apply_tensor_subclass", None)


def requantize(
    like: torch.Tensor, value: torch.Tensor, module: nn.Module | None = None, model: nn.Module | None = None
) -> torch.Tensor:
    """`value` (out, in) quantised like `like` (same class and settings: PEFT's merge re-creates the parameter
    from `weight.__dict__`); a new frozen parameter, `like` is untouched.

    torchao: quantised with the config the transformers `model` was loaded with (PEFT's merge runs `quantize_`
    with `get_apply_tensor_subclass()`; without one, PEFT's ValueError), on a fresh nn.Linear: the user's module is
    not touched. module: the layer (for the error message).
    """
    if _float_in_torchao_place(like, module):  # a float weight in a torchao layer's place (`dequantize`): stays float
        return value.to(like.dtype)
    if _torchao_tensor(like):
        make = torchao_requantizer(model)
        if make is None:
            raise ValueError(
                f"a torchao-quantised layer ({type(like).__name__} weight{_named(model, module)}) cannot be "
                "re-quantised after merging: PEFT's TorchaoLoraLinear needs `get_apply_tensor_subclass`, which it "
                "reads from a model loaded by transformers with a TorchAoConfig (e.g. `from_pretrained(..., "
                "quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))`); this model has none."
            )
        quantize_ = sys.modules["torchao"].quantize_
        with torch.device("meta"):
            dummy = nn.Linear(value.shape[1], value.shape[0], bias=False)
        dummy.weight = nn.Parameter(value.detach(), requires_grad=False)
        quantize_(dummy, make())
        out = dummy.weight
        out.requires_grad_(False)
        return out
    bnb = _bnb()
    assert bnb is not None
    if isinstance(like, bnb.nn.Params4bit):
        kwargs = {k: v for k, v in like.__dict__.items() if not k.startswith("_")}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        kwargs.pop("data", None)
        kwargs.pop("quant_state", None)  # a fresh one from the new values
        kwargs["module"] = None  # quantising writes its state into `module`: never into the user's model
        return bnb.nn.Params4bit(value.to("cpu"), **kwargs).to(like.device)
    return bnb.nn.Int8Params(
        value.to("cpu"), requires_grad=False, has_fp16_weights=getattr(like, "has_fp16_weights", False)
    ).to(like.device)


def _named(model: nn.Module | None, module: nn.Module | None) -> str:
    if model is None or module is None:
        return ""
    name = next((n for n, m in model.named_modules() if m is module), None)
    return "" if name is None else f" of {name!r}"


def hqq_layer(module: Any, value: torch.Tensor) -> nn.Module:
    """A new HQQLinear holding `value` (out, in) quantised with `module`'s settings (PEFT's HQQ merge: a new layer
    from `quant_config`, `offload_meta`, `compute_dtype`, device); `module` is untouched. Its bias is a copy of
    `module`'s."""
    cls = _hqq_linear()
    assert cls is not None
    quant_config = {**copy.deepcopy(module.quant_config), "offload_meta": module.offload_meta}
    new = cls(None, quant_config, compute_dtype=module.compute_dtype, device=module.device)
    quant_config.pop("offload_meta", None)
    new.quantize(value.detach(), **quant_config)
    bias = getattr(module, "bias", None)
    new.bias = None if bias is None else bias.detach().clone()
    return new  # type: ignore[no-any-return]


def warn_rounding(what: str, method: str = "lora") -> None:
    """PEFT's warning when merging into (or unmerging from) a quantised weight (method: PEFT's type, lower case)."""
    warnings.warn(
        f"{what.capitalize()} {method} module to 4-bit / 8-bit linear may get different generations due to rounding "
        "errors (the merged weight is quantised again).",
        UserWarning,
        stacklevel=4,
    )


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """PEFT's `prepare_model_for_kbit_training`: prepares a quantised *base model* for training, IN PLACE (the
    one funcpeft function that changes the model it gets; call it before `get_peft_model`, as with PEFT).

    What it changes on `model`, exactly as PEFT 0.21.2 does:
      1. every parameter gets `requires_grad=False` (the base is frozen);
      2. unless the model says it is GPTQ / AQLM / EETQ / HQQ / torchao quantised (`quantization_method`,
         `hqq_quantized`), every float16 / bfloat16 parameter that is not a 4-bit `Params4bit` is cast to float32
         in place (`param.data = param.data.float()`: layer norms, embeddings, lm_head, biases);
      3. for a k-bit model (`is_loaded_in_4bit` / `is_loaded_in_8bit`, or one of the methods above) with
         `use_gradient_checkpointing`: the input-embedding hook that makes its output require grad
         (transformers' `enable_input_require_grads`, or PEFT's own hook when `use_reentrant=False` is passed),
         then `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`.

    In funcpeft the embedding hook has no effect (fn's call skeletons leave it out, as funcpeft always
    checkpoints with `use_reentrant=False`, which does not need it) and checkpointing applies in calls with a
    `dropout_rng` (training mode), as for any funcpeft model. PEFT's `auto_clear_cache` (an accelerator cache
    flush) is not needed on CPU and is not offered.

    Args:
        model: a transformers model (typically loaded with a BitsAndBytesConfig).
        use_gradient_checkpointing: enable gradient checkpointing (k-bit models only, as in PEFT).
        gradient_checkpointing_kwargs: passed to `gradient_checkpointing_enable` (e.g. {"use_reentrant": False}).

    Returns:
        `model` itself.
    """
    method = getattr(model, "quantization_method", None)
    other = method in ("gptq", "aqlm", "eetq", "torchao", "hqq") or getattr(model, "hqq_quantized", False)
    kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    if not other:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
    if (kbit or other) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()  # type: ignore[operator]
        else:
            model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)  # type: ignore[operator]
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    return model


def make_inputs_require_grad(module: nn.Module, input: Any, output: torch.Tensor) -> None:
    """PEFT's hook (same name, so funcpeft's call skeletons leave it out like transformers' own)."""
    output.requires_grad_(True)


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a `torch.distributed.tensor.DTensor` (without importing it when nothing could be one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def check_sharded_quant(path: str, module: nn.Module) -> None:
    """A bitsandbytes layer whose weight `fully_shard` made a DTensor: a clear error where it cannot run sharded.

    FSDP2 keeps only the tensor data of a quantised parameter (a DTensor shard; gathered as a plain Parameter), not
    the Params4bit / Int8Params object with its quantisation state. A Linear4bit recovers: bitsandbytes' own
    `fix_4bit_weight_quant_state_from_module` rewraps the gathered data with the layer's `quant_state` (kept whole
    on every rank). A Linear8bitLt cannot: its forward reads the row scales from the weight (`weight.CB`, `SCB`).
    """
    if not is_quant_linear(module) or not is_dtensor(module._parameters.get("weight")):
        return
    if not hasattr(module, "quant_state"):  # Linear8bitLt (Linear4bit and its subclasses have the attribute)
        raise NotImplementedError(
            f"funcpeft: module {path or '<root>'!r} ({type(module).__name__}) is a bitsandbytes 8-bit layer sharded with fully_shard: FSDP2 keeps "
            "its Int8Params only as data (a DTensor, gathered as a plain Parameter) without the row scales (CB / SCB) "
            "that Linear8bitLt.forward reads (`self.weight.CB`: AttributeError), so it cannot run sharded "
            "(bitsandbytes 0.50, torch 2.13). Load the base in 4-bit (BitsAndBytesConfig(load_in_4bit=True)), which "
            "FSDP2 can shard, or do not shard it (docs/distributed.md)."
        )
    if getattr(module, "quant_state", None) is None:
        raise NotImplementedError(
            f"funcpeft: module {path or '<root>'!r} ({type(module).__name__}) is a bitsandbytes 4-bit layer sharded with fully_shard whose "
            "module has no `quant_state`: FSDP2 gathers its weight as plain packed data, and bitsandbytes restores "
            "the quantisation state from the layer (set when the weight is quantised with `module=` the layer, as "
            "transformers' loading does). Quantise the layer before fully_shard."
        )
