"""LoRA on a base sharded with FSDP2, launched with torchrun: docs/distributed.md's recipe, runnable on a CPU.

Every rank builds the same small random Llama (seeded: a stand-in for `from_pretrained`), freezes it, shards it
with `funcpeft.distributed.shard_base` (FSDP2's `fully_shard` per decoder layer, then the root), trains LoRA on
its own slice of each global batch with the adapter gradients all-reduced, and rank 0 writes PEFT's files.

    torchrun --standalone --nproc_per_node=2 examples/train_fsdp.py --out outputs/fsdp     # gloo on CPU
    torchrun --standalone --nproc_per_node=8 examples/train_fsdp.py --out outputs/fsdp     # NCCL on 8 GPUs

`--world-size-1-reference` runs the same training in one process without sharding (the full global batch per
step): its files must equal the sharded run's (tests/test_torchrun.py checks that, <= 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import funcpeft  # noqa: E402
from funcpeft import distributed as D  # noqa: E402
from funcpeft import optim  # noqa: E402
from funcpeft import testing as T  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for PEFT's adapter files and metrics.json")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch size (divisible by the world size)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--world-size-1-reference", action="store_true", help="one process, no sharding (the reference)")
    return p.parse_args(argv)


def batches(steps: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # the same global batches on every rank
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sharded = not args.world_size_1_reference
    device = torch.device("cpu")
    if sharded:
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if sharded else 0

    model = T.tiny_llama(layers=4).to(device)  # seeded: the same weights on every rank
    model.requires_grad_(False)
    if sharded:
        D.shard_base(model)
    torch.manual_seed(0)  # the same fresh adapter on every rank (broadcast below makes sure)
    pm = funcpeft.get_peft_model(model, funcpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    fn, base, adapter = pm
    if sharded:
        adapter = D.broadcast_adapter(adapter, src=0)
    # B starts at zero: perturb it (seeded) so that every leaf gets a gradient from the first step
    g = torch.Generator().manual_seed(7)
    adapter = {
        m: {k: v + 0.01 * torch.randn(v.shape, generator=g).to(v) for k, v in p.items()} for m, p in adapter.items()
    }
    opt = optim.adamw(args.lr)
    state = opt.init(adapter)
    losses = []
    config: Any = model.config
    for ids in batches(args.steps, args.batch, args.seq, config.vocab_size):
        ids = ids.to(device)
        local = D.shard(ids) if sharded else ids
        loss, grads = funcpeft.value_and_grad(lambda a, x=local: fn(base, a, input_ids=x, labels=x).loss)(adapter)
        if sharded:
            grads = D.all_reduce_grads(grads)
            loss = D.all_reduce_grads({"loss": {"value": loss.detach()}})["loss"]["value"]
        updates, state = opt.update(grads, state, adapter)
        adapter = optim.apply_updates(adapter, updates)
        losses.append(float(loss))
    if sharded:
        held, whole = D.local_bytes(base)
        D.save_pretrained(pm, args.out, adapter)
    else:
        held = whole = sum(t.numel() * t.element_size() for t in base.values())
        pm.save_pretrained(args.out, adapter)
    if rank == 0:
        world = dist.get_world_size() if sharded else 1
        metrics = {"world_size": world, "losses": losses, "base_bytes_held": held, "base_bytes_whole": whole}
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"rank 0 of {world}: losses {[round(x, 4) for x in losses]}, base held {held / whole:.2f} of {whole} B")
    if sharded:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
