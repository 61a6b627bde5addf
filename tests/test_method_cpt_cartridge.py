"""CPT (`CPTConfig`) and Cartridges (`CartridgeConfig`) against PEFT 0.21.2: config checks, fresh init, outputs,
CPT's own loss and labels, every gradient (PEFT's masks and frozen tokens), counts, PEFT's saved state both ways,
CPT's in-place projection, Cartridge's init from a cache, vmap, per-example prompts and compile."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import optree
import peft
import pytest
import torch
from helpers import capture_stdout
from method_checks import assert_mixed_refused_like_peft
from method_helpers import compiles_once, quiet
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

import funcpeft
from funcpeft import testing as T
from funcpeft._trees import PROMPT_PATH
from funcpeft.methods import cartridge as cartridge_method
from funcpeft.methods import cpt as cpt_method

MODELS: dict[str, Callable[[], torch.nn.Module]] = {"llama": T.tiny_llama, "gpt2": T.tiny_gpt2, "t5": T.tiny_t5}
CPT: dict[str, Any] = {
    "task_type": "CAUSAL_LM",
    "cpt_token_ids": [5, 6, 7, 8, 9, 10, 11],
    "cpt_mask": [1] * 7,
    "cpt_tokens_type_mask": [1, 2, 2, 3, 4, 4, 5],  # template, input, input, template, label, label, next template
}
CARTRIDGE: dict[str, Any] = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_frozen_tokens": 1}


def _pair(kind: str, name: str, kwargs: dict[str, Any], seed: int = 0) -> tuple[Any, Any]:
    model = MODELS[kind]()
    torch.manual_seed(seed)
    fpm = quiet(funcpeft.get_peft_model, model, getattr(funcpeft, name)(**kwargs))
    torch.manual_seed(seed)
    pm = quiet(peft.get_peft_model, copy.deepcopy(model), getattr(peft, name)(**kwargs))
    return fpm, pm.eval()


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids (2, 6), the second row left-padded by two, its mask, labels (padding -100) and CPT's type mask
    (row 0: template, input, input, template, label, label; row 1: padding, then one such example)."""
    ids = torch.randint(1, T.VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, -100),
        "input_type_mask": torch.tensor([[1, 2, 3, 4, 4, 5], [0, 0, 1, 2, 3, 4]]),
    }


def _peft_encoder(pm: Any) -> dict[str, torch.nn.Parameter]:
    return dict(pm.prompt_encoder["default"].named_parameters())


def _random(fpm: Any, seed: int = 1, scale: float = 0.3) -> dict[str, dict[str, torch.Tensor]]:
    """The fresh tree with noise on its trainable leaves (frozen leaves kept, requires_grad as fresh)."""
    g = torch.Generator().manual_seed(seed)
    return {
        path: {
            k: (v.detach() + scale * torch.randn(v.shape, generator=g) if v.requires_grad else v.detach().clone())
            .clone()
            .requires_grad_(v.requires_grad)
            for k, v in leaves.items()
        }
        for path, leaves in fpm.adapter.items()
    }


def _copy_into_peft(pm: Any, tree: Any) -> None:
    with torch.no_grad():
        for name, p in _peft_encoder(pm).items():
            p.copy_(tree[PROMPT_PATH][name])


def _spec(fpm: Any) -> Any:
    return fpm.plans["default"][PROMPT_PATH].prompt[1]


def _assert_same_as_peft(fpm: Any, pm: Any, tree: Any, x: dict[str, torch.Tensor], what: str) -> None:
    """Logits and loss equal, and the gradient of the loss for every encoder parameter (zero for frozen ones)."""
    _copy_into_peft(pm, tree)
    pm.zero_grad(set_to_none=True)
    want = pm(**{k: v.clone() for k, v in x.items()})
    want.loss.backward()
    loss, grads = funcpeft.value_and_grad(lambda a: fpm.fn(fpm.base, a, **x).loss)(tree)
    with torch.no_grad():
        got = fpm.fn(fpm.base, tree, **x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5, msg=what)
    torch.testing.assert_close(loss, want.loss.detach(), atol=1e-6, rtol=1e-6, msg=what)
    for name, p in _peft_encoder(pm).items():
        theirs = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads[PROMPT_PATH][name], theirs, atol=1e-5, rtol=1e-4, msg=f"{what}: {name}")


