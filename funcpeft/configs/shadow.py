"""PEFT's `ShadowConfig` (`peft.tuners.shadow.config`): ShadowPEFT (funcpeft.methods.shadow)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .._config import PeftConfig, PeftType, check_layers_and_saved, check_module_names, validated_init

_MIRROR_OVERRIDES = (
    "shadow_num_hidden_layers",
    "shadow_hidden_size",
    "shadow_num_attention_heads",
    "shadow_intermediate_size",
)


@validated_init
@dataclass
class ShadowConfig(PeftConfig):
    """ShadowPEFT: a small trainable shadow network rides the frozen decoder's block loop.

    A shadow backbone (`shadow_model="mirror"`: the base decoder's own class with `shadow_num_hidden_layers`
    (default 1) layers and optional smaller sizes) maps the call's inputs to an initial shadow state s0 (B, T, d).
    Each targeted decoder block gets `h + shadow_alpha * W_up(Dropout(W_down(h - s)))` as input (rank `r`), and the
    state advances as `s = (1 - g) * s + g * t` with `t = T(h_out)`, `g = sigmoid(G(h_out))` (two-layer GELU MLPs of
    width `update_hidden_size`, default `r`). With labels, a causal LM adds `auxiliary_loss_weight` times the cross
    entropy of `lm_head(s0)` to the loss. target_modules None: every decoder block (they must be contiguous).
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = None
    shadow_hidden_size: int | None = None
    shadow_num_attention_heads: int | None = None
    shadow_intermediate_size: int | None = None
    share_embeddings: bool = True
    update_hidden_size: int | None = None
    auxiliary_loss_weight: float = 0.05
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.SHADOW
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = {}

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE
        super().__post_init__()
        check_module_names(self, "target_modules", "exclude_modules")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        check_layers_and_saved(self)
        if self.shadow_model != "mirror":
            configured = [name for name in _MIRROR_OVERRIDES if getattr(self, name) is not None]
            if configured:
                raise ValueError(
                    "Explicit `shadow_model` checkpoints define their architecture; unset these mirror-only "
                    f"overrides: {', '.join(configured)}."
                )

    def default_targets(self, model: Any) -> Any:
        """PEFT's `_prepare_adapter_config`: every block of the model's decoder stack, `{backbone}.{layers}.{i}`."""
        path, layers = decoder_blocks(model)
        return {f"{path}.{i}" for i in range(len(layers))}


# -- the model's decoder stack (PEFT's _get_backbone / _get_decoder_layers) ---------------------------------------
def is_diffusion_transformer(model: nn.Module) -> bool:
    return isinstance(getattr(model, "single_transformer_blocks", None), nn.ModuleList) or (
        isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList)
        and not isinstance(getattr(model, "layers", None), nn.ModuleList)
    )


def has_layer_stack(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, a, None), nn.ModuleList) for a in ("layers", "h"))


def backbone_of(model: nn.Module) -> nn.Module:
    """The module holding the decoder stack (`LlamaModel` in `LlamaForCausalLM`), found as PEFT finds it."""
    for attr in ("model", "transformer", "base_model", "decoder"):
        backbone = getattr(model, attr, None)
        if not isinstance(backbone, nn.Module):
            continue
        nested = getattr(backbone, "decoder", None)  # OPT: model.decoder.layers
        if isinstance(nested, nn.Module) and has_layer_stack(nested):
            return nested
        return backbone
    if has_layer_stack(model):
        return model
    raise AttributeError(
        "Unable to automatically locate the transformer backbone inside the supplied model "
        "(required when `target_modules` is not set). Please set `target_modules` explicitly "
        "to the decoder blocks you want to wrap, e.g. `r'.*\\.layers\\.\\d+$'`. "
        f"{type(model).__name__} has no `model` / `transformer` / `base_model` / `decoder` sub-module and no "
        f"`.layers` / `.h` nn.ModuleList; {module_lists(model)}"
    )


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path of the decoder-block ModuleList, the list): PEFT's default ShadowPEFT targets are its items."""
    refuse_diffusers(model)
    backbone = backbone_of(model)
    for attr in ("layers", "h"):
        layers = getattr(backbone, attr, None)
        if isinstance(layers, nn.ModuleList):
            prefix = next(n for n, m in model.named_modules() if m is backbone)
            return (f"{prefix}.{attr}" if prefix else attr), layers
    raise AttributeError(
        "Unable to automatically find a `nn.ModuleList` of decoder layers (expected `.layers`/`.h`) "
        "inside the backbone (required when `target_modules` is not set). Please set `target_modules` "
        "explicitly to the decoder blocks you want to wrap, e.g. `r'.*\\.layers\\.\\d+$'`. "
        f"The backbone is {_path_of(model, backbone)!r} ({type(backbone).__name__}); {module_lists(model)}"
    )


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "?")


def module_lists(model: nn.Module) -> str:
    """The model's nn.ModuleLists, for an error when the decoder stack is not where PEFT looks."""
    found = [f"{n or '<root>'} ({len(m)} items)" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not found:
        return "it has no nn.ModuleList at all."
    return f"its nn.ModuleLists: {', '.join(found[:8])}{' ...' if len(found) > 8 else ''}."


def refuse_diffusers(model: nn.Module) -> None:
    if not is_diffusion_transformer(model):
        return
    try:
        import diffusers  # noqa: F401

        missing = ""
    except ImportError:
        missing = "the `diffusers` package is not installed, and "
    raise NotImplementedError(
        f"ShadowPEFT on {type(model).__name__}, a Diffusers-style transformer (it has `transformer_blocks` / "
        f"`single_transformer_blocks`): {missing}funcpeft implements ShadowPEFT for transformers decoder-only "
        "models only (PEFT's Diffusers backends, peft/tuners/shadow/diffusion_models.py, are not ported)"
    )
