"""DoRA benchmark: funcpeft vs PEFT training step on the core benchmark Llama (issue 5, "Performance").

Shape: bench_core's LlamaForCausalLM (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000), batch
4 x 128, `LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True)` (28 modules), fp32,
random non-zero adapter (B != 0, magnitude != ||W||), eval mode. Rows: the training step (loss + adapter
gradients), its peak memory, and the memory a step leaves allocated afterwards (what lives between
steps: funcpeft keeps no weight-sized copy; PEFT's DoRA cache is off by default too).

    python benchmarks/bench_dora.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_dora.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from typing import Any

import optree
import torch
from _common import (
    fmt_mb,
    fmt_ms,
    machine_note,
    markdown_table,
    median,
    peak_memory,
    spread,
    timing_args,
    versus_peft,
)
from bench_core import ALPHA, BATCH, RANK, SEQ, VOCAB, build_llama

import funcpeft
from funcpeft.grad import value_and_grad
from funcpeft.testing import assert_trees_close, copy_into_peft, peft_grads, random_like


def config_kwargs() -> dict[str, Any]:
    return dict(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0, use_dora=True)


class DoraFixture:
    """funcpeft and PEFT DoRA on copies of one Llama, with the same random adapter."""

    def __init__(self) -> None:
        import peft

        self.model = build_llama(512, 1376)
        self.pm = funcpeft.get_peft_model(self.model, funcpeft.LoraConfig(**config_kwargs()))
        self.fn, self.base, fresh = self.pm
        noise = random_like(fresh, torch.Generator().manual_seed(1))
        self.adapter = optree.tree_map(lambda f, n: (f.detach() + n.detach()).requires_grad_(True), fresh, noise)
        self.plan = self.pm.plans["default"]
        self.peft = peft.get_peft_model(copy.deepcopy(self.model), peft.LoraConfig(**config_kwargs())).eval()
        copy_into_peft(self.peft, self.adapter, self.plan)
        self.peft_params = [p for p in self.peft.parameters() if p.requires_grad]
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
        self.kw = {"input_ids": ids, "labels": ids}
        self.step = value_and_grad(self.loss)

    def loss(self, adapter: Any) -> torch.Tensor:
        return self.fn(self.base, adapter, **self.kw).loss

    def peft_step(self) -> Any:
        loss = self.peft(**self.kw).loss
        loss.backward()
        return loss.detach()

    def zero_grads(self, *_: Any) -> None:
        for p in self.peft_params:
            p.grad = None

    def check_equal(self) -> float:
        self.zero_grads()
        want_loss = self.peft_step()
        loss, grads = self.step(self.adapter)
        assert_trees_close(grads, peft_grads(self.peft, self.adapter, self.plan), atol=1e-4)
        self.zero_grads()
        return abs(loss.item() - want_loss.item())


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages Python objects hold right now (what survives between steps)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def retained_after(fn: Any, fx: DoraFixture) -> int:
    """Bytes a call leaves alive, besides its returned value and the .grad it writes."""
    before = live_tensor_bytes()
    out = fn()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in fx.peft_params if p.grad is not None)
    kept = sum(t.numel() * t.element_size() for t in optree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return live_tensor_bytes() - before - grads - kept


def cell(xs: list[float]) -> str:
    return f"{fmt_ms(median(xs))} (±{spread(xs) * 50:.0f}%)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    finish = timing_args(ap, rounds=15, warmup=3, quick=(3, 1))
    args = finish(ap.parse_args(argv))
    print(f"# funcpeft DoRA benchmark\n\nbefore: {machine_note()}")
    fx = DoraFixture()
    loss_diff = fx.check_equal()
    print(
        f"DoRA r={RANK} alpha={ALPHA} on 28 modules, batch {BATCH}x{SEQ}, fp32; |loss diff| vs PEFT {loss_diff:.2g}, "
        f"gradients equal (atol 1e-4). {args.clock} clock, {args.rounds} rounds (+{args.warmup} warmup); ratios are "
        "medians of per-round ratios; PEFT A/A (PEFT timed twice a round) is the noise floor.\n",
        flush=True,
    )
    times, ratio, noise = versus_peft(fx.peft_step, lambda: fx.step(fx.adapter), args, before=fx.zero_grads)
    rows = [
        [
            "DoRA train step (value_and_grad)",
            cell(times["funcpeft"]),
            f"PEFT: {cell(times['PEFT'])}",
            f"{ratio:.3f}",
            "<= 1.00",
            "met" if ratio <= 1 else "MISSED",
        ],
        [
            "noise floor (PEFT A/A)",
            cell(times["PEFT A/A"]),
            f"PEFT: {cell(times['PEFT'])}",
            f"{1 + noise:.3f}",
            "-",
            "-",
        ],
    ]
    peaks, kept = {}, {}
    steps = {"PEFT": fx.peft_step, "funcpeft": lambda: fx.step(fx.adapter)}
    for name in ("PEFT", "funcpeft"):
        fx.zero_grads()
        peaks[name] = peak_memory(steps[name])
        fx.zero_grads()
        kept[name] = retained_after(steps[name], fx)
        fx.zero_grads()
    mem_ratio = peaks["funcpeft"] / peaks["PEFT"]
    rows.append(
        [
            "DoRA train peak memory",
            fmt_mb(peaks["funcpeft"]),
            f"PEFT: {fmt_mb(peaks['PEFT'])}",
            f"{mem_ratio:.3f}",
            "<= 1.00",
            "met" if mem_ratio <= 1 else "MISSED",
        ]
    )
    rows.append(
        [
            "allocated after a step (besides loss, grads)",
            fmt_mb(kept["funcpeft"]),
            f"PEFT: {fmt_mb(kept['PEFT'])}",
            "-",
            "< one 512x512 fp32 weight",
            "met" if kept["funcpeft"] < 512 * 512 * 4 else "MISSED",
        ]
    )
    print(markdown_table(["measurement", "funcpeft", "reference", "ratio", "target", "verdict"], rows))
    print(f"\nafter: {machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