# -- CPT -----------------------------------------------------------------------------------------------------
def test_cpt_config_like_peft() -> None:
    ours, theirs = funcpeft.CPTConfig(**CPT), peft.CPTConfig(**CPT)
    for name in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                 "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type", "opt_loss_decay_factor",
                 "opt_projection_epsilon", "opt_projection_format_epsilon"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.num_virtual_tokens == 7  # len(cpt_token_ids), whatever was passed
    assert (
        funcpeft.CPTConfig(task_type="CAUSAL_LM").cpt_token_ids == peft.CPTConfig(task_type="CAUSAL_LM").cpt_token_ids
    )
    for lib in (peft, funcpeft):
        with pytest.raises(ValueError, match="only supports task_type = CAUSAL_LM"):
            lib.CPTConfig(task_type="SEQ_CLS")
        with pytest.raises(ValueError, match="must have the same length"):
            lib.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 2], cpt_mask=[1])
    peft.CPTConfig(task_type="CAUSAL_LM", opt_weighted_loss_type="decayed")  # type: ignore[arg-type]  # PEFT accepts it
    with pytest.raises(ValueError, match="opt_weighted_loss_type must be one of"):
        funcpeft.CPTConfig(task_type="CAUSAL_LM", opt_weighted_loss_type="decayed")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cpt_fresh_adapter_counts_and_frozen_embedding_like_peft(kind: str) -> None:
    fpm, pm = _pair(kind, "CPTConfig", CPT)
    leaves = fpm.adapter[PROMPT_PATH]
    theirs = _peft_encoder(pm)
    assert list(leaves) == list(theirs) == ["embedding.weight", "delta_embedding.weight"]
    for name, p in theirs.items():
        assert torch.equal(leaves[name], p.detach()), name
        assert leaves[name].requires_grad == p.requires_grad, name  # the embedding is frozen
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert capture_stdout(fpm.print_trainable_parameters) == capture_stdout(pm.print_trainable_parameters)
    x = {k: v for k, v in _inputs().items() if k not in ("labels", "input_type_mask")}
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **x).logits, pm(**x).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("type_mask", [True, False])
def test_cpt_outputs_loss_and_gradients_equal_peft_s(kind: str, decay: bool, type_mask: bool) -> None:
    kwargs = {**CPT, "opt_weighted_loss_type": "decay" if decay else "none", "opt_loss_decay_factor": 0.7}
    fpm, pm = _pair(kind, "CPTConfig", kwargs)
    x = _inputs()
    if not type_mask:
        del x["input_type_mask"]  # PEFT's default: every input token a label token (4)
    _assert_same_as_peft(fpm, pm, _random(fpm), x, f"{kind} decay={decay} type_mask={type_mask}")
    _, grads = funcpeft.value_and_grad(lambda a: fpm.fn(fpm.base, a, **x).loss)(_random(fpm))
    rows = grads[PROMPT_PATH]["delta_embedding.weight"].abs().sum(-1)
    assert (rows[[4, 5]] == 0).all()  # PEFT's gradient mask: the context's label tokens (type 4) are not trained
    # with PEFT's default type mask (4 + max(cpt_tokens_type_mask) = 9 here, not a label type) only the context's
    # labels count, which the last virtual token cannot influence
    assert (rows[[0, 1, 2, 3]] > 0).all() and bool(rows[6] > 0) == type_mask


