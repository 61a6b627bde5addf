"""FSDP2 with quantised bases (QLoRA) and with mixed precision, over 2 gloo processes, against one process.

What runs sharded (funcpeft._fsdp): a bitsandbytes Linear4bit whose packed weight `fully_shard` splits (FSDP2
gathers the bytes as a plain Parameter; bitsandbytes restores the quant state from the layer), with
`bnb_4bit_quant_storage` uint8 or bf16 (accelerate's FSDP recipe); `MixedPrecisionPolicy(param_dtype=bf16)`.
What cannot (each shown failing in torch / bitsandbytes themselves, and refused by funcpeft naming the module and
its type): a Linear8bitLt (FSDP2 keeps no row scales), a 4-bit weight stored as a float dtype that the policy
casts (its packed codes change). And bad input: a sharded base given to an fn built on an unsharded model.

One spawn runs every check (process start-up dominates); the parent computes the single-process references.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from typing import Any, cast

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import funcpeft
from funcpeft import distributed as D
from funcpeft.grad import value_and_grad
from funcpeft.testing import assert_trees_close, random_like, tiny_llama

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test extra (quantised bases)")
transformers = pytest.importorskip("transformers")
from test_fsdp import _digest  # noqa: E402 (the saved files' exact content)

pytestmark = pytest.mark.slow  # `make test-fast` skips this file (CONTRIBUTING.md)

WORLD, BATCH = 2, 4
BF16 = torch.bfloat16
# name -> (quantisation, funcpeft config, MixedPrecisionPolicy param_dtype)
CASES: dict[str, tuple[dict[str, Any] | None, dict[str, Any], torch.dtype | None]] = {
    "nf4": ({"bnb_4bit_quant_type": "nf4"}, {"target_modules": "all-linear"}, None),
    # DoRA reads the whole dequantised weight (init: gathered; forward: the gathered data and the layer's state)
    "dora": (
        {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": BF16},
        {"target_modules": ["q_proj", "down_proj"], "use_dora": True},
        None,
    ),
    "mp": (None, {"target_modules": "all-linear"}, BF16),
    "mp_nf4": ({"bnb_4bit_quant_type": "nf4"}, {"target_modules": ["q_proj", "v_proj", "up_proj"]}, BF16),
}


def _load(path: str, quant: dict[str, Any] | None) -> Any:
    if quant is None:
        model = tiny_llama(seed=0)
    else:
        if quant == {"8bit": True}:
            qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
        else:
            qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **quant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    model.requires_grad_(False)
    return model.eval()


def _config(case: str) -> funcpeft.LoraConfig:
    return funcpeft.LoraConfig(r=4, **CASES[case][1])


def _ids() -> torch.Tensor:
    return torch.randint(1, 64, (BATCH, 8), generator=torch.Generator().manual_seed(1))


def _adapter(pm: Any) -> Any:
    return optree.tree_map(torch.Tensor.detach, random_like(pm.adapter, torch.Generator().manual_seed(0)))


def _loss_and_grads(pm: Any, base: Any, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    # training mode (a dropout_rng; lora_dropout is 0, so any seed gives the same values): checkpointing is on
    return value_and_grad(lambda a: pm.fn(base, a, input_ids=ids, labels=ids, dropout_rng=0).loss)(_adapter(pm))


def _error(f: Any) -> str:
    try:
        f()
    except Exception as e:  # noqa: BLE001 (the parent asserts on the type and message)
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, init_file: str, path: str, out_dir: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    res: dict[str, Any] = {}
    try:
        ids = D.shard(_ids())
        calls: list[int] = []
        for case, (quant, _, param_dtype) in CASES.items():
            model = _load(path, quant)
            if case == "nf4":  # each 4-bit layer recomputed in backward: gathered again, adapted again
                model.gradient_checkpointing_enable()
                model.get_submodule("model.layers.1.self_attn.q_proj").register_forward_hook(lambda *a: calls.append(1))
            policy: dict[str, Any] = {} if param_dtype is None else {"mp_policy": MixedPrecisionPolicy(param_dtype)}
            D.shard_base(model, **policy)
            if case == "mp":  # FSDP leaves the root's weights gathered after a forward: get_peft_model reshards
                with torch.no_grad():
                    model(input_ids=ids)
                res["mp/gathered_before"] = type(model.lm_head.weight).__name__
            pm = funcpeft.get_peft_model(model, _config(case))
            res[f"{case}/base_types"] = sorted({type(t).__name__ for t in pm.base.values()})
            loss, grads = _loss_and_grads(pm, pm.base, ids)
            dist.all_reduce(loss)
            res[f"{case}/loss"], res[f"{case}/grads"] = loss / WORLD, D.all_reduce_grads(grads)
            if case == "nf4":
                res["nf4/calls"] = len(calls)
            if case in ("nf4", "dora"):
                res[f"{case}/bytes"] = D.local_bytes(pm.base)
                directory = D.save_pretrained(pm, os.path.join(out_dir, f"sharded-{case}"), _adapter(pm))
                res[f"{case}/digest"] = _digest(directory)
        qlora = pm  # mp_nf4: kept for the calls after destroy_process_group

        # 8-bit: torch / bitsandbytes cannot run it sharded; funcpeft says so, naming the module and its type
        int8 = D.shard_base(_load(path, {"8bit": True}))
        res["err/int8_plain"] = _error(lambda: int8(input_ids=ids))
        res["err/int8"] = _error(lambda: funcpeft.get_peft_model(_load_sharded(path, {"8bit": True}), _config("nf4")))
        # 4-bit stored as bf16, gathered as fp16 by the policy: the packed codes change (silently, in torch)
        quant = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": BF16}
        whole = _load(path, quant)
        with torch.no_grad():
            want = whole(input_ids=ids).logits
            fp16 = D.shard_base(whole, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16))
            res["cast_plain"] = _error(lambda: res.__setitem__("cast_logits", fp16(input_ids=ids).logits.float()))
        res["cast_want"] = want
        res["err/cast"] = _error(lambda: funcpeft.get_peft_model(fp16, _config("nf4")))
        # bad input: a sharded base into an fn built on an unsharded model
        plain = funcpeft.get_peft_model(_load(path, None), _config("mp"))
        sharded = funcpeft.get_peft_model(D.shard_base(_load(path, None)), _config("mp"))
        res["err/sharded_base_unsharded_fn"] = _error(lambda: plain.fn(sharded.base, plain.adapter, input_ids=ids))
        # the very shard FSDP holds, as a DTensor on another mesh (same ranks, named): not the model's sharding
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        key = "model.layers.1.mlp.down_proj.weight"
        shard = cast(DTensor, sharded.base[key])
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
        moved = DTensor.from_local(shard.to_local(), mesh, shard.placements, shape=shard.shape, stride=shard.stride())
        base = {**sharded.base, key: moved}
        res["err/other_mesh"] = _error(lambda: sharded.fn(base, plain.adapter, input_ids=ids))
        # an adapter tree is plain tensors by module path: one made on the unsharded model runs on the sharded one
        with torch.no_grad():
            trained = _adapter(plain)
            res["same_adapter"] = [pm.fn(pm.base, trained, input_ids=ids).logits for pm in (plain, sharded)]
            res["no_adapter"] = plain.fn(plain.base, None, input_ids=ids).logits
        dist.barrier()
    finally:
        dist.destroy_process_group()
    res["err/no_group_sharded_base"] = _error(lambda: plain.fn(sharded.base, plain.adapter, input_ids=ids))
    res["err/no_group_qlora"] = _error(lambda: qlora.fn(qlora.base, qlora.adapter, input_ids=ids))
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def _load_sharded(path: str, quant: dict[str, Any]) -> Any:
    return D.shard_base(_load(path, quant))


def _rel(tree: Any, ref: Any) -> float:
    """The largest leaf-wise max |tree - ref| / max |ref|."""
    return max(
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(optree.tree_leaves(tree), optree.tree_leaves(ref))
    )


def _bf16_base(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` as MixedPrecisionPolicy(param_dtype=bf16) gathers it: float tensors cast, packed 4-bit data as is."""
    return {
        k: v if type(v) is not torch.nn.Parameter and type(v) is not torch.Tensor else v.to(BF16)
        for k, v in base.items()
    }


