"""Poly / MHR (`PolyConfig`) against PEFT 0.21.2: fresh init, outputs and every gradient (eval and training
calls), files both ways, counts, generate, the task_ids checks, refusals, vmap and compile."""

from __future__ import annotations

import os
from typing import Any

import method_checks as mc
import peft
import pytest
import torch

import funcpeft
from funcpeft import testing as T
from funcpeft.methods import poly
from funcpeft.methods.base import UnsupportedLayerError

LLAMA: dict[str, Any] = dict(
    task_type="CAUSAL_LM", r=2, n_tasks=3, n_skills=2, n_splits=2, target_modules=["q_proj", "v_proj", "down_proj"]
)
IDS = torch.randint(1, T.VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
TASKS = torch.tensor([0, 2, 1])


def _t5_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1, T.VOCAB, (3, 6), generator=g),
        "decoder_input_ids": torch.randint(1, T.VOCAB, (3, 4), generator=g),
        "task_ids": torch.tensor([1, 0, 1]),
    }


@pytest.mark.parametrize(
    ("model_fn", "kwargs", "inputs"),
    [
        (T.tiny_llama, {**LLAMA, "init_weights": False}, {"input_ids": IDS, "task_ids": TASKS}),
        (T.tiny_llama, {**LLAMA, "n_splits": 1, "n_skills": 3}, {"input_ids": IDS, "task_ids": TASKS}),
        (T.tiny_t5, dict(task_type="SEQ_2_SEQ_LM", r=4, n_tasks=2, n_skills=2, n_splits=4), _t5_inputs()),
    ],
    ids=["llama-mhr-init-false", "llama-poly", "t5-default-targets"],
)
def test_poly_matches_peft(model_fn: Any, kwargs: dict[str, Any], inputs: dict[str, torch.Tensor]) -> None:
    """The fresh adapter is PEFT's (same seed), then for a random adapter: outputs, every gradient, counts."""
    fpm, pm = mc.build_both(model_fn(), "PolyConfig", kwargs)
    mc.assert_fresh_equals_peft(fpm, pm)
    assert fpm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    if kwargs.get("init_weights", True):  # lora_B = 0: the fresh adapter is the base model
        with torch.no_grad():
            plain = T.tiny_llama()(input_ids=IDS).logits if model_fn is T.tiny_llama else None
            if plain is not None:
                torch.testing.assert_close(fpm.fn(fpm.base, fpm.adapter, **inputs).logits, plain, atol=0, rtol=0)
    (tree,) = mc.random_trees(fpm.adapter, n=1, scale=0.3)
    mc.assert_matches_peft_with(fpm, pm, tree, inputs)


