"""Gradient checkpointing benchmark: funcpeft vs PEFT, each with and without checkpointing (issue 9).

Model and method as benchmarks/bench_core.py: LlamaForCausalLM hidden 512, intermediate 1376, 4 layers,
8 heads, vocab 4000; batch 4 x 128; LoRA r=16 alpha=32 on all linear layers (28 modules), fp32, B non-zero.
Checkpointing needs training mode: PEFT runs after `.train()`, funcpeft with `dropout_rng=0` (lora_dropout
and the model's attention dropout are 0, so the numbers equal eval mode's). Four models (funcpeft and PEFT,
checkpointing on and off, `gradient_checkpointing_enable()` with transformers' default, non-reentrant) run
interleaved in one process; the table gives peak training memory and step time, with ratios.

    python benchmarks/bench_checkpointing.py             # full run (a few minutes on 2 cores)
    python benchmarks/bench_checkpointing.py --quick     # smoke run

Timing and memory as bench_core (see its docstring and benchmarks/_common.py): process CPU time, one torch
thread, each variant run once untimed before its timed call, median of per-round ratios with a bootstrap
95% CI; peak memory is the peak of tensor bytes allocated during one step above what existed before it.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch
from _common import interleaved, machine_note, steady_malloc
from bench_core import (
    AA,
    BATCH,
    HEADS,
    LAYERS,
    SEQ,
    VOCAB,
    Table,
    build_llama,
    funcpeft_config,
    parse_args,
    peak_memories,
    peft_config,
)

import funcpeft
from funcpeft.grad import value_and_grad
from funcpeft.testing import assert_trees_close, copy_into_peft, peft_grads, random_like


class Side:
    """One model with funcpeft and PEFT on copies of it; checkpointing on or off on both."""

    def __init__(self, model: torch.nn.Module, adapter: Any, checkpointing: bool):
        import peft

        self.model = copy.deepcopy(model)
        twin = copy.deepcopy(model)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # gradient_checkpointing_enable is a deprecated alias in transformers 5
                self.model.gradient_checkpointing_enable()
                twin.gradient_checkpointing_enable()
        self.pm = funcpeft.get_peft_model(self.model, funcpeft_config())
        self.fn, self.base, _ = self.pm
        self.adapter = adapter
        self.peft = peft.get_peft_model(twin, peft_config()).train()
        copy_into_peft(self.peft, adapter, self.pm.plans[self.pm.adapter_name])
        self.peft_params = [p for p in self.peft.parameters() if p.requires_grad]

    def loss(self, adapter: Any, kw: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(self.base, adapter, **kw, dropout_rng=0).loss

    def zero_grads(self, *_: Any) -> None:
        for p in self.peft_params + optree.tree_leaves(self.adapter):
            p.grad = None


def variants(on: Side, off: Side, kw: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    vag_on = value_and_grad(lambda a: on.loss(a, kw))
    vag_off = value_and_grad(lambda a: off.loss(a, kw))

    def peft_step(side: Side) -> Callable[[], None]:
        return lambda: side.peft(**kw).loss.backward()

    return {
        "PEFT ckpt": peft_step(on),
        "funcpeft ckpt value_and_grad": lambda: vag_on(on.adapter),
        "funcpeft ckpt .backward()": lambda: on.loss(on.adapter, kw).backward(),
        "PEFT": peft_step(off),
        "funcpeft value_and_grad": lambda: vag_off(off.adapter),
        "PEFT ckpt" + AA: peft_step(on),
    }


def check(on: Side, off: Side, kw: dict[str, torch.Tensor]) -> float:
    """Max |grad diff| over funcpeft/PEFT x checkpointing on/off (all must agree within 1e-5)."""
    grads = []
    for side in (on, off):
        side.zero_grads()
        side.peft(**kw).loss.backward()
        grads.append(peft_grads(side.peft, side.adapter, side.pm.plans[side.pm.adapter_name]))
        grads.append(value_and_grad(lambda a, s=side: s.loss(a, kw))(side.adapter)[1])
        side.zero_grads()
    for g in grads[1:]:
        assert_trees_close(g, grads[0], atol=1e-5)
    return max(
        (a - b).abs().max().item()
        for g in grads[1:]
        for a, b in zip(optree.tree_leaves(g), optree.tree_leaves(grads[0]))
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steady = False if args.system_malloc else steady_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# funcpeft gradient checkpointing benchmark\n\nbefore: {machine_note()}")
    model = build_llama(512, 1376)
    adapter = random_like(funcpeft.get_peft_model(model, funcpeft_config()).adapter, torch.Generator().manual_seed(1))
    on, off = Side(model, adapter, True), Side(model, adapter, False)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    kw = {"input_ids": ids, "labels": ids}
    gdiff = check(on, off, kw)

    def zero(*_: Any) -> None:
        on.zero_grads()
        off.zero_grads()

    print(
        f"Llama hidden 512, intermediate 1376, {LAYERS} layers, {HEADS} heads, vocab {VOCAB}, "
        f"attn={model.config._attn_implementation}; batch {BATCH}x{SEQ}; LoRA r=16 alpha=32 on 28 modules, fp32, "
        f"training mode (PEFT .train(), funcpeft dropout_rng=0; no dropout in this model); checkpointing: "
        f"gradient_checkpointing_enable() (non-reentrant).\nmax |grad diff| over funcpeft/PEFT x ckpt on/off: {gdiff:.2g}.\n"
        f"{args.clock} clock; rounds {args.rounds} (+{args.warmup} warmup), warm each: {not args.no_warm_each}; "
        f"malloc: {'steady (no trim)' if steady else 'system default'}; cells are median (± half IQR); ratio is the "
        "median of per-round ratios with a bootstrap 95% CI.\n",
        flush=True,
    )
    table = Table()
    if not args.no_memory:
        mem = peak_memories(variants(on, off, kw), zero)
        table.memory(
            "peak memory: funcpeft ckpt (value_and_grad) vs PEFT ckpt",
            mem["funcpeft ckpt value_and_grad"],
            mem["PEFT ckpt"],
            1.00,
            "PEFT ckpt",
        )
        table.memory(
            "peak memory: funcpeft ckpt (.backward()) vs PEFT ckpt",
            mem["funcpeft ckpt .backward()"],
            mem["PEFT ckpt"],
            1.00,
            "PEFT ckpt",
        )
        table.memory(
            "peak memory: funcpeft ckpt vs funcpeft without",
            mem["funcpeft ckpt value_and_grad"],
            mem["funcpeft value_and_grad"],
            None,
            "funcpeft",
        )
        table.memory("peak memory: PEFT ckpt vs PEFT without", mem["PEFT ckpt"], mem["PEFT"], None, "PEFT")
        table.memory(
            "peak memory: funcpeft vs PEFT, no ckpt", mem["funcpeft value_and_grad"], mem["PEFT"], 1.00, "PEFT"
        )
    timing = {"rounds": args.rounds, "warmup": args.warmup, "clock": args.clock, "warm_each": not args.no_warm_each}
    t = interleaved(variants(on, off, kw), before=zero, **timing)
    table.time(
        "step: funcpeft ckpt (value_and_grad) vs PEFT ckpt",
        t["funcpeft ckpt value_and_grad"],
        t["PEFT ckpt"],
        1.00,
        "PEFT ckpt",
    )
    table.time(
        "step: funcpeft ckpt (.backward()) vs PEFT ckpt",
        t["funcpeft ckpt .backward()"],
        t["PEFT ckpt"],
        None,
        "PEFT ckpt",
    )
    table.time(
        "step: funcpeft ckpt vs funcpeft without",
        t["funcpeft ckpt value_and_grad"],
        t["funcpeft value_and_grad"],
        None,
        "funcpeft",
    )
    table.time("step: PEFT ckpt vs PEFT without", t["PEFT ckpt"], t["PEFT"], None, "PEFT")
    table.time("step: funcpeft vs PEFT, no ckpt", t["funcpeft value_and_grad"], t["PEFT"], 1.00, "PEFT")
    table.time("step: noise floor (PEFT ckpt A/A)", t["PEFT ckpt" + AA], t["PEFT ckpt"], None, "PEFT ckpt")
    print(table)
    print(f"\nafter: {machine_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
