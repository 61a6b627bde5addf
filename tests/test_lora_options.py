"""LoRA options of issue 12 against PEFT 0.21.2: `FunctionalPeftModel.load_adapter` re-runs base-changing inits
(as PEFT's load_adapter, which adds the adapter with its saved config before loading the file), conversion
saves with several adapters, and the options that stay refused (each with its reason)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import pytest
import torch

import funcpeft
from funcpeft import testing as T

pytestmark = pytest.mark.filterwarnings("ignore")


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_base_weights(twin: Any) -> dict[str, torch.Tensor]:
    """PEFT's base weights by the model's own parameter names (`base_layer.` dropped)."""
    out = {}
    for name, p in twin.get_base_model().named_parameters():
        if "lora_" not in name:
            out[name.replace(".base_layer", "")] = p.detach()
    return out


@pytest.mark.parametrize(("first", "loaded"), [("olora", "pissa"), (True, "olora"), ("pissa", "pissa")])
def test_load_adapter_reruns_base_changing_init_like_peft(first: Any, loaded: str, tmp_path: Any) -> None:
    model = T.tiny_llama()
    x = torch.randint(1, T.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    src = _quiet(
        peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=loaded)
    )
    with torch.no_grad():  # trained values, so that the file is not the init itself
        for name, p in src.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    _quiet(src.save_pretrained, tmp_path)
    kwargs = {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": first}
    twin = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**kwargs))
    pm = _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(**kwargs))
    before = dict(pm.base)
    _quiet(twin.load_adapter, tmp_path, "p")
    tree = _quiet(pm.load_adapter, tmp_path, "p")
    want = _peft_base_weights(twin)
    changed = [n for n in want if not torch.equal(before[n], pm.base[n])]
    assert changed and all(".q_proj." in n for n in changed)  # the loaded init changed q_proj's weights again
    for name, w in want.items():
        torch.testing.assert_close(pm.base[name], w, atol=1e-6, rtol=1e-6, msg=name)
    twin.set_adapter("p")
    with torch.no_grad():
        torch.testing.assert_close(pm.fn(pm.base, {"p": tree}, input_ids=x).logits, twin(input_ids=x).logits)