def test_poly_training_call_samples_like_peft() -> None:
    """A training call (dropout_rng) samples the relaxed-Bernoulli router like PEFT's train mode: seeded alike,
    outputs and every gradient agree; the samples differ by seed and from the eval call."""
    fpm, pm = mc.build_both(T.tiny_llama(), "PolyConfig", {**LLAMA, "init_weights": False})
    (tree,) = mc.random_trees(fpm.adapter, n=1, scale=0.5)
    T.copy_into_peft(pm, tree, fpm.plans["default"])
    pm.train()
    weights = torch.randn(3, 5, T.VOCAB, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    want = pm(input_ids=IDS, task_ids=TASKS).logits
    (want * weights).sum().backward()

    def loss(a: Any) -> torch.Tensor:
        return (fpm.fn(fpm.base, a, input_ids=IDS, task_ids=TASKS, dropout_rng=11).logits * weights).sum()

    got, grads = funcpeft.value_and_grad(loss)(tree)
    torch.testing.assert_close(got, (want * weights).sum().detach(), atol=1e-4, rtol=1e-5)
    T.assert_trees_close(grads, T.peft_grads(pm, tree, fpm.plans["default"]), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        again = fpm.fn(fpm.base, tree, input_ids=IDS, task_ids=TASKS, dropout_rng=11).logits
        other = fpm.fn(fpm.base, tree, input_ids=IDS, task_ids=TASKS, dropout_rng=12).logits
        evaluated = fpm.fn(fpm.base, tree, input_ids=IDS, task_ids=TASKS).logits
    torch.testing.assert_close(again, want.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other, again, atol=1e-4) and not torch.allclose(evaluated, again, atol=1e-4)


def test_poly_files_both_ways(tmp_path: Any) -> None:
    """PEFT's files, bitwise (keys, values, config); each library loads the other's and computes the same."""
    fpm, pm = mc.build_both(T.tiny_llama(), "PolyConfig", LLAMA)
    (tree,) = mc.random_trees(fpm.adapter, n=1, scale=0.3)
    T.copy_into_peft(pm, tree, fpm.plans["default"])
    ours, theirs = os.fspath(tmp_path / "ours"), os.fspath(tmp_path / "theirs")
    fpm.save_pretrained(ours, tree)
    pm.save_pretrained(theirs)
    from safetensors.torch import load_file

    a, b = load_file(f"{ours}/adapter_model.safetensors"), load_file(f"{theirs}/adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("poly_router.module_logits") for k in a)
    back, config = funcpeft.load_adapter(theirs, model=T.tiny_llama())
    assert isinstance(config, funcpeft.PolyConfig) and config.n_tasks == 3
    T.assert_trees_close(back, tree, atol=0)
    loaded = peft.PeftModel.from_pretrained(T.tiny_llama(), ours).eval()
    with torch.no_grad():
        want = loaded(input_ids=IDS, task_ids=TASKS).logits
        got = fpm.fn(fpm.base, back, input_ids=IDS, task_ids=TASKS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_poly_generate_equals_peft() -> None:
    """Greedy generation with task_ids (kept for every step, as PEFT's pre-hooks do): PEFT's tokens."""
    fpm, pm = mc.build_both(T.tiny_llama(), "PolyConfig", LLAMA)
    (tree,) = mc.random_trees(fpm.adapter, n=1, scale=1.0)
    T.copy_into_peft(pm, tree, fpm.plans["default"])
    kw: dict[str, Any] = dict(input_ids=IDS, task_ids=TASKS, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = pm.generate(**kw)
        got = funcpeft.generate(fpm, fpm.base, tree, **kw)
        plain = funcpeft.generate(fpm, fpm.base, None, **{k: v for k, v in kw.items() if k != "task_ids"})
    assert torch.equal(got, want)
    assert not torch.equal(got, plain), "the adapter should change the tokens"
    with pytest.raises(RuntimeError):  # PEFT: task_ids (B,) meet the beams' B * 2 rows in its bmm
        pm.generate(**kw, num_beams=2)
    with pytest.raises(ValueError, match=r"num_beams=2 with an adapter that consumes \['task_ids'\]"):
        funcpeft.generate(fpm, fpm.base, tree, **kw, num_beams=2)
    with pytest.raises(NotImplementedError, match="num_return_sequences=2"):
        funcpeft.generate(fpm, fpm.base, tree, **{**kw, "do_sample": True}, num_return_sequences=2, rng=0)


def test_poly_task_ids_are_checked() -> None:
    """Missing, out of range, wrong length, non-integer: clear errors. A negative id, which PEFT silently wraps
    to the last task, is refused."""
    fpm, pm = mc.build_both(T.tiny_llama(), "PolyConfig", LLAMA)
    fn, base, tree = fpm
    with pytest.raises(ValueError, match="task_ids should not be None"):
        pm(input_ids=IDS)
    with pytest.raises(ValueError, match="task_ids should not be None"):
        fn(base, tree, input_ids=IDS)
    with pytest.raises(ValueError, match="Only 3 tasks available. Found task id = 3"):
        pm(input_ids=IDS, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="Only 3 tasks available. Found task id = 3"):
        fn(base, tree, input_ids=IDS, task_ids=torch.tensor([0, 3, 1]))
    with torch.no_grad():  # PEFT: -1 reads task 2's router row, silently
        torch.testing.assert_close(
            pm(input_ids=IDS, task_ids=torch.tensor([0, -1, 1])).logits, pm(input_ids=IDS, task_ids=TASKS).logits
        )
    with pytest.raises(ValueError, match="task id -1 is negative"):
        fn(base, tree, input_ids=IDS, task_ids=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"has shape \(3, 5, 64\), but the call has 2 task ids"):
        fn(base, tree, input_ids=IDS, task_ids=torch.tensor([0, 1]))
    for bad in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[0, 1, 2]]), [0, 1, 2]):
        with pytest.raises(ValueError, match="task_ids must be an integer tensor of shape"):
            fn(base, tree, input_ids=IDS, task_ids=bad)


def test_poly_refusals_like_peft() -> None:
    """Conv1D (GPT-2), a bad poly_type or rank, splits that do not divide, merging, PeftMixedModel."""
    info = mc.assert_raises_like_peft(
        T.tiny_gpt2(), "PolyConfig", dict(target_modules=["c_attn"]), TypeError, "(?i)linear"
    )
    assert "transformer.h.0.attn.c_attn" in str(info.value) and isinstance(info.value, UnsupportedLayerError)
    with pytest.raises(ValueError, match="poly_type"):
        funcpeft.PolyConfig(poly_type="mhr")  # type: ignore[arg-type]
    mc.assert_raises_like_peft(T.tiny_llama(), "PolyConfig", dict(r=0, target_modules=["q_proj"]), ValueError, "`r`")
    with pytest.raises(
        ValueError, match=r"down_proj: in_features=128 and out_features=64 must both divide by n_splits=3"
    ):
        funcpeft.get_peft_model(T.tiny_llama(), funcpeft.PolyConfig(n_splits=3, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="n_tasks"):
        funcpeft.PolyConfig(n_tasks=0)
    fpm, pm = mc.build_both(T.tiny_llama(), "PolyConfig", LLAMA)
    with pytest.raises(NotImplementedError):
        pm.merge_and_unload()
    with pytest.raises(NotImplementedError):
        funcpeft.merge_and_unload(fpm, fpm.adapter)
    mc.assert_mixed_refused_like_peft(T.tiny_llama(), "PolyConfig", LLAMA)


def test_poly_vmap_compile_and_routing() -> None:
    """vmap over stacked adapters == a loop; compile (fullgraph) without recompiles for new adapter values and new
    task ids; per-example adapter trees refused (Poly mixes per example by task_ids itself)."""
    fpm = funcpeft.get_peft_model(T.tiny_llama(), funcpeft.PolyConfig(**{**LLAMA, "init_weights": False}))
    fn, base, fresh = fpm
    trees = mc.random_trees(fresh, n=3)
    x = {"input_ids": IDS, "task_ids": TASKS}
    with torch.no_grad():
        alone = [fn(base, t, **x).logits for t in trees]
        stacked = funcpeft.stack_adapters(trees)
        vmapped = torch.func.vmap(lambda a: fn(base, a, **x).logits)(stacked)
    for k in range(3):
        torch.testing.assert_close(vmapped[k], alone[k], atol=1e-5, rtol=1e-5)
    mc.assert_compiles_once(fn, base, trees, x)
    mc.assert_compiles_once(fn, base, [trees[0]] * 2, {"input_ids": IDS, "task_ids": torch.tensor([2, 2, 0])})
    with pytest.raises(NotImplementedError, match="per-example adapter trees"):
        fn(base, funcpeft.per_example(stacked, torch.tensor([0, 1, 2])), **x)


def test_poly_mixing_weights_are_pefts_router() -> None:
    """The router arithmetic itself: eval == PEFT's sigmoid normalisation; training == RelaxedBernoulli.rsample
    with the same uniforms (global seed vs generator seeded alike)."""
    from peft.tuners.poly.router import PolyRouter

    cfg = peft.PolyConfig(n_tasks=4, n_skills=3, n_splits=2)
    router = PolyRouter(cfg)
    torch.nn.init.normal_(router.module_logits, std=3.0)
    ids = torch.tensor([3, 0, 0, 2])
    spec: Any = type("S", (), {"hyper": poly.PolyHyper(r=1, n_tasks=4, n_skills=3, n_splits=2, init=True)})()
    logits = router.module_logits.detach()
    router.eval()
    torch.testing.assert_close(poly.mixing_weights(spec, logits, ids, None, False), router(ids, None), atol=0, rtol=0)
    router.train()
    torch.manual_seed(4)
    want = router(ids, None)
    got = poly.mixing_weights(spec, logits, ids, torch.Generator().manual_seed(4), True)
    torch.testing.assert_close(got, want.detach(), atol=0, rtol=0)
    assert got.shape == (4, 2, 3) and got.sum(-1).sub(1).abs().max() < 1e-5
