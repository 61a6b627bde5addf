"""CPT (`CPTConfig`): Context-aware Prompt Tuning (peft/tuners/cpt/ and PeftModelForCausalLM._cpt_forward).

The adapter tree's `'<prompt>'` entry holds PEFT's `CPTEmbedding` parameters: `embedding.weight` (n, token_dim),
the word embeddings of `cpt_token_ids` (frozen, as in PEFT: requires_grad=False, zero gradient), and
`delta_embedding.weight` (n, token_dim), zero-initialised and trained. A call prepends `embedding +
project(delta)` to the input embeddings, where `project` scales each token's delta into an epsilon ball
(format tokens: opt_projection_format_epsilon, input tokens: opt_projection_epsilon, both times
sqrt(token_dim / 2048); others 1e-10). PEFT computes the projection under no_grad and writes it into the parameter
in place at every forward (`delta_embedding.weight.data = ...`), and masks the gradient of tokens that are not
format / input tokens with a backward hook. funcpeft is pure: the forward uses the projected value with an
identity (straight-through), masked gradient, which equals PEFT's per call; to follow PEFT's training
trajectory exactly (its optimizer steps from the projected value), apply `project_adapter` to the tree after each
step. With labels, the labels become [cpt_token_ids; labels], kept only at label tokens (type mask > 0 and a
multiple of 4, the input's `input_type_mask` shifted by max(cpt_tokens_type_mask)), and the loss is PEFT's
`CPTEmbedding.calculate_loss` (mean token loss, decayed per example by opt_loss_decay_factor with "decay").
PEFT adds to the caller's `input_type_mask` in place; funcpeft never changes its inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._trees import PROMPT_PATH
from ..configs.cpt import CPTConfig
from . import prompt_learning as pl
from ._registry import register
from .base import InputContext, InputMethod, ModelCall, Params

MIN_EPSILON = 1e-10  # PEFT's MIN_VALUE: the ball of tokens that are neither format nor input tokens
TYPE_MASK_KWARG = "input_type_mask"


@dataclasses.dataclass(frozen=True)
class CPTSpec:
    """Static facts of one CPT adapter. prompt: the prompt-learning spec (word embedding, token_dim, ...);
    token_ids / type_mask: cpt_token_ids / cpt_tokens_type_mask; epsilon: each virtual token's projection radius;
    decay: opt_weighted_loss_type == "decay"; decay_factor: opt_loss_decay_factor."""

    prompt: pl.PromptSpec
    token_ids: tuple[int, ...]
    type_mask: tuple[int, ...]
    epsilon: tuple[float, ...]
    decay: bool
    decay_factor: float

    @property
    def trained(self) -> tuple[bool, ...]:
        """Whose delta PEFT's backward hook lets through: format (type % 4 in {1, 3}) and input (2) tokens."""
        return tuple(t % 4 in (1, 2, 3) for t in self.type_mask)


def _epsilon(config: CPTConfig, token_dim: int) -> tuple[float, ...]:
    """PEFT's `CPTEmbedding.get_epsilon`, in its float32 arithmetic."""
    scale = torch.sqrt(torch.Tensor([token_dim / 2048]))
    fmt = (config.opt_projection_format_epsilon * scale).item()  # type: ignore[operator]
    inp = (config.opt_projection_epsilon * scale).item()  # type: ignore[operator]
    eps = torch.ones(len(config.cpt_tokens_type_mask or ())) * MIN_EPSILON
    for i, t in enumerate(config.cpt_tokens_type_mask or ()):
        if t > 0 and t % 4 in (1, 3):
            eps[i] = fmt
        elif t > 0 and t % 4 == 2:
            eps[i] = inp
    return tuple(float(e) for e in eps)


def plan(model: nn.Module, config: Any) -> tuple[CPTConfig, CPTSpec]:
    resolved, prompt = pl.plan(model, config)
    assert isinstance(resolved, CPTConfig)
    vocab = int(pl._weight(model, prompt).shape[0])
    bad = [t for t in resolved.cpt_token_ids or () if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"CPTConfig.cpt_token_ids {bad} are not token ids of the model's vocabulary (size {vocab})")
    spec = CPTSpec(
        prompt=prompt,
        token_ids=tuple(resolved.cpt_token_ids or ()),
        type_mask=tuple(resolved.cpt_tokens_type_mask or ()),
        epsilon=_epsilon(resolved, prompt.token_dim),
        decay=resolved.opt_weighted_loss_type == "decay",
        decay_factor=float(resolved.opt_loss_decay_factor),  # type: ignore[arg-type]
    )
    return resolved, spec


