"""What only a functional PEFT can do, timed (issue 4): compiled training, vmapped ensembles, per-example
adapters, per-sample gradients. Each measurement runs its variants interleaved in one process and prints
medians and paired ratios.

Shape: the core benchmark Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000), LoRA r=16
alpha=32 on all linear layers, fp32, B non-zero; batch 4 x 128 unless said otherwise (per-example adapters
and per-sample gradients: 32 x 32 tokens).

    python benchmarks/bench_transforms.py --quick     # smoke run
    python benchmarks/bench_transforms.py             # the table (compiles take a minute or two on 2 cores)
    python benchmarks/bench_transforms.py --only ensemble,per_example
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from typing import Any

import optree
import torch
from _common import fmt_mb, fmt_ms, interleaved, machine_note, markdown_table, median, paired_ratio, peak_memory, spread
from bench_core import ALPHA, BATCH, RANK, SEQ, VOCAB, build_llama

import funcpeft
from funcpeft import optim
from funcpeft.grad import value_and_grad
from funcpeft.testing import copy_into_peft, random_like

K = 8  # adapters in the ensemble / the per-example stack
SMALL_BATCH, SMALL_SEQ = 32, 32
SECTIONS = ("compile", "ensemble", "per_example", "per_sample")


class Row:
    """One table row: ours vs a reference, with the target ratio."""

    def __init__(
        self, what: str, times: dict[str, list[float]], ours: str, ref: str, target: str, ok: Callable[[float], bool]
    ):
        self.ratio = paired_ratio(times[ours], times[ref])
        self.cells = [
            what,
            fmt_ms(median(times[ours])),
            fmt_ms(median(times[ref])),
            f"{self.ratio:.2f}",
            f"{max(spread(times[ours]), spread(times[ref])):.2f}",
            target,
            "yes" if ok(self.ratio) else "**no**",
        ]


def lora_config(lib: Any) -> Any:
    return lib.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)


def detached(tree: Any) -> Any:
    return optree.tree_map(torch.Tensor.detach, tree)


def batch(b: int, t: int, seed: int = 0, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    if pad:  # left-pad every other example by a quarter of its length
        mask[1::2, : t // 4] = 0
    return ids, mask


# -- 1. compiled training step vs PEFT's eager step -------------------------------------------------------------
def bench_compile(model: torch.nn.Module, timing: dict[str, Any], rows: list[Row], notes: list[str]) -> None:
    import peft

    pm = funcpeft.get_peft_model(model, lora_config(funcpeft))
    fn, base = pm.fn, pm.base
    adapter = detached(random_like(pm.adapter, torch.Generator().manual_seed(0)))
    peft_model = peft.get_peft_model(copy.deepcopy(model), lora_config(peft))
    copy_into_peft(peft_model, adapter, pm.plans["default"])
    peft_model.eval()
    ids, mask = batch(BATCH, SEQ)
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    opt = optim.adamw(1e-4)

    def peft_step() -> None:
        peft_opt.zero_grad(set_to_none=True)
        peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        peft_opt.step()

    def loss_fn(a: Any) -> torch.Tensor:
        return fn(base, a, input_ids=ids, attention_mask=mask, labels=ids).loss

    def step(a: Any, s: Any) -> tuple[torch.Tensor, Any, Any]:
        loss, grads = value_and_grad(loss_fn)(a)
        updates, s = opt.update(grads, s, a)
        return loss, optim.apply_updates(a, updates), s

    whole = torch.compile(step, fullgraph=True)  # forward, backward (torch.func) and AdamW in one graph
    compiled_loss = torch.compile(loss_fn, fullgraph=True)  # AOT forward+backward graphs, autograd outside
    compiled_update = torch.compile(opt.update, fullgraph=True)

    def split_step(a: Any, s: Any) -> tuple[torch.Tensor, Any, Any]:
        loss, grads = value_and_grad(compiled_loss)(a)
        updates, s = compiled_update(grads, s, a)
        return loss, optim.apply_updates(a, updates), s

    state = {
        "whole": (adapter, opt.init(adapter)),
        "split": (adapter, opt.init(adapter)),
        "eager": (adapter, opt.init(adapter)),
    }
    steps = {"whole": whole, "split": split_step, "eager": step}

    def run(name: str) -> Callable[[], None]:
        def go() -> None:
            _, a, s = steps[name](*state[name])
            state[name] = (a, s)

        return go

    for name in ("whole", "split"):
        t0 = time.perf_counter()
        with torch._inductor.config.patch(force_disable_caches=True):  # a cold compile, as on a fresh machine
            run(name)()
        notes.append(
            f"first call of the compiled step ({name}) incl. cold compilation: {time.perf_counter() - t0:.1f} s wall"
        )
    times = interleaved(
        {
            "peft eager": peft_step,
            "funcpeft eager": run("eager"),
            "compiled whole step": run("whole"),
            "compiled loss+update": run("split"),
        },
        **timing,
    )
    for name in ("compiled whole step", "compiled loss+update", "funcpeft eager"):
        rows.append(
            Row(f"train step ({name}) vs PEFT eager", times, name, "peft eager", "<= 0.85", lambda r: r <= 0.85)
        )
    share = gemm_and_attention_share(peft_step)
    notes.append(
        f"bound for the compiled step: {share:.0%} of PEFT's eager step is matmuls + attention (torch.profiler, "
        f"self CPU time), so a compiled step that removed everything else would still be ~{share:.2f}x"
    )


def gemm_and_attention_share(step: Callable[[], None]) -> float:
    """Fraction of `step`'s op time (self CPU) spent in matmul and attention kernels, forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    heavy = sum(e.self_cpu_time_total for e in events if e.key in _GEMMS or "scaled_dot_product" in e.key)
    return heavy / total


