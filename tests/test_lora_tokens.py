"""LoRA with `trainable_token_indices` (PEFT's TrainableTokensWrapper next to LoRA) against PEFT 0.21.2.

Each differential row runs the whole PEFT-matrix harness (`peft_matrix.harness.check_row`): counts, outputs,
every gradient (keyed like PEFT's checkpoint), files both ways (keys, tensors, adapter_config.json), PEFT
loading funcpeft's files, merge_and_unload. Models: tiny Llama with untied and tied embeddings (lm_head uses the
embedding's rows unless the dict gives it other indices), GPT-2 (wte tied to lm_head), the dict form naming
embeddings, plus several adapters and bad input (PEFT's errors, or clearer ones).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import pytest
import torch
from helpers import LoraKwargs, as_type
from peft_matrix import harness, models
from peft_matrix.cases import Case

import funcpeft
from funcpeft import testing as T

pytestmark = pytest.mark.slow

# tokens present in `models.inputs("tiny-llama")` (43, 97, 15, 94, 65) and one absent (3, 7)
TOK1, TOK2 = [43, 97, 15, 3], [94, 65, 7]
QV = ["q_proj", "v_proj"]

ROWS = [
    Case("llama untied list", "tiny-llama", "LoraConfig", {"target_modules": QV, "trainable_token_indices": TOK1}),
    Case("llama tied list", "tiny-llama-tied", "LoraConfig", {"target_modules": QV, "trainable_token_indices": TOK1}),
    Case(
        "llama tied dict same indices",
        "tiny-llama-tied",
        "LoraConfig",
        {"target_modules": QV, "trainable_token_indices": {"embed_tokens": TOK1, "lm_head": TOK1}},
    ),
    Case(
        "llama untied dict embedding and lm_head",
        "tiny-llama",
        "LoraConfig",
        {"target_modules": QV, "trainable_token_indices": {"embed_tokens": TOK1, "lm_head": TOK2}},
    ),
    Case(
        "llama dict lm_head only",
        "tiny-llama",
        "LoraConfig",
        {"target_modules": QV, "trainable_token_indices": {"lm_head": TOK2}},
    ),
    Case(
        "llama tied ensure_weight_tying",
        "tiny-llama-tied",
        "LoraConfig",
        {"target_modules": QV, "trainable_token_indices": TOK1, "ensure_weight_tying": True},
    ),
    Case(
        "gpt2 list (wte tied to lm_head)",
        "tiny-gpt2",
        "LoraConfig",
        {"target_modules": ["c_attn"], "trainable_token_indices": TOK1},
    ),
    Case(
        "gpt2 dict full name, DoRA",
        "tiny-gpt2",
        "LoraConfig",
        {"target_modules": ["c_attn"], "use_dora": True, "trainable_token_indices": {"transformer.wte": TOK2}},
    ),
]


@pytest.mark.parametrize("case", ROWS, ids=[c.name for c in ROWS])
def test_equal_to_peft(case: Case, tmp_path: Any) -> None:
    harness.check_row(case, tmp_path)


def test_tied_rows_with_other_indices_match_peft_unmerged(tmp_path: Any) -> None:
    """Tied weights, dict with other indices for lm_head: PEFT gives each layer its own rows (no tying); merging
    both into the one shared weight is PEFT's merge as well (each layer then sees both sets of rows)."""
    case = Case(
        "llama tied dict other indices",
        "tiny-llama-tied",
        "LoraConfig",
        {"target_modules": QV, "trainable_token_indices": {"embed_tokens": TOK1, "lm_head": TOK2}},
    )
    harness.check_row(case, tmp_path)


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_saved_keys_and_config_are_peft_s(tmp_path: Any) -> None:
    """The file holds `{embedding}.token_adapter.trainable_tokens_delta` (not the tied lm_head's copy) and the
    config keeps trainable_token_indices as given; loading without a model reads the same tree."""
    model = T.tiny_llama(tie=True)
    config = funcpeft.LoraConfig(target_modules=QV, trainable_token_indices={"embed_tokens": TOK1})
    pm = _quiet(funcpeft.get_peft_model, model, config)
    pm.save_pretrained(tmp_path, pm.adapter)
    tree, loaded = funcpeft.load_adapter(tmp_path)
    assert as_type(loaded, funcpeft.LoraConfig).trainable_token_indices == {"embed_tokens": TOK1}
    assert tree["model.embed_tokens"].keys() == {"trainable_tokens_delta"}
    assert "lm_head" not in tree
    torch.testing.assert_close(
        tree["model.embed_tokens"]["trainable_tokens_delta"], model.model.embed_tokens.weight[TOK1]
    )


