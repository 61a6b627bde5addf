"""Quantised base layers (QLoRA): bitsandbytes `Linear4bit` (NF4 / FP4, double quantisation) and `Linear8bitLt`.

Such a layer's weight is packed data (`Params4bit` with its `quant_state`, `Int8Params` with its row scales) that
only its own kernel reads, so funcpeft adapts it at module level (`LayerKind.QUANT_LINEAR`): the layer's forward
runs as it is and the adapters act on its output, as PEFT's `lora.bnb.Linear4bit` / `Linear8bitLt` do
(`result = base_layer(x)` + the adapter terms). The `base` tree holds these weights as they are (the model's own
objects, with their quantisation state; never detached, copied or dequantised for a call). Merging dequantises,
adds and re-quantises like PEFT's `merge` (a rounding step: PEFT's warning).

bitsandbytes is never imported here: a module can only be a bitsandbytes layer if bitsandbytes was imported
(by whoever built it), so `sys.modules` is asked.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

_LAYER_TYPES = ("Linear4bit", "Linear8bitLt")  # bitsandbytes.nn's quantised linear layers (their subclasses too)


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def _bnb_types(names: tuple[str, ...]) -> tuple[type, ...]:
    """The classes `bitsandbytes.nn.<name>` of an imported bitsandbytes (none when it is not imported, or when a
    stand-in module without them is, as some tests and tools install)."""
    bnb_nn = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    return tuple(t for t in (getattr(bnb_nn, n, None) for n in names) if isinstance(t, type))


def is_quant_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit / 8-bit linear layer (or a subclass, e.g. LinearNF4)."""
    types = _bnb_types(_LAYER_TYPES)
    return bool(types) and isinstance(module, types)


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


def check_weight(path: str, module: nn.Module, weight: torch.Tensor) -> None:
    """A clear error where bitsandbytes' own state would silently compute with another weight's statistics.

    Linear8bitLt moves an Int8Params' row scales into the module's `state` on its first call (`init_8bit_state`)
    and reads them from there afterwards; a weight whose scales are already gone can only run in the module
    whose state holds them.
    """
    if type(weight).__name__ != "Int8Params" or getattr(weight, "CB", None) is not None:
        return
    state = getattr(module, "state", None)
    cb = getattr(state, "CB", None)
    if cb is None or cb.data_ptr() != weight.data_ptr():
        raise RuntimeError(
            f"funcpeft: {path!r} ({type(module).__name__}) gets an Int8Params weight whose row scales bitsandbytes "
            "has moved into another module's state (Linear8bitLt.init_8bit_state): it would compute with the wrong "
            "scales. Use the base tree of this model (8-bit weights cannot be swapped between calls), or a fresh "
            "Int8Params (quantised, with its CB / SCB)."
        )


def dequantize(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """The float weight (out, in) a quantised parameter stands for (PEFT's `dequantize_bnb_weight`).

    module: the layer holding it, for an Int8Params whose scales bitsandbytes moved into `module.state`, and for
    the packed data of a Linear4bit sharded with FSDP2 (gathered as a plain tensor: the layer keeps the quant
    state, as bitsandbytes' own `fix_4bit_weight_quant_state_from_module` reads it).
    """
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


def requantize(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (out, in) quantised like `like` (same class and settings: PEFT's merge re-creates the parameter
    from `weight.__dict__`); a new frozen parameter, `like` is untouched."""
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