def shapes(spec: CPTSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    n, d = spec.prompt.n, spec.prompt.token_dim
    return (("embedding.weight", (n, d)), ("delta_embedding.weight", (n, d)))


def init(spec: CPTSpec, model: nn.Module, generator: torch.Generator | None) -> Params:
    """PEFT's draws: nn.Embedding's N(0, 1) for `embedding`, replaced by the word embeddings of cpt_token_ids
    unless in inference mode; nn.Embedding's draw for `delta_embedding`, then zeros."""
    n, d = spec.prompt.n, spec.prompt.token_dim
    emb = torch.empty(n, d).normal_(generator=generator)
    if not spec.prompt.inference_mode:
        emb = pl._word_rows(model, spec.prompt, torch.tensor(spec.token_ids, dtype=torch.long))
    torch.empty(n, d).normal_(generator=generator)  # PEFT draws delta_embedding's init before zeroing it
    return {"embedding.weight": emb, "delta_embedding.weight": torch.zeros(n, d)}


def project(spec: CPTSpec, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's `get_projection`: each token's delta (n, d) scaled into its epsilon ball (rows of norm 0 unchanged)."""
    eps = torch.tensor(spec.epsilon, dtype=delta.dtype, device=delta.device)
    norm = torch.norm(delta, p=2, dim=-1)
    scale = torch.where(norm > 0, eps / torch.maximum(norm, eps), torch.ones_like(norm))
    return delta * scale.unsqueeze(-1)


def project_adapter(tree: Mapping[str, Mapping[str, torch.Tensor]], config: Any, model: nn.Module) -> dict[str, Any]:
    """`tree` with `delta_embedding.weight` projected, as PEFT leaves its parameter after a forward: apply after
    each optimizer step to train exactly like PEFT (a new tree; `tree` is not changed)."""
    _, spec = plan(model, config)
    out = {path: dict(leaves) for path, leaves in tree.items()}
    entry = out[PROMPT_PATH]
    entry["delta_embedding.weight"] = project(spec, entry["delta_embedding.weight"].detach())
    return out


def encode(spec: CPTSpec, params: Params, call: ModelCall, ctx: InputContext) -> torch.Tensor:
    """The virtual tokens (B, n, token_dim): embedding (no gradient) + project(delta) (straight-through gradient,
    masked to format / input tokens like PEFT's backward hook)."""
    b = pl.batch_size(ModelCall((), pl.bind(spec.prompt, call)))
    if b is None:
        raise ValueError("CPT: the call needs input_ids or inputs_embeds (to know the batch size)")
    delta = params["delta_embedding.weight"]
    trained = torch.tensor(spec.trained, device=delta.device).unsqueeze(-1)
    passed = torch.where(trained, delta, delta.detach())  # PEFT's gradient mask
    used = project(spec, delta.detach()) + (passed - passed.detach())  # the projected value, identity gradient
    x = params["embedding.weight"].detach() + used
    return x.expand(b, *x.shape)


def prepare(spec: CPTSpec, prompts: torch.Tensor, call: ModelCall, ctx: InputContext) -> ModelCall:
    """PeftModelForCausalLM.forward's prompt-learning branch for CPT (`_cpt_forward`)."""
    kw = pl.bind(spec.prompt, call)
    labels = kw.pop("labels", None)
    type_mask = kw.pop(TYPE_MASK_KWARG, None)
    new = pl.prepare(spec.prompt, prompts, ModelCall((), kw), ctx)
    out = dict(new.kwargs)
    out["labels"] = None
    if labels is None:
        return ModelCall((), out)
    b, seq = labels.shape[0], labels.shape[1]
    device = labels.device
    if type_mask is None:
        type_mask = torch.full((b, seq), 4, dtype=torch.long, device=device)
    type_mask = type_mask.to(device).long()
    prefix_type = torch.tensor(spec.type_mask, dtype=torch.long, device=device).expand(b, -1)
    shifted = torch.where(type_mask > 0, type_mask + max(spec.type_mask), type_mask)
    cpt_type_mask = torch.cat((prefix_type, shifted), dim=1)
    prefix_labels = torch.tensor(spec.token_ids, dtype=labels.dtype, device=device).expand(b, -1)
    cpt_labels = torch.cat((prefix_labels, labels), dim=1)
    keep = (cpt_type_mask > 0) & (cpt_type_mask % 4 == 0)
    out["labels"] = torch.where(keep, cpt_labels, torch.full_like(cpt_labels, -100))
    return ModelCall((), out, {"labels": out["labels"], "type_mask": cpt_type_mask})


def loss(spec: CPTSpec, logits: torch.Tensor, labels: torch.Tensor, type_mask: torch.Tensor) -> torch.Tensor:
    """PEFT's `CPTEmbedding.calculate_loss`, without its per-example loop: the mean over label positions of the
    token loss, times factor^k for a label token with k distinct larger label-type values in its example
    ("decay"; the last example of the context gets weight 1).

    logits (B, T, V); labels, type_mask (B, T).
    """
    shift_logits = logits[..., :-1, :]
    shift_labels = labels[..., 1:].to(logits.device)
    mask = type_mask[..., 1:].to(logits.device)
    valid = shift_labels != -100
    token = F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), reduction="none", ignore_index=-100)
    token = token.view(shift_labels.shape)
    weights = valid.float()
    if spec.decay:
        is_label = (mask > 0) & (mask % 4 == 0)
        same = mask.unsqueeze(-1) == mask.unsqueeze(-2)  # (B, T, T)
        earlier = torch.ones_like(same[0]).tril(-1)
        first = is_label & ~(same & is_label.unsqueeze(-2) & earlier).any(-1)  # each label value's first position
        larger = (first.unsqueeze(-2) & (mask.unsqueeze(-2) > mask.unsqueeze(-1))).sum(-1)
        decay = torch.where(is_label, spec.decay_factor ** larger.float(), torch.ones_like(weights))
        weights = weights * decay
    return (token * weights * valid).sum() / valid.sum()


def finish(spec: CPTSpec, call: ModelCall, output: Any) -> Any:
    if "labels" not in call.extra:
        return output
    output.loss = loss(spec, output.logits, call.extra["labels"], call.extra["type_mask"])
    return output


def prepare_generate(spec: CPTSpec, prompts: torch.Tensor, call: ModelCall, ctx: InputContext) -> ModelCall:
    """Prompt tuning's generate (the virtual tokens go in once, with the prompt); labels and the type mask only
    shape CPT's loss, so generate ignores `input_type_mask` as PEFT's generate does."""
    kw = {k: v for k, v in call.kwargs.items() if k != TYPE_MASK_KWARG}
    return pl.prepare_generate(spec.prompt, prompts, ModelCall(call.args, kw), ctx)


def finish_generate(spec: CPTSpec, call: ModelCall, output: Any) -> Any:
    return pl.finish_generate(spec.prompt, call, output)


def file_state(spec: CPTSpec, params: Params) -> dict[str, torch.Tensor]:
    """PEFT's `prompt_embeddings`: the encoder's output, embedding + project(delta) (the embedding alone in
    inference mode, as PEFT saves it)."""
    emb = params["embedding.weight"].detach()
    if spec.prompt.inference_mode:
        return {"prompt_embeddings": emb.cpu()}
    return {"prompt_embeddings": (emb + project(spec, params["delta_embedding.weight"].detach())).cpu()}


def load_state(spec: CPTSpec, tensors: Mapping[str, torch.Tensor], fresh: Params) -> Params:
    """PEFT's load: `embedding.weight` = prompt_embeddings; the delta keeps its fresh zeros."""
    emb = tensors.get("prompt_embeddings")
    if emb is None:
        raise KeyError(f"the checkpoint has no 'prompt_embeddings' (keys: {sorted(tensors)[:5]})")
    if tuple(emb.shape) != tuple(fresh["embedding.weight"].shape):
        raise ValueError(
            f"prompt_embeddings has shape {tuple(emb.shape)}, expected {tuple(fresh['embedding.weight'].shape)} "
            "(len(cpt_token_ids) x token_dim of this config and model)"
        )
    return {**fresh, "embedding.weight": emb}


CPT = register(
    InputMethod(
        name="cpt",
        config=CPTConfig,
        plan=plan,
        shapes=shapes,
        init=init,
        encode=encode,
        prepare=prepare,
        finish=finish,
        file_state=file_state,
        load_state=load_state,
        prepare_generate=prepare_generate,
        finish_generate=finish_generate,
        call_kwargs=frozenset({TYPE_MASK_KWARG}),
        frozen=lambda spec: frozenset({"embedding.weight"}),
    )
)