def test_several_adapters_with_tokens_equal_peft() -> None:
    """Two LoRA adapters with disjoint tokens on the one embedding, both active (PEFT's forward_adapters)."""
    model = models.build("tiny-llama")
    x = models.inputs("tiny-llama")
    c1: LoraKwargs = {"target_modules": ["q_proj"], "trainable_token_indices": TOK1, "init_lora_weights": False}
    c2: LoraKwargs = {"target_modules": ["v_proj"], "trainable_token_indices": TOK2, "init_lora_weights": False}
    pm = _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(**c1), adapter_name="a")
    fresh = {"a": pm.adapter, "b": _quiet(pm.add_adapter, "b", funcpeft.LoraConfig(**c2))}
    twin = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**c1), adapter_name="a")
    _quiet(twin.add_adapter, "b", peft.LoraConfig(**c2))
    # PEFT's model-level set_adapter allows one trainable-tokens adapter per wrapper; its layers (and PEFT's own
    # multi-adapter tests) take both, applying each adapter's disjoint rows: funcpeft's semantics
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    for module in twin.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module.set_adapter(["a", "b"])
    g = torch.Generator().manual_seed(3)
    trees = {n: T.random_like(fresh[n], g) for n in ("a", "b")}
    for n in ("a", "b"):
        T.copy_into_peft(twin, trees[n], pm.plans[n], n)
    with torch.no_grad():
        want = twin.eval()(**x).logits
        got = pm.fn(pm.base, trees, **x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    overlapping = funcpeft.LoraConfig(target_modules=["k_proj"], trainable_token_indices=[TOK1[0]])
    tree_c = _quiet(pm.add_adapter, "c", overlapping)
    with pytest.raises(ValueError, match=rf"Token indices \[{TOK1[0]}\] are trained by more than one active adapter"):
        pm.fn(pm.base, {**trees, "c": tree_c}, **x)


# -- bad input ------------------------------------------------------------------------------------------------
def _both_raise(model: Any, kwargs: dict[str, Any], peft_error: type, ours: type, match: str) -> None:
    with pytest.raises(peft_error):
        _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**kwargs))
    with pytest.raises(ours, match=match):
        _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(**kwargs))


def test_index_out_of_range() -> None:
    _both_raise(
        T.tiny_llama(),
        {"target_modules": QV, "trainable_token_indices": [1, 500]},
        IndexError,  # PEFT: while cloning the rows
        ValueError,
        r"token_indices \[500\] are out of range for 'model.embed_tokens', which has 128 rows",
    )


def test_unknown_module_names_close_matches() -> None:
    _both_raise(
        T.tiny_llama(),
        {"target_modules": QV, "trainable_token_indices": {"embed_tokenz": [1]}},
        ValueError,
        ValueError,
        r"Target modules \{'embed_tokenz'\} not found in the base model.*close matches: \['model.embed_tokens'\]",
    )


def test_peft_s_refusals() -> None:
    model = T.tiny_llama(tie=True)
    _both_raise(
        model,
        {"target_modules": QV, "trainable_token_indices": {"embed_tokens": [1]}, "modules_to_save": ["embed_tokens"]},
        ValueError,
        ValueError,
        "The embedding layer is already marked to be trained fully",
    )
    _both_raise(
        model,
        {
            "target_modules": QV,
            "trainable_token_indices": {"embed_tokens": [1], "lm_head": [2]},
            "ensure_weight_tying": True,
        },
        ValueError,
        ValueError,
        r"Cannot ensure weight tying .* Conflicting layers: embed_tokens: \[1\], lm_head: \[2\]",
    )
    _both_raise(
        model,
        {"target_modules": ["q_proj", "embed_tokens"], "trainable_token_indices": [1, 2]},
        TypeError,
        TypeError,
        "'model.embed_tokens' would carry both this adapter's lora and its auxiliary TrainableTokensConfig part",
    )