def test_cpt_decay_weights_examples_like_peft_s_loop() -> None:
    """The vectorised decay against PEFT's own calculate_loss on a type mask with several examples per row."""
    spec = _spec(
        _pair("llama", "CPTConfig", {**CPT, "opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.5})[0]
    )
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, generator=g)
    mask = torch.tensor([[1, 4, 4, 5, 8, 9, 12, 12, 0], [1, 2, 4, 9, 12, 5, 8, 8, 8]])
    labels = torch.randint(0, 11, (2, 9), generator=g)
    labels = torch.where((mask > 0) & (mask % 4 == 0), labels, torch.full_like(labels, -100))
    from peft.tuners.cpt.model import CPTEmbedding
    from transformers.modeling_outputs import CausalLMOutput

    config = peft.CPTConfig(task_type="CAUSAL_LM", opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    want = CPTEmbedding.calculate_loss(CausalLMOutput(logits=logits), labels, mask, config).loss
    torch.testing.assert_close(cpt_method.loss(spec, logits, labels, mask), want, atol=1e-6, rtol=1e-6)


def test_peft_changes_the_callers_type_mask_in_place_and_funcpeft_does_not() -> None:
    fpm, pm = _pair("llama", "CPTConfig", CPT)
    x = _inputs()
    before = x["input_type_mask"].clone()
    fpm.fn(fpm.base, fpm.adapter, **x)
    assert torch.equal(x["input_type_mask"], before)
    pm(**x)
    assert torch.equal(x["input_type_mask"], torch.where(before > 0, before + 5, before))  # PEFT: += max(type mask)


def test_cpt_follows_peft_s_training_with_project_adapter() -> None:
    """PEFT writes the projected delta into its parameter at every forward; funcpeft's fn is pure, and
    `project_adapter` before each step (after each, from a fresh zero delta) reproduces PEFT's SGD trajectory."""
    fpm, pm = _pair("llama", "CPTConfig", CPT)
    x, lr = _inputs(), 0.5
    start = _random(fpm, scale=1.0)  # norms far outside the epsilon balls, so the projection matters
    _copy_into_peft(pm, start)
    config = fpm.peft_config["default"]
    tree: Any = cpt_method.project_adapter(start, config, fpm.model)
    unprojected: Any = start
    for _ in range(3):
        pm.zero_grad(set_to_none=True)
        pm(**{k: v.clone() for k, v in x.items()}).loss.backward()
        with torch.no_grad():
            delta = _peft_encoder(pm)["delta_embedding.weight"]
            assert delta.grad is not None
            delta.sub_(lr * delta.grad)
        for name in ("tree", "unprojected"):
            current: Any = tree if name == "tree" else unprojected
            _, grads = funcpeft.value_and_grad(lambda a: fpm.fn(fpm.base, a, **x).loss)(current)
            stepped: Any = optree.tree_map(
                lambda t, g: (t.detach() - lr * g).requires_grad_(t.requires_grad), current, grads
            )
            if name == "tree":
                tree = cpt_method.project_adapter(stepped, config, fpm.model)
            else:
                unprojected = stepped
    theirs = _peft_encoder(pm)["delta_embedding.weight"].detach()
    with torch.no_grad():  # PEFT's parameter after its next forward is the projection of what the step left
        theirs = cpt_method.project(_spec(fpm), theirs)
    torch.testing.assert_close(tree[PROMPT_PATH]["delta_embedding.weight"], theirs, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(unprojected[PROMPT_PATH]["delta_embedding.weight"], theirs, atol=1e-3)


def test_cpt_saved_state_both_ways() -> None:
    fpm, pm = _pair("llama", "CPTConfig", CPT)
    tree = _random(fpm, scale=1.0)
    _copy_into_peft(pm, tree)
    spec = _spec(fpm)
    theirs = quiet(get_peft_model_state_dict, pm)  # prompt_embeddings = embedding + project(delta)
    ours = cpt_method.file_state(spec, tree[PROMPT_PATH])
    assert set(ours) == set(theirs) == {"prompt_embeddings"}
    torch.testing.assert_close(ours["prompt_embeddings"], theirs["prompt_embeddings"], atol=0, rtol=0)
    x = {k: v for k, v in _inputs().items() if k not in ("labels", "input_type_mask")}
    loaded = {PROMPT_PATH: cpt_method.load_state(spec, theirs, dict(fpm.adapter[PROMPT_PATH]))}
    assert torch.equal(loaded[PROMPT_PATH]["delta_embedding.weight"], torch.zeros(7, 64))
    pm2 = quiet(peft.get_peft_model, copy.deepcopy(fpm.model), peft.CPTConfig(**CPT)).eval()
    quiet(set_peft_model_state_dict, pm2, ours)  # PEFT loads funcpeft's state
    with torch.no_grad():
        want = pm(**x).logits
        torch.testing.assert_close(fpm.fn(fpm.base, loaded, **x).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pm2(**x).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(3, 64\), expected \(7, 64\)"):
        cpt_method.load_state(spec, {"prompt_embeddings": torch.zeros(3, 64)}, dict(fpm.adapter[PROMPT_PATH]))


def test_cpt_token_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(ValueError, match=r"cpt_token_ids \[500\] are not token ids"):
        funcpeft.get_peft_model(T.tiny_llama(), funcpeft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 500]))


# -- Cartridge -------------------------------------------------------------------------------------------------
def test_cartridge_config_like_peft() -> None:
    for lib in (peft, funcpeft):
        with pytest.raises(ValueError, match="`num_frozen_tokens` must be >= 0"):
            lib.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_frozen_tokens=-1)
        with pytest.raises(ValueError, match="`num_frozen_tokens` must be <= `num_virtual_tokens`"):
            lib.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_frozen_tokens=3)
    assert funcpeft.CartridgeConfig().num_frozen_tokens == peft.CartridgeConfig().num_frozen_tokens == 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("frozen", [0, 1, 4])
