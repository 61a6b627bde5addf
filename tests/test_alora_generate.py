"""`funcpeft.generate` with aLoRA (`LoraConfig(alora_invocation_tokens=...)`) against PEFT's generate: the
offsets come from the prompt once (or from `alora_offsets=`) and hold for every cached decoding step."""

from __future__ import annotations

import copy
import warnings
from typing import Any, TypedDict

import peft
import pytest
import torch
from helpers import LoraKwargs

import funcpeft
from funcpeft import testing as T

pytestmark = pytest.mark.filterwarnings("ignore")

INVOKE = [5, 9]
KWARGS: LoraKwargs = {
    "r": 4,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "init_lora_weights": False,
    "task_type": "CAUSAL_LM",
    "alora_invocation_tokens": INVOKE,
}


class Generation(TypedDict, total=False):
    """generate's keyword arguments these tests pass (typed for `**GEN` next to funcpeft.generate's own)."""

    max_new_tokens: int
    do_sample: bool
    pad_token_id: int
    num_beams: int
    num_return_sequences: int


class Prompts(TypedDict):
    """`_prompts()`: the model's inputs, typed for `**x` next to funcpeft.generate's keyword arguments."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)


GEN: Generation = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def _pair() -> tuple[Any, Any, Any]:
    model = T.tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(**KWARGS))
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**KWARGS)).eval()
    tree = T.random_like(pm.adapter, torch.Generator().manual_seed(0), scale=2.0)
    T.copy_into_peft(twin, tree, pm.plans[pm.adapter_name])
    return pm, tree, twin


def _prompts() -> Prompts:
    """Row 0 left-padded with the invocation, row 1 without it, row 2 with it twice (the last one counts)."""
    ids = torch.randint(10, T.VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    ids[0, 4:6] = torch.tensor(INVOKE)
    ids[2, 1:3] = torch.tensor(INVOKE)
    ids[2, 5:7] = torch.tensor(INVOKE)
    return {"input_ids": ids, "attention_mask": mask}


def test_greedy_tokens_equal_peft_with_left_padding_and_rows_without_invocation() -> None:
    pm, tree, twin = _pair()
    x = _prompts()
    with torch.no_grad():
        want = twin.generate(**x, **GEN)
        plain = pm.generate(pm.base, None, **x, **GEN)
    got = pm.generate(pm.base, tree, **x, **GEN)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the adapter matters where the invocation is (else this test could not fail), and not where it is absent
    assert not torch.equal(got[0], plain[0]) and not torch.equal(got[2], plain[2])
    assert torch.equal(got[1], plain[1])


def test_explicit_offsets_equal_peft() -> None:
    pm, tree, twin = _pair()
    x = _prompts()
    offsets = [3, None, 7]
    with torch.no_grad():
        want = twin.generate(**x, **GEN, alora_offsets=offsets)
    got = funcpeft.generate(pm, pm.base, tree, **x, **GEN, alora_offsets=offsets)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, pm.generate(pm.base, tree, **x, **GEN))  # the offsets were used


def test_refusals() -> None:
    pm, tree, twin = _pair()
    x = _prompts()
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        twin.generate(**x, **{**GEN, "num_beams": 2})
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        pm.generate(pm.base, tree, **x, **{**GEN, "num_beams": 2})
    with pytest.raises(NotImplementedError, match=r"num_return_sequences=2 .*alora_offsets"):
        pm.generate(pm.base, tree, **x, **{**GEN, "num_return_sequences": 2, "do_sample": True}, rng=0)
