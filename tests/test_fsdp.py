"""A base sharded with FSDP2 (`fully_shard`) over 2 gloo processes equals one process on the full batch.

One spawn runs every check (process start-up dominates): each rank records losses, gradients, trained
adapters, what crossed the wire, what it held and wrote, and the errors of bad inputs; the parent computes
the single-process references and compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import funcpeft
from funcpeft import distributed as D
from funcpeft import io as fio
from funcpeft import optim
from funcpeft import testing as T
from funcpeft.grad import value_and_grad

if TYPE_CHECKING:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

pytestmark = pytest.mark.slow  # `make test-fast` skips this file (CONTRIBUTING.md)

WORLD, BATCH, STEPS, LAYERS = 2, 4, 3, 4
CONFIGS: dict[str, Callable[[], funcpeft.PeftConfig]] = {
    "lora": lambda: funcpeft.LoraConfig(r=4, target_modules="all-linear"),
    # an adapted embedding (saved with the base embedding: gathered for the file) and an override (modules_to_save)
    "embed": lambda: funcpeft.LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj", "v_proj"], modules_to_save=["lm_head"]
    ),
    # DoRA reads the gathered weight in the forward and, at init, the whole weight (gathered)
    "dora": lambda: funcpeft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True),
    # other methods on the same path: shared frozen tensors (VeRA), per-layer frozen tensors made from the sharded
    # weight (trainable tokens' original rows: gathered) or not (SHiRA's indices), replaced parameters (LN tuning)
    "ia3": lambda: funcpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "vera": lambda: funcpeft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "oft": lambda: funcpeft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "up_proj"]),
    "shira": lambda: funcpeft.ShiraConfig(r=4, target_modules=["v_proj", "down_proj"]),
    "lntuning": lambda: funcpeft.LNTuningConfig(target_modules=["input_layernorm"]),
    "tokens": lambda: funcpeft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 70]),
}
# with gradient checkpointing: the recompute in backward must redraw the forward's adapter dropout masks
GC_CONFIG = lambda: funcpeft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.25)  # noqa: E731


def _model(checkpointing: bool = False) -> Any:
    model = T.tiny_llama(layers=LAYERS)
    model.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _adapter(pm: Any) -> Any:
    return optree.tree_map(torch.Tensor.detach, T.random_like(pm.adapter, torch.Generator().manual_seed(0)))


def _ids() -> torch.Tensor:
    return torch.randint(1, T.VOCAB, (BATCH, 8), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(pm: Any, adapter: Any, ids: torch.Tensor, seed: int | None = None) -> tuple[torch.Tensor, Any]:
    fn, base, _ = pm
    return value_and_grad(lambda a: fn(base, a, input_ids=ids, labels=ids, dropout_rng=seed).loss)(adapter)


def _train(pm: Any, adapter: Any, ids: torch.Tensor, reduce: Any = None) -> Any:
    opt = optim.adamw(1e-2, weight_decay=0.1)
    state = opt.init(adapter)
    for _ in range(STEPS):
        _, grads = _loss_and_grads(pm, adapter, ids)
        if reduce is not None:
            grads = reduce(grads)
        updates, state = opt.update(grads, state, adapter)
        adapter = optim.apply_updates(adapter, updates)
    return adapter


def _error(f: Callable[[], Any]) -> str:
    try:
        f()
    except Exception as e:  # noqa: BLE001 (the parent asserts on the type and message)
        return f"{type(e).__name__}: {e}"
    return "no error"


def _digest(directory: str) -> dict[str, Any]:
    """The saved files' exact content: the config's bytes; the safetensors header (a dict) and data bytes.

    Not the safetensors file's bytes: safetensors writes its `__metadata__` map in an order that varies from
    process to process (a Rust HashMap), so two processes saving the same tensors give different bytes.
    """
    with open(os.path.join(directory, fio.WEIGHTS_NAME), "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    with open(os.path.join(directory, fio.CONFIG_NAME), "rb") as f:
        config = f.read()
    return {
        "config": hashlib.sha256(config).hexdigest(),
        "header": json.loads(raw[8 : 8 + n]),
        "data": hashlib.sha256(raw[8 + n :]).hexdigest(),
    }


def _peft_twin(pm: Any, adapter: Any) -> Any:
    """PEFT's model for CONFIGS["lora"] holding `adapter` (`pm`'s tree), sharded as shard_base does (its LoRA too)."""
    import peft
    from torch.distributed.fsdp import fully_shard

    twin = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules="all-linear")).eval()
    T.copy_into_peft(twin, adapter, pm.plans[pm.adapter_name])
    for layer in cast("Sequence[LlamaDecoderLayer]", twin.get_submodule("base_model.model.model.layers")):
        fully_shard(layer)
    fully_shard(twin)
    return twin


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    res: dict[str, Any] = {}
    wire: dict[str, list[int]] = {"all_reduce": [], "all_gather": [], "reduce_scatter": []}
    real = {
        n: getattr(dist, n)
        for n in ("all_reduce", "all_gather_single", "reduce_scatter_single", "reduce_scatter_tensor")
    }

    def counting(kind: str, name: str) -> Any:
        def call(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            wire[kind].append(tensor.numel())
            return real[name](tensor, *args, **kwargs)

        return call

    writes: list[str] = []
    real_write = fio.write_files_atomically

    def recording_write(writers: Mapping[str, Callable[[str], None]], fsync: bool = True) -> None:
        writes.extend(writers)
        real_write(writers, fsync)

    fio.write_files_atomically = recording_write  # this worker process only
    try:
        ids = D.shard(_ids())
        pms = {}
        for name, config in CONFIGS.items():
            model = D.shard_base(_model())
            pms[name] = pm = funcpeft.get_peft_model(model, config())
            res[f"{name}/sharded"] = D.is_sharded(pm)
            loss, grads = _loss_and_grads(pm, _adapter(pm), ids)
            res[f"{name}/grads"] = D.all_reduce_grads(grads)
            dist.all_reduce(loss)
            res[f"{name}/loss"] = loss / WORLD
        pm = pms["lora"]
        res["bytes"] = D.local_bytes(pm.base)
        layers = cast("Sequence[LlamaDecoderLayer]", pm.model.get_submodule("model.layers"))
        gathered: list[int] = []  # how many decoder layers hold whole weights, seen as each layer starts
        for layer in layers:
            layer.input_layernorm.register_forward_pre_hook(
                lambda m, a: gathered.append(sum(not D.is_dtensor(x.input_layernorm.weight) for x in layers))
            )
        for n, name in (
            ("all_reduce", "all_reduce"),
            ("all_gather", "all_gather_single"),
            ("reduce_scatter", "reduce_scatter_single"),
            ("reduce_scatter", "reduce_scatter_tensor"),
        ):
            setattr(dist, name, counting(n, name))
        res["trained"] = _train(pm, _adapter(pm), ids, reduce=D.all_reduce_grads)
        for name, f in real.items():
            setattr(dist, name, f)
        res["wire"], res["gathered"] = wire, gathered
        res["after"] = [type(layer.input_layernorm.weight).__name__ for layer in layers]

        # PEFT under the same FSDP2 sharding: its LoRA parameters sharded too, their gradients reduce-scattered (mean)
        twin = _peft_twin(pms["lora"], _adapter(pms["lora"]))
        out = twin(input_ids=ids, labels=ids)
        out.loss.backward()
        loss = out.loss.detach()
        dist.all_reduce(loss)
        res["peft/loss"] = loss / WORLD
        grads = T.peft_grads(twin, _adapter(pms["lora"]), pms["lora"].plans[pms["lora"].adapter_name])
        res["peft/grads"] = optree.tree_map(lambda g: g.full_tensor(), grads)

        # gradient checkpointing with dropout: each layer recomputed in backward, with the adapter and the same masks
        pm_gc = funcpeft.get_peft_model(D.shard_base(_model(checkpointing=True)), GC_CONFIG())
        calls: list[int] = []
        pm_gc.model.get_submodule("model.layers.1.self_attn.q_proj").register_forward_hook(lambda *a: calls.append(1))
        loss, grads = _loss_and_grads(pm_gc, _adapter(pm_gc), ids, seed=7)
        res["gc/grads"], res["gc/calls"] = D.all_reduce_grads(grads), len(calls)

        # saving: every rank calls, rank 0 writes; then loading into the sharded model
        for name in ("lora", "embed"):
            adapter = res["trained"] if name == "lora" else _adapter(pms[name])
            res[f"{name}/saved_adapter"] = adapter
            directory = D.save_pretrained(pms[name], os.path.join(out_dir, f"sharded-{name}"), adapter)
            res[f"{name}/digest"] = _digest(directory)  # on rank 1 too: the files are complete when it returns
        res["writes"] = [os.path.relpath(w, out_dir) for w in writes]
        loaded = funcpeft.from_pretrained(pm.model, os.path.join(out_dir, "sharded-lora"))
        res["loaded/adapter"] = loaded.adapter
        with torch.no_grad():
            res["loaded/logits"] = loaded.fn(loaded.base, loaded.adapter, input_ids=ids).logits
            res["trained/logits"] = pm.fn(pm.base, res["trained"], input_ids=ids).logits

        # bad input
        adapter = _adapter(pm)
        call = lambda base, a=adapter: pm.fn(base, a, input_ids=ids)  # noqa: E731
        late_model = _model()
        late = funcpeft.get_peft_model(late_model, CONFIGS["lora"]())
        D.shard_base(late_model)
        res["err/sharded_after"] = _error(lambda: late.fn(late.base, adapter, input_ids=ids))
        res["err/plain_base"] = _error(lambda: call({**pm.base, **late.base}))  # late.base: captured before sharding
        res["err/other_model"] = _error(lambda: call(pms["dora"].base))  # the same sharding, another model's shards
        from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

        key = "model.layers.2.self_attn.q_proj.weight"
        sharded = cast(DTensor, pm.base[key])
        replicated = distribute_tensor(sharded.full_tensor(), sharded.device_mesh, [Replicate()])
        res["err/other_sharding"] = _error(lambda: call({**pm.base, key: replicated}))
        path = "model.layers.1.mlp.up_proj"
        as_dtensor = {
            **adapter,
            path: {
                **adapter[path],
                "lora_A": distribute_tensor(adapter[path]["lora_A"], replicated.device_mesh, [Replicate()]),
            },
        }
        res["err/dtensor_leaf"] = _error(lambda: call(pm.base, as_dtensor))
        weight = cast(torch.nn.Linear, pm.model.get_submodule("model.layers.0.mlp.gate_proj")).weight
        weight.requires_grad_(True)
        res["err/trainable_base"] = _error(lambda: call(pm.base))
        weight.requires_grad_(False)
        res["err/shard_trainable"] = _error(lambda: D.shard_base(T.tiny_llama()))
        res["err/generate"] = _error(lambda: pm.generate(pm.base, adapter, input_ids=ids, max_new_tokens=2))
        res["err/func_grad"] = _error(
            lambda: torch.func.grad(lambda a: pm.fn(pm.base, a, input_ids=ids).logits.sum())(adapter)
        )
        res["err/after_errors_ok"] = _error(lambda: call(pm.base))  # the model is left as it was after each error
        dist.barrier()
    finally:
        dist.destroy_process_group()
    res["err/no_group_call"] = _error(lambda: pm.fn(pm.base, adapter, input_ids=ids))
    res["err/no_group_plan"] = _error(lambda: funcpeft.get_peft_model(pm.model, CONFIGS["lora"]()))
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_sharded_base_equals_one_process_on_the_full_batch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True, start_method="spawn"
        )
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
        ids = _ids()
        single = {name: funcpeft.get_peft_model(_model(), config()) for name, config in CONFIGS.items()}
        digests = {}
        for name in ("lora", "embed"):  # the very tree rank 0 saved, saved by one process
            saved = single[name].save_pretrained(os.path.join(tmp, f"single-{name}"), ranks[0][f"{name}/saved_adapter"])
            digests[name] = _digest(saved)
            peft_logits = _peft_logits(os.path.join(tmp, f"sharded-{name}"), ids)
            with torch.no_grad():
                want = single[name].fn(single[name].base, ranks[0][f"{name}/saved_adapter"], input_ids=ids).logits
            torch.testing.assert_close(peft_logits, want, atol=1e-5, rtol=0)

    for name, pm in single.items():
        loss, grads = _loss_and_grads(pm, _adapter(pm), ids)
        assert optim.global_norm(grads) > 1e-3  # the adapter matters: a dropped adapter would show
        for r in ranks:
            assert r[f"{name}/sharded"]
            torch.testing.assert_close(r[f"{name}/loss"], loss, atol=1e-5, rtol=0)
            T.assert_trees_close(r[f"{name}/grads"], grads, atol=1e-5)
    pm = single["lora"]
    adapter = _adapter(pm)
    want = _train(pm, adapter, ids)
    assert max((a - b).abs().max().item() for a, b in zip(optree.tree_leaves(want), optree.tree_leaves(adapter))) > 1e-3
    # checkpointing with dropout: each rank draws its masks for its half of the batch from seed 7
    pm_drop = funcpeft.get_peft_model(_model(), GC_CONFIG())
    halves = [_loss_and_grads(pm_drop, adapter, half, seed=7)[1] for half in ids.chunk(WORLD)]
    want_gc = optree.tree_map(lambda *g: sum(g) / WORLD, *halves)
    _, no_dropout = _loss_and_grads(pm_drop, adapter, ids)
    assert optim.global_norm(optree.tree_map(torch.sub, want_gc, no_dropout)) > 1e-3  # the masks matter
    n_adapter = funcpeft._trees.tree_numel(adapter)
    for r in ranks:
        T.assert_trees_close(r["trained"], want, atol=1e-5)
        # only the adapter's gradients cross the wire, once a step; FSDP gathers weights and reduces nothing
        assert r["wire"]["all_reduce"] == [n_adapter] * STEPS
        assert r["wire"]["reduce_scatter"] == [] and len(r["wire"]["all_gather"]) > 0
        held, whole = r["bytes"]
        assert whole == sum(t.numel() * t.element_size() for t in pm.base.values())
        assert held == whole // WORLD  # every tensor of the tiny llama splits evenly
        # at most the running layer and the next one (prefetched) are whole at once; all re-sharded after a step
        assert 1 <= max(r["gathered"]) <= 2 < LAYERS
        assert r["after"] == ["DTensor"] * LAYERS
        T.assert_trees_close(r["gc/grads"], want_gc, atol=1e-5)
        torch.testing.assert_close(r["peft/loss"], r["lora/loss"], atol=1e-5, rtol=0)  # PEFT, sharded alike
        T.assert_trees_close(r["peft/grads"], ranks[0]["lora/grads"], atol=1e-5)
        assert r["gc/calls"] == 2  # forward and recompute: the recompute saw the adapter (the gradients agree)
        for name in ("lora", "embed"):
            assert r[f"{name}/digest"] == digests[name]  # the same files as a single process saves (see _digest)
        T.assert_trees_close(r["loaded/adapter"], ranks[0]["lora/saved_adapter"], atol=0)
        torch.testing.assert_close(r["loaded/logits"], r["trained/logits"], atol=0, rtol=0)
    assert ranks[0]["writes"] and all(w.startswith("sharded-") for w in ranks[0]["writes"])
    assert ranks[1]["writes"] == []  # only rank 0 writes
    T.assert_trees_close(ranks[0]["trained"], ranks[1]["trained"], atol=0)

    errors = ranks[0]
    print("\n".join(f"{k}: {v}" for k, v in errors.items() if k.startswith("err/")))
    for key, pattern in {
        "sharded_after": r"RuntimeError: .*LlamaForCausalLM.* sharded with fully_shard after get_peft_model",
        "plain_base": r"ValueError: .*base\['model\.embed_tokens\.weight'\] is a plain Tensor .*'model\.embed_tokens' \(Embedding\).*captured before the model was sharded",
        "other_model": r"ValueError: .*base\['model\..*'\] is a DTensor .*not the shard FSDP holds .*FSDPLlama",
        "other_sharding": r"ValueError: .*base\['model\.layers\.2\.self_attn\.q_proj\.weight'\] .*Replicate\(\).*Shard\(dim=0\)",
        "dtensor_leaf": r"TypeError: .*model\.layers\.1\.mlp\.up_proj\.lora_A is a DTensor.*Linear",
        "trainable_base": r"RuntimeError: .*'model\.layers\.0\.mlp\.gate_proj\.weight' .*FSDPLlamaDecoderLayer.* requires grad",
        "shard_trainable": r"ValueError: shard_base: the base must be frozen",
        "generate": r"NotImplementedError: .*generate .*not supported on a model sharded with FSDP2",
        "func_grad": r"NotImplementedError: .*sharded base \(FSDP2\).*torch\.func transforms",
        "after_errors_ok": r"no error",
        "no_group_call": r"RuntimeError: .*'model\..*' .*DTensor shard .*no initialized process group",
        "no_group_plan": r"RuntimeError: .*DTensor shard .*no initialized process group",
    }.items():
        assert re.search(pattern, errors[f"err/{key}"], re.S), (key, errors[f"err/{key}"])


def _peft_logits(directory: str, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_model(), directory)
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


def test_sharded_helpers_need_an_initialized_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.shard_base(_model())