def test_cartridge_fresh_counts_outputs_and_gradients_equal_peft_s(kind: str, frozen: int) -> None:
    fpm, pm = _pair(kind, "CartridgeConfig", {**CARTRIDGE, "num_frozen_tokens": frozen})
    theirs = _peft_encoder(pm)
    assert list(fpm.adapter[PROMPT_PATH]) == list(theirs)  # no frozen_embedding leaf for 0 frozen tokens
    for name, p in theirs.items():
        assert (
            torch.equal(fpm.adapter[PROMPT_PATH][name], p.detach())
            and fpm.adapter[PROMPT_PATH][name].requires_grad == p.requires_grad
        ), name
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert capture_stdout(fpm.print_trainable_parameters) == capture_stdout(pm.print_trainable_parameters)
    x = {k: v for k, v in _inputs().items() if k != "input_type_mask"}
    _assert_same_as_peft(fpm, pm, _random(fpm), x, f"{kind} frozen={frozen}")


def test_cartridge_saved_state_both_ways() -> None:
    fpm, pm = _pair("llama", "CartridgeConfig", CARTRIDGE)
    tree = _random(fpm, scale=1.0)
    _copy_into_peft(pm, tree)
    spec = _spec(fpm)
    theirs = quiet(get_peft_model_state_dict, pm)
    ours = cartridge_method.file_state(spec, tree[PROMPT_PATH])
    assert set(ours) == set(theirs) == {"prompt_embeddings"}
    assert torch.equal(ours["prompt_embeddings"], theirs["prompt_embeddings"])
    loaded = cartridge_method.load_state(spec, theirs, dict(fpm.adapter[PROMPT_PATH]))
    assert all(torch.equal(loaded[k], tree[PROMPT_PATH][k]) for k in loaded)
    with pytest.raises(ValueError, match=r"Invalid `prompt_embeddings` shape. Expected \(4, 128\)"):
        cartridge_method.load_state(spec, {"prompt_embeddings": torch.zeros(3, 128)}, loaded)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cartridge_prefix_from_a_prefill_cache_equals_peft_s(kind: str) -> None:
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values

    fpm, pm = _pair(kind, "CartridgeConfig", CARTRIDGE)
    text = torch.randint(1, T.VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = fpm.fn(fpm.base, None, input_ids=text, use_cache=True).past_key_values
        want = initialize_kv_prefix_from_past_key_values(pm, past_key_values=cache)
    prefix = cartridge_method.prefix_from_past_key_values(cache, 4)
    assert torch.equal(prefix, want)
    tree = {
        PROMPT_PATH: cartridge_method.load_state(_spec(fpm), {"prompt_embeddings": prefix}, fpm.adapter[PROMPT_PATH])
    }
    x = {k: v for k, v in _inputs().items() if k not in ("labels", "input_type_mask")}
    with torch.no_grad():
        torch.testing.assert_close(fpm.fn(fpm.base, tree, **x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)


# -- both: transforms ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [("CPTConfig", CPT), ("CartridgeConfig", CARTRIDGE)])
def test_stacked_prompts_vmap_route_per_example_and_compile(name: str, kwargs: dict[str, Any]) -> None:
    fpm = quiet(funcpeft.get_peft_model, T.tiny_llama(), getattr(funcpeft, name)(**kwargs))
    fn, base = fpm.fn, fpm.base
    x = {k: v for k, v in _inputs().items() if k not in ("labels", "input_type_mask")}
    trees = [_random(fpm, seed=s, scale=0.5) for s in range(3)]
    detached: list[Any] = [{p: {k: v.detach() for k, v in e.items()} for p, e in t.items()} for t in trees]
    stacked = funcpeft.stack_adapters(detached)
    with torch.no_grad():
        alone = [fn(base, t, **x).logits for t in detached]
        assert not torch.allclose(alone[0], alone[1])
        mapped = torch.func.vmap(lambda a: fn(base, a, **x).logits)(stacked)
        routed = fn(base, funcpeft.per_example(stacked, [2, 0]), **x).logits
    for k in range(3):
        torch.testing.assert_close(mapped[k], alone[k], atol=1e-5, rtol=1e-5)
    for i, k in enumerate([2, 0]):
        torch.testing.assert_close(routed[i], alone[k][i], atol=1e-5, rtol=1e-5)
    compiles_once(lambda a: fn(base, a, **x).logits, detached)


@pytest.mark.parametrize("name, kwargs", [("CPTConfig", CPT), ("CartridgeConfig", CARTRIDGE)])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_both_ways(name: str, kwargs: dict[str, Any], kind: str, tmp_path: Any) -> None:
    import json

    from safetensors.torch import load_file

    fpm, pm = _pair(kind, name, kwargs)
    tree = _random(fpm, scale=1.0)
    _copy_into_peft(pm, tree)
    fpm.save_pretrained(tmp_path / "ours", tree)
    quiet(pm.save_pretrained, tmp_path / "theirs")
    read = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    assert read[0] == read[1]
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert set(a) == set(b) == {"prompt_embeddings"} and torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
    x = {k: v for k, v in _inputs().items() if k not in ("labels", "input_type_mask")}
    back = quiet(funcpeft.from_pretrained, fpm.model, tmp_path / "theirs")
    theirs = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(fpm.model), tmp_path / "ours").eval()
    assert back.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()  # PEFT's loaded requires_grad
    with torch.no_grad():
        want = pm(**x).logits
        torch.testing.assert_close(back.fn(back.base, back.adapter, **x).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(**x).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("CPTConfig", CPT), ("CartridgeConfig", CARTRIDGE)])