def test_untied_model_with_ensure_weight_tying_warns_like_peft() -> None:
    kwargs: LoraKwargs = {"target_modules": QV, "trainable_token_indices": TOK1, "ensure_weight_tying": True}
    with pytest.warns(UserWarning, match="ensure_weight_tying=True but the model does not have tied weights"):
        funcpeft.get_peft_model(T.tiny_llama(), funcpeft.LoraConfig(**kwargs))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1, 1], r"duplicates \[1\]"),
        ([-2], "non-negative"),
        ({}, "empty dict"),
        ({"embed_tokens": "1"}, r"trainable_token_indices\['embed_tokens'\]"),
        ({3: [1]}, "keys must be module names"),
    ],
)
def test_config_checks(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        funcpeft.LoraConfig(target_modules=QV, trainable_token_indices=value)


def test_per_example_and_vmap_route_the_token_rows_too() -> None:
    """A stack of two LoRA + tokens adapters: per-example routing and vmap give each row its own adapter's rows."""
    model = T.tiny_llama(tie=True)
    pm = _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(target_modules=QV, trainable_token_indices=TOK1))
    fn, base, fresh = pm
    g = torch.Generator().manual_seed(0)
    t1, t2 = T.random_like(fresh, g), T.random_like(fresh, g)
    stacked = {p: {k: torch.stack([t1[p][k], t2[p][k]]) for k in e} for p, e in t1.items()}
    x = torch.tensor([[TOK1[0], TOK1[1], 7, 9], [TOK1[1], TOK1[0], 2, 1]])
    with torch.no_grad():
        routed = fn(base, funcpeft.per_example(stacked), input_ids=x).logits
        alone = torch.cat([fn(base, t1, input_ids=x[:1]).logits, fn(base, t2, input_ids=x[1:]).logits])
        mapped = torch.func.vmap(lambda a: fn(base, a, input_ids=x).logits)(stacked)
        torch.testing.assert_close(routed, alone)
        torch.testing.assert_close(mapped[1], fn(base, t2, input_ids=x).logits)
        assert not torch.allclose(alone[0], fn(base, t2, input_ids=x[:1]).logits[0])  # the adapters differ there


def test_eva_keeps_the_token_rows_and_initialises_the_lora_layers_as_without_them() -> None:
    """EVA with trainable tokens: PEFT 0.21.2 hooks the token layer as a LoRA layer and fails (ValueError in its
    incremental PCA); funcpeft runs EVA on the LoRA layers only (the same lora_A as without tokens) and keeps
    the tokens' init (the embedding's rows)."""
    model = T.tiny_llama()

    def batch(i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    data = [batch(i) for i in range(6)]
    kwargs: dict[str, Any] = {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "eva"}
    twin = _quiet(
        peft.get_peft_model,
        copy.deepcopy(model),
        peft.LoraConfig(**kwargs, eva_config=peft.EvaConfig(), trainable_token_indices=TOK1),
        low_cpu_mem_usage=True,
    )
    with pytest.raises(ValueError, match="not enough values to unpack"):
        _quiet(peft.initialize_lora_eva_weights, twin, data)
    trees = []
    for tokens in (None, TOK1):
        pm = _quiet(funcpeft.get_peft_model, model, funcpeft.LoraConfig(**kwargs, trainable_token_indices=tokens))
        trees.append(_quiet(funcpeft.initialize_lora_eva_weights, pm, pm.base, data))
    plain, with_tokens = trees
    assert with_tokens.keys() == {*plain, "model.embed_tokens"}
    for path, leaves in plain.items():
        for name, t in leaves.items():
            torch.testing.assert_close(with_tokens[path][name], t, msg=f"{path}.{name}")
    torch.testing.assert_close(
        with_tokens["model.embed_tokens"]["trainable_tokens_delta"], model.model.embed_tokens.weight[TOK1]
    )