_GEMMS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul"}


# -- 2. K adapters as one vmapped ensemble vs a Python loop -----------------------------------------------------
def bench_ensemble(
    model: torch.nn.Module, timing: dict[str, Any], rows: list[Row], notes: list[str], memory: bool
) -> None:
    pm = funcpeft.get_peft_model(model, lora_config(funcpeft))
    fn, base = pm.fn, pm.base
    trees = [detached(random_like(pm.adapter, torch.Generator().manual_seed(s))) for s in range(K)]
    stacked = funcpeft.stack_adapters(trees)
    ids, mask = batch(BATCH, SEQ)

    def logits(a: Any) -> torch.Tensor:
        return fn(base, a, input_ids=ids, attention_mask=mask).logits

    def loss(a: Any) -> torch.Tensor:
        return logits(a).float().logsumexp(-1).mean()

    mapped = torch.func.vmap(logits)
    chunked = torch.func.vmap(logits, chunk_size=2)  # CPU: 2 members at a time keep activations in cache
    mapped_grad = torch.func.vmap(value_and_grad(loss))  # torch.func.grad inside vmap
    summed_grad = value_and_grad(lambda s: torch.func.vmap(loss)(s).sum())  # vmapped forward, one autograd backward
    summed_chunked = value_and_grad(lambda s: torch.func.vmap(loss, chunk_size=2)(s).sum())
    with torch.no_grad():
        fwd = {
            "vmap": lambda: mapped(stacked),
            "vmap(chunk_size=2)": lambda: chunked(stacked),
            "loop": lambda: [logits(t) for t in trees],
        }
        times = interleaved(fwd, **timing)
    for name in ("vmap", "vmap(chunk_size=2)"):
        rows.append(Row(f"ensemble forward, K={K}: {name} vs loop", times, name, "loop", "<= 1.0", lambda r: r <= 1.0))
    train = {
        "vmap(value_and_grad)": lambda: mapped_grad(stacked),
        "value_and_grad(sum of vmap)": lambda: summed_grad(stacked),
        "same, chunk_size=2": lambda: summed_chunked(stacked),
        "loop": lambda: [value_and_grad(loss)(t) for t in trees],
    }
    times = interleaved(train, **{**timing, "rounds": max(3, timing["rounds"] // 2)})
    for name in ("vmap(value_and_grad)", "value_and_grad(sum of vmap)", "same, chunk_size=2"):
        rows.append(Row(f"ensemble training, K={K}: {name} vs loop", times, name, "loop", "<= 1.0", lambda r: r <= 1.0))
    if memory:
        with torch.no_grad():
            one, many = peak_memory(lambda: logits(trees[0])), peak_memory(lambda: mapped(stacked))
        weights = sum(t.numel() * t.element_size() for t in base.values())
        notes.append(
            f"ensemble forward peak memory: one adapter {fmt_mb(one)}, K={K} vmapped {fmt_mb(many)} "
            f"(= {many / one:.1f}x one call's activations; the base weights, {fmt_mb(weights)}, are not copied: "
            f"K copies would add {fmt_mb((K - 1) * weights)})"
        )


# -- 3. per-example adapters vs PEFT's adapter_names and vs the base model alone --------------------------------
def bench_per_example(model: torch.nn.Module, timing: dict[str, Any], rows: list[Row], notes: list[str]) -> None:
    import peft

    pm = funcpeft.get_peft_model(model, lora_config(funcpeft))
    fn, base = pm.fn, pm.base
    trees = [detached(random_like(pm.adapter, torch.Generator().manual_seed(s))) for s in range(K)]
    peft_model = peft.get_peft_model(copy.deepcopy(model), lora_config(peft), adapter_name="a0")
    for k in range(1, K):
        peft_model.add_adapter(f"a{k}", lora_config(peft))
    for k, t in enumerate(trees):
        copy_into_peft(peft_model, t, pm.plans["default"], f"a{k}")
    peft_model.eval()
    ids, mask = batch(SMALL_BATCH, SMALL_SEQ, pad=True)
    index = torch.arange(SMALL_BATCH) % K
    names = [f"a{int(i)}" for i in index]
    routed = funcpeft.per_example(funcpeft.stack_adapters(trees), index)
    variants = {
        "funcpeft per_example": lambda: fn(base, routed, input_ids=ids, attention_mask=mask).logits,
        "peft adapter_names": lambda: peft_model(input_ids=ids, attention_mask=mask, adapter_names=names).logits,
        "base model alone": lambda: model(input_ids=ids, attention_mask=mask).logits,
    }
    with torch.no_grad():
        got, want = variants["funcpeft per_example"](), variants["peft adapter_names"]()
        notes.append(f"per-example vs PEFT adapter_names: max abs diff {(got - want).abs().max().item():.2e}")
        times = interleaved(variants, **timing)
    rows.append(
        Row(
            f"per-example, {K} adapters, {SMALL_BATCH}x{SMALL_SEQ} vs PEFT adapter_names",
            times,
            "funcpeft per_example",
            "peft adapter_names",
            "<= 0.8",
            lambda r: r <= 0.8,
        )
    )
    rows.append(
        Row(
            "per-example vs the base model alone",
            times,
            "funcpeft per_example",
            "base model alone",
            "<= 1.15",
            lambda r: r <= 1.15,
        )
    )
    rows.append(
        Row(
            "(bound) base model alone vs PEFT adapter_names",
            times,
            "base model alone",
            "peft adapter_names",
            "-",
            lambda r: True,
        )
    )


# -- 4. per-sample gradients vs a Python loop over examples -----------------------------------------------------
def bench_per_sample(model: torch.nn.Module, timing: dict[str, Any], rows: list[Row], notes: list[str]) -> None:
    pm = funcpeft.get_peft_model(model, lora_config(funcpeft))
    fn, base = pm.fn, pm.base
    adapter = detached(random_like(pm.adapter, torch.Generator().manual_seed(0)))
    ids, _ = batch(SMALL_BATCH, SMALL_SEQ)

    def example_loss(a: Any, x: torch.Tensor) -> torch.Tensor:  # x (T,) -> scalar
        return fn(base, a, input_ids=x[None], labels=x[None]).loss

    def batch_losses(a: Any) -> torch.Tensor:  # (B,) per-example losses, one forward over the batch
        logits = fn(base, a, input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    by_vmap = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0))
    variants = {
        "vmap(grad)": lambda: by_vmap(adapter, ids),
        "per_sample_grads": lambda: funcpeft.per_sample_grads(batch_losses, adapter, batch_size=SMALL_BATCH),
        "loop": lambda: [value_and_grad(example_loss)(adapter, ids[i]) for i in range(SMALL_BATCH)],
        "batch gradient": lambda: value_and_grad(lambda a: batch_losses(a).sum())(adapter),  # not per-sample: the bound
    }
    times = interleaved(variants, **{**timing, "rounds": max(3, timing["rounds"] // 2)})
    for name in ("vmap(grad)", "per_sample_grads"):
        rows.append(
            Row(
                f"per-sample grads ({name}), {SMALL_BATCH}x{SMALL_SEQ} vs loop",
                times,
                name,
                "loop",
                ">= 3x faster (<= 0.33)",
                lambda r: r <= 1 / 3,
            )
        )
    rows.append(
        Row("(bound) one ordinary batch gradient vs the loop", times, "batch gradient", "loop", "-", lambda r: True)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="discarded rounds first (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall time")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 warmup: a smoke run, numbers are rough")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.warmup = 2, 1
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    timing = {"rounds": args.rounds, "warmup": args.warmup, "clock": args.clock}
    model = build_llama(512, 1376)
    rows: list[Row] = []
    notes: list[str] = []
    print(machine_note(), f"; {args.clock} clock; rounds {args.rounds} (+{args.warmup} warmup)", flush=True)
    for section in only:
        t0 = time.perf_counter()
        if section == "compile":
            bench_compile(model, timing, rows, notes)
        elif section == "ensemble":
            bench_ensemble(model, timing, rows, notes, not args.no_memory)
        elif section == "per_example":
            bench_per_example(model, timing, rows, notes)
        else:
            bench_per_sample(model, timing, rows, notes)
        print(f"[{section} done in {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print(
        markdown_table(
            ["measurement", "ours (median)", "reference (median)", "ratio", "spread (IQR/med)", "target", "met"],
            [r.cells for r in rows],
        )
    )
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