def test_qlora_and_mixed_precision_sharded_equal_one_process() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny-llama")
        tiny_llama(seed=0).save_pretrained(path)
        mp.start_processes(
            _worker, args=(os.path.join(tmp, "init"), path, tmp), nprocs=WORLD, join=True, start_method="spawn"
        )
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
        ids = _ids()
        single = {
            case: funcpeft.get_peft_model(_load(path, quant), _config(case)) for case, (quant, _, _) in CASES.items()
        }
        digests = {}
        for case in ("nf4", "dora"):
            pm = single[case]
            digests[case] = _digest(pm.save_pretrained(os.path.join(tmp, f"single-{case}"), _adapter(pm)))

    for case, pm in single.items():
        mixed = CASES[case][2] is not None
        base = _bf16_base(pm.base) if mixed else pm.base
        loss, grads = _loss_and_grads(pm, base, ids)
        assert funcpeft.optim.global_norm(grads) > 1e-3  # the adapter matters
        if mixed:
            # the policy matters: fp32 weights give gradients ~1e-2 (relative) away, 100x the tolerance below
            fp32_loss, fp32_grads = _loss_and_grads(pm, pm.base, ids)
            assert _rel(fp32_grads, grads) > 1e-3, _rel(fp32_grads, grads)
        for r in ranks:
            assert "DTensor" in r[f"{case}/base_types"]
            if not mixed:
                torch.testing.assert_close(r[f"{case}/loss"], loss, atol=1e-5, rtol=0)
                assert_trees_close(r[f"{case}/grads"], grads, atol=1e-5)
            else:
                # the same bf16 casts as one process; each rank's GEMMs see half the rows, so a bf16 result may round
                # differently (one bf16 ulp is 2^-8 relative): 1e-4 relative, measured 2e-7 (loss: equal)
                torch.testing.assert_close(r[f"{case}/loss"], loss, atol=1e-4, rtol=0)
                assert _rel(r[f"{case}/grads"], grads) <= 1e-4, (case, _rel(r[f"{case}/grads"], grads))
    for case in ("nf4", "dora"):
        for r in ranks:
            assert r[f"{case}/digest"] == digests[case]  # the same files as one process saves
            held, whole = r[f"{case}/bytes"]
            assert held == whole // WORLD  # the packed 4-bit data is split like every other tensor
    r0 = ranks[0]
    assert [r["nf4/calls"] for r in ranks] == [2, 2]  # forward and recompute (the gradients above agree)
    assert r0["mp/gathered_before"] == "Parameter"  # FSDP had left the root gathered: captured resharded anyway
    # torch / bitsandbytes themselves: 8-bit fails; a cast 4-bit weight runs, silently wrong
    assert re.search(r"AttributeError: .*has no attribute 'CB'", r0["err/int8_plain"]), r0["err/int8_plain"]
    assert r0["cast_plain"] == "no error"  # silently: logits off by ~1.3x their largest value (measured)
    assert (r0["cast_logits"] - r0["cast_want"]).abs().max() > 0.1 * r0["cast_want"].abs().max()
    torch.testing.assert_close(*r0["same_adapter"], atol=1e-5, rtol=0)
    assert (r0["same_adapter"][0] - r0["no_adapter"]).abs().max() > 1e-3  # the adapter was applied
    print("\n".join(f"{k}: {v}" for k, v in r0.items() if k.startswith("err/")))
    for key, pattern in {
        "int8": r"NotImplementedError: .*'model\.layers\.0\.self_attn\.q_proj' \(Linear8bitLt\) is a bitsandbytes 8-bit "
        r"layer sharded with fully_shard",
        "cast": r"NotImplementedError: .*'model\.layers\.0\.self_attn\.q_proj' \(Linear4bit\) .*stored as "
        r"torch\.bfloat16 .*MixedPrecisionPolicy\(param_dtype=torch\.float16\)",
        "sharded_base_unsharded_fn": r"ValueError: .*base\['model\.embed_tokens\.weight'\] is a DTensor .*Shard\(dim=0\)"
        r".*built on an unsharded model .*'model\.embed_tokens' \(Embedding\)",
        "other_mesh": r"ValueError: .*base\['model\.layers\.1\.mlp\.down_proj\.weight'\] is a DTensor .*DeviceMesh\(\(dp=2\).*"
        r"not the shard FSDP holds",
        "no_group_sharded_base": r"ValueError: .*base\['model\.embed_tokens\.weight'\] is a DTensor .*unsharded model",
        "no_group_qlora": r"RuntimeError: .*DTensor shard .*no initialized process group",
    }.items():
        assert re.search(pattern, r0[f"err/{key}"], re.S), (key, r0[f"err/{key}"])