def test_mixed_models_refuse_them_like_peft(name: str, kwargs: dict[str, Any]) -> None:
    assert_mixed_refused_like_peft(T.tiny_llama(), name, kwargs)


def _greedy_through_peft_forward(pm: Any, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference: greedy decoding one token at a time through PEFT's forward, without a cache."""
    with torch.no_grad():
        cur = ids
        for _ in range(steps):
            logits = pm(input_ids=cur, attention_mask=torch.ones_like(cur)).logits
            cur = torch.cat((cur, logits[:, -1].argmax(-1, keepdim=True)), 1)
    return cur


@pytest.mark.parametrize("name, kwargs", [("CPTConfig", CPT), ("CartridgeConfig", CARTRIDGE)])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_equals_greedy_decoding_through_peft_s_forward(name: str, kwargs: dict[str, Any], kind: str) -> None:
    fpm, pm = _pair(kind, name, kwargs)
    tree = _random(fpm, scale=1.0)
    _copy_into_peft(pm, tree)
    ids = torch.randint(1, T.VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    want = _greedy_through_peft_forward(pm, ids, 6)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    got = quiet(fpm.generate, fpm.base, tree, max_new_tokens=6, **kw)
    assert torch.equal(got, want)
    with torch.no_grad():  # the prompts are there (a tiny GPT-2 may still pick the same tokens)
        first = fpm.fn(fpm.base, tree, input_ids=ids).logits[:, -1]
        assert not torch.allclose(first, fpm.fn(fpm.base, None, input_ids=ids).logits[:, -1], atol=1e-4)


def test_peft_s_own_generate_differs_from_its_forward() -> None:
    """PEFT 0.21.2's generate for these adapters (its prompt-learning generate, which misbehaves with transformers
    5.x: docs/usage.md) is not greedy decoding through its own forward; funcpeft's generate is (test above)."""
    differs = []
    for kind, name, kwargs in (("llama", "CPTConfig", CPT), ("llama", "CartridgeConfig", CARTRIDGE)):
        fpm, pm = _pair(kind, name, kwargs)
        tree = _random(fpm, scale=1.0)
        _copy_into_peft(pm, tree)
        ids = torch.randint(1, T.VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
        want = _greedy_through_peft_forward(pm, ids, 6)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "pad_token_id": 0}
        assert torch.equal(quiet(fpm.generate, fpm.base, tree, **kw), want)
        differs.append(not torch.equal(quiet(pm.generate, **kw), want))
    assert all(differs), differs


def test_cartridge_on_a_seq2seq_model_equals_peft_s() -> None:
    """SEQ_2_SEQ_LM (T5): the prefix serves both the encoder's and the decoder's self-attention, as in PEFT."""
    fpm, pm = _pair("t5", "CartridgeConfig", {**CARTRIDGE, "task_type": "SEQ_2_SEQ_LM"})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, T.VOCAB, (2, 6), generator=g)
    x = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(1, T.VOCAB, (2, 4), generator=g),
    }
    _assert_same_as_peft(fpm, pm, _random(fpm), x, "t5")
